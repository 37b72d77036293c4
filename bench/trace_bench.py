"""TorchScript and FX forward time next to eager, ours and timm's TNT-S, same run.

    .venv/bin/python bench/trace_bench.py [--batch 8] [--steps 5] [--warmup 2] [--variant tntp_s_patch16_224]

Only to show that making the model scriptable and traceable cost eager nothing and that
the scripted and traced forms run: eager stays the path that training and serving use.
Same weights (timm's loaded into ours), float32, inference (no_grad, eval). The six
forwards run in alternation (the CPU's speed drifts over minutes on shared machines);
each line gives the median time and its ratio to the same model's eager forward
(> 1: slower than eager). A scripted or traced model of ours runs torch's ops wherever
TorchScript compiles (it cannot call our C++ kernels); FX keeps the kernel-choosing
modules (Linear, LayerNorm, Attention) as leaves, so they run as in eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402
import torch  # noqa: E402
from reshard_bench import cpu_name  # noqa: E402
from tnt_bench import time_alternating  # noqa: E402

import pipeline.compat  # noqa: E402,F401
from pipeline import tnt  # noqa: E402


def fx_traced(model: torch.nn.Module) -> torch.nn.Module:
    """FX graph of ``model`` with timm's leaf modules and wrapped functions."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torch.fx import GraphModule, Tracer

    tracer = Tracer(autowrap_functions=tuple(get_notrace_functions()))
    leaves = tuple(get_notrace_modules())
    tracer.is_leaf_module = lambda m, name: isinstance(m, leaves) or Tracer.is_leaf_module(tracer, m, name)
    return GraphModule(model, tracer.trace(model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per forward")
    p.add_argument("--steps", type=int, default=5, help="timed forwards per form (median reported)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed forwards per form first (TorchScript optimises on them)"
    )
    p.add_argument("--variant", default="tntp_s_patch16_224", help="our variant; timm's TNT-S is the other model")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    torch.manual_seed(0)
    ref = timm.create_model("tnt_s_patch16_224").eval()
    ours = tnt.create(args.variant).eval()
    if args.variant in tnt.TIMM_EQUIVALENT:
        tnt.load_timm_state_dict(ours, ref.state_dict())
    size = ours.pixel_embed.img_size
    x = torch.randn(args.batch, 3, *size)
    forms = {}
    for name, model in (("timm", ref), ("ours", ours)):
        xm = x if name == "ours" else torch.randn(args.batch, 3, 224, 224)
        forms[(name, "eager")] = (model, xm)
        forms[(name, "torchscript")] = (torch.jit.script(model), xm)
        forms[(name, "fx")] = (fx_traced(model), xm)

    def forward(m, xm):
        def run():
            with torch.no_grad():
                m(xm)

        return run

    times = time_alternating([forward(m, xm) for m, xm in forms.values()], args.steps, args.warmup)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; "
        f"torch {torch.__version__}, timm {timm.__version__}; batch {args.batch}, float32 forward, eval"
    )
    by_form = dict(zip(forms, times))
    for (name, form), t in by_form.items():
        print(f"{name:5s} {form:12s} {t * 1e3:8.1f} ms   x{t / by_form[(name, 'eager')]:.2f} of {name} eager")
    print(f"ours eager / timm eager: x{by_form[('ours', 'eager')] / by_form[('timm', 'eager')]:.2f}")


if __name__ == "__main__":
    main()
