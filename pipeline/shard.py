"""ImageNet (or any class-per-folder tree) to WebDataset tar shards plus a manifest.

    python pipeline/shard.py /data/imagenet            # -> shards/imagenet/{train,val}/
    python pipeline/shard.py /data/imagenet --verify   # re-check what was written
    python pipeline/shard.py --verify shards/imagenet

Layout written, one directory per split::

    <out>/<split>/<split>-000000.tar ...   samples: <key>.jpg, <key>.cls, <key>.json
    <out>/<split>/manifest.json            sizes, sha256, classes, options, skipped inputs
    <out>/<split>/build.json               options fingerprint (refuses mixing builds)
    <out>/<split>/.records/<shard>.json    per-shard record: how resume knows a shard is done

How it works: the split's files are listed and sorted, shuffled with a seed, and cut
into shards by count and by *source* byte size. The listing is columns
(:class:`pipeline.imagenet.Listing`) and the plan one shuffled array of rows
(:class:`Plan`): ~70 bytes per image, not an object per image (ImageNet-21k's 14.2M
images: +940 MB in each task, ``bench/build_bench.py``). The plan depends only on the inputs
and the options, so a shard is a pure function of them: shards are built in parallel
processes, by several machines (``--task-index/--num-tasks``, shard ``i`` belongs to
task ``i % num_tasks``), re-built after a crash, and always come out byte-identical
(tar members carry fixed mtime/owner). Each shard is written to ``<name>.tmp-<pid>``,
fsynced and renamed; its record is written after the rename. A re-run verifies the
sha256 of every shard that has a record and skips it, so ``kill -9`` then re-run
gives the same bytes as an uninterrupted run.

Images: a valid RGB or grayscale JPEG is stored as its original bytes (checked by a
cheap DCT-scaled decode, which still reads the whole entropy-coded stream and so
catches truncation). CMYK JPEGs, PNGs named .JPEG and other formats are decoded and
re-encoded to RGB JPEG (listed under ``converted`` in the manifest); files that
cannot be decoded are skipped and listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import glob
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tarfile
import tempfile
import time
from collections import Counter

if __package__ in (None, ""):  # run as a script: `python pipeline/shard.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.path[1] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[1]  # don't let pipeline/*.py shadow top-level modules

from pipeline import store
from pipeline.atomic import replacing, write_atomic
from pipeline.errors import InputError
from pipeline.imagenet import Listing, has_class_folders, list_split, synset_mapping_names, synset_names

FORMAT = "tntpipe-shards/1"
# Every shard's sample offsets, one binary file per split beside its manifest: int64
# little-endian, shard after shard in the manifest's order, each shard's samples + 1
# (the last: where its end-of-archive blocks start). The manifest then grows with the
# shards only (14,200 shards of 1,000: 1.7 MB instead of 144 MB of JSON), and a reader
# fetches a shard's offsets with one ranged read when it opens that shard. One file,
# not one per shard: a split of 2 million shards would otherwise double its objects.
OFFSETS = "offsets.bin"
# A split of more shards than TABLE_ABOVE lists them in a binary table beside its manifest
# instead of JSON: int64 samples per shard, then int64 bytes per shard, then the 32-byte
# sha256 digests, shard after shard; names follow the builder's pattern. At 2 million
# shards the JSON list is 276 MB and parsing it adds ~1.4 GB to every process; the table
# is 96 MB, mapped (not read) by each process, and the manifest stays a few MB. Smaller
# splits (ImageNet-21k: 14,200 shards) keep the readable JSON list.
SHARD_TABLE = "shards.bin"
TABLE_ABOVE = 100_000
DEFAULT_SPLITS = ("train", "val", "validation", "test")
# Options that change the bytes written; anything else (workers, task split) does not.
FINGERPRINT_OPTIONS = ("seed", "shard_size", "shard_bytes", "resize_max_side", "quality", "limit_per_class", "check")


@dataclasses.dataclass(frozen=True)
class Options:
    seed: int = 0
    shard_size: int = 1000
    shard_bytes: int = 1 << 30
    resize_max_side: int = 0
    quality: int = 95
    limit_per_class: int = 0
    check: str = "draft"

    def fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in FINGERPRINT_OPTIONS}


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str
    path: str
    rel: str
    label: int
    cls: str


@dataclasses.dataclass(frozen=True)
class ShardJob:
    index: int
    path: str
    samples: tuple[Sample, ...]
    options: Options
    remote: str = ""  # the shard's URL in an object store ("": path is the output)


class SkipImage(Exception):
    """This input cannot become a sample; the message is the reason recorded."""


# --------------------------------------------------------------------------- images


def encode_image(data: bytes, options: Options) -> tuple[bytes, int, int, str | None]:
    """Return (jpeg bytes, width, height, conversion reason or None if stored as-is)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise SkipImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = img.format, img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SkipImage(f"not a readable image: {e}") from None
    except Image.DecompressionBombError as e:
        raise SkipImage(f"image too large: {e}") from None
    is_jpeg = fmt in ("JPEG", "MPO")  # MPO: camera JPEG with extra frames; plain JPEG to decoders
    too_big = options.resize_max_side and max(width, height) > options.resize_max_side
    reason = None
    if not is_jpeg:
        reason = f"{fmt} {mode} re-encoded to JPEG"
    elif mode not in ("RGB", "L"):
        reason = f"{mode} JPEG converted to RGB"
    elif too_big:
        reason = f"resized from {width}x{height}"
    try:
        if reason is None:
            if options.check != "header":
                if options.check == "draft":
                    img.draft(mode, (1, 1))  # decode at 1/8 scale: reads all data, cheaply
                img.load()
            elif not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                raise SkipImage("truncated JPEG (no end-of-image marker)")
            return data, width, height, None
        img.load()
        if img.mode not in ("RGB", "L"):
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                img = img.point(lambda v: v / 256).convert("L")
            elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGB", rgba.size, (255, 255, 255))
                img.paste(rgba, mask=rgba.getchannel("A"))  # flatten onto white
            else:
                img = img.convert("RGB")
        if too_big:
            scale = options.resize_max_side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            img = img.resize(size, Image.BICUBIC, reducing_gap=3.0)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=options.quality)
        return out.getvalue(), img.width, img.height, reason
    except SkipImage:
        raise
    except Exception as e:  # a decoder error of any kind: never crash on one image
        raise SkipImage(f"cannot decode: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- shards


class _HashingWriter:
    """File wrapper that hashes what is written through it (avoids a re-read)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


_progress = None  # shared sample counter, set in each worker process


def _init_worker(counter):
    global _progress
    _progress = counter
    # Workers inherit the parent's signal handlers; under submitit SIGTERM is "bypassed",
    # and a pool that cannot terminate its workers hangs at shutdown. Workers die on SIGTERM.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _tick():
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += 1


def _record_path(shard_path: str) -> str:
    head, _, name = shard_path.rpartition("/")
    return f"{head}/.records/{name}.json"


def build_shard(job: ShardJob) -> dict:
    """Write one shard atomically and its record; return the record."""
    import webdataset as wds

    written, converted, skipped, labels = 0, [], [], Counter()
    with replacing(job.path) as tmp, open(tmp, "wb") as f:
        out = _HashingWriter(f)
        # Fixed owner and mtime: the same inputs give byte-identical tars.
        with wds.TarWriter(out, user="", group="", mtime=0, encoder=False) as tar:
            for s in job.samples:
                try:
                    with open(s.path, "rb") as src:
                        data = src.read()
                    jpg, width, height, reason = encode_image(data, job.options)
                except SkipImage as e:
                    skipped.append({"path": s.rel, "reason": str(e)})
                except OSError as e:
                    skipped.append({"path": s.rel, "reason": f"cannot read: {e.strerror or e}"})
                else:
                    meta = {"path": s.rel, "class": s.cls, "width": width, "height": height}
                    if reason:
                        meta["converted"] = reason
                        converted.append({"path": s.rel, "reason": reason})
                    tar.write(
                        {
                            "__key__": s.key,
                            "jpg": jpg,
                            "cls": str(s.label).encode(),
                            "json": json.dumps(meta, sort_keys=True).encode(),
                        }
                    )
                    written += 1
                    labels[s.label] += 1
                _tick()
        f.close()
        offsets = sample_offsets(tmp)
    record = {
        "name": os.path.basename(job.path),
        "samples": written,
        "bytes": out.size,
        "sha256": out.sha.hexdigest(),
        "offsets": offsets,
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "converted": converted,
        "skipped": skipped,
    }
    text = json.dumps(record, indent=1, sort_keys=True)
    if job.remote:  # the complete shard, then its record: a record means the object is whole
        store.put_file(job.path, job.remote)
        store.put_bytes(text.encode(), _record_path(job.remote))
        os.remove(job.path)
        return record
    write_atomic(_record_path(job.path), text)
    return record


def sample_offsets(path: str) -> list[int]:
    """Each sample's byte offset in the tar (its first member's header), then where the
    last sample ends: what lets a reader fetch any run of samples, and nothing else,
    with a seek or a ranged GET (only the headers are read here)."""
    offsets, last = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.partition(".")[0]
            if key != last:
                offsets.append(member.offset)
                last = key
        offsets.append(tar.offset)  # after the last member: the end-of-archive blocks
    return offsets


sha256_file = store.sha256_file


def load_complete_record(shard_path: str) -> dict | None:
    """The shard's record if the shard on disk is complete and matches it, else None.
    In an object store: if the record and an object of the recorded size exist (uploads
    are atomic and the record is written after its shard; ``--verify`` re-hashes)."""
    if store.scheme(shard_path):
        text = _read_text(_record_path(shard_path))
        if text is None:
            return None
        record = json.loads(text)
        return record if store.stat_size(shard_path) == record["bytes"] else None
    try:
        with open(_record_path(shard_path), encoding="utf-8") as f:
            record = json.load(f)
        if os.path.getsize(shard_path) != record["bytes"] or sha256_file(shard_path) != record["sha256"]:
            return None
        return record
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- planning


def find_splits(src: str, wanted: list[str] | None, single_name: str) -> list[tuple[str, str]]:
    """[(split name, directory)]: ``src/<split>/`` folders, or ``src`` itself as one split."""
    present = [s for s in (wanted or DEFAULT_SPLITS) if os.path.isdir(os.path.join(src, s))]
    if wanted and len(present) < len(wanted):
        missing = sorted(set(wanted) - set(present))
        raise InputError(f"split folder(s) not found under {src}: {', '.join(missing)}")
    if present:
        return [(s, os.path.join(src, s)) for s in present]
    return [(single_name, src)]


def cut_validation(listing: Listing, fraction: float, seed: int) -> tuple[Listing, Listing]:
    """(train, val): per class, ``round(fraction x n)`` of its images drawn with ``seed``
    (at least one of a class with two or more, never all of it), each part in path
    order. For trees that ship no validation split, such as ImageNet-21k's fall11."""
    import numpy as np

    labels = listing.labels[listing.order]
    grouped = np.argsort(labels, kind="stable")  # positions class by class, each class in path order
    val = np.zeros(len(labels), bool)
    for group in np.split(grouped, np.flatnonzero(np.diff(labels[grouped])) + 1) if len(labels) else []:
        n = len(group)
        k = min(n - 1, max(1 if n >= 2 else 0, round(fraction * n)))
        cls = listing.classes[labels[group[0]]]
        # Positions drawn as random.sample draws list items, so the cut is the one made
        # when the listing held one object per file; a str seed is stable (sha512).
        val[group[random.Random(f"{seed}:{cls}").sample(range(n), k)]] = True
    return listing.take(listing.order[~val]), listing.take(listing.order[val])


