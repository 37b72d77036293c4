#!/usr/bin/env bash
# Wheels that bench/gpu_check.sh installs on a GPU machine without network or package
# registry (Python 3.12, its own CUDA torch, timm, opencv, safetensors, pytest, psutil,
# ninja; no deepspeed, webdataset, mlflow or submitit). Run here, on a CPU machine with
# the registry, after .ci/setup; the wheels land in .gpu_wheels/ (git-ignored), to be
# carried along with the working tree (~5 MB; the device tool carries at most 64 MiB).
#
#   bash bench/gpu_wheels.sh            # -> .gpu_wheels/*.whl (versions: this .venv's)
#
# DeepSpeed is an sdist: built here as a pure-Python wheel (DS_BUILD_OPS=0: its ops are
# JIT-built where they run, and the trainer needs none of them on CUDA). MLflow is left
# out (~40 MB with its dependencies): GPU runs go without tracking (pipeline/tracking.py
# says so in one line and training goes on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "error: run bash .ci/setup first (needs .venv)" >&2; exit 2; }
OUT=.gpu_wheels
mkdir -p "$OUT"
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# pure-Python or cp312 manylinux wheels of what the trainer imports and torch's image lacks
PKGS=(webdataset braceexpand submitit cloudpickle hjson pydantic pydantic-core annotated-types typing-inspection
      py-cpuinfo msgpack einops)
pins=()
for p in "${PKGS[@]}"; do pins+=("$p==$(version "$p")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$OUT" "${pins[@]}"
ds="deepspeed==$(version deepspeed)"
if ! ls "$OUT"/deepspeed-*.whl >/dev/null 2>&1; then
    DS_BUILD_OPS=0 PIP_CONSTRAINT="$PWD/constraints.txt" "$PY" -m pip wheel --quiet --no-deps --no-build-isolation \
        -w "$OUT" "$ds"
fi
ls -l "$OUT"
du -sh "$OUT"
