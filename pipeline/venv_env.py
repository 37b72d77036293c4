"""Environment defaults for every process the project's venv runs, set at interpreter start.

* **The venv's ``bin/`` on PATH.** MLflow 3 starts ``uvicorn`` by name from PATH for
  ``mlflow models serve``, ``mlflow ui`` and ``mlflow server``, so ``.venv/bin/mlflow
  models serve ...`` (the README's command) ended with ``exec: uvicorn: not found`` (exit
  127) unless the venv was activated. The bin/ is appended, not prepended: it only adds
  programs that were not found and changes nothing the user's PATH already resolves.
* **Compiled ops inside the venv** (``TORCH_EXTENSIONS_DIR``, unless set): DeepSpeed's
  JIT ops and our CPU kernels. In the shared ``~/.cache/torch_extensions`` the build
  files hold the venv's paths, so two checkouts used in turn rebuilt DeepSpeed's op with
  g++ each time (up to minutes), and a process killed during a build left a lock that
  every checkout then waited on. ``torch.compile``'s cache likewise
  (``TORCHINDUCTOR_CACHE_DIR``, else ``/tmp/torchinductor_<user>``, shared by every
  checkout and torch version): a bare ``pytest`` builds as ``.ci/run`` does.

Standard library only and nothing from this project: ``.ci/setup`` copies this file into
the venv's site-packages as ``tntpipe_venv_env.py`` and calls :func:`apply` from a
``.pth`` line at every interpreter start (see ``pipeline/torchvision_fix.py`` for why
not ``import pipeline`` there). Outside such a venv nothing here runs.
"""

import os
import sys


def apply() -> None:
    if sys.prefix == sys.base_prefix:  # not a venv
        return
    bin_dir = os.path.join(sys.prefix, "bin")
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if bin_dir not in parts and os.path.isdir(bin_dir):
        os.environ["PATH"] = os.pathsep.join(parts + [bin_dir])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(sys.prefix, "torchinductor"))
