"""Streaming loader: the WebDataset shards of ``pipeline/shard.py`` to training and
evaluation batches, on any number of ranks and DataLoader workers.

    manifest = load_manifest("shards/imagenet/train")   # pipeline.manifest; or s3://...
    loader = Loader(TrainStream(manifest, batch_size=128, rank=r, world_size=n), workers=8)
    loader.load_state_dict(ckpt["loader"])          # optional: continue mid-epoch
    for epoch in range(loader.epoch_index, epochs):
        for batch in loader.epoch(epoch):           # dict: image, target, label, key
            ...
            ckpt["loader"] = loader.state_dict()    # epoch + batches consumed

Training stream, and what an "epoch" is
---------------------------------------
Every DataLoader worker of every rank is a *slot*; there are ``world_size x
workers`` of them. For epoch ``e`` the shards are put in an order drawn from
``(seed, e)`` and their samples concatenated into one sequence (cyclic, so it never
runs out). Each rank yields ``K = floor(epoch_samples / (world_size x batch))``
batches; the rank's batch ``k`` is made by its worker ``k mod workers`` (the order in
which a PyTorch DataLoader collects from its workers), so every slot knows exactly
how many samples it must produce, and the slots take consecutive, disjoint ranges
of the sequence of those sizes. Therefore:

* all ranks yield exactly the same number of batches, by construction: no rank can
  run dry and hang a collective;
* one epoch is one pass over ``world_size x K x batch`` samples, i.e. all of the
  split except fewer than ``world_size x batch`` (``test_data.py`` measures the
  fraction of distinct samples seen per epoch);
* inside its range a slot shuffles with a buffer (``shuffle_buffer`` samples, seeded
  by ``(seed, e, slot)``) that is drained at the end of the range, so ranges stay
  disjoint;
* a sample that cannot be read is skipped and the slot reads on past the end of
  its range to make up the count (overlapping its neighbour by that many samples
  only when there is bad data).

Each sample's augmentation is seeded from ``(seed, epoch, position in the
sequence)`` and each batch's Mixup/CutMix and random erasing from ``(seed, epoch,
rank, batch index)``, so a batch is a pure function of the data and the loader state.
**Mid-epoch resume**: the state is ``(epoch, batches consumed, seed)``; restoring it
makes every worker skip, without decoding, the samples its slot had already used,
and the DataLoader's workers are rotated so that the first batch it collects is the
next one: the batches after a resume equal those of an uninterrupted run.
**Elastic resume**: the slots depend on the layout (ranks x workers x batch). An
epoch resumed mid-way on another layout goes on over exactly the positions the
earlier layouts had not used (the state keeps each earlier layout and how far it
got, a few integers, so any number of changes compose): they are recomputed without
reading any data, split over the new slots as above, and each slot reads its own in
order, skipping the rest undecoded. The recomputation is lazy (:class:`_Left`): a new
slot replays the shuffle buffers of only the old slots whose leftovers it inherits, so
its cost grows with its share of the epoch, not with the data set. Every sample is used at
most once per epoch; what is left out is the usual remainder (fewer than ``ranks x
batch``) of each layout the epoch ran on. Later epochs are the new layout's own.

Repeated augmentation (``repeats=r``, the official TNT/DeiT recipe uses 3): every
sample of the sequence appears ``r`` times in a row before the shuffle buffer,
each time with its own augmentation; an epoch keeps its length, so it covers about
``1/r`` of the distinct images, as DeiT's ``RASampler`` does. (DeiT spreads the
copies over GPUs; here they stay in one worker and the shuffle buffer spreads them
over batches, which makes no difference to a ViT without batch statistics.)

Evaluation stream
-----------------
The split is cut into ``world_size x workers`` contiguous ranges (sizes differ by
at most one) in manifest order: every sample is seen exactly once across all ranks.
Every worker yields the same number of batches, padding the last with blank images
labelled ``-1`` (``mask = label >= 0``), so ranks run the same number of forward
passes, which ZeRO-3 needs (its parameter gathers are collectives).

Decoding and augmentation: :mod:`pipeline.transforms` (the DeiT/TNT recipe, in the
workers or, with ``finish="device"``, finished on the GPU); batches are written into
memory that is reused once nobody reads it (:class:`_Buffers`).

Reading: :mod:`pipeline.manifest` (the manifest; a slot's samples fetched by byte
range, from local disk or an object store through :mod:`pipeline.store`). A slot's
shuffle is drawn on positions alone, so it reads only the positions it will hand out:
a resume never reads the samples already used.

Bad data: a sample that fails to decode, a truncated tar or a missing shard (after
the store's retries) is logged (rate-limited, with rank, worker and shard), counted
and skipped; counts travel with each batch into :attr:`Loader.counters`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import itertools
import logging
import math
import multiprocessing
import random
from typing import Iterator, Sequence

import torch

from pipeline import lifetime
from pipeline.errors import InputError
from pipeline.manifest import Manifest, _Reporter, _Sequence, load_manifest  # noqa: F401 (load_manifest: re-exported)
from pipeline.transforms import Augment, BatchFinish, EvalTransform, TrainTransform, _cv2_one_thread, seed_of, seeded

log = logging.getLogger("tntpipe.data")

# ---------------------------------------------------------------- reading shards


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer of ``size`` items; drains completely when the input ends."""
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def _worker_batches(batches: int, logical: int, workers: int) -> int:
    """How many of a rank's batches ``0..batches-1`` fall to its ``logical``-th worker (k -> k % workers)."""
    return (batches - logical + workers - 1) // workers