def class_list(splits: list[tuple[str, str]], listings: dict[str, Listing]) -> list[str]:
    """Sorted class folder names of the training split (WNID order for ImageNet)."""
    for name, directory in sorted(splits, key=lambda s: s[0] != "train"):
        if has_class_folders(directory):
            return sorted(listings[name].used_classes())
    return sorted(set().union(*(listing.used_classes() for listing in listings.values())))


@dataclasses.dataclass(frozen=True)
class Plan:
    """A split's shards as positions in one shuffled array of listing rows: position
    ``i`` is the sample keyed ``<split>_<i:08d>``, shard ``k`` holds positions
    ``bounds[k]:bounds[k + 1]``. Its jobs are made one at a time (:meth:`job`): a
    Python object per sample exists only for the shards being built."""

    split: str
    listing: Listing
    rows: object  # int64 array: listing rows, shuffled
    bounds: object  # int64 array: len(self) + 1 positions
    label_of: object  # int32 array: listing label -> index in classes (-1: not a class)
    classes: list[str]
    options: Options
    out_dir: str
    stage: str = ""  # where shards bound for an object store are built before upload

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def count(self, k: int) -> int:
        return int(self.bounds[k + 1] - self.bounds[k])

    def target(self, k: int) -> str:
        """Where shard ``k`` ends up: its local path or its URL."""
        return store.join(self.out_dir, shard_name(self.split, k))

    def local(self, k: int) -> str:
        """Where shard ``k`` is written: its target, or its place in ``stage`` before upload."""
        return os.path.join(self.stage or self.out_dir, shard_name(self.split, k))

    def job(self, k: int) -> ShardJob:
        start, stop = int(self.bounds[k]), int(self.bounds[k + 1])
        rows = self.rows[start:stop]
        labels = self.label_of[self.listing.labels[rows]].tolist()
        samples = tuple(
            Sample(f"{self.split}_{i:08d}", os.path.join(self.listing.root, rel), rel, label, self.classes[label])
            for i, rel, label in zip(range(start, stop), self.listing.rels(rows), labels)
        )
        return ShardJob(k, self.local(k), samples, self.options, self.target(k) if self.stage else "")


