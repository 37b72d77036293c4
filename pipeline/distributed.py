"""Process group, device and per-rank seeds: what every rank sets up before the model.

Rank, world size and rendezvous come from the usual environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun and our launchers set
them; with none set it is one process. NCCL on GPUs, gloo on CPU (DeepSpeed's CPU
accelerator). Every collective of the process group has a timeout
(``train.dist_timeout_s``): a rank that dies leaves the others waiting that long at
most, not the 10-30 minutes of the defaults.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket

import torch
import torch.distributed as dist

from pipeline.errors import InputError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a task. Sites that bind one GPU per task (``--gpus-per-task``,
    ``--gpu-bind``) show each task one device, index 0, whatever its local rank; so the
    local rank is taken modulo the devices this task can see."""
    if device_count < 1:
        raise InputError("no CUDA device is visible to this task (CUDA_VISIBLE_DEVICES, --gpus-per-task)")
    return local_rank % device_count


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; one process if unset.

    Synchronizes ranks: every rank blocks here until all have joined (or the timeout)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from pipeline.compat import clear_stale_build_lock

        # on its CPU accelerator DeepSpeed JIT-loads its shared-memory all-reduce here
        shm = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if shm is not None:
            clear_stale_build_lock(shm.name)
        if torch.cuda.is_available():
            torch.cuda.set_device(cuda_device_index(local, torch.cuda.device_count()))
            # a rank that fails a collective makes the others raise instead of hang
            env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return rank, world, local


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def rank_seed(seed: int, rank: int) -> int:
    """A seed of its own for each rank, drawn from the run's seed: DropPath masks and
    any other random draw in the model differ between ranks (with one seed for all,
    every rank dropped the same paths for its different samples)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:rank{rank}".encode()).digest()[:4], "little")


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch (CPU and every CUDA device) for this rank; after the model is built
    from the run's seed, which is the same on every rank."""
    torch.manual_seed(rank_seed(seed, rank))


def agree_any(flags: list[bool | torch.Tensor], dev: torch.device) -> list[bool]:
    """Synchronizes ranks: one all-reduce (MAX) of ``flags`` (Python bools or 0-d
    tensors on ``dev``); True where any rank has it set. Ranks must branch on these
    agreed values only, never on their own flag. On ``dev`` (NCCL reduces CUDA
    tensors only); the Python flags cross to it in one copy."""
    host = torch.tensor([float(f) if isinstance(f, bool) else 0.0 for f in flags], device=dev)
    on_dev = [i for i, f in enumerate(flags) if isinstance(f, torch.Tensor)]
    if on_dev:
        host[on_dev] = torch.stack([flags[i].to(torch.float32).reshape(()) for i in on_dev])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(host, op=dist.ReduceOp.MAX)
    return [v > 0 for v in host.tolist()]  # one device sync for all flags


def barrier() -> None:
    """Synchronizes ranks."""
    dist.barrier()


def close() -> None:
    """Leave the process group (no collective may follow on this rank)."""
    if dist.is_initialized():
        dist.destroy_process_group()
