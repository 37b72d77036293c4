"""The Triton inner attention (pipeline/kernels/inner_attention_triton.py), on CPU through
Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU): forward
and gradients against the reference path at TNT-S and TNT-B shapes, kernels broken on
purpose caught, the model's selection with its self-check and fallback, and
``torch.compile`` through the custom ops without a graph break. Speed: GPU only
(bench/tnt_gpu_bench.py)."""

from __future__ import annotations

import importlib.util
import inspect
import os

import pytest
import torch

pytest.importorskip("triton")

from pipeline import tnt  # noqa: E402
from pipeline.kernels import inner_attention_triton as kernel  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and Triton's interpreter off (conftest turns it on)", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (heads, head width, tokens, sequences): TNT-S's and TNT-B's inner attention, a 24-wide
# head, and 10 tokens (padded to 16 inside); sequence counts not multiples of the block
SHAPES = [(4, 6, 16, 70), (4, 10, 16, 37), (1, 24, 16, 5), (2, 6, 10, 9)]


def errors(op, heads: int, head_dim: int, tokens: int, seqs: int, dtype: torch.dtype) -> dict[str, float]:
    """Largest error of ``op``'s output and gradients against the float32 reference, and
    the same for the torch path in ``dtype`` (tnt.attention_explicit, what the model runs
    without the kernel) as the yardstick of rounding."""
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    C, scale = heads * head_dim, head_dim**-0.5
    qk, v, grad = (torch.randn(seqs, tokens, w, generator=g) for w in (2 * C, C, C))

    def run(fn, dt):
        a, b = (t.to(DEVICE, dt, copy=True).requires_grad_() for t in (qk, v))
        out = fn(a, b)
        out.backward(grad.to(DEVICE, dt))
        return [t.detach().float().cpu() for t in (out, a.grad, b.grad)]

    def torch_path(a, b):
        q, k = a.view(seqs, tokens, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        x = tnt.attention_explicit(q, k, b.view(seqs, tokens, heads, head_dim).transpose(1, 2))
        return x.transpose(1, 2).reshape(seqs, tokens, C)

    want = run(lambda a, b: kernel.reference(a, b, heads, scale), torch.float32)
    got = run(lambda a, b: op(a, b, heads, scale), dtype)
    yard = run(torch_path, dtype)
    names = ("output", "dqk", "dv")
    out = {n: (x - w).abs().max().item() for n, x, w in zip(names, got, want)}
    out.update({f"torch {n}": (x - w).abs().max().item() for n, x, w in zip(names, yard, want)})
    return out


def within(err: dict[str, float], dtype: torch.dtype) -> bool:
    """float32: IEEE products, 2e-6. bf16: at most 3x the torch path's own rounding error
    (+1e-3): the kernel rounds dS and P to bf16 before its products, as FlashAttention
    does, where autograd on the torch path rounds elsewhere; measured 0.8-2.3x over these
    shapes (dq of the 24-wide head the most), while each break below is off by 1.9 or more."""
    if dtype == torch.float32:
        return all(err[n] <= 2e-6 for n in ("output", "dqk", "dv"))
    return all(err[n] <= 3 * err[f"torch {n}"] + 1e-3 for n in ("output", "dqk", "dv"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{h}x{d}-{n}tok-{s}seq" for h, d, n, s in SHAPES])
def test_kernel_matches_the_reference(shape, dtype):
    err = errors(kernel.inner_attention, *shape, dtype)
    assert within(err, dtype), err


def broken_copy(tmp_path, name: str, old: str, new: str):
    """The kernel module with ``old`` replaced by ``new`` (and its ops in a namespace of
    their own), imported from ``tmp_path``."""
    src = inspect.getsource(kernel)
    assert src.count(old) == 1, old
    src = src.replace(old, new).replace("tntp_triton::", f"tntp_triton_{name}::")
    path = tmp_path / f"broken_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"broken_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BREAKS = {
    # the softmax backward without its row-sum term
    "rowsum": ("ds = p * (dp - tl.sum(p * dp, axis=2)[:, :, None])", "ds = p * dp"),
    # one padded head-width column read as if it were the head's (the next head's first)
    "mask": ("(d[None, None, :] < D)", "(d[None, None, :] < D + 1)"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_a_kernel_broken_on_purpose_fails_the_checks(name, tmp_path):
    broken = broken_copy(tmp_path, name, *BREAKS[name])
    for dtype in (torch.float32, torch.bfloat16):
        err = errors(broken.inner_attention, 4, 6, 16, 37, dtype)
        assert not within(err, dtype), (name, err)
    assert broken.self_check(DEVICE, 4, 6, 16) != ""


def test_the_model_runs_the_kernel_once_selected(monkeypatch):
    """inner_kernel=triton: every block's inner attention goes through the kernel, output
    and gradients as torch's path gives them; the outer attention never does."""
    calls = []
    launch = kernel._launch
    monkeypatch.setattr(kernel, "_launch", lambda *a: calls.append(a[2].shape) or launch(*a))
    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10).train()
    x = torch.randn(3, 3, 32, 32)

    def step():
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    other = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    assert tnt.select_inner_kernel("triton", DEVICE, model)[0] == "triton"
    calls.clear()  # the self-check's own calls
    other(x)
    assert not calls  # the choice is the model's, not the process's
    with_kernel = step()
    assert len(calls) == 2 * len(model.blocks)  # forward and backward of each block's inner attention
    assert all(shape == (3 * 16, 16, 2 * 12) for shape in calls)  # 16 patches of 16 pixels, 2 heads x 6
    assert tnt.select_inner_kernel("torch", DEVICE, model) == ("torch", "model.inner_kernel=torch")
    reference = step()
    for a, b in zip(with_kernel, reference):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_auto_falls_back_with_the_reason_when_the_kernel_fails(monkeypatch):
    """A kernel that fails to run (no Triton, a compile error) or disagrees with the
    reference: auto keeps torch's path and says why; triton refuses in one line. The CPU
    stands in for a GPU here (``_auto_uses_triton``): the one mock, for what needs a GPU."""
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    monkeypatch.setattr(tnt, "_auto_uses_triton", lambda device: True)
    assert tnt.select_inner_kernel("auto", DEVICE, model)[0] == "triton"

    def fail(*args):
        raise RuntimeError("PassManager::run failed\n(more lines)")

    monkeypatch.setattr(kernel, "_launch", fail)
    path, why = tnt.select_inner_kernel("auto", DEVICE, model)
    assert path == "torch" and not any(getattr(m, "use_triton", False) for m in model.modules())
    assert why == "the Triton kernel's self-check failed (RuntimeError: PassManager::run failed); using torch's path"
    with pytest.raises(ValueError, match=r"^model.inner_kernel=triton: the kernel's self-check failed"):
        tnt.select_inner_kernel("triton", DEVICE, model)
    monkeypatch.setattr(kernel, "_launch", lambda kern, tensors, *a: tensors[-1].zero_())  # wrong values
    path, why = tnt.select_inner_kernel("auto", DEVICE, model)
    assert path == "torch" and "output in float32 is" in why, why


def test_auto_keeps_the_cpu_path_on_cpu():
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10)
    assert tnt.select_inner_kernel("auto", torch.device("cpu"), model) == (
        "torch",
        "cpu: the Triton kernel is for CUDA",
    )
    assert not any(getattr(m, "use_triton", False) for m in model.modules())


def test_compile_traces_through_the_custom_ops_without_a_graph_break():
    """fullgraph=True fails on any graph break; aot_eager runs the ops' fake (shape)
    functions and the registered backward as inductor would."""
    heads, d = 4, 6
    qk = torch.randn(37, 16, 2 * heads * d, requires_grad=True)
    v = torch.randn(37, 16, heads * d, requires_grad=True)
    fn = torch.compile(
        lambda a, b: torch.ops.tntp_triton.inner_attention(a, b, heads, d**-0.5).sum(),
        backend="aot_eager",
        fullgraph=True,
    )
    fn(qk, v).backward()
    ref_qk, ref_v = qk.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    kernel.reference(ref_qk, ref_v, heads, d**-0.5).sum().backward()
    torch.testing.assert_close(qk.grad, ref_qk.grad, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(v.grad, ref_v.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_cpu_training_step_is_unchanged_by_the_selection(precision):
    """inner_kernel=torch and auto on CPU: a training step bit-identical to a model that
    never went through the selection (the path the trainer took before the kernel existed)."""
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)

    def trained(mode):
        torch.manual_seed(0)
        model = tnt.create("tntp_tiny_patch8_32", num_classes=10, drop_path_rate=0.1).train()
        if mode:
            assert tnt.select_inner_kernel(mode, torch.device("cpu"), model)[0] == "torch"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return list(model.state_dict().values())

    before = trained(None)
    for mode in ("torch", "auto"):
        assert all(torch.equal(a, b) for a, b in zip(trained(mode), before)), mode