def plan_split(split: str, listing: Listing, classes: list[str], options: Options, out_dir: str, stage: str = ""):
    """Deterministic shard plan: (plan, samples not placed with their reasons). With an
    object-store ``out_dir``, each shard is built under ``stage`` and then uploaded.

    The same shards as sorting one object per file by path, dropping what
    ``--limit-per-class`` drops, ``random.Random(f"{seed}:{split}").shuffle`` and cutting
    greedily by count and bytes: the shuffle permutes an array of rows with the same
    draws, and the cut is vectorised per shard."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    label_of = np.array([index.get(c, -1) for c in listing.classes], np.int32)
    known = label_of[listing.labels[listing.order]] >= 0
    unknown = np.sort(listing.order[~known])  # in listing (walk) order, as the files were found
    rejected = [
        {"path": rel, "reason": f"class {listing.classes[label]!r} is not in the class list"}
        for rel, label in zip(listing.rels(unknown), listing.labels[unknown].tolist())
    ]
    kept = listing.order[known]
    if options.limit_per_class:
        labels = listing.labels[kept]
        grouped = np.argsort(labels, kind="stable")
        sorted_labels = labels[grouped]
        rank = np.arange(len(kept)) - np.searchsorted(sorted_labels, sorted_labels)  # within its class, in path order
        keep = np.empty(len(kept), bool)
        keep[grouped] = rank < options.limit_per_class
        kept = kept[keep]
    rows = array.array("q")
    rows.frombytes(memoryview(kept).cast("B"))  # a copy, shuffled in place below
    del kept
    random.Random(f"{options.seed}:{split}").shuffle(rows)
    rows = np.frombuffer(rows, np.int64) if rows else np.zeros(0, np.int64)
    bounds, start = [0], 0
    while start < len(rows):
        window = np.cumsum(listing.sizes[rows[start : start + options.shard_size]])
        start += max(1, int(np.searchsorted(window, options.shard_bytes, "right")))
        bounds.append(start)
    plan = Plan(split, listing, rows, np.array(bounds, np.int64), label_of, classes, options, out_dir, stage)
    return plan, rejected


def inputs_digest(listing: Listing, batch: int = 8192) -> str:
    h = hashlib.sha256()
    for start in range(0, len(listing), batch):
        rows = listing.order[start : start + batch]
        lines = zip(listing.rels(rows), listing.labels[rows].tolist(), listing.sizes[rows].tolist())
        h.update("".join(f"{rel}\0{listing.classes[c]}\0{size}\n" for rel, c, size in lines).encode())
    return h.hexdigest()


def _only_quality_differs(out_dir: str, old: dict, build: dict) -> bool:
    """Only --quality changed and the complete build re-encoded no image (its manifest
    lists none converted), so the new quality would change no byte."""
    rest = {k: v for k, v in old.items() if k != "options"}
    if rest != {k: v for k, v in build.items() if k != "options"}:
        return False
    o, n = old.get("options", {}), build["options"]
    if {k for k in set(o) | set(n) if o.get(k) != n.get(k)} != {"quality"}:
        return False
    try:
        with open(os.path.join(out_dir, "manifest.json"), encoding="utf-8") as f:
            return not json.load(f).get("converted", ["?"])
    except (OSError, ValueError):
        return False


def _read_text(path: str) -> str | None:
    """A local file's or an object's text; None if it does not exist."""
    if store.scheme(path):
        try:
            return store.read_bytes(path).decode()
        except store.NotFound:
            return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_text(path: str, text: str) -> None:
    """Atomically: a local file by rename, an object by one PUT (visible once complete)."""
    if store.scheme(path):
        store.put_bytes(text.encode(), path)
    else:
        write_atomic(path, text)


def check_build_dir(out_dir: str, build: dict, overwrite: bool) -> None:
    """Refuse to mix shards of different inputs/options in one directory."""
    path = store.join(out_dir, "build.json")
    text = _read_text(path)
    try:
        old = None if text is None else json.loads(text)
    except ValueError:
        old = {}
    if old is not None and old != build and _only_quality_differs(out_dir, old, build):
        old = build  # nothing was re-encoded: the shards are the same bytes at any quality
    if old is not None and old != build:
        if not overwrite:
            diff = sorted(
                k
                for k in set(old.get("options", {})) | set(build["options"])
                if old.get("options", {}).get(k) != build["options"].get(k)
            )
            what = f"options differ: {', '.join(diff)}" if diff else "inputs differ"
            raise InputError(f"{out_dir} holds shards from another build ({what}); pass --overwrite to replace them")
        if store.scheme(out_dir):
            for name in store.list_names(out_dir) + [
                f".records/{n}" for n in store.list_names(store.join(out_dir, ".records"))
            ]:
                if name.endswith((".tar", ".json", ".bin")) and name != "build.json":
                    store.delete(store.join(out_dir, name))
        for pattern in ("*.tar", "*.tar.tmp-*", ".records/*.json", "manifest.json", OFFSETS, SHARD_TABLE):
            for p in glob.glob(os.path.join(out_dir, pattern)):
                os.remove(p)
    _write_text(path, json.dumps(build, indent=1, sort_keys=True))


def ensure_writable(out_dir: str) -> None:
    if store.scheme(out_dir):  # one PUT and DELETE: a missing bucket or no access fails here, in one line
        probe = store.join(out_dir, f".write-probe-{os.getpid()}")
        store.put_bytes(b"ok", probe)
        store.delete(probe)
        return
    try:
        os.makedirs(os.path.join(out_dir, ".records"), exist_ok=True)
        probe = os.path.join(out_dir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"cannot write to output directory {out_dir}: {e.strerror or e}") from None


def shard_names(split: str) -> str:
    """The split's shard name pattern (``str.format`` with the shard's index)."""
    return split + "-{:06d}.tar"


def shard_name(split: str, index: int) -> str:
    return shard_names(split).format(index)


def write_manifest(out_dir: str, split: str, tally: Tally, classes, names, options, source, extra_skipped) -> dict:
    records = tally.ordered()
    counts = tally.counts.tolist()
    manifest = {
        "format": FORMAT,
        "split": split,
        "source": source,
        "num_samples": sum(r["samples"] for r in records),
        "num_shards": len(records),
        "total_bytes": sum(r["bytes"] for r in records),
        "num_classes": len(classes),
        "classes": [{"index": i, "id": c, "name": names.get(c, c), "count": counts[i]} for i, c in enumerate(classes)],
        "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256") if k in r} for r in records],
        "options": options.fingerprint(),
        "converted": [c for r in records for c in r["converted"]],
        "skipped": extra_skipped + [s for r in records for s in r["skipped"]],
    }
    if len(records) > TABLE_ABOVE and all(r["name"] == shard_name(split, i) for i, r in enumerate(records)):
        shards = manifest.pop("shards")
        manifest["shard_table"] = write_table(
            store.join(out_dir, SHARD_TABLE),
            split,
            [s["samples"] for s in shards],
            [s["bytes"] for s in shards],
            [bytes.fromhex(s["sha256"]) for s in shards],
        )
    offsets = [tally.offsets.get(k) for k in sorted(tally.records)]
    if all(o is not None for o in offsets):
        manifest["offsets"] = write_offsets(store.join(out_dir, OFFSETS), offsets)
    else:  # records of an older build without offsets everywhere: inline, where there are some
        for entry, o in zip(manifest["shards"], offsets):
            if o is not None:
                entry["offsets"] = o.tolist()
    _write_text(store.join(out_dir, "manifest.json"), json.dumps(manifest, indent=1))  # last: the split is complete
    return manifest


def write_table(path: str, split: str, samples, nbytes, digests) -> dict:
    """The split's shard table (:data:`SHARD_TABLE`) from its columns (per shard: samples,
    bytes, 32-byte sha256 digest); its manifest entry."""
    import numpy as np

    columns = (np.asarray(samples, "<i8"), np.asarray(nbytes, "<i8"), np.asarray(digests, "S32"))
    entry = _write_binary(path, b"".join(c.tobytes() for c in columns))
    return {**entry, "file": SHARD_TABLE, "count": len(columns[0]), "names": shard_names(split)}


def shard_entries(manifest: dict, directory: str) -> list[dict]:
    """The manifest's shards as JSON entries (name, samples, bytes, sha256), from its table
    if it has one (for ``--verify`` and ``--merge``: they visit every shard anyway)."""

    entry = manifest.get("shard_table")
    if entry is None:
        return manifest["shards"]
    path = store.join(directory, entry["file"])
    data = store.read_bytes(path) if store.scheme(path) else open(path, "rb").read()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise InputError(f"{path}: size or sha256 does not match the manifest")
    from pipeline.manifest import table_columns

    samples, sizes, digests = table_columns(data, entry["count"])
    return [
        {"name": entry["names"].format(i), "samples": int(a), "bytes": int(b), "sha256": d.hex()}
        for i, (a, b, d) in enumerate(zip(samples, sizes, digests))
    ]


def write_offsets(path: str, per_shard: list[list[int]]) -> dict:
    """The split's offsets file (:data:`OFFSETS`); its manifest entry (name, size, sha256)."""
    import numpy as np

    data = np.concatenate([np.asarray(o, dtype="<i8") for o in per_shard]).tobytes()
    return {"file": OFFSETS, **_write_binary(path, data)}


