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

import array
import copy
import csv
import importlib.util
import itertools
import os
import re

from pipeline.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d+)")


class Listing:
    """A split's image files as columns: no Python object per image.

    ImageNet-21k's fall11 has 14.2M files in 21,841 class folders. One frozen dataclass
    per file (path, rel, class, size), with the plan built on it, cost ~620 bytes per
    image in a process (8.8 GB for fall11); these columns and the plan ~70 (940 MB),
    ``bench/build_bench.py``. Files are added a folder at a time
    (a *chunk*: one class folder, or a flat val folder), in the walk's order:

    * ``names``: each file's path relative to its chunk's folder, fs-encoded, NUL-ended
      (no file name holds a NUL), back to back; ``ends[row]`` is where its NUL is;
    * ``sizes``: bytes, read once at listing (shard planning and the inputs digest);
    * ``labels``: the index of its class in ``classes``;
    * ``order``: the rows in the order of their path relative to the data root, which
      is the order the shard plan and the inputs digest sort by. It is put together
      chunk by chunk: a chunk's paths share the prefix ``<folder>/``, so sorting the
      chunks by that prefix and each chunk's names on their own sorts every path.

    A subset (:meth:`take`) shares the columns and keeps its own ``order``.
    """

    def __init__(self, root: str):
        self.root = root  # the data root: a file's path is root/rel
        self.folders: list[str] = []  # per chunk: its folder relative to root
        self.classes: list[str] = []  # label names, in the order first seen
        self.ignored: list[tuple[str, str]] = []  # (rel path, reason): files that are not samples
        self._class_index: dict[str, int] = {}
        self._names = bytearray()
        self._ends, self._sizes, self._labels = array.array("q"), array.array("q"), array.array("i")
        self._starts = array.array("q")  # per chunk: its first row
        self._pieces: list[tuple[str, array.array]] = []  # per chunk: (sort key, its rows in path order)
        self.order = None

    def add_chunk(self, folder: str, files: list[tuple[str, str, int]]) -> None:
        """Append one folder's files, (name relative to the folder, class, size) each."""
        if not files:
            return
        first = len(self._sizes)
        folder = "" if folder == os.curdir else folder
        self.folders.append(folder)
        self._starts.append(first)
        names = [name for name, _, _ in files]
        encoded = [os.fsencode(name) + b"\0" for name in names]
        before = len(self._names) - 1  # each name's NUL: here plus the lengths up to and with it
        self._ends.extend(before + n for n in itertools.accumulate(map(len, encoded)))
        self._names += b"".join(encoded)
        self._sizes.extend(size for _, _, size in files)
        self._labels.extend(self._label(cls) for _, cls, _ in files)
        rows = sorted(range(len(names)), key=names.__getitem__)
        self._pieces.append((folder and folder + os.sep, array.array("q", (first + i for i in rows))))

    def _label(self, cls: str) -> int:
        index = self._class_index.get(cls)
        if index is None:
            index = self._class_index[cls] = len(self.classes)
            self.classes.append(cls)
        return index

    def close(self) -> Listing:
        """Freeze the columns, each in the narrowest type that holds it (fall11's names
        end below 4 GiB, its sizes too, its 21,841 labels fit 16 bits: 10 bytes per image
        less than int64), and put ``order`` together."""
        self.ends, self._ends = _narrow(self._ends), None
        self.sizes, self._sizes = _narrow(self._sizes), None
        self.labels, self._labels = _narrow(self._labels), None
        self.starts, self._starts = _narrow(self._starts, signed=True), None
        order = array.array("q")
        for _, rows in sorted(self._pieces, key=lambda p: p[0]):
            order.extend(rows)
        self._pieces = []
        self.order = _narrow(order, signed=True)
        return self

    def __len__(self) -> int:
        return len(self.order)

    def take(self, order) -> Listing:
        """The same files' columns with another ``order`` (a subset, for a cut split)."""
        part = copy.copy(self)
        part.order = order
        return part

    def rels(self, rows) -> list[str]:
        """The paths relative to the root of ``rows`` (an integer array), in that order."""
        import numpy as np

        rows = np.asarray(rows, np.int64)
        chunks = (self.starts.searchsorted(rows, "right") - 1).tolist()
        begins = np.where(rows > 0, self.ends[rows - 1] + 1, 0).tolist()
        names, folders = memoryview(self._names), self.folders
        return [
            os.path.join(folders[c], os.fsdecode(bytes(names[b:e])))
            for c, b, e in zip(chunks, begins, self.ends[rows].tolist())
        ]

    def used_classes(self) -> set[str]:
        import numpy as np

        return {self.classes[i] for i in np.unique(self.labels[self.order])}


