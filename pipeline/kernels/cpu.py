"""Our CPU kernels for the TNT model, each measured faster than torch's op it replaces
(``bench/tnt_bench.py``) and each behind a switch with torch's op as the reference path:

* :class:`Linear`: float32 products through oneDNN instead of MKL (``TNTP_ONEDNN_FP32``);
* the C++ kernels in ``csrc/`` (built on first use by :func:`cpu_kernels`): the inner
  attention in one fused pass (:class:`InnerAttention`, ``TNTP_FUSED_INNER``), LayerNorm
  in float32 maths for every dtype (:class:`LayerNorm`, ``TNTP_FUSED_NORM``) and the outer
  attention's softmax with its scale folded in (:class:`ScaledSoftmax`,
  ``TNTP_FUSED_SOFTMAX``).

``KERNELS`` holds the switches (read from the environment at import);
:func:`reference_kernels` turns them all off for a block of code. The model
(:mod:`pipeline.tnt`) decides where each kernel runs (:func:`kernel_on`).
"""

import contextlib
import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from pipeline.compat import clear_stale_build_lock
from pipeline.errors import first_line

# ------------------------------------------------------------------ float32 GEMMs on CPU

# Our own code, measured faster (bench/tnt_bench.py): on CPU, torch runs float32
# matmuls through MKL, which takes slow code paths on AMD processors: on a Zen 5 EPYC,
# TNT-S's outer MLP GEMM (1576x384x1536) takes 8.6 ms through MKL and 4.1 ms through
# oneDNN, in forward and in both backward products alike (the whole TNT-S fp32 step:
# 1.46 -> 0.97 s). torch already uses oneDNN for bf16/fp16 matmuls; for float32 it
# has no switch that keeps IEEE float32 (``torch.backends.mkldnn.matmul.fp32_precision``:
# "ieee" still calls MKL, measured 8.1 ms; "bf16"/"tf32" permit down-conversion), so
# ``Linear`` calls oneDNN's linear itself.
# Off with TNTP_ONEDNN_FP32=0; never used on CUDA, under autocast, or while
# torch.compile traces (inductor does its own GEMM selection).
onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

# Our CPU kernels, each on unless its environment variable is 0 (the inner-attention
# kernel is described below).
KERNELS = {
    "onednn_fp32": onednn_linear is not None and os.environ.get("TNTP_ONEDNN_FP32", "1") != "0",
    "fused_inner": os.environ.get("TNTP_FUSED_INNER", "1") != "0",
    "fused_norm": os.environ.get("TNTP_FUSED_NORM", "1") != "0",
    "fused_softmax": os.environ.get("TNTP_FUSED_SOFTMAX", "1") != "0",
}


@contextlib.contextmanager
def reference_kernels():
    """Run ``Linear`` through ``F.linear`` (MKL), and the inner attention, LayerNorm and
    the outer attention's softmax through torch's ops, instead of our CPU kernels: for
    FLOP counting and comparisons."""
    saved = dict(KERNELS)
    KERNELS.update(dict.fromkeys(KERNELS, False))
    try:
        yield
    finally:
        KERNELS.update(saved)


