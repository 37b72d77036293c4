"""The registered model: images in, top-k classes out. MLflow logs this file itself as
the model ("models from code", ``mlflow.pyfunc.log_model(python_model=<this file>)``),
so loading a registered version runs this code and unpickles nothing: it loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

A registered version holds (``pipeline/export.py::register``):

* ``artifacts/model.safetensors``: the fp32 weights, timm's TNT layout;
* ``artifacts/pretrained_cfg.json``: the architecture, the class names and the
  evaluation transform of the training config (size, crop_pct, interpolation,
  mean/std);
* ``artifacts/config.yaml``: the training config;
* ``code/pipeline/``: this package (the model, the transform), on ``sys.path`` when
  MLflow loads the model, so no checkout of this repository is needed.

Input: a DataFrame column ``image`` of encoded images (JPEG, PNG, anything PIL reads;
base64 strings in a JSON request, MLflow's encoding of the ``binary`` type), one image
per row; in process also a uint8 array batch, ``(N, H, W, 3)`` or ``(N, H, W)``, through
``unwrap_python_model().predict(None, array)`` (MLflow's schema check admits only the
declared column). Param ``top_k`` (default 5). Output: one row per image with
``class_ids``, ``class_names`` and ``probabilities``, the top k, best first.

Preprocessing is exactly the trainer's evaluation (``pipeline.transforms.EvalTransform`` and
``BatchFinish``): resize to size / crop_pct, centre crop, normalise. Bad input (not an
image, an empty value, more than ``TNTP_SERVE_MAX_PIXELS`` pixels, default 40M) raises
``MlflowException(INVALID_PARAMETER_VALUE)``: HTTP 400 from ``mlflow models serve``,
which goes on serving.

The ``nn.Module``: ``mlflow.pyfunc.load_model(uri).unwrap_python_model().model``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

MAX_PIXELS = int(os.environ.get("TNTP_SERVE_MAX_PIXELS", 40_000_000))


class BadInput(MlflowException):
    """An HTTP 400 whose body says its message and nothing else. MLflow's scoring server
    rewrites an ``MlflowException``'s message to ``Failed to predict data '<the whole
    DataFrame>'. Error: ...`` (mlflow/pyfunc/scoring_server); this one keeps its line."""

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:  # MLflow's __init__ sets it, then its rewrite would
        self._line = getattr(self, "_line", value)


def _bad_input(message: str) -> BadInput:
    return BadInput(message, error_code=INVALID_PARAMETER_VALUE)


class TNTClassifier(PythonModel):
    """The pyfunc model; ``model`` (the ``nn.Module``), ``classes`` and ``pretrained_cfg``
    after loading."""

    def load_context(self, context) -> None:
        self.load(context.artifacts["weights"], context.artifacts["pretrained_cfg"])

    def load(self, weights: str, pretrained_cfg: str) -> "TNTClassifier":
        from safetensors.torch import load_file

        from pipeline import tnt
        from pipeline.transforms import Augment, BatchFinish, EvalTransform

        with open(pretrained_cfg) as f:
            self.pretrained_cfg = cfg = json.load(f)
        self.classes = list(cfg["label_names"])
        size = int(cfg["input_size"][-1])
        self.model = tnt.create(cfg["architecture"], num_classes=len(self.classes), img_size=size)
        tnt.load_timm_state_dict(self.model, load_file(weights))
        self.model.eval()
        aug = Augment(
            img_size=size,
            crop_pct=float(cfg["crop_pct"]),
            interpolation=cfg["interpolation"],
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
        )
        self.transform = EvalTransform(aug)
        self.finish = BatchFinish(aug, len(self.classes), train=False)
        self.size = size
        return self

    def _decode(self, value, row: int):
        """One input value (bytes, base64 text or a uint8 array) to a PIL image."""
        from PIL import Image

        if isinstance(value, np.ndarray):
            if (
                value.dtype != np.uint8
                or value.ndim not in (2, 3)
                or (value.ndim == 3 and value.shape[2] not in (1, 3))
            ):
                raise _bad_input(f"image {row}: want uint8 (H, W) or (H, W, 3), got {value.dtype} {value.shape}")
            if value.shape[0] * value.shape[1] > MAX_PIXELS:
                raise _bad_input(f"image {row}: {value.shape[1]}x{value.shape[0]} is over {MAX_PIXELS} pixels")
            return Image.fromarray(value.squeeze(2) if value.ndim == 3 and value.shape[2] == 1 else value)
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise _bad_input(f"image {row}: a string that is not base64") from None
        if not isinstance(value, (bytes, bytearray)) or not value:
            raise _bad_input(f"image {row}: empty or not image bytes ({type(value).__name__})")
        try:
            img = Image.open(io.BytesIO(value))
        except Exception:  # noqa: BLE001 - PIL raises several types for non-images
            raise _bad_input(f"image {row}: not an image PIL can read ({len(value)} bytes)") from None
        if img.size[0] * img.size[1] > MAX_PIXELS:  # the header alone: nothing decoded yet
            raise _bad_input(
                f"image {row}: {img.size[0]}x{img.size[1]} is over {MAX_PIXELS} pixels (TNTP_SERVE_MAX_PIXELS)"
            )
        return img

    def _batch(self, images: list):
        x = torch.empty(len(images), 3, self.size, self.size)
        for i, img in enumerate(images):
            try:
                array = self.transform.image(img)
            except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file fails here
                raise _bad_input(f"image {i}: cannot be decoded ({type(exc).__name__}: {exc})") from None
            self.finish.image(x[i], array)
        return x

    # The DataFrame hint is one MLflow infers no schema from: the declared signature stays
    # the contract, and MLflow's "add type hints" warning (which ignores warning filters:
    # it sets its own) is not printed at each load. A uint8 array is accepted too (below).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        top_k = (params or {}).get("top_k", 5)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise _bad_input(f"top_k must be a whole number >= 1, not {top_k!r}")
        if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim in (3, 4):
            values = list(model_input)
        elif isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
            values = list(model_input["image"])
        else:
            raise _bad_input(
                "want a DataFrame with an 'image' column of encoded images, or a uint8 array (N, H, W[, 3])"
            )
        if not values:
            raise _bad_input("no images in the request")
        x = self._batch([self._decode(v, i) for i, v in enumerate(values)])
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float(), dim=-1)
        p, idx = probs.topk(min(int(top_k), len(self.classes)), dim=-1)
        return pd.DataFrame(
            {
                "class_ids": [row.tolist() for row in idx],
                "class_names": [[self.classes[i] for i in row.tolist()] for row in idx],
                "probabilities": [row.tolist() for row in p],
            }
        )


mlflow.models.set_model(TNTClassifier())
