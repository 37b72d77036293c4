"""Our loader beside the streaming libraries a user would pick instead: MosaicML
Streaming, LitData and plain WebDataset, on one data set, on local disk and from S3.

    .venv/bin/pip install -e '.[bench]'                      # the peers (bench-only extra)
    .venv/bin/python bench/peer_bench.py [--images 3000] [--workers 2] [--repeats 3]
    .venv/bin/python bench/peer_bench.py --dry-run          # tiny sizes, every row (the suite)

The same JPEGs for everyone (``--images`` crops of scikit-learn's photos, ~500x375 q90,
10 classes: ``shard_bench.make_synthetic``), each library writing its own format with
its own writer: ours ``pipeline/shard.py``, Streaming ``MDSWriter``, LitData
``optimize``, WebDataset ``ShardWriter`` (plain tar); about 200 samples per shard or
chunk for all. The S3 place is the moto server of the tests (``tests/s3_server.py``, one
Python process on 127.0.0.1: slow, so the S3 rows are a lower bound for every library)
behind the tests' proxy, which counts the bytes it serves; each library's files are
uploaded there as written.

Rows, per place (local disk, page cache warm; S3: cold, then warm where the library
caches), interleaved library by library, best of ``--repeats``:
1. raw delivery: samples/s of one process reading one shuffled epoch, no decode; bytes
   per sample in each format (each measurement of rows 1 and 2 in a fresh process, timed
   inside it: no library keeps state from one to the next);
2. the DeiT recipe at 224 px (RandomResizedCrop, flip, RandAugment m9, erasing 0.25,
   Mixup/CutMix) in ``--workers`` DataLoader workers, images per CPU-second of all
   processes: (a) each library's natural path (timm's transforms on its decoded
   samples; ours is our loader), (b) our decode-and-augment on its bytes;
3. time to the first batch of (2a) from a cold process (python started, imports included);
4. bytes read in one epoch of (1), against the data set's bytes;
5. a resume at mid-epoch of (1): samples re-read and skipped against one uninterrupted
   epoch (WebDataset has no resume: said so);
6. peak RSS of a DataLoader worker in (2a).
Peers that are not installed are skipped and named. Local page cache: dropped before the
cold rows only where root may write /proc/sys/vm/drop_caches (printed either way).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from loader_bench import TIMM_MIXUP, TIMM_RECIPE, rate  # noqa: E402
from reshard_bench import cpu_name  # noqa: E402
from shard_bench import make_synthetic, warm  # noqa: E402

PEERS = {"streaming": "streaming", "litdata": "litdata"}  # library -> module (the [bench] extra)
LIBS = ("ours", "webdataset", "streaming", "litdata")
BUCKET = "peers"


def installed(lib: str) -> bool:
    import importlib.util

    return lib not in PEERS or importlib.util.find_spec(PEERS[lib]) is not None


def items(root: str) -> list[tuple[str, str, int]]:
    """(key, path, label) of every JPEG of the tree, in a fixed order."""
    classes = sorted(os.listdir(os.path.join(root, "train")))
    return [
        (os.path.splitext(name)[0], os.path.join(root, "train", c, name), label)
        for label, c in enumerate(classes)
        for name in sorted(os.listdir(os.path.join(root, "train", c)))
    ]


def _lit_item(item: tuple[str, str, int]) -> dict:
    key, path, label = item
    with open(path, "rb") as f:
        return {"key": key, "jpg": f.read(), "cls": label}


# ---------------------------------------------------------------- writers


def write(lib: str, src: str, out: str, per_shard: int) -> str:
    """``lib``'s format of the tree ``src`` under ``out``, by its own writer; returns the
    folder a reader opens."""
    from pipeline import shard

    data = items(src)
    if lib == "ours":
        with contextlib.redirect_stdout(io.StringIO()):
            assert shard.main([src, "--out", out, "--shard-size", str(per_shard), "--quiet"]) == 0
        return os.path.join(out, "train")
    if lib == "webdataset":
        import webdataset as wds

        os.makedirs(out)
        with (
            contextlib.redirect_stdout(io.StringIO()),
            wds.ShardWriter(f"{out}/shard-%06d.tar", maxcount=per_shard) as w,
        ):
            for key, path, label in data:
                with open(path, "rb") as f:
                    w.write({"__key__": key, "jpg": f.read(), "cls": label})
        return out
    size = sum(os.path.getsize(p) for _, p, _ in data) * per_shard // len(data)
    if lib == "streaming":
        from streaming import MDSWriter

        with MDSWriter(out=out, columns={"key": "str", "jpg": "bytes", "cls": "int"}, size_limit=size) as w:
            for key, path, label in data:
                with open(path, "rb") as f:
                    w.write({"key": key, "jpg": f.read(), "cls": label})
        return out
    if lib == "litdata":
        import multiprocessing

        import litdata

        method = multiprocessing.get_start_method()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            litdata.optimize(fn=_lit_item, inputs=data, output_dir=out, chunk_bytes=size, num_workers=1)
        multiprocessing.set_start_method(method, force=True)  # optimize sets "spawn" for the whole process
        return out
    raise ValueError(lib)


def upload(folder: str, s3, prefix: str) -> str:
    client = s3.client()
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            client.upload_file(path, BUCKET, f"{prefix}/{os.path.relpath(path, folder)}")
    return f"s3://{BUCKET}/{prefix}"


def presign(endpoint: str, key: str) -> str:
    """A GET URL of ``key`` in the bench's bucket, signed for an hour, through ``endpoint``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(folder) for n in names)


