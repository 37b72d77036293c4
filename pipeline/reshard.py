"""Optimizer state by parameter name: what a ZeRO-1/2/3 run needs to go on with
another number of ranks.

DeepSpeed saves the fp32 master weights and Adam's moments as each rank's partition
of flat buffers, so its checkpoint only loads on the world size that wrote it. Its
"universal checkpoint" converts offline (``ds_to_universal.py``, sometimes with
``--inject_missing_state``) and has open ZeRO-3 bugs. Here the same state goes through
DeepSpeed's public per-parameter accessors instead (``deepspeed.utils.safe_get_full_*``
/ ``safe_set_full_*``), which hide every stage's layout (BF16_Optimizer for ZeRO-1 in
bf16, the ZeRO-1/2 optimizer, ZeRO-3):

* :func:`gather` assembles, on every rank, each parameter's fp32 master and moments,
  keyed ``<name>:fp32``, ``<name>:exp_avg``, ``<name>:exp_avg_sq``, plus Adam's step
  count; :func:`save` writes them as safetensors (no pickle).
* :func:`load` puts such a state into an engine on any number of ranks: it first makes
  the optimizer create its (lazily made) state with one AdamW step at lr 0 on zero
  gradients, which changes no weight, then sets every rank's fragments, the step
  count, and the 16-bit weights from the masters.

Every function here synchronizes ranks (the accessors all-reduce or gather).
ZeRO-0 keeps no partitioned state (DeepSpeed's own checkpoint is the same on every
rank): not handled here.
"""

from __future__ import annotations

import contextlib

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def _trained(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _base(engine) -> torch.optim.Optimizer:
    if engine.zero_optimization_stage() == 0 and not hasattr(engine.optimizer, "optimizer"):
        raise ValueError("ZeRO stage 0 keeps no partitioned optimizer state: nothing to reshard")
    return engine.optimizer.optimizer  # the torch AdamW over the flat fp32 partitions


def adam_step(engine) -> int:
    """Adam's step count (bias correction), the same in every state entry; 0 before any step."""
    steps = {int(s["step"]) for s in _base(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's step counts differ between partitions: {sorted(steps)}")
    return steps.pop() if steps else 0


def gather(engine, keep: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """({"<name>:fp32" | "<name>:exp_avg" | "<name>:exp_avg_sq": full fp32 tensor on the
    CPU}, Adam's step count); every rank takes part, only ``keep`` ranks hold the
    tensors (the others get an empty dict). Synchronizes ranks."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = adam_step(engine)
    if step:
        _link_state(engine)
    state = {}
    for name, p in _trained(engine):
        fp32 = safe_get_full_fp32_param(p)
        moments = [safe_get_full_optimizer_state(p, key) if step else None for key in MOMENTS]
        if not keep:
            continue
        state[f"{name}:fp32"] = fp32.detach().float().cpu().clone()
        for key, full in zip(MOMENTS, moments):
            state[f"{name}:{key}"] = (
                torch.zeros_like(state[f"{name}:fp32"]) if full is None else full.detach().float().cpu().clone()
            )
    return state, step


def save(path: str, state: dict[str, torch.Tensor], step: int) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"adam_step": str(step)})


def read(path: str) -> tuple[dict[str, torch.Tensor], int]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        step = int(f.metadata()["adam_step"])
    return load_file(path), step


def _zero_step(base: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """One AdamW step at lr 0 on zero gradients: creates the state, moves nothing
    (the moments stay zero, the update and the weight decay are scaled by lr = 0)."""
    lrs = [g["lr"] for g in base.param_groups]
    for g in base.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    base.step()
    for g, lr in zip(base.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None


def _create_state(engine) -> None:
    opt, base = engine.optimizer, _base(engine)
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: a sub-group's buffer joins its group for its step
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            group = base.param_groups[opt.sub_group_to_group_id[i]]
            kept, group["params"] = group["params"], [flat]
            _zero_step(base, [flat])
            group["params"] = kept
    else:  # ZeRO-1/2 and BF16_Optimizer
        _zero_step(base, [p for g in base.param_groups for p in g["params"]])
        _link_state(engine)


def _link_state(engine) -> None:
    """ZeRO-1/2 and BF16_Optimizer: point each parameter's fragment map at the Adam
    state. DeepSpeed links it after the first step, but its own load_checkpoint makes
    new fragment maps without it and keeps the 'linked' flag, so a resumed run's
    accessors found no state; this links again whenever a map lacks it."""
    opt = engine.optimizer
    if not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        return  # ZeRO-3 reads its state directly
    mapped = [p._hp_mapping for _, p in _trained(engine) if getattr(p, "_hp_mapping", None) is not None]
    if any(m.optim_fragment is None or not m.optim_fragment for m in mapped):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _set_z3(opt, p: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """ZeRO-3: this rank's partition of ``value``. DeepSpeed's ``safe_set_full_*`` cut
    the last rank's partition out of the unpadded tensor and fail when the parameter's
    size is not a multiple of the world size ("start + length exceeds dimension size",
    seen with 3 ranks); the local setter with our own padded cut does the same job."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    n = p.ds_tensor.ds_numel  # per-rank partition, padded
    padded = torch.zeros(n * (opt._get_param_partition_rank(p) + 1), dtype=value.dtype, device=value.device)
    flat = value.flatten()[: padded.numel()]
    padded[: flat.numel()] = flat
    mine = padded[-n:]
    if key is None:
        safe_set_local_fp32_param(p, mine)
    else:
        safe_set_local_optimizer_state(p, mine, key)


def load(engine, state: dict[str, torch.Tensor], step: int) -> None:
    """Set ``engine``'s fp32 masters, moments, Adam step count and 16-bit weights from
    a :func:`gather` state of any world size. Synchronizes ranks."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    params = _trained(engine)
    missing = sorted({n for n, _ in params} - {k.rsplit(":", 1)[0] for k in state})
    if missing:
        raise ValueError(f"the optimizer state has no entry for {len(missing)} parameters ({missing[0]}, ...)")
    if not _base(engine).state:
        _create_state(engine)
    for name, p in params:
        for key in (None, *MOMENTS):
            value = state[f"{name}:{key or 'fp32'}"].to(p.device)
            if hasattr(p, "ds_id"):
                _set_z3(engine.optimizer, p, value, key)
            elif key is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, key)
    for s in _base(engine).state.values():
        s["step"] = torch.full_like(s["step"], step) if torch.is_tensor(s["step"]) else step
    z3 = engine.zero_optimization_stage() == 3
    gathered = (
        deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0) if z3 else contextlib.nullcontext()
    )
    with gathered, torch.no_grad():  # the 16-bit weights the forward uses: the masters, rounded
        for name, p in params:
            p.copy_(state[f"{name}:fp32"].to(p.device, p.dtype))
