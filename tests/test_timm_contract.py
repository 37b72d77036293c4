"""timm's model contract, checked on every variant of ours and, in the same test, on
timm's own ``tnt_s_patch16_224`` as the reference: whatever timm's TNT passes, ours must.

What is checked follows timm's ``tests/test_models.py`` (read, not copied): forward and
backward, default cfgs, ``forward_features`` / ``forward_head``, ``forward_intermediates``
against ``feature_info``, ``features_only=True``, TorchScript, FX forward and backward, and
FX then TorchScript. The 224-px variants make TorchScript and FX the slow part (compiling
and tracing 12 blocks): those are in the ``slow`` tier.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch

from pipeline import tnt

REFERENCE = "tnt_s_patch16_224"  # timm's TNT-S
MODELS = sorted(tnt.VARIANTS) + [REFERENCE]


def inputs(model, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.default_cfg["input_size"], generator=g)


def create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs)


@functools.cache
def built(name: str) -> torch.nn.Module:
    """One model in eval mode per name, for the checks that only read it (building TNT-B
    takes ~1.5 s on 2 cores)."""
    return create(name).eval()


def fx_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model traced by FX as timm's feature extraction traces it (timm's leaf modules
    and wrapped functions), returning the output node."""
    from timm.layers import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    kw = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw
    )


def only_output(out) -> torch.Tensor:
    (value,) = out.values()
    return value


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_and_default_cfg(name):
    model = create(name, num_classes=42).train()
    params = dict(model.named_parameters())
    out = model(inputs(model))
    assert out.shape == (2, 42) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"

    cfg, state = model.default_cfg, model.state_dict()
    assert f"{cfg['classifier']}.weight" in state and f"{cfg['first_conv']}.weight" in state
    model.eval()
    x = inputs(model, batch=1)
    with torch.no_grad():
        assert model.forward_features(x).shape[-1] == model.num_features
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
        torch.testing.assert_close(model(x), pre)
        model.reset_classifier(0, "")  # no pooling: every token
        torch.testing.assert_close(model(x), model.forward_features(x))


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_match_feature_info(name):
    model = built(name)
    x = inputs(model)
    depth = len(model.blocks)
    info = model.feature_info
    assert [i["module"] for i in info] == [f"blocks.{i}" for i in range(depth)]
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == depth
        size = x.shape[-1]
        for f, y in zip(info, inter):
            assert y.shape == (2, f["num_chs"], size // f["reduction"], size // f["reduction"])

        only = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert len(only) == 2
        for a, b in zip(only, inter[-2:]):
            torch.testing.assert_close(a, b)

        # NLC, normed, with the class token beside: LayerNorm is per token, so the normed
        # tokens are the norm of the unnormed ones
        ((spatial, prefix),) = model.forward_intermediates(
            x, indices=[0], norm=True, output_fmt="NLC", return_prefix_tokens=True, intermediates_only=True
        )
        ((_, raw_prefix),) = model.forward_intermediates(
            x, indices=[0], return_prefix_tokens=True, intermediates_only=True
        )
        grid = size // info[0]["reduction"]
        assert spatial.shape == (2, grid * grid, info[0]["num_chs"])
        torch.testing.assert_close(spatial, model.norm(inter[0].flatten(2).transpose(1, 2)))
        torch.testing.assert_close(prefix, model.norm(raw_prefix))

    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers(indices=[1]) == [1]
    assert len(pruned.blocks) == 2 and isinstance(pruned.head, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(pruned.forward_intermediates(x, indices=[1], intermediates_only=True)[0], inter[1])


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = create(name, features_only=True).eval()
    full = built(name)
    x = inputs(full)
    with torch.no_grad():
        feats = model(x)
        expected = full.forward_intermediates(x, indices=min(3, len(full.blocks)), intermediates_only=True)
    assert len(feats) == len(model.feature_info.channels()) == len(expected)
    for f, e, c, r in zip(feats, expected, model.feature_info.channels(), model.feature_info.reduction()):
        assert f.shape == (2, c, x.shape[-2] // r, x.shape[-1] // r)
        torch.testing.assert_close(f, e)
    picked = create(name, features_only=True, out_indices=(0,)).eval()
    with torch.no_grad():
        (first,) = picked(x)
    torch.testing.assert_close(first, full.forward_intermediates(x, indices=[0], intermediates_only=True)[0])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", MODELS)
def test_torchscript(name):
    model = built(name)
    x = inputs(model, batch=1)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", MODELS)
def test_fx_forward_backward_and_torchscript(name):
    model = create(name, num_classes=42).eval()
    x = inputs(model)
    fx = fx_model(model)
    with torch.no_grad():
        torch.testing.assert_close(only_output(fx(x)), model(x))

    fx.train()
    only_output(fx(x)).mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"no gradient through the FX graph for {missing}"

    fx.eval()
    scripted = torch.jit.script(fx)
    with torch.no_grad():
        torch.testing.assert_close(only_output(scripted(x)), model(x), atol=1e-4, rtol=1e-4)


def test_fx_keeps_the_kernel_modules_as_leaves():
    """The modules that pick our CPU kernels run as they are inside a traced graph."""
    model = create("tntp_tiny_patch8_32").eval()
    graph = fx_model(model).graph
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    assert "blocks.0.attn_in" in called and "blocks.0.norm_in" in called and "blocks.0.mlp_in.fc1" in called
