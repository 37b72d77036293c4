"""The TNT model: shapes, counts vs the paper, timm weight compatibility, training features."""

from __future__ import annotations

import io
import os

import pytest
import timm
import torch

from pipeline import tnt
from pipeline.kernels import cpu

# Paper (arXiv 2103.00112, Table 1): params (M) and FLOPs (G, multiply-adds) at 224.
PAPER = {
    "tntp_ti_patch16_224": (6.1, 1.4),
    "tntp_s_patch16_224": (23.8, 5.2),
    "tntp_b_patch16_224": (65.6, 14.1),
}


def images(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.pixel_embed.img_size
    return torch.randn(batch, 3, *size, generator=g)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tnt.create("tntp_tiny_patch8_32", num_classes=10)


@pytest.mark.parametrize("variant", sorted(tnt.VARIANTS))
def test_shapes_of_every_variant(variant):
    model = timm.create_model(variant, num_classes=7).eval()  # registered with timm
    assert isinstance(model, tnt.TNT)
    with torch.no_grad():
        out = model(images(model, batch=1))
        feats = model.forward_features(images(model, batch=1))
    assert out.shape == (1, 7)
    assert feats.shape == (1, model.num_patches + 1, model.embed_dim)


def test_names_do_not_clash_with_timm():
    ours = set(tnt.VARIANTS)
    assert ours <= set(timm.list_models("tntp_*"))
    assert not ours & {"tnt_s_patch16_224", "tnt_b_patch16_224", "tnt_s_legacy_patch16_224"}


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_params_and_flops_match_the_paper(variant):
    model = tnt.create(variant)
    params_m, gflops = PAPER[variant]
    assert tnt.count_params(model) / 1e6 == pytest.approx(params_m, rel=0.01)
    assert tnt.count_flops(model)["macs"] / 1e9 == pytest.approx(gflops, rel=0.01)


@pytest.mark.parametrize("ours_name,timm_name", sorted(tnt.TIMM_EQUIVALENT.items()))
def test_timm_weights_load_and_outputs_match_both_ways(ours_name, timm_name):
    torch.manual_seed(1)
    ref = timm.create_model(timm_name).eval()
    ours = tnt.create(ours_name).eval()
    tnt.load_timm_state_dict(ours, ref.state_dict())
    x = images(ours, batch=2, seed=3)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
    # and back: our weights (trained from scratch here) into a fresh timm model
    torch.manual_seed(2)
    ours2 = tnt.create(ours_name).eval()
    ref2 = timm.create_model(timm_name).eval()
    ref2.load_state_dict(tnt.to_timm_state_dict(ours2), strict=True)
    with torch.no_grad():
        assert (ours2(x) - ref2(x)).abs().max().item() <= 1e-5


def test_official_checkpoint_key_names_load_through_timms_filter():
    ref = timm.create_model("tnt_s_patch16_224").eval()
    renames = [
        ("patch_pos", "outer_pos"),
        ("pixel_pos", "inner_pos"),
        ("pixel_embed", "patch_embed"),
        ("norm1_proj", "proj_norm1"),
        ("norm2_proj", "proj_norm2"),
        ("norm_in", "inner_norm1"),
        ("attn_in", "inner_attn"),
        ("norm_mlp_in", "inner_norm2"),
        ("mlp_in", "inner_mlp"),
        ("norm_out", "outer_norm1"),
        ("attn_out", "outer_attn"),
        ("norm_mlp", "outer_norm2"),
        ("mlp.", "outer_mlp."),
    ]
    official = {}
    for key, v in ref.state_dict().items():
        k = key
        for new, old in renames:
            if new == "mlp." and ("mlp_in" in key or "norm_mlp" in key):
                continue
            k = k.replace(new, old)
        if k == "inner_pos":  # official layout: (1, pixels, c)
            v = v.flatten(2).transpose(1, 2)
        official[k] = v
    official["outer_tokens"] = torch.zeros(1)  # the official code's unused buffer
    ours = tnt.create("tntp_s_patch16_224").eval()
    tnt.load_timm_state_dict(ours, official)
    x = images(ours, batch=1)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_se_variant_has_no_timm_layout_and_changes_the_output():
    torch.manual_seed(0)
    plain = tnt.create("tntp_tiny_patch8_32").eval()
    se = tnt.TNT(**{**tnt.VARIANTS["tntp_tiny_patch8_32"], "se": True}).eval()
    missing, unexpected = se.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".se_layer." in k for k in missing)
    x = images(plain)
    with torch.no_grad():
        assert not torch.allclose(se(x), plain(x), atol=1e-4)
    with pytest.raises(ValueError, match="SE"):
        tnt.to_timm_state_dict(se)