def _write_binary(path: str, data: bytes) -> dict:
    if store.scheme(path):
        store.put_bytes(data, path)
    else:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --------------------------------------------------------------------------- running


class Tally:
    """A split's shard records as the manifest needs them, without their per-sample
    lists. A record's offsets are a list of its samples + 1 ints and its labels a dict of
    up to one key per sample; fall11's 14,200 records held whole would be ~2 GB. Here
    the offsets are int64 arrays and the labels are summed into one count per class."""

    def __init__(self, num_classes: int):
        import numpy as np

        self.counts = np.zeros(num_classes, np.int64)
        self.records: dict[int, dict] = {}  # shard index -> the record less offsets and labels
        self.offsets: dict[int, object] = {}  # shard index -> int64 array (absent: an older record)

    def __contains__(self, index: int) -> bool:
        return index in self.records

    def add(self, index: int, record: dict) -> None:
        import numpy as np

        if index in self.records:
            return
        labels = record.pop("labels")
        np.add.at(self.counts, np.array([int(k) for k in labels], np.int64), np.array(list(labels.values()), np.int64))
        if "offsets" in record:
            self.offsets[index] = np.array(record.pop("offsets"), "<i8")
        self.records[index] = record

    def ordered(self) -> list[dict]:
        return [self.records[k] for k in sorted(self.records)]


