"""launch/slurm.py against a real Slurm 22.05 cluster (slurmctld + two slurmd on this
machine, started by launch/testcluster.py): 2-node training registered in a real
MLflow server, checkpoint-and-requeue on the time-limit signal, the shard builder as
a job array, an input error not resubmitted, --max-failures; and, on a cluster whose
nodes are hosts of their own (network namespaces), a killed rank and a node cut off
mid-run, each recovered automatically."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import FAST_PRECISION
from mlflow_server import MlflowServer
from safetensors.torch import load_file
from test_train import losses, metrics, train
from waiting import wait_for

from launch.recovery import read_attempts
from pipeline import failures

pytestmark = pytest.mark.slow  # a real Slurm cluster and jobs: bash .ci/run -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = [sys.executable, os.path.join(ROOT, "launch", "slurm.py")]


def _cluster(tmp_path_factory, name: str, netns: bool = False):
    """A started test cluster's environment; stopped after the module, or at once when
    it fails to start (daemons, namespaces and all). Skipped where Slurm cannot be installed."""
    sys.path.insert(0, ROOT)
    from launch import testcluster

    state = str(tmp_path_factory.mktemp(name))
    try:
        env = testcluster.start(state, netns=netns)
    except testcluster.Unavailable as exc:
        pytest.skip(str(exc))
    except BaseException:
        testcluster.stop(state)
        raise
    try:
        yield dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI="", **env, STATE=state)
    finally:
        testcluster.stop(state)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from _cluster(tmp_path_factory, "slurm")


@pytest.fixture(scope="module")
def netns_cluster(tmp_path_factory):
    """The same cluster with each node a host of its own (network namespace, hostname,
    address on a bridge): rank-to-rank traffic crosses a link that a test can cut."""
    if os.geteuid() != 0:
        pytest.skip("a cluster of network namespaces needs root (ip netns, nsenter, unshare)")
    yield from _cluster(tmp_path_factory, "slurm_netns", netns=True)


def trainer_args(out, shards, *overrides):
    return [
        "--config",
        os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
        f"train.out={out}",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        "data.workers=1",
        "mlflow.system_metrics=false",
        "train.log_every=1",
        "optim.warmup_epochs=0.1",
        f"train.precision={FAST_PRECISION}",
        *overrides,
    ]


def slurm(cluster, tmp_path, *args, timeout=300):
    cmd = [*SLURM, "--cpus-per-task", "1", "--time", "30", "--folder", str(tmp_path / "submitit" / "%j"), *args]
    return subprocess.run(cmd, env=cluster, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_dry_run_prints_the_sbatch_script(tmp_path):
    out = subprocess.run(
        [
            *SLURM,
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "gpu",
            "--time",
            "600",
            "--folder",
            str(tmp_path),
            "--dry-run",
            "--",
            "--config",
            "configs/tnt_s.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --cpus-per-task=10",
        "--kill-on-bad-exit=1",  # one dead task ends the step
        "# each task runs: python -m pipeline.train --config configs/tnt_s.yaml",
    ):
        assert line in out.stdout
    assert os.listdir(tmp_path) == []
    # a range: each attempt asks for the nodes up then (the dry run shows the most); a bad one refused
    ranged = subprocess.run(
        [*SLURM, "--nodes", "2-4", "--folder", str(tmp_path), "--dry-run", "--", "--config", "configs/tnt_s.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ranged.returncode == 0 and "#SBATCH --nodes=4" in ranged.stdout
    assert "# --nodes 2-4: each attempt asks for the nodes up when it is submitted, 2 to 4" in ranged.stdout
    bad = subprocess.run(
        [*SLURM, "--nodes", "4-2", "--dry-run", "--", "--config", "configs/tnt_s.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "argument --nodes: want 1 <= MIN <= MAX, not '4-2'" in bad.stderr


@pytest.mark.parametrize(
    "trainer,error",
    [
        (["--config", "configs/nope.yaml"], "error: no config file configs/nope.yaml"),
        (["--config", "configs/tnt_s.yaml", "train.bogus=1"], "error: unknown config key train.bogus"),
    ],
)
def test_dry_run_checks_the_trainer_config(trainer, error, tmp_path):
    out = subprocess.run(
        [*SLURM, "--folder", str(tmp_path / "sub"), "--dry-run", "--", *trainer],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.startswith(error) and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "sub").exists()


def test_without_a_reachable_slurm_one_line_and_nothing_left(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=gone\nSlurmctldHost=localhost\nSlurmctldPort=1\nNodeName=n1 CPUs=1\nPartitionName=p Nodes=n1\n"
    )
    env = dict(os.environ, SLURM_CONF=str(conf))
    cmd = [*SLURM, "--folder", str(tmp_path / "sub" / "%j"), "--", "--config", "configs/tiny_cpu.yaml"]
    for e in (env, dict(env, PATH=os.path.dirname(sys.executable))):  # a controller that is down; no Slurm at all
        out = subprocess.run(cmd, cwd=tmp_path, env=e, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
        assert "Traceback" not in out.stderr and sorted(os.listdir(tmp_path)) == ["slurm.conf"]


def test_help_shows_every_default():
    out = subprocess.run([*SLURM, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: python launch/slurm.py")
    text = " ".join(out.stdout.split())
    for default in ("(default: 1440)", "(default: 120)", "(default: 10)", "relative to the current directory"):
        assert default in text


def test_rendezvous_port_is_below_the_ephemeral_range_and_changes_on_requeue():
    """submitit's own port (20000-60000 from the job id) can be an ephemeral port some
    outgoing connection holds (EADDRINUSE, seen here); ours stays below Linux's
    ephemeral range and differs between a job's attempts."""
    from launch.slurm import rendezvous_port

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = {(job, restart): rendezvous_port(str(job), restart) for job in range(1, 200) for restart in range(3)}
    assert all(1024 <= port < min(ephemeral_low, 32768) for port in ports.values())
    assert ports == {(job, restart): rendezvous_port(str(job), restart) for job, restart in ports}  # all tasks agree
    assert all(ports[job, 0] != ports[job, 1] for job in range(1, 200))
    assert len(set(ports.values())) > 500  # spread, not a handful of ports


