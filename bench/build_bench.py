"""What ``pipeline/shard.py`` holds in memory to list, cut and plan an ImageNet-21k-sized
tree (issue: data sets past ImageNet-1k, item 5), this checkout's code beside the code
of a baseline commit (``--baseline``, extracted with ``git archive`` in the same run).

    .venv/bin/python bench/build_bench.py            # fall11's shape: 21,841 classes, 14.2M images
    .venv/bin/python bench/build_bench.py --dry-run  # tiny sizes, every row (the test suite runs this)

Rows, each from fresh processes, the two codes interleaved, the best of --repeats
(seconds, and the peak RSS the work adds over the process after its imports):
- simulated listing: fall11's 21,841 class folders of --per-class images each, made in
  memory as the listing makes them from a walk (no files), then what a Slurm array task
  does before it builds: ``--val-fraction`` cut, class index, shard plan, inputs digest
  and the jobs of its own shards (task 0 of --tasks). At --before-scale of the size,
  both codes; at the full size this checkout's code, and the baseline's projected
  linearly from its measured size (printed as projected);
- a real tree of 21,841 class folders with --tree-per-class files each (sparse files of
  ImageNet's mean size; the listing stats them, nothing reads them): the listing alone,
  both codes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reshard_bench import cpu_name  # noqa: E402
from scale_bench import PEAK  # noqa: E402

BASELINE = "a14fb87"  # the last commit whose listing held one object per image
MEAN_BYTES = 110_000  # ImageNet's mean JPEG size

PROBE = (
    PEAK
    + """
import json, os, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import numpy  # imported lazily by this checkout's code: before the reset, for both
from pipeline import imagenet, shard
reset_peak()
mode, where, classes, per_class, tasks = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
columns = hasattr(imagenet, "Listing")  # this checkout; the baseline held one Entry per image
wnids = [f"n{i:08d}" for i in range(classes)]
size = lambda i: 80_000 + i * 7919 % 60_000  # noqa: E731  (sizes spread around ImageNet's mean)
t = time.perf_counter()
if mode == "tree":
    listing = imagenet.list_split(where, os.path.dirname(where))
elif columns:
    listing = imagenet.Listing(os.path.dirname(where))
    for w in wnids:
        folder = os.path.join("train", w)
        listing.add_chunk(folder, [(f"{w}_{i}.JPEG", w, size(i)) for i in range(per_class)])
    listing.close()
else:  # what the baseline's list_class_folders made per file
    entries = []
    for w in wnids:
        for i in range(per_class):
            rel = os.path.join("train", w, f"{w}_{i}.JPEG")
            entries.append(imagenet.Entry(os.path.join(where, rel), rel, rel.split(os.sep)[1], size(i)))
    listing = imagenet.SplitListing(entries, [])
listed = time.perf_counter() - t
if mode == "plan":
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "x"))
        options = shard.Options(shard_size=1000)
        items = listing if columns else listing.entries
        train, val = shard.cut_validation(items, 0.02, 0)
        classes = shard.class_list([("train", tmp)], {"train": train, "val": val})
        plan, _ = shard.plan_split("train", train, classes, options, tmp)
        shard.inputs_digest(train)
        # the task's jobs as its run makes them: now one at a time as workers free up
        # (shard.run_jobs), the baseline's all made by its plan
        if columns:
            sum(len(plan.job(k).samples) for k in range(0, len(plan), tasks))
        else:
            sum(len(j.samples) for j in plan if j.index % tasks == 0)
