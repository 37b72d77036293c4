"""TNT training throughput, MFU and peak memory: ours (eager, compiled, with the Triton
inner attention) vs timm's TNT and timm's DeiT-S, same run, same weights.

    .venv/bin/python bench/tnt_gpu_bench.py           # on a GPU: TNT-S, batch 128 and 256, bf16 autocast
    .venv/bin/python bench/tnt_gpu_bench.py --variant b --batch 128 256 512 --rows ours-triton-compiled
    .venv/bin/python bench/tnt_gpu_bench.py --no-compile --batch 64
    .venv/bin/python bench/tnt_gpu_bench.py --device cpu --batch 2 --steps 1 --warmup 1 --no-compile   # smoke run

Rows (``--rows``, default all; ``--no-compile`` keeps the eager ones):

* ``timm-eager``, ``timm-compiled``: timm's ``tnt_{s,b}_patch16_224``;
* ``ours-eager``, ``ours-compiled``: ours with torch's inner attention;
* ``ours-triton-eager``, ``ours-triton-compiled``: ours with the Triton inner attention
  (``model.inner_kernel=triton``: pipeline/kernels/inner_attention_triton.py; CUDA only,
  the row is skipped with its reason elsewhere or if the kernel's self-check fails);
* ``deit-compiled``: timm's ``deit_{small,base}_patch16_224``: a ViT of the same size
  without an inner transformer, the bar TNT's inner stream keeps it from.

A training step is forward, backward and a fused AdamW step (what the trainer does per
micro-batch, without DeepSpeed). Precision: bf16 autocast with float32 weights (the
paper recipe's mixed precision) or fp32 (TF32 matmuls on GPU). Steps of all rows
alternate, so that clock and thermal drift hit all alike; the median step time of each
is reported as images/s. Peak memory: each row's own step after a reset of the CUDA
allocator's peak. ``--compile-mode``: torch.compile's mode for the compiled rows
(``reduce-overhead``: CUDA graphs).

MFU = model FLOPs per second / the GPU's peak dense bf16 (or TF32) FLOP/s. Model FLOPs
of the TNT rows are timm's TNT forward+backward counted by torch's FlopCounterMode
(batch 1, on CPU, times the batch): the same work for all TNT rows, so their MFU ratio
is their throughput ratio (ours computes only the class token in the last block, ~5.6%
fewer FLOPs, which counts as our speed); DeiT's row uses DeiT's own count. The peak comes
from ``--peak-tflops`` or from ``pipeline/mfu.py``'s table of exact device names (dense
figures; H100 SXM and H200: 989 bf16, 495 TF32; H100 PCIe: 756 / 378; A100: 312 / 156).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
from tnt_bench import step_flops, time_alternating  # noqa: E402

import pipeline.compat  # noqa: E402,F401
from pipeline import mfu, tnt  # noqa: E402

ROWS = (
    "timm-eager",
    "timm-compiled",
    "ours-eager",
    "ours-compiled",
    "ours-triton-eager",
    "ours-triton-compiled",
    "deit-compiled",
)
MODELS = {
    "s": ("tnt_s_patch16_224", "tntp_s_patch16_224", "deit_small_patch16_224"),
    "b": ("tnt_b_patch16_224", "tntp_b_patch16_224", "deit_base_patch16_224"),
}


def peak_tflops(device: torch.device, precision: str, given: float | None) -> float | None:
    """--peak-tflops, else the exact device name in pipeline/mfu.py's table (the trainer's)."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    return mfu.peak_tflops(torch.cuda.get_device_name(device), mfu.matmul_precision(precision, True))


def make_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, device: torch.device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_rows(names: list[str], args, device: torch.device) -> tuple[dict, dict]:
    """{row: model on device} and {row: model FLOPs per image}; rows that cannot run here
    are printed as skipped with their reason."""
    timm_name, ours_name, deit_name = MODELS[args.variant]
    torch.manual_seed(0)
    ref = timm.create_model(timm_name)
    ours = tnt.create(ours_name)
    tnt.load_timm_state_dict(ours, ref.state_dict())
    tnt_flops = step_flops(ref, "fp32")  # timm's fwd+bwd per image, counted on CPU before the move
    models, flops = {}, {}
    compile_kw = {} if args.compile_mode == "default" else {"mode": args.compile_mode}
    for name in names:
        family, _, form = name.rpartition("-")
        if family == "timm":
            model = ref
        elif family == "ours":
            model = ours
        elif family == "ours-triton":
            model = copy.deepcopy(ours)
            try:
                path, why = tnt.select_inner_kernel("triton", device, model)
            except ValueError as e:
                print(f"{name:22s} skipped: {e}", flush=True)
                continue
        else:
            model = timm.create_model(deit_name)
        flops[name] = step_flops(model, "fp32") if family == "deit" else tnt_flops
        model = model.to(device)
        models[name] = torch.compile(model, **compile_kw) if form == "compiled" else model
    return models, flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when present) or cpu"
    )
    p.add_argument(
        "--variant", choices=tuple(MODELS), default="s", help="TNT-S (default) or TNT-B, and DeiT-S or DeiT-B"
    )
    p.add_argument(
        "--batch",
        type=int,
        nargs="+",
        default=None,
        help="images per step, one measurement per value (default: 128 256 on GPU, 8 on CPU)",
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default: all of {', '.join(ROWS)})")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast (default) or fp32/TF32")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per row first (and compilation)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only (compiling takes minutes)")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak dense FLOP/s for --precision, in TFLOP/s "
        "(default: pipeline/mfu.py's table by exact device name; elsewhere MFU is not printed)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    names = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.no_compile:
        names = [n for n in names if not n.endswith("compiled")]
    batches = args.batch or ([128, 256] if device.type == "cuda" else [8])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    models, flops = build_rows(names, args, device)
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, timm {timm.__version__}, TNT-{args.variant.upper()}, {args.precision}, "
        f"fwd+bwd+AdamW; model FLOPs per image: "
        + ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in flops.items())
        + f"; peak {f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}; compile mode {args.compile_mode}",
        flush=True,
    )
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        steps = {k: make_step(m, x, y, args.precision, device) for k, m in models.items()}
        memory = {}
        for k, step in list(steps.items()):  # each row's own peak; also its first (compiling) step
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                step()
                sync()
            except torch.OutOfMemoryError:
                print(f"batch {batch}: {k} out of memory", flush=True)
                del steps[k]
                continue
            memory[k] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        seconds = dict(zip(steps, time_alternating(list(steps.values()), args.steps, args.warmup, sync)))
        base = seconds.get("timm-eager")
        for k, s in seconds.items():
            util = f"   MFU {flops[k] * batch / s / (peak * 1e12):.1%}" if peak else ""
            vs = f"   x{base / s:.2f} timm eager" if base else ""
            vs += f"   x{seconds['timm-compiled'] / s:.2f} timm compiled" if "timm-compiled" in seconds else ""
            vs += f"   x{seconds['deit-compiled'] / s:.2f} DeiT compiled" if "deit-compiled" in seconds else ""
            print(
                f"batch {batch:4d}  {k:22s} {s * 1e3:8.1f} ms/step   {batch / s:8.1f} img/s{util}   "
                f"peak {memory[k]:.1f} GiB{vs}",
                flush=True,
            )


if __name__ == "__main__":
    main()
