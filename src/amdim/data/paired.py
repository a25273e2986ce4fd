"""Views from the data itself: contexts of K views (paired cameras, modalities, the L and ab
channels of CIE Lab), for `--views paired` and `--views lab`.

A source dataset yields `(views, label)`: `views` a tuple of K uint8 arrays (H, W, C), each
with its own size and channel count, `label` an int (-1: unlabelled). Three sources are built
in: `PairedFolder` (<root>/<view>/<relative path>), `PairedArrays` (an .npz of view_<name>
arrays) and `RGBImages` (any RGB dataset, split into L and ab by `ViewSet`); any Dataset of
the same items works too. views.view_sets.ViewSet turns a source into training items
(training.inputs.build_view_datasets).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .datasets import DataError, _npz_split, class_names, labelled_split

log = logging.getLogger("amdim")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
RESERVED = ("all",)  # "all" names the concatenation of every view's feature


def as_hwc(array: np.ndarray) -> np.ndarray:
    """A view as (H, W, C): (H, W) -> (H, W, 1), (H, W, C) as it is."""
    return array[..., None] if array.ndim == 2 else array


def _check_names(names, where: str) -> None:
    for name in names:
        if not name or "." in name or name in RESERVED:
            raise DataError(f"{where}: view name {name!r} cannot be used (names must be "
                            f"non-empty, without '.', and not {', '.join(RESERVED)})")


class PairedFolder(Dataset):
    """<root>/<view>/<relative path>: one sub-folder per view, views matched by relative path.
    Relative paths in class folders (<view>/<class>/<file>) are labelled by the class, as
    torchvision's ImageFolder; files missing from some view are left out and reported (a
    warning naming them; strict: a DataError). A view's channel count is that of its first
    image: 1 for greyscale (8-bit) images, else 3 (RGB)."""

    def __init__(self, root: str | Path, strict: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder of views (<root>/<view>/<file>)")
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        if len(folders) < 2:
            raise DataError(f"{self.root} needs one sub-folder per view, at least two; found "
                            f"{[p.name for p in folders]}")
        self.names = tuple(p.name for p in folders)
        _check_names(self.names, str(self.root))
        files = {p.name: {f.relative_to(p).as_posix() for f in p.rglob("*")
                          if f.suffix.lower() in IMAGE_EXTENSIONS} for p in folders}
        common = set.intersection(*files.values())
        # per view: its files that some other view lacks
        self.unmatched = {name: sorted(paths - common) for name, paths in files.items()
                          if paths - common}
        if self.unmatched:
            shown = "; ".join(f"{name}/{paths[0]}" + (f" and {len(paths) - 1} more"
                                                       if len(paths) > 1 else "")
                              for name, paths in self.unmatched.items())
            message = (f"{sum(map(len, self.unmatched.values()))} file(s) under {self.root} "
                       f"have no match in every view: {shown}")
            if strict:
                raise DataError(message + " (run without --strict-data to leave them out)")
            log.warning("%s; left out", message)
        if not common:
            raise DataError(f"no file of {self.root} is present in every view "
                            f"({', '.join(self.names)}): views are matched by relative path")
        self.paths = sorted(common)
        labelled = all("/" in path for path in self.paths)
        self.classes = sorted({path.split("/")[0] for path in self.paths}) if labelled else []
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = np.array([index[p.split("/")[0]] if labelled else -1 for p in self.paths],
                               dtype=np.int64)
        self.channels = tuple(self._read(name, self.paths[0], None).shape[2]
                              for name in self.names)

    def _read(self, view: str, path: str, channels: int | None) -> np.ndarray:
        file = self.root / view / path
        try:
            with Image.open(file) as image:
                if channels is None:  # the view's first image decides
                    channels = 1 if image.mode in ("1", "L", "I", "I;16", "F") else 3
                return as_hwc(np.asarray(image.convert("L" if channels == 1 else "RGB")))
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"view {view!r}: cannot read {file} ({error})") from None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, ...], int]:
        path = self.paths[index]
        return (tuple(self._read(name, path, c) for name, c in zip(self.names, self.channels)),
                int(self.labels[index]))


class PairedArrays(Dataset):
    """An .npz with one uint8 array per view, `view_<name>`: (N, H, W[, C]), and optional
    `labels` (N,) and `classes`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            arrays = np.load(self.path)
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read {self.path} ({error})") from None
        keys = sorted(k for k in arrays.files if k.startswith("view_"))
        if len(keys) < 2:
            raise DataError(f"{self.path} needs at least two view_<name> arrays (one per view); "
                            f"it holds {arrays.files}")
        self.names = tuple(k[len("view_"):] for k in keys)
        _check_names(self.names, str(self.path))
        # (N, H, W) -> (N, H, W, 1)
        self.views = [arrays[k][..., None] if arrays[k].ndim == 3 else arrays[k] for k in keys]
        n = len(self.views[0])
        for name, view in zip(self.names, self.views):
            if view.dtype != np.uint8 or view.ndim != 4 or len(view) != n:
                raise DataError(f"{self.path}: view_{name} is {view.dtype} {view.shape}; every "
                                f"view must be uint8 (N, H, W[, C]) with the same N ({n})")
        self.labels = (arrays["labels"].astype(np.int64) if "labels" in arrays.files
                       else np.full(n, -1, dtype=np.int64))
        if len(self.labels) != n:
            raise DataError(f"{self.path}: {len(self.labels)} labels for {n} contexts")
        self.classes = ([str(c) for c in arrays["classes"]] if "classes" in arrays.files
                        else [str(c) for c in range(int(self.labels.max()) + 1)]
                        if (self.labels >= 0).any() else [])
        self.channels = tuple(view.shape[3] for view in self.views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, ...], int]:
        return tuple(view[index] for view in self.views), int(self.labels[index])


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class RGBImages(Dataset):
    """Any labelled RGB split (datasets.labelled_split) as one-view contexts ((H, W, 3),)."""

    def __init__(self, data: str, split: str, data_root: str = "data", download: bool = False,
                 strict: bool = False):
        self.images = labelled_split(data, split, _rgb_array, data_root, download, strict)
        self.classes = class_names(self.images)
        self.names, self.channels = ("rgb",), (3,)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray], int]:
        image, label = self.images[index]
        return (image,), int(label)


