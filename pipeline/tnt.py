"""Transformer iN Transformer (TNT, Han et al. 2021, arXiv 2103.00112).

An outer transformer runs over the patch embeddings (16x16 patches + class token);
in every block an inner transformer runs over the "pixel" (visual word) embeddings
inside each patch: a per-patch 7x7 stride-4 convolution (padding 3) turns a 16x16
patch into 4x4 = 16 embeddings of width c. After the inner block the 16 pixel
embeddings of each patch are flattened (Vec), layer-normed, projected to the outer
width d, normed again and added to that patch's embedding (never to the class
token). Patch position encodings are learned per patch, pixel position encodings
are shared by all patches. Optional SE channel attention on the outer MLP output is
the paper's "operational optimisation" (official code: ``tmp + se(tmp)``).

Weights: parameter names and shapes are exactly those of timm's non-legacy
``timm.models.tnt.TNT`` (timm >= 1.0), so a timm state dict loads as-is
(:func:`load_timm_state_dict`, which also accepts the official repository's key
names through timm's own filter) and :func:`to_timm_state_dict` is what timm loads.

Differences from timm's implementation (same maths, tolerance 1e-5 in float32):

* attention uses ``F.scaled_dot_product_attention`` (fused kernels: no materialised
  softmax matrix to store for backward) instead of ``q @ k.T -> softmax -> @ v``
  where it suits the shapes (:func:`attention_path`: not for the inner attention's
  6-wide heads on CUDA);
* patches are cut with a view/permute instead of ``nn.Unfold`` (im2col);
* the pixel->patch projection is added to the patch tokens with one padded add
  instead of slicing + ``torch.cat`` of the class token;
* with class-token pooling, ``forward`` computes only the class token in the last
  block (timm computes all tokens and keeps one);
* on CPU, our kernels (:mod:`pipeline.kernels.cpu`; torch's ops where they cannot be
  built or are switched off): float32 linear layers through oneDNN instead of MKL, the
  inner attention in one fused C++ pass, LayerNorm in float32 maths for every dtype
  (writing the autocast dtype when only linear layers read it), and the outer
  attention's softmax with the scale folded in, in half precision; on CUDA, the Triton
  inner attention (:mod:`pipeline.kernels.inner_attention_triton`) once it passes its
  self-check (:func:`select_inner_kernel`);
* the inner stream is kept contiguous (timm's is a transposed view throughout);
* optional activation checkpointing per block (``set_grad_checkpointing``).

No parameter is created outside ``__init__`` and nothing writes into a parameter in
place, so DeepSpeed ZeRO-3 can partition the model; every parameter is used through
the module that owns it (ZeRO-3 gathers parameters per module call).

Counting (:func:`count_params`, :func:`count_flops`): the paper's "FLOPs" are
multiply-accumulates (MACs), the convention of the DeiT/TNT papers; ``count_flops``
measures FLOPs with ``torch.utils.flop_counter`` and reports MACs = FLOPs / 2 next to
it. The official code has a registered but unused ``outer_tokens`` buffer and no
parameters beyond ours; the 23.8M of the paper is matched without it.
"""

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.layers import DropPath, register_notrace_module, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from pipeline.errors import summary
from pipeline.kernels.cpu import (
    FUSED_DTYPES,
    MAX_FUSED_HEAD_DIM,
    MAX_FUSED_TOKENS,
    InnerAttention,
    LayerNorm,
    Linear,
    ScaledSoftmax,
    feeding_linear,
    kernel_on,
    reference_kernels,
)
from pipeline.variants import TIMM_EQUIVALENT, VARIANTS  # noqa: F401 (TIMM_EQUIVALENT: re-exported)

__all__ = [
    "TNT",
    "VARIANTS",
    "create",
    "load_timm_state_dict",
    "to_timm_state_dict",
    "param_groups",
    "count_params",
    "count_flops",
]


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> act -> drop -> fc2 -> drop, same parameter names) on ``Linear``."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


# ------------------------------------------------------------------------------ model