def test_se_variant_exports_and_loads_back(tmp_path):
    # timm's layout refuses SE (above); the export must not: an SE run registers its model
    from pipeline import export
    from pipeline.transforms import Augment

    torch.manual_seed(0)
    variant, classes, aug = "tntp_s_se_patch16_224", ("a", "b"), Augment(img_size=32)
    trained = export.build(variant, classes, aug).eval()
    files = export.export(str(tmp_path), variant, classes, aug, trained.state_dict(), trained, step=1, epoch=0)
    from safetensors.torch import load_file

    for kind in ("model", "ema"):
        loaded = export.build(variant, classes, aug).eval()
        tnt.load_timm_state_dict(loaded, load_file(files[kind]))  # strict
        x = images(loaded)
        with torch.no_grad():
            assert torch.equal(loaded(x), trained(x))


def test_image_pixel_conv_is_one_convolution_over_the_whole_image():
    torch.manual_seed(0)
    per_patch = tnt.create("tntp_tiny_patch8_32").eval()
    whole = tnt.TNT(**{**tnt.VARIANTS["tntp_tiny_patch8_32"], "pixel_conv": "image"}).eval()
    whole.load_state_dict(per_patch.state_dict())  # same parameters, names and shapes
    x = images(whole)
    embed = whole.pixel_embed
    with torch.no_grad():
        got = embed(x, whole.pixel_pos)  # (B*16 patches, 4x4 pixels, c)
        conv = embed.proj(x)  # (B, c, 16, 16): the 4x4 grids of the 4x4 patches
        want = conv.reshape(2, -1, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(32, -1, 4, 4) + whole.pixel_pos
        assert torch.allclose(got, want.flatten(2).transpose(1, 2), atol=1e-6)
        old = per_patch.pixel_embed(x, per_patch.pixel_pos)
        # stride 2, 7x7: only the pixel at (2, 2) of each patch has its window inside the patch
        inside = torch.zeros(4, 4, dtype=torch.bool)
        inside[2, 2] = True
        assert torch.allclose(got[:, inside.flatten()], old[:, inside.flatten()], atol=1e-6)
        assert not torch.allclose(got[:, ~inside.flatten()], old[:, ~inside.flatten()], atol=1e-3)
        assert not torch.allclose(whole(x), per_patch(x), atol=1e-4)
    with pytest.raises(ValueError, match="multiple of the pixel stride"):
        tnt.TNT(img_size=30, patch_size=10, first_stride=4, pixel_conv="image")


def test_gradients_reach_every_parameter(tiny):
    tiny.train()
    tiny.zero_grad()
    torch.nn.functional.cross_entropy(tiny(images(tiny, 4)), torch.tensor([0, 1, 2, 3])).backward()
    for name, p in tiny.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_is_finite(tiny, dtype):
    tiny.train()
    tiny.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = tiny(images(tiny, 4))
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3]))
    assert out.dtype == dtype
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters())


