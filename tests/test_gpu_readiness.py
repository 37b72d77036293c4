"""What only a GPU cluster would hit, pinned on CPU: the attention path per device and
shape, the MFU table, bf16 gradient settings, per-rank seeds, device binding, the
rendezvous address, and the collective timeout (a real 2-process group on gloo).
The CUDA side itself runs in test_gpu.py (marked gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from launch.local import free_port
from pipeline import config, mfu, tnt
from pipeline.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "device,dtype,head_dim,batch,path",
    [
        ("cuda", torch.bfloat16, 6, 128 * 196, "explicit"),  # TNT-S inner attention: never FlashAttention
        ("cuda", torch.bfloat16, 10, 64 * 196, "explicit"),  # TNT-B inner attention
        ("cuda", torch.float32, 6, 8 * 196, "explicit"),
        ("cuda", torch.bfloat16, 64, 128, "sdpa"),  # outer attention (head dim 64)
        ("cuda", torch.bfloat16, 64, 65535, "sdpa"),
        ("cuda", torch.bfloat16, 64, 65536, "explicit"),  # past the CUDA grid limit (pytorch#146704)
        ("cpu", torch.float32, 6, 8 * 196, "sdpa"),
        ("cpu", torch.bfloat16, 6, 8 * 196, "cpu_half"),
        ("mps", torch.float32, 64, 8, "explicit"),
    ],
)
def test_attention_path_per_device_dtype_and_shape(device, dtype, head_dim, batch, path):
    assert tnt.attention_path(device, dtype, head_dim, batch) == path


@pytest.mark.parametrize(
    "name,precision,peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.5),  # a substring match gave this the SXM figure
        ("NVIDIA H100 NVL", "bf16", 835.5),
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("NVIDIA H200", "tf32", 494.7),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "tf32", 156.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA GeForce RTX 4090", "bf16", None),  # not in the table: no MFU rather than a guess
        ("NVIDIA H100 80GB HBM3", "int8", None),
    ],
)
def test_mfu_peak_by_exact_device_name_and_precision(name, precision, peak):
    assert mfu.peak_tflops(name, precision) == peak


def test_mfu_counts_the_forward_training_runs():
    """With class-token pooling the last block computes one token: the step's FLOPs are
    that forward x 3, below the paper's full-block count."""
    model = tnt.create("tntp_s_patch16_224")
    as_run = tnt.count_flops(model, as_run=True)["flops"]
    full = tnt.count_flops(model)["flops"]
    assert 0.93 < as_run / full < 0.96  # 4.93 / 5.22 GMACs
    assert mfu.step_flops_per_image(model) == 3 * as_run
    assert mfu.matmul_precision("fp32", True) == "tf32" and mfu.matmul_precision("bf16", True) == "bf16"
    assert mfu.mfu(1000.0, 1e12, 1000.0) == pytest.approx(1.0) and mfu.mfu(1.0, 1.0, None) is None


def test_metrics_window_excludes_paused_time():
    from pipeline.metrics import MetricsProcessor

    m = MetricsProcessor([], 1, torch.device("cpu"), 1.0, None)
    with m.paused():
        time.sleep(0.2)
    assert m.excluded >= 0.2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_gradients_accumulate_and_reduce_in_fp32(stage):
    from pipeline.build import deepspeed_config

    t = config.TrainCfg(zero_stage=stage, precision="bf16", ema=stage < 3)
    ds = deepspeed_config(t, 0.0, 128)
    assert ds["communication_data_type"] == "fp32"
    # DeepSpeed has no fp32 accumulation without a ZeRO optimizer ("unsupported mix")
    assert ds.get("data_types") == (None if stage == 0 else {"grad_accum_dtype": "fp32"})
    fp32 = deepspeed_config(config.TrainCfg(zero_stage=stage, precision="fp32", ema=False), 1.0, 128)
    assert "data_types" not in fp32 and "communication_data_type" not in fp32 and fp32["gradient_clipping"] == 1.0


def test_each_rank_draws_its_own_random_numbers():
    from pipeline import distributed

    seeds = [distributed.rank_seed(0, r) for r in range(64)]
    assert len(set(seeds)) == 64 and seeds == [distributed.rank_seed(0, r) for r in range(64)]
    draws = []
    for rank in (0, 1):
        distributed.seed_rank(0, rank)
        draws.append(torch.rand(16))  # what DropPath draws its masks from
    assert not torch.equal(*draws)


def test_gpu_of_a_task_with_one_visible_device():
    from pipeline.distributed import cuda_device_index

    assert cuda_device_index(5, 1) == 0  # --gpus-per-task=1: every task sees device 0
    assert cuda_device_index(5, 8) == 5
    with pytest.raises(InputError, match="no CUDA device"):
        cuda_device_index(0, 0)


def test_rendezvous_address_is_never_loopback_across_nodes():
    sys.path.insert(0, ROOT)
    from launch.slurm import master_address

    assert master_address("localhost", None, 4) == "localhost"  # resolves
    assert master_address("no-such-node-x1", "10.0.0.7", 4) == "10.0.0.7"
    assert master_address("no-such-node-x1", None, 1) == "127.0.0.1"
    with pytest.raises(InputError, match="cannot rendezvous"):
        master_address("no-such-node-x1", None, 2)


