"""``model.init_from``: start a run from registered, logged or saved weights (fine-tuning).

Sources (:func:`resolve`):

* ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a registered version
  (``pipeline/served.py`` layout: ``artifacts/model.safetensors`` and
  ``artifacts/pretrained_cfg.json``), downloaded from ``mlflow.tracking_uri``;
* ``runs:/<run id>/<path>``: a run's artifact, a weights file or a folder holding one;
* a local ``.safetensors`` file (our export or timm's TNT layout), an ``export/``
  directory, or a timm checkpoint (``.pth``/``.pth.tar`` with ``state_dict``,
  ``state_dict_ema`` or ``model``), read by ``timm.models.load_state_dict`` with
  ``weights_only=True`` (no code runs from the file).

Adaptation (:func:`load_into`), as timm does for ViTs: another number of classes
re-initialises the head (one log line); another image size resamples the patch
position encodings bicubically (``timm.layers.resample_abs_pos_embed``, through timm's
TNT ``checkpoint_filter_fn``), the pixel encodings stay; any other shape difference
is another variant and refused in one line.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch

from pipeline.errors import InputError, first_line, summary
from pipeline.store import sha256_file

log = logging.getLogger("tntpipe.pretrained")

WEIGHTS = ("model.safetensors", "model_ema.safetensors")


def _find_weights(folder: str) -> str | None:
    """The weights file of a downloaded model or export folder: a registered version's
    (``artifacts/``: ``model.safetensors`` or ``model_ema.safetensors``, whichever was
    registered), then an export folder's model weights."""
    for pattern in ("artifacts/*.safetensors", "model.safetensors", "*.safetensors", "**/model.safetensors"):
        found = sorted(glob.glob(os.path.join(folder, pattern), recursive=True))
        if found:
            return found[0]
    return None


