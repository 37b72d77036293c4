"""Decoding and augmentation: one JPEG to a uint8 array, a batch to normalised,
mixed training input; the settings (:class:`Augment`) that ``pipeline.config`` reads.

The DeiT/TNT recipe through timm's own transforms: RandomResizedCrop (bicubic),
flip, RandAugment ``rand-m9-mstd0.5-inc1`` (timm disables colour jitter when
RandAugment is on), normalisation (TNT's mean/std 0.5), random erasing 0.25 (pixel
mode), then on the batch Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (timm's
``Mixup``, batch mode), all in the loader's workers (:class:`BatchFinish`); or, with
``finish="device"`` (``data.finish``, the default on CUDA), the workers stop at uint8
pixels and normalisation, erasing and Mixup/CutMix run on the GPU
(:class:`DeviceFinish`).

Our own code only where it measurably pays (``bench/loader_bench.py``): the crop is
drawn from the JPEG header's size and the JPEG is decoded at 1/2, 1/4 or 1/8 scale
(PIL draft mode) whenever the crop stays at least the output size; the crop and
resize are one PIL call; RandAugment's geometric ops (rotate, shear, translate:
timm's choice, magnitudes and matrices) warp through OpenCV, 3.4x faster than PIL
(:class:`_CvAffine`; ``Augment(cv2_geometry=False)`` keeps PIL's); see
:class:`BatchFinish` for normalising and mixing.

Every random draw is seeded (:func:`seeded`, :func:`seed_of`) from the loader's
state, so a batch is a pure function of the data and that state (exact resume).

torch, PIL and timm are imported where they are used, not at import time: the
configuration (and so ``launch/slurm.py --help`` on a login node) reads
:class:`Augment` without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import random
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

TNT_MEAN = (0.5, 0.5, 0.5)
TNT_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class Augment:
    """The DeiT/TNT training recipe; defaults are the paper's."""

    img_size: int = 224  # model input size
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range
    hflip: float = 0.5  # horizontal flip probability
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; null: off
    color_jitter: float = 0.4  # timm applies it only when auto_augment is off
    interpolation: str = "bicubic"  # resize filter
    mean: tuple[float, float, float] = TNT_MEAN  # normalisation (TNT: 0.5)
    std: tuple[float, float, float] = TNT_STD  # normalisation (TNT: 0.5)
    re_prob: float = 0.25  # random erasing probability
    re_mode: str = "pixel"  # random erasing fill: pixel (noise), rand, const
    re_count: int = 1  # max erased boxes per image
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_switch_prob: float = 0.5  # CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1  # applied to the (mixed) targets
    crop_pct: float = 0.9  # eval: resize to img_size / crop_pct, centre crop
    draft: bool = True  # decode JPEGs at reduced scale when the crop allows
    cv2_geometry: bool = True  # RandAugment's rotate/shear/translate warped by OpenCV (see _CvAffine)

    @classmethod
    def light(cls, img_size: int = 224) -> "Augment":
        """Crop and flip only: no RandAugment, erasing, Mixup or smoothing."""
        return cls(
            img_size=img_size,
            auto_augment=None,
            color_jitter=0.0,
            re_prob=0.0,
            mixup=0.0,
            cutmix=0.0,
            label_smoothing=0.0,
        )


# PIL's Resampling values by name (the module imports no PIL at import time).
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _draft(img: Image.Image, needed: tuple[float, float]) -> tuple[float, float]:
    """Ask a JPEG to decode at the smallest 1/2^k scale that keeps ``needed`` pixels.

    Returns the (x, y) factors from original to decoded coordinates."""
    w, h = img.size
    if img.format == "JPEG" and w >= 2 * needed[0] and h >= 2 * needed[1]:
        img.draft(img.mode if img.mode in ("RGB", "L") else "RGB", (math.ceil(needed[0]), math.ceil(needed[1])))
    return img.size[0] / w, img.size[1] / h


