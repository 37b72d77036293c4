"""A split's shard manifest, and its shards read as one sequence of samples.

    manifest = load_manifest("s3://bucket/imagenet/train", store=Store(cache=ShardCache("/nvme/cache")))
    seq = _Sequence(manifest, order)                 # the shards in this epoch's order
    for position, sample in seq.fetch(positions, report):   # just these samples
        ...

A position counts samples from the start of the (cyclic) sequence of shards. Every
sample's byte offset in its tar is recorded by ``shard.py``: in the split's offsets file
beside the manifest (``offsets.bin``; a shard's offsets are read with one ranged read
when a process first opens that shard, so the manifest grows with the shards, not the
samples), or inline in manifests written before 2026-12-07. A run of wanted samples is
one byte range: a seek on local disk, a ranged GET on a store
(:mod:`pipeline.store`: retries that resume from the byte reached, the shard cache).
What is not wanted is not read, apart from gaps of at most :attr:`_Sequence.gap_bytes`.
A shard that still fails after the store's retries ends there for this read: the
failure is logged and counted (:class:`_Reporter`) and its remaining samples are left
out; the streams in :mod:`pipeline.data` make up the count from later positions.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from typing import Iterator, Sequence

import numpy as np

from pipeline import store as storage
from pipeline.atomic import replacing
from pipeline.errors import DataError, InputError, summary
from pipeline.store import Store

log = logging.getLogger("tntpipe.data")


# ---------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class Manifest:
    split: str
    num_samples: int
    num_classes: int
    # per shard: tuples, or (a split listed in a shard table) arrays and lazy sequences
    urls: Sequence[str]
    sizes: Sequence[int]  # samples per shard
    classes: tuple[str, ...]  # class ids by index
    path: str
    shard_bytes: Sequence[int | None]  # per shard (None where the manifest does not say)
    sha256: Sequence[str | None]
    # per shard (``offsets[i]``): each sample's byte offset in the tar, then the end of the
    # last one (int64 array), or None (older builds): a slot then reads the shard from its
    # first byte and skips undecoded. A tuple (inline in the manifest) or an OffsetsFile.
    offsets: tuple | OffsetsFile
    store: Store = Store()  # retries and cache for remote shards
    digest: str = ""  # sha256 of the manifest file (lineage of registered models)

    def summary(self) -> dict:
        return {"split": self.split, "samples": self.num_samples, "shards": len(self.urls), "classes": self.num_classes}


def load_manifest(path: str, url_base: str | None = None, store: Store = Store()) -> Manifest:
    """Read ``<split>/manifest.json`` (or a manifest file) from a local path, ``s3://``
    or ``http(s)://`` (:mod:`pipeline.store`; other schemes are refused).

    Shard URLs are the manifest's names next to the manifest, or ``url_base`` joined
    with each name; a ``url_base`` containing ``{shard}`` is formatted instead, e.g.
    ``"pipe:aws s3 cp s3://bucket/imagenet/train/{shard} -"`` (anything
    ``webdataset.gopen`` opens; such pipes are read from each shard's first byte).
    """
    remote = bool(storage.scheme(path))
    if remote:
        file = path if path.endswith(".json") else storage.join(path, "manifest.json")
        try:
            text = _node_copy(file, store)
        except storage.NotFound:
            raise InputError(
                f"no shard manifest at {file} (build shards first: python pipeline/shard.py SRC --out ...)"
            ) from None
    else:
        path = storage.local_path(path)
        file = os.path.join(path, "manifest.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise InputError(f"no shard manifest at {file} (build shards first: python pipeline/shard.py SRC)")
        try:
            with open(file, "rb") as f:
                text = f.read()
        except OSError as exc:
            raise InputError(f"unreadable shard manifest {file}: {exc}") from exc
    try:
        m = json.loads(text)
        table = m.get("shard_table")
        shards = m["shards"] if table is None else None
    except (ValueError, KeyError) as exc:
        raise InputError(f"unreadable shard manifest {file}: {exc}") from exc
    beside = file.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(file))  # not url_base's
    base = url_base or beside
    storage.check_url(base)
    if table is None:
        every = np.array([s.get("samples", 0) for s in shards], dtype=np.int64)
    else:
        every, nbytes, digests = _shard_table(_url(beside, table["file"]), table, store)
    kept = np.flatnonzero(every > 0)
    if not len(kept):
        raise InputError(f"shard manifest {file} lists no samples")
    if table is None:
        shards = [shards[i] for i in kept]
        urls, sizes = tuple(_url(base, s["name"]) for s in shards), tuple(int(s["samples"]) for s in shards)
        shard_bytes, sha256 = tuple(s.get("bytes") for s in shards), tuple(s.get("sha256") for s in shards)
    else:  # arrays (mapped), and names and digests made one at a time: nothing per shard in Python objects
        whole = len(kept) == len(every)
        urls, sizes = _Names(base, table["names"], kept), every if whole else every[kept]
        shard_bytes, sha256 = (nbytes, _Hex(digests)) if whole else (nbytes[kept], _Hex(digests[kept]))
    if m.get("offsets"):  # the offsets file: where each kept shard's run starts in it
        starts = (np.cumsum(every + 1) - (every + 1))[kept]
        offsets = OffsetsFile(_url(beside, m["offsets"]["file"]), starts, sizes, store)
    elif table is not None:  # (a table without an offsets file: shards read from their first byte)
        offsets = (None,) * len(kept)
    else:
        offsets = tuple(
            np.asarray(s["offsets"], dtype=np.int64) if len(s.get("offsets") or ()) == s["samples"] + 1 else None
            for s in shards
        )
    classes = tuple(c["id"] for c in sorted(m.get("classes", []), key=lambda c: c["index"]))
    return Manifest(
        split=m.get("split", "?"),
        num_samples=int(np.sum(sizes)),
        num_classes=int(m.get("num_classes", len(classes))),
        urls=urls,
        sizes=sizes,
        classes=classes,
        path=file,
        shard_bytes=shard_bytes,
        sha256=sha256,
        offsets=offsets,
        store=store,
        digest=hashlib.sha256(text).hexdigest(),
    )


def _node_copy(url: str, store: Store) -> bytes:
    """A remote manifest read once per node (:func:`_node_file`)."""
    got = _node_file(url, store)
    if isinstance(got, bytes):
        return got
    with open(got, "rb") as f:
        return f.read()


def _node_file(url: str, store: Store, sha256: str | None = None) -> str | bytes:
    """A remote file of the split (the manifest, its shard table) fetched once per node:
    each process asks the store for its size and ETag (a HEAD), and the first one to need
    that version fetches it into the node's copy, under a lock, in the shard cache's
    directory (else the node's temporary directory), where the node's other ranks and
    workers read it. At 1,024 ranks on 128 nodes: 128 GETs of the manifest instead of
    1,024 (and 8,192 with the workers' own loads). Returns the copy's path, or the bytes
    read where no copy could be made (a server that refuses HEAD, a file replaced between
    the HEAD and the GET). ``sha256``: checked once, when the copy is made."""
    import tempfile

    try:
        found = storage.stat(url, store.policy)
    except storage.NotFound:
        raise
    except storage.StoreError:  # a server that refuses HEAD (some HTTP hosts, signed URLs): each its own GET
        return storage.read_bytes(url, store.policy)
    if found is None:
        raise storage.NotFound(url)
    size, etag = found
    root = store.cache.root if store.cache is not None else os.path.join(tempfile.gettempdir(), "tntpipe")
    folder = os.path.join(root, "manifests")
    os.makedirs(folder, exist_ok=True)
    name = hashlib.sha256(f"{url}\n{size}\n{etag}".encode()).hexdigest()[:32] + os.path.splitext(url)[1]
    path = os.path.join(folder, name)
    with storage._locked(path + ".lock"):
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            data = storage.read_bytes(url, store.policy)
            if len(data) != size:  # replaced between the HEAD and the GET: this process's read stands
                return data
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                raise InputError(f"{url}: its sha256 differs from the manifest's (damaged or from another build)")
            with replacing(path, durable=False) as tmp, open(tmp, "wb") as f:
                f.write(data)
    return path


class _Names(Sequence):
    """Shard URLs of a split listed in a shard table: the builder's name pattern, by index."""

    def __init__(self, base: str, pattern: str, index: np.ndarray):
        self.base, self.pattern, self.index = base, pattern, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return _url(self.base, self.pattern.format(int(self.index[i])))


class _Hex(Sequence):
    """The shard table's sha256 digests (32 bytes each) as hex strings, one at a time."""

    def __init__(self, digests: np.ndarray):
        self.digests = digests

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, i: int) -> str:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return bytes(self.digests[i]).hex()


def _shard_table(url: str, entry: dict, store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(samples, bytes, sha256 digests) per shard from the split's shard table
    (``pipeline/shard.py``): mapped, not read, so a process holds only the pages it
    touches (the sample counts; a shard's size and digest when it opens that shard).
    A remote table is fetched once per node and checked against its sha256 then."""
    n = entry["count"]
    got = _node_file(url, store, entry["sha256"]) if storage.scheme(url) else storage.local_path(url)
    size = len(got) if isinstance(got, bytes) else os.path.getsize(got) if os.path.isfile(got) else None
    if size != entry["bytes"] or size != 48 * n:
        raise InputError(f"{url}: the shard table is missing or truncated ({size} bytes, not {entry['bytes']})")
    return table_columns(got if isinstance(got, bytes) else np.memmap(got, np.uint8, "r"), n)


def table_columns(data, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shard table's columns (samples, bytes, sha256 digests) of ``n`` shards, as
    views of ``data`` (bytes, or a mapped file): ``pipeline/shard.py``'s layout."""
    buf = np.frombuffer(data, np.uint8)
    return buf[: 8 * n].view("<i8"), buf[8 * n : 16 * n].view("<i8"), buf[16 * n : 48 * n].view("S32")


def _url(base: str, name: str) -> str:
    """A file of the split: ``base`` joined with ``name``, or ``base`` formatted with it."""
    return base.format(shard=name) if "{shard}" in base else base.rstrip("/") + "/" + name


def _checked_offsets(data: bytes, n: int, where: str, shard: int) -> np.ndarray:
    """``n`` int64 offsets of ``shard`` from ``data``; DataError if short or damaged."""
    if len(data) != 8 * n:
        raise DataError(f"{where}: {len(data)} bytes of offsets for shard {shard}, not {8 * n} (truncated)")
    offsets = np.frombuffer(data, dtype="<i8").astype(np.int64)
    # tar members start on 512-byte blocks, in order: anything else is damage, and
    # reading from it would hand the tar reader the middle of a file
    if offsets[0] < 0 or np.any(offsets % 512) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{where}: the offsets of shard {shard} are damaged (not increasing tar blocks)")
    return offsets


class OffsetsFile:
    """The shards' sample offsets in the split's offsets file (``pipeline/shard.py``:
    int64 little-endian, shard after shard): ``offsets[i]`` reads shard ``i``'s with one
    ranged read the first time, then keeps the last :attr:`keep` shards' (a slot reads
    its shards in order). Pickled into DataLoader workers without what it holds."""

    keep = 64

    def __init__(self, url: str, starts: Sequence[int], counts: Sequence[int], store: Store):
        self.url, self.starts, self.counts, self.store = url, starts, counts, store
        self._held: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, shard: int) -> np.ndarray:
        if shard not in self._held:
            a, n = int(self.starts[shard]), int(self.counts[shard]) + 1
            with self.store.open(self.url, 8 * a, 8 * (a + n)) as f:
                offsets = _checked_offsets(f.read(), n, self.url, shard)
            if len(self._held) >= self.keep:
                self._held.pop(next(iter(self._held)))
            self._held[shard] = offsets
        return self._held[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_held": {}}


# ---------------------------------------------------------------- reading shards


class _Reporter:
    """Counts and rate-limited logs of bad data, for one slot."""

    def __init__(self, where: str):
        self.where = where
        self.bad_samples = 0
        self.bad_shards = 0
        self._logged = 0

    def _log(self, msg: str) -> None:
        self._logged += 1
        if self._logged <= 10 or self._logged % 100 == 0:
            more = " (logging every 100th from now on)" if self._logged == 10 else ""
            log.warning("%s: %s%s", self.where, msg, more)

    def sample(self, url: str, key: str, exc: BaseException) -> None:
        self.bad_samples += 1
        self._log(f"skipped sample {key} of {url}: {type(exc).__name__}: {exc}")

    def shard(self, url: str, exc: BaseException) -> None:
        self.bad_shards += 1
        self._log(f"skipped the rest of shard {url}: {summary(exc, 200)}")

    def take(self) -> tuple[int, int]:
        """Counts since the last call (they travel with each batch)."""
        out = (self.bad_samples, self.bad_shards)
        self.bad_samples = self.bad_shards = 0
        return out


class _TarError(DataError):
    """A tar stream that is not what ``pipeline/shard.py`` writes, or is damaged."""


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes, what: str) -> int:
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _TarError(f"damaged tar header ({what} {field!r})") from None


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar byte stream, in order, to its end or
    the end-of-archive blocks.

    Our own reader, not ``tarfile`` through webdataset's ``tar_file_iterator``: those
    spend ~90 us of Python per member, ~5x what the rest of raw delivery costs, and the
    loader read 2.0x fewer samples per second than LitData through them
    (``bench/peer_bench.py``, row 1). This one reads a 512-byte header, checks its
    checksum, and reads the member: ustar headers (what ``shard.py`` writes), plus pax
    and GNU long names so that a shard with long keys still reads."""
    long_name = None
    while True:
        header = stream.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) < 512:
            raise _TarError(f"truncated tar header ({len(header)} of 512 bytes)")
        chksum = header[148:156]
        if _octal(chksum, "checksum") != sum(header) - sum(chksum) + 256:  # the field counts as 8 spaces
            raise _TarError("damaged tar header (checksum)")
        size, kind = _octal(header[124:136], "size"), header[156:157]
        padded = size + (-size % 512)
        data = stream.read(padded)  # the member and its padding: one read
        if len(data) < padded:
            raise _TarError(f"truncated tar member ({len(data)} of {padded} bytes)")
        if padded != size:
            data = data[:size]
        if kind in (b"0", b"\0", b"7"):
            if long_name is None:
                name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
                long_name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            yield long_name, data
            long_name = None
        elif kind == b"L":  # GNU long name: the next member's
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax header: its path, if any, is the next member's name
            for record in data.decode("utf-8", "surrogateescape").split("\n"):
                key, _, value = record.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
        # directories, links, global pax headers: nothing to read


def _tar_samples(stream, url: str, report: _Reporter, failed: list) -> Iterator[dict]:
    """Samples of a tar byte stream: consecutive members sharing a key (the name up to
    the first dot of its last part), as webdataset groups them (``__key__``, ``__url__``,
    one entry per lower-cased extension). An error ends the stream and is counted as a
    bad shard: by then :mod:`pipeline.store` has retried what can be."""
    sample: dict | None = None
    try:
        for name, data in _tar_members(stream):
            dot = name.find(".", name.rfind("/") + 1)
            if dot < 0:
                continue  # no extension: not part of a sample (webdataset skips it too)
            key, ext = name[:dot], name[dot + 1 :].lower()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if ext in sample:
                raise _TarError(f"{name}: a second {ext} for sample {key}")
            sample[ext] = data
        if sample is not None:
            yield sample
    except Exception as exc:  # noqa: BLE001 - anything a stream can raise ends the shard, not the run
        failed.append(exc)
    finally:
        stream.close()
    if failed:
        report.shard(url, failed[0])


def _runs(idxs: Sequence[int], offsets: np.ndarray, gap_bytes: int) -> list[tuple[int, int]]:
    """Sorted sample indices as ``[a, b)`` runs, one ranged read each; a gap of at most
    ``gap_bytes`` is read through rather than paid for with another request."""
    runs: list[list[int]] = []
    for i in idxs:
        if runs and (i == runs[-1][1] or offsets[i] - offsets[runs[-1][1]] <= gap_bytes):
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


_POOL = None


def _forget_pool() -> None:
    global _POOL
    _POOL = None  # a forked child has the object but not its thread


os.register_at_fork(after_in_child=_forget_pool)


def _ahead_pool():
    """One thread per process that makes the next shard's requests (:meth:`_Sequence.fetch`);
    made on first use, so in each DataLoader worker, never pickled."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(1, thread_name_prefix="shard-ahead")
    return _POOL


class _Sequence:
    """The epoch's shards in some order, concatenated, repeated without end.

    A position is read from the byte where its sample starts (the manifest's offsets:
    a ranged GET, or a seek), so a slot reads its own samples and no others."""

    # A gap of unwanted samples up to this size is read through rather than paid for
    # with another request: about one ImageNet JPEG, so ImageNet reads are exact, and
    # runs of tiny samples (digits, thumbnails) do not become a request each.
    gap_bytes = 32 << 10

    def __init__(self, manifest: Manifest, order: list[int]):
        self.manifest = manifest
        self.order = order
        sizes = np.asarray(manifest.sizes, dtype=np.int64)[np.asarray(order, dtype=np.int64)]
        self.starts = np.concatenate(([0], np.cumsum(sizes)))

    def _offsets(self, shard: int) -> np.ndarray | None:
        """The shard's sample offsets, or None: an older build, or a ``pipe:`` URL (it
        can only be read from its first byte). With a shard cache, an offsets file's run
        is kept beside the cached shard (``<shard>.offsets``, evicted with it): a warm
        node reads a shard without a request."""
        m = self.manifest
        if storage.scheme(m.urls[shard]) == "pipe":
            return None
        if not isinstance(m.offsets, OffsetsFile):
            return m.offsets[shard]
        beside = m.store.cached_path(m.urls[shard], m.shard_bytes[shard], m.sha256[shard])
        if beside is not None:
            with contextlib.suppress(OSError, DataError):
                with open(beside + ".offsets", "rb") as f:
                    return _checked_offsets(f.read(), int(m.sizes[shard]) + 1, beside + ".offsets", shard)
        offsets = m.offsets[shard]
        if beside is not None:
            with contextlib.suppress(OSError):  # (a cache that cannot take it: read again next time)
                with replacing(beside + ".offsets", durable=False) as tmp, open(tmp, "wb") as f:
                    f.write(offsets.astype("<i8").tobytes())
        return offsets

    def _open(self, shard: int, a: int, b: int, offsets: np.ndarray | None):
        """A byte stream from sample ``a`` of ``shard`` to sample ``b`` (or its end), and
        the index of its first sample."""
        m = self.manifest
        url, size, sha = m.urls[shard], m.shard_bytes[shard], m.sha256[shard]
        if storage.scheme(url) == "pipe":
            from webdataset.gopen import gopen  # (the package's attribute `gopen` is this function, not the module)

            return gopen(url), 0
        if offsets is None:
            return m.store.open(url, 0, size, size, sha), 0
        return m.store.open(url, int(offsets[a]), int(offsets[b]), size, sha), a

    def _ready(self, shard: int, idxs: Sequence[int]) -> tuple:
        """(offsets, runs, the first run's (stream, first index)) of ``shard``'s sorted
        ``idxs``: its requests, made before a byte of it is read (ahead, for a store)."""
        offsets = self._offsets(shard)  # an offsets file: one ranged read, the first time
        runs = _runs(idxs, offsets, self.gap_bytes) if offsets is not None else [(idxs[0], idxs[-1] + 1)]
        return offsets, runs, self._open(shard, *runs[0], offsets)

    def _samples(self, shard: int, idxs: Sequence[int], report: _Reporter, ahead=None) -> Iterator[tuple[int, dict]]:
        """(index in the shard, sample) for the sorted ``idxs`` of ``shard``; a shard that
        fails (after the store's retries) yields nothing more, counted and logged.
        ``ahead``: a future of :meth:`_ready` for it, already under way."""
        m = self.manifest
        try:
            offsets, runs, opened = ahead.result() if ahead is not None else self._ready(shard, idxs)
        except Exception as exc:  # noqa: BLE001 - unreadable offsets or an unopenable shard: a bad shard
            report.shard(m.urls[shard], exc)
            return
        wanted = idxs if isinstance(idxs, range) else set(idxs)
        for n, (a, b) in enumerate(runs):
            failed: list = []
            if n:
                try:
                    opened = self._open(shard, a, b, offsets)
                except Exception as exc:  # noqa: BLE001 - an unopenable shard is a bad shard
                    report.shard(m.urls[shard], exc)
                    return
            stream, first = opened
            for idx, sample in enumerate(_tar_samples(stream, m.urls[shard], report, failed), first):
                if idx >= b:
                    break
                if idx in wanted:
                    yield idx, sample
            if failed:
                return

    def _shard_at(self, position: int) -> tuple[int, int]:
        """(k-th shard of the order, the position of its first sample) holding ``position``."""
        n = int(self.starts[-1])
        cycle, offset = divmod(position, n)
        k = int(np.searchsorted(self.starts, offset, side="right")) - 1
        return k, cycle * n + int(self.starts[k])

    def _prefetch(self, shard: int) -> None:
        """With a shard cache: start fetching ``shard`` while the current one is decoded."""
        m = self.manifest
        m.store.prefetch(m.urls[shard], m.shard_bytes[shard], m.sha256[shard])

    def fetch(self, positions: Sequence[int], report: _Reporter) -> Iterator[tuple[int, dict]]:
        """(position, sample) for the sorted ``positions``, in order; unreadable ones are
        left out (counted by ``report``)."""
        groups, i = [], 0  # (shard, first position of the shard, its sorted indices in the shard)
        while i < len(positions):
            k, base = self._shard_at(positions[i])
            j = bisect.bisect_left(positions, base + self.manifest.sizes[self.order[k]], i)
            idxs = positions[i:j]
            idxs = range(idxs.start - base, idxs.stop - base) if isinstance(idxs, range) else [p - base for p in idxs]
            groups.append((self.order[k], base, idxs))
            i = j
        # From a store, the next shard's requests (its offsets, its GET up to the first
        # byte) are made while this one is read: two round trips a shard off the critical
        # path (measured: bench/peer_bench.py, S3 rows). Local files gain nothing from it.
        ahead = None
        pool = _ahead_pool() if groups and storage.scheme(self.manifest.urls[groups[0][0]]) else None
        try:
            for g, (shard, base, idxs) in enumerate(groups):
                now, ahead = ahead, None
                if g + 1 < len(groups):
                    self._prefetch(groups[g + 1][0])
                    if pool is not None:
                        ahead = pool.submit(self._ready, groups[g + 1][0], groups[g + 1][2])
                for idx, sample in self._samples(shard, idxs, report, now):
                    yield base + idx, sample
        finally:  # closed early: the stream opened ahead is not read
            if ahead is not None and not ahead.cancel() and ahead.exception() is None:
                ahead.result()[2][0].close()

    def read(self, start: int, report: _Reporter) -> Iterator[tuple[int, dict]]:
        """(position, sample) from ``start`` on, without end; positions count from the
        epoch start. Raises :class:`DataError` when no shard of the split can be read."""
        empty_run = 0
        while True:
            k, base = self._shard_at(start)
            shard = self.order[k]
            self._prefetch(self.order[(k + 1) % len(self.order)])
            got = False
            for idx, sample in self._samples(shard, range(start - base, self.manifest.sizes[shard]), report):
                got = True
                yield base + idx, sample
            empty_run = 0 if got else empty_run + 1
            if empty_run >= len(self.order):
                raise DataError(
                    f"{report.where}: none of the {len(self.order)} shards of {self.manifest.path} could be read"
                )
            start = base + self.manifest.sizes[shard]
