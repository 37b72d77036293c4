"""Import-time compatibility for a CPU-only torch with PyPI's CUDA torchvision.

PyPI only serves CUDA builds of torchvision. On a CPU build of torch its compiled
extension (``torchvision/_C.so``) cannot load, and ``import torchvision`` (so also
``import timm``) dies with ``RuntimeError: operator torchvision::nms does not
exist``: torchvision registers fake (meta) kernels for ``nms``/``qnms`` at import
time and that needs the operator schemas the extension would have declared.

:func:`ensure_torchvision` declares those two schemas with ``torch.library`` when,
and only when, the extension cannot be loaded. Transforms and timm then work;
compiled torchvision ops (``nms``, ``roi_align``, ``io.decode_jpeg``...) still do
not, and nothing in this project uses them (PIL decodes JPEGs). On a normal GPU
install the extension loads and this module changes nothing.

Call it before the first import of torchvision or timm; importing any module of
this project that needs timm does so. In the project's venv, ``.ci/setup`` also installs
it as a start-up hook (see ``pipeline/torchvision_fix.py``), so a plain ``import timm``
works there too.
"""

from __future__ import annotations

import os

from pipeline.torchvision_fix import ensure_torchvision

ensure_torchvision()


def fix_timm_posterize() -> None:
    """Make timm's RandAugment survive Pillow >= 11's check on ``posterize``.

    timm maps the top magnitudes of ``PosterizeIncreasing`` to ``bits=0`` (with
    ``mstd`` noise a magnitude of 9 reaches 10 now and then); Pillow used to turn
    that into a black image and now raises ``ValueError: bits must be between or
    equal to 1 and 8``, which kills a DataLoader worker every few hundred images of
    the DeiT recipe. This restores the old result (all bits dropped: black).
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **__):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    for name, fn in auto_augment.NAME_TO_OP.items():
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def clear_stale_build_lock(name: str, max_age_s: float = 300.0, poll_s: float = 1.0, say_every_s: float = 30.0) -> None:
    """Make sure torch's extension loader will not wait forever on a dead process's lock.

    ``torch.utils.cpp_extension.load`` (our CPU kernels, and DeepSpeed's JIT ops such as
    the shared-memory all-reduce that every CPU rank loads in ``init_distributed``) holds
    a lock file in the build directory for every load, even a no-op rebuild check, and a
    process that finds the file waits for it to go, forever. A process killed in that
    window (a fault test, a timeout, a session stopped) leaves every later process on the
    machine hung at its first load: this is how one killed process once made a whole CI
    run time out. Here a young lock (a build in progress) is waited on; one older than
    ``max_age_s`` belongs to a dead process (no build here takes minutes) and is removed.
    The wait is said on stderr at once and every ``say_every_s``: it happens before the
    trainer sets up logging, and a silent five-minute wait looks like a hang."""
    import logging
    import sys
    import time

    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
    said_at = None
    while True:
        try:
            age = time.time() - os.path.getmtime(lock)
        except OSError:  # no lock (the usual case), or its holder is done
            return
        if age > max_age_s:
            try:
                os.remove(lock)
                logging.getLogger(__name__).warning("removed a stale build lock left by a killed process: %s", lock)
            except OSError:  # another process removed it first
                pass
            return
        if said_at is None or time.monotonic() - said_at >= say_every_s:
            print(
                f"waiting for the build lock {lock} ({age:.0f} s old: a build in progress, or left by a killed "
                f"process, removed at {max_age_s:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            said_at = time.monotonic()
        time.sleep(poll_s)