def _phase_layout(n: int, world: int, workers: int, batch: int) -> tuple[int, list[tuple[int, int]]]:
    """A phase of an epoch over a list of ``n`` positions, on ``world`` ranks x ``workers``:
    (batches per rank, each slot's ``[lo, hi)`` in the list; slots rank-major, then logical worker)."""
    per_rank = n // (world * batch)
    slots = []
    for r in range(world):
        lo = r * per_rank * batch
        for w in range(workers):
            hi = lo + _worker_batches(per_rank, w, workers) * batch
            slots.append((lo, hi))
            lo = hi
    return per_rank, slots


def _buffer_rng(seed: int, epoch: int, rank: int, logical: int, phase: int) -> random.Random:
    parts = ("buffer", seed, epoch, rank, logical) + (("phase", phase) if phase else ())
    return random.Random(seed_of(*parts))


def _remaining_eager(seed: int, epoch: int, samples: int, shuffle_buffer: int, history: tuple) -> tuple[int, ...]:
    """The reference for :class:`_Left`: the epoch's positions not yet used after the
    phases of ``history``, built whole (a pass over every position of the epoch: about
    a second per million). Kept for the tests that check :class:`_Left` against it."""
    positions: Sequence[int] = range(samples)
    for phase, (world, workers, batch, done) in enumerate(history):
        per_rank, slots = _phase_layout(len(positions), world, workers, batch)
        rest: list[int] = []
        for i, (lo, hi) in enumerate(slots):
            r, w = divmod(i, workers)
            order = list(
                _shuffled(iter(sorted(positions[lo:hi])), shuffle_buffer, _buffer_rng(seed, epoch, r, w, phase))
            )
            rest.extend(order[_worker_batches(done, w, workers) * batch :])
        rest.extend(positions[per_rank * world * batch :])  # the phase's remainder: not seen yet either
        positions = rest
    return tuple(positions)