def test_what_is_resubmitted_after_a_job_ends_badly():
    from launch.recovery import decide

    assert decide("FAILED", [None, 1], 0, 3)[0]  # a rank killed, its peer lost it
    assert decide("NODE_FAIL", [None, None], 2, 3)[0]
    assert decide(None, [None], 0, 3)[0]  # Slurm forgot the job; no result: a fault
    assert not decide("FAILED", [None, 1], 3, 3)[0]  # --max-failures spent
    assert "gave up" in decide("FAILED", [None], 3, 3)[1]
    assert not decide("FAILED", [2, 2], 0, 3)[0]  # input error: never
    assert not decide("FAILED", [2, None], 0, 3)[0]
    assert not decide("CANCELLED", [None], 0, 3)[0]  # the user's scancel
    assert not decide("TIMEOUT", [None], 0, 3)[0]  # the time limit is --max-requeues' business
    assert not decide("FAILED", [3], 0, 3)[0]  # submitit refused a requeue: --max-requeues spent
    assert not decide("FAILED", [4], 0, 3, space_ok=False)[0] and decide("FAILED", [4], 0, 3, space_ok=True)[0]
    assert not decide("COMPLETED", [0, 0], 0, 3)[0]


def test_two_nodes_train_and_register_in_mlflow_server(cluster, demo_shards, tmp_path):
    from mlflow import MlflowClient

    server = MlflowServer(str(tmp_path / "mlflow")).start()
    try:
        env = dict(cluster, MLFLOW_TRACKING_URI=server.uri)
        out = str(tmp_path / "run")
        cmd = [
            *SLURM,
            "--nodes",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "30",
            "--folder",
            str(tmp_path / "sub" / "%j"),
            "--wait",
            "--wait-timeout",
            "400",
            "--",
            *trainer_args(out, demo_shards, "train.max_steps=20", "mlflow.register_as=tnt-slurm"),
        ]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=450)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "completed" in proc.stdout
        client = MlflowClient(server.uri)
        version = client.get_model_version_by_alias("tnt-slurm", "last")
        run = client.get_run(version.run_id)
        assert run.data.params["world_size"] == "2"
        log = open(os.path.join(out, "train.log")).read()
        assert "2 ranks x micro-batch 64" in log
    finally:
        server.kill()


