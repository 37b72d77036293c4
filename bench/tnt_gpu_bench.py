"""TNT-S training throughput and model FLOPs utilisation (MFU): ours vs timm's
``tnt_s_patch16_224``, eager and ``torch.compile``, same run, same weights.

    .venv/bin/python bench/tnt_gpu_bench.py                        # on a GPU: batch 128, bf16 autocast
    .venv/bin/python bench/tnt_gpu_bench.py --no-compile --batch 64
    .venv/bin/python bench/tnt_gpu_bench.py --device cpu --batch 2 --steps 2 --warmup 1 --no-compile   # smoke run

A training step is forward, backward and a fused AdamW step (what the trainer does per
micro-batch, without DeepSpeed). Precision: bf16 autocast with float32 weights (the
paper recipe's mixed precision) or fp32 (TF32 matmuls on GPU). Steps of timm's and
ours alternate, so that clock and thermal drift hit both alike; the median step time
of each is reported as images/s.

MFU = model FLOPs per second / the GPU's peak dense bf16 (or TF32) FLOP/s. Model FLOPs
are timm's TNT-S forward+backward counted by torch's FlopCounterMode (batch 1, on CPU,
times the batch): the same work for both models, so the MFU ratio is the throughput
ratio (ours computes only the class token in the last block, ~5.6% fewer FLOPs, which
counts as our speed, not as extra utilisation). The peak comes from ``--peak-tflops``
or from ``pipeline/mfu.py``'s table of exact device names (dense figures; H100 SXM and
H200: 989 bf16, 495 TF32; H100 PCIe: 756 / 378; NVL: 836 / 418; A100: 312 / 156).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pipeline.compat  # noqa: E402,F401
import timm  # noqa: E402
import torch  # noqa: E402

from pipeline import mfu, tnt  # noqa: E402
from tnt_bench import step_flops, time_alternating  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when present) or cpu")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 128 on GPU, 8 on CPU)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast (default) or fp32/TF32")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model first (and compilation)")
    p.add_argument("--no-compile", action="store_true", help="eager only (compiling both models takes minutes)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense FLOP/s for --precision, in TFLOP/s "
                   "(default: pipeline/mfu.py's table by exact device name; elsewhere MFU is not printed)")
    args = p.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224")
    ours = tnt.create("tntp_s_patch16_224")
    tnt.load_timm_state_dict(ours, ref.state_dict())
    flops = step_flops(ref, "fp32") * batch  # timm's fwd+bwd, counted on CPU before the move
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, timm {timm.__version__}, TNT-S, batch {batch}, {args.precision}, "
          f"fwd+bwd+AdamW; model FLOPs {flops / batch / 1e9:.1f} G per image; peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}", flush=True)

    variants = {"timm eager": ref, "ours eager": ours}
    if not args.no_compile:
        variants.update({"timm compiled": torch.compile(ref), "ours compiled": torch.compile(ours)})
    steps = {k: make_step(m, x, y, args.precision, device) for k, m in variants.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    seconds = dict(zip(steps, time_alternating(list(steps.values()), args.steps, args.warmup, sync)))
    for k, s in seconds.items():
        util = f"   MFU {flops / s / (peak * 1e12):.1%}" if peak else ""
        print(f"{k:14s} {s * 1e3:8.1f} ms/step   {batch / s:8.1f} img/s{util}   "
              f"speed-up vs timm eager {seconds['timm eager'] / s:.2f}x", flush=True)
    if device.type == "cuda":
        print(f"peak GPU memory (all variants): {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