class _CvAffine:
    """One of timm's geometric RandAugment ops (rotate, shear, translate) with the warp
    done by OpenCV's ``warpAffine`` instead of PIL's ``Image.transform``.

    Our own code because it measured faster: PIL's affine transform has no vectorised
    bicubic path (1.5 ms per 224x224 RGB image on the AMD EPYC, for each of rotate,
    shear and translate) and OpenCV's does (0.44 ms); with RandAugment rand-m9 about one
    image in three gets a geometric op, so this is ~0.4 of the ~2.7 ms a training image
    costs (``bench/loader_bench.py``). timm still picks the op, draws its magnitude and
    its filter and builds the affine matrix exactly as PIL does (pixel centres
    included); only the interpolation differs: OpenCV's bicubic uses a = -0.75 where
    PIL's uses -0.5, and OpenCV blends the border with the fill colour where PIL cuts
    it (``test_data.py::test_cv2_geometry_matches_pil`` bounds the difference).
    ``Augment(cv2_geometry=False)`` keeps PIL's.
    """

    INTER = {3: "INTER_CUBIC", 2: "INTER_LINEAR", 0: "INTER_NEAREST"}  # PIL BICUBIC, BILINEAR, NEAREST

    def __init__(self, name: str, fallback):
        self.name, self.fallback = name, fallback

    @staticmethod
    def matrix(name: str, size: tuple[int, int], arg: float) -> tuple[float, ...]:
        """PIL's ``AFFINE`` data (output -> input) for the op, as timm and PIL build it."""
        w, h = size
        if name == "Rotate":  # PIL's Image.rotate(arg) about the centre, no expand
            angle = -math.radians(arg)
            a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
            cx, cy = w / 2, h / 2
            return (a, b, a * -cx + b * -cy + cx, -b, a, -b * -cx + a * -cy + cy)
        if name == "ShearX":
            return (1, arg, 0, 0, 1, 0)
        if name == "ShearY":
            return (1, 0, 0, arg, 1, 0)
        dx = {"TranslateXRel": arg * w, "TranslateX": arg}.get(name, 0.0)
        dy = {"TranslateYRel": arg * h, "TranslateY": arg}.get(name, 0.0)
        return (1, 0, dx, 0, 1, dy)

    def __call__(self, img: Image.Image, arg: float, **kwargs) -> Image.Image:
        import cv2
        from PIL import Image
        from timm.data.auto_augment import _check_args_tf

        kwargs = dict(kwargs)
        _check_args_tf(kwargs)  # timm's draw of the filter (random when configured so)
        inter = self.INTER.get(kwargs["resample"])
        if inter is None or img.mode not in ("RGB", "L"):
            return self.fallback(img, arg, **kwargs)
        a, b, c, d, e, f = self.matrix(self.name, img.size, arg)
        # PIL samples output pixel (x, y) at input a(x+.5) + b(y+.5) + c - .5 (pixel centres)
        m = np.array([[a, b, c + (a + b - 1) / 2], [d, e, f + (d + e - 1) / 2]])
        fill = kwargs.get("fillcolor")
        fill = (0,) * 3 if fill is None else (fill,) * 3 if isinstance(fill, (int, float)) else tuple(fill)
        out = cv2.warpAffine(
            np.asarray(img),
            m,
            img.size,
            flags=getattr(cv2, inter) | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=fill,
        )
        return Image.fromarray(out)


