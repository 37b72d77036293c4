"""Make ``import torchvision`` (so ``import timm``) work on a CPU-only torch.

PyPI only serves CUDA builds of torchvision. On a CPU build of torch its compiled
extension (``torchvision/_C.so``) cannot load, and ``import torchvision`` dies with
``RuntimeError: operator torchvision::nms does not exist``: torchvision registers fake
(meta) kernels for ``nms``/``qnms`` at import time and that needs the operator schemas
the extension would have declared. :func:`ensure_torchvision` declares those two
schemas with ``torch.library`` when, and only when, the extension cannot be loaded.

This file imports nothing but the standard library at import time and nothing from
this project, so that it can also run as a top-level module of the venv:
``.ci/setup`` copies it to site-packages as ``tntpipe_torchvision_fix.py`` with a
``.pth`` line that calls :func:`install_hook` at every interpreter start. The hook
costs nothing until torchvision is imported, then applies the fix just before
torchvision's code runs; so ``import timm`` works from a plain ``.venv/bin/python`` in
any order. Not ``import
pipeline`` in that ``.pth``: a model pulled from the registry runs its own bundled copy
of ``pipeline/``, which a package imported at start-up would shadow.
"""

import glob
import importlib.util
import os
import sys

_LIB = None  # keeps this copy's torch.library registration alive for the process


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision not installed: nothing to fix
    for pkg_dir in spec.submodule_search_locations:
        for path in glob.glob(os.path.join(pkg_dir, "_C*.so")):
            try:
                torch.ops.load_library(path)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def _schemas_defined() -> bool:
    """Whether ``torchvision::nms`` exists already: the extension's, or the other copy of
    this file's (the venv's start-up hook and ``pipeline.compat`` each hold one)."""
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` work. Returns True if a shim was installed."""
    if _LIB is None and "torchvision" in sys.modules:  # imported already: too late or not needed
        return False
    return _declare()


def _declare() -> bool:
    global _LIB
    if _LIB is not None:
        return True
    if _extension_loads() or _schemas_defined():
        return False
    import torch

    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


class _Loader:
    """torchvision's own loader, with :func:`ensure_torchvision` run just before the
    package's code (and the hook removed after it)."""

    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def __getattr__(self, name):  # get_data, get_resource_reader, ...: torchvision's loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        _declare()  # torchvision is in sys.modules now, its code not yet run
        try:
            self._loader.exec_module(module)
        finally:
            if self._hook in sys.meta_path:
                sys.meta_path.remove(self._hook)


class _Hook:
    """A meta-path finder that hands out torchvision's own spec with its loader wrapped
    (:class:`_Loader`): the fix runs when torchvision is executed, not when it is only
    looked up. A look-up alone (``importlib.util.find_spec``, as an older copy of
    ``pipeline/compat.py`` bundled with a registered model does before it declares the
    schemas itself) changes nothing; :func:`ensure_torchvision` then finds the schemas
    declared and leaves them."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and not isinstance(spec.loader, _Loader):
            spec.loader = _Loader(spec.loader, self)
        return spec


def install_hook() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
