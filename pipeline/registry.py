"""What goes into the MLflow Model Registry, when, and the lineage each version carries.

When (``mlflow.register_best``): at every evaluation whose top-1 beats the best so far
(of the weights chosen), so that a run killed late leaves its best model registered,
and at the end (alias ``last``; the end's evaluation, when it is the best, is the same
version). The ``best`` alias follows the best ``top1`` tag across all versions of the
name (:meth:`pipeline.tracking.Tracker.register`).

Which weights (``mlflow.register_weights``): ``auto`` takes the better top-1 of the
model and its EMA at that evaluation, or ``model``, or ``ema``; tag ``weights``.

Lineage, as version tags (the config itself is the model's ``artifacts/config.yaml``):

* ``git.commit``, ``git.dirty``: the code that trained it;
* ``config.sha256``: of the config (canonical JSON of every key);
* ``data.train.manifest``, ``data.train.sha256`` (and ``data.val.*``): the manifests;
* ``checkpoint``, ``step``, ``epoch``: the checkpoint saved at the step it comes from;
* ``attempts``, ``requeues``, ``world_sizes``, ``faults``: the run's history until
  then (attempts that started training; requeues on the time-limit signal; the world
  size of each attempt; records in ``failures.jsonl``);
* ``top1``/``top5`` of the registered weights, ``model.top1``/``model.top5`` and
  ``ema.top1``/``ema.top5`` of both;
* ``run_id``, ``variant``, ``weights``, ``logged_model`` (its id: its page has the
  metrics); ``parent.*`` when it was fine-tuned from ``model.init_from``
  (``pipeline/pretrained.py``): the parent's URI, registered name and version, run and
  weights sha256.

Every rank keeps the same state (the evaluations it decides on are all-reduced); only
rank 0 talks to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

from pipeline import export as export_mod
from pipeline import visualize
from pipeline.checkpoint import tag_of
from pipeline.failures import FILE as FAILURES_FILE


def git_state(path: str) -> dict[str, str]:
    """The commit of the checkout holding ``path`` and whether it has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain"))).lower()}
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown (not a git checkout)", "git.dirty": "unknown"}