def test_autocast_bf16_stays_close_to_fp32(tiny):
    tiny.eval()
    x = images(tiny, 4)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(x).float()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def test_drop_path_is_identity_in_eval():
    torch.manual_seed(0)
    cfg = tnt.VARIANTS["tntp_tiny_patch8_32"]
    dropping = tnt.TNT(**cfg, drop_path_rate=0.5)
    plain = tnt.TNT(**cfg)
    plain.load_state_dict(dropping.state_dict())
    x = images(plain)
    dropping.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))
        dropping.train()
        torch.manual_seed(1)
        a = dropping(x)
        torch.manual_seed(2)
        b = dropping(x)
    assert not torch.allclose(a, b)  # stochastic in training


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    x, y = images(model, 4), torch.tensor([1, 2, 3, 4])

    # forward calls of each block: twice per step when it is recomputed in the backward
    # (a pre-hook: torch stops a recomputation early, once it has what the backward needs)
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))

    def grads(ckpt):
        model.set_grad_checkpointing(ckpt)
        model.zero_grad()
        calls.clear()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    (plain, plain_calls), (ckpt, ckpt_calls) = grads(False), grads(True)
    assert plain_calls == len(model.blocks) and ckpt_calls == 2 * len(model.blocks)  # it does recompute
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_round_trip(tiny):
    from safetensors.torch import load, save

    tiny.eval()
    blob = save(tnt.to_timm_state_dict(tiny))
    fresh = tnt.create("tntp_tiny_patch8_32", num_classes=10).eval()
    tnt.load_timm_state_dict(fresh, load(blob))
    buf = io.BytesIO()
    torch.save(fresh.state_dict(), buf)
    buf.seek(0)
    again = tnt.create("tntp_tiny_patch8_32", num_classes=10).eval()
    again.load_state_dict(torch.load(buf, weights_only=True))
    x = images(tiny)
    with torch.no_grad():
        assert torch.equal(tiny(x), again(x))


def test_param_groups_skip_decay_on_norms_biases_positions_and_class_token(tiny):
    groups = tnt.param_groups(tiny, weight_decay=0.05)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    names = {id(p): n for n, p in tiny.named_parameters()}
    no_decay = {names[i] for i in by_decay[0.0]}
    decay = {names[i] for i in by_decay[0.05]}
    assert {"cls_token", "patch_pos", "pixel_pos", "norm.weight", "head.bias", "blocks.0.norm_in.weight"} <= no_decay
    assert {"head.weight", "blocks.0.attn_in.qk.weight", "blocks.0.mlp.fc1.weight", "pixel_embed.proj.weight"} <= decay
    assert len(no_decay) + len(decay) == len(names)


def test_forward_has_no_graph_breaks(tiny):
    import torch._dynamo

    torch._dynamo.reset()
    tiny.eval()
    explanation = torch._dynamo.explain(tiny)(images(tiny))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("se", [False, True])
def test_class_token_shortcut_equals_the_full_last_block(se):
    """forward() computes only the class token in the last block; values and gradients
    (drop path on, training mode) must equal the full computation's."""
    torch.manual_seed(0)
    model = tnt.TNT(**{**tnt.VARIANTS["tntp_tiny_patch8_32"], "se": se}, num_classes=10, drop_path_rate=0.2)
    x, y = images(model, 4), torch.tensor([1, 2, 3, 4])

    def run(fn):
        model.zero_grad()
        torch.manual_seed(7)  # the same drop-path draws on both paths
        out = fn(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast_out, fast = run(model)
    full_out, full = run(lambda t: model.forward_head(model.forward_features(t)))
    torch.testing.assert_close(fast_out, full_out, rtol=1e-5, atol=1e-6)
    assert fast.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(fast[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    model.eval()
    with torch.no_grad():
        assert model.forward_features(x, cls_only=True).shape == (4, 1, model.embed_dim)
        model.reset_classifier(10, global_pool="avg")  # average pooling needs every token: full path
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)))