@register_notrace_module  # FX: a leaf, see Linear
class Attention(nn.Module):
    """Multi-head self-attention with timm's TNT parameter layout (qk, v, proj)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_cpu: bool = False,
    ):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.fused_cpu = fused_cpu  # short sequences: our CPU kernel (see InnerAttention)
        # the Triton kernel (CUDA), set by select_inner_kernel() after its self-check
        self.use_triton = False
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk = Linear(dim, dim * 2, bias=qkv_bias)
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attention over all of ``x``; with ``queries=n`` only the first n tokens attend
        (the output has n tokens: the last block of a class-token model needs one)."""
        B, N, C = x.shape
        qk, v = self.qk(x), self.v(x)
        if not torch.jit.is_scripting():  # TorchScript: torch's ops (see Linear)
            kernel = self._kernel(qk, v, queries)
            if kernel == "cpu":
                x = InnerAttention.apply(qk.contiguous(), v.contiguous(), self.num_heads, self.head_dim**-0.5)
                return self.proj_drop(self.proj(x))
            if kernel == "triton":
                x = torch.ops.tntp_triton.inner_attention(qk, v, self.num_heads, self.head_dim**-0.5)
                return self.proj_drop(self.proj(x))
        qk = qk.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if queries is not None:
            q = q[:, :, :queries]
            N = queries
        dropout_p = self.attn_drop if self.training else 0.0
        if torch.jit.is_scripting():  # TorchScript: the explicit form (no custom kernels)
            x = attention_explicit(q, k, v, dropout_p)
        else:
            x = attention(q, k, v, dropout_p)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def _kernel(self, qk: torch.Tensor, v: torch.Tensor, queries: int | None) -> str:
        """ "cpu" (our C++ kernel), "triton" (the CUDA kernel, once selected) or "" (torch's ops)."""
        if not (
            self.fused_cpu
            and qk.dtype == v.dtype
            and queries is None
            and not (self.training and self.attn_drop > 0)  # neither kernel has dropout (the paper's recipe: 0)
            and v.shape[1] <= MAX_FUSED_TOKENS
            and self.head_dim <= MAX_FUSED_HEAD_DIM
        ):
            return ""
        if self.use_triton and (v.is_cuda or _triton_interpreted()) and v.dtype in FUSED_DTYPES:
            return "triton"
        return "cpu" if kernel_on("fused_inner", v) else ""


