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
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", **env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_timm_first_in_a_plain_interpreter(tmp_path):
    """``import timm`` alone, first thing (the README's way to load an export): PyPI's CUDA
    torchvision must not break it on a CPU torch."""
    out = run(tmp_path, "import timm, torchvision; m = timm.create_model('resnet18'); print(type(m).__name__)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ResNet"


def test_venv_bin_is_on_path_and_compiled_ops_stay_in_the_venv(tmp_path):
    code = ("import json, os, shutil, sys; print(json.dumps({'uvicorn': shutil.which('uvicorn'), "
            "'path': os.environ['PATH'], 'ext': os.environ.get('TORCH_EXTENSIONS_DIR'), 'prefix': sys.prefix}))")
    got = json.loads(run(tmp_path, code).stdout)
    bin_dir = os.path.join(got["prefix"], "bin")
    assert got["uvicorn"] == os.path.join(bin_dir, "uvicorn")  # what `mlflow models serve` starts by name
    assert got["path"] == f"/usr/local/bin:/usr/bin:/bin:{bin_dir}"  # appended: nothing the user's PATH finds changes
    assert got["ext"] == os.path.join(got["prefix"], "torch_extensions")
    mine = json.loads(run(tmp_path, code, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext")).stdout)
    assert mine["ext"] == str(tmp_path / "ext")  # a value the user set is kept
