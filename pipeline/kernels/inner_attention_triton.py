"""TNT's inner attention as fused Triton kernels (forward and backward) for CUDA.

The inner transformer attends over the 16 pixel tokens of each patch: TNT-S runs batch
x 196 sequences of 16 tokens with 4 heads 6 wide (TNT-B: 10 wide). In eager PyTorch
that is a head-layout copy, three batched matmuls, a float32 softmax and casts per
block: each a kernel launch and a round trip through HBM for a few KB of work per
sequence, and FlashAttention/SDPA do not fit it (head widths must be multiples of 8,
tiles of 64-128 tokens: ~300x the needed tensor-core work; Flash Window Attention,
arXiv 2501.06480, makes the same case for many short sequences). Here one program
takes ``BLOCK_S`` whole sequences of one head: q, k and v are read straight from the
qk and v layers' outputs (no head-layout copy), the 16x16 scores, their float32
softmax and the output stay in registers, and the output is written in the layout the
projection reads. The backward pass recomputes the probabilities from q and k (nothing
but q, k and v is saved: no N x N matrix in memory) and writes dq and dk into one
tensor laid out like the qk layer's output.

Layouts (contiguous): ``qk`` (S, N, 2C) with q of head h at ``[..., h*D:(h+1)*D]`` and
k at ``[..., C + h*D: C + (h+1)*D]``; ``v`` and the output (S, N, C); C = heads x D.
Any N and D up to 64, padded inside the kernel to powers of two of at least 16 (the
smallest ``tl.dot`` on tensor cores). float32 inputs multiply in IEEE float32, bf16/fp16
ones on tensor cores with float32 accumulation; the softmax is float32 throughout. Under
the interpreter 16-bit products are taken in float32 (see :func:`_dot`), so there the
bf16 checks cover loads, stores and every rounding to bf16, not tensor-core products.

The ops are registered with ``torch.library`` (``torch.ops.tntp_triton``), so autograd
and ``torch.compile`` see one opaque op each way (no graph break). Off the GPU, Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported) runs the same
kernels on CPU tensors: the tests check them there against the reference path.
Speed is measured only on a GPU (``bench/tnt_gpu_bench.py``); the choice of
``BLOCK_S`` and of one program per head (rather than all heads of a patch) is unmeasured.
"""

import os

import torch
import triton
import triton.language as tl

