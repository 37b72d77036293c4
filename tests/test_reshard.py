"""Optimizer state by parameter name (pipeline/reshard.py): written by 2 ranks, put
into engines on 1 and on 3 ranks, for ZeRO-1 (BF16_Optimizer), ZeRO-2 and ZeRO-3 in
bf16; the fp32 masters, both Adam moments and the step count read back equal, by
name, to what was saved, and training goes on from there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from launch.local import free_port

pytestmark = pytest.mark.slow  # DeepSpeed engines on 1-3 ranks: bash .ci/run -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    import torch, deepspeed
    from pipeline import reshard, tnt
    from pipeline import distributed
    from pipeline.distributed import init_distributed
    mode, folder = sys.argv[2], sys.argv[3]
    rank, world, _ = init_distributed(120)
    report = {}
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = tnt.create("tntp_tiny_patch8_32", num_classes=10, img_size=32)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4 * world,
               "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
               "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"},
               "steps_per_print": 1 << 30}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        torch.manual_seed(1 + rank)

        def train_step():
            x, y = torch.randn(4, 3, 32, 32, dtype=torch.bfloat16), torch.randint(0, 10, (4,))
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            return loss.item()

        path = os.path.join(folder, f"zero{stage}.safetensors")
        if mode == "save":
            for _ in range(3):
                train_step()
            state, step = reshard.gather(engine)
            if rank == 0:
                reshard.save(path, state, step)
            if stage >= 2:  # DeepSpeed's own consolidation of the same moment: an independent reference
                engine.save_checkpoint(os.path.join(folder, f"ds{stage}"), tag="t")
        else:
            saved, step = reshard.read(path)
            reshard.load(engine, saved, step)
            got, got_step = reshard.gather(engine)
            err = max((got[k] - saved[k]).abs().max().item() for k in saved)
            lp = {n: p for n, p in engine.module.named_parameters()}

            def lp_error() -> float:
                errors = [(p.float() - saved[f"{n}:fp32"].to(p.dtype).float()).abs().max() for n, p in lp.items()]
                return max(e.item() for e in errors)

            if stage == 3:
                with deepspeed.zero.GatheredParameters(list(lp.values())):
                    lp_err = lp_error()
            else:
                lp_err = lp_error()
            loss = train_step()
            ref_err = None
            if stage >= 2 and rank == 0:  # the file's masters against DeepSpeed's own zero_to_fp32
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                from pipeline.checkpoint import weights_only_loads
                with weights_only_loads():
                    ref = get_fp32_state_dict_from_zero_checkpoint(os.path.join(folder, f"ds{stage}"), tag="t")
                ref_err = max((saved[n + ":fp32"] - ref[n].float()).abs().max().item() for n in ref)
            # every element of every moment set (a rank's zeroed partition would leave part of a tensor 0)
            report[stage] = {"keys": sorted(got) == sorted(saved), "err": err, "step": [step, got_step],
                             "after": reshard.adam_step(engine), "lp_err": lp_err, "loss": loss, "ref_err": ref_err,
                             "moments": min((saved[k] != 0).float().mean().item()
                                            for k in saved if k.endswith("exp_avg_sq"))}
    if rank == 0:
        print("REPORT " + json.dumps(report), flush=True)
    # Leave the group together, the store's host (rank 0) last, as the trainer does.
    # Without this, rank 1 once aborted at exit in a full suite run ("terminate called
    # without an active exception"), after rank 0 had printed its report; rank 0 exiting
    # first with rank 1 still in the group is the likely cause (not reproduced alone).
    torch.distributed.barrier()
    distributed.close()
    open(os.path.join(folder, f"closed-{mode}-{world}-{rank}"), "w").close()
    if rank == 0:
        import time
        deadline = time.time() + 60
        while time.time() < deadline and not all(
                os.path.exists(os.path.join(folder, f"closed-{mode}-{world}-{r}")) for r in range(world)):
            time.sleep(0.05)
    # The work is done and reported. Rank 1 still aborted at exit once more, after all of
    # the above (full suite, 2026-12-07: "terminate called without an active exception",
    # a C++ thread's destructor at interpreter teardown): skip the teardown, which this
    # test does not test.
    sys.stdout.flush()
    os._exit(0)
    """
)


def run(script: str, folder: str, mode: str, world: int, port: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, script, ROOT, mode, folder],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    try:
        outs = [p.communicate(timeout=400)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs[0]


def test_optimizer_state_saved_on_2_ranks_loads_on_1_and_on_3(tmp_path):
    script = tmp_path / "reshard.py"
    script.write_text(SCRIPT)
    run(str(script), str(tmp_path), "save", 2, free_port())
    for world in (1, 3):
        out = run(str(script), str(tmp_path), "load", world, free_port())
        report = json.loads(out.split("REPORT ")[1].splitlines()[0])
        for stage, r in report.items():
            where = f"ZeRO-{stage} on {world} ranks: {r}"
            assert r["keys"] and r["err"] == 0.0, where  # masters and moments, by name, exactly
            assert r["step"] == [3, 3] and r["after"] == 4, where  # bias correction goes on from step 3
            assert r["lp_err"] == 0.0, where  # the 16-bit weights are the masters, rounded
            assert math.isfinite(r["loss"]) and r["moments"] > 0.95, where  # training goes on; the moments were real
            # the file holds what the 2-rank engine had (DeepSpeed's own consolidation, ZeRO-2/3)
            assert r["ref_err"] == 0.0 if stage in ("2", "3") else r["ref_err"] is None, where