# ---------------------------------------------------------------- readers


class Where:
    """Where a library reads its data from: a local folder, or the S3 copy (through the
    proxy at ``endpoint``) with a cache folder (None: no cache)."""

    def __init__(self, local, remote=None, endpoint=None, cache=None, urls=None):
        self.local, self.remote, self.endpoint, self.cache = local, remote, endpoint, cache
        self.urls = urls  # WebDataset's shards on S3: presigned GET URLs (moto refuses anonymous reads)


_SUBCLASSES: dict = {}


def _transforming(cls):
    """``cls`` (a peer's dataset class) whose items go through the instance's ``bench_fn``:
    how their users add a transform (LitData and Streaming plan the epoch per worker in
    their own ``__iter__``, and their loaders accept only their own datasets)."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(
            cls.__name__, (cls,), {"__getitem__": lambda self, i: self.bench_fn(cls.__getitem__(self, i))}
        )
    return _SUBCLASSES[cls]


def dataset(lib: str, where: Where, batch: int, seed: int = 0, fn=None):
    """An iterable of raw samples (dicts holding the JPEG bytes) for one shuffled epoch,
    for a DataLoader, in ``lib``'s own way; ``fn`` applied to each sample."""
    if lib == "webdataset":
        import webdataset as wds

        names = sorted(n for n in os.listdir(where.local) if n.endswith(".tar"))
        if where.remote:  # plain WebDataset reads a store through a pipe: curl, the shards presigned
            urls = [f"pipe:curl -s -f '{url}'" for url in where.urls]
        else:
            urls = [os.path.join(where.local, n) for n in names]
        cache = {"cache_dir": where.cache} if where.cache else {}
        data = wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False, **cache).shuffle(1000)
        return data.map(fn) if fn else data
    if lib == "streaming":
        from streaming import StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
        cls = _transforming(StreamingDataset) if fn else StreamingDataset
        if where.remote:
            os.environ["S3_ENDPOINT_URL"] = where.endpoint
            data = cls(remote=where.remote, local=where.cache, shuffle=True, shuffle_seed=seed + 1, batch_size=batch)
        else:
            data = cls(local=where.local, shuffle=True, shuffle_seed=seed + 1, batch_size=batch)
        data.bench_fn = fn
        return data
    if lib == "litdata":
        import litdata

        cls = _transforming(litdata.StreamingDataset) if fn else litdata.StreamingDataset
        if where.remote:
            from litdata.streaming import downloader

            # its prefetch reads through obstore, which refuses plain http unless told: the
            # moto server is http (a real S3 endpoint is https and needs nothing)
            downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
            data = cls(
                where.remote,
                shuffle=True,
                seed=seed,
                storage_options={"endpoint_url": where.endpoint},
                cache_dir=where.cache,
            )
        else:
            data = cls(where.local, shuffle=True, seed=seed)
        data.bench_fn = fn
        return data
    raise ValueError(lib)


