"""Our TNT-S vs timm's ``tnt_s_patch16_224``: forward+backward time, same run.

    .venv/bin/python bench/tnt_bench.py [--batch 8] [--steps 6] [--warmup 2] [--compile]

Same weights (timm's state dict loaded into ours), same batch, same threads
(torch.get_num_threads()), float32, bf16 autocast, and "bf16 module": weights and
activations in bf16 without autocast, which is how DeepSpeed's bf16 engine runs the
model in training (fp32 master weights live in the optimizer). Steps of timm's and
ours alternate (the CPU's speed drifts over minutes on shared machines), and the
median step time of each is printed with the ratio timm/ours (> 1: ours is faster)
and the peak memory of one step above the memory before it (CPU: there is no
allocator peak counter; the process's peak RSS is reset before each model's step).
With --compile also times ``torch.compile`` of ours. Also prints a roofline: the step's
FLOPs (counted by torch's FlopCounterMode) over the best rate this CPU reaches on the
model's largest GEMM, i.e. the fastest a step could possibly be, and so the largest
speed-up over timm that any implementation of the same FLOPs could show.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402

import pipeline.compat  # noqa: E402,F401
from pipeline import tnt  # noqa: E402
from pipeline.kernels import cpu  # noqa: E402


def make_step(model, x, y, precision: str):
    """One forward+backward of ``model`` in ``precision``, as a function."""
    if precision == "bf16-module":
        x = x.bfloat16()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()

    return step


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def peak_growth_mb(step) -> float:
    """Peak resident memory of one step above the resident memory before it (Linux and
    glibc: free memory that malloc keeps for reuse is handed back first, and writing 5
    to /proc/self/clear_refs resets the peak, so each model gets its own)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _rss_mb("VmRSS:")
    step()
    return _rss_mb("VmHWM:") - before


def time_alternating(steps: list, n: int, warmup: int, sync=lambda: None) -> list[float]:
    """Median time of each step function, run in alternation (a, b, a, b, ...) so that
    a machine whose speed drifts over minutes slows all alike. ``sync`` waits for the
    device (GPU steps return before their work ends)."""
    for _ in range(warmup):
        for step in steps:
            step()
    times = [[] for _ in steps]
    for _ in range(n):
        for step, ts in zip(steps, times):
            sync()
            t = time.perf_counter()
            step()
            sync()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def step_flops(model, precision: str) -> float:
    """FLOPs of one forward+backward of ``model`` on one image, counted (not estimated)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x, y = torch.randn(1, 3, 224, 224, dtype=next(model.parameters()).dtype), torch.zeros(1, dtype=torch.long)
    # reference kernels: the flop counter knows aten's matmuls, not oneDNN's linear
    with cpu.reference_kernels(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_rate(dtype: torch.dtype, repeat: int = 20) -> dict[str, float]:
    """Best FLOP/s of this CPU on TNT-S's largest GEMM (outer MLP, 8x197 tokens, 384 x
    1536) in its three forms (forward, grad input, grad weight), through torch's
    matmul (MKL for float32, oneDNN for bf16) and through oneDNN's linear directly:
    the best of all is a ceiling for a step."""
    a, w, g = (torch.randn(*s, dtype=dtype) for s in ((1576, 384), (1536, 384), (1576, 1536)))
    forms = {"matmul": (lambda: a @ w.t(), lambda: g @ w, lambda: g.t() @ a)}
    if cpu.onednn_linear is not None:
        forms["onednn"] = (lambda: cpu.dnn(a, w), lambda: cpu.dnn(g, w.t()), lambda: cpu.dnn(g.t(), a.t()))
    rates = {}
    for name, fns in forms.items():
        best = 0.0
        for f in fns:
            for _ in range(3):
                f()
            t = time.perf_counter()
            for _ in range(repeat):
                f()
            best = max(best, 2 * 1576 * 384 * 1536 * repeat / (time.perf_counter() - t))
        rates[name] = best
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    args = p.parse_args()
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224")
    ours = tnt.create("tntp_s_patch16_224")
    tnt.load_timm_state_dict(ours, ref.state_dict())
    x = torch.randn(args.batch, 3, 224, 224)
    y = torch.randint(0, 1000, (args.batch,))
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, batch "
        f"{args.batch}, fwd+bwd"
    )
    eager = {}
    for precision in ("fp32", "bf16", "bf16-module"):
        pair = (
            (ref, ours)
            if precision != "bf16-module"
            else (copy.deepcopy(ref).bfloat16(), copy.deepcopy(ours).bfloat16())
        )
        steps = [make_step(m, x, y, precision) for m in pair]
        t_ref, t_ours = time_alternating(steps, args.steps, args.warmup)
        m_ref, m_ours = (peak_growth_mb(step) for step in steps)
        eager[precision] = t_ref
        print(
            f"{precision}: timm {t_ref:.3f} s/step   ours {t_ours:.3f} s/step   speed-up {t_ref / t_ours:.2f}x   "
            f"(peak memory of a step: timm {m_ref:.0f} MB, ours {m_ours:.0f} MB)",
            flush=True,
        )
        # Roofline: even if every FLOP ran at the best GEMM rate and nothing else cost
        # time, a step could not be faster than this.
        rates = gemm_rate(torch.float32 if precision == "fp32" else torch.bfloat16)
        rate = max(rates.values())
        f_ref, f_ours = (step_flops(m, precision) * args.batch for m in pair)
        floor = f_ours / rate
        print(
            f"      GEMM ceiling {rate / 1e9:.0f} GFLOP/s "
            f"({', '.join(f'{k} {v / 1e9:.0f}' for k, v in rates.items())}); "
            f"step FLOPs timm {f_ref / 1e9:.0f} G, ours {f_ours / 1e9:.0f} G; "
            f"achieved timm {f_ref / t_ref / 1e9:.0f}, ours {f_ours / t_ours / 1e9:.0f} GFLOP/s; "
            f"ours can be at most {t_ref / floor:.2f}x timm (a step of pure GEMMs at the ceiling: {floor:.3f} s)",
            flush=True,
        )
    # Compiled runs last: inductor's compile workers keep the CPU busy for a while and
    # would slow down any eager measurement taken after them.
    for precision in ("fp32", "bf16") if args.compile else ():
        torch._dynamo.reset()
        step = make_step(torch.compile(ours), x, y, precision)
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        (t_c,) = time_alternating([step], args.steps, args.warmup)
        print(
            f"{precision}: ours compiled {t_c:.3f} s/step   speed-up vs timm eager {eager[precision] / t_c:.2f}x   "
            f"(first step incl. compile {compile_s:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