@pytest.mark.skipif(cpu.onednn_linear is None, reason="torch built without oneDNN")
@pytest.mark.parametrize("shape,bias", [((2, 197, 384), True), ((3, 16, 24), True), ((5, 96), False)])
def test_onednn_linear_equals_f_linear_with_gradients(shape, bias):
    from torch.profiler import profile

    torch.manual_seed(0)
    width = shape[-1]
    for out_features in (width * 4, 24):  # wide (oneDNN weight gradient) and narrow (MKL's)
        layer = cpu.Linear(width, out_features, bias=bias)
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape[:-1], out_features)
        with profile() as prof:
            y = layer(x)
            y.backward(g)
        assert any("_linear_pointwise" in e.name for e in prof.events())  # the oneDNN path ran
        got = (y.detach(), x.grad, layer.weight.grad, layer.bias.grad if bias else None)
        x.grad = None
        layer.zero_grad()
        with cpu.reference_kernels():
            y_ref = layer(x)
            y_ref.backward(g)
        ref = (y_ref.detach(), x.grad, layer.weight.grad, layer.bias.grad if bias else None)
        for a, b in zip(got, ref):
            if b is not None:  # float32 sums in another order: within 1e-5 of the largest value
                assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_model_gradients_equal_with_reference_kernels():
    """Our CPU kernels (oneDNN float32 linear layers, the fused inner attention,
    LayerNorm) run in the model and give torch's ops' outputs and gradients."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    x, y = images(model, 4), torch.tensor([1, 2, 3, 4])

    def run():
        model.zero_grad()
        with profile() as prof:
            out = model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
        ops = {e.name for e in prof.events()}
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, ops

    out, fast, ops = run()
    assert {
        "tntp::inner_attention_fwd",
        "tntp::inner_attention_bwd",
        "tntp::layer_norm_fwd",
        "tntp::layer_norm_bwd",
    } <= ops
    with cpu.reference_kernels():
        out_ref, ref, ops = run()
    assert not any(name.startswith("tntp::") for name in ops)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_kernels_under_bf16_autocast_are_as_accurate_as_torchs_ops():
    """Under bf16 autocast our CPU kernels (inner attention, LayerNorm writing bf16 for
    the linear layers, the outer attention's softmax) run, and the model's outputs and
    gradients are no further from the float32 ones than with torch's ops."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    x, y = images(model, 4), torch.tensor([1, 2, 3, 4])

    def run(autocast: bool):
        model.zero_grad()
        with profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            torch.nn.functional.cross_entropy(out.float(), y).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return out.detach().float(), grads, {e.name for e in prof.events()}

    with cpu.reference_kernels():
        out32, grad32, _ = run(False)
        out_ref, grad_ref, _ = run(True)
    out, grad, ops = run(True)
    assert {"tntp::inner_attention_bwd", "tntp::layer_norm_bwd", "tntp::scaled_softmax_bwd"} <= ops

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert err(out, out32) <= 1.25 * err(out_ref, out32)
    assert err(grad, grad32) <= 1.25 * err(grad_ref, grad32)


@pytest.mark.parametrize("width", [12, 24, 40, 384])  # the inner widths of TNT-Ti, -S, -B and TNT-S's outer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_norm_kernel_matches_float32_maths(width, dtype):
    """Our LayerNorm kernel against torch's float32 LayerNorm, forward and all gradients."""
    from torch.profiler import profile

    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(width)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    ours = cpu.LayerNorm(width).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = (torch.randn(64, 16, width) * 3 + 1).to(dtype)
    g = torch.randn(64, 16, width).to(dtype)
    x32 = x.detach().clone().float().requires_grad_()  # a copy: for float32, .float() would be x itself
    ref(x32).backward(g.float())
    x.requires_grad_()
    with profile() as prof:
        y = ours(x)
        y.backward(g)
    assert {"tntp::layer_norm_fwd", "tntp::layer_norm_bwd"} <= {e.name for e in prof.events()}
    assert y.dtype == x.grad.dtype == ours.weight.grad.dtype == dtype
    # float32: another summation order; half precision: one rounding of the result
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for got, want in (
        (y, ref(x32)),
        (x.grad, x32.grad),
        (ours.weight.grad, ref.weight.grad),
        (ours.bias.grad, ref.bias.grad),
    ):
        assert ((got.float() - want).abs() <= tol * want.abs().max() * 2).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_feeding_linear_layers_writes_the_autocast_dtype(dtype):
    """Under autocast a norm read only by linear layers outputs what autocast would cast
    its float32 output to: the same values, in the autocast dtype; other norms and
    runs without autocast stay float32."""
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(24)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    feeding, plain = tnt.feeding_linear(cpu.LayerNorm(24)), cpu.LayerNorm(24)
    for m in (feeding, plain):
        m.load_state_dict(ref.state_dict())
    x = torch.randn(256, 24) * 3 + 1
    want = ref(x).detach()
    with torch.autocast("cpu", dtype=dtype):
        y, y_plain = feeding(x), plain(x)
    assert y.dtype == dtype and y_plain.dtype == feeding(x).dtype == torch.float32
    # float32 maths in another order, then one rounding: at most one ulp of the dtype off
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
    assert ((y.float() - want).abs() <= ulp * want.abs()).all()
    assert (y.float() == want.to(dtype).float()).float().mean() > 0.99  # nearly all exactly autocast's cast
    # and the backward pass takes the autocast dtype's gradient
    x.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = torch.nn.functional.linear(feeding(x), torch.randn(8, 24))
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def _reference_attention(qk, v, heads):
    P, T, C = v.shape
    q, k = qk.view(P, T, 2, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
    return (attn.softmax(-1) @ v.view(P, T, heads, C // heads).transpose(1, 2)).transpose(1, 2).reshape(P, T, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# TNT-S, TNT-B and TNT-Ti (compile-time sizes, the first two also compile-time head widths), odd sizes
@pytest.mark.parametrize("P,T,C,heads", [(64, 16, 24, 4), (9, 16, 40, 4), (6, 16, 12, 4), (5, 7, 12, 3)])
def test_fused_inner_attention_matches_torch(dtype, P, T, C, heads):
    assert cpu.cpu_kernels() is not None, "the CPU kernel did not build (g++ and torch's headers are needed)"
    torch.manual_seed(0)
    qk = (torch.randn(P, T, 2 * C) * 2).to(dtype).requires_grad_()
    v = torch.randn(P, T, C).to(dtype).requires_grad_()
    g = torch.randn(P, T, C).to(dtype)
    out = cpu.InnerAttention.apply(qk, v, heads, (C // heads) ** -0.5)
    out.backward(g)
    got = (out.detach(), qk.grad, v.grad)
    qk32, v32 = qk.detach().float().requires_grad_(), v.detach().float().requires_grad_()
    ref = _reference_attention(qk32, v32, heads)
    ref.backward(g.float())
    assert out.dtype == qk.grad.dtype == v.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: rounding of inputs and results
    for a, b in zip(got, (ref.detach(), qk32.grad, v32.grad)):
        assert (a.float() - b).abs().max() <= tol * b.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 6, 197, 197), (3, 16), (5, 1)])  # TNT-S's outer attention, short rows, one
def test_scaled_softmax_matches_torch(dtype, shape):
    from torch.profiler import profile

    assert cpu.cpu_kernels() is not None
    torch.manual_seed(0)
    scale = 64**-0.5
    x = (torch.randn(shape) * 20).to(dtype).requires_grad_()
    g = torch.randn(shape).to(dtype)
    with profile() as prof:
        y = cpu.ScaledSoftmax.apply(x, scale)
        y.backward(g)
    assert {"tntp::scaled_softmax_fwd", "tntp::scaled_softmax_bwd"} <= {e.name for e in prof.events()}
    x32 = x.detach().float().requires_grad_()
    want = (x32 * scale).softmax(-1)
    want.backward(g.float())
    assert y.dtype == x.grad.dtype == dtype
    ulp = 2**-8 if dtype == torch.bfloat16 else 2**-11  # one rounding of the result
    assert ((y.float() - want).abs() <= ulp * want + 1e-6).all()
    assert (x.grad.float() - x32.grad).abs().max() <= 4 * ulp * x32.grad.abs().max()


def test_kernel_build_failure_warns_once_and_falls_back(tmp_path):
    """A machine without a working compiler (CXX=false, empty extension cache): one
    warning, and the model still trains through torch's ops."""
    import os
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from pipeline import tnt\n"
        "m = tnt.create('tntp_tiny_patch8_32', num_classes=3)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        m(torch.randn(2, 3, 32, 32)).sum().backward()\n"
        "msgs = [str(x.message) for x in w if 'CPU kernels' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "print(msgs[0])\n"
    )
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "could not be built" in done.stdout and "using torch's ops" in done.stdout


def test_a_build_lock_is_waited_on_while_young_and_removed_once_stale(tmp_path, monkeypatch, capfd):
    """torch's loader waits forever on the lock file of a killed build (or of a process
    killed during the no-op rebuild check every load makes): a young lock is waited on
    until its holder removes it, saying so on stderr at once and again every
    ``say_every_s`` (before the trainer's logging exists), an old one is removed."""
    import os
    import threading
    import time

    from torch.utils.cpp_extension import _get_build_directory

    from pipeline.compat import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = os.path.join(_get_build_directory("tntp_lock_test", verbose=False), "lock")
    open(lock, "w").close()
    threading.Timer(1.5, os.remove, [lock]).start()  # a live build finishing
    t = time.monotonic()
    clear_stale_build_lock("tntp_lock_test", poll_s=0.1, say_every_s=0.6)
    assert 1.4 < time.monotonic() - t < 10
    said = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("waiting for the build lock")]
    assert 2 <= len(said) <= 3 and lock in said[0], said  # at 0 s, ~0.6 s and ~1.2 s
    open(lock, "w").close()
    old = time.time() - 600
    os.utime(lock, (old, old))
    clear_stale_build_lock("tntp_lock_test")
    assert not os.path.exists(lock)


def test_float64_model_keeps_torchs_ops():
    """Our kernels compute in float32: a float64 model must not go through them."""
    from torch.profiler import profile

    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=3).double().eval()
    x = images(model, 2).double()
    with torch.no_grad(), profile() as prof:
        out = model(x)
    assert not any(e.name.startswith("tntp::") for e in prof.events())
    with torch.no_grad(), cpu.reference_kernels():
        assert torch.equal(out, model(x))
    assert cpu.cpu_kernels() is not None
    with pytest.raises(RuntimeError, match="inner_attention"):
        torch.ops.tntp.inner_attention_fwd(
            torch.zeros(1, 16, 48, dtype=torch.float64), torch.zeros(1, 16, 24, dtype=torch.float64), 4, 1.0
        )
    with pytest.raises(RuntimeError, match="scaled_softmax"):
        torch.ops.tntp.scaled_softmax_fwd(torch.zeros(4, 24), 1.0)  # half precision only: float32 takes SDPA
    with pytest.raises(RuntimeError, match="layer_norm"):
        torch.ops.tntp.layer_norm_fwd(torch.zeros(4, 24, dtype=torch.float64), None, None, 1e-6, torch.float64)