def manifest(where: Where):
    from pipeline.data import load_manifest
    from pipeline.store import ShardCache, Store

    if where.remote:
        cache = ShardCache(where.cache) if where.cache else None
        return load_manifest(where.remote + "/train", store=Store(cache=cache))
    return load_manifest(where.local)


def raw_epoch(lib: str, where: Where, batch: int) -> list[str]:
    """The keys of one shuffled epoch read in this process, no decode."""
    if lib == "ours":
        from pipeline.data import TrainStream
        from pipeline.manifest import _Reporter
        from pipeline.transforms import Augment

        stream = TrainStream(manifest(where), batch, augment=Augment.light(32))
        n = stream.worker_batches(0, 1) * batch
        t = time.perf_counter()  # (the manifest's load is row 3's, as a peer's set-up is)
        keys = [s["__key__"] for _, (_, s) in zip(range(n), stream._positions(0, 1, _Reporter("bench")))]
        raw_epoch.seconds = time.perf_counter() - t
        return keys
    data = dataset(lib, where, batch)
    t = time.perf_counter()  # (set-up is row 3's)
    keys = [s["__key__"] if "__key__" in s else s["key"] for s in data]
    raw_epoch.seconds = time.perf_counter() - t
    return keys


# ---------------------------------------------------------------- the recipe


class Natural:
    """A peer's natural path: its decoded sample through timm's training transform."""

    def __init__(self, key: str):
        from timm.data import create_transform

        from pipeline.compat import fix_timm_posterize

        fix_timm_posterize()  # timm's RandAugment posterize fails on Pillow >= 11 (bits 0): every user needs it

        self.key = key
        self.transform = create_transform(224, is_training=True, **TIMM_RECIPE)

    def __call__(self, sample: dict):
        from PIL import Image

        image = Image.open(io.BytesIO(sample[self.key])).convert("RGB")
        return self.transform(image), int(sample["cls"])


class OursOnBytes:
    """Our decode-and-augment (``pipeline.transforms``) on a peer's bytes: per sample in
    the worker, then normalise, erasing and Mixup/CutMix on the batch in the worker (the
    collate function), as our loader does."""

    def __init__(self, key: str, classes: int):
        from pipeline.transforms import Augment, BatchFinish, TrainTransform

        self.key, self.transform = key, TrainTransform(Augment())
        self.finish = BatchFinish(Augment(), classes, train=True)

    def __call__(self, sample: dict):
        return self.transform(sample[self.key]), int(sample["cls"])

    def collate(self, samples: list):
        import torch

        x = torch.empty((len(samples), 3, 224, 224))
        for out, (array, _) in zip(x, samples):
            self.finish.image(out, array)
        return x, self.finish.mix(x, torch.tensor([label for _, label in samples]))


def recipe(lib: str, where: Where, batch: int, workers: int, ours_aug: bool, classes: int):
    """A DataLoader of (images, soft targets) batches: ``lib``'s natural path, or our
    decode-and-augment on its bytes (``ours_aug``)."""
    import torch

    if lib == "ours":
        from pipeline.data import Loader, TrainStream
        from pipeline.transforms import Augment

        loader = Loader(TrainStream(manifest(where), batch, augment=Augment()), workers=workers)
        loader.stream._setup()  # its transforms made now, as the peers' are: outside the measured epoch
        return ((b["image"], b.get("target")) for b in loader.epoch(0))
    fn = OursOnBytes("jpg", classes) if ours_aug else Natural("jpg")
    data = dataset(lib, where, batch, fn=fn)
    collate = fn.collate if ours_aug else None
    kwargs = {"collate_fn": collate} if collate else {}
    if lib == "streaming":
        from streaming import StreamingDataLoader as DL
    elif lib == "litdata":
        from litdata import StreamingDataLoader as DL
    else:
        DL = torch.utils.data.DataLoader
    loader = DL(data, batch_size=batch, num_workers=workers, drop_last=True, **kwargs)
    if ours_aug:
        return iter(loader)
    from timm.data import Mixup

    mixup = Mixup(**TIMM_MIXUP, num_classes=classes)
    return (mixup(x, y) for x, y in loader)