class _Left:
    """The epoch's positions not yet used after the phases of ``history`` (each
    ``(world, workers, batch, batches done per rank)``: a layout the epoch ran on, then
    left), in a canonical order: per old slot, what its shuffle buffer had not yet
    handed out, then the phase's remainder. A pure function of its arguments, so every
    rank and worker of the next layout derives the same sequence.

    Lazy: its length costs O(old slots) per phase, and a slice replays the shuffle
    buffers of only the old slots it overlaps (on positions alone, recursively through
    earlier phases), so a new slot pays for its own share of the epoch, not for the
    whole epoch (:func:`_remaining_eager` is the same sequence built whole)."""

    def __init__(self, seed: int, epoch: int, samples: int, shuffle_buffer: int, history: tuple):
        self.seed, self.epoch, self.buffer = seed, epoch, shuffle_buffer
        self.prev = range(samples) if len(history) == 1 else _Left(seed, epoch, samples, shuffle_buffer, history[:-1])
        self.phase = len(history) - 1
        self.world, self.workers, self.batch, done = history[-1]
        per_rank, self.slots = _phase_layout(len(self.prev), self.world, self.workers, self.batch)
        # per old slot, how many it handed out; then the leftovers' and the remainder's lengths
        self.used = [
            min(hi - lo, _worker_batches(done, i % self.workers, self.workers) * self.batch)
            for i, (lo, hi) in enumerate(self.slots)
        ]
        self.tail = per_rank * self.world * self.batch
        lengths = [hi - lo - used for (lo, hi), used in zip(self.slots, self.used)] + [len(self.prev) - self.tail]
        self.ends = list(itertools.accumulate(lengths))
        self._held: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.ends[-1]

    def _order(self, i: int) -> list[int]:
        """Old slot ``i``'s positions in the order its shuffle buffer handed them out."""
        if i not in self._held:
            lo, hi = self.slots[i]
            r, w = divmod(i, self.workers)
            rng = _buffer_rng(self.seed, self.epoch, r, w, self.phase)
            if len(self._held) >= 4:
                self._held.pop(next(iter(self._held)))
            self._held[i] = list(_shuffled(iter(sorted(self.prev[lo:hi])), self.buffer, rng))
        return self._held[i]

    def __getitem__(self, key: slice) -> list[int]:
        start, stop, step = key.indices(len(self))
        assert step == 1, "only contiguous slices"
        out: list[int] = []
        k = bisect.bisect_right(self.ends, start)
        while start < stop:
            begin = self.ends[k - 1] if k else 0
            a, b = start - begin, min(stop, self.ends[k]) - begin
            if k < len(self.slots):
                out.extend(self._order(k)[self.used[k] + a : self.used[k] + b])
            else:  # the phase's remainder: not seen yet either
                out.extend(self.prev[self.tail + a : self.tail + b])
            start, k = begin + b, k + 1
        return out


@functools.lru_cache(maxsize=4)
def _remaining(seed: int, epoch: int, samples: int, shuffle_buffer: int, history: tuple) -> _Left:
    """The positions left after ``history`` (non-empty): :class:`_Left`, kept for the
    stream's length and its slot's slice."""
    return _Left(seed, epoch, samples, shuffle_buffer, history)


def _worker() -> tuple[int, int, bool]:
    info = torch.utils.data.get_worker_info()
    return (0, 1, True) if info is None else (info.id, info.num_workers, False)