def run_jobs(plan: Plan, mine: list[int], tally: Tally, workers: int, desc: str, quiet: bool) -> int:
    """Build the shards ``mine`` of ``plan`` (skipping complete ones) into ``tally``;
    return the images built. Jobs are made as workers free up, two per worker ahead."""
    import webdataset  # noqa: F401  (imports torch, ~1 s: once here, inherited by forked workers)
    from tqdm import tqdm

    todo = []
    for k in mine:
        for stale in glob.glob(glob.escape(plan.local(k)) + ".tmp-*"):
            os.remove(stale)  # left by a killed run: this task owns this shard
        record = load_complete_record(plan.target(k))
        if record is not None:
            tally.add(k, record)
        else:
            todo.append(k)
    total = sum(plan.count(k) for k in todo)
    if len(todo) < len(mine) and not quiet:
        print(f"{desc}: {len(mine) - len(todo)} shard(s) already complete and verified, {len(todo)} to build")
    bar = tqdm(total=total, desc=desc, unit="img", disable=quiet or not todo, dynamic_ncols=True, smoothing=0.1)
    counter = mp.Value("q", 0)
    if workers <= 1 or len(todo) <= 1:
        _init_worker(counter)
        try:
            for k in todo:
                tally.add(k, build_shard(plan.job(k)))
                bar.update(counter.value - bar.n)
        finally:
            _init_worker(None)
    elif todo:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(counter,)) as pool:
            waiting, pending = iter(todo), {}
            while True:
                for k in waiting:
                    pending[k] = pool.apply_async(build_shard, (plan.job(k),))
                    if len(pending) >= 2 * workers:
                        break
                if not pending:
                    break
                for k in [k for k, r in pending.items() if r.ready()]:
                    tally.add(k, pending.pop(k).get())
                bar.update(counter.value - bar.n)
                if pending and not any(r.ready() for r in pending.values()):
                    next(iter(pending.values())).wait(0.25)
    bar.update(counter.value - bar.n)
    bar.close()
    return total