# ---------------------------------------------------------------- the rows


def _keys(samples: list) -> dict:
    # a dict: Streaming's loader counts a batch by its first value (a list's first key's length)
    return {"key": [s["key"] for s in samples]}


def _resume_loader(lib: str, where: Where, batch: int):
    """(a loader of key batches for one epoch, in this process, with a state; a function
    that starts its epoch) for the resume row."""
    if lib == "ours":
        from pipeline.data import Loader, TrainStream
        from pipeline.transforms import Augment

        loader = Loader(TrainStream(manifest(where), batch, augment=Augment.light(32)), workers=0)
        return loader, lambda: (b["key"] for b in loader.epoch(loader.state_dict()["epoch"]))
    data = dataset(lib, where, batch)
    if lib == "streaming":
        from streaming import StreamingDataLoader
    else:
        from litdata import StreamingDataLoader
    loader = StreamingDataLoader(data, batch_size=batch, num_workers=0, collate_fn=_keys)
    return loader, lambda: (b["key"] for b in loader)


def _resume_phase(spec: str) -> None:
    """One process of the resume row: the whole epoch, its first half (then the state),
    or the rest from that state; the keys (and state) go to files."""
    import json
    import pickle

    s = json.loads(spec)
    loader, epoch = _resume_loader(s["lib"], Where(**s["where"]), s["batch"])
    if s["phase"] == "rest":
        with open(s["state"], "rb") as f:
            loader.load_state_dict(pickle.load(f))
    it, keys = epoch(), []
    for keys_of_batch in it if s["phase"] != "half" else (next(it) for _ in range(s["batches"])):
        keys += keys_of_batch
    if s["phase"] == "half":
        with open(s["state"], "wb") as f:
            pickle.dump(loader.state_dict(), f)
    with open(s["keys"], "w") as f:
        json.dump(keys, f)
    sys.exit(0)


