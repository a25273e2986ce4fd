"""Views from the data itself: contexts of K views (paired cameras, modalities, the L and ab
channels of CIE Lab), for `--views paired` and `--views lab`.

A source dataset yields `(views, label)`: `views` a tuple of K uint8 arrays (H, W, C), each
with its own size and channel count, `label` an int (-1: unlabelled). Three sources are built
in: `PairedFolder` (<root>/<view>/<relative path>), `PairedArrays` (an .npz of view_<name>
arrays) and `RGBImages` (any RGB dataset, split into L and ab by `ViewSet`); any Dataset of
the same items works too (checked item by item: `CheckedContexts`). Every source is checked
by the rules of image folders, through the same functions: files by image_files
(`image_files`, `find_problems`, `drop_unreadable`, `to_rgb`), labels by
image_files.check_labels, the test split against the training split by
datasets.check_splits. views.view_sets.ViewSet turns a source into training items
(training.inputs.build_view_datasets).
"""
from __future__ import annotations

import logging
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .datasets import (_npz_split, check_splits, check_test_split, class_names, dataset_labels,
                       labelled_split, npz_classes)
# GREY_MODES: the PIL modes read as a 1-channel view
from .image_files import (GREY_MODES, DataError, _CheckedFiles, check_labels, drop_unreadable,
                          image_files, skipped_files, to_rgb)
from .store import ImageStore, is_store, store_info

log = logging.getLogger("amdim")
RESERVED = ("all",)  # "all" names the concatenation of every view's feature


def as_hwc(array: np.ndarray) -> np.ndarray:
    """A view as (H, W, C): (H, W) -> (H, W, 1), (H, W, C) as it is."""
    return array[..., None] if array.ndim == 2 else array


def _check_names(names, where: str) -> None:
    for name in names:
        if not name or "." in name or name in RESERVED:
            raise DataError(f"{where}: view name {name!r} cannot be used (names must be "
                            f"non-empty, without '.', and not {', '.join(RESERVED)})")