def _narrow(column: array.array, signed: bool = False):
    """``column`` as a numpy array: uint16 or uint32 where its values fit (a copy), else
    int64 (a view). ``signed`` keeps int64: row numbers, which are indexed and negated."""
    import numpy as np

    wide = np.frombuffer(column, np.int64 if column.itemsize == 8 else np.int32) if column else np.zeros(0, np.int64)
    if not signed and len(wide) and wide.min() >= 0:
        top = int(wide.max())
        for kind in (np.uint16, np.uint32):
            if top <= np.iinfo(kind).max:
                return wide.astype(kind)
    return wide.astype(np.int64, copy=False)


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


def list_class_folders(split_dir: str, data_root: str) -> Listing:
    """Every file under ``split_dir/<class>/**``; the class is the top folder name. One
    class folder is held as Python strings at a time (fall11's largest: ~3,000 files)."""
    listing = Listing(data_root)
    top, files = None, []
    base = os.path.relpath(split_dir, data_root)

    def flush():  # one class folder's files into the listing
        listing.add_chunk(top if base == os.curdir else os.path.join(base, top), files)

    skip = 0 if base == os.curdir else len(base) + 1  # rel less this is the path under split_dir
    for path in _walk_files(split_dir):
        rel = os.path.relpath(path, data_root)
        parts = rel[skip:].split(os.sep)
        if len(parts) < 2:
            listing.ignored.append((rel, "file outside any class folder"))
            continue
        if parts[0] != top:
            if files:
                flush()
            top, files = parts[0], []
        if os.path.basename(path).startswith("."):
            listing.ignored.append((rel, "hidden file"))
        elif not _is_image_name(path):
            listing.ignored.append((rel, "not an image file extension"))
        else:
            files.append((os.sep.join(parts[1:]), top, os.path.getsize(path)))
    if files:
        flush()
    return listing.close()


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


def list_flat_val(val_dir: str, data_root: str) -> Listing:
    if not any(_is_image_name(p) for p in _walk_files(val_dir)):
        raise InputError(f"{val_dir} holds no images and no class folders")
    labels = _flat_labels(val_dir, data_root)
    if labels is None:
        raise InputError(
            f"{val_dir} holds images but no class folders and no ground truth "
            "(LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt); looked in "
            + ", ".join(_label_dirs(val_dir, data_root))
        )
    listing, files = Listing(data_root), []
    for path in _walk_files(val_dir):
        rel = os.path.relpath(path, data_root)
        stem = os.path.splitext(os.path.basename(path))[0]
        if not _is_image_name(path):
            if not path.endswith((".csv", ".txt", ".mat")):
                listing.ignored.append((rel, "not an image file extension"))
        elif stem in labels:
            files.append((os.path.relpath(path, val_dir), labels[stem], os.path.getsize(path)))
        else:
            match = _VAL_NUMBER.search(stem)
            listing.ignored.append((rel, "no ground-truth label" + ("" if match else " (unexpected file name)")))
    listing.add_chunk(os.path.relpath(val_dir, data_root), files)
    return listing.close()


def has_class_folders(split_dir: str) -> bool:
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(split_dir))


def list_split(split_dir: str, data_root: str) -> Listing:
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