class _Named(Dataset):
    """A Dataset of (views, label) with the attributes of the built-in sources: names (view0,
    view1, ...), channels (read from its first item), classes (its own, else from its labels
    if it has `labels`, else none)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        views, _ = dataset[0]
        self.names = tuple(getattr(dataset, "names", None)
                           or (f"view{i}" for i in range(len(views))))
        _check_names(self.names, type(dataset).__name__)
        self.channels = tuple(as_hwc(np.asarray(v)).shape[2] for v in views)
        labels = getattr(dataset, "labels", None)
        self.classes = list(getattr(dataset, "classes", None) or (
            [str(c) for c in range(int(np.max(labels)) + 1)] if labels is not None else []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]


def view_source(cfg, split: str) -> Dataset | None:
    """The contexts of a split ("train" or "test") for a PretrainConfig with views lab or
    paired; None where the data has no such split. Test splits: NAME_test.npz (or _val)
    beside NAME_train.npz; <root>/test/<view>/... beside <root>/train/<view>/..."""
    if cfg.views == "lab":
        try:
            return RGBImages(cfg.data, split, cfg.data_root, cfg.download, cfg.strict_data)
        except DataError:
            if split == "train":
                raise
            return None
    path = Path(cfg.data)
    if path.suffix.lower() == ".npz":
        found = _npz_split(path, split)
        return PairedArrays(found) if found else None
    if (path / "train").is_dir():
        folder = path / split
        return PairedFolder(folder, cfg.strict_data) if folder.is_dir() else None
    return PairedFolder(path, cfg.strict_data) if split == "train" else None


def view_sources(cfg, sources=None) -> tuple[Dataset, Dataset | None, int]:
    """(training contexts, test contexts or None, number of classes or 0) for a PretrainConfig
    with views lab or paired. sources: with views paired, a Dataset of (views, label), or
    (train, test or None) such Datasets, instead of cfg.data's."""
    if sources is not None and cfg.views != "paired":
        raise ValueError(f"your own views need --views paired, not {cfg.views}")
    if sources is None:
        train, test = view_source(cfg, "train"), view_source(cfg, "test")
    else:
        train, test = sources if isinstance(sources, (tuple, list)) else (sources, None)
        train, test = (None if s is None else _Named(s) for s in (train, test))
    if test is not None and test.names != train.names:
        raise DataError(f"the test views {list(test.names)} of {cfg.data} are not the "
                        f"training views {list(train.names)}")
    return train, test, len(train.classes)