def _cfg_next_to(weights: str) -> dict | None:
    path = os.path.join(os.path.dirname(weights), "pretrained_cfg.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _registered_version(uri: str, tracking_uri: str) -> dict:
    """Name, version and run of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    from mlflow import MlflowClient

    ref = uri[len("models:/") :]
    client = MlflowClient(tracking_uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, version = ref.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    return {"parent.model": mv.name, "parent.version": mv.version, "parent.run_id": mv.run_id}


def resolve(uri: str, tracking_uri: str, name: str = "model.init_from=") -> tuple[str, dict | None, dict]:
    """``(weights file, pretrained_cfg or None, lineage tags)`` of an ``init_from`` value.
    Raises :class:`InputError` in one line when it cannot be found or read, the line
    naming the value as ``{name}{uri}`` (``python -m pipeline.visualize``: ``model ...``)."""
    lineage = {"parent.init_from": uri}
    if uri.startswith(("models:/", "runs:/")):
        import mlflow

        from pipeline import tracking  # noqa: F401 - its HTTP retry limits: seconds, not minutes, for a dead server

        try:
            source = uri
            if uri.startswith("models:/"):
                lineage.update(_registered_version(uri, tracking_uri))
                # the version's own location: MLflow resolves a models:/ URI in its default
                # registry whatever registry_uri says (./mlflow.db, made on the spot), so a
                # store given as mlflow.tracking_uri (not the environment) was not searched
                source = mlflow.MlflowClient(tracking_uri).get_model_version_download_uri(
                    lineage["parent.model"], lineage["parent.version"]
                )
            else:
                lineage["parent.run_id"] = uri[len("runs:/") :].split("/", 1)[0]
            # Every rank downloads its own copy (a temporary directory): no rank waits for
            # another's download, and nodes need not share a filesystem for it.
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri)
        except Exception as exc:  # noqa: BLE001 - MlflowException, connection errors...
            first = first_line(exc) or type(exc).__name__
            raise InputError(
                f"{name}{uri}: cannot be read from the MLflow store {tracking_uri} ({first}); "
                f"set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to the store that holds it"
            ) from None
    else:
        local = uri
        if not os.path.exists(local):
            raise InputError(f"{name}{uri}: no such file or directory")
    weights = _find_weights(local) if os.path.isdir(local) else local
    if weights is None:
        raise InputError(f"{name}{uri}: no model.safetensors in {local}")
    lineage["parent.sha256"] = sha256_file(weights)
    return weights, _cfg_next_to(weights), lineage


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file or a timm checkpoint (EMA weights when it has them), without
    unpickling code (``weights_only=True``)."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(path, use_ema=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip errors alike
        raise InputError(f"model.init_from: {path} is not a weights file timm can read ({summary(exc, 200)})") from None


def _check_architecture(variant: str, pretrained_cfg: dict | None) -> None:
    source = (pretrained_cfg or {}).get("architecture")
    if source and source != variant:
        raise InputError(f"model.init_from holds a {source} model, not {variant}: set model.variant={source}")


def adapt(
    model: torch.nn.Module, variant: str, state: dict[str, torch.Tensor], pretrained_cfg: dict | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` made loadable into ``model`` (built as ``variant``): timm's key names,
    the patch position encodings resampled, the head dropped for another class count;
    and what was adapted, one line each (only ``model``'s shapes are read). Another
    variant is refused in one line."""
    from timm.models.tnt import checkpoint_filter_fn

    _check_architecture(variant, pretrained_cfg)
    pos = state.get("patch_pos", state.get("outer_pos"))
    state = checkpoint_filter_fn(dict(state), model)  # official key names; patch_pos resampled to this size
    own = model.state_dict()
    notes = []
    for key, value in state.items():
        if key in own and key != "patch_pos" and not key.startswith("head.") and value.shape != own[key].shape:
            raise InputError(
                f"model.init_from is another variant than {variant}: {key} is {tuple(value.shape)}, "
                f"{variant} has {tuple(own[key].shape)}"
            )
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise InputError(f"model.init_from is not a {variant} state dict: unexpected {', '.join(unknown[:3])}")
    missing = [k for k in own if k not in state and not k.startswith("head.")]
    if missing:
        raise InputError(f"model.init_from lacks {', '.join(missing[:3])}: not a {variant} state dict")
    if "head.weight" in state and state["head.weight"].shape != own["head.weight"].shape:
        notes.append(
            f"head re-initialised: {state['head.weight'].shape[0]} classes in model.init_from, "
            f"{own['head.weight'].shape[0]} here"
        )
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if pos is not None and pos.shape != own["patch_pos"].shape:
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        notes.append(
            f"patch position encodings resampled from a {grid}x{grid} grid to "
            f"{'x'.join(map(str, model.pixel_embed.grid_size))} ({model.pixel_embed.img_size[0]} px); "
            f"pixel position encodings kept"
        )
    return state, notes


def check(variant: str, weights: str, pretrained_cfg: dict | None, num_classes: int, img_size: int) -> None:
    """Refuse, in one line, weights that :func:`load_into` would refuse: the trainer
    calls it before the process group, DeepSpeed or ``train.out``. The model is built on
    the CPU (not the meta device: timm's drop-path rates call ``.item()``), without
    touching the global random state."""
    from pipeline import tnt

    _check_architecture(variant, pretrained_cfg)  # before any model is built
    with torch.random.fork_rng(devices=[]):
        model = tnt.create(variant, num_classes=num_classes, img_size=img_size)
    adapt(model, variant, read_state_dict(weights), pretrained_cfg)


def load_into(model: torch.nn.Module, variant: str, weights: str, pretrained_cfg: dict | None) -> list[str]:
    """Load ``weights`` into ``model`` (built as ``variant``), adapting the head and the
    patch position encodings; returns what was adapted, one line each (also logged)."""
    state, notes = adapt(model, variant, read_state_dict(weights), pretrained_cfg)
    model.load_state_dict(state, strict=False)
    for note in notes:
        log.info("model.init_from: %s", note)
    return notes
