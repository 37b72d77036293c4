"""Tests that need a CUDA device (marked ``gpu``; skipped on CPU with the reason).
``bench/gpu_check.sh`` runs them on a lent GPU machine. What can be pinned on CPU (the
path choice, the MFU table, the seeds) is tested in test_gpu_readiness.py."""

from __future__ import annotations

import pytest
import torch

from pipeline import tnt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run bench/gpu_check.sh on one)"),
]


def reference_attention(q, k, v):
    """float32 softmax(q kᵀ / sqrt(d)) v."""
    q, k, v = q.float(), k.float(), v.float()
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v


@pytest.mark.parametrize("batch,heads,tokens,dim", [(8 * 196, 4, 16, 6), (8 * 196, 4, 16, 10), (8, 6, 197, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_on_cuda_matches_float32_reference(batch, heads, tokens, dim, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, device="cuda", generator=g).to(dtype) for _ in range(3))
    expect = "explicit" if dim < 32 else "sdpa"
    assert tnt.attention_path("cuda", dtype, dim, batch) == expect
    out = tnt.attention(q, k, v)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3  # TF32 matmuls are on in the trainer; here default
    assert (out.float() - reference_attention(q, k, v)).abs().max().item() < tol


def test_inner_attention_past_the_cuda_grid_limit():
    """micro-batch 400 x 196 patches = 78,400 sequences, past SDPA's 65,535 grid limit
    (pytorch issue 146704): our path runs and is right."""
    batch = 400 * 196
    q, k, v = (torch.randn(batch, 4, 16, 6, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = tnt.attention(q, k, v)
    torch.cuda.synchronize()
    ref = reference_attention(q[-64:], k[-64:], v[-64:])
    assert (out[-64:].float() - ref).abs().max().item() < 2e-2


def test_tnt_s_trains_on_cuda_in_bf16_close_to_float32():
    torch.manual_seed(0)
    model = tnt.create("tntp_s_patch16_224", num_classes=10).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x)
    assert (got.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_cuda_rng_state_is_saved_and_restored():
    from pipeline.checkpoint import rng_state, set_rng_state

    state = rng_state()
    assert "cuda" in state
    a = torch.rand(8, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(8, device="cuda"), a)


def test_this_gpu_is_in_the_mfu_table():
    from pipeline import mfu

    name = torch.cuda.get_device_name()
    if not any(part in name for part in ("H100", "H200", "A100", "GH200", "L40S")):
        pytest.skip(f"{name!r} is not a part the table covers")
    assert mfu.peak_tflops(name, "bf16"), f"{name!r} (as torch reports it) is missing from pipeline/mfu.py"


def test_device_finish_on_cuda_is_deterministic_and_leaves_the_training_rng_alone():
    """data.finish=device on the GPU: uint8 batch in, normalised/erased/mixed on CUDA,
    the same twice for the same (seed, epoch, rank, batch); the CUDA RNG (DropPath)
    does not move; without erasing, equal to the CPU computation."""
    import dataclasses

    from pipeline.transforms import Augment, DeviceFinish

    aug = Augment(img_size=32, re_prob=1.0)
    batch = {
        "image": torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8),
        "label": torch.arange(8) % 5,
        "epoch": 2,
        "index": 7,
    }
    finish = DeviceFinish(aug, 5, True, seed=1, rank=3, device=torch.device("cuda"))
    torch.cuda.manual_seed(11)
    a = finish(dict(batch))
    after = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(11)
    b = finish(dict(batch))
    assert torch.equal(after, torch.rand(4, device="cuda"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].is_cuda
    plain = dataclasses.replace(aug, re_prob=0.0)
    on_gpu = DeviceFinish(plain, 5, True, seed=1, rank=3, device=torch.device("cuda"))(dict(batch))
    on_cpu = DeviceFinish(plain, 5, True, seed=1, rank=3, device=torch.device("cpu"))(dict(batch))
    assert torch.allclose(on_gpu[0].cpu(), on_cpu[0], atol=1e-5) and torch.allclose(on_gpu[1].cpu(), on_cpu[1])


# The Triton inner attention (pipeline/kernels/inner_attention_triton.py) at real sizes:
# TNT-S and TNT-B at micro-batch 64 (64 x 196 patches = 12,544 sequences of 16 pixels).
# The same checks run on CPU under Triton's interpreter at small sizes (test_triton_kernels.py).
@pytest.mark.parametrize("heads,head_dim", [(4, 6), (4, 10)], ids=["tnt_s", "tnt_b"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_inner_attention_at_real_sizes_matches_the_reference(heads, head_dim, dtype):
    pytest.importorskip("triton")
    from test_triton_kernels import errors, within

    from pipeline.kernels import inner_attention_triton as kernel

    err = errors(kernel.inner_attention, heads, head_dim, 16, 64 * 196, dtype)
    if dtype == torch.float32:  # GPU exp and fma differ from the reference's in the last bits
        assert all(err[n] <= kernel.TOLERANCE[dtype] for n in ("output", "dqk", "dv")), err
    else:
        assert within(err, dtype), err


def test_auto_selects_the_triton_kernel_on_cuda_and_the_compiled_model_matches():
    """inner_kernel=auto passes its self-check here; TNT-S in bf16 autocast, eager and
    torch.compile(fullgraph=True) through the custom ops, agrees with torch's path."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = tnt.create("tntp_s_patch16_224", num_classes=10).cuda()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x).float()
        path, why = tnt.select_inner_kernel("auto", torch.device("cuda"), model)
        assert path == "triton", why
        eager = model(x).float()
        compiled = torch.compile(model, fullgraph=True)(x).float()
    scale = ref.abs().max().item()
    for got in (eager, compiled):
        assert (got - ref).abs().max().item() < 0.05 * scale
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