def view_pixels(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image as a uint8 view (H, W, channels), through the package's RGB conversion
    (image_files.to_rgb: 16-bit and float pixels scaled, not clipped to white; alpha on white)."""
    rgb = to_rgb(image)
    return as_hwc(np.asarray(rgb.convert("L") if channels == 1 else rgb))


def check_view(view, where: str) -> np.ndarray:
    """One view of a context as a uint8 (H, W, C) array, or a DataError saying how to give it:
    (C, H, W) arrays and float pixels, which would otherwise train on garbage, are refused."""
    array = np.asarray(view)
    if array.dtype != np.uint8:
        raise DataError(f"{where} is {array.dtype}; views must be uint8 pixels 0..255 (from "
                        "floats in [0, 1]: (x * 255).round().astype(numpy.uint8))")
    if array.ndim not in (2, 3):
        raise DataError(f"{where} has shape {array.shape}; a view is (H, W) or (H, W, C)")
    if array.ndim == 3 and array.shape[0] <= 4 < array.shape[2]:
        raise DataError(f"{where} has shape {array.shape}, which looks like (C, H, W); views are "
                        "(H, W, C): transpose it (array.transpose(1, 2, 0))")
    return as_hwc(array)


class PairedFolder(_CheckedFiles):
    """<root>/<view>/<relative path>: one sub-folder per view, views matched by relative path.
    The rules of image folders (image_files.ImageClasses) hold: relative paths in class folders
    (<view>/<class>/<file>) are labelled by the class, and files directly in a view folder are
    then left out with a warning; every file is checked when the set is built, and a context
    with an unreadable file is left out with a warning naming it (strict: a DataError), as are
    files missing from some view. A view's channel count is that of its first image: 1 for
    greyscale (8-, 16-bit or float) images, else 3 (RGB)."""

    def __init__(self, root: str | Path, strict: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder of views (<root>/<view>/<file>)")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(folders) < 2:
            raise DataError(f"{root} needs one sub-folder per view, at least two; found "
                            f"{[p.name for p in folders]}")
        self.names = tuple(p.name for p in folders)
        _check_names(self.names, str(root))
        # the package's one rule for which files are images (no ._ files, no hidden folders)
        files = {p.name: {f.relative_to(p).as_posix() for f in image_files(p)} for p in folders}
        common = set.intersection(*files.values())
        # per view: its files that some other view lacks
        self.unmatched = {name: sorted(paths - common) for name, paths in files.items()
                          if paths - common}
        if self.unmatched:
            shown = "; ".join(f"{name}/{paths[0]}" + (f" and {len(paths) - 1} more"
                                                       if len(paths) > 1 else "")
                              for name, paths in self.unmatched.items())
            message = (f"{sum(map(len, self.unmatched.values()))} file(s) under {root} "
                       f"have no match in every view: {shown}")
            if strict:
                raise DataError(message + " (run without --strict-data to leave them out)")
            log.warning("%s; left out", message)
        if not common:
            raise DataError(f"no file of {root} is present in every view "
                            f"({', '.join(self.names)}): views are matched by relative path")
        paths = sorted(common)
        loose = [path for path in paths if "/" not in path]
        self.classes = []
        if len(loose) < len(paths):  # class folders: a stray file must not unlabel the rest
            if loose:
                log.warning("ignoring %d file(s) directly in the view folders of %s (such as "
                            "%s): only those in a class folder have a label", len(loose), root,
                            loose[0])
                paths = [path for path in paths if "/" in path]
            self.classes = sorted({path.split("/")[0] for path in paths})
        index = {name: i for i, name in enumerate(self.classes)}
        samples = [(tuple(str(root / name / path) for name in self.names),
                    index[path.split("/")[0]] if self.classes else -1) for path in paths]
        super().__init__(samples, None, strict, root)
        self.paths = [Path(files[0]).relative_to(root / self.names[0]).as_posix()
                      for files, _ in self.samples]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)
        self.channels = tuple(self._channels(path) for path in self.samples[0][0])
        lost = [name for i, name in enumerate(self.classes) if i not in set(self.labels)]
        if lost:
            log.warning("no readable context is left in the class folder(s) %s of %s", lost, root)

    @staticmethod
    def _channels(path: str) -> int:
        with Image.open(path) as image:
            return 1 if image.mode in GREY_MODES else 3

    def _load(self, files: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        views = []
        for path, channels in zip(files, self.channels):
            with Image.open(path) as image:
                views.append(view_pixels(image, channels))
        return tuple(views)


class PairedArrays(Dataset):
    """An .npz with one uint8 array per view, `view_<name>`: (N, H, W[, C]), and optional
    `labels` (N,) and `classes`; labels are checked against the classes when it is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            arrays = np.load(self.path, allow_pickle=False)
            keys = sorted(k for k in arrays.files if k.startswith("view_"))
            if len(keys) < 2:
                raise DataError(f"{self.path} needs at least two view_<name> arrays (one per "
                                f"view); it holds {arrays.files}")
            self.views = [arrays[k] for k in keys]
            labels = arrays["labels"] if "labels" in arrays.files else None
            classes = [str(c) for c in arrays["classes"]] if "classes" in arrays.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise DataError(f"cannot read {self.path} ({type(error).__name__}: {error}); pass "
                            "an .npz written with numpy.savez") from None
        self.names = tuple(k[len("view_"):] for k in keys)
        _check_names(self.names, str(self.path))
        n = len(self.views[0])
        for i, (name, view) in enumerate(zip(self.names, self.views)):
            if view.ndim not in (3, 4) or len(view) != n or n == 0:
                raise DataError(f"{self.path}: view_{name} is {view.dtype} {view.shape}; every "
                                f"view must be uint8 (N, H, W[, C]) with the same N ({n} > 0)")
            self.views[i] = view[..., None] if view.ndim == 3 else view  # (N, H, W) -> (N, H, W, 1)
            check_view(view[0], f"{self.path}: view_{name}[0]")  # the layout of every item
        self.labels = check_labels(np.full(n, -1) if labels is None else labels,
                                   None if classes is None else len(classes), str(self.path))
        if len(self.labels) != n:
            raise DataError(f"{self.path}: {len(self.labels)} labels for {n} contexts")
        self.classes = (classes if classes is not None
                        else [str(c) for c in range(int(self.labels.max()) + 1)])
        self.channels = tuple(view.shape[3] for view in self.views)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray, ...], int]:
        return tuple(view[index] for view in self.views), int(self.labels[index])


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image))


class RGBImages(Dataset):
    """Any labelled RGB split (datasets.labelled_split) as one-view contexts ((H, W, 3),)."""

    def __init__(self, data: str, split: str, data_root: str = "data", download: bool = False,
                 strict: bool = False):
        self.images = labelled_split(data, split, _rgb_array, data_root, download, strict)
        self.classes = class_names(self.images)
        self.labels = dataset_labels(self.images)
        self.skipped = skipped_files(self.images)
        self.names, self.channels = ("rgb",), (3,)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tuple[np.ndarray], int]:
        image, label = self.images[index]
        return (image,), int(label)