took = time.perf_counter() - t
print(json.dumps({"list_s": listed, "seconds": took, "rss_kb": peak_kb()}))
"""
)


def probe(code: str, mode: str, where: str, classes: int, per_class: int, tasks: int) -> dict:
    """What PROBE printed for ``mode`` run on the pipeline under ``code``, with its MB of
    peak RSS added."""
    argv = [sys.executable, "-c", PROBE, code, mode, where, str(classes), str(per_class), str(tasks)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the {mode} probe on {code} failed:\n{proc.stderr}")
    got = json.loads(proc.stdout.splitlines()[-1])
    return {**got, "mb": got["rss_kb"] / 1024}


def best_of(repeats: int, code: str, old: str | None, mode: str, where: str, per_class: int, args):
    """(now, before): the fastest of ``repeats`` runs of each code, interleaved, and the
    smallest peak (before is None without the baseline's code)."""
    runs: dict[str, list[dict]] = {"now": [], "before": []}
    for _ in range(repeats):
        runs["now"].append(probe(code, mode, where, args.classes, per_class, args.tasks))
        if old is not None:
            runs["before"].append(probe(old, mode, where, args.classes, per_class, args.tasks))
    best = {k: {m: min(r[m] for r in got) for m in got[0]} if got else None for k, got in runs.items()}
    return best["now"], best["before"]


def baseline_code(rev: str, folder: str) -> str | None:
    """The pipeline package of ``rev``, extracted under ``folder``; None without git or that commit."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "pipeline"], capture_output=True)
    if archive.returncode:
        return None
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:  # this repository's own files
        # ("data": where Python has the filter; 3.11.2 has not)
        tar.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder


def make_tree(root: str, classes: int, per_class: int) -> str:
    """``root/train/<wnid>/<wnid>_<i>.JPEG``: sparse files of ImageNet's mean size."""
    train = os.path.join(root, "train")
    for c in range(classes):
        folder = os.path.join(train, f"n{c:08d}")
        os.makedirs(folder)
        for i in range(per_class):
            with open(os.path.join(folder, f"n{c:08d}_{i}.JPEG"), "wb") as f:
                f.truncate(MEAN_BYTES + i)
    return train


def row(name: str, now: dict, before: dict | None, baseline: str, projected: str = "") -> None:
    text = f"  {name}: now {now['seconds']:.2f} s, +{now['mb']:,.0f} MB"
    if before is not None:
        text += (
            f" | baseline {baseline} {before['seconds']:.2f} s, +{before['mb']:,.0f} MB{projected}"
            f" | {before['seconds'] / now['seconds']:.2f}x time, {before['mb'] / max(now['mb'], 1):.1f}x memory"
        )
    print(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/build_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--classes", type=int, default=21_841, help="class folders (fall11: 21,841)")
    p.add_argument(
        "--per-class", type=int, default=650, help="images per class in the simulated listing (fall11: ~650)"
    )
    p.add_argument("--tasks", type=int, default=64, help="Slurm array tasks; task 0's jobs are made")
    p.add_argument(
        "--before-scale", type=float, default=0.1, help="share of --per-class both codes run at (then projected)"
    )
    p.add_argument("--tree-per-class", type=int, default=4, help="files per class folder in the real tree")
    p.add_argument("--repeats", type=int, default=3, help="runs of each probe, interleaved; the best is printed")
    p.add_argument("--baseline", default=BASELINE, help="the commit whose code is 'before'")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, every row")
    args = p.parse_args(argv)
    if args.dry_run:
        args.classes, args.per_class, args.tasks, args.tree_per_class, args.repeats = 40, 30, 4, 3, 1
    small = max(1, round(args.per_class * args.before_scale))
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; baseline: {args.baseline}")
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_code(args.baseline, os.path.join(tmp, "baseline"))
        if old is None:
            print(f"  (commit {args.baseline} is not in this clone: the baseline rows are left out)")
        where = os.path.join(tmp, "data", "train")
        for per_class in dict.fromkeys([small, args.per_class]):
            n = args.classes * per_class
            print(
                f"simulated listing, {args.classes:,} classes x {per_class:,} = {n:,} images: "
                "list, cut, plan, digest, task 0's jobs"
            )
            both = old is not None and per_class == small
            now, before = best_of(args.repeats, ROOT, old if both else None, "plan", where, per_class, args)
            projected = ""
            if both:
                measured = before
            elif old is not None:
                before = {k: measured[k] * per_class / small for k in ("seconds", "mb")}
                projected = f" (projected from {args.classes * small:,})"
            row("all of it", now, before, args.baseline, projected)
            print(f"    now: listing {now['list_s']:.2f} s; {now['mb'] * 2**20 / n:.0f} bytes per image")
        tree = make_tree(os.path.join(tmp, "tree"), args.classes, args.tree_per_class)
        n = args.classes * args.tree_per_class
        print(f"real tree, {args.classes:,} class folders x {args.tree_per_class} files = {n:,} files: the listing")
        now, before = best_of(args.repeats, ROOT, old, "tree", tree, args.tree_per_class, args)
        row("listing", now, before, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
