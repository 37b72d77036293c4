"""Recovery after a fault: a training job that ended badly is looked at by a small
companion job, which decides whether to resubmit it (``launch/slurm.py --max-failures``).

submitit requeues a job only on USR2 (time limit, preemption). A job that *fails*
(a rank killed, a node lost, a lost peer) is resubmitted by a small companion job
that Slurm itself starts only if the training job ends badly
(``--dependency=afternotok:<id>``; with ``--kill-on-invalid-dep=yes`` Slurm drops it
when the job succeeds). It looks at how the job ended (:func:`job_state`,
:func:`task_statuses`), and either submits the next attempt (training job + its own
companion) or says why not (:func:`decide`). So recovery needs no process left running
on the login node, one attempt runs at a time (the next is submitted only after the
previous one has left the queue, and train.out is locked by its rank 0:
pipeline/runlock.py), and a Slurm requeue (node failure with JobRequeue, or
submitit's on USR2) keeps the same job id, so the companion waits for it. The chain
is written to <train.out>/attempts.jsonl; ``--wait`` follows it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time

ATTEMPTS = "attempts.jsonl"
FAULT_STATES = ("FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


@dataclasses.dataclass(frozen=True)
class Submission:
    """What submitting a training attempt needs of ``launch/slurm.py``'s command line
    (see its ``--help``): the companion job carries it to the next attempt."""

    nodes: tuple[int, int]
    gpus_per_node: int
    cpus_per_task: int
    partition: str
    account: str
    qos: str
    time: int
    mem: int
    constraint: str
    sbatch: tuple[str, ...]
    signal_delay: int
    max_requeues: int
    max_failures: int
    failure_backoff: float
    job_name: str
    folder: str
    dry_run: bool

    @classmethod
    def of(cls, args) -> "Submission":
        """From the parsed command line (an ``argparse.Namespace``)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "nodes": tuple(values["nodes"]), "sbatch": tuple(values["sbatch"])})

    def companion(self, job_id: str) -> "Submission":
        """The companion's own job: one small task, started only if ``job_id`` ends badly."""
        return dataclasses.replace(
            self,
            nodes=(1, 1),
            gpus_per_node=0,
            cpus_per_task=1,
            time=15,
            mem=0,
            job_name=f"{self.job_name}-recover",
            sbatch=(*self.sbatch, f"dependency=afternotok:{job_id}", "kill_on_invalid_dep=yes"),
        )


def decide(
    state: str | None, statuses: list[int | None], resubmissions: int, max_failures: int, space_ok: bool = True
) -> tuple[bool, str]:
    """(resubmit?, why) for a training job that did not end well.

    ``state``: Slurm's JobState (None if Slurm no longer knows the job); ``statuses``:
    each task's trainer exit status from submitit's result files (0 done, None: no
    result, the task was killed or crashed)."""
    if state in ("CANCELLED",):
        return False, "the job was cancelled: not resubmitted"
    if state in ("TIMEOUT", "DEADLINE"):
        return False, "the time limit was reached with --max-requeues spent: not resubmitted"
    if 2 in statuses:
        return False, "an input, config or training error (exit status 2): retrying cannot help"
    if 3 in statuses:
        return False, "checkpointed at the time limit with --max-requeues spent (exit status 3): not resubmitted"
    if statuses and all(s == 0 for s in statuses):
        return False, "the job finished"
    if state not in (None, *FAULT_STATES):
        return False, f"the job ended {state}: not resubmitted"
    if resubmissions >= max_failures:
        return False, f"gave up: {resubmissions} resubmission(s) after faults, --max-failures {max_failures}"
    if 4 in statuses and not space_ok:
        return False, "a checkpoint could not be written and train.out still lacks the space: not resubmitted"
    return True, "a fault (" + ", ".join(
        "killed or crashed" if s is None else f"exit status {s}" for s in statuses
    ) + ")"