def dnn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b through oneDNN (2-D x; w may be a transposed view)."""
    return onednn_linear(x, w, b, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x w^T + b with every product through oneDNN, except the weight gradient of
    narrow layers (the inner stream's 24-96 wide ones: oneDNN 2.7 ms vs MKL 0.8 ms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        return dnn(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dnn(g2, weight.t()).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = dnn(g2.t(), x2.t()) if min(weight.shape) >= 64 else g2.t() @ x2
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


# FX (torch.fx, timm's feature extraction): the modules that choose a kernel by device and
# dtype are leaves of the trace, so the traced model keeps the fast paths at run time.
@register_notrace_module
class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same maths) whose float32 CPU products run
    through oneDNN instead of MKL; see the comment above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript compiles nothing inside `if not torch.jit.is_scripting():` (a constant
        # False there; it does compile the right side of an `and`): scripted models take
        # torch's ops.
        if not torch.jit.is_scripting():
            if _onednn_on(x, self.weight):
                return _OneDnnLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _onednn_on(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        KERNELS["onednn_fp32"]
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


# ------------------------------------------------------------- C++ kernels on CPU

# Our own code, measured faster (bench/tnt_bench.py): pipeline/kernels/csrc/inner_attention.cpp,
# a fused CPU kernel for the inner attention (16 pixel tokens per patch, head width 6
# in TNT-S). In eager PyTorch that attention is ~20 small passes over memory per block
# (head layout copies, batched 16x16x6 matmuls at a few % of the GEMM rate, casts, a
# softmax whose vector code idles on 16-wide rows); the kernel does one pass per patch.
# Built with torch's C++ extension loader (g++, as DeepSpeed's JIT ops) the first time
# a CPU forward needs it, ~13 s for all our kernels, cached under ~/.cache/torch_extensions
# per CPU model (they are compiled for the host's instruction set). If they cannot be
# built, one warning and torch's ops are used. Off with TNTP_FUSED_INNER=0; never used on CUDA
# (SDPA's fused kernels) or while torch.compile traces. The same library holds our
# LayerNorm (layer_norm.cpp, see :class:`LayerNorm`) and the outer attention's
# half-precision softmax (softmax.cpp, see :func:`pipeline.tnt.attention`).
MAX_FUSED_TOKENS = MAX_FUSED_HEAD_DIM = 64  # the kernel's static buffers (csrc: kMaxTokens, kMaxHeadDim)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # our kernels compute in float32


def _cpu_description() -> str:
    """The CPU model and its instruction-set flags, for the build's cache key."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = {
                k.strip(): v.strip()
                for k, _, v in (line.partition(":") for line in f)
                if k.strip() in ("model name", "flags")
            }
    except OSError:
        lines = {}
    return "|".join((platform.machine(), lines.get("model name", ""), lines.get("flags", "")))


_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


def _stable_sources(name: str, files: list[str]) -> list[str]:
    """Copies of ``files`` in the build directory of ``name`` (keyed by the sources' content
    and the CPU), written once. torch's loader writes the sources' absolute paths
    into its ninja file, so the same sources at another path (a model's bundled copy of
    ``pipeline/`` pulled from the registry, a fresh clone) rebuilt everything (~26 s);
    from a path that depends only on the content, the existing build is reused."""
    import shutil

    from torch.utils.cpp_extension import _get_build_directory

    src = os.path.join(_get_build_directory(name, verbose=False), "src")
    if not os.path.isdir(src):
        tmp = f"{src}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for f in files:
            shutil.copy2(f, tmp)
        try:
            os.rename(tmp, src)
        except OSError:  # another process put the same copy there first
            shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(src, os.path.basename(f)) for f in files]


def _kernel_sources() -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(_CSRC, "*.cpp")) + glob.glob(os.path.join(_CSRC, "*.h")))


def kernel_build_name() -> str:
    """The build's name: a hash of the CPU and of the sources' content (not their path)."""
    import hashlib

    # -march=native: one build per CPU model, so a cache directory shared by several
    # kinds of machines never hands one a binary it cannot run. The headers are in the
    # key too (torch's loader rehashes the .cpp files only, not the headers they include).
    key = hashlib.sha1(_cpu_description().encode())
    for f in _kernel_sources():
        with open(f, "rb") as fh:
            key.update(fh.read())
    return f"tntp_cpu_kernels_{key.hexdigest()[:10]}"


