"""Look inside a TNT: the TNT paper's feature-map figures for a registered model, a run's
logged model or an export folder, drawn on a few images (python -m pipeline.visualize).

Figures (PNG; rows are images, a label on top of each):

* ``patch-blockNN.png`` (the paper's Fig. 4(a)): 12 of the patch embedding's channels
  after block NN, each a map over the patch grid, sampled with a fixed seed as in the
  paper; the input image first. TNT keeps local structure in these maps.
* ``pixel-blockNN.png`` (Fig. 5): the pixel embeddings of every patch after block NN,
  averaged over their channels and laid out in the patch grid, each patch's 4x4 (or
  p x p) pixels in their own cell: local detail in shallow blocks, abstraction deeper.
* ``attention-blockNN.png``: the last block's outer attention of the class token over
  the patches, one map per head, over the image.
* ``compare-blockNN.png`` (``--compare``): the same channel maps for another model at
  the same block, for the paper's side-by-side with DeiT.

Intermediates come from the model's own ``forward_intermediates`` (patch maps) and one
forward pass with hooks on the chosen blocks (their pixel embeddings) and on the last
block's outer ``qk`` layer (the class token's attention): no second forward path.

The trainer draws the same figures at every evaluation for a fixed, seeded set of
validation images (``mlflow.figures``, :class:`EvalFigures`) into ``<train.out>/figures/``
and the MLflow run's ``figures/`` artifacts; a registered version carries the latest set.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import queue
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from pipeline.errors import InputError

log = logging.getLogger("tntpipe.visualize")

MAPS_PER_BLOCK = 12  # the paper's Fig. 4(a)
CELL = 64  # pixels per map in the figures


# ------------------------------------------------------------------------ capture


def default_blocks(depth: int) -> list[int]:
    """Block 1, the middle one and the last (0-based; the paper's 1, 6 and 12 of 12)."""
    return sorted({0, max(0, depth // 2 - 1), depth - 1})


@torch.no_grad()
def capture(model: torch.nn.Module, x: torch.Tensor, blocks: list[int]) -> dict:
    """One forward pass of ``x`` through ``model.forward_intermediates``: ``patch``, the patch
    maps after each of ``blocks`` (B, d, H, W); ``pixel``, their pixel embeddings (B, H*W,
    pixels, c); ``attention``, the last block's class-token attention over the patches
    (B, heads, H, W). ``model`` keeps its mode and its parameters' values."""
    seen: dict = {"pixel": {}}
    hooks = [
        model.blocks[b].register_forward_hook(lambda m, i, out, b=b: seen["pixel"].__setitem__(b, out[0]))
        for b in blocks
    ]
    last = model.blocks[-1].attn_out
    hooks.append(last.qk.register_forward_hook(lambda m, i, out: seen.__setitem__("qk", out)))
    training = model.training
    model.eval()
    try:
        _, maps = model.forward_intermediates(x, indices=blocks, output_fmt="NCHW")
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    B, _, H, W = maps[0].shape
    qk = seen["qk"].float()  # (B, tokens, 2 d): the last block's q and k, class token first
    heads, d = last.num_heads, qk.shape[-1] // 2
    q, k = qk[..., :d].view(B, -1, heads, d // heads), qk[..., d:].view(B, -1, heads, d // heads)
    scores = torch.einsum("bhc,bnhc->bhn", q[:, 0], k) * (d // heads) ** -0.5
    attention = scores.softmax(-1)[:, :, model.num_prefix_tokens :].reshape(B, heads, H, W)
    pixel = [seen["pixel"][b].float().reshape(B, H * W, *seen["pixel"][b].shape[1:]) for b in blocks]
    return {"patch": [m.float() for m in maps], "pixel": pixel, "attention": attention}


def pixel_mosaic(pixel: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Fig. 5's layout of one image's pixel embeddings (patches, pixels, c): each patch's
    pixels, averaged over channels, in a p x p cell at the patch's place in the grid;
    (H p, W p), patch (i, j)'s pixel (u, v) at row i p + u, column j p + v."""
    H, W = grid
    p = int(round(pixel.shape[1] ** 0.5))
    cells = pixel.float().mean(-1).reshape(H, W, p, p)
    return cells.permute(0, 2, 1, 3).reshape(H * p, W * p).cpu().numpy()


# ------------------------------------------------------------------------ drawing


def _unit(a: np.ndarray) -> np.ndarray:
    """``a`` min-max scaled to [0, 1] (all zeros when constant)."""
    a = np.asarray(a, dtype=np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _colour(a: np.ndarray, size: int) -> np.ndarray:
    """A 2-D map min-max scaled, coloured (viridis) and enlarged to ``size`` x ``size``."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = (colormaps["viridis"](_unit(a))[..., :3] * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.NEAREST))


def _overlay(image: np.ndarray, a: np.ndarray, size: int) -> np.ndarray:
    """The map ``a`` (smoothly enlarged) over the image, half and half."""
    from matplotlib import colormaps
    from PIL import Image

    heat = Image.fromarray((_unit(a) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    heat = (colormaps["inferno"](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BILINEAR))
    return ((base.astype(np.uint16) + heat) // 2).astype(np.uint8)


def _sheet(rows: list[list[np.ndarray]], title: str, pad: int = 2) -> bytes:
    """Rows of equal tiles as one PNG with ``title`` on top."""
    from PIL import Image, ImageDraw

    size = rows[0][0].shape[0]
    cols = max(len(r) for r in rows)
    top = 14
    sheet = Image.new("RGB", (cols * (size + pad) + pad, top + len(rows) * (size + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            sheet.paste(Image.fromarray(tile), (pad + j * (size + pad), top + pad + i * (size + pad)))
    ImageDraw.Draw(sheet).text((pad, 1), title, fill=(0, 0, 0))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return out.getvalue()


def draw(
    seen: dict,
    images: np.ndarray,
    blocks: list[int],
    depth: int,
    name: str = "",
    compare: dict | None = None,
    seed: int = 0,
) -> dict[str, bytes]:
    """The figures of :func:`capture` (``images``: the inputs as uint8 (B, S, S, 3)) as
    {file name: PNG bytes}; ``compare``: another model's ``capture`` at the same blocks."""
    rng = np.random.default_rng(seed)
    figures = {}
    inputs = [_resize(np.ascontiguousarray(img), CELL) for img in images]
    for b, maps, pixel in zip(blocks, seen["patch"], seen["pixel"]):
        channels = np.sort(rng.choice(maps.shape[1], min(MAPS_PER_BLOCK, maps.shape[1]), replace=False))
        ours = [[_colour(maps[i, c].cpu().numpy(), CELL) for c in channels] for i in range(len(images))]
        rows = [[inputs[i]] + ours[i] for i in range(len(images))]
        figures[f"patch-block{b + 1:02d}.png"] = _sheet(
            rows, f"{name}block {b + 1}/{depth}: patch embedding, {len(channels)} of {maps.shape[1]} channels"
        )
        grid = tuple(maps.shape[2:])
        rows = [[inputs[i], _colour(pixel_mosaic(pixel[i], grid), CELL * 2)] for i in range(len(images))]
        rows = [[_resize(r[0], CELL * 2), r[1]] for r in rows]
        figures[f"pixel-block{b + 1:02d}.png"] = _sheet(
            rows, f"{name}block {b + 1}/{depth}: pixel embeddings, channel mean, per patch"
        )
        if compare is not None:
            theirs = compare["patch"][blocks.index(b)]
            pick = np.sort(rng.choice(theirs.shape[1], min(MAPS_PER_BLOCK, theirs.shape[1]), replace=False))
            rows = []
            for i in range(len(images)):
                rows.append([inputs[i]] + ours[i])
                rows.append([inputs[i]] + [_colour(theirs[i, c].cpu().numpy(), CELL) for c in pick])
            figures[f"compare-block{b + 1:02d}.png"] = _sheet(
                rows, f"block {b + 1}: {name or 'TNT'} (odd rows) vs {compare['name']} (even rows)"
            )
    attention = seen["attention"]
    rows = [
        [inputs[i]] + [_overlay(images[i], attention[i, h].cpu().numpy(), CELL) for h in range(attention.shape[1])]
        for i in range(len(images))
    ]
    figures[f"attention-block{depth:02d}.png"] = _sheet(rows, f"{name}block {depth}: class-token attention per head")
    return figures


def _resize(tile: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(tile).resize((size, size), Image.BILINEAR))


# ------------------------------------------------------------------------ inputs


def sample_split(split, count: int, seed: int = 0) -> list[bytes]:
    """``count`` encoded images of a shard split (its path or URL, or a loaded manifest),
    chosen with ``seed``: the same every time."""
    from pipeline.manifest import _Reporter, _Sequence, load_manifest

    manifest = load_manifest(split) if isinstance(split, str) else split
    picks = sorted(
        np.random.default_rng(seed)
        .choice(manifest.num_samples, min(count, manifest.num_samples), replace=False)
        .tolist()
    )
    found = []
    for _, sample in _Sequence(manifest, list(range(len(manifest.urls)))).fetch(picks, _Reporter("figures")):
        found.append(next(bytes(sample[k]) for k in ("jpg", "jpeg", "png", "webp") if k in sample))
    return found


def read_images(paths: list[str]) -> list[bytes]:
    from PIL import Image

    out = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            Image.open(io.BytesIO(data)).verify()
        except OSError as exc:
            raise InputError(f"{path} is not an image PIL can read ({type(exc).__name__})") from None
        out.append(data)
    return out


def prepare(images: list[bytes], transform, finish) -> tuple[torch.Tensor, np.ndarray]:
    """The model's evaluation preprocessing: (normalised batch, the uint8 inputs it shows)."""
    pixels = np.stack([transform(data) for data in images])
    x = torch.empty(len(images), 3, *pixels.shape[1:3])
    for i, array in enumerate(pixels):
        finish.image(x[i], array)
    return x, pixels


# ------------------------------------------------------------------------ models


def load(uri: str, tracking_uri: str | None = None):
    """A registered model (``models:/``), a run's model (``runs:/``) or an export folder
    as the served model (:class:`pipeline.served.TNTClassifier`: the network and its
    preprocessing)."""
    from pipeline import pretrained
    from pipeline.served import TNTClassifier
    from pipeline.tracking import default_uri

    store = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(".")
    weights, _, _ = pretrained.resolve(uri, store, name="model ")
    cfg = os.path.join(os.path.dirname(weights), "pretrained_cfg.json")
    if not os.path.isfile(cfg):
        raise InputError(f"{uri}: no pretrained_cfg.json beside {weights} (an export folder of pipeline.train has one)")
    return TNTClassifier().load(weights, cfg)


def load_compare(spec: str, img_size: int):
    """``--compare``: ``NAME=WEIGHTS`` (a timm model, e.g. deit_small_patch16_224, and a
    local checkpoint: nothing is downloaded), or another model of ours (a URI or folder)."""
    if "=" not in spec:
        return load(spec).model, os.path.basename(spec.rstrip("/"))
    import timm

    name, weights = spec.split("=", 1)
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size)
    except Exception as exc:  # noqa: BLE001 - unknown names, bad arguments
        raise InputError(f"--compare {name}: not a timm model that takes img_size={img_size} ({exc})") from None
    from pipeline.pretrained import read_state_dict

    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"--compare {spec}: the weights do not fit {name} (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    return model.eval(), name


@torch.no_grad()
def capture_other(model: torch.nn.Module, x: torch.Tensor, blocks: list[int]) -> dict:
    """Patch maps of a timm model (``forward_intermediates``) at ``blocks``."""
    maps = model.forward_intermediates(x, indices=blocks, output_fmt="NCHW", intermediates_only=True)
    return {"patch": [m.float() for m in maps]}


# ------------------------------------------------------------------------ at each evaluation


class EvalFigures:
    """The figures for a fixed, seeded set of validation images at each evaluation (rank
    0), drawn and logged in a background thread so that the evaluation waits only for
    the forward pass: ``<out>/figures/stepNNNNNNNN/*.png``, and in the MLflow run under
    ``figures/`` with the step in each name. Not under ZeRO-3 (its parameters are
    partitioned over the ranks): said once."""

    def __init__(
        self,
        manifest,
        augment,
        num_classes: int,
        count: int,
        out: str,
        tracker,
        active: bool,
        dtype: torch.dtype,
        device: torch.device,
        seed: int = 0,
    ):
        self.out, self.tracker, self.dtype, self.device = out, tracker, dtype, device
        self.active = active and count > 0 and manifest is not None
        self._jobs: queue.Queue = queue.Queue()
        self._thread = None
        if not self.active:
            return
        from pipeline.transforms import BatchFinish, EvalTransform

        images = sample_split(manifest, count, seed)
        self.x, self.pixels = prepare(images, EvalTransform(augment), BatchFinish(augment, num_classes, False))

    def draw(self, model: torch.nn.Module, step: int) -> float:
        """Capture now (``model``'s intermediates for the fixed images), draw and log in the
        background; returns the seconds the caller waited."""
        if not self.active:
            return 0.0
        t = time.perf_counter()
        depth = len(model.blocks)
        blocks = default_blocks(depth)
        seen = capture(model, self.x.to(self.device, self.dtype), blocks)
        waited = time.perf_counter() - t
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="figures", daemon=True)
            self._thread.start()
        self._jobs.put((seen, blocks, depth, step))
        return waited

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is not None:
                    self._write(*job)
            except Exception as exc:  # noqa: BLE001 - figures must never stop training
                log.warning("figures: not drawn (%s: %s)", type(exc).__name__, exc)
            finally:
                self._jobs.task_done()
            if job is None:
                return

    def _write(self, seen: dict, blocks: list[int], depth: int, step: int) -> None:
        folder = os.path.join(self.out, "figures", f"step{step:08d}")
        os.makedirs(folder, exist_ok=True)
        for name, png in draw(seen, self.pixels, blocks, depth, f"step {step}, ").items():
            with open(os.path.join(folder, f"step{step:08d}-{name}"), "wb") as f:
                f.write(png)
        self.tracker.artifacts(folder, "figures")

    def wait(self) -> None:
        """Until every set drawn so far is written and logged."""
        if self._thread is not None:
            self._jobs.join()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


def latest(out: str) -> str | None:
    """The newest set of figures in ``<out>/figures``, for the registered version."""
    root = os.path.join(out, "figures")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step")) if os.path.isdir(root) else []
    return os.path.join(root, steps[-1]) if steps else None


# ------------------------------------------------------------------------ command line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.visualize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "model",
        help="models:/<name>/<version or @alias>, runs:/<run id>/<path>, or an export folder "
        "(<train.out>/export) with model.safetensors and pretrained_cfg.json",
    )
    p.add_argument("images", nargs="*", help="image files (JPEG, PNG...); or use --split")
    p.add_argument("--split", help="a shard split (shards/<data>/val, s3://...): --count images from it, seeded")
    p.add_argument("--count", type=int, default=4, help="images taken from --split")
    p.add_argument("--seed", type=int, default=0, help="picks the images of --split and the 12 channels shown")
    p.add_argument("--blocks", type=int, nargs="+", help="blocks to draw, counted from 1 (default: 1, middle, last)")
    p.add_argument(
        "--compare",
        help="another model at the same blocks, side by side (the paper's TNT vs DeiT): "
        "NAME=WEIGHTS for a timm model with a local checkpoint, or a URI/folder of ours",
    )
    p.add_argument("--out", default="figures", help="folder for the PNGs")
    p.add_argument("--tracking-uri", help="the MLflow store of models:/ and runs:/ (default: MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    try:
        if bool(args.images) == bool(args.split):
            raise InputError("give image files or --split, one of the two")
        images = read_images(args.images) if args.images else sample_split(args.split, args.count, args.seed)
        served = load(args.model, args.tracking_uri)
        model, depth = served.model, len(served.model.blocks)
        blocks = default_blocks(depth) if not args.blocks else sorted({b - 1 for b in args.blocks})
        if blocks[0] < 0 or blocks[-1] >= depth:
            raise InputError(f"--blocks: this model has blocks 1 to {depth}")
        x, pixels = prepare(images, served.transform, served.finish)
        seen = capture(model, x, blocks)
        compare = None
        if args.compare:
            other, name = load_compare(args.compare, served.size)
            compare = {**capture_other(other, x, blocks), "name": name}
        figures = draw(seen, pixels, blocks, depth, compare=compare, seed=args.seed)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for name, png in figures.items():
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(png)
    print(f"{len(figures)} figures of {len(images)} image(s) in {args.out}: {', '.join(sorted(figures))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