def test_kernels_are_not_rebuilt_for_a_copy_of_the_code_elsewhere(tmp_path):
    """A model pulled from the registry runs its bundled copy of ``pipeline/``: the
    build for the same sources and CPU is reused, whatever the copy's path (two copies
    in fresh folders, one after the other: neither compiles)."""
    import shutil
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    assert cpu.cpu_kernels() is not None  # built (or found) for this checkout
    name = cpu.kernel_build_name()
    so = os.path.join(_get_build_directory(name, verbose=False), f"{name}.so")
    built = os.stat(so).st_mtime_ns
    here = os.path.dirname(os.path.dirname(os.path.abspath(tnt.__file__)))
    for copy in ("downloaded_a", "downloaded_b"):
        root = tmp_path / copy
        shutil.copytree(os.path.join(here, "pipeline"), root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        code = (
            "import pipeline.kernels.cpu as c, sys; assert c.__file__.startswith(sys.argv[1]), c.__file__; "
            "assert c.cpu_kernels() is not None"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(root)], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert os.stat(so).st_mtime_ns == built, f"the kernels were rebuilt for {copy}"


@pytest.mark.parametrize(
    "switch,kernel",
    [
        ("TNTP_ONEDNN_FP32", "onednn_fp32"),
        ("TNTP_FUSED_INNER", "fused_inner"),
        ("TNTP_FUSED_NORM", "fused_norm"),
        ("TNTP_FUSED_SOFTMAX", "fused_softmax"),
    ],
)
def test_each_cpu_kernel_switch_turns_that_kernel_off_and_only_it(switch, kernel):
    """README: TNTP_ONEDNN_FP32=0, TNTP_FUSED_INNER=0, TNTP_FUSED_NORM=0 and
    TNTP_FUSED_SOFTMAX=0 each turn one kernel off; the model's output does not change
    beyond float rounding (the reference path, cpu.reference_kernels())."""
    import json
    import subprocess
    import sys

    code = (
        "import json, torch; from pipeline import tnt; from pipeline.kernels import cpu; torch.manual_seed(0); "
        "m = tnt.create('tntp_tiny_patch8_32', num_classes=10).eval(); x = torch.randn(2, 3, 32, 32); "
        "y = m(x); ref = None\n"
        "with cpu.reference_kernels(): ref = m(x)\n"
        "print(json.dumps({'on': cpu.KERNELS, 'err': (y - ref).abs().max().item()}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    got = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=root,
            env=dict(os.environ, **{switch: "0"}),
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout.splitlines()[-1]
    )
    assert got["on"][kernel] is False
    assert all(on for name, on in got["on"].items() if name != kernel and name != "onednn_fp32")
    assert got["err"] < 1e-4