def _batch_tensor(shape: tuple[int, ...], shared: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch; in a DataLoader worker, allocated in shared memory straight away
    (as ``default_collate`` does), so sending it to the main process copies nothing
    (otherwise the worker copies each batch, 38.5 MB at 64x224^2, into shared memory)."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _uses(t: torch.Tensor) -> int:
    """Tensors (views included) that share ``t``'s memory, in this process."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Buffers:
    """Batch tensors that are written again once nobody reads them any more.

    Our own code because it measured faster: a fresh 38.5 MB batch pays its pages'
    first-touch faults, 0.33 ms per 224^2 image in shared memory on the 2-core AMD EPYC
    VM against 0.06 ms to write the same image into memory already touched, ~11% of
    the loader's CPU time per image (``bench/loader_bench.py``). A buffer is written
    again only when it is free:

    * ``recycle="uses"`` (the batches are read in this process: no DataLoader workers,
      or simulated ones): when no tensor other than ours uses its memory;
    * ``recycle=queue`` (a DataLoader worker): when the main process sends its id back,
      which :class:`Loader` does after the same check there (with ``pin_memory``, as
      soon as the batch has been copied into pinned memory);
    * ``recycle=None``: never (a worker of a DataLoader other than :class:`Loader`'s).

    At most ``keep`` buffers are kept; when all are in use a new one is made and the
    oldest is forgotten (freed once its readers let go of it).
    """

    def __init__(self, shared: bool, recycle=None, keep: int = 4):
        self.shared, self.recycle = shared, recycle
        self.keep = keep if recycle is not None else 0
        self.held: dict[int, tuple[torch.Tensor, int]] = {}  # id -> (buffer, its uses alone), oldest first
        self.free: set[int] = set()
        self.next = 0

    def _collect(self) -> None:
        if self.recycle == "uses":
            self.free |= {i for i, (t, alone) in self.held.items() if _uses(t) <= alone}
        elif self.recycle is not None:
            while not self.recycle.empty():
                self.free.add(self.recycle.get())
            self.free &= self.held.keys()

    def take(
        self, shape: tuple[int, ...], zero: bool = False, dtype: torch.dtype = torch.float32
    ) -> tuple[int, torch.Tensor]:
        """(id, a view of a free buffer of ``shape``); the caller may write it freely."""
        self._collect()
        found = next(
            (
                i
                for i in self.held
                if i in self.free and self.held[i][0].shape == shape and self.held[i][0].dtype == dtype
            ),
            None,
        )
        if found is None:
            found, self.next = self.next, self.next + 1
            t = _batch_tensor(shape, self.shared, dtype)
            self.held[found] = (t, _uses(t))
            while len(self.held) > self.keep:
                self.free.discard(oldest := next(iter(self.held)))
                del self.held[oldest]
        else:
            t, alone = self.held.pop(found)
            self.held[found] = (t, alone)  # newest last
            self.free.discard(found)
        out = t.detach()  # a view: counted by _uses while the reader holds it
        return found, out.zero_() if zero else out


# ---------------------------------------------------------------- streams


def _finish_mode(finish: str) -> str:
    if finish not in ("worker", "device"):
        raise InputError(f"a stream's finish must be worker or device, not {finish!r}")
    return finish


class Stream(torch.utils.data.IterableDataset):
    """What :class:`TrainStream` and :class:`EvalStream` share: their set-up, the
    batch buffers (:class:`_Buffers`) and decoding one sample into a batch, skipping
    (counted, logged) the ones that cannot be read. Yields whole batches: the
    DataLoader runs with ``batch_size=None``."""

    train = True

    def __init__(
        self,
        manifest: Manifest,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        augment: Augment,
        finish: str,
    ):
        self.manifest = manifest
        self.finish = _finish_mode(finish)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.augment = augment
        # Set by Loader before each epoch: plain attributes for in-process use, and
        # through ``shared`` (shared memory, made before the workers fork) for its
        # persistent DataLoader workers, which keep the copy of this object they forked with.
        self.epoch, self.start, self.num_workers = 0, 0, 1
        self.shared = None
        self.plan = None  # (epoch, its earlier phases): set by Loader.load_state_dict before workers fork
        self.returns, self.keep = None, 4  # per worker: ids of buffers free again (_Buffers)
        self._transform = self._finish = self._worker_buffers = None

    def worker_batches(self, logical: int, workers: int) -> int:
        raise NotImplementedError

    def iter_worker(self, physical: int, workers: int, main: bool = False) -> Iterator[dict]:
        """The batches DataLoader worker ``physical`` of ``workers`` yields this epoch."""
        raise NotImplementedError

    @property
    def pixel_dtype(self) -> torch.dtype:
        return torch.uint8 if self.finish == "device" else torch.float32

    def __iter__(self) -> Iterator[dict]:
        physical, workers, main = _worker()
        if self.shared is not None:  # a persistent worker: this epoch's place from the Loader
            self.epoch, self.start = int(self.shared[0]), int(self.shared[1])
        return self.iter_worker(physical, workers, main)

    def _setup(self) -> None:
        if self._transform is None:
            self._transform = (TrainTransform if self.train else EvalTransform)(self.augment)
            self._finish = BatchFinish(self.augment, self.manifest.num_classes, self.train)

    def _buffers(self, physical: int, main: bool) -> _Buffers:
        if main:
            return _Buffers(shared=False, recycle="uses", keep=self.keep)
        if self._worker_buffers is None:  # one set per worker process, across epochs: ids stay unique
            self._worker_buffers = _Buffers(
                shared=True, recycle=self.returns[physical] if self.returns else None, keep=self.keep
            )
        return self._worker_buffers

    def _decode(
        self, sample: dict, out: torch.Tensor, report: _Reporter, seed: int | None = None, main: bool = False
    ) -> int | None:
        """Decode ``sample`` into ``out`` (one image of a batch), its augmentation seeded
        by ``seed`` when given; its label, or None for a sample that cannot be read
        (counted and logged)."""
        try:
            label = int(sample["cls"])
            with seeded(seed, restore=main) if seed is not None else contextlib.nullcontext():
                self._finish.image(out, self._transform(sample["jpg"]))
        except Exception as exc:  # noqa: BLE001 - bad data is skipped, counted, logged
            report.sample(sample.get("__url__", "?"), sample.get("__key__", "?"), exc)
            return None
        return label


class TrainStream(Stream):
    """Endless-source, fixed-length training epochs; see the module docstring.

    Yields whole batches (the DataLoader runs with ``batch_size=None``): dicts with
    ``image`` float (B, 3, S, S), ``target`` float (B, classes) (Mixup/CutMix and
    smoothing applied), ``label`` long (B,) (before mixing), ``key`` list of str,
    ``bad`` (bad samples, bad shards) counted since the worker's previous batch, and
    ``epoch``/``index`` (the batch's place in the rank's epoch). With
    ``finish="device"``: ``image`` is uint8 and there is no ``target``
    (:class:`DeviceFinish` makes both on the device).
    """

    def __init__(
        self,
        manifest: Manifest,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        augment: Augment = Augment(),
        repeats: int = 1,
        shuffle_buffer: int = 1000,
        epoch_samples: int | None = None,
        finish: str = "worker",
    ):
        super().__init__(
            manifest, batch_size, rank=rank, world_size=world_size, seed=seed, augment=augment, finish=finish
        )
        self.repeats = max(1, repeats)
        self.shuffle_buffer = shuffle_buffer
        self.epoch_samples = epoch_samples or manifest.num_samples
        if augment.cv2_geometry and augment.auto_augment:
            _cv2_one_thread()  # here, before DataLoader workers fork
        if self.epoch_samples // (world_size * batch_size) == 0:  # batches per rank: __len__
            raise InputError(
                f"batch {batch_size} x {world_size} ranks is more than the {self.epoch_samples} samples of "
                f"{manifest.path}"
            )

    def __len__(self) -> int:
        """Batches per rank in the current epoch: ``epoch_samples // (ranks x batch)``, or
        fewer in an epoch that continues on another layout (:meth:`history_of`)."""
        return len(self.positions_left(self.epoch, self.history_of(self.epoch))) // (self.world_size * self.batch_size)

    def history_of(self, epoch: int) -> tuple:
        """The earlier layouts (ranks, workers, batch, batches done) of ``epoch``, which
        continues on this one (set by :meth:`Loader.load_state_dict`); () for an epoch
        begun on this layout. Its length is the epoch's phase."""
        return self.plan[1] if self.plan is not None and self.plan[0] == epoch else ()

    def positions_left(self, epoch: int, history: tuple) -> Sequence[int]:
        """The positions of ``epoch`` for its next layout: all of them, or what the
        layouts of ``history`` left (:func:`_remaining`)."""
        if not history:
            return range(self.epoch_samples)
        return _remaining(self.seed, epoch, self.epoch_samples, self.shuffle_buffer, history)

    def worker_batches(self, logical: int, workers: int) -> int:
        """Batches the rank's ``logical``-th worker makes this epoch (batch k -> k % workers)."""
        return _worker_batches(len(self), logical, workers)

    def _order(self) -> list[int]:
        order = list(range(len(self.manifest.urls)))
        random.Random(seed_of("shards", self.seed, self.epoch)).shuffle(order)
        return order

    def _positions(self, logical: int, workers: int, report: _Reporter, skip: int = 0) -> Iterator[tuple[int, dict]]:
        """(virtual position, raw sample): the slot's range shuffled, then top-up.

        The shuffle is drawn on positions alone (a buffer shuffle: the t-th output is
        among the first t + ``shuffle_buffer`` inputs), then the samples are fetched in
        position order and handed out in the shuffled one, holding at most a buffer's
        worth. So the first ``skip`` outputs (a resume) are never read, and in a later
        phase of an epoch (:meth:`history_of`) only the slot's own part of what the
        earlier phases left is read."""
        history = self.history_of(self.epoch)
        phase, positions = len(history), self.positions_left(self.epoch, history)
        _, slots = _phase_layout(len(positions), self.world_size, workers, self.batch_size)
        lo, hi = slots[self.rank * workers + logical]
        r = self.repeats
        mine = range(lo, hi) if not phase else sorted(positions[lo:hi])
        rng = _buffer_rng(self.seed, self.epoch, self.rank, logical, phase)
        order = list(_shuffled(iter(mine), self.shuffle_buffer, rng))
        seq = _Sequence(self.manifest, self._order())
        todo = order[skip:]
        uses = collections.Counter(v // r for v in todo)  # a sample is handed out r times (repeats)
        fetched, held, frontier = seq.fetch(sorted(uses), report), {}, -1
        for v in todo:
            p = v // r
            while frontier < p:
                frontier, sample = next(fetched, (math.inf, None))
                if sample is not None:
                    held[frontier] = sample
            if p not in held:
                continue  # unreadable (counted): made up for by the top-up below
            uses[p] -= 1
            yield v, (held[p] if uses[p] else held.pop(p))
        # Only reached when bad samples must be made up for: read on past the range.
        after = (mine[-1] + 1) if len(mine) else hi
        skip = max(0, skip - len(order))
        for p, sample in seq.read(after // r, report):
            for v in range(max(p * r, after), p * r + r):
                if skip:
                    skip -= 1
                    continue
                yield v, sample

    def iter_worker(self, physical: int, workers: int, main: bool = False) -> Iterator[dict]:
        self._setup()
        logical = (physical + self.start) % workers
        done = sum(1 for k in range(self.start) if k % workers == logical)
        total = self.worker_batches(logical, workers)
        report = _Reporter(f"rank {self.rank} worker {physical} ({self.manifest.split})")
        buffers = self._buffers(physical, main)
        stream = self._positions(logical, workers, report, skip=done * self.batch_size)  # resume: never read
        B, S = self.batch_size, self.augment.img_size
        for j in range(done, total):
            buffer, image = buffers.take((B, 3, S, S), dtype=self.pixel_dtype)
            labels, keys = [], []
            while len(labels) < B:
                v, sample = next(stream)
                label = self._decode(
                    sample, image[len(labels)], report, seed_of("sample", self.seed, self.epoch, v), main
                )
                if label is not None:
                    labels.append(label)
                    keys.append(sample.get("__key__", "?"))
            label = torch.tensor(labels)
            index = j * workers + logical  # the batch's index in the rank's epoch
            batch = {
                "image": image,
                "label": label,
                "key": keys,
                "bad": report.take(),
                "buffer": (physical, buffer),
                "epoch": self.epoch,
                "index": index,
            }
            if self.finish == "worker":
                with seeded(seed_of("batch", self.seed, self.epoch, self.rank, index), restore=main):
                    batch["target"] = self._finish.mix(image, label)
            yield batch


class EvalStream(Stream):
    """Every sample exactly once over all ranks and workers; equal batch counts,
    padded with blank images labelled -1. Yields ``image``, ``label``, ``key``, ``bad``."""

    train = False

    def __init__(
        self,
        manifest: Manifest,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        augment: Augment = Augment(),
        finish: str = "worker",
    ):
        super().__init__(manifest, batch_size, rank=rank, world_size=world_size, seed=0, augment=augment, finish=finish)

    def __len__(self) -> int:
        return self.num_workers * self.worker_batches(0, self.num_workers)

    def worker_batches(self, logical: int, workers: int) -> int:
        slots = self.world_size * workers
        return math.ceil(math.ceil(self.manifest.num_samples / slots) / self.batch_size)

    def iter_worker(self, physical: int, workers: int, main: bool = False) -> Iterator[dict]:
        self._setup()
        slots = self.world_size * workers
        slot = self.rank * workers + physical
        n = self.manifest.num_samples
        lo, hi = slot * n // slots, (slot + 1) * n // slots
        report = _Reporter(f"rank {self.rank} worker {physical} ({self.manifest.split})")
        buffers = self._buffers(physical, main)
        seq = _Sequence(self.manifest, list(range(len(self.manifest.urls))))
        samples = seq.fetch(range(lo, hi), report)  # a bad shard's samples are left out
        S = self.augment.img_size
        pos = lo
        for _ in range(self.worker_batches(0, workers)):
            buffer, image = buffers.take(
                (self.batch_size, 3, S, S), zero=True, dtype=self.pixel_dtype
            )  # padding: blank, label -1
            labels, keys = [], []
            while pos < hi and len(labels) < self.batch_size:
                p, sample = next(samples, (hi, None))
                pos = p + 1
                if sample is None:  # the range is done
                    break
                label = self._decode(sample, image[len(labels)], report)
                if label is not None:
                    labels.append(label)
                    keys.append(sample["__key__"])
            pad = self.batch_size - len(labels)
            label = torch.tensor(labels + [-1] * pad)
            yield {
                "image": image,
                "label": label,
                "key": keys + [""] * pad,
                "bad": report.take(),
                "buffer": (physical, buffer),
            }


# ---------------------------------------------------------------- loader


class Loader:
    """A DataLoader over a stream, with epoch/resume state and bad-data counters."""

    def __init__(
        self,
        stream: Stream,
        workers: int = 0,
        pin_memory: bool | None = None,
        prefetch: int = 2,
        timeout_s: float = 0.0,
    ):
        self.stream = stream
        self.workers = workers
        self.timeout_s = timeout_s  # DataLoader's own bound on one batch from the workers (0: none)
        self._dl = None  # made on the first epoch, kept (persistent workers)
        # (worker, buffer id) -> (batch, its uses alone): lent to the caller; returned ones held
        # so that the next arrival maps nothing new (across epochs: the workers' buffers persist)
        self._lent: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
        self._kept: dict[tuple[int, int], torch.Tensor] = {}
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch = prefetch
        stream.num_workers = max(1, workers)
        self.epoch_index, self.batch_index = 0, 0
        self.counters = {"bad_samples": 0, "bad_shards": 0}

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def completed_epochs(self) -> int:
        """Epochs whose every batch has been handed out (the one convention for epoch
        numbers in logs, metrics and the registry)."""
        return self.epoch_index + (1 if self.batch_index >= len(self) else 0)

    def _layout(self) -> tuple[int, int, int]:
        return self.stream.world_size, max(1, self.workers), self.stream.batch_size

    def state_dict(self) -> dict:
        """Epoch, batches done in it on this layout (ranks, workers, batch), and the
        earlier layouts of the epoch with what each used (``history``): enough for any
        other layout to go on with exactly the samples not yet used."""
        world, workers, batch = self._layout()
        return {
            "epoch": self.epoch_index,
            "batch": self.batch_index,
            "seed": self.stream.seed,
            "workers": workers,
            "world_size": world,
            "batch_size": batch,
            "history": [list(h) for h in self.stream.history_of(self.epoch_index)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off. On another layout (ranks, workers or batch
        size) mid-epoch, the rest of the epoch is what the saved layouts had not used
        yet, split afresh over this one: every sample of the epoch at most once, and
        at most one batch per rank of it left out (:func:`_remaining`); later epochs are
        this layout's own."""
        if state.get("seed", self.stream.seed) != self.stream.seed:
            raise InputError(f"loader state was saved with seed {state['seed']}, this run uses {self.stream.seed}")
        stream = self.stream
        epoch, done = int(state["epoch"]), int(state["batch"])
        saved = (
            int(state.get("world_size", stream.world_size)),
            int(state.get("workers", max(1, self.workers))),
            int(state.get("batch_size", stream.batch_size)),
        )
        history = tuple(tuple(int(v) for v in h) for h in state.get("history", ()))
        if done >= len(stream.positions_left(epoch, history)) // (saved[0] * saved[2]):  # it had finished the epoch
            epoch, done, history = epoch + 1, 0, ()
        elif done and saved != self._layout():
            history += (saved + (done,),)
            log.info(
                "epoch %d goes on with %d ranks x %d workers x batch %d (begun on %d x %d x %d, %d batches "
                "per rank done): the samples not used yet, each once",
                epoch,
                *self._layout(),
                *saved,
                done,
            )
            done = 0
        self.epoch_index, self.batch_index = epoch, done
        stream.epoch, stream.plan = epoch, ((epoch, history) if history else None)
        if self._dl is not None:  # workers fork again, with the plan; their buffer ids start afresh
            self.close()
            self._lent.clear()
            self._kept.clear()

    def close(self) -> None:
        """Stop the worker processes now, as the DataLoader iterator's ``__del__`` would.
        Left to interpreter exit, torch before 2.12 with pinned memory and persistent
        workers joins each worker with a 5 s timeout first (pytorch issue 81794): on an
        H200 machine (torch 2.11) a finished run took 75 s more to exit."""
        it = getattr(self._dl, "_iterator", None)
        self._dl = None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # idempotent; the generator of epoch() may still hold `it`

    def _dataloader(self) -> torch.utils.data.DataLoader:
        """One DataLoader for the Loader's life: with workers, they persist across epochs
        (no fork and set-up per epoch or evaluation); each epoch's place reaches them
        through the stream's shared memory, read when an epoch's iteration starts."""
        if self._dl is None:
            if self.workers:
                # The transforms made here, before the workers fork, not in each of them: their
                # imports (timm, ~1.3 CPU-s) were paid per worker (bench/peer_bench.py, row 2).
                self.stream._setup()
                ctx = multiprocessing.get_context()
                self.stream.shared = ctx.Array("q", 2, lock=False)
                # Per worker, the ids of its batch buffers that nobody here reads any more (_Buffers).
                self.stream.returns = [ctx.SimpleQueue() for _ in range(self.workers)]
            self.stream.keep = self.prefetch + 3
            self._dl = torch.utils.data.DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch if self.workers else None,
                persistent_workers=self.workers > 0,
                timeout=self.timeout_s if self.workers else 0,
                worker_init_fn=lifetime.die_with_parent if self.workers else None,
            )
        return self._dl

    def epoch(self, epoch: int) -> Iterator[dict]:
        """The batches of ``epoch``, continuing mid-epoch after :meth:`load_state_dict`."""
        start = self.batch_index if self.stream.train and epoch == self.epoch_index else 0
        self.epoch_index, self.batch_index = epoch, start
        self.stream.epoch, self.stream.start = epoch, start
        if start >= len(self.stream):
            return
        dl = self._dataloader()
        if self.stream.shared is not None:
            self.stream.shared[:] = [epoch, start]
        returns = self.stream.returns
        lent, kept = self._lent, self._kept
        for batch in dl:
            bad_samples, bad_shards = batch.pop("bad")
            self.counters["bad_samples"] += int(bad_samples)
            self.counters["bad_shards"] += int(bad_shards)
            worker, buffer = batch.pop("buffer")
            if returns is not None:
                for key, (t, alone) in list(lent.items()):
                    if _uses(t) <= alone:
                        del lent[key]
                        kept[key] = t
                        returns[key[0]].put(key[1])
                image, key = batch["image"], (worker, buffer)
                kept.pop(key, None)
                if image.is_shared():  # still the worker's buffer: lend a view, take it back later
                    lent[key] = (image, _uses(image))
                    batch["image"] = image.detach()
                else:  # pinned: copied, the worker may write it again now
                    returns[worker].put(buffer)
                while len(kept) > self.workers * self.stream.keep:
                    del kept[next(iter(kept))]
                del image
            self.batch_index += 1
            yield batch
        if self.stream.train:
            self.epoch_index, self.batch_index = epoch + 1, 0
