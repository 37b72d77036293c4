"""Class index and input layouts of ImageNet-style image trees.

The class index is the sorted list of class folder names: for ImageNet these are
WordNet IDs (``n01440764`` ...), and sorting them gives the standard 0..999 order
that timm and torchvision use. Human-readable names come from the synset list
that timm ships (``timm/data/_info/imagenet_synset_to_lemma.txt``), read as a
plain file so that no model code is imported.

Validation layouts understood by :func:`list_split`:

* class-per-folder, like ``train/`` (``val/n01440764/ILSVRC2012_val_00000293.JPEG``);
* flat ``val/*.JPEG`` with the devkit's ``ILSVRC2012_validation_ground_truth.txt``
  (one ILSVRC2012_ID per line, the n-th line for ``ILSVRC2012_val_<n>.JPEG``)
  plus the ID -> WNID map from the devkit's ``meta.mat`` or a text file with one
  WNID per line in ILSVRC2012_ID order;
* flat with Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the
  first token of the prediction string is the WNID) and ``LOC_synset_mapping.txt``.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
from dataclasses import dataclass

from pipeline.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


@dataclass(frozen=True)
class Entry:
    path: str  # absolute path of the source file
    rel: str  # path relative to the data root, recorded in the manifest
    cls: str  # class folder name / WNID
    size: int  # bytes, read once at listing (shard planning and the inputs digest use it)


@dataclass
class SplitListing:
    entries: list[Entry]  # image files with a class
    ignored: list[tuple[str, str]]  # (rel path, reason): files that are not samples


def _timm_info_file(name: str) -> str | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "data", "_info", name)
    return path if os.path.isfile(path) else None


def synset_names() -> dict[str, str]:
    """WNID -> human-readable name, from the synset list timm ships (may be empty)."""
    path = _timm_info_file("imagenet_synset_to_lemma.txt")
    if path is None:
        return {}
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, lemma = line.rstrip("\n").partition("\t")
            if wnid:
                names[wnid] = lemma.strip()
    return names


def _walk_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def list_class_folders(split_dir: str, data_root: str) -> SplitListing:
    """Every file under ``split_dir/<class>/**``; the class is the top folder name."""
    entries, ignored = [], []
    for path in _walk_files(split_dir):
        rel = os.path.relpath(path, data_root)
        parts = os.path.relpath(path, split_dir).split(os.sep)
        if len(parts) < 2:
            ignored.append((rel, "file outside any class folder"))
        elif os.path.basename(path).startswith("."):
            ignored.append((rel, "hidden file"))
        elif not _is_image_name(path):
            ignored.append((rel, "not an image file extension"))
        else:
            entries.append(Entry(path, rel, parts[0], os.path.getsize(path)))
    return SplitListing(entries, ignored)


def _read_id_to_wnid(path: str) -> list[str]:
    """ILSVRC2012_ID (1-based) -> WNID, from the devkit's meta.mat or a text file."""
    if path.endswith(".mat"):
        import scipy.io

        # Same reading as torchvision.datasets.imagenet.parse_devkit_archive: the
        # 1000 leaf synsets (num_children == 0) in ILSVRC2012_ID order.
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s["num_children"]) == 0]
        leaves.sort(key=lambda s: int(s["ILSVRC2012_ID"]))
        return [str(s["WNID"]) for s in leaves]
    with open(path, encoding="utf-8") as f:
        return [line.split()[0] for line in f if line.strip()]


def _label_dirs(val_dir: str, data_root: str) -> list[str]:
    """Where the ground truth of a flat val folder is looked for, in order."""
    here = [val_dir, os.path.dirname(val_dir), data_root]
    here += [
        os.path.join(d, sub) for d in list(here) for sub in ("data", os.path.join("ILSVRC2012_devkit_t12", "data"))
    ]
    return list(dict.fromkeys(os.path.normpath(d) for d in here))


def _flat_labels(val_dir: str, data_root: str) -> dict[str, str] | None:
    """Image file name stem -> WNID for a flat val folder, or None if no labels found."""
    here = _label_dirs(val_dir, data_root)

    def find(name):
        for d in here:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
        return None

    kaggle = find("LOC_val_solution.csv")
    if kaggle:
        with open(kaggle, newline="", encoding="utf-8") as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    truth = find("ILSVRC2012_validation_ground_truth.txt")
    if truth:
        id_map = find("meta.mat") or find("ILSVRC2012_id_to_wnid.txt")
        if id_map is None:
            raise InputError(
                f"{truth} needs the ILSVRC2012_ID -> WNID map: put the devkit's meta.mat "
                "(or ILSVRC2012_id_to_wnid.txt, one WNID per line) next to it"
            )
        wnids = _read_id_to_wnid(id_map)
        with open(truth, encoding="utf-8") as f:
            ids = [int(line) for line in f if line.strip()]
        return {f"ILSVRC2012_val_{n:08d}": wnids[i - 1] for n, i in enumerate(ids, start=1)}
    return None


def list_flat_val(val_dir: str, data_root: str) -> SplitListing:
    if not any(_is_image_name(p) for p in _walk_files(val_dir)):
        raise InputError(f"{val_dir} holds no images and no class folders")
    labels = _flat_labels(val_dir, data_root)
    if labels is None:
        raise InputError(
            f"{val_dir} holds images but no class folders and no ground truth "
            "(LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt); looked in "
            + ", ".join(_label_dirs(val_dir, data_root))
        )
    entries, ignored = [], []
    for path in _walk_files(val_dir):
        rel = os.path.relpath(path, data_root)
        stem = os.path.splitext(os.path.basename(path))[0]
        if not _is_image_name(path):
            if not path.endswith((".csv", ".txt", ".mat")):
                ignored.append((rel, "not an image file extension"))
        elif stem in labels:
            entries.append(Entry(path, rel, labels[stem], os.path.getsize(path)))
        else:
            match = _VAL_NUMBER.search(stem)
            ignored.append((rel, "no ground-truth label" + ("" if match else " (unexpected file name)")))
    return SplitListing(entries, ignored)


def has_class_folders(split_dir: str) -> bool:
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(split_dir))


def list_split(split_dir: str, data_root: str) -> SplitListing:
    """List the samples of one split, class-per-folder or flat val with ground truth."""
    if has_class_folders(split_dir):
        return list_class_folders(split_dir, data_root)
    return list_flat_val(split_dir, data_root)


def synset_mapping_names(data_root: str) -> dict[str, str]:
    """Names from Kaggle's LOC_synset_mapping.txt when the data set ships it."""
    path = os.path.join(data_root, "LOC_synset_mapping.txt")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return dict(line.rstrip("\n").split(" ", 1) for line in f if " " in line)
