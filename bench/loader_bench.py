"""Training input pipeline images/s: our shard loader vs timm's ImageFolder loader.

    .venv/bin/python bench/loader_bench.py [--images 3000] [--batch 64] [--workers 1 2]

Same source JPEGs (crops of the real photos scikit-learn ships, ~500x375, q90, 10
classes; a second set at twice the size), same recipe: RandomResizedCrop 224
bicubic, flip, RandAugment rand-m9-mstd0.5-inc1, normalise (0.5), random erasing
0.25 pixel, Mixup 0.8 / CutMix 1.0 with smoothing 0.1 (timm's, applied to the batch
in the training loop, as timm's train.py does without its CUDA prefetcher).
  - ours:  shards -> pipeline.data.Loader(TrainStream(...)), Mixup in the workers;
           RandAugment's rotate/shear/translate warp through OpenCV (its default)
  - ours, PIL geometry: the same with Augment(cv2_geometry=False), i.e. exactly
           timm's operators (ImageNet-sized set only)
  - ours, uint8: data.finish=device, the default on CUDA: the workers stop at uint8
           pixels; normalise, erasing and Mixup/CutMix run on the GPU (not timed
           here: this row is the CPU the loader still needs per image)
  - timm:  timm.data.create_dataset(folder) + create_loader(is_training=True, ...)
Both run one epoch per configuration, after one warm-up epoch; the first batch of
each epoch (worker start-up) is not timed. Prints images/s (wall) and images per
CPU-second of all processes (main + workers: the per-core figure), ours/timm for
both, and a ceiling: timm's CPU time per image over the time of its PIL work (decode,
crop+resize, RandAugment with PIL's geometry), i.e. the largest per-CPU-second ratio
any loader running timm's own operators could reach.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from shard_bench import make_synthetic, warm  # noqa: E402

from pipeline import shard  # noqa: E402
from pipeline.compat import fix_timm_posterize  # noqa: E402
from pipeline.data import Loader, TrainStream, load_manifest  # noqa: E402
from pipeline.transforms import TNT_MEAN, TNT_STD, Augment, TrainTransform  # noqa: E402

PIL_GEOMETRY = Augment(cv2_geometry=False)  # timm's operators exactly


def cpu_seconds() -> float:
    """User + system CPU time of this process and its DataLoader workers: exited ones
    (rusage) and live ones (``/proc/<pid>/stat``; timm keeps persistent workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    tick, parent = os.sysconf("SC_CLK_TCK"), os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == parent:  # ppid; utime and stime are fields 14 and 15 of stat
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rate(batches) -> tuple[float, float]:
    """(images/s, images per CPU-second of all processes) over one epoch.

    The wall rate skips the first batch (worker start-up); the CPU figure covers the
    whole epoch, start-up included, and is read after the workers have exited."""
    c0 = cpu_seconds()
    it = iter(batches)
    n = len(next(it)[0])
    m, t = 0, time.perf_counter()
    for images, _ in it:
        m += len(images)
    wall = time.perf_counter() - t  # an exhausted DataLoader has joined its workers
    return m / wall, (n + m) / (cpu_seconds() - c0)


def ours(split_dir: str, batch: int, workers: int, augment: Augment = Augment(), finish: str = "worker"):
    loader = Loader(TrainStream(load_manifest(split_dir), batch, augment=augment, finish=finish), workers=workers)
    for epoch in range(2):
        yield ((b["image"], b.get("target", b["label"])) for b in loader.epoch(epoch))


# The DeiT/TNT recipe in timm's words (create_transform / create_loader arguments, and Mixup's):
# what a timm user, or a peer library's user with timm's transforms, runs.
TIMM_RECIPE = dict(
    re_prob=0.25,
    re_mode="pixel",
    re_count=1,
    auto_augment="rand-m9-mstd0.5-inc1",
    color_jitter=0.4,
    interpolation="bicubic",
    mean=TNT_MEAN,
    std=TNT_STD,
)
TIMM_MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def timm_folder(root: str, batch: int, workers: int):
    from timm.data import Mixup, create_dataset, create_loader

    dataset = create_dataset("", root=root, is_training=True)
    loader = create_loader(
        dataset,
        input_size=(3, 224, 224),
        batch_size=batch,
        is_training=True,
        use_prefetcher=False,
        num_workers=workers,
        pin_memory=False,
        **TIMM_RECIPE,
    )
    mixup = Mixup(**TIMM_MIXUP, num_classes=len(dataset.reader.class_to_idx))
    for _ in range(2):
        yield (mixup(x, y) for x, y in loader)


def shared_floor(root: str, count: int = 500, augment: Augment = PIL_GEOMETRY) -> float:
    """Seconds per image of the image work: decode, RandomResizedCrop + bicubic resize,
    flip, RandAugment (our ``TrainTransform``, one thread, in this process). With PIL's
    geometry it is the work timm's pipeline does with the same PIL code: no loader
    running those operators can spend less CPU per image than this."""
    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(os.path.join(root, "train")) for f in names)[:count]
    blobs = [open(p, "rb").read() for p in paths]
    transform = TrainTransform(augment)
    t = time.perf_counter()
    for blob in blobs:
        transform(blob)
    return (time.perf_counter() - t) / len(blobs)