def job_state(job_id: str) -> tuple[str | None, str]:
    """(JobState, NodeList) as slurmctld still knows them (MinJobAge after the end)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), fields.get("NodeList", "")


def task_statuses(results: list[str]) -> list[int | None]:
    """Each task's trainer exit status from submitit's result file (None: none written)."""
    import re

    from submitit.core.utils import pickle_load

    statuses: list[int | None] = []
    for path in results:
        if not os.path.exists(path):
            statuses.append(None)
            continue
        outcome, value = pickle_load(path)
        found = re.search(r"training exited with status (\d+)", str(value)) if outcome != "success" else None
        statuses.append(0 if outcome == "success" else int(found.group(1)) if found else None)
    return statuses


def space_after_full_disk(out: str) -> bool:
    """Whether train.out now has room for another checkpoint as large as the last one
    (the trainer's own rule: pipeline/checkpoint.py)."""
    from pipeline import checkpoint, failures

    tag = failures.resume_point(out)
    needed = checkpoint.written_bytes(os.path.join(out, "checkpoints", tag)) if tag else 0
    return checkpoint.has_room(checkpoint.free_bytes(out), needed)


def append_attempt(out: str, entry: dict) -> None:
    os.makedirs(out, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **entry}
    with open(os.path.join(out, ATTEMPTS), "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_attempts(out: str) -> list[dict]:
    from pipeline import failures

    return failures.read(out, ATTEMPTS)


class RecoverJob:
    """The companion of a training job: runs only if it ended badly (afternotok).
    ``resubmit``: ``launch.slurm.submit_chain``, passed in (this module does not import
    the launcher that imports it)."""

    def __init__(
        self,
        settings: Submission,
        trainer_args: list[str],
        workdir: str,
        job_id: str,
        results: list[str],
        resubmissions: int,
        resubmit,
    ):
        self.settings, self.trainer_args, self.workdir = settings, list(trainer_args), workdir
        self.job_id, self.results, self.resubmissions = job_id, list(results), resubmissions
        self.resubmit = resubmit

    def __call__(self) -> str:
        os.chdir(self.workdir)
        from pipeline import config, failures

        s = self.settings
        out = os.path.abspath(config.load_argv(self.trainer_args).out_dir)
        state, nodes = job_state(self.job_id)
        statuses = task_statuses(self.results)
        space_ok = 4 not in statuses or space_after_full_disk(out)
        again, why = decide(state, statuses, self.resubmissions, s.max_failures, space_ok)
        if state is not None and state != "CANCELLED":
            said = {
                r["rank"]: r["kind"]
                for r in failures.read(out)
                if r.get("job") == str(self.job_id) and r.get("rank") is not None
            }
            failures.record(
                out,
                f"job {state}",
                job_summary(self.job_id, state, nodes, statuses, said),
                None,
                job=str(self.job_id),
                resubmission=self.resubmissions,
                host=nodes or None,
            )
        entry = {"after": str(self.job_id), "state": state, "statuses": statuses, "resubmit": again, "why": why}
        if not again:
            append_attempt(out, entry)
            print(f"job {self.job_id} ended {state}: {why}", flush=True)
            return why
        time.sleep(min(60.0, s.failure_backoff * (self.resubmissions + 1)))
        for key in [k for k in os.environ if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del os.environ[key]  # this job's own settings must not leak into the next one's srun
        job, _ = self.resubmit(s, self.trainer_args, self.workdir, self.resubmissions + 1, out, entry)
        print(
            f"job {self.job_id} ended {state}: {why}; resubmitted as job {job.job_id} "
            f"({self.resubmissions + 1} of --max-failures {s.max_failures}), resuming from "
            f"{failures.resume_point(out) or 'the start'}",
            flush=True,
        )
        return job.job_id


def job_summary(job_id: str, state: str, nodes: str, statuses: list[int | None], said: dict[int, str]) -> str:
    """One line on how a job ended: per rank (submitit's task = global rank) and host,
    what it recorded itself (``said``: rank -> kind from failures.jsonl), its exit
    status, or that it left nothing (killed from outside, or its node went down)."""
    hosts = (
        subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True).stdout.split()
        if nodes
        else []
    )
    per_node = max(1, -(-len(statuses) // max(1, len(hosts))))  # Slurm's default block distribution

    def who(r: int) -> str:
        return f"rank {r} ({hosts[r // per_node] if r // per_node < len(hosts) else '?'})"

    silent = [who(r) for r, s in enumerate(statuses) if s is None and r not in said]
    told = [f"{who(r)}: {said[r]}" for r in sorted(said)]
    exits = [f"{who(r)}: exit status {s}" for r, s in enumerate(statuses) if s not in (None, 0) and r not in said]
    return (
        f"Slurm job {job_id} ended {state} on {nodes or '?'}"
        + (
            f"; killed without a word (from outside, the OOM killer, or its node went down): {', '.join(silent)}"
            if silent
            else ""
        )
        + "".join(f"; {x}" for x in told + exits)
    )