def _stage_dir(url: str) -> str:
    """Where shards bound for ``url`` are built before upload (one at a time per worker;
    each is removed once uploaded). ``$TNTPIPE_STAGE`` or the system temp directory."""
    root = os.environ.get("TNTPIPE_STAGE") or os.path.join(tempfile.gettempdir(), "tntpipe-stage")
    path = os.path.join(root, hashlib.sha256(url.encode()).hexdigest()[:16])
    ensure_writable(path)
    return path


def shard_dataset(args) -> list[dict]:
    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        raise InputError(f"input directory not found: {args.src}")
    name = args.name or os.path.basename(src.rstrip(os.sep))
    out_root = store.check_url(args.out or os.path.join("shards", name))
    remote = bool(store.scheme(out_root))
    if remote and store.scheme(out_root) != "s3":
        raise InputError(f"cannot write shards to {out_root}: the output is a local directory or s3://bucket/prefix")
    options = Options(
        seed=args.seed,
        shard_size=args.shard_size,
        shard_bytes=args.shard_bytes,
        resize_max_side=args.resize_max_side,
        quality=args.quality,
        limit_per_class=args.limit_per_class,
        check=args.check,
    )
    splits = find_splits(src, args.splits.split(",") if args.splits else None, args.split_name)
    listings, ignored = {}, {}
    for split, directory in splits:
        listing = list_split(directory, src)
        if not len(listing):
            raise InputError(f"no images found in {directory}")
        listings[split], ignored[split] = listing, listing.ignored
    if args.val_fraction:
        if not 0 < args.val_fraction < 1:
            raise InputError(f"--val-fraction must be in (0, 1), not {args.val_fraction}")
        if "train" not in listings or any(s in listings for s in ("val", "validation")):
            raise InputError(
                "--val-fraction cuts a val split from train: it needs a train split and no val split "
                f"(found: {', '.join(sorted(listings))}; --splits train ignores a val folder)"
            )
        listings["train"], listings["val"] = cut_validation(listings["train"], args.val_fraction, args.seed)
        ignored["val"] = []
        splits.append(("val", dict(splits)["train"]))
    classes = class_list(splits, listings)
    names = {**synset_names(), **synset_mapping_names(src)}
    summaries = []
    for split, _ in splits:
        out_dir = store.join(out_root, split)
        ensure_writable(out_dir)
        stage = _stage_dir(out_dir) if remote else ""
        plan, rejected = plan_split(split, listings[split], classes, options, out_dir, stage)
        build = {
            "format": FORMAT,
            "options": options.fingerprint(),
            "classes": classes,
            "inputs_sha256": inputs_digest(listings[split]),
            "num_shards": len(plan),
        }
        check_build_dir(out_dir, build, args.overwrite)
        mine = [] if args.merge else list(range(args.task_index, len(plan), args.num_tasks))
        t0 = time.perf_counter()
        task = f" task {args.task_index}/{args.num_tasks}" if args.num_tasks > 1 else ""
        tally = Tally(len(classes))
        built = run_jobs(plan, mine, tally, args.workers, f"{name}/{split}{task}", args.quiet)
        elapsed = time.perf_counter() - t0
        extra = [{"path": p, "reason": r} for p, r in ignored[split]] + rejected
        if len(mine) < len(plan):  # other tasks own shards: merge once all are complete
            missing = []
            for k in range(len(plan)):
                if k not in tally:
                    record = load_complete_record(plan.target(k))
                    if record is None:
                        missing.append(k)
                    else:
                        tally.add(k, record)
            if missing and args.merge:
                raise InputError(
                    f"cannot merge {split}: {len(missing)} shard(s) missing or incomplete, e.g. "
                    f"{shard_name(split, missing[0])}; re-run the task that owns it"
                )
            if missing:
                print(
                    f"{name}/{split}: task {args.task_index} done; {len(missing)} shard(s) of other tasks pending: "
                    "the last task or `--merge` writes the manifest"
                )
                continue
        manifest = write_manifest(out_dir, split, tally, classes, names, options, src, extra)
        manifest["_elapsed"] = elapsed
        manifest["_built"] = built
        manifest["_dir"] = out_dir
        summaries.append(manifest)
    return summaries