@functools.cache
def cpu_kernels():
    """The ``torch.ops.tntp`` namespace with our C++ kernels, built on the first call;
    None when they cannot be built (said once, in a warning)."""
    try:
        import logging

        from torch.utils.cpp_extension import load

        files = _kernel_sources()
        name = kernel_build_name()
        clear_stale_build_lock(name)
        logging.getLogger(__name__).info("loading the CPU kernels (built once per machine type and source, ~13 s)")
        load(
            name=name,
            sources=[f for f in _stable_sources(name, files) if f.endswith(".cpp")],
            is_python_module=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fopenmp-simd"],
            extra_ldflags=["-fopenmp"],
        )
        return torch.ops.tntp
    except Exception as e:  # no compiler, no headers...: torch's ops do the same maths
        import warnings

        first = first_line(e, 1000) or type(e).__name__
        warnings.warn(
            f"TNT: the CPU kernels (inner attention, LayerNorm, softmax) could not be built ({first}); "
            "using torch's ops (same results, slower on CPU)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def kernel_on(name: str, x: torch.Tensor) -> bool:
    """Whether our C++ kernel ``name`` (a key of ``KERNELS``) runs on ``x``: switched on,
    a CPU tensor of a dtype our kernels take (float64 keeps torch's ops: they compute in
    float32), not while torch.compile traces, and the kernels built."""
    return (
        KERNELS[name]
        and x.device.type == "cpu"
        and x.dtype in FUSED_DTYPES
        and not torch.compiler.is_compiling()
        and cpu_kernels() is not None
    )


class InnerAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v per patch and head, q/k/v read from the qk and v layers'
    outputs as they are, the result in the layout the projection reads."""

    @staticmethod
    def forward(ctx, qk: torch.Tensor, v: torch.Tensor, heads: int, scale: float):
        out, stats = torch.ops.tntp.inner_attention_fwd(qk, v, heads, scale)
        ctx.save_for_backward(qk, v, out, stats)
        ctx.heads, ctx.scale = heads, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qk, v, out, stats = ctx.saved_tensors
        dqk, dv = torch.ops.tntp.inner_attention_bwd(
            grad, qk, v, out, stats, ctx.heads, ctx.scale
        )  # it makes grad contiguous
        return dqk, dv, None, None


class ScaledSoftmax(torch.autograd.Function):
    """softmax(scale * x) over the last dimension through our C++ kernel (half precision
    on CPU): see :func:`pipeline.tnt.attention`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float):
        y = torch.ops.tntp.scaled_softmax_fwd(x, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.tntp.scaled_softmax_bwd(grad, y, ctx.scale), None  # it casts grad to y's dtype


class _LayerNorm(torch.autograd.Function):
    """LayerNorm through our C++ kernel: maths in float32, output in ``out_dtype``."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
    ):
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        y, mean, rstd = torch.ops.tntp.layer_norm_fwd(x, w, b, eps, out_dtype)
        ctx.save_for_backward(x, w, mean, rstd)
        ctx.param_dtype = weight.dtype if weight is not None else bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.tntp.layer_norm_bwd(grad, x, w, mean, rstd)
        dw = dw.to(ctx.param_dtype) if ctx.needs_input_grad[1] else None
        db = db.to(ctx.param_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


@register_notrace_module  # FX: a leaf, see Linear
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same maths) through our C++ kernel on CPU
    (pipeline/kernels/csrc/layer_norm.cpp).

    Our own code, measured faster (bench/tnt_bench.py): torch's CPU kernels vectorise
    along a row and idle on the inner stream's rows of 12-40 pixel-embedding channels
    (TNT-S, 25088 rows of 24: fwd+bwd 0.9 ms in float32 and 3.4 ms in bf16; ours
    0.45 and 0.8 ms); ours computes in float32 for every dtype. ``feeds_linear``: every
    consumer of the output is a linear layer, so under CPU autocast the output is
    written in the autocast dtype, which is exactly what autocast's cast before each of
    those layers would make of a float32 output (one pass instead of a float32 write
    and one cast per consumer, and the same saved in the backward pass; the gradients
    of several consumers are then summed in the autocast dtype instead of float32).
    Torch's ops on CUDA, while torch.compile traces, in float64, or with
    TNTP_FUSED_NORM=0.
    """

    feeds_linear = False  # set by feeding_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript: torch's op (see Linear)
            if _layer_normkernel_on(self, x):
                out_dtype = x.dtype
                if self.feeds_linear and torch.is_autocast_enabled("cpu"):
                    out_dtype = torch.get_autocast_dtype("cpu")
                return _LayerNorm.apply(x, self.weight, self.bias, self.eps, out_dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _layer_normkernel_on(norm: nn.LayerNorm, x: torch.Tensor) -> bool:
    return len(norm.normalized_shape) == 1 and x.numel() > 0 and kernel_on("fused_norm", x)


def feeding_linear(norm: nn.Module) -> nn.Module:
    """Mark ``norm`` as read by linear layers only (see :class:`LayerNorm`); any other
    norm layer is returned as it is."""
    if isinstance(norm, LayerNorm):
        norm.feeds_linear = True
    return norm
