"""Export (consolidated fp32 weights in timm's layout; SE variants add ``se_layer.*``) and
registration in MLflow.

Both run on rank 0 alone, after the other ranks have left the process group: they
can take minutes for TNT-B over a network, longer than a collective may wait.

``export/`` (the end of the run; ``export/best/``: the newest best evaluation):
``model.safetensors`` (+ ``model_ema.safetensors``), ``classes.json``,
``pretrained_cfg.json`` (what the model is: architecture, classes, input size, eval
transform). A registered version is the pyfunc model of ``pipeline/served.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import torch

from pipeline import tnt

log = logging.getLogger("tntpipe.export")


def pretrained_cfg(variant: str, aug, classes: tuple[str, ...]) -> dict:
    """timm's ``pretrained_cfg`` of the trained model: its real classes, input size and
    evaluation transform (not the variant's ImageNet defaults)."""
    cfg = dict(tnt.default_cfgs[variant].default.to_dict()) if hasattr(tnt.default_cfgs[variant], "default") else {}
    cfg.update(
        architecture=variant,
        num_classes=len(classes),
        input_size=(3, aug.img_size, aug.img_size),
        crop_pct=aug.crop_pct,
        interpolation=aug.interpolation,
        mean=tuple(aug.mean),
        std=tuple(aug.std),
        label_names=list(classes),
    )
    return cfg


def build(variant: str, classes: tuple[str, ...], aug) -> torch.nn.Module:
    model = tnt.create(variant, num_classes=len(classes), img_size=aug.img_size)
    model.pretrained_cfg = pretrained_cfg(variant, aug, classes)
    return model


def gather_fp32_state(module: torch.nn.Module) -> dict:
    """The fp32 weights of a DeepSpeed module, whole, on every rank: the masters where
    the optimizer keeps them (ZeRO 1-3 and DeepSpeed's BF16_Optimizer, assembled from
    the partitions by ``safe_get_full_fp32_param``), the module's own weights at ZeRO-0
    (no fp32 copy exists there). Synchronizes ranks: one all-reduce per parameter, so
    every rank calls it, before the process group is closed. (DeepSpeed's offline
    ``zero_to_fp32`` reads the checkpoint instead, but refuses BF16_Optimizer's files:
    "is not a zero checkpoint".)"""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (p.detach() if full is None else full).float().cpu().contiguous()
    for name, b in module.named_buffers():
        state[name] = b.detach().float().cpu().contiguous()
    return state


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as written: timm's TNT names, plus ``se_layer.*`` for the SE
    variants, which timm's TNT lacks (``tnt.to_timm_state_dict`` refuses those; an SE run
    must still export and register)."""
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def export(
    folder: str,
    variant: str,
    classes: tuple[str, ...],
    aug,
    state: dict,
    ema: torch.nn.Module | None,
    step: int,
    epoch: int,
) -> dict:
    """Write the weights (and the EMA's), the classes and the pretrained_cfg into
    ``folder``; returns their paths by kind."""
    from safetensors.torch import save_file

    model = build(variant, classes, aug)
    model.load_state_dict(state)
    os.makedirs(folder, exist_ok=True)
    meta = {"variant": variant, "num_classes": str(len(classes)), "step": str(step), "epoch": str(epoch)}
    files = {"model": os.path.join(folder, "model.safetensors")}
    save_file(_weights(model), files["model"], metadata=meta)
    if ema is not None:
        files["ema"] = os.path.join(folder, "model_ema.safetensors")
        save_file(_weights(ema), files["ema"], metadata=meta)
    files["classes"] = os.path.join(folder, "classes.json")
    with open(files["classes"], "w") as f:
        json.dump(list(classes), f)
    files["pretrained_cfg"] = os.path.join(folder, "pretrained_cfg.json")
    with open(files["pretrained_cfg"], "w") as f:
        json.dump(model.pretrained_cfg, f, indent=1)
    log.info("exported %s", ", ".join(files.values()))
    return files


def signature(top_k: int = 5):
    """The served contract: a column ``image`` of encoded images (base64 in JSON), param
    ``top_k``; per image the top-k ``class_ids``, ``class_names``, ``probabilities``."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec(Array("long"), "class_ids"),
                ColSpec(Array("string"), "class_names"),
                ColSpec(Array("double"), "probabilities"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", top_k)]),
    )


def register(
    tracker,
    name: str,
    files: dict,
    weights: str,
    config_path: str,
    example: bytes | None,
    tags: dict,
    aliases: list[str],
    metrics: dict | None = None,
    step: int | None = None,
    describe=None,
    model_description: str | None = None,
    figures: str | None = None,
) -> str | None:
    """Log the exported ``weights`` (``"model"`` or ``"ema"``) as the served pyfunc model
    (``pipeline/served.py``, models from code: nothing pickled) with its ``metrics`` and
    register a new version of ``name`` with ``tags`` and the description
    ``describe(version)``; ``figures``: a folder of the run's latest feature-map figures
    (``pipeline/visualize.py``), kept with the model as its ``figures`` artifact."""
    import pandas as pd

    here = os.path.dirname(os.path.abspath(__file__))
    model = {
        "python_model": os.path.join(here, "served.py"),
        "artifacts": {"weights": files[weights], "pretrained_cfg": files["pretrained_cfg"], "config": config_path},
        "code_paths": [here],
        "signature": signature(),
        "input_example": (pd.DataFrame({"image": [example]}), {"top_k": 5}) if example else None,
        "pip_requirements": [
            f"torch=={torch.__version__.split('+')[0]}",
            "timm",
            "safetensors",
            "numpy",
            "pillow",
            "pandas",
            "mlflow",
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if figures:  # MLflow names a folder artifact by its basename: "figures", not "step00000250"
            model["artifacts"]["figures"] = shutil.copytree(figures, os.path.join(tmp, "figures"))
        version = tracker.register(model, name, tags, aliases, metrics, step, describe, model_description)
    if version:
        log.info(
            "registered %s version %s (%s weights); serve it: mlflow models serve -m models:/%s/%s --env-manager local "
            "(MLFLOW_TRACKING_URI=%s)",
            name,
            version,
            weights,
            name,
            version,
            tracker.uri,
        )
    return version