def _cv2_one_thread() -> None:
    """OpenCV without its thread pool: one 224^2 warp is too small to split (2 threads
    cost more CPU per image than they save), and loaders run in parallel over DataLoader
    workers. Called in the main process before workers fork: a forked child that
    reconfigures a pool its parent had started hangs (its threads do not exist there)."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def _use_cv2_geometry(transform) -> None:
    """Route the geometric ops of every timm RandAugment inside ``transform`` to OpenCV."""
    _cv2_one_thread()
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if op.name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"):
                op.aug_fn = _CvAffine(op.name, op.aug_fn)


class TrainTransform:
    """One JPEG (bytes) to a uint8 HWC array: crop + resize, flip, RandAugment."""

    def __init__(self, aug: Augment):
        from pipeline.compat import fix_timm_posterize

        fix_timm_posterize()
        from timm.data.transforms_factory import transforms_imagenet_train

        self.aug = aug
        primary, secondary, _ = transforms_imagenet_train(
            aug.img_size,
            scale=aug.scale,
            ratio=aug.ratio,
            hflip=aug.hflip,
            color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment,
            interpolation=aug.interpolation,
            mean=aug.mean,
            std=aug.std,
            separate=True,
        )
        self.crop = primary.transforms[0]  # timm's RandomResizedCropAndInterpolation (its get_params)
        self.secondary = secondary  # RandAugment or colour jitter (timm)
        if aug.cv2_geometry:
            _use_cv2_geometry(secondary)
        self.resample = _RESAMPLE[aug.interpolation]

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image

        aug = self.aug
        img = Image.open(io.BytesIO(data))
        i, j, h, w = self.crop.get_params(img, aug.scale, aug.ratio)  # reads only the header's size
        fx, fy = (1.0, 1.0)
        if aug.draft:
            fx, fy = _draft(img, (img.size[0] * aug.img_size / w, img.size[1] * aug.img_size / h))
        img = img.resize((aug.img_size, aug.img_size), self.resample, box=(j * fx, i * fy, (j + w) * fx, (i + h) * fy))
        if aug.hflip > 0 and random.random() < aug.hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = self.secondary(img)
        return np.array(img)  # writable: torch.from_numpy warns on read-only arrays


class EvalTransform:
    """One JPEG (bytes) to a uint8 HWC array: resize to size/crop_pct, centre crop."""

    def __init__(self, aug: Augment):
        from timm.data.transforms_factory import transforms_imagenet_eval

        self.aug = aug
        self.scale_size = math.floor(aug.img_size / aug.crop_pct)
        pipeline = transforms_imagenet_eval(
            aug.img_size, crop_pct=aug.crop_pct, interpolation=aug.interpolation, mean=aug.mean, std=aug.std
        )
        self.resize_crop = type(pipeline)(pipeline.transforms[:2])  # timm's Resize + CenterCrop

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image

        return self.image(Image.open(io.BytesIO(data)))

    def image(self, img: Image.Image) -> np.ndarray:
        """An opened image (the served model's input) to the uint8 HWC array."""
        if self.aug.draft:
            short = min(img.size)
            _draft(img, (img.size[0] * self.scale_size / short, img.size[1] * self.scale_size / short))
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(self.resize_crop(img))


def _normalisation(aug: Augment, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) that take uint8 pixels to ``(x / 255 - mean) / std``."""
    import torch

    std, mean = torch.tensor(aug.std), torch.tensor(aug.mean)
    return (1 / (std * 255)).view(shape), (-mean / std).view(shape)


def _erase_and_mix(aug: Augment, num_classes: int, train: bool, device: str) -> tuple:
    """timm's ``RandomErasing`` and ``Mixup`` for the recipe (None where off or not training)."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    erase = mixup = None
    if train and aug.re_prob > 0:
        erase = RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device=device)
    if train and (aug.mixup > 0 or aug.cutmix > 0):
        mixup = Mixup(
            mixup_alpha=aug.mixup,
            cutmix_alpha=aug.cutmix,
            prob=aug.mixup_prob,
            switch_prob=aug.mixup_switch_prob,
            label_smoothing=aug.label_smoothing,
            num_classes=num_classes,
        )
    return erase, mixup