def _triton_interpreted() -> bool:
    """Triton's CPU interpreter is on (tests): the Triton kernel then runs on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _auto_uses_triton(device: torch.device) -> bool:
    """Whether ``inner_kernel="auto"`` tries the Triton kernel on ``device``: CUDA only (the
    CPU keeps its C++ kernel; the tests stand in a CPU for a GPU by replacing this)."""
    return device.type == "cuda"


def select_inner_kernel(mode: str, device: torch.device, model: nn.Module) -> tuple[str, str]:
    """Choose the inner attention's kernel for ``model`` on ``device``: ``mode`` "auto"
    (the Triton kernel on CUDA if it passes its self-check on the model's shapes, else
    torch's path), "triton" (the kernel, or ValueError saying why not) or "torch". Returns
    (the path, why); the caller logs it. Sets ``use_triton`` on the model's inner
    attention modules."""
    inner = [m for m in model.modules() if isinstance(m, Attention) and m.fused_cpu]
    for m in inner:
        m.use_triton = False
    if mode == "torch":
        return "torch", "model.inner_kernel=torch"
    if mode == "auto" and not _auto_uses_triton(device):
        return "torch", f"{device.type}: the Triton kernel is for CUDA"
    if mode == "triton" and device.type != "cuda" and not _triton_interpreted():
        raise ValueError(f"model.inner_kernel=triton needs a CUDA device, not {device.type} (auto or torch elsewhere)")
    heads, head_dim = inner[0].num_heads, inner[0].head_dim
    tokens = model.pixel_embed.new_patch_size[0] * model.pixel_embed.new_patch_size[1]
    try:
        from pipeline.kernels import inner_attention_triton

        problem = inner_attention_triton.self_check(device, heads, head_dim, tokens)
    except Exception as e:  # no triton, no compiler, a kernel that does not build...
        problem = summary(e, 1000)
    if problem:
        if mode == "triton":
            raise ValueError(f"model.inner_kernel=triton: the kernel's self-check failed ({problem})")
        return "torch", f"the Triton kernel's self-check failed ({problem}); using torch's path"
    for m in inner:
        m.use_triton = True
    return "triton", f"self-check passed ({heads} heads x {head_dim}, {tokens} tokens)"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v: the fused kernel, except where it was measured slower.

    The path is :func:`attention_path`'s. On CUDA: SDPA for the outer attention, the explicit
    form for the inner one. In float32 on CPU, ``F.scaled_dot_product_attention``. On a 2-core Xeon
    (AVX-512/AMX) the CPU flash kernel took fwd+bwd of the inner attention of TNT-S
    (1568x4 heads x 16 tokens x 6) in 10.5 ms vs 31.7 ms for the explicit form; on a
    2-core AMD EPYC (Zen 5) the explicit form is faster alone (7.9 vs 11.9 ms) but the
    difference was inside run-to-run noise in the whole model. In bf16/fp16
    on CPU the flash kernel is 2-3x slower (inner: 28.3 vs 10.9 ms), so half precision
    on CPU takes the explicit form, with the softmax of rows shorter than 32 (the inner
    attention's 16 tokens) in float32: the half-precision softmax kernels vectorise
    along a row and fall back to scalar code for short ones (inner fwd+bwd 10.9 ->
    7.2 ms, TNT-S bf16 step 0.66 -> 0.58 s), and the float32 softmax is also the more
    accurate one (script: bench/tnt_bench.py, see bench/README.md). With our CPU
    kernels built, the softmax is ours (:class:`ScaledSoftmax`: float32 maths, the
    scale applied as the scores are read instead of a pass over q, fwd+bwd+scale of
    TNT-S's outer attention 12.0 -> 8.7 ms a step); TNTP_FUSED_SOFTMAX=0 turns it off.
    """
    path = attention_path(q.device.type, q.dtype, q.shape[-1], q.shape[0])
    if path == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if path == "cpu_half" and kernel_on("fused_softmax", q):
        attn = ScaledSoftmax.apply(q @ k.transpose(-2, -1), q.shape[-1] ** -0.5)
        return F.dropout(attn, dropout_p) @ v
    if q.is_cuda and q.shape[-2] < 32 and q.dtype != torch.float32:
        # CUDA, short rows in 16 bits: the scores straight into float32 (bf16 values are
        # exact in TF32) instead of rounding them to bf16 and converting. On an H200 the
        # bf16 scores left a max error of 0.023 against a float32 reference (test_gpu.py).
        # Cost, not timed: q and k are read once more to convert them (each 6/16 the size of
        # the scores at 16 tokens); the scores' bf16 write and conversion pass are gone.
        with torch.autocast("cuda", enabled=False):
            attn = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
        return F.dropout(attn.softmax(dim=-1).to(q.dtype), dropout_p) @ v
    return attention_explicit(q, k, v, dropout_p)


def attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """q·kᵀ scaled, softmax, ·v as batched matmuls: :func:`attention`'s ``"explicit"`` path,
    and the only one in TorchScript."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    # float32 softmax for short rows (CPU: see attention(); the inner attention's 16 tokens,
    # where the exponentials' rounding in bf16 would be the largest error)
    if attn.shape[-1] < 32:
        attn = attn.float().softmax(dim=-1).to(q.dtype)
    else:
        attn = attn.softmax(dim=-1)
    return F.dropout(attn, dropout_p) @ v


# SDPA on CUDA only for heads at least this wide. FlashAttention pads narrower heads and
# runs 128x128 tiles, so TNT's inner attention (16 tokens x 4 heads x 6 dims) would do
# ~300x the tensor-core work it needs; three batched matmuls and a softmax suit it.
_SDPA_MIN_HEAD_DIM = 32
# SDPA's fused CUDA kernels have launched the batch along a grid axis of at most 65,535
# blocks ("invalid configuration argument", pytorch issue 146704): the inner attention's
# batch is micro-batch x 196 patches, past the limit from micro-batch 335 on.
_CUDA_GRID_MAX = 65535


def attention_path(device_type: str, dtype: torch.dtype, head_dim: int, batch: int) -> str:
    """Which form :func:`attention` computes with, for q of shape (batch, heads, N, head_dim):

    * ``"sdpa"``: ``F.scaled_dot_product_attention`` (CUDA with heads >= 32 wide and a
      batch within the kernels' grid; CPU in float32);
    * ``"explicit"``: q·kᵀ scaled, softmax in float32 for rows shorter than 32, ·v as
      batched matmuls (CUDA: narrow heads or a huge batch; any other device);
    * ``"cpu_half"``: half precision on CPU, our softmax kernel when built, else explicit.
    """
    if device_type == "cpu":
        return "sdpa" if dtype == torch.float32 else "cpu_half"
    if device_type == "cuda":
        return "sdpa" if head_dim >= _SDPA_MIN_HEAD_DIM and batch <= _CUDA_GRID_MAX else "explicit"
    return "explicit"


class SE(nn.Module):
    """Channel attention over the patch tokens, as in the official TNT code (SE(d, 0.25))."""

    def __init__(self, dim: int, hidden_ratio: float = 0.25):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.fc = nn.Sequential(nn.LayerNorm(dim), Linear(dim, hidden), nn.ReLU(), Linear(hidden, dim), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1, keepdim=True))


class Block(nn.Module):
    """One TNT block: inner transformer over pixels, projection into patches, outer transformer."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_pixel: int,
        num_heads_in: int = 4,
        num_heads_out: int = 6,
        mlp_ratio: float = 4.0,
        mlp_ratio_in: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        se: bool = False,
        norm_layer=LayerNorm,
        act_layer=nn.GELU,
    ):
        super().__init__()
        self.norm_in = feeding_linear(norm_layer(dim))
        self.attn_in = Attention(dim, num_heads_in, qkv_bias, attn_drop, proj_drop, fused_cpu=True)
        self.norm_mlp_in = feeding_linear(norm_layer(dim))
        self.mlp_in = Mlp(dim, int(dim * mlp_ratio_in), act_layer, proj_drop)
        self.norm1_proj = feeding_linear(norm_layer(dim * num_pixel))
        self.proj = Linear(dim * num_pixel, dim_out, bias=False)
        self.norm2_proj = norm_layer(dim_out)
        self.norm_out = feeding_linear(norm_layer(dim_out))
        self.attn_out = Attention(dim_out, num_heads_out, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm_mlp = feeding_linear(norm_layer(dim_out))
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio), act_layer, proj_drop)
        self.se_layer = SE(dim_out) if se else None

    def forward(self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor, cls_only: bool = False):
        """Returns the new (pixel, patch) embeddings. ``cls_only``: the caller needs only
        the class token out of this block (the last block of a class-token model), so
        the outer attention has one query and the outer MLP one row (the SE variant
        pools over all tokens and keeps the full MLP); the inner stream is still needed
        (it feeds the keys and values) and its output is returned as usual."""
        pixel_embed = pixel_embed + self.drop_path(self.attn_in(self.norm_in(pixel_embed)))
        pixel_embed = pixel_embed + self.drop_path(self.mlp_in(self.norm_mlp_in(pixel_embed)))
        B, N, _ = patch_embed.shape
        inner = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, N - 1, -1))))
        patch_embed = patch_embed + F.pad(inner, (0, 0, 1, 0))  # zero row: class token gets nothing
        if cls_only and self.se_layer is None:
            cls = patch_embed[:, :1] + self.drop_path(self.attn_out(self.norm_out(patch_embed), queries=1))
            return pixel_embed, cls + self.drop_path(self.mlp(self.norm_mlp(cls)))
        patch_embed = patch_embed + self.drop_path(self.attn_out(self.norm_out(patch_embed)))
        y = self.mlp(self.norm_mlp(patch_embed))
        if self.se_layer is not None:
            y = y + self.se_layer(y)
        return pixel_embed, patch_embed + self.drop_path(y)


