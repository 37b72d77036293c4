"""Train (or shard) on a Slurm cluster through submitit, with checkpoint-and-requeue.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 -- --config configs/tnt_s.yaml
    python launch/slurm.py --nodes 2 --dry-run -- --config configs/tiny_cpu.yaml   # print the sbatch script
    python launch/slurm.py shard --array 8 -- /data/imagenet --out shards/imagenet

Training: one task per GPU (``--gpus-per-node``; one task per node without GPUs).
Inside each task rank, local rank, world size and the rendezvous address come from
submitit's ``TorchDistributedEnvironment``, the rendezvous port from
:func:`rendezvous_port` (below Linux's ephemeral ports, new for each requeued attempt);
then ``pipeline.train`` runs, the same code path for 1 or N nodes.

Time limits and preemption: submitit asks Slurm for ``--signal=USR2@<delay>``. Every
task receives the signal; the trainer notes it and, at the next optimizer step, all
ranks agree on it (it travels in the all-reduce the step already does), write a ZeRO
checkpoint together (ZeRO files need every rank), and then global rank 0 lets
submitit requeue the job. The requeued job resumes mid-epoch from that checkpoint,
into the same MLflow run. Preemption is only signalled this way when the cluster sets
``preempt_send_user_signal``; otherwise a preempted job resumes from its last periodic
checkpoint (``train.ckpt_every``). ``--max-requeues`` bounds the requeues at the time
limit (submitit's rule: a signal once the job has run min(80% of the limit, the limit
minus 10 minutes) is a time-out; an earlier one is a preemption, requeued without bound).

The cluster needs a filesystem shared by all nodes for the submitit folder
(``--folder``), the checkpoints (``train.out``) and the shards (or object-store URLs
for the shards, ``data.url_base``), and an MLflow server reachable from the nodes
(``MLFLOW_TRACKING_URI``); the default SQLite store works only on a shared filesystem
that supports locking.

Faults: a job that fails (a rank killed or crashed, a node lost, a lost peer; not an
input error, a cancel or the time limit) is resubmitted by a companion job, up to
``--max-failures`` times; each attempt resumes from ``latest`` into the same MLflow
run (``launch/recovery.py``, and the README's Faults section).

Without Slurm accounting (``sacct``) submitit cannot tell that a job died; ``--wait``
therefore follows the job (and each resubmitted attempt) with ``squeue`` and
submitit's result files, bounded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch.recovery import ATTEMPTS, Submission, read_attempts  # noqa: E402


def rendezvous_port(job_id: str, restart: int) -> int:
    """The rendezvous (MASTER_PORT) of a job attempt, the same in every task.

    submitit derives it from the job id alone, anywhere in 20000-60000, which overlaps
    Linux's ephemeral range (32768-60999): a port the kernel had handed to some outgoing
    connection on the first node then fails the whole job with EADDRINUSE (seen in our
    Slurm tests). This picks a port in 20000-32767, below that range, and varies it with
    the requeue count, so that a requeued attempt does not meet its predecessor's socket
    either. A MASTER_PORT set by the user still wins.
    """
    import zlib

    return 20000 + zlib.crc32(f"{job_id}:{restart}".encode()) % (32768 - 20000)


def master_address(first_node: str, launch_ip: str | None, num_nodes: int) -> str:
    """The rendezvous host: the first node's name when it resolves, else the launch
    node's IP (several slurmd on one host have node names that do not resolve); with
    neither, loopback works for one node only, and several nodes are refused (each
    would rendezvous with itself and wait for ranks that never come)."""
    try:
        socket.gethostbyname(first_node)
        return first_node
    except OSError:
        pass
    if launch_ip:
        return launch_ip
    if num_nodes > 1:
        from pipeline.errors import InputError

        raise InputError(
            f"the first node's name {first_node!r} does not resolve and Slurm gave no "
            f"SLURM_LAUNCH_NODE_IPADDR: {num_nodes} nodes cannot rendezvous; set MASTER_ADDR"
        )
    return "127.0.0.1"


class TrainJob:
    """The callable submitit runs in every task; requeues itself on timeout."""

    def __init__(self, args: list[str], workdir: str, resubmission: int = 0):
        self.args = list(args)
        self.workdir = workdir
        self.resubmission = resubmission  # resubmissions after faults before this job (--max-failures)

    def __call__(self) -> int:
        import submitit

        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
        if "MASTER_PORT" not in os.environ:
            job = submitit.JobEnvironment()
            os.environ["MASTER_PORT"] = str(
                rendezvous_port(job.job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
            )
        # overwrite: RANK, WORLD_SIZE... inherited from the submitting shell (sbatch
        # exports its environment) would be another job's
        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MASTER_ADDR"] = master_address(
            env.master_addr, os.environ.get("SLURM_LAUNCH_NODE_IPADDR"), int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
        )
        os.environ["TNTPIPE_RESUBMISSION"] = str(self.resubmission)  # into the failure record
        os.chdir(self.workdir)
        from pipeline import train

        status = train.main(self.args)
        if status:
            raise RuntimeError(f"training exited with status {status}")
        return status

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on global rank 0 at the time-limit signal: requeue."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.args, self.workdir, self.resubmission))


def submit_chain(
    settings, trainer_args: list[str], workdir: str, resubmissions: int, out: str, cause: dict | None = None
):
    """Submit one training attempt and (with --max-failures) its companion; (job, companion).
    ``settings``: a :class:`launch.recovery.Submission`. Also called by the companion job
    itself, where this function and launch/recovery.py arrive pickled by value."""
    import cloudpickle

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)  # in a companion job: launch/ is not an installed package
    from launch import recovery

    # submitit pickles the jobs: RecoverJob and Submission by value, so that the companion
    # job unpickles them without launch/ on its path
    cloudpickle.register_pickle_by_value(recovery)
    job = executor(settings, nodes=nodes_for_attempt(settings)).submit(TrainJob(trainer_args, workdir, resubmissions))
    recover = None
    if settings.max_failures > 0:
        results = [str(job.task(i).paths.result_pickle) for i in range(job.num_tasks)]
        recover = executor(settings.companion(job.job_id), srun_args=[]).submit(
            recovery.RecoverJob(settings, trainer_args, workdir, job.job_id, results, resubmissions, submit_chain)
        )
    recovery.append_attempt(
        out,
        {
            **(cause or {}),
            "job": job.job_id,
            "recover_job": recover.job_id if recover else None,
            "tasks": job.num_tasks,
            "resubmission": resubmissions,
        },
    )
    return job, recover


class ShardTask:
    """One task of a shard-builder job array: writes shards ``i % n == task``."""

    def __init__(self, args: list[str], workdir: str):
        self.args = list(args)
        self.workdir = workdir

    def __call__(self) -> int:
        os.chdir(self.workdir)
        from pipeline import shard

        status = shard.main([*self.args, "--quiet"])  # task index/count from SLURM_ARRAY_TASK_ID/COUNT
        if status:
            raise RuntimeError(f"shard builder exited with status {status}")
        return status


def executor(args, srun_args: list[str] | None = None, nodes: int | None = None):
    import submitit

    if args.dry_run and shutil.which("srun") is None:
        # submitit refuses to build a Slurm executor where there is no srun; printing the
        # script needs none (a dry run from a laptop or a fresh CI machine)
        submitit.SlurmExecutor.affinity = classmethod(lambda cls: 1)
    ex = submitit.AutoExecutor(folder=args.folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    # KEY=VALUE, or KEY= for a flag without a value (no-requeue=)
    extra = {k: v if v else True for k, v in (kv.split("=", 1) for kv in args.sbatch)}
    params = dict(
        name=args.job_name,
        nodes=nodes or args.nodes[1],
        tasks_per_node=max(1, args.gpus_per_node),
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters=extra,
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    # one dead task ends the step at once (its peers would otherwise wait in a collective)
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1"] if srun_args is None else srun_args
    if args.mem:
        params["mem_gb"] = args.mem
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    ex.update_parameters(**params)
    return ex


def wait(job, timeout: float, env: dict | None = None) -> tuple[bool, str]:
    """Follow ``job`` with squeue until it leaves the queue; (ok, message).

    A requeued job comes back under the same id, so it is followed through requeues."""
    from submitit.core.utils import pickle_load

    deadline = time.time() + timeout
    gone_since = None
    while time.time() < deadline:
        if in_queue(job.job_id, env):
            gone_since = None
        else:
            gone_since = gone_since or time.time()
            results = [job.task(i).paths.result_pickle for i in range(job.num_tasks)]
            if all(os.path.exists(p) for p in results):
                for i, path in enumerate(results):
                    outcome, value = pickle_load(path)
                    if outcome != "success":
                        return False, f"task {i} failed: {str(value).strip().splitlines()[-1]}"
                return True, "completed"
            if time.time() - gone_since > 15:  # out of the queue, no result: it died
                return False, f"job left the queue without a result (see {job.paths.stderr})"
        time.sleep(1)
    return False, f"still running after {timeout:.0f}s"


def submit_train(args, trainer_args: list[str]) -> int:
    from pipeline import config

    out = os.path.abspath(config.load_argv(trainer_args).out_dir)  # a missing file or unknown key fails here
    ex = executor(args)
    if args.dry_run:
        script = ex._executor._make_submission_file_text("<python -m submitit.core._submit ...>", "<uid>")
        print(script)
        print(f"# each task runs: python -m pipeline.train {shlex.join(trainer_args)}")
        if args.nodes[0] < args.nodes[1]:
            print(
                f"# --nodes {nodes_text(args.nodes)}: each attempt asks for the nodes up when it is submitted, "
                f"{args.nodes[0]} to {args.nodes[1]} (shown: {args.nodes[1]})"
            )
        if args.max_failures:
            print(
                "# after a fault, a companion job (--dependency=afternotok) resubmits it, up to "
                f"{args.max_failures} times"
            )
        return 0
    job, recover = submit_chain(Submission.of(args), trainer_args, os.getcwd(), 0, out)
    nodes = job.num_tasks // max(1, args.gpus_per_node)
    print(
        f"submitted job {job.job_id}: {nodes} node(s) x {max(1, args.gpus_per_node)} task(s)"
        + (
            f"; recovery job {recover.job_id} resubmits it after a fault (--max-failures {args.max_failures})"
            if recover
            else ""
        )
    )
    print(f"  logs: {job.paths.stdout} / {job.paths.stderr}")
    print(f"  attempts: {os.path.join(out, ATTEMPTS)}; faults: {os.path.join(out, 'failures.jsonl')}")
    print(
        f"  MLflow: {os.environ.get('MLFLOW_TRACKING_URI') or 'the run directory SQLite store'} (run id "
        "in train.log and checkpoints)",
        flush=True,
    )
    if not args.wait:
        return 0
    ok, message = follow(job, recover, out, args)
    print(f"job {job.job_id}: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def follow(job, recover, out: str, args) -> tuple[bool, str]:
    """--wait: follow the training job and, after a fault, each resubmitted attempt;
    (ok, message), ok only when an attempt finished."""
    import submitit

    deadline = time.time() + args.wait_timeout
    while True:
        ok, message = wait(job, max(1.0, deadline - time.time()))
        if ok or recover is None or message.startswith("still running"):
            return ok, message
        print(
            f"job {job.job_id}: {message}; its recovery job {recover.job_id} decides what next",
            file=sys.stderr,
            flush=True,
        )
        while time.time() < deadline and in_queue(recover.job_id):
            time.sleep(1)
        after = [a for a in read_attempts(out) if a.get("after") == str(job.job_id)]
        if not after:
            return (
                False,
                f"{message}; recovery job {recover.job_id} left no decision (see its log {recover.paths.stdout})",
            )
        if not after[-1]["resubmit"]:
            return False, f"{message}; {after[-1]['why']}"
        nxt = after[-1]
        print(
            f"job {job.job_id} failed ({nxt['why']}): resubmitted as job {nxt['job']} "
            f"(resubmission {nxt['resubmission']} of --max-failures {args.max_failures})",
            file=sys.stderr,
            flush=True,
        )
        job = submitit.SlurmJob(args.folder, nxt["job"], tasks=tuple(range(nxt["tasks"])))
        recover = submitit.SlurmJob(args.folder, nxt["recover_job"]) if nxt["recover_job"] else None


def in_queue(job_id: str, env: dict | None = None) -> bool:
    return bool(
        subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, env=env
        ).stdout.strip()
    )


def submit_shard(args, shard_args: list[str]) -> int:
    ex = executor(args)
    ex.update_parameters(slurm_array_parallelism=args.array)
    tasks = [ShardTask(shard_args, os.getcwd()) for _ in range(args.array)]
    if args.dry_run:
        print(ex._executor._make_submission_file_text("<python -m submitit.core._submit ...>", "<uid>"))
        return 0
    jobs = ex.submit_array(tasks)
    print(
        f"submitted shard array {jobs[0].job_id.split('_')[0]} ({len(jobs)} tasks); the last task to "
        "finish writes the manifests"
    )
    if not args.wait:
        return 0
    failed = [(j, m) for j in jobs for ok, m in [wait(j, args.wait_timeout)] if not ok]
    for j, m in failed:
        print(f"task {j.job_id}: {m}", file=sys.stderr)
    print(f"shard array: {len(jobs) - len(failed)}/{len(jobs)} tasks completed")
    return 1 if failed else 0


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def usable_nodes(partition: str = "", env: dict | None = None) -> int | None:
    """Nodes of ``partition`` (all: the default one and the rest) that respond and take
    jobs, as ``sinfo`` sees them now: not down, drained, failing or not responding
    (``*``). None when sinfo says nothing."""
    cmd = ["sinfo", "-h", "-N", "-o", "%N %T", *(["-p", partition] if partition else [])]
    lines = subprocess.run(cmd, capture_output=True, text=True, env=env).stdout.splitlines()
    states = dict(line.split(None, 1) for line in lines if len(line.split()) == 2)
    bad = ("down", "drain", "fail", "maint", "unknown", "reboot", "power", "future", "inval", "not_responding")
    return len([n for n, st in states.items() if not st.endswith("*") and not st.startswith(bad)]) if states else None


def nodes_for_attempt(args) -> int:
    """An attempt's node count: with ``--nodes MIN-MAX``, as many as are usable now
    (:func:`usable_nodes`), between MIN and MAX (MIN when fewer: it waits for them), so
    that a job which lost a node goes on with the rest. (sbatch's own ``--nodes=MIN-MAX``
    was tried: the Slurm 22.05 test cluster started such jobs on MIN nodes with all free.)"""
    lo, hi = args.nodes
    if lo == hi:
        return hi
    up = usable_nodes(args.partition)
    return hi if up is None else max(lo, min(hi, up))


def node_range(text: str) -> tuple[int, int]:
    """``4`` -> (4, 4); ``2-4`` -> (2, 4)."""
    lo, _, hi = text.partition("-")
    try:
        nodes = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of nodes or a MIN-MAX range: {text!r}") from None
    if not 1 <= nodes[0] <= nodes[1]:
        raise argparse.ArgumentTypeError(f"want 1 <= MIN <= MAX, not {text!r}")
    return nodes


def nodes_text(nodes: tuple[int, int]) -> str:
    return str(nodes[0]) if nodes[0] == nodes[1] else f"{nodes[0]}-{nodes[1]}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__, formatter_class=_Help)
    p.add_argument(
        "mode", nargs="?", choices=("train", "shard"), default="train", help="train (default) or shard (a job array)"
    )
    p.add_argument(
        "--nodes",
        type=node_range,
        default="1",
        metavar="N|MIN-MAX",
        help="nodes for training; MIN-MAX: each attempt (the first, and each resubmission after a fault) "
        "asks for as many as are up (responding, not drained), at least MIN: the trainer then "
        "resumes on that many ranks with the global batch kept",
    )
    p.add_argument(
        "--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU (0: one CPU task per node)"
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=10,
        help="CPU cores per task: at least data.workers + 2 (the main process and the pin-memory thread)",
    )
    p.add_argument("--partition", default="", help="Slurm partition")
    p.add_argument("--account", default="", help="Slurm account")
    p.add_argument("--qos", default="", help="Slurm QOS")
    p.add_argument(
        "--time", type=int, default=24 * 60, help="time limit per job in minutes; the job requeues itself at the limit"
    )
    p.add_argument("--mem", type=int, default=0, help="memory per node in GB (0: the cluster's default)")
    p.add_argument("--constraint", default="", help="Slurm --constraint (node features)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --sbatch exclusive=",
    )
    p.add_argument(
        "--signal-delay", type=int, default=120, help="seconds before the time limit at which to checkpoint and requeue"
    )
    p.add_argument(
        "--max-requeues",
        type=int,
        default=20,
        help="requeues at the time limit before giving up (submitit requeues preemptions without bound; "
        "with --time under 10 minutes it counts every USR2 as a time-out)",
    )
    p.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="resubmit a training job that failed from a fault (a rank or node lost, a crash; not an input error, "
        "a cancel or the time limit) up to this many times, each resuming from the last checkpoint (0: never)",
    )
    p.add_argument(
        "--failure-backoff",
        type=float,
        default=10.0,
        help="seconds before the n-th resubmission: n times this (at most 60)",
    )
    p.add_argument("--array", type=int, default=8, help="shard mode: tasks in the job array")
    p.add_argument("--job-name", default="tntpipe", help="Slurm job name")
    p.add_argument(
        "--folder",
        default=os.path.join("runs", "slurm", "%j"),
        help="submitit folder (logs, pickles), relative to the current directory; on a shared filesystem",
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument(
        "--wait",
        action="store_true",
        help="follow the job to its end (and, after a fault, each resubmitted attempt); exit 1 unless the run finished",
    )
    p.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600, help="give up waiting after this many seconds")
    p.epilog = (
        "Everything after -- goes to the trainer (python -m pipeline.train) or, in shard mode, to pipeline/shard.py."
    )
    return p


def check_slurm(env: dict | None = None) -> None:
    """A Slurm controller answers: else one line, before submitit writes anything."""
    from pipeline.errors import InputError

    if shutil.which("sbatch") is None:
        raise InputError("no Slurm here (sbatch not found): run on a cluster's login node, or use launch/local.py")
    try:
        probe = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InputError(f"Slurm's controller did not answer ({exc}); check SLURM_CONF and slurmctld") from None
    if probe.returncode != 0 or "UP" not in probe.stdout:
        said = [line.strip() for line in (probe.stderr + probe.stdout).splitlines() if line.strip().strip("*")]
        raise InputError(
            f"Slurm's controller is not reachable ({said[0] if said else 'scontrol ping failed'}); "
            "check SLURM_CONF and slurmctld"
        )


def main(argv=None) -> int:
    from pipeline.errors import InputError

    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        if not args.dry_run:
            check_slurm()
        if args.mode == "shard":
            return submit_shard(args, rest)
        return submit_train(args, rest)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