MAX_TOKENS = MAX_HEAD_DIM = 64  # registers: BLOCK_S x 64 x 64 float32 scores would spill


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@triton.jit
def _load_qkv(
    QK,
    V,
    s0,
    h,
    n_seq,
    N: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """q, k, v of sequences s0.. s0+BLOCK_S, head h, as (BLOCK_S, N_PAD, D_PAD) blocks (zeros
    where padded), and the row offsets and mask to store results with."""
    C: tl.constexpr = H * D
    s = s0 + tl.arange(0, BLOCK_S)
    t = tl.arange(0, N_PAD)
    d = tl.arange(0, D_PAD)
    row = s[:, None, None] * N + t[None, :, None]
    mask = (s[:, None, None] < n_seq) & (t[None, :, None] < N) & (d[None, None, :] < D)
    col = h * D + d[None, None, :]
    q = tl.load(QK + row * (2 * C) + col, mask=mask, other=0.0)
    k = tl.load(QK + row * (2 * C) + C + col, mask=mask, other=0.0)
    v = tl.load(V + row * C + col, mask=mask, other=0.0)
    return q, k, v, row, col, mask


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Batched a @ b with float32 accumulation. ``UPCAST`` (Triton's interpreter only): the
    operands in float32 first: the interpreter's ``tl.dot`` misreads bf16 operands (a
    16x16 bf16 product came out 2e10 off, triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _probabilities(q, k, scale, N: tl.constexpr, N_PAD: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """softmax(q k^T * scale) over the keys, float32, padded keys at probability 0."""
    scores = _dot(q, tl.permute(k, (0, 2, 1)), PRECISION, UPCAST) * scale
    keys = tl.arange(0, N_PAD)
    scores = tl.where(keys[None, None, :] < N, scores, float("-inf"))
    p = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
    return p / tl.sum(p, axis=2)[:, :, None]


@triton.jit
def _forward_kernel(
    QK,
    V,
    O,
    n_seq,
    scale,
    N: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    s0 = tl.program_id(0) * BLOCK_S
    h = tl.program_id(1)
    q, k, v, row, col, mask = _load_qkv(QK, V, s0, h, n_seq, N, H, D, BLOCK_S, N_PAD, D_PAD)
    p = _probabilities(q, k, scale, N, N_PAD, PRECISION, UPCAST)
    out = _dot(p.to(v.dtype), v, PRECISION, UPCAST)
    tl.store(O + row * (H * D) + col, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    GO,
    QK,
    V,
    DQK,
    DV,
    n_seq,
    scale,
    N: tl.constexpr,
    H: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    N_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    C: tl.constexpr = H * D
    s0 = tl.program_id(0) * BLOCK_S
    h = tl.program_id(1)
    q, k, v, row, col, mask = _load_qkv(QK, V, s0, h, n_seq, N, H, D, BLOCK_S, N_PAD, D_PAD)
    go = tl.load(GO + row * C + col, mask=mask, other=0.0)
    p = _probabilities(q, k, scale, N, N_PAD, PRECISION, UPCAST)  # recomputed, never stored
    dv = _dot(tl.permute(p.to(go.dtype), (0, 2, 1)), go, PRECISION, UPCAST)
    dp = _dot(go, tl.permute(v, (0, 2, 1)), PRECISION, UPCAST)
    # softmax backward: dS = P * (dP - rowsum(P * dP))
    ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])
    dq = _dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale
    dk = _dot(tl.permute(ds, (0, 2, 1)).to(q.dtype), q, PRECISION, UPCAST) * scale
    tl.store(DQK + row * (2 * C) + col, dq.to(DQK.dtype.element_ty), mask=mask)
    tl.store(DQK + row * (2 * C) + C + col, dk.to(DQK.dtype.element_ty), mask=mask)
    tl.store(DV + row * C + col, dv.to(DV.dtype.element_ty), mask=mask)


def _launch(kernel, tensors, qk: torch.Tensor, heads: int, scale: float, block_s: int | None) -> None:
    n_seq, n, c2 = qk.shape
    d = c2 // 2 // heads
    if n > MAX_TOKENS or d > MAX_HEAD_DIM:
        raise ValueError(
            f"inner attention kernel: at most {MAX_TOKENS} tokens and heads {MAX_HEAD_DIM} wide, "
            f"not {n} tokens of width {d}"
        )
    # interpreter: fewer, larger programs (each is a Python-level loop iteration)
    block_s = block_s or (64 if _interpreted() else 16)
    precision = "ieee" if qk.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    grid = (triton.cdiv(n_seq, block_s), heads)
    kernel[grid](
        *tensors,
        n_seq,
        scale,
        N=n,
        H=heads,
        D=d,
        BLOCK_S=block_s,
        N_PAD=_pad(n),
        D_PAD=_pad(d),
        PRECISION=precision,
        UPCAST=_interpreted(),
    )


@torch.library.custom_op("tntp_triton::inner_attention", mutates_args=())
def inner_attention(qk: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per sequence and head; (S, N, 2C), (S, N, C) -> (S, N, C)."""
    qk, v = qk.contiguous(), v.contiguous()
    out = torch.empty_like(v)
    _launch(_forward_kernel, (qk, v, out), qk, heads, scale, None)
    return out


@inner_attention.register_fake
def _(qk, v, heads, scale):
    return torch.empty_like(v)


@torch.library.custom_op("tntp_triton::inner_attention_backward", mutates_args=())
def inner_attention_backward(
    grad: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, heads: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d qk, d v) of :func:`inner_attention` for the output gradient ``grad``."""
    grad, qk, v = grad.contiguous(), qk.contiguous(), v.contiguous()
    dqk, dv = torch.empty_like(qk), torch.empty_like(v)
    _launch(_backward_kernel, (grad, qk, v, dqk, dv), qk, heads, scale, None)
    return dqk, dv


@inner_attention_backward.register_fake
def _(grad, qk, v, heads, scale):
    return torch.empty_like(qk), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    qk, v, heads, scale = inputs
    ctx.save_for_backward(qk, v)
    ctx.heads, ctx.scale = heads, scale


def _backward(ctx, grad):
    qk, v = ctx.saved_tensors
    dqk, dv = inner_attention_backward(grad, qk, v, ctx.heads, ctx.scale)
    return dqk, dv, None, None


inner_attention.register_autograd(_backward, setup_context=_setup_context)


def reference(qk: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """The same maths in torch's ops, float32 (the self-check's and the tests' reference)."""
    S, N, C = v.shape
    q, k = qk.float().view(S, N, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
    v = v.float().view(S, N, heads, C // heads).transpose(1, 2)
    attn = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(S, N, C)


# Self-check tolerances against the float32 reference: float32 products are IEEE (measured
# under the interpreter: 7e-7); bf16 rounds q, k, v, the probabilities and the output to
# 8 bits of mantissa (the interpreter: 0.013-0.025 on unit-normal inputs, the torch bf16
# path's own error is of the same size), so 0.1 catches a wrong kernel, not rounding.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.1}


def self_check(device: torch.device, heads: int, head_dim: int, tokens: int) -> str:
    """'' if the kernels give the reference's output and gradients on ``device`` for these
    shapes (37 sequences: not a multiple of the block), in float32 and bf16; else why not."""
    g = torch.Generator().manual_seed(0)
    C = heads * head_dim
    scale = head_dim**-0.5
    for dtype, tol in TOLERANCE.items():
        qk = torch.randn(37, tokens, 2 * C, generator=g)
        v = torch.randn(37, tokens, C, generator=g)
        grad = torch.randn(37, tokens, C, generator=g)
        qk_ref, v_ref = qk.clone().requires_grad_(), v.clone().requires_grad_()
        reference(qk_ref, v_ref, heads, scale).backward(grad)
        qk_k = qk.to(device, dtype, copy=True).requires_grad_()
        v_k = v.to(device, dtype, copy=True).requires_grad_()
        out = inner_attention(qk_k, v_k, heads, scale)
        out.backward(grad.to(device, dtype))
        for name, got, want in (
            ("output", out, reference(qk, v, heads, scale)),
            ("d qk", qk_k.grad, qk_ref.grad),
            ("d v", v_k.grad, v_ref.grad),
        ):
            err = (got.detach().float().cpu() - want).abs().max().item()
            if not err <= tol:  # also catches NaN
                return (
                    f"{name} in {str(dtype).removeprefix('torch.')} is {err:.3g} off the reference (tolerance {tol:g})"
                )
    return ""
