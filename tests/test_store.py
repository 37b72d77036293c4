"""Shards in an object store, against a real S3-compatible server (moto's server mode,
its own process on 127.0.0.1) reached through the standard AWS endpoint variables,
with a fault-injecting proxy in front of it (tests/s3_server.py): the builder writing
to the store, the loader reading from it through 500s, 503 SlowDowns, resets, short
bodies and stalls, the shard cache, the bytes read, and one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import make_imagenet_tree
from s3_server import FaultProxy, S3Server
from waiting import SLOWDOWN

from pipeline import shard, store
from pipeline.data import EvalStream, TrainStream
from pipeline.errors import InputError
from pipeline.manifest import load_manifest
from pipeline.transforms import Augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Short timeouts, so that the proxy's stalls are found in seconds; scaled on a slow machine
# (TEST_SLOWDOWN), where a real 1 s delay would be retried and the GET counts would be off.
FAST = store.Policy(attempts=4, backoff=0.02, read_timeout=1.0 * SLOWDOWN, connect_timeout=1.0 * SLOWDOWN)


@pytest.fixture(scope="module")
def s3():
    """The server, the proxy in front of it, and the environment pointing at the proxy."""
    with S3Server() as server, FaultProxy(server.port, stall_s=2.5 * SLOWDOWN) as proxy:
        saved = dict(os.environ)
        os.environ.update(server.env(proxy.url))
        store._clients.clear()
        try:
            yield server, proxy
        finally:
            os.environ.clear()
            os.environ.update(saved)
            store._clients.clear()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    make_imagenet_tree(str(root / "src"), per_class=20, odd=False)
    return root


def build(src, out, *extra) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return shard.main([src, "--out", out, "--shard-size", "7", "--quiet", *extra])


@pytest.fixture(scope="module")
def shards(s3, tree):
    """The same tree built locally and into the store: (local split dir, s3 split URL)."""
    server, proxy = s3
    server.bucket("data")
    assert build(str(tree / "src"), str(tree / "local")) == 0
    assert build(str(tree / "src"), "s3://data/img") == 0
    return str(tree / "local" / "train"), "s3://data/img/train"


def epoch(manifest, world=1, workers=1, batch=4, start=None, epoch_=0):
    """Keys and labels of every rank's batches of one epoch (slots run in-process)."""
    out = []
    for rank in range(world):
        stream = TrainStream(manifest, batch, rank=rank, world_size=world, augment=Augment.light(32))
        stream.epoch = epoch_
        for w in range(workers):
            if start is not None:
                stream.start = start
            out.append(
                [
                    (k, int(label))
                    for b in stream.iter_worker(w, workers, main=True)
                    for k, label in zip(b["key"], b["label"])
                ]
            )
    return out


def test_unsupported_schemes_are_refused_not_taken_as_paths(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert shard.main([str(tree / "src"), "--out", "gs://bucket/x"]) == 2
    assert "unsupported URL scheme gs://" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "gs:")
    with pytest.raises(InputError, match="unsupported URL scheme ftp://"):
        load_manifest("ftp://host/train")
    from pipeline import config

    with pytest.raises(InputError, match="unsupported URL scheme gs://"):
        config.load(overrides=["data.train=gs://bucket/train"])