# --------------------------------------------------------------------------- verify


def find_manifests(path: str) -> list[str]:
    if store.scheme(path):
        if path.endswith(".json"):
            return [path]
        direct = store.join(path, "manifest.json")
        if store.stat_size(direct) is not None:
            return [direct]
        return [
            m for m in (store.join(path, s, "manifest.json") for s in DEFAULT_SPLITS) if store.stat_size(m) is not None
        ]
    if os.path.isfile(path):
        return [path]
    direct = os.path.join(path, "manifest.json")
    if os.path.isfile(direct):
        return [direct]
    return sorted(glob.glob(os.path.join(path, "*", "manifest.json")))


def _check_shard(p: str, shard: dict, offsets=None) -> tuple[str | None, int]:
    """(the problem with the local shard file ``p``, or None; its sample count).
    ``offsets``: the sample offsets the manifest gives for it (checked against the tar)."""
    if not os.path.isfile(p):
        return "missing", 0
    if os.path.getsize(p) != shard["bytes"]:
        return f"size {os.path.getsize(p)} != {shard['bytes']} in manifest", 0
    if sha256_file(p) != shard["sha256"]:
        return "sha256 does not match the manifest", 0
    keys = Counter()
    try:
        with tarfile.open(p) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                keys[key] += 1
    except (tarfile.TarError, OSError) as e:
        return f"unreadable tar: {e}", 0
    if len(keys) != shard["samples"] or any(n != 3 for n in keys.values()):
        return f"{len(keys)} samples (expected {shard['samples']}, each jpg+cls+json)", len(keys)
    if offsets is not None and list(offsets) != sample_offsets(p):
        return "sample offsets differ from the manifest's (its offsets file or inline list)", len(keys)
    return None, len(keys)


def _offsets_of(manifest: dict, directory: str, shards: list[dict]) -> tuple[list, str | None]:
    """Each shard's offsets as the manifest gives them (inline, or in its offsets file:
    read and checked against the manifest's size and sha256), or None; and the problem
    with the offsets file, if any."""
    import numpy as np

    entry = manifest.get("offsets")
    if entry is None:
        return [s.get("offsets") for s in shards], None
    path = store.join(directory, entry["file"])
    try:
        data = store.read_bytes(path) if store.scheme(path) else open(path, "rb").read()
    except (OSError, store.StoreError) as exc:
        return [None] * len(shards), f"{path}: unreadable ({type(exc).__name__}: {exc})"
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return [None] * len(shards), f"{path}: size or sha256 does not match the manifest"
    flat, out, start = np.frombuffer(data, dtype="<i8"), [], 0
    for s in shards:
        out.append(flat[start : start + s["samples"] + 1].tolist())
        start += s["samples"] + 1
    return out, None


def verify(path: str, quiet: bool = False) -> list[str]:
    """Re-check sizes, checksums, readability and sample offsets of every shard (and the
    split's offsets file); return the problems.
    Shards in an object store are downloaded one at a time to a temporary file."""
    from tqdm import tqdm

    manifests = find_manifests(path)
    if not manifests:
        raise InputError(f"no manifest.json found in {path} or its split folders")
    problems = []
    for mpath in manifests:
        manifest = json.loads(_read_text(mpath))
        directory = mpath.rpartition("/")[0] if store.scheme(mpath) else os.path.dirname(mpath)
        total = 0
        try:
            shards = shard_entries(manifest, directory)
        except (InputError, OSError, store.StoreError) as exc:
            problems.append(f"{directory}: the shard table: {exc}")
            continue
        offsets, problem = _offsets_of(manifest, directory, shards)
        if problem:
            problems.append(problem)
        for shard, own in tqdm(
            zip(shards, offsets), desc=f"verify {manifest['split']}", unit="shard", total=len(shards), disable=quiet
        ):
            p = store.join(directory, shard["name"])
            if store.scheme(p):
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, shard["name"])
                    size = store.stat_size(p)
                    if size is not None:
                        store.download(p, local, size)
                    problem, count = _check_shard(local, shard, own)
            else:
                problem, count = _check_shard(p, shard, own)
            if problem:
                problems.append(f"{p}: {problem}")
            total += count
        if total != manifest["num_samples"] and not problems:
            problems.append(f"{mpath}: {total} samples != num_samples {manifest['num_samples']}")
    return problems