def test_config_errors_at_load_time():
    with pytest.raises(InputError, match="train.precision must be"):
        config.load("", ["train.precision=fp8"])
    with pytest.raises(InputError, match="train.ema needs the full weights"):
        config.load("", ["train.zero_stage=3", "train.ema=true"])
    with pytest.raises(InputError, match="train.zero_stage must be"):
        config.load("", ["train.zero_stage=4"])


HANG = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch, torch.distributed as dist
    from pipeline.distributed import init_distributed
    rank, world, _ = init_distributed(timeout_s=float(sys.argv[2]))
    if rank == 1:
        time.sleep(120)  # alive, but never joins the collective (stuck in data loading, say)
    t = time.time()
    try:
        dist.all_reduce(torch.ones(1))
    except Exception as exc:
        print(f"raised after {time.time() - t:.1f}s: {type(exc).__name__}", flush=True)
        os._exit(1)
    """
)


def test_a_collective_gives_up_on_a_silent_rank_after_the_timeout(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), ROOT, "5"],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        out, _ = procs[0].communicate(timeout=90)
    finally:
        for p in procs:
            p.kill()
    assert "raised after" in out, out[-2000:]
    waited = float(out.split("raised after ")[1].split("s")[0])
    assert 4.0 <= waited < 30.0  # the configured 5 s, not gloo's 30 min default


def test_a_stale_deepspeed_build_lock_does_not_hang_the_process_group(tmp_path, monkeypatch):
    """DeepSpeed JIT-loads its shared-memory all-reduce op in init_distributed on CPU, and
    torch's loader waits forever on a lock file left by a process killed while loading it
    (this hung every training run of one whole CI run). The build is copied so that
    nothing compiles; the lock is an hour old."""
    import glob
    import shutil

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    name = get_accelerator().create_op_builder("ShareMemCommBuilder").name
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from pipeline.distributed import init_distributed; init_distributed(30)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    built = _get_build_directory(name, verbose=False)
    if not glob.glob(os.path.join(built, "*.so")):  # the first load on this machine: build it once
        subprocess.run([sys.executable, "-c", code, ROOT], env=env, check=True, capture_output=True, timeout=600)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    copy = _get_build_directory(name, verbose=False)
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("lock"), dirs_exist_ok=True)
    lock = os.path.join(copy, "lock")
    open(lock, "w").close()
    os.utime(lock, (time.time() - 3600,) * 2)
    done = subprocess.run(
        [sys.executable, "-c", code, ROOT],
        env=dict(env, TORCH_EXTENSIONS_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "removed a stale build lock" in done.stderr, done.stderr[-2000:]
    assert not os.path.exists(lock)


COMPILE_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch._dynamo.utils as du
    from pipeline import config
    from pipeline.train import Trainer
    trainer = Trainer(config.load(sys.argv[2], sys.argv[3:]))
    seen, log = {}, trainer.metrics.log
    def counting_log(step, *args, **kwargs):
        seen[step] = [du.counters["stats"]["unique_graphs"], du.counters["frames"]["ok"]]
        return log(step, *args, **kwargs)
    trainer.metrics.log = counting_log
    trainer.run()
    print(json.dumps({"compiled": trainer.parts.compiled, "seen": seen}))
    """
)


@pytest.mark.slow
def test_compiled_training_does_not_recompile_every_step(demo_shards, tmp_path):
    """train.compile=true on CPU (off there by default): one graph, no new compilation
    after the first steps (dynamo's counters per step), and the EMA and export work."""
    script = tmp_path / "probe.py"
    script.write_text(COMPILE_PROBE)
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            ROOT,
            os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
            f"train.out={out}",
            f"data.train={demo_shards['train']}",
            "data.val=",
            "train.max_steps=6",
            "train.log_every=1",
            "train.compile=true",
            "data.workers=1",
            "mlflow.register_as=",
            "mlflow.system_metrics=false",
        ],
        env=dict(os.environ, MLFLOW_TRACKING_URI="", OMP_NUM_THREADS="2"),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = {int(k): v for k, v in result["seen"].items()}
    assert result["compiled"] and "| compiled" in proc.stderr
    assert seen[1][0] >= 1  # the model was compiled
    assert seen[3] == seen[6], seen  # steps 4-6 compiled nothing new
    assert (out / "export" / "model.safetensors").is_file() and (out / "export" / "model_ema.safetensors").is_file()


def test_ema_without_timms_dtype_argument_is_float32_and_matches(monkeypatch):
    """timm 1.0.29 (a GPU machine's image) has no ModelEmaV3(dtype=): the EMA then
    makes its copy float32 and updates it itself, to the same values as timm's own."""
    from pipeline.build import EMA

    torch.manual_seed(0)
    model = tnt.create("tntp_tiny_patch8_32", num_classes=10).to(torch.bfloat16)
    new, old = EMA(model, 0.9), EMA(model, 0.9)
    assert not new.cast
    old.cast = True  # the path taken when timm's signature lacks dtype
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        new.update(model)
        old.update(model)
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert a.dtype == b.dtype == (torch.float32 if a.is_floating_point() else a.dtype), name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
