"""MLflow tracking and registry, on rank 0, never allowed to stop training.

Every MLflow call goes through :meth:`Tracker._call`: the first failure (server
unreachable, store error...) is logged once as a one-line warning and tracking is
switched off for the rest of the process, while training and checkpoints go on.
What is lost then: the metrics and artifacts after the failure (they are still in
the training log and the output directory) and the registration; the run id stays
in the checkpoints, so a restart resumes the same MLflow run. The exported model
(``<train.out>/export/``) can be registered later (``pipeline.export.register``).

MLflow's HTTP client retries for minutes by default; we set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10`` unless
the user did, so an unreachable server costs seconds, once.
"""

from __future__ import annotations

import logging
import os

from pipeline.errors import summary

log = logging.getLogger("tntpipe.tracking")

os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# log_model validates the input example by loading the model: its download bars would
# land in train.log's stream between the training lines
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


EXPERIMENT_KIND = "mlflow.experimentKind"  # read by MLflow 3's UI


def default_uri(out_dir: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath(os.path.join(out_dir, "mlflow.db"))


def default_artifact_root(tracking_uri: str, out_dir: str) -> str | None:
    """Where new experiments keep artifacts: inside ``out_dir`` with the local SQLite
    store (MLflow's default is ``./mlruns`` of the current directory, which made
    ``train.out`` depend on where the command ran); the server's own with a server."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri and not uri.startswith("sqlite:"):
        return None
    return "file://" + os.path.abspath(os.path.join(out_dir, "mlartifacts"))


class Tracker:
    def __init__(self, uri: str, experiment: str, enabled: bool = True, artifact_root: str | None = None):
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.enabled = enabled
        if enabled:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:  # e.g. a GPU check run with only the carried wheels
                log.warning(
                    "MLflow is not installed: training goes on without tracking or registry "
                    "(metrics stay in the log, exports in the output directory)"
                )
                self.enabled = False
        self.run_id: str | None = None
        self.failed: str | None = None

    def _call(self, what: str, fn):
        """``fn(mlflow)``, unless tracking is off or has failed; mlflow is imported only
        here, so a process without it (tracking off) never imports it."""
        if not self.enabled or self.failed:
            return None
        try:
            import mlflow

            return fn(mlflow)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop training
            self.failed = f"{what}: {summary(exc)}"
            log.warning(
                "MLflow tracking at %s failed (%s); training goes on without tracking "
                "(metrics stay in the log, checkpoints and exports in the output directory)",
                self.uri,
                self.failed,
            )
            return None

    def start(self, run_id: str | None, run_name: str, system_metrics: bool) -> str | None:
        def start(mlflow):
            mlflow.set_tracking_uri(self.uri)
            if run_id is None:
                client = mlflow.MlflowClient(self.uri)
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    # the UI's "Machine learning" kind: it opens on the training runs, not
                    # on MLflow 3's GenAI overview (traces, prompts) that a new experiment gets
                    try:
                        client.create_experiment(
                            self.experiment,
                            artifact_location=self.artifact_root or None,
                            tags={EXPERIMENT_KIND: "custom_model_development"},
                        )
                    except mlflow.exceptions.MlflowException:  # another job made it just now
                        pass
                elif EXPERIMENT_KIND not in experiment.tags:
                    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development")
                mlflow.set_experiment(self.experiment)
                run = mlflow.start_run(run_name=run_name, log_system_metrics=system_metrics)
            else:
                run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            return run.info.run_id

        started = self._call("start run", start)
        if started is None and run_id is not None and self.enabled:
            log.warning("MLflow run %s could not be reopened: this attempt's metrics are not tracked", run_id)
        self.run_id = started or run_id
        return self.run_id

    def log(self, metrics: dict, step: int) -> None:
        """The metrics-sink interface (``pipeline/metrics.py``)."""
        self.metrics(metrics, step)

    def close(self) -> None:
        pass

    def params(self, params: dict) -> None:
        clean = {k: ("" if v is None else str(v))[:6000] for k, v in params.items()}
        self._call("log params", lambda mlflow: mlflow.log_params(clean))

    def metrics(self, metrics: dict, step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        self._call("log metrics", lambda mlflow: mlflow.log_metrics(values, step=step))

    def artifact(self, path: str, subdir: str | None = None) -> None:
        self._call("log artifact", lambda mlflow: mlflow.log_artifact(path, subdir))

    def artifacts(self, folder: str, subdir: str | None = None) -> None:
        """The files of ``folder`` into the run's ``subdir``. Through the client and the run's
        id, not the fluent API: callable from another thread (MLflow's active run is the
        calling thread's)."""
        if self.run_id is None:
            return
        self._call(
            "log artifacts", lambda mlflow: mlflow.MlflowClient(self.uri).log_artifacts(self.run_id, folder, subdir)
        )

    def tags(self, tags: dict) -> None:
        self._call("set tags", lambda mlflow: mlflow.set_tags({k: str(v) for k, v in tags.items()}))

    def register(
        self,
        model: dict,
        name: str,
        tags: dict,
        aliases: list[str],
        metrics: dict | None = None,
        step: int | None = None,
        describe=None,
        model_description: str | None = None,
    ) -> str | None:
        """Log ``model`` (``mlflow.pyfunc.log_model`` arguments) with ``metrics`` and
        register a new version, described by ``describe(version)``.

        ``aliases`` are set on it; so is ``best`` when its ``top1`` tag beats the
        version that holds ``best`` now (or none does)."""

        def register(mlflow):
            from mlflow import MlflowClient

            info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **model)
            if metrics:  # the logged model's page shows its evaluation, not only system metrics
                mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
            client = MlflowClient(self.uri)
            version = str(info.registered_model_version)
            for k, v in {**tags, "logged_model": info.model_id}.items():
                client.set_model_version_tag(name, version, k, str(v))
            if describe:
                client.update_model_version(name, version, description=describe(version))
            if model_description:
                client.update_registered_model(name, description=model_description)
            try:
                best = float(client.get_model_version_by_alias(name, "best").tags.get("top1", "-1"))
            except Exception:  # noqa: BLE001 - no "best" yet
                best = -1.0
            names = list(aliases)
            if "top1" in tags and float(tags["top1"]) > best:
                names.append("best")
            for alias in names:
                client.set_registered_model_alias(name, alias, version)
            return version

        return self._call("register model", register)

    def alias(self, name: str, version: str, alias: str) -> None:
        self._call(
            "set alias", lambda mlflow: mlflow.MlflowClient(self.uri).set_registered_model_alias(name, alias, version)
        )

    def end(self, status: str = "FINISHED") -> None:
        self._call("end run", lambda mlflow: mlflow.end_run(status))