def _context(item, where: str) -> tuple[tuple[np.ndarray, ...], int]:
    """A Dataset's item as (views (H, W, C) uint8, label), or a DataError saying what is wrong."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and np.ndim(item[1]) == 0
            and isinstance(item[0], (tuple, list))):
        raise DataError(f"{where} is not (views, label): items must be ((view1, view2, ...), "
                        "label), each view a uint8 (H, W[, C]) array and label an int (-1 where "
                        "unlabelled); wrap an unlabelled dataset's views as (views, -1)")
    views, label = item
    if not np.issubdtype(np.asarray(label).dtype, np.integer):
        raise DataError(f"{where} has the label {label!r}; labels are class indices (-1: none)")
    return tuple(check_view(v, f"{where}, view {i},") for i, v in enumerate(views)), int(label)


class CheckedContexts(Dataset):
    """Your Dataset of (views, label) checked as the built-in sources are, every item once
    when it is built: each must be (views, label) with the first item's number of views and
    channel counts, uint8 (H, W[, C]) views and labels in range of its `classes` (where it has
    them); an item that raises is left out with a warning naming it (strict: a DataError).
    names: the dataset's `names`, else view0, view1, ...; classes: its `classes`, else the
    label numbers."""

    def __init__(self, dataset: Dataset, strict: bool = False):
        where = type(dataset).__name__
        if len(dataset) == 0:
            raise DataError(f"your {where} of views is empty")
        first, _ = _context(dataset[0], f"{where}[0]")
        if len(first) < 1:
            raise DataError(f"{where}[0] holds no views")
        self.dataset, self.skipped = dataset, []
        self.names = tuple(getattr(dataset, "names", None)
                           or (f"view{i}" for i in range(len(first))))
        _check_names(self.names, where)
        self.channels = tuple(v.shape[2] for v in first)
        labels, problems = {}, {}
        for i in range(len(dataset)):
            name = f"{where}[{i}]"
            try:
                item = dataset[i]
            # a bad file behind your Dataset: any exception, as for image files
            except Exception as error:  # noqa: BLE001
                problems[name] = f"{type(error).__name__}: {error}"
                continue
            views, labels[i] = _context(item, name)
            channels = tuple(v.shape[2] for v in views)
            if channels != self.channels:
                raise DataError(f"{name} has views of {channels} channels, {where}[0] of "
                                f"{self.channels}; every context needs the same views")
        kept = drop_unreadable([(f"{where}[{i}]", i) for i in labels], problems, strict, where)
        self.indices = [i for _, i in kept]
        self.skipped = sorted(problems)
        classes = getattr(dataset, "classes", None)
        self.labels = check_labels([labels[i] for i in self.indices],
                                   None if classes is None else len(classes), where)
        self.classes = ([str(c) for c in classes] if classes is not None
                        else [str(c) for c in range(int(self.labels.max()) + 1)])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def _train_classes(cfg) -> list[str] | None:
    """The class names of cfg.data's training views, read cheaply (class folder names present
    in every view, the .npz's classes or labels) to check a test split built alone; None where
    unknown."""
    path = Path(cfg.data)
    if path.suffix.lower() == ".npz":
        return npz_classes(path)
    if is_store(path / "train"):
        return store_info(path / "train")["classes"]
    views = [p for p in (path / "train").iterdir() if p.is_dir() and not p.name.startswith(".")]
    names = [{c.name for c in view.iterdir() if c.is_dir() and not c.name.startswith(".")}
             for view in views]
    return sorted(set.intersection(*names)) if names else None


def _paired(folder: Path, strict: bool) -> Dataset:
    """A split's contexts: a paired store (amdim prepare --paired), or the view folders."""
    if not is_store(folder):
        return PairedFolder(folder, strict)
    store = ImageStore(folder, strict=strict)
    if not store.paired:
        raise DataError(f"{folder} is a store of single images, not of views; make one of the "
                        "view folders with amdim prepare --paired")
    return store


def view_source(cfg, split: str) -> Dataset | None:
    """The contexts of a split ("train" or "test") for a PretrainConfig with views lab or
    paired; None where the data has no such split. Test splits: NAME_test.npz (or _val)
    beside NAME_train.npz; <root>/test/<view>/... beside <root>/train/<view>/...; any of
    these folders may be a paired store (amdim prepare --paired); a test split whose classes
    are not the training split's is refused (datasets.check_test_split)."""
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
        source = PairedArrays(found) if found else None
    elif (path / "train").is_dir():
        folder = path / split
        source = _paired(folder, cfg.strict_data) if folder.is_dir() else None
    else:
        source = _paired(path, cfg.strict_data) if split == "train" else None
    if split == "test" and source is not None:
        classes = _train_classes(cfg)
        if classes is not None:
            check_test_split(classes, source, str(path if path.suffix.lower() == ".npz"
                                                  else path / "train"))
    return source


def view_sources(cfg, sources=None) -> tuple[Dataset, Dataset | None, int]:
    """(training contexts, test contexts or None, number of classes or 0) for a PretrainConfig
    with views lab or paired. sources: with views paired, a Dataset of (views, label), or
    (train, test or None) such Datasets, instead of cfg.data's; they are checked item by item
    (CheckedContexts). Every source's splits pass datasets.check_splits."""
    if sources is not None and cfg.views != "paired":
        raise ValueError(f"your own views need --views paired, not {cfg.views}")
    if sources is None:
        train, test = view_source(cfg, "train"), view_source(cfg, "test")
        where = cfg.data
    else:
        if isinstance(sources, np.ndarray) or not isinstance(sources, (tuple, list, Dataset)):
            raise DataError(f"view_data is a {type(sources).__name__}; pass a Dataset of "
                            "(views, label), or (train, test or None) such Datasets")
        train, test = sources if isinstance(sources, (tuple, list)) else (sources, None)
        train, test = (None if s is None else CheckedContexts(s, cfg.strict_data)
                       for s in (train, test))
        where = "view_data"
    if test is not None and test.names != train.names:
        raise DataError(f"the test views {list(test.names)} of {where} are not the "
                        f"training views {list(train.names)}")
    return train, test, check_splits(train, test, str(where))