def test_shards_built_into_the_store_are_the_local_bytes_and_a_rerun_uploads_only_what_is_missing(s3, tree, shards):
    server, proxy = s3
    local, remote = shards
    client = server.client()
    for split in ("train", "val"):
        names = sorted(n for n in os.listdir(tree / "local" / split) if n.endswith((".tar", ".json", ".bin")))
        for name in names:  # same shards, same manifest (offsets included), byte for byte
            body = client.get_object(Bucket="data", Key=f"img/{split}/{name}")["Body"].read()
            assert body == open(tree / "local" / split / name, "rb").read(), name
    # a build killed after some uploads: its record is missing, so that shard is built again
    client.delete_object(Bucket="data", Key="img/train/.records/train-000003.tar.json")
    client.delete_object(Bucket="data", Key="img/train/manifest.json")
    puts = sum(n for (m, p), n in proxy.counts.items() if m == "PUT" and p.endswith(".tar"))
    assert build(str(tree / "src"), "s3://data/img") == 0
    assert sum(n for (m, p), n in proxy.counts.items() if m == "PUT" and p.endswith(".tar")) == puts + 1
    assert (
        client.get_object(Bucket="data", Key="img/train/manifest.json")["Body"].read()
        == open(tree / "local" / "train" / "manifest.json", "rb").read()
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard.main(["--verify", "s3://data/img", "--quiet"]) == 0
    # a Slurm array's two tasks into the store: the last one writes the same manifest
    assert build(str(tree / "src"), "s3://data/arr", "--num-tasks", "2", "--task-index", "0") == 0
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as missing:  # not written by the first task
        client.head_object(Bucket="data", Key="arr/train/manifest.json")
    assert missing.value.response["Error"]["Code"] == "404"
    assert build(str(tree / "src"), "s3://data/arr", "--num-tasks", "2", "--task-index", "1") == 0
    assert (
        client.get_object(Bucket="data", Key="arr/train/manifest.json")["Body"].read()
        == open(tree / "local" / "train" / "manifest.json", "rb").read()
    )
    # a damaged object is found by --verify
    good = client.get_object(Bucket="data", Key="img/train/train-000001.tar")["Body"].read()
    client.put_object(Bucket="data", Key="img/train/train-000001.tar", Body=good[:-1] + b"x")
    try:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert shard.main(["--verify", "s3://data/img", "--quiet"]) == 1
        assert "s3://data/img/train/train-000001.tar: sha256 does not match the manifest" in err.getvalue()
    finally:
        client.put_object(Bucket="data", Key="img/train/train-000001.tar", Body=good)


@pytest.mark.parametrize("via", ["s3", "http"])
def test_a_flaky_network_gives_the_fault_free_epoch(s3, shards, via, caplog):
    server, proxy = s3
    local, remote = shards
    if via == "http":  # moto serves objects on plain path-style URLs too, once readable by anyone
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/*"}
            ],
        }
        server.client().put_bucket_policy(Bucket="data", Policy=json.dumps(policy))
        remote = remote.replace("s3://", proxy.url + "/")
    reference = epoch(load_manifest(local), world=2, workers=2)
    kinds = ["500", "503", "reset", "short", "stall"]
    seen: dict = {}

    def fault(method, path, n):  # the first GET of each shard fails, cycling through the kinds
        if method != "GET" or not path.endswith(".tar") or (path, via) in seen:
            return None
        seen[(path, via)] = kinds[len(seen) % len(kinds)]
        return seen[(path, via)]

    proxy.fault, proxy.injected = fault, type(proxy.injected)()
    try:
        with caplog.at_level(logging.INFO, logger="tntpipe.store"):
            got = epoch(load_manifest(remote, store=store.Store(FAST)), world=2, workers=2)
    finally:
        proxy.fault = lambda *a: None
    assert got == reference
    assert set(proxy.injected) == set(kinds), proxy.injected
    assert sum("retry 1/3 from byte" in r.message for r in caplog.records) >= len(seen)


def test_a_shard_that_always_fails_is_skipped_after_its_retries_and_ranks_stay_equal(s3, shards, caplog):
    server, proxy = s3
    local, remote = shards
    bad = "/data/img/train/train-000002.tar"
    proxy.fault = lambda method, path, n: "500" if method == "GET" and path == bad else None
    try:
        manifest = load_manifest(remote, store=store.Store(FAST))
        with caplog.at_level(logging.WARNING):
            got = epoch(manifest, world=2, workers=1)
    finally:
        proxy.fault = lambda *a: None
    reference = epoch(load_manifest(local), world=2, workers=1)
    assert [len(k) for k in got] == [len(k) for k in reference]  # equal batch counts: nobody waits
    # every sample read is one of the data set's (the made-up ones too): no empty or foreign keys
    assert {k for slot in got for k, _ in slot} <= {k for slot in reference for k, _ in slot}
    gave_up = [r.message for r in caplog.records if "gave up" in r.message]
    assert gave_up and "s3://data/img/train/train-000002.tar: gave up at byte" in gave_up[0]
    assert "after 4 attempts: HTTP 500 InternalError" in gave_up[0]
    lost = {k for slot in reference for k, _ in slot} - {k for slot in got for k, _ in slot}
    assert 0 < len(lost) <= 7  # at most that shard's samples, made up for from the next ones


@pytest.mark.parametrize("via", ["s3", "http"])
def test_429_is_retried_and_a_missing_object_is_not(s3, shards, via):
    """README (object storage): HTTP 429 is retried from the byte it stopped at; a
    missing object is an error at once, after one request (retrying cannot help)."""
    server, proxy = s3
    local, remote = shards
    if via == "http":
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/*"}
            ],
        }
        server.client().put_bucket_policy(Bucket="data", Policy=json.dumps(policy))
        remote = remote.replace("s3://", proxy.url + "/")
    name = "train-000001.tar"
    path = f"/data/img/train/{name}"
    counts = proxy.gets_of
    before = counts(path)  # the proxy counts for the whole module: the next GET is before + 1
    proxy.fault = lambda method, p, n: "429" if method == "GET" and p == path and n == before + 1 else None
    try:
        with store.Store(FAST).open(f"{remote}/{name}", 0, None) as f:
            got = f.read()
        assert got == open(os.path.join(local, name), "rb").read()
        assert counts(path) - before == 2  # the 429, then the retry
        missing = "/data/img/train/no-such-shard.tar"
        before = counts(missing)
        with pytest.raises(store.StoreError):
            with store.Store(FAST).open(f"{remote}/no-such-shard.tar", 0, None) as f:
                f.read()
        assert counts(missing) - before == 1  # one request, no retries
    finally:
        proxy.fault = lambda *a: None


def test_the_cache_serves_the_second_epoch_stays_under_its_limit_and_refetches_a_corrupt_file(s3, shards, tmp_path):
    server, proxy = s3
    local, remote = shards
    cache_dir = str(tmp_path / "cache")
    local_manifest = load_manifest(local)
    total = sum(local_manifest.shard_bytes)
    limit = total - min(local_manifest.shard_bytes) // 2  # all but one shard fits
    manifest = load_manifest(remote, store=store.Store(FAST, store.ShardCache(cache_dir, limit)))
    before = proxy.gets()
    first = epoch(manifest, epoch_=0)
    downloads = proxy.gets() - before
    assert downloads == len(manifest.urls)  # each shard once, whole

    def size():
        return sum(os.path.getsize(os.path.join(cache_dir, f)) for f in os.listdir(cache_dir) if f.endswith(".tar"))

    assert size() <= limit
    # a big enough cache: the second epoch downloads nothing
    manifest = load_manifest(remote, store=store.Store(FAST, store.ShardCache(cache_dir, total)))
    epoch(manifest, epoch_=1)
    before, offsets_before = proxy.gets(), proxy.gets("offsets.bin")
    manifest = load_manifest(remote, store=store.Store(FAST, store.ShardCache(cache_dir, total)))  # a new process's
    again = epoch(manifest, epoch_=0)
    assert again == first and proxy.gets() == before
    assert proxy.gets("offsets.bin") == offsets_before  # each shard's offsets are cached beside it
    # a corrupted cached file: found by its checksum and fetched again
    victim = sorted(f for f in os.listdir(cache_dir) if f.endswith(".tar"))[0]
    with open(os.path.join(cache_dir, victim), "r+b") as f:
        f.seek(700)
        f.write(b"\xff" * 16)
    assert epoch(manifest, epoch_=0) == first
    assert proxy.gets() == before + 1


def _cache_get(cache_dir, url, size, sha, barrier, results):
    """One process of a node asking the cache for a shard (a fresh boto3 client: a forked
    child must not share its parent's connections)."""
    store._clients.clear()
    barrier.wait()
    results.put(store.ShardCache(cache_dir).get(url, size, sha, FAST))


def test_the_cache_downloads_a_shard_once_per_node_and_evicts_the_least_recently_used(s3, shards, tmp_path):
    """README (cache): the ranks and workers of a node wait for one download; eviction
    removes the least recently used shard, not the oldest download."""
    import multiprocessing as mp

    server, proxy = s3
    local, remote = shards
    manifest = load_manifest(remote, store=store.Store(FAST))
    url, size, sha = manifest.urls[0], manifest.shard_bytes[0], manifest.sha256[0]
    path = url.split("//", 1)[1].replace("data/", "/data/", 1)  # the proxy's request path
    gets = proxy.gets_of
    before = gets(path)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_cache_get, args=(str(tmp_path / "node"), url, size, sha, barrier, results))
        for _ in range(4)
    ]  # four processes of one node, released at once
    for p in procs:
        p.start()
    got = [results.get(timeout=60 * SLOWDOWN) for _ in procs]
    for p in procs:
        p.join(10)
    assert len(set(got)) == 1 and store.sha256_file(got[0]) == sha
    assert gets(path) - before == 1, gets(path) - before
    # LRU: room for two of three shards; a, b fetched, a used again, c fetched: b goes
    a, b, c = range(3)
    sizes = manifest.shard_bytes
    cache = store.ShardCache(str(tmp_path / "lru"), limit=max(sizes[a] + sizes[c], sizes[a] + sizes[b]) + 1)
    fetch = lambda i: cache.get(manifest.urls[i], sizes[i], manifest.sha256[i], FAST)  # noqa: E731
    pa, pb = fetch(a), fetch(b)
    assert fetch(a) == pa  # used: now the most recent
    pc = fetch(c)
    assert os.path.exists(pa) and os.path.exists(pc) and not os.path.exists(pb)
    assert sum(os.path.getsize(p) for p in (pa, pc)) <= cache.limit


def test_a_shard_above_64_mib_is_uploaded_in_parts_and_arrives_whole(s3, tmp_path):
    """README (building into a bucket): multipart above 64 MiB."""
    server, proxy = s3
    big = tmp_path / "big.tar"
    data = os.urandom(1 << 20) * 65 + b"end"  # 65 MiB + 3 bytes: two parts
    big.write_bytes(data)
    store.put_file(str(big), "s3://data/big/big.tar", FAST)
    path = "/data/big/big.tar"
    assert proxy.counts[("PUT", path)] == 2  # the two parts (a single PUT would be 1, with no POSTs)
    assert proxy.counts[("POST", path)] == 2  # create, then complete
    body = server.client().get_object(Bucket="data", Key="big/big.tar")["Body"].read()
    assert len(body) == len(data) and body == data


def test_shards_for_a_bucket_are_built_under_tntpipe_stage_and_removed_after_upload(s3, tree, tmp_path, monkeypatch):
    """README (building into a bucket): each shard is built under ``$TNTPIPE_STAGE``,
    then removed locally."""
    stage = tmp_path / "stage"
    monkeypatch.setenv("TNTPIPE_STAGE", str(stage))
    assert build(str(tree / "src"), "s3://data/staged", "--splits", "val") == 0
    used = list(stage.iterdir())
    assert len(used) == 1 and used[0].is_dir()  # the split's stage
    assert not [f for f in used[0].rglob("*") if f.is_file()]  # every shard and record removed once uploaded
    # a stage that cannot be written: refused in one line that names it, nothing uploaded
    monkeypatch.setenv("TNTPIPE_STAGE", str(stage / "file"))
    (stage / "file").write_text("not a directory")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert build(str(tree / "src"), "s3://data/staged2") == 2
    assert str(stage / "file") in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    server, _ = s3
    assert "Contents" not in server.client().list_objects_v2(Bucket="data", Prefix="staged2/")


def test_each_byte_is_read_once_per_epoch_and_a_resume_reads_only_the_rest(shards):
    local, _ = shards
    manifest = load_manifest(local)
    total = sum(manifest.shard_bytes)
    for world, workers in ((1, 2), (4, 4)):
        store.Stats.reset()
        epoch(manifest, world=world, workers=workers, batch=2)
        assert store.Stats.bytes <= 1.05 * total, (world, workers, store.Stats.bytes, total)
    # half-way through a slot's batches: only what the other half needs is read
    stream = TrainStream(manifest, 2, augment=Augment.light(32), shuffle_buffer=4)
    store.Stats.reset()
    full = [k for b in stream.iter_worker(0, 1, main=True) for k in b["key"]]
    whole = store.Stats.bytes
    stream.start = len(full) // 4
    store.Stats.reset()
    rest = [k for b in stream.iter_worker(0, 1, main=True) for k in b["key"]]
    assert rest == full[len(full) // 2 :]
    assert store.Stats.bytes <= 0.65 * whole, (store.Stats.bytes, whole)


def test_an_eval_stream_reads_the_store_like_local_disk(s3, shards):
    local, remote = shards
    val_local, val_remote = local.replace("/train", "/val"), remote.replace("/train", "/val")

    def keys(m):
        return [
            k
            for b in EvalStream(m, 3, world_size=1, augment=Augment.light(32)).iter_worker(0, 1, main=True)
            for k in b["key"]
        ]

    assert keys(load_manifest(val_remote, store=store.Store(FAST))) == keys(load_manifest(val_local))


@pytest.mark.parametrize("case", ["missing bucket", "wrong credentials", "unreachable endpoint"])
def test_store_errors_stop_the_trainer_in_one_line_with_exit_2(s3, shards, case, tmp_path):
    server, proxy = s3
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    data = shards[1]
    guard = contextlib.nullcontext()
    if case == "missing bucket":
        data = "s3://no-such-bucket/img/train"
    elif case == "unreachable endpoint":
        from s3_server import free_port

        env["AWS_ENDPOINT_URL_S3"] = env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    else:  # a second real server that checks credentials (moto's IAM: none are known)
        guard = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    with guard as strict:
        if strict is not None:
            env["AWS_ENDPOINT_URL_S3"] = env["AWS_ENDPOINT_URL"] = strict.url
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.train",
                "--config",
                os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
                f"train.out={tmp_path / 'run'}",
                f"data.train={data}",
                "data.val=",
                "data.retries=2",
                "data.backoff_s=0.01",
                "data.read_timeout_s=2",
                "mlflow.register_as=",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    expected = {
        "missing bucket": "bucket no-such-bucket does not exist",
        "wrong credentials": "access to s3://data/img/train/manifest.json denied",
        "unreachable endpoint": "cannot reach s3://data/img/train/manifest.json after 2 attempts",
    }[case]
    assert expected in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.slow
def test_two_ranks_train_from_the_store_exactly_as_from_local_disk(s3, demo_shards, tmp_path):
    """The demo digits built straight into the store, read by 2 ranks through the proxy
    (the first GET of every object answered 503 SlowDown) with a node-local cache shared
    by both ranks' workers: the same batches as from local disk, so the same losses."""
    from test_train import losses, metrics, train

    server, proxy = s3
    server.bucket("demo")
    assert build(demo_shards["tree"], "s3://demo/mnist", "--shard-size", "500") == 0
    firsts: set = set()

    def fault(method, path, n):
        if method == "GET" and path.startswith("/demo/") and path not in firsts:
            firsts.add(path)
            return "503"
        return None

    # bf16, where the 2-rank losses are bit-identical run to run. (In fp32 this comparison
    # once differed in the 7th digit from step 2 on, in a module run, and matched when run
    # alone: an open question; the samples a store delivers are compared key by key with
    # local disk's by the epoch tests above.)
    steps = ("train.max_steps=4", "train.ckpt_every=0", "train.precision=bf16")
    train(str(tmp_path / "local"), demo_shards, *steps)
    proxy.fault = fault
    try:
        remote = {"train": "s3://demo/mnist/train", "val": "s3://demo/mnist/val"}
        train(str(tmp_path / "s3"), remote, *steps, f"data.cache_dir={tmp_path / 'cache'}", "data.backoff_s=0.01")
    finally:
        proxy.fault = lambda *a: None
    assert len(firsts) >= 4  # manifests and shards, each refused once, then read
    assert losses(str(tmp_path / "s3")) == losses(str(tmp_path / "local"))

    def top1(out):
        return [m["val/top1"] for m in metrics(out) if "val/top1" in m]

    assert top1(str(tmp_path / "s3")) == top1(str(tmp_path / "local"))
    # what is cached is whole shards (a prefetch cut short by a worker's exit leaves only a .tmp- file):
    # the val shards, the train shards the 4 steps used, maybe the next ones (prefetched)
    digests = {
        store.sha256_file(str(tmp_path / "cache" / f)) for f in os.listdir(tmp_path / "cache") if f.endswith(".tar")
    }
    shards = {
        s["sha256"]
        for split in ("train", "val")
        for s in json.load(open(os.path.join(demo_shards[split], "manifest.json")))["shards"]
    }
    assert len(digests) >= 3 and digests <= shards


def test_without_boto3_an_s3_url_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed: its import fails
    monkeypatch.setattr(store, "_clients", {})
    with pytest.raises(InputError, match=r"s3:// URLs need boto3: pip install 'tntpipe\[s3\]'"):
        load_manifest("s3://bucket/x/train")


def _load_in_child(node, remote, barrier, results):
    barrier.wait()
    cache = store.ShardCache(node) if node else None
    results.put(load_manifest(remote, store=store.Store(FAST, cache=cache)).num_samples)


@pytest.mark.parametrize("where", ["shard cache", "temporary directory"])
def test_a_node_fetches_the_manifest_once_for_all_its_processes(s3, shards, tmp_path, monkeypatch, where):
    """README: the ranks and workers of a node share one download of the manifest (in the
    shard cache's directory, else the node's temporary directory), checked against the
    store's size and ETag: four processes, one GET; a new version of it, one more."""
    import multiprocessing as mp
    import tempfile

    server, proxy = s3
    _, remote = shards
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / "tmp").mkdir()
    node = str(tmp_path / "node") if where == "shard cache" else ""
    path = "/" + remote.split("//", 1)[1] + "/manifest.json"  # the proxy's request path
    before = proxy.gets_of(path)
    ctx = mp.get_context("fork")

    def four() -> list:
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_load_in_child, args=(node, remote, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60 * SLOWDOWN) for _ in procs]
        for p in procs:
            p.join(timeout=60 * SLOWDOWN)
        return got

    got = four()
    assert len(set(got)) == 1 and got[0] > 0
    assert proxy.gets_of(path) == before + 1
    four()
    assert proxy.gets_of(path) == before + 1  # the node's copy, still the store's version
    client = server.client()
    key = path.split("/", 2)[2]
    body = client.get_object(Bucket="data", Key=key)["Body"].read()
    client.put_object(Bucket="data", Key=key, Body=body + b"\n")  # a new version: another ETag and size
    four()
    assert proxy.gets_of(path) == before + 2
    client.put_object(Bucket="data", Key=key, Body=body)


def _table_in_child(node, remote, barrier, results):
    barrier.wait()
    m = load_manifest(remote, store=store.Store(FAST, cache=store.ShardCache(node)))
    results.put((m.num_samples, list(m.sha256)))


def test_a_shard_table_in_the_store_is_fetched_once_per_node_and_reads_like_the_json_list(
    s3, shards, tree, tmp_path, monkeypatch
):
    """A split listed in a binary shard table (shard.TABLE_ABOVE, here 0), built into the
    store: four processes of a node fetch shards.bin once (into the node's shard cache),
    and an epoch read from the store is the local JSON-listed split's epoch."""
    import multiprocessing as mp

    server, proxy = s3
    local, _ = shards
    monkeypatch.setattr(shard, "TABLE_ABOVE", 0)
    assert build(str(tree / "src"), "s3://data/tabled") == 0
    remote = "s3://data/tabled/train"
    path = "/data/tabled/train/" + shard.SHARD_TABLE
    before = proxy.gets_of(path)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_table_in_child, args=(str(tmp_path / "node"), remote, barrier, results)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60 * SLOWDOWN) for _ in procs]
    for p in procs:
        p.join(timeout=60 * SLOWDOWN)
    listed = load_manifest(local)
    assert all(g == (listed.num_samples, list(listed.sha256)) for g in got)
    assert proxy.gets_of(path) == before + 1
    m = load_manifest(remote, store=store.Store(FAST, cache=store.ShardCache(str(tmp_path / "node"))))
    assert epoch(m, world=2, workers=2) == epoch(listed, world=2, workers=2)