class PixelEmbed(nn.Module):
    """Cut the image into patches and embed each patch as (patch/stride)^2 pixel tokens.

    ``conv="patch"`` (the paper, timm): the 7x7 convolution runs on each patch alone,
    zero-padded, so a pixel token at a patch border sees nothing across the border.
    ``conv="image"``: one convolution over the whole image, whose output is then cut
    into the same per-patch grids, so border tokens see their neighbours in the next
    patch, as in a convolutional stem (PyramidTNT's, arXiv 2201.00978, also runs over the
    whole image). Same parameters, shapes and cost. The values differ for every token
    whose 7x7 window crosses a patch border (15 of the 16 of an 8x8 patch at stride 2):
    timm's TNT loads these weights but computes something else with them, hence a
    variant name of its own. On the demo's 4,000 digits (one process, 16 epochs) it
    measured 96.4% and 95.6% top-1 (two seeds) against 93.9-95.5% for ``patch`` (five
    runs).
    """

    def __init__(
        self, img_size=224, patch_size=16, in_chans: int = 3, in_dim: int = 24, stride: int = 4, conv: str = "patch"
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.new_patch_size = [math.ceil(p / stride) for p in self.patch_size]
        if conv not in ("patch", "image"):
            raise ValueError(f"pixel_conv={conv!r}: 'patch' (per patch, the paper's) or 'image' (whole image)")
        if conv == "image" and any(p % stride for p in self.patch_size):
            raise ValueError(
                f"pixel_conv='image' needs the patch size ({patch_size}) to be a multiple of the "
                f"pixel stride ({stride})"
            )
        self.conv = conv
        self.in_dim = in_dim
        self.legacy = False  # read by timm's checkpoint_filter_fn
        self.proj = nn.Conv2d(in_chans, in_dim, kernel_size=7, padding=3, stride=stride)

    def feat_ratio(self, as_scalar: bool = True):
        """The patch tokens' stride in pixels (timm's ``PixelEmbed.feat_ratio``)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of an image of ``img_size`` (H, W)."""
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # one check per dimension: a Python `and` of two traced values would end an FX trace
        torch._assert(H == self.img_size[0], "input image height does not match the model")
        torch._assert(W == self.img_size[1], "input image width does not match the model")
        gh, gw = self.grid_size
        if self.conv == "image":
            x = self.proj(x)  # (B, c, gh*nh, gw*nw): the patches' pixel grids side by side
            C = self.in_dim
            ph, pw = self.new_patch_size[0], self.new_patch_size[1]
        else:
            ph, pw = self.patch_size
        # (B, C, gh, ph, gw, pw) -> (B*gh*gw, C, ph, pw): row-major patch order, like nn.Unfold
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C, ph, pw)
        x = (self.proj(x) if self.conv == "patch" else x) + pixel_pos
        # (B*N, pixels, c), contiguous: a transposed view here (timm's) would be the
        # layout of the whole inner stream, since every residual add keeps its input's
        # strides, and every LayerNorm, linear layer and reshape for the projection
        # would copy it (~10 ms a TNT-S step)
        return x.flatten(2).transpose(1, 2).contiguous()