def resumed(lib: str, where: Where, batch: int, tmp: str) -> tuple[int, int, int] | str | None:
    """(samples of one uninterrupted epoch, re-read, skipped) for an epoch stopped after
    half its batches and resumed from the library's state in a new process (each phase
    its own process, as after a crash); None where the library has no resume (WebDataset),
    the error where a phase failed."""
    import json

    if lib == "webdataset":
        return None
    got = {}
    for phase in ("whole", "half", "rest"):
        files = {"keys": os.path.join(tmp, f"resume-{lib}-{phase}.json"), "state": os.path.join(tmp, f"state-{lib}")}
        n = len(got["whole"]) // batch // 2 if phase == "half" else 0
        spec = {"lib": lib, "where": where.__dict__, "batch": batch, "phase": phase, "batches": n, **files}
        proc = subprocess.run(
            [sys.executable, __file__, "--resume-phase", json.dumps(spec)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            return _last_error(proc.stderr)
        with open(files["keys"]) as f:
            got[phase] = json.load(f)
    both = got["half"] + got["rest"]
    return len(got["whole"]), len(both) - len(set(both)), len(set(got["whole"]) - set(both))


def _worker_hwm_mb() -> float:
    """The largest peak RSS (VmHWM) among this process's children (DataLoader workers)."""
    me, most = str(os.getpid()), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] != me:
                    continue
            with open(f"/proc/{pid}/status") as f:
                most = max([most] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except (OSError, IndexError):
            continue
    return most / 1024


def recipe_rate(lib: str, where: Where, args, ours_aug: bool) -> tuple[float, float, float]:
    """(images/s, images per CPU-second, peak worker RSS in MB) of one epoch of the recipe."""
    peak = [0.0]

    def watched(batches):
        for b in batches:
            peak[0] = max(peak[0], _worker_hwm_mb())
            yield b

    wall, per_cpu = rate(watched(recipe(lib, where, args.batch, args.workers, ours_aug, classes=10)))
    return wall, per_cpu, peak[0]


def in_child(task: str, lib: str, where: Where, args, **extra) -> dict:
    """Run one measurement (``_child``) in a fresh process: no library keeps state from
    one measurement to the next (Streaming shares its state per process and cache folder
    in shared memory, LitData sets the start method of the process's workers)."""
    import json

    spec = {"task": task, "lib": lib, "where": where.__dict__, "batch": args.batch, "workers": args.workers, **extra}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"failed": _last_error(proc.stderr)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _last_error(stderr: str) -> str:
    """The last exception line of a child's traceback (a peer failing one measurement is
    reported in its cell, and the others go on)."""
    lines = [line for line in stderr.strip().splitlines() if re.match(r"^\w+(\.\w+)*(Error|Exception)\b", line)]
    return (lines or stderr.strip().splitlines()[-1:] or ["no output"])[-1][:160]


def _child(spec: str) -> None:
    import json

    s = json.loads(spec)
    lib, where, batch = s["lib"], Where(**s["where"]), s["batch"]
    if s["task"] == "raw":
        t = time.perf_counter()
        raw_epoch.seconds = None
        n = len(raw_epoch(lib, where, batch))
        out = {"samples": n, "seconds": raw_epoch.seconds or time.perf_counter() - t}
    elif s["task"] == "recipe":
        args = argparse.Namespace(batch=batch, workers=s["workers"])
        out = dict(zip(("wall", "per_cpu", "worker_mb"), recipe_rate(lib, where, args, s["ours_aug"])))
    print(json.dumps(out), flush=True)
    sys.exit(0)


def first_batch_s(lib: str, where: Where, args) -> dict:
    """{"seconds": from starting a fresh Python to the first batch of the natural recipe}
    (or {"failed": its error})."""
    import json

    spec = json.dumps({"lib": lib, "where": where.__dict__, "batch": args.batch, "workers": args.workers})
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--first-batch", spec], stdout=subprocess.PIPE, stderr=err, text=True
        )
        line = proc.stdout.readline()
        took = time.perf_counter() - t
        proc.wait(120)
        err.seek(0)
        return {"seconds": took} if line.strip() == "first batch" else {"failed": _last_error(err.read())}


def _first_batch(spec: str) -> None:
    import json

    s = json.loads(spec)
    batches = iter(recipe(s["lib"], Where(**s["where"]), s["batch"], s["workers"], False, classes=10))
    next(batches)
    print("first batch", flush=True)
    batches.close()
    # (timed by the parent up to this line) then a clean exit: workers killed mid-way would
    # leave Streaming's shared memory to the next process that opens the same folder
    sys.exit(0)


def drop_caches() -> bool:
    """Drop the page cache where allowed (root, a writable /proc/sys/vm/drop_caches)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def best(values: list[tuple], key=lambda v: v[0]):
    return max(values, key=key)


class Cells:
    """Each (library, place) cell's repeats of one row, and the errors of those that failed
    (a peer failing one repeat keeps its best of the others; failing all prints 'failed')."""

    def __init__(self):
        self.values: dict = {}
        self.errors: dict = {}

    def add(self, cell: tuple, got: dict, value) -> None:
        if "failed" in got:
            self.errors.setdefault(cell, []).append(got["failed"])
        else:
            self.values.setdefault(cell, []).append(value(got))

    def show(self, cell: tuple, fmt) -> str:
        return fmt(self.values[cell]) if cell in self.values else "failed"

    def print_failures(self) -> None:
        for cell, errs in self.errors.items():
            print(f"  ({' '.join(cell[:2])}: {len(errs)} of the repeats failed: {errs[-1]})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/peer_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=3000, help="synthetic ImageNet-sized JPEGs (~500x375, ~50 KB)")
    p.add_argument("--per-shard", type=int, default=200, help="samples per shard or chunk, every format")
    p.add_argument("--batch", type=int, default=64, help="batch of the recipe and of the resume row")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the recipe rows")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best is printed")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS, help="libraries to measure")
    p.add_argument(
        "--rows", default="123456", help="the rows to measure, e.g. 14 (raw delivery and bytes read: one S3 epoch)"
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, every row")
    p.add_argument("--first-batch", help=argparse.SUPPRESS)  # the cold process of row 3
    p.add_argument("--resume-phase", help=argparse.SUPPRESS)  # a process of row 5
    p.add_argument("--child", help=argparse.SUPPRESS)  # a process of rows 1 and 2
    args = p.parse_args(argv)
    if args.child:
        _child(args.child)
    if args.first_batch:
        _first_batch(args.first_batch)
    if args.resume_phase:
        _resume_phase(args.resume_phase)
    scale = 1.0
    if args.dry_run:
        args.images, args.per_shard, args.batch, args.repeats, scale = 48, 12, 4, 1, 0.3
    libs = [lib for lib in args.libs if installed(lib)]
    missing = [lib for lib in args.libs if not installed(lib)]
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.images} JPEGs, {args.per_shard} per shard")
    if missing:
        print(f"skipped (not installed; pip install -e '.[bench]'): {', '.join(missing)}")
    from s3_server import FaultProxy, S3Server

    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3, FaultProxy(s3.port) as proxy:
        src = make_synthetic(os.path.join(tmp, "src"), args.images, scale)
        files, data_bytes = warm(src)
        print(f"data set: {files} JPEGs, {data_bytes / 1e6:.1f} MB")
        can_drop = not args.dry_run and drop_caches()
        print(
            "local disk: 'local warm' reads the page cache; 'local cold' "
            + (
                "drops it before each run (root)"
                if can_drop
                else "is warm too: the page cache is not dropped (a dry run, or not allowed here)"
            )
        )
        os.environ.update(s3.env(proxy.url))
        s3.bucket(BUCKET)
        folders, remote = {}, {}
        for lib in libs:
            t = time.perf_counter()
            folders[lib] = write(lib, src, os.path.join(tmp, lib), args.per_shard)
            took = time.perf_counter() - t
            remote[lib] = upload(os.path.dirname(folders[lib]) if lib == "ours" else folders[lib], s3, lib)
            size = folder_bytes(folders[lib])
            print(f"  {lib}: written in {took:.1f} s, {size / files:,.0f} bytes per sample ({size / data_bytes:.3f}x)")

        caches = {lib: os.path.join(tmp, "warm-cache", lib) for lib in libs}
        for folder in caches.values():
            os.makedirs(folder)

        def where(lib: str, place: str) -> Where:
            if place.startswith("local"):
                if place == "local cold" and not args.dry_run:  # (not the suite's whole machine)
                    drop_caches()
                return Where(folders[lib])
            cache = caches[lib] if place == "S3 warm" else tempfile.mkdtemp(dir=tmp, prefix="cold-")
            if lib in ("ours", "webdataset") and place == "S3 cold":
                cache = None  # streamed: the two that can read a store without a local copy
            urls = None
            if lib == "webdataset":
                names = sorted(n for n in os.listdir(folders[lib]) if n.endswith(".tar"))
                urls = [presign(proxy.url, f"{lib}/{n}") for n in names]
            return Where(folders[lib], remote[lib], proxy.url, cache, urls)

        places = ("local warm", "local cold", "S3 cold", "S3 warm")
        if "1" in args.rows or "4" in args.rows:
            raw = Cells()
            served: dict = {}
            for lib in libs:  # fill the warm caches
                in_child("raw", lib, where(lib, "S3 warm"), args)
            for _ in range(args.repeats):
                for lib in libs:
                    for place in places:
                        before = proxy.served
                        got = in_child("raw", lib, where(lib, place), args)
                        raw.add((lib, place), got, lambda g: (g["samples"] / g["seconds"], g["samples"]))
                        if place == "S3 cold" and "failed" not in got:
                            served[lib] = proxy.served - before
            print("\n1. raw delivery, one process, no decode: samples/s (best of {})".format(args.repeats))
            print(_table(libs, places, lambda lib, place: raw.show((lib, place), lambda v: f"{best(v)[0]:,.0f}")))
            raw.print_failures()
            print("\n4. bytes read from S3 in one cold epoch / the data set's bytes (samples delivered)")
            for lib in libs:
                if lib not in served:
                    print(f"  {lib}: failed")
                    continue
                n = best(raw.values[lib, "S3 cold"])[1]
                print(
                    f"  {lib}: {served[lib] / 1e6:.1f} MB / {data_bytes / 1e6:.1f} MB = "
                    f"{served[lib] / data_bytes:.2f}x ({n} of {files} samples)"
                )

        if "2" in args.rows or "6" in args.rows:
            recipe_places = ("local warm", "S3 cold")
            rows = Cells()
            for _ in range(args.repeats):
                for lib in libs:
                    for place in recipe_places:
                        for ours_aug in (False, True) if lib != "ours" else (False,):
                            got = in_child("recipe", lib, where(lib, place), args, ours_aug=ours_aug)
                            rows.add((lib, place, ours_aug), got, lambda g: (g["wall"], g["per_cpu"], g["worker_mb"]))
            print(
                f"\n2. the DeiT recipe at 224 px, {args.workers} workers: images per CPU-second (images/s), best of "
                f"{args.repeats}"
            )
            for ours_aug, name in ((False, "natural path"), (True, "our decode-and-augment on its bytes")):
                print(f"  {name}:")
                print(
                    _table(
                        libs,
                        recipe_places,
                        lambda lib, place: rows.show(
                            (lib, place, ours_aug and lib != "ours"),
                            lambda v: "{1:,.1f} ({0:,.1f}/s)".format(*best(v, key=lambda r: r[1])),
                        ),
                    )
                )
            rows.print_failures()

        if "3" in args.rows:
            print(
                f"\n3. time to the first batch from a cold process (natural recipe, {args.workers} workers), best of "
                f"{args.repeats}"
            )
            firsts = Cells()
            for _ in range(args.repeats):
                for lib in libs:
                    for place in ("local warm", "local cold", "S3 cold"):
                        firsts.add((lib, place), first_batch_s(lib, where(lib, place), args), lambda g: g["seconds"])
            print(
                _table(
                    libs,
                    ("local warm", "local cold", "S3 cold"),
                    lambda lib, place: firsts.show((lib, place), lambda v: f"{min(v):.2f} s"),
                )
            )
            firsts.print_failures()

        if "5" in args.rows:
            print(f"\n5. resume at mid-epoch (batch {args.batch}, local disk): samples re-read / skipped")
            for lib in libs:
                got = resumed(lib, where(lib, "local warm"), args.batch, tmp)
                if got is None:
                    print(f"  {lib}: no resume (an epoch restarts from its first sample)")
                elif isinstance(got, str):
                    print(f"  {lib}: failed ({got})")
                else:
                    n, again, skipped = got
                    exact = "exact" if again == skipped == 0 else "not exact"
                    print(f"  {lib}: {again} re-read, {skipped} skipped of {n} ({exact})")

        if "6" in args.rows:
            print("\n6. peak RSS of one DataLoader worker, natural recipe, local disk")
            for lib in libs:
                print(f"  {lib}: " + rows.show((lib, "local warm", False), lambda v: f"{max(r[2] for r in v):,.0f} MB"))
    return 0


def _table(libs: list[str], places, cell) -> str:
    lines = ["  | library | " + " | ".join(places) + " |", "  |---|" + "---|" * len(places)]
    lines += [f"  | {lib} | " + " | ".join(cell(lib, place) for place in places) + " |" for lib in libs]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
