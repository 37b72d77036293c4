"""The GPU check's CPU-reachable parts: ``bench/gpu_check.sh --dry-run`` runs every step
(tests marked gpu: skipped; the demo trained 3 steps under ZeRO-1 and ZeRO-3; the
TNT-S bench at batch 2) and writes its summary table."""

from __future__ import annotations

import os
import subprocess

import pytest

pytestmark = pytest.mark.slow  # the GPU check's dry run (training runs): bash .ci/run -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run_runs_every_step(tmp_path, demo_shards):
    # the suite's shards; the script's 480 s budget is for a lent GPU: a slow CPU gets its own
    env = dict(os.environ, OUT=str(tmp_path), SHARDS=os.path.dirname(demo_shards["train"]), GPU_CHECK_BUDGET="850")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = (tmp_path / "gpu_check.md").read_text()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for step in ("machine", "tests_gpu", "bench_eager", "train_zero1", "train_zero3"):
        assert f"| {step} | ok |" in summary, summary
    assert "ZeRO-1 bf16 tiny TNT" in summary and "ZeRO-3 bf16 tiny TNT" in summary
    assert "timm-eager" in summary and "ours-eager" in summary and "ours-triton-eager" in summary


def _dry_run(script: str, timeout: int) -> subprocess.CompletedProcess:
    """``bench/<script> --dry-run`` in this interpreter, from the repository root."""
    import sys

    cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--dry-run"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_scale_bench_dry_run_prints_every_row():
    """bench/scale_bench.py at tiny sizes: every row of every data set, measured or
    projected (and said to be), with the machine named."""
    proc = _dry_run("scale_bench.py", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    assert out.count(": manifest ") == 6 and out.count("plan of one slot") == 3 and out.count("elastic re-plan") == 6
    assert out.count("offsets file (now): manifest") == 3 and out.count("now (one new slot's share)") == 3
    assert out.count("manifest (shard table)") == 1  # the largest set, as shard.py lists 2B samples' shards
    assert out.count("start-up (load and one slot's plan)") == 5
    assert "manifest GETs by the two: 1\n" in out  # one per node: the second rank reads the node's copy
    assert out.count("(projected from") == 2  # the largest set: the inline load and the re-plan, said so


def test_build_bench_dry_run_prints_every_row_beside_the_baseline():
    """bench/build_bench.py at tiny sizes: the simulated listing at both sizes and the real
    tree, each beside the baseline commit's code (extracted from this clone's history),
    the larger size's baseline said to be projected."""
    proc = _dry_run("build_bench.py", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    assert out.count("all of it: now ") == 2 and out.count("listing: now ") == 1
    if "is not in this clone" not in out:  # (a shallow clone lacks the baseline commit)
        assert out.count("| baseline ") == 3 and out.count("(projected from") == 1
    assert out.count("bytes per image") == 2


def test_peer_bench_dry_run_prints_every_row_and_names_the_peers_it_skips():
    """bench/peer_bench.py at tiny sizes: every row for ours and plain WebDataset (both
    always installed), and for each optional peer (the [bench] extra) either its rows or
    its name in the line of skipped peers, never both."""
    proc = _dry_run("peer_bench.py", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("machine: ")
    for row in (
        "1. raw delivery",
        "4. bytes read",
        "2. the DeiT recipe",
        "3. time to the first batch",
        "5. resume",
        "6.",
    ):
        assert row in out, row
    assert out.count("| ours |") == 4 and out.count("| webdataset |") == 4  # rows 1, 2 (twice), 3
    assert "ours: 0 re-read, 0 skipped" in out and "webdataset: no resume" in out
    skipped = next((line for line in out.splitlines() if line.startswith("skipped (not installed")), "")
    for peer in ("streaming", "litdata"):
        assert (f"| {peer} |" in out) != (peer in skipped), peer