class BatchFinish:
    """Normalisation and random erasing per image, Mixup/CutMix per batch (timm's).

    Our own code where it measured faster (``bench/loader_bench.py``, 1 CPU thread,
    batch 64 at 224): normalising each image while it is in cache, written straight
    into the batch, instead of whole-batch passes (18-37 ms per batch: 38 MB of
    floats per pass), and mixing the pairs (i, B-1-i) in place instead of timm's
    ``x.flip(0)`` copy of the whole batch (43 ms per batch). Lambda, the CutMix box
    and the targets still come from timm's ``Mixup``, and the result equals timm's
    (``test_data.py::test_mixing_equals_timm``).
    """

    def __init__(self, aug: Augment, num_classes: int, train: bool):

        self.scale, self.shift = _normalisation(aug, (3, 1, 1))
        self.num_classes = num_classes
        self.smoothing = aug.label_smoothing
        self.erase, self.mixup = _erase_and_mix(aug, num_classes, train, "cpu")

    def image(self, out: torch.Tensor, array: np.ndarray) -> None:
        """uint8 HWC ``array`` -> normalised CHW float written into ``out``; erasing.
        A uint8 ``out`` (``finish="device"``) gets the pixels only: :class:`DeviceFinish`
        does the rest on the device."""
        import torch

        out.copy_(torch.from_numpy(array).permute(2, 0, 1))
        if out.dtype == torch.uint8:
            return
        out.mul_(self.scale).add_(self.shift)
        if self.erase is not None:
            self.erase(out)

    def mix(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mixup/CutMix ``x`` in place (timm's batch mode); returns the soft targets."""
        from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

        lam = 1.0
        if self.mixup is not None and len(x) % 2 == 0:
            lam, cutmix = self.mixup._params_per_batch()
            if lam != 1.0 and cutmix:
                (y0, y1, x0, x1), lam = cutmix_bbox_and_lam(
                    x.shape, lam, ratio_minmax=self.mixup.cutmix_minmax, correct_lam=self.mixup.correct_lam
                )
                for i in range(len(x) // 2):
                    a, b = x[i, :, y0:y1, x0:x1], x[len(x) - 1 - i, :, y0:y1, x0:x1]
                    tmp = a.clone()
                    a.copy_(b)
                    b.copy_(tmp)
            elif lam != 1.0:
                for i in range(len(x) // 2):
                    a, b = x[i], x[len(x) - 1 - i]
                    tmp = a.clone()
                    a.mul_(lam).add_(b, alpha=1 - lam)
                    b.mul_(lam).add_(tmp, alpha=1 - lam)
        return mixup_target(labels, self.num_classes, lam, self.smoothing)


class DeviceFinish:
    """``finish="device"``: the workers send uint8 batches (a quarter of the bytes over
    PCIe, and none of their CPU time on the float work); normalisation, random erasing
    and Mixup/CutMix run here, on the batch on the device, with timm's own
    ``RandomErasing`` and ``Mixup`` (batch mode, as timm's GPU prefetcher pipeline
    does). Every random draw (Python, NumPy, torch on the device) is seeded from
    ``(seed, epoch, rank, batch index)`` and the global RNG states are restored after,
    so a batch is a pure function of the loader state (exact resume) and the
    training RNG (DropPath) is untouched. The values are not those of the worker path
    (the erasing noise comes from the device's generator); with erasing off they are
    the same up to float rounding (``test_data.py``)."""

    def __init__(self, aug: Augment, num_classes: int, train: bool, seed: int, rank: int, device: torch.device):

        self.train, self.seed, self.rank, self.device = train, seed, rank, device
        self.scale, self.shift = (t.to(device) for t in _normalisation(aug, (1, 3, 1, 1)))
        self.num_classes, self.smoothing = num_classes, aug.label_smoothing
        self.erase, self.mixup = _erase_and_mix(aug, num_classes, train, str(device))

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 images, targets) on the device: soft targets when
        training, the labels for evaluation."""
        import torch
        from timm.data.mixup import mixup_target

        x = batch["image"].to(self.device, non_blocking=True)
        x = x.float().mul_(self.scale).add_(self.shift) if x.dtype == torch.uint8 else x
        label = batch["label"].to(self.device, non_blocking=True)
        if not self.train:
            return x, label
        with seeded(
            seed_of("batch", self.seed, batch["epoch"], self.rank, batch["index"]), restore=True, device=self.device
        ):
            if self.erase is not None:
                self.erase(x)
            if self.mixup is not None and len(x) % 2 == 0:
                return self.mixup(x, label)  # in place on x; (x, soft targets)
        return x, mixup_target(label, self.num_classes, 1.0, self.smoothing)


def seed_of(*parts) -> int:
    """A stable 63-bit seed from a tuple (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(seed: int, restore: bool, device: torch.device | None = None):
    """Seed python, numpy and torch (CPU; and ``device``'s if CUDA) RNGs: timm's
    transforms draw from them.

    In a DataLoader worker the global state is ours to take; in the main process
    (``workers=0``, or :class:`DeviceFinish`) it is restored afterwards so training
    randomness is unaffected."""
    import torch

    cuda = device is not None and device.type == "cuda"
    saved = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if restore else None
    saved_cuda = torch.cuda.get_rng_state(device) if cuda and restore else None
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    # The CPU generator only: torch.manual_seed also queues lazy CUDA/XPU/MPS seeding,
    # which formats a stack trace on every call (~60 us, x2 per image).
    torch.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ].manual_seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.random.set_rng_state(saved[2])
        if saved_cuda is not None:
            torch.cuda.set_rng_state(saved_cuda, device)