STEPS = (
    "train.max_steps=40",
    "train.ckpt_every=1000",
    "train.eval_every=1",
    "data.eval_batch=500",
    "mlflow.register_as=",
)


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    """An uninterrupted 2-rank run of STEPS (the local launcher): what every interrupted
    and resumed run of the same config must end with."""
    ref = str(tmp_path_factory.mktemp("reference") / "run")
    train(ref, demo_shards, *STEPS)
    return ref


def same_weights(ref: str, out: str) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        wr = load_file(os.path.join(ref, "export", name))
        wo = load_file(os.path.join(out, "export", name))
        assert max((wr[k] - wo[k]).abs().max().item() for k in wr) < 1e-6, name


def test_time_limit_signal_checkpoints_requeues_and_matches_uninterrupted(cluster, demo_shards, reference, tmp_path):
    """Slurm delivers the job's ``--signal=USR2@...`` with up to a minute of jitter, so
    the test sends the same signal with ``scancel --signal=USR2`` while the job runs,
    after its first evaluation: every rank gets it, they checkpoint together, submitit
    requeues the job, and the requeued job resumes (with the best top-1 so far) into
    the same MLflow run and ends with the weights and EMA of an uninterrupted run."""
    from mlflow import MlflowClient

    ref = reference
    out = str(tmp_path / "run")
    cmd = [
        *SLURM,
        "--nodes",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "30",
        "--folder",
        str(tmp_path / "sub" / "%j"),
        "--wait",
        "--wait-timeout",
        "400",
        "--",
        *trainer_args(out, demo_shards, *STEPS),
    ]
    proc = subprocess.Popen(cmd, env=cluster, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = signal_after_eval(proc, out, cluster)
        stdout, stderr = proc.communicate(timeout=450)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    log = open(os.path.join(out, "train.log")).read()
    assert "checkpoint signal (time limit or preemption)" in log and "resumed from" in log
    best_before = next(m["val/top1"] for m in metrics(ref) if "val/top1" in m and m["step"] == 31)
    assert f"best top-1 {best_before:.2f}" in log.split("resumed from")[1].splitlines()[0]
    same_weights(ref, out)
    # one MLflow run holds both attempts' metrics
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", job_id
    logged = {m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert {1, 32, 40} <= logged


def signal_after_eval(proc, out, env) -> str:
    """The job id from the launcher's first line; USR2 once the first evaluation is logged."""
    job_id = proc.stdout.readline().split()[2].rstrip(":")
    wait_for(
        "the first evaluation in metrics.jsonl",
        lambda: os.path.isfile(os.path.join(out, "metrics.jsonl")) and any("val/top1" in m for m in metrics(out)),
        240,
        proc=proc,
    )
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True)
    return job_id


def test_max_requeues_is_honoured(cluster, demo_shards, tmp_path):
    """--max-requeues 1: the first time-limit signal requeues, the second ends the job
    (with --time under 10 minutes submitit counts every USR2 as a time-out, not a
    preemption, which it would requeue without bound)."""
    out = str(tmp_path / "run")
    # --signal-delay 10: Slurm's own USR2 comes 10 s before the 5-minute limit, long after the test's two
    cmd = [
        *SLURM,
        "--nodes",
        "1",
        "--cpus-per-task",
        "1",
        "--time",
        "5",
        "--signal-delay",
        "10",
        "--max-requeues",
        "1",
        "--folder",
        str(tmp_path / "sub" / "%j"),
        "--wait",
        "--wait-timeout",
        "300",
        "--",
        *trainer_args(out, demo_shards, "train.max_steps=2000", "data.val=", "mlflow.register_as="),
    ]
    proc = subprocess.Popen(cmd, env=cluster, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id = proc.stdout.readline().split()[2].rstrip(":")
        log = os.path.join(out, "train.log")
        read = lambda: open(log).read() if os.path.isfile(log) else ""  # noqa: E731
        for attempt in range(2):
            wait_for(
                f"attempt {attempt + 1} to log {4 * (attempt + 1)} losses",
                lambda: read().count("| loss ") > 4 * (attempt + 1) and read().count("resumed from") == attempt,
                200,
                proc=proc,
            )
            subprocess.run(["scancel", "--signal=USR2", job_id], env=cluster, check=True)
            if attempt == 0:  # wait for the requeued attempt to be training
                wait_for("the requeued attempt to resume", lambda: "resumed from" in read(), 400, proc=proc)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = open(log).read()
    assert proc.returncode == 1, stdout + stderr
    assert text.count("checkpoint signal (time limit or preemption)") == 2 and text.count("resumed from") == 1
    assert not os.path.isdir(os.path.join(out, "export"))
    assert "--max-requeues spent" in stderr.splitlines()[-1], stderr  # and not resubmitted as a fault
    assert [a["resubmit"] for a in read_attempts(out) if "after" in a] == [False]


def test_shard_array_equals_single_process(cluster, demo_shards, tmp_path):
    from pipeline import shard

    single, arrayed = str(tmp_path / "single"), str(tmp_path / "array")
    assert shard.main([demo_shards["tree"], "--out", single, "--shard-size", "300", "--quiet"]) == 0
    proc = slurm(
        cluster,
        tmp_path,
        "shard",
        "--array",
        "3",
        "--wait",
        "--wait-timeout",
        "240",
        "--",
        demo_shards["tree"],
        "--out",
        arrayed,
        "--shard-size",
        "300",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for split in ("train", "val"):
        names = sorted(n for n in os.listdir(os.path.join(single, split)) if n.endswith(".tar"))
        assert names == sorted(n for n in os.listdir(os.path.join(arrayed, split)) if n.endswith(".tar"))
        for n in names:
            assert filecmp.cmp(os.path.join(single, split, n), os.path.join(arrayed, split, n), shallow=False)
        a = json.load(open(os.path.join(single, split, "manifest.json")))
        b = json.load(open(os.path.join(arrayed, split, "manifest.json")))
        assert a["shards"] == b["shards"] and a["num_samples"] == b["num_samples"]


def test_an_input_error_fails_the_job_and_is_not_resubmitted(cluster, demo_shards, tmp_path):
    out = str(tmp_path / "run")
    proc = slurm(
        cluster,
        tmp_path,
        "--nodes",
        "1",
        "--wait",
        "--wait-timeout",
        "240",
        "--",
        *trainer_args(out, demo_shards, "data.train=/nonexistent"),
    )
    assert proc.returncode == 1
    assert "failed" in proc.stderr and "training exited with status 2" in proc.stderr
    assert "retrying cannot help" in proc.stderr.splitlines()[-1], proc.stderr
    first, decision = read_attempts(out)
    assert decision["after"] == first["job"] and decision["resubmit"] is False and decision["statuses"] == [2]


def test_a_killed_rank_then_a_node_lost_recover_then_go_on_with_the_node_left(
    netns_cluster, demo_shards, reference, tmp_path
):
    """Two faults in one run launched with ``--nodes 1-2`` on the cluster whose nodes are
    hosts of their own.

    1. SIGKILL to rank 1's process (what the OOM killer does): srun's
       --kill-on-bad-exit ends the job at once; the companion job, which Slurm starts
       only after a failure (afternotok), records which rank on which host left no
       result and resubmits the job, which gets both nodes again and resumes exactly:
       its losses are those of an uninterrupted run.
    2. In that attempt, node2's network link goes down and stays down (to its peers and
       the controller the node is gone; no connection is reset, nothing fails fast by
       itself): rank 0 finds rank 1's heartbeat stopped within
       train.heartbeat_timeout_s, records the lost host and exits; Slurm marks node2
       down, and the companion's resubmission asks for the nodes up, node1 alone: the
       trainer resumes on 1 rank with train.grad_accum 2 (the same global batch) and
       the optimizer state by name.

    The run finishes in one MLflow run with one model version; --wait follows the
    whole chain and exits 0."""
    import psutil

    from launch import testcluster

    cluster = netns_cluster
    out = str(tmp_path / "run")
    # --no-requeue: this cluster (JobRequeue=1) would requeue the job that lost a node
    # itself, keeping its 2 nodes, and it would wait for node2 (README: Under Slurm)
    cmd = [
        *SLURM,
        "--nodes",
        "1-2",
        "--cpus-per-task",
        "1",
        "--time",
        "30",
        "--folder",
        str(tmp_path / "sub" / "%j"),
        "--failure-backoff",
        "1",
        "--sbatch",
        "no-requeue=",
        "--wait",
        "--wait-timeout",
        "600",
        "--",
        *trainer_args(
            out,
            demo_shards,
            *STEPS,
            "train.ckpt_every=8",
            "train.heartbeat_timeout_s=10",
            "mlflow.register_as=tnt-fault",
        ),
    ]
    log = os.path.join(out, "train.log")
    elastic = "on another number of ranks: 2 ranks x accum 1 -> 1 ranks x accum 2"
    # the first attempt asks for the nodes up: both, once both have registered
    deadline = time.time() + 60
    while subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], env=cluster, capture_output=True, text=True
    ).stdout.split() != ["idle", "idle"]:
        assert time.time() < deadline, "the cluster's two nodes did not come up"
        time.sleep(0.5)
    proc = subprocess.Popen(cmd, env=cluster, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lost = None
    try:
        job_id = proc.stdout.readline().split()[2].rstrip(":")
        # 1. a killed rank
        until(proc, lambda: (failures.resume_point(out) or "") >= "step00000016")
        rank1 = [
            p
            for p in psutil.process_iter()
            if _env(p).get("SLURM_JOB_ID") == job_id
            and _env(p).get("SLURM_PROCID") == "1"
            and "submitit" in " ".join(p.cmdline())
        ]
        rank1 = [p for p in rank1 if p.ppid() not in {q.pid for q in rank1}]  # not its forked DataLoader worker
        assert len(rank1) == 1, "rank 1's process not found"
        rank1[0].kill()
        killed_at = failures.resume_point(out)
        # 2. the resubmitted attempt runs on: cut node2 off, for good
        until(proc, lambda: "resumed from" in _read(log) and (failures.resume_point(out) or "") > killed_at)
        testcluster.link(cluster["STATE"], "node2", up=False)
        cut = time.monotonic()
        try:
            while time.monotonic() - cut < 60 and lost is None:
                lost = next(
                    (
                        r
                        for r in failures.read(out)
                        if r["rank"] == 0 and r["job"] != job_id and r["kind"].startswith("lost a peer rank")
                    ),
                    None,
                )
                time.sleep(0.2)
            detected = time.monotonic() - cut
            until(proc, lambda: elastic in _read(log), timeout=300)  # the next attempt, on node1 alone
        finally:
            testcluster.link(cluster["STATE"], "node2", up=True)
        stdout, stderr = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout + stderr
    first, second = read_attempts(out)[:2]
    assert second["after"] == job_id == first["job"] and second["resubmit"] and second["resubmission"] == 1
    assert second["statuses"][1] is None, second  # rank 1 left no result
    assert f"resubmitted as job {second['job']}" in stderr
    (job_record,) = [
        r for r in failures.read(out) if r["kind"] == "job FAILED" and r["error"].startswith(f"Slurm job {job_id} ")
    ]
    # rank 1 said nothing (SIGKILL); rank 0 said it lost a peer, unless srun killed it first
    assert (
        "killed without a word (from outside, the OOM killer, or its node went down): rank 1 (node2)"
        in job_record["error"]
        and job_record["resume_from"] == killed_at
    ), job_record
    assert lost is not None, "rank 0 did not notice that node2 was gone"
    assert "rank 1 (node2) sent no heartbeat" in lost["error"] and lost["host"] == "node1", lost
    assert lost["job"] == second["job"] and lost["resubmission"] == 1 and lost["resume_from"] > killed_at
    assert detected < 10 + 15, f"{detected:.0f} s from the cut to rank 0's record"
    text = _read(log)
    for tag in (killed_at, lost["resume_from"]):
        assert "resumed from " + os.path.join(out, "checkpoints", tag) in text
    assert elastic in text
    # exact up to the node loss (fault 1 recovered on both nodes), then one rank: its own samples
    on_two, ref = int(lost["resume_from"][4:]), losses(reference)
    got = losses(out)
    assert all(got[s] == pytest.approx(ref[s], rel=1e-5) for s in range(1, on_two + 1))
    assert sorted(got) == list(range(1, 41)) and all(0 < got[s] < 3 for s in got)
    from mlflow import MlflowClient

    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[f"layout_change.step{on_two}"] == "2 ranks x accum 1 -> 1 ranks x accum 2"
    # a version at each new best evaluation and @last at the end, all in the one run; the
    # last carries the history: the attempts (the first, its resubmission, the one on
    # node1 alone), their world sizes and the faults recorded
    versions = client.search_model_versions("name='tnt-fault'")
    assert {v.run_id for v in versions} == {runs[0].info.run_id}
    last = client.get_model_version_by_alias("tnt-fault", "last").tags
    assert last["step"] == "40" and last["world_sizes"] == "2,2,1" and last["attempts"] == "3", last
    assert 2 <= int(last["faults"]) <= len(failures.read(out)) and last["requeues"] == "0"
    print(f"node cut off: found in {detected:.0f} s")


def until(proc, condition, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _env(p) -> dict:
    import psutil

    try:
        return p.environ()
    except (psutil.Error, OSError):
        return {}


def test_max_failures_is_honoured(cluster, demo_shards, tmp_path):
    """A job that fails from a fault every time (its DataLoader never delivers within
    data.timeout_s): resubmitted --max-failures times, then given up, in one line;
    never two attempts for one failure."""
    out = str(tmp_path / "run")
    proc = slurm(
        cluster,
        tmp_path,
        "--nodes",
        "1",
        "--max-failures",
        "1",
        "--failure-backoff",
        "1",
        "--wait",
        "--wait-timeout",
        "300",
        "--",
        *trainer_args(out, demo_shards, "data.timeout_s=0.001", "data.val=", "mlflow.register_as="),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "gave up: 1 resubmission(s) after faults, --max-failures 1" in proc.stderr.splitlines()[-1], proc.stderr
    attempts = read_attempts(out)
    assert [a.get("resubmission") for a in attempts if "job" in a] == [0, 1]
    assert [a["resubmit"] for a in attempts if "after" in a] == [True, False]
    with open(os.path.join(out, "failures.jsonl")) as f:
        kinds = [json.loads(line)["kind"] for line in f]
    assert (
        kinds.count("job FAILED") == 2
        and kinds.count("data loading stalled (no batch from the DataLoader workers in data.timeout_s)") == 2
    ), kinds