def finish_cost(batch: int = 64, batches: int = 20) -> tuple[float, float]:
    """Seconds per image, one thread, of what the workers do after the image work:
    (float32 path: normalise + random erasing 0.25 per image and Mixup/CutMix per
    batch, as BatchFinish does in the workers; uint8 path: the copy into the batch).
    The difference is the CPU that data.finish=device moves to the GPU."""
    import numpy as np

    from pipeline.transforms import BatchFinish

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
    labels = torch.arange(batch) % 10
    finish = BatchFinish(Augment(), num_classes=10, train=True)
    floats, bytes_ = torch.empty(batch, 3, 224, 224), torch.empty(batch, 3, 224, 224, dtype=torch.uint8)
    times = []
    for out in (floats, bytes_):
        best = float("inf")
        for _ in range(3):  # best of 3: the least disturbed by the rest of the machine
            t = time.perf_counter()
            for b in range(batches):
                np.random.seed(b)
                for i, a in enumerate(arrays):
                    finish.image(out[i], a)
                if out.dtype == torch.float32:
                    finish.mix(out, labels)
            best = min(best, (time.perf_counter() - t) / (batch * batches))
        times.append(best)
    return times[0], times[1]


def bench(name: str, root: str, args, tmp: str, pil_row: bool) -> None:
    files, size = warm(root)
    out = os.path.join(tmp, "shards-" + name.split()[0])
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard.main([root, "--out", out, "--quiet"]) == 0
    floor, ours_floor = shared_floor(root), shared_floor(root, augment=Augment())
    print(
        f"\n{name}: {files} JPEGs, mean {size / files / 1e3:.0f} KB, batch {args.batch}; image work (decode, "
        f"crop+resize, RandAugment): timm's operators {floor * 1e3:.2f} ms/img, ours {ours_floor * 1e3:.2f} ms/img"
    )
    for workers in args.workers:
        runs = {
            "timm ImageFolder": timm_folder(os.path.join(root, "train"), args.batch, workers),
            "ours": ours(os.path.join(out, "train"), args.batch, workers),
        }
        if pil_row:
            runs["ours, PIL geometry"] = ours(os.path.join(out, "train"), args.batch, workers, PIL_GEOMETRY)
        runs["ours, uint8 (GPU finish)"] = ours(os.path.join(out, "train"), args.batch, workers, finish="device")
        for epochs in runs.values():
            rate(next(epochs))  # warm-up epoch (page cache, imports)
        (t, tc), *rest = [rate(next(epochs)) for epochs in runs.values()]
        print(
            f"  {workers} worker(s): timm ImageFolder {t:6.1f} img/s {tc:6.1f} img/CPU-s"
            f"   (ceiling per CPU-s with timm's operators: {1 / floor / tc:.2f}x)"
        )
        for label, (o, oc) in zip(list(runs)[1:], rest):
            print(
                f"    {label:24s} {o:6.1f} img/s {oc:6.1f} img/CPU-s   ours/timm {o / t:.2f}x wall, "
                f"{oc / tc:.2f}x per CPU-s",
                flush=True,
            )
        (_, worker_c), (_, uint8_c) = rest[0], rest[-1]
        print(
            f"    loader CPU per image: {1e3 / worker_c:.2f} ms with the finish in the workers, {1e3 / uint8_c:.2f} ms "
            f"with uint8 batches ({uint8_c / worker_c:.2f}x img/CPU-s)",
            flush=True,
        )


def main_finish() -> None:
    on_float, on_uint8 = finish_cost()
    print(
        f"finish work per 224x224 image, 1 thread: float32 in the workers {on_float * 1e3:.3f} ms "
        f"(normalise, erasing 0.25, Mixup/CutMix), uint8 {on_uint8 * 1e3:.3f} ms (copy): "
        f"{(on_float - on_uint8) * 1e3:.3f} ms of CPU saved per image ({on_float / on_uint8:.1f}x less)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000, help="number of JPEGs per data set")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="DataLoader worker counts to time (0: all in the main process)",
    )
    p.add_argument(
        "--finish-only", action="store_true", help="only the finish work per image (float32 vs uint8 batches)"
    )
    args = p.parse_args()
    if args.finish_only:
        torch.set_num_threads(1)
        main_finish()
        return
    torch.set_num_threads(1)
    fix_timm_posterize()  # timm's own loader crashes on Pillow >= 11 without it (see pipeline/compat.py)
    print(f"cpus: {os.cpu_count()}, torch threads in the main process: 1")
    main_finish()
    with tempfile.TemporaryDirectory() as tmp:
        bench("ImageNet-sized (~500x375)", make_synthetic(os.path.join(tmp, "syn"), args.images), args, tmp, True)
        bench(
            "large (~1000x750)", make_synthetic(os.path.join(tmp, "big"), args.images // 2, scale=2.0), args, tmp, False
        )


if __name__ == "__main__":
    main()