# --------------------------------------------------------------------------- CLI


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for options whose help already names their default, nor
    for flags and unset options."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python pipeline/shard.py",
        description="Convert an ImageNet-style image tree into WebDataset tar shards plus a manifest.json per split.",
        formatter_class=_Help,
        epilog="Exit status: 0 done; 2 bad input or options (one 'error:' line); 1 --verify found problems "
        "(listed one per line); 130 interrupted (completed shards are kept).",
    )
    p.add_argument(
        "src", nargs="?", help="data root: holds train/ val/ ... split folders, or is itself one class-per-folder split"
    )
    p.add_argument(
        "--out",
        help="output directory, or s3://bucket/prefix (shards built under $TNTPIPE_STAGE or the temp "
        "directory, uploaded, then removed locally; needs the [s3] extra) (default: shards/<name>)",
    )
    p.add_argument("--name", help="data set name used for the default output directory (default: basename of src)")
    p.add_argument(
        "--splits",
        help="comma-separated split folders to convert (default: those of train,val,validation,test present)",
    )
    p.add_argument("--split-name", default="train", help="split name when src itself is a class-per-folder tree")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="cut a val split from train when the tree has none (ImageNet-21k's fall11 layout): this fraction "
        "of each class's images, at least one of a class with two or more, drawn with --seed (0: no cut)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="maximum samples per shard")
    p.add_argument("--shard-bytes", type=_size, default=1 << 30, help="maximum source bytes per shard (e.g. 500M, 1G)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (one shard each at a time)"
    )
    p.add_argument(
        "--resize-max-side",
        type=int,
        default=0,
        help="re-encode images whose longer side exceeds this many pixels (0: keep sizes)",
    )
    p.add_argument("--quality", type=int, default=95, help="JPEG quality for every re-encoded image")
    p.add_argument(
        "--limit-per-class",
        type=int,
        default=0,
        help="keep only the first N images of each class (sorted by path; 0: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-to-shard shuffle")
    p.add_argument(
        "--check",
        choices=("draft", "full", "header"),
        default="draft",
        help="how JPEGs kept as-is are validated: draft=decode at 1/8 scale (reads all data), full=full "
        "decode, header=header + end marker only",
    )
    p.add_argument(
        "--task-index",
        type=int,
        default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)),
        help="this task's index when several tasks share the work (default: $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument(
        "--num-tasks",
        type=int,
        default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
        help="number of tasks sharing the work (default: $SLURM_ARRAY_TASK_COUNT)",
    )
    p.add_argument(
        "--merge", action="store_true", help="only merge the per-shard records of all tasks into manifest.json"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace shards built from other inputs or options instead of refusing"
    )
    p.add_argument(
        "--verify",
        nargs="?",
        const=True,
        metavar="DIR",
        help="re-check sizes, sha256 and tar readability of shards in DIR or s3://... (default: the output of src)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def print_summary(summaries: list[dict]) -> None:
    for m in summaries:
        rate = m["_built"] / m["_elapsed"] if m["_elapsed"] > 0 else 0.0
        reasons = Counter(s["reason"].split(":")[0] for s in m["skipped"])
        print(f"\n== {m['_dir']}  ({m['split']})")
        print(f"   samples   {m['num_samples']:>10,}  in {m['num_shards']} shard(s), {m['total_bytes'] / 1e6:,.1f} MB")
        print(f"   classes   {m['num_classes']:>10,}")
        print(f"   converted {len(m['converted']):>10,}  (re-encoded to RGB JPEG)")
        print(
            f"   skipped   {len(m['skipped']):>10,}"
            + (f"  ({'; '.join(f'{n} {r}' for r, n in reasons.most_common(4))})" if reasons else "")
        )
        print(
            f"   processed {m['_built']:>10,}  images in {m['_elapsed']:.1f}s ({rate:,.0f} img/s)"
            + ("; the rest were already complete" if m["_built"] < m["num_samples"] else "")
        )
        print(f"   manifest  {store.join(m['_dir'], 'manifest.json')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verify is not None:
            target = args.verify if isinstance(args.verify, str) else None
            if target is None:
                if not args.src:
                    raise InputError("--verify needs a directory (or the src whose shards to check)")
                target = args.out or os.path.join("shards", args.name or os.path.basename(os.path.abspath(args.src)))
            problems = verify(target, args.quiet)
            for line in problems:
                print(line, file=sys.stderr)
            print(f"verify {target}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        if not args.src:
            raise InputError("missing input directory (see --help)")
        if not 0 <= args.task_index < args.num_tasks:
            raise InputError(f"--task-index {args.task_index} is outside 0..{args.num_tasks - 1}")
        summaries = shard_dataset(args)
        print_summary(summaries)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: completed shards are kept; re-run the same command to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
