"""The venv's start-up hooks (installed by ``.ci/setup``: pipeline/torchvision_fix.py and
pipeline/venv_env.py), seen from a plain interpreter of the venv started outside the
checkout, as a user's shell starts it: no activated venv, no PYTHONPATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

if sys.prefix == sys.base_prefix:
    pytest.skip("the suite runs in .ci/setup's venv; this interpreter is not a venv", allow_module_level=True)


def run(tmp_path, code: str, **env_changes) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR")
    }
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", **env_changes)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_import_timm_first_in_a_plain_interpreter(tmp_path):
    """``import timm`` alone, first thing (the README's way to load an export): PyPI's CUDA
    torchvision must not break it on a CPU torch."""
    out = run(tmp_path, "import timm, torchvision; m = timm.create_model('resnet18'); print(type(m).__name__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ResNet"


def test_venv_bin_is_on_path_and_compiled_ops_stay_in_the_venv(tmp_path):
    code = (
        "import json, os, shutil, sys; print(json.dumps({'uvicorn': shutil.which('uvicorn'), "
        "'path': os.environ['PATH'], 'ext': os.environ.get('TORCH_EXTENSIONS_DIR'), 'prefix': sys.prefix, "
        "'inductor': os.environ.get('TORCHINDUCTOR_CACHE_DIR')}))"
    )
    got = json.loads(run(tmp_path, code).stdout)
    bin_dir = os.path.join(got["prefix"], "bin")
    assert got["uvicorn"] == os.path.join(bin_dir, "uvicorn")  # what `mlflow models serve` starts by name
    assert got["path"] == f"/usr/local/bin:/usr/bin:/bin:{bin_dir}"  # appended: nothing the user's PATH finds changes
    assert got["ext"] == os.path.join(got["prefix"], "torch_extensions")
    assert got["inductor"] == os.path.join(got["prefix"], "torchinductor")  # a bare pytest builds in the venv too
    mine = json.loads(run(tmp_path, code, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")).stdout)
    assert mine["ext"] == str(tmp_path / "ext")  # a value the user set is kept


OLDER_COMPAT = """
import glob, importlib.util, os, torch
spec = importlib.util.find_spec("torchvision")  # the hook must not act on a look-up alone
loads = False
for d in spec.submodule_search_locations:
    for p in glob.glob(os.path.join(d, "_C*.so")):
        try:
            torch.ops.load_library(p); loads = True
        except (OSError, RuntimeError):
            pass
if not loads:
    lib = torch.library.Library("torchvision", "DEF")  # what pipeline/compat.py did before 2026-12-05
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import timm
print("ok")
"""


def test_a_model_bundling_an_older_compat_still_loads(tmp_path):
    """A model registered before the start-up hook existed carries the older
    ``pipeline/compat.py``, which looks torchvision up and then declares the schemas
    itself: with the hook installed that must not be declared twice."""
    out = run(tmp_path, OLDER_COMPAT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
