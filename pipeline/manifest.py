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
import dataclasses
import hashlib
import json
import logging
import os
from typing import Iterator, Sequence

import numpy as np

from pipeline import store as storage
from pipeline.errors import DataError, InputError, summary
from pipeline.store import Store

log = logging.getLogger("tntpipe.data")


# ---------------------------------------------------------------- manifest


@dataclasses.dataclass(frozen=True)
class Manifest:
    split: str
    num_samples: int
    num_classes: int
    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per shard
    classes: tuple[str, ...]  # class ids by index
    path: str
    shard_bytes: tuple[int | None, ...]  # per shard (None where the manifest does not say)
    sha256: tuple[str | None, ...]
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
        shards = m["shards"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"unreadable shard manifest {file}: {exc}") from exc
    shards = [s for s in shards if s.get("samples", 0) > 0]
    if not shards:
        raise InputError(f"shard manifest {file} lists no samples")
    base = url_base or (file.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(file)))
    storage.check_url(base)
    urls = [_url(base, s["name"]) for s in shards]
    classes = tuple(c["id"] for c in sorted(m.get("classes", []), key=lambda c: c["index"]))
    if m.get("offsets"):  # the offsets file: where each kept shard's run starts in it
        starts = np.cumsum([0] + [s["samples"] + 1 for s in m["shards"]])[:-1]
        kept = [int(st) for st, s in zip(starts, m["shards"]) if s.get("samples", 0) > 0]
        beside = file.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(file))  # not url_base's
        counts = tuple(s["samples"] for s in shards)
        offsets = OffsetsFile(_url(beside, m["offsets"]["file"]), tuple(kept), counts, store)
    else:
        offsets = tuple(
            np.asarray(s["offsets"], dtype=np.int64) if len(s.get("offsets") or ()) == s["samples"] + 1 else None
            for s in shards
        )
    return Manifest(
        split=m.get("split", "?"),
        num_samples=sum(s["samples"] for s in shards),
        num_classes=int(m.get("num_classes", len(classes))),
        urls=tuple(urls),
        sizes=tuple(int(s["samples"]) for s in shards),
        classes=classes,
        path=file,
        shard_bytes=tuple(s.get("bytes") for s in shards),
        sha256=tuple(s.get("sha256") for s in shards),
        offsets=offsets,
        store=store,
        digest=hashlib.sha256(text).hexdigest(),
    )


def _node_copy(url: str, store: Store) -> bytes:
    """A remote manifest read once per node: each process asks the store for its size and
    ETag (a HEAD), and the first one to need that version fetches it into the node's copy,
    under a lock, in the shard cache's directory (else the node's temporary directory),
    where the node's other ranks and workers read it. At 1,024 ranks on 128 nodes: 128
    GETs of the manifest instead of 1,024 (and 8,192 with the workers' own loads)."""
    import tempfile

    from pipeline.atomic import replacing

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
    path = os.path.join(folder, hashlib.sha256(f"{url}\n{size}\n{etag}".encode()).hexdigest()[:32] + ".json")
    with storage._locked(path + ".lock"):
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            data = storage.read_bytes(url, store.policy)
            if len(data) != size:  # replaced between the HEAD and the GET: this process's read stands
                return data
            with replacing(path, durable=False) as tmp, open(tmp, "wb") as f:
                f.write(data)
        with open(path, "rb") as f:
            return f.read()


def _url(base: str, name: str) -> str:
    """A file of the split: ``base`` joined with ``name``, or ``base`` formatted with it."""
    return base.format(shard=name) if "{shard}" in base else base.rstrip("/") + "/" + name


class OffsetsFile:
    """The shards' sample offsets in the split's offsets file (``pipeline/shard.py``:
    int64 little-endian, shard after shard): ``offsets[i]`` reads shard ``i``'s with one
    ranged read the first time, then keeps the last :attr:`keep` shards' (a slot reads
    its shards in order). Pickled into DataLoader workers without what it holds."""

    keep = 64

    def __init__(self, url: str, starts: tuple[int, ...], counts: tuple[int, ...], store: Store):
        self.url, self.starts, self.counts, self.store = url, starts, counts, store
        self._held: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, shard: int) -> np.ndarray:
        if shard not in self._held:
            a, n = self.starts[shard], self.counts[shard] + 1
            with self.store.open(self.url, 8 * a, 8 * (a + n)) as f:
                data = f.read()
            if len(data) != 8 * n:
                raise DataError(f"{self.url}: {len(data)} bytes of offsets for shard {shard}, not {8 * n} (truncated)")
            offsets = np.frombuffer(data, dtype="<i8").astype(np.int64)
            # tar members start on 512-byte blocks, in order: anything else is damage, and
            # reading from it would hand the tar reader the middle of a file
            if offsets[0] < 0 or np.any(offsets % 512) or np.any(np.diff(offsets) <= 0):
                raise DataError(f"{self.url}: the offsets of shard {shard} are damaged (not increasing tar blocks)")
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


def _tar_samples(stream, url: str, report: _Reporter, failed: list) -> Iterator[dict]:
    """Samples of a tar byte stream (webdataset's reader). An error ends the stream and
    is counted as a bad shard: by then :mod:`pipeline.store` has retried what can be."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def handler(exc: BaseException) -> bool:
        failed.append(exc)
        return False  # stop this shard; the caller moves on to the next one

    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)
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
        self.starts = np.cumsum([0] + [manifest.sizes[i] for i in order])

    def _offsets(self, shard: int) -> np.ndarray | None:
        """The shard's sample offsets, or None: an older build, or a ``pipe:`` URL (it
        can only be read from its first byte)."""
        m = self.manifest
        return None if storage.scheme(m.urls[shard]) == "pipe" else m.offsets[shard]

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

    def _samples(self, shard: int, idxs: Sequence[int], report: _Reporter) -> Iterator[tuple[int, dict]]:
        """(index in the shard, sample) for the sorted ``idxs`` of ``shard``; a shard that
        fails (after the store's retries) yields nothing more, counted and logged."""
        m = self.manifest
        try:
            offsets = self._offsets(shard)  # an offsets file: one ranged read, the first time
        except Exception as exc:  # noqa: BLE001 - offsets that cannot be read: a bad shard
            report.shard(m.urls[shard], exc)
            return
        runs = _runs(idxs, offsets, self.gap_bytes) if offsets is not None else [(idxs[0], idxs[-1] + 1)]
        wanted = idxs if isinstance(idxs, range) else set(idxs)
        for a, b in runs:
            failed: list = []
            try:
                stream, first = self._open(shard, a, b, offsets)
            except Exception as exc:  # noqa: BLE001 - an unopenable shard is a bad shard
                report.shard(m.urls[shard], exc)
                return
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
        groups, i = [], 0  # (shard, first position of the shard, [i, j) in positions)
        while i < len(positions):
            k, base = self._shard_at(positions[i])
            j = bisect.bisect_left(positions, base + self.manifest.sizes[self.order[k]], i)
            groups.append((self.order[k], base, i, j))
            i = j
        for g, (shard, base, i, j) in enumerate(groups):
            if g + 1 < len(groups):
                self._prefetch(groups[g + 1][0])
            idxs = positions[i:j]
            idxs = range(idxs.start - base, idxs.stop - base) if isinstance(idxs, range) else [p - base for p in idxs]
            for idx, sample in self._samples(shard, idxs, report):
                yield base + idx, sample

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