def config_sha256(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def first_image(manifest) -> bytes | None:
    """The encoded image of the manifest's first sample: the model's input example."""
    from pipeline.manifest import _Reporter, _Sequence

    for _, sample in _Sequence(manifest, list(range(len(manifest.urls)))).fetch([0], _Reporter("input example")):
        for key in ("jpg", "jpeg", "png", "webp"):
            if key in sample:
                return bytes(sample[key])
    return None


class Registrar:
    """Decides on, and (rank 0) makes, the registrations of a run."""

    def __init__(
        self,
        cfg,
        tracker,
        out: str,
        classes: tuple[str, ...],
        manifests: dict,
        parent: dict | None = None,
        num_params: int = 0,
    ):
        self.cfg, self.tracker, self.out = cfg, tracker, out
        self.num_params = num_params
        self.classes = classes
        self.manifests = manifests  # {"train": Manifest, "val": Manifest or None}
        self.parent = parent or {}
        self.name = cfg.named(cfg.mlflow.register_as) if cfg.mlflow.register_as else ""
        self.best_top1 = -1.0  # of the registered weights
        self.best_step: int | None = None
        self.best_version: str | None = None  # rank 0's
        self.attempts, self.requeues, self.world_sizes = 0, 0, []
        self._example: bytes | None = None

    def state_dict(self) -> dict:
        return {
            "best_top1": self.best_top1,
            "best_step": self.best_step,
            "best_version": self.best_version,
            "attempts": self.attempts,
            "requeues": self.requeues,
            "world_sizes": self.world_sizes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_top1, self.best_step = float(state["best_top1"]), state["best_step"]
        self.best_version = state["best_version"]
        self.attempts, self.requeues = int(state["attempts"]), int(state["requeues"])
        self.world_sizes = list(state["world_sizes"])

    def start_run(
        self,
        run_id: str | None,
        writer: bool,
        changed: list[str] | None,
        step: int,
        run_params: dict,
        layout_change: str | None,
    ) -> str | None:
        """The MLflow run, new or continued (``changed``: None for a new run, else the
        schedule keys its resume changed): ``config.yaml`` and the parameters once (by the
        ``writer``, rank 0), a tag for each change of schedule or layout. Returns its id."""
        cfg = self.cfg
        if writer:
            import yaml

            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)
        run_id = self.tracker.start(run_id, cfg.named(cfg.mlflow.run_name or cfg.name), cfg.mlflow.system_metrics)
        if writer and changed is None:
            self.tracker.params(cfg.resolved())  # train.out=runs/tiny-cpu, not runs/{name}
            self.tracker.params(
                {
                    **run_params,
                    **{
                        f"{split}_data.{k}": v
                        for split, m in (("train", self.manifests["train"]), ("val", self.manifests["val"]))
                        if m is not None
                        for k, v in m.summary().items()
                    },
                }
            )
            self.tracker.artifact(os.path.join(self.out, "config.yaml"))
        if changed:
            self.tracker.tags({f"schedule_change.step{step}": "; ".join(changed)})
        if layout_change and changed is not None:
            self.tracker.tags(
                {
                    f"layout_change.step{step}": layout_change,
                    f"global_batch.step{step}": str(run_params["global_batch"]),
                }
            )
        return run_id

    def requeued(self) -> None:
        """The run is checkpointed and requeued on the time-limit signal."""
        self.requeues += 1

    def start_attempt(self, world: int) -> None:
        self.attempts += 1
        self.world_sizes.append(world)

    def choose(self, res: dict | None) -> str:
        """``model`` or ``ema``: the weights to register after the evaluation ``res``."""
        want = self.cfg.mlflow.register_weights
        if "val_ema" not in (res or {}) and want != "ema":
            return "model"
        if want != "auto":
            return want
        return "ema" if res["val_ema"]["top1"] > res["val"]["top1"] else "model"

    def _top1(self, res: dict) -> float:
        """The top-1 in ``res`` of the weights :meth:`choose` takes."""
        return res[{"model": "val", "ema": "val_ema"}[self.choose(res)]]["top1"]

    def is_new_best(self, res: dict) -> bool:
        """Whether ``res`` (all-reduced: the same on every rank) is a new best to register."""
        return bool(self.name) and self.cfg.mlflow.register_best and self._top1(res) > self.best_top1

    def export_and_register(
        self, folder: str, state: dict, ema, res: dict | None, step: int, epoch: int, aliases: tuple[str, ...] = ()
    ) -> str | None:
        """Export ``state`` (and the EMA) into ``<train.out>/export/<folder>`` and register
        the chosen weights (rank 0); returns the version (None: not registered)."""
        files = self._export(os.path.join("export", folder), state, ema, step, epoch)
        return self.register(files, res, step, epoch, list(aliases)) if self.name else None

    def finish(self, state: dict, ema, res: dict | None, step: int, epoch: int) -> tuple[dict, str | None]:
        """The end of the run (rank 0): export into ``export/``; alias ``last`` on the
        version of the end's evaluation when it was registered as a best, else a new
        version. Returns the exported files and the version."""
        files = self._export("export", state, ema, step, epoch)
        if not self.name:
            return files, None
        if self.best_step == step and self.best_version:
            self.tracker.alias(self.name, self.best_version, "last")
            return files, self.best_version
        return files, self.register(files, res, step, epoch, ["last"])

    def _export(self, folder: str, state: dict, ema, step: int, epoch: int) -> dict:
        return export_mod.export(
            os.path.join(self.out, folder), self.cfg.model.variant, self.classes, self.cfg.aug, state, ema, step, epoch
        )

    def register(self, files: dict, res: dict | None, step: int, epoch: int, aliases: list[str]) -> str | None:
        """Register the exported ``files`` (rank 0); returns the version."""
        if not self.tracker.enabled or self.tracker.failed:  # no MLflow, or it failed: the export stays on disk
            return None
        weights = self.choose(res)
        tags = self._tags(res, weights, step, epoch)
        if self._example is None:
            self._example = first_image(self.manifests["val"] or self.manifests["train"])
        metrics = {f"val_{k}": float(tags[k]) for k in ("top1", "top5") if k in tags}  # on the logged model too
        version = export_mod.register(
            self.tracker,
            self.name,
            files,
            weights,
            os.path.join(self.out, "config.yaml"),
            self._example,
            tags,
            aliases,
            metrics,
            step,
            lambda version: self.describe(tags, version),
            self.describe_model(),
            visualize.latest(self.out),
        )
        return version

    def describe_model(self) -> str:
        """The registered model's description (rewritten at each registration)."""
        cfg = self.cfg
        return (
            f"TNT `{cfg.model.variant}` for {len(self.classes)} classes at {cfg.aug.img_size} px, trained on "
            f"**{cfg.data_name}** by tntpipe. Aliases: `best` (the best top-1 of all versions), `last` (each "
            f"run's end). Each version's description says what it is, what it was trained on, its top-1 and how "
            f"to call it."
        )

    def describe(self, tags: dict, version: str) -> str:
        """A version's description (markdown, shown on its MLflow page): the model, its
        data, its evaluation and how to call it, with the real column name and param."""
        cfg, train = self.cfg, self.manifests["train"]
        val = self.manifests.get("val")
        uri = f"models:/{self.name}/{version}"
        lines = [
            f"**TNT `{cfg.model.variant}`** ({cfg.model_name}): {self.num_params / 1e6:.2f}M parameters, "
            f"{len(self.classes)} classes, {cfg.aug.img_size} px input.",
            "",
        ]
        lines.append(
            f"Trained on **{cfg.data_name}**: {train.num_samples:,} images "
            f"(manifest `{tags['data.train.manifest']}`, sha256 `{train.digest}`), "
            f"epoch {tags['epoch']} of {cfg.optim.epochs}, step {tags['step']}, "
            f"run `{tags['run_id']}`; {tags['weights']} weights."
        )
        if "top1" in tags:
            lines += [
                "",
                f"**top-1 {tags['top1']}%, top-5 {tags['top5']}%** on {val.num_samples:,} held-out images "
                f"(sha256 `{val.digest}`)"
                + (f"; model {tags['model.top1']}%, EMA {tags['ema.top1']}% top-1" if "ema.top1" in tags else "")
                + ".",
            ]
        else:
            lines += ["", "Not evaluated (no `data.val`)."]
        if self.parent.get("parent.init_from"):
            lines += [
                "",
                f"Fine-tuned from `{self.parent['parent.init_from']}`"
                + (
                    f" ({self.parent['parent.model']} version {self.parent['parent.version']})"
                    if "parent.version" in self.parent
                    else ""
                )
                + ".",
            ]
        lines += [
            "",
            "Call it: a column `image` of encoded images (JPEG, PNG...; base64 in JSON), one per row; "
            "param `top_k` (default 5); out: `class_ids`, `class_names`, `probabilities`.",
            "",
            "```python",
            "import mlflow, pandas as pd",
            f'mlflow.set_tracking_uri("{self.tracker.uri}")',
            f'model = mlflow.pyfunc.load_model("{uri}")',
            'model.predict(pd.DataFrame({"image": [open("img.jpg", "rb").read()]}), params={"top_k": 5})',
            "```",
            "",
            "```sh",
            f"MLFLOW_TRACKING_URI={self.tracker.uri} mlflow models serve -m {uri} --env-manager local -p 5001",
            """printf '{"dataframe_split": {"columns": ["image"], "data": [["%s"]]}, "params": {"top_k": 5}}' \\""",
            """    "$(base64 -w0 img.jpg)" | curl -s http://127.0.0.1:5001/invocations \\""",
            """    -H 'Content-Type: application/json' -d @-""",
            "```",
        ]
        return "\n".join(lines)

    def registered_best(self, version: str | None, res: dict, step: int) -> None:
        """Note the best registered at ``step`` (every rank: the decision state)."""
        self.best_top1, self.best_step, self.best_version = self._top1(res), step, version

    def _tags(self, res: dict | None, weights: str, step: int, epoch: int) -> dict:
        cfg = self.cfg
        tags = {
            "run_id": self.tracker.run_id,
            "variant": cfg.model.variant,
            "weights": weights,
            "step": step,
            "epoch": epoch,
            "checkpoint": os.path.abspath(os.path.join(self.out, "checkpoints", tag_of(step))),
            "config.sha256": config_sha256(cfg),
            "attempts": self.attempts,
            "requeues": self.requeues,
            "world_sizes": ",".join(map(str, self.world_sizes)),
            "faults": self._faults(),
            **git_state(os.path.dirname(os.path.abspath(__file__))),
            **self.parent,
        }
        for split, m in self.manifests.items():
            if m is not None:
                tags[f"data.{split}.manifest"] = m.path if "://" in m.path else os.path.abspath(m.path)
                tags[f"data.{split}.sha256"] = m.digest
        for split, prefix in (("val", "model"), ("val_ema", "ema")):
            if res and split in res:
                tags[f"{prefix}.top1"] = f"{res[split]['top1']:.2f}"
                tags[f"{prefix}.top5"] = f"{res[split]['top5']:.2f}"
        if res:
            tags["top1"], tags["top5"] = tags[f"{weights}.top1"], tags[f"{weights}.top5"]
        return tags

    def _faults(self) -> int:
        try:
            with open(os.path.join(self.out, FAILURES_FILE)) as f:
                return sum(1 for line in f if line.strip())
        except OSError:
            return 0