class TNT(nn.Module):
    """Transformer in Transformer; parameter layout of ``timm.models.tnt.TNT`` (non-legacy)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        inner_dim: int = 24,
        depth: int = 12,
        num_heads_inner: int = 4,
        num_heads_outer: int = 6,
        mlp_ratio: float = 4.0,
        mlp_ratio_inner: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        first_stride: int = 4,
        pixel_conv: str = "patch",
        se: bool = False,
        norm_layer=LayerNorm,
    ):
        super().__init__()
        assert global_pool in ("", "token", "avg")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False
        self.se = se
        self.pixel_embed = PixelEmbed(img_size, patch_size, in_chans, inner_dim, first_stride, pixel_conv)
        self.num_patches = num_patches = self.pixel_embed.num_patches
        num_pixel = self.pixel_embed.new_patch_size[0] * self.pixel_embed.new_patch_size[1]
        self.norm1_proj = feeding_linear(norm_layer(num_pixel * inner_dim))
        self.proj = Linear(num_pixel * inner_dim, embed_dim)
        self.norm2_proj = norm_layer(embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, *self.pixel_embed.new_patch_size))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]  # stochastic depth decay
        self.blocks = nn.ModuleList(
            Block(
                inner_dim,
                embed_dim,
                num_pixel,
                num_heads_inner,
                num_heads_outer,
                mlp_ratio,
                mlp_ratio_inner,
                qkv_bias,
                proj_drop_rate,
                attn_drop_rate,
                dpr[i],
                se,
                norm_layer,
            )
            for i in range(depth)
        )
        # timm's TNT: every block's patch tokens, at the patch stride
        r = self.pixel_embed.feat_ratio()
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=r) for i in range(depth)]
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.patch_pos, std=0.02)
        trunc_normal_(self.pixel_pos, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"patch_pos", "pixel_pos", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth, for timm's layer-wise lr decay (timm's TNT's)."""
        return dict(
            stem=r"^cls_token|patch_pos|pixel_pos|pixel_embed|norm[12]_proj|proj",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` (0: none); ``global_pool`` "token", "avg" or ""
        (no pooling: ``forward`` returns every token, as timm's)."""
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ("", "token", "avg")
            self.global_pool = global_pool
        self.head = Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head.to(device=self.cls_token.device, dtype=self.cls_token.dtype).train(self.training)

    def forward_features(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """Normed tokens (B, 1 + patches, d); ``cls_only``: the class token alone (B, 1, d),
        skipping the last block's work that only the patch tokens need (same values)."""
        pixel_embed, patch_embed = self._embed(x)
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if not torch.jit.is_scripting():  # TorchScript: no checkpointing (see Linear)
                if self.grad_checkpointing and torch.is_grad_enabled():
                    pixel_embed, patch_embed = self._run_block(blk, pixel_embed, patch_embed, cls_only and i == last)
                    continue
            pixel_embed, patch_embed = blk(pixel_embed, patch_embed, cls_only and i == last)
        return self.norm(patch_embed[:, :1] if cls_only else patch_embed)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first pixel and patch embeddings: (B*patches, pixels, c), (B, 1 + patches, d)."""
        B = x.shape[0]
        pixel_embed = self.pixel_embed(x, self.pixel_pos)
        patch_embed = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(B, self.num_patches, -1))))
        patch_embed = torch.cat((self.cls_token.expand(B, -1, -1), patch_embed), dim=1) + self.patch_pos
        return pixel_embed, self.pos_drop(patch_embed)

    @torch.jit.ignore
    def _run_block(
        self, blk: nn.Module, pixel_embed: torch.Tensor, patch_embed: torch.Tensor, cls_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, pixel_embed, patch_embed, cls_only, use_reentrant=False)
        return blk(pixel_embed, patch_embed, cls_only)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: the patch tokens after the blocks ``indices``
        picks (an int n: the last n; a list: those blocks), normed by the final norm if
        ``norm``, as (B, d, H, W) maps (``output_fmt="NCHW"``, the patch grid) or
        (B, patches, d) (``"NLC"``); the class token split off (returned beside each map
        with ``return_prefix_tokens``). Returns ``(forward_features(x), intermediates)``
        (every token of the last block computed, as timm), or the list alone with
        ``intermediates_only``; ``stop_early`` skips the blocks after the last one taken."""
        from timm.models._features import feature_take_indices

        assert output_fmt in ("NCHW", "NLC"), "output_fmt must be NCHW or NLC"
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        pixel_embed, patch_embed = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            pixel_embed, patch_embed = self._run_block(blk, pixel_embed, patch_embed)
            if i in take_indices:
                intermediates.append(self.norm(patch_embed) if norm else patch_embed)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.pixel_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(patch_embed), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last one ``indices`` takes (and the norm, the head if
        asked), as timm's; returns the indices taken."""
        from timm.models._features import feature_take_indices

        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:  # "": no pooling, every token (timm's)
            x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Class-token pooling reads one token: the last block computes only that one
        # (timm's TNT computes all 197 and drops 196; TNT-S: -5.6% of the FLOPs).
        return self.forward_head(self.forward_features(x, cls_only=self.global_pool == "token"))


# --------------------------------------------------------------------------- variants

# The variants' hyper-parameters live in pipeline/variants.py (torch-free: the configuration
# checks a name without loading the model).


def _cfg(variant: str) -> dict:
    size = VARIANTS[variant].get("img_size", 224)
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "pixel_embed.proj",
        "classifier": "head",
        "paper_ids": "arXiv:2103.00112",
    }


default_cfgs = generate_default_cfgs({v: _cfg(v) for v in VARIANTS})


def _create(variant: str, pretrained: bool = False, **kwargs) -> TNT:
    if pretrained:
        raise ValueError(f"{variant}: no hosted weights; load a checkpoint with load_timm_state_dict()")
    kwargs = {**VARIANTS[variant], **kwargs}
    # features_only=True: timm's TNT's getter over forward_intermediates, the last 3 blocks by default
    out_indices = kwargs.pop("out_indices", min(3, kwargs.get("depth", 12)))
    return build_model_with_cfg(
        TNT, variant, pretrained=False, feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs
    )


def _register(variant: str) -> None:
    def fn(pretrained: bool = False, **kwargs) -> TNT:
        return _create(variant, pretrained, **kwargs)

    fn.__name__ = variant
    fn.__qualname__ = variant
    fn.__module__ = __name__
    fn.__doc__ = f"TNT variant {variant}: {VARIANTS[variant]}"
    globals()[variant] = register_model(fn)


for _variant in VARIANTS:
    _register(_variant)


def create(variant: str = "tntp_s_patch16_224", **kwargs) -> TNT:
    """Build a variant by name (also available as ``timm.create_model(variant)``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown TNT variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return _create(variant, **kwargs)


# --------------------------------------------------------------------------- weights


def load_timm_state_dict(model: TNT, state_dict: dict, strict: bool = True):
    """Load a timm (or official TNT repository) state dict into ``model``."""
    if "patch_pos" not in state_dict:  # official key names: timm's own converter
        from timm.models.tnt import checkpoint_filter_fn

        state_dict = checkpoint_filter_fn(dict(state_dict), model)
    state_dict = {k: v for k, v in state_dict.items() if k != "outer_tokens"}
    return model.load_state_dict(state_dict, strict=strict)


def to_timm_state_dict(model: TNT) -> dict[str, torch.Tensor]:
    """State dict in timm's ``tnt_*`` layout (identical names and shapes). A model whose
    pixels are embedded over the whole image (``pixel_conv="image"``) has this layout too,
    but timm's TNT, which embeds per patch, computes other values with it."""
    if model.se:
        raise ValueError("the SE variant has no timm equivalent (timm's TNT has no SE layer)")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position encodings and the class token."""
    from timm.optim import param_groups_weight_decay

    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: TNT, batch_size: int = 1, as_run: bool = False) -> dict[str, float]:
    """FLOPs of one forward pass per image at the model's input size, measured.

    ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and
    attention; a multiply-add is 2 FLOPs. Returns ``{"flops": ..., "macs": ...}`` per
    image; the TNT paper's "FLOPs" are the ``macs`` figure. Counted with the full last
    block, as the paper does; ``TNT.forward`` with class-token pooling computes only the
    class token in the last block (TNT-S: 4.93 GMACs instead of 5.22); ``as_run=True``
    counts that forward, the work training and inference do.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    size = model.pixel_embed.img_size
    in_chans = model.pixel_embed.proj.in_channels
    x = torch.zeros(batch_size, in_chans, *size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        # The CPU flash-attention kernel is not registered with the flop counter; the
        # math backend runs attention as counted matmuls (same result).
        with (
            torch.no_grad(),
            reference_kernels(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            if as_run:
                model(x)
            else:
                model.forward_head(model.forward_features(x))  # all tokens, as the paper counts
    finally:
        model.train(was_training)
    flops = counter.get_total_flops() / batch_size
    return {"flops": flops, "macs": flops / 2}
