"""Image datasets for pretraining and evaluation.

`build_datasets(cfg)` gives the pretraining set (each item: ((view1, view2), label)) and the
labelled test set (each item: (image, label), deterministic transform). Labels are -1 where an
image has none (STL-10's unlabelled split, an unlabelled folder): the probes ignore those.

Image folders are checked when they are built: every file is decoded once (cheaply, see
images.problem), so a truncated or non-image file is skipped with a warning and listed in the
dataset's `skipped` (`skipped_files(dataset)`), or, with strict, stops the run with a DataError
before it starts. Folder layouts that cannot work raise a DataError saying what to change.
A store that `amdim prepare` made of a folder (data.store) stands in for it wherever it goes.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from .device_images import load_npz, npz_first_image
from .image_files import IMAGE_EXTENSIONS, DataError, ImageClasses, ImageFiles, check_labels
from .store import ImageStore, is_store, store_info

log = logging.getLogger("amdim")

# per-dataset normalisation (mean, std), the authors' values where they give them
STATS = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "stl10": ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # any image folder
    "digits": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
KNOWN = ("digits", "cifar10", "cifar100", "stl10")
KNOWN_SIZES = {"digits": 32, "cifar10": 32, "cifar100": 32, "stl10": 96}  # stored px
DOWNLOADS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
             "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
             "stl10": "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"}


def resolved_data(data: str) -> str:
    """A --data path as an absolute path (so that other spellings and other working folders
    name the same data); dataset names as they are."""
    if data.lower() in KNOWN:
        return data
    return str(Path(data).expanduser().resolve())


def stored_image_size(data: str, data_root: str = "data") -> int | None:
    """The larger side in px of the data's first image as stored (a known dataset's by name);
    None where it cannot be read (the run itself will then say why)."""
    if data.lower() in KNOWN_SIZES:
        return KNOWN_SIZES[data.lower()]
    path = Path(data)
    try:
        if path.suffix.lower() == ".npz":
            return max(npz_first_image(path).size)
        store = _store_of(path)
        if store is not None:  # (height, width), or per view (K, 2): the largest side
            return int(np.max(np.load(store / "sizes.npy", mmap_mode="r")[0]))
        for parent, dirs, names in os.walk(path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                    with Image.open(Path(parent, name)) as image:
                        return max(image.size)
    except Exception:  # noqa: BLE001 - any unreadable file: the run reports it properly
        return None
    return None


def _store_of(path: Path) -> Path | None:
    """The store (amdim prepare) that --data `path` names first: itself, or its train/."""
    return next((p for p in (path, path / "train") if is_store(p)), None)


def dataset_name(data: str) -> str:
    """The dataset a --data value holds: a name as is; a folder named cifar10, or
    cifar10_jpeg_train.npz, counts as cifar10; a store (amdim prepare) by the folder it was
    made from; other paths by their last component."""
    store = None if data.lower() in KNOWN else _store_of(Path(data))
    if store is not None:
        try:
            return json.loads((store / "store.json").read_text())["dataset"]
        except (OSError, ValueError, KeyError):  # an unfinished store: reading it says why
            pass
    name = Path(data).name.lower()
    return name.split("_")[0] if name.endswith(".npz") else name


def normalisation(data: str) -> tuple[tuple, tuple]:
    """(mean, std) for a dataset name, folder or .npz file: the dataset's own where known,
    else ImageNet's."""
    return STATS.get(dataset_name(data), STATS["imagenet"])


class ArrayImages(Dataset):
    """uint8 images (N, H, W, 3) in memory with int labels, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable,
                 classes: list[str] | None = None):
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform
        if classes:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits (8x8, shipped inside the package, no download),
    upscaled to 32x32 RGB; a fixed 80/20 train/test split. Returns uint8 (N, 32, 32, 3), labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float()[:, None]  # (N, 1, 8, 8) in [0, 1]
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)
    images = images.permute(0, 2, 3, 1).numpy()  # (N, 32, 32, 3)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    keep = order[:cut] if split == "train" else order[cut:]
    return np.ascontiguousarray(images[keep]), bunch.target[keep]


def _torchvision(name: str, root: str, split: str, download: bool, transform: Callable):
    """split: "pretrain" (STL-10: train+unlabeled), "train" or "test"."""
    try:
        if name == "stl10":
            split = {"pretrain": "train+unlabeled"}.get(split, split)
            return datasets.STL10(root, split=split, download=download, transform=transform)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(root, train=split != "test", download=download, transform=transform)
    except (urllib.error.URLError, OSError) as error:  # no network, or a proxy in the way
        if not download:
            raise
        reason = getattr(error, "reason", None) or error
        raise DataError(f"could not download {name} ({reason}): is there no network here? "
                        f"Fetch {DOWNLOADS[name]} elsewhere, put the archive (or its unpacked "
                        f"folder) in {Path(root).resolve()}, and run without --download") from None
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        hint = "" if download else " or pass --download to fetch it"
        raise DataError(f"{name} not found under {Path(root).resolve()} ({error}); point "
                        f"--data-root at the folder that holds it{hint}") from None


def _folder_split(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _split_images(folder: Path, transform: Callable, strict: bool) -> Dataset:
    """A split's labelled images: a store (amdim prepare) of one, or its class folders."""
    if not is_store(folder):
        return ImageClasses(folder, transform, strict)
    images = ImageStore(folder, transform, strict)
    if images.paired:
        raise DataError(f"{folder} is a store of paired views ({', '.join(images.names)}); "
                        "train on it with --views paired")
    return images


def _npz_images(path: Path, transform: Callable, strict: bool = False) -> ArrayImages:
    """A compact .npz split (JPEG streams laid end to end, as in shared/data) decoded once."""
    cache = load_npz(path, strict=strict)  # images (N, 3, H, W) uint8 on the CPU
    images = ArrayImages(cache.images.permute(0, 2, 3, 1).numpy(), cache.labels.numpy(),
                         transform, list(cache.classes) or None)
    images.skipped = list(cache.skipped)  # undecodable entries, left out (skipped_files)
    images.path = path
    return images


def _npz_split(path: Path, split: str) -> Path | None:
    """cifar10_jpeg_train.npz -> itself for "train"; cifar10_jpeg_test.npz or _val.npz for "test"."""
    if split == "train":
        return path
    stem = path.name[:-len("_train.npz")] if path.name.endswith("_train.npz") else None
    return next((path.with_name(f"{stem}_{s}.npz") for s in ("test", "val")
                 if stem and path.with_name(f"{stem}_{s}.npz").is_file()), None)


def _existing_folder(data: str) -> Path:
    root = Path(data)
    if not root.exists():
        raise DataError(f"--data {data!r} is neither a known dataset ({', '.join(KNOWN)}) "
                        f"nor an existing folder ({root.resolve()} does not exist); check the "
                        "path")
    if not root.is_dir():
        raise DataError(f"--data {data!r} is a file, not a folder; pass the folder that holds "
                        f"the images (or train/<class>/ and val/<class>/)")
    return root


def npz_classes(path: Path) -> list[str] | None:
    """The class names of an .npz split (its `classes`, else its label numbers), read without
    its images, to check a test split built alone; None where it cannot be read (building
    that split says why)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "classes" in arrays.files:
                return [str(c) for c in arrays["classes"]]
            labels = arrays["labels"] if "labels" in arrays.files else np.full(1, -1)
    # a damaged archive: zipfile, zlib and numpy each raise their own
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    return [str(c) for c in range(int(np.max(labels, initial=-1)) + 1)]


def dataset_labels(dataset: Dataset) -> np.ndarray | None:
    """The labels of a dataset that holds them (`labels`, or torchvision's `targets`), else None."""
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return np.asarray(labels)
    return None


def _where(dataset: Dataset) -> str:
    return str(getattr(dataset, "root", None) or getattr(dataset, "path", None)
               or type(dataset).__name__)


def _short(where: str) -> str:
    return Path(where).name + ("/" if Path(where).is_dir() else "")


def _numbered(classes: list[str]) -> bool:
    return classes == [str(i) for i in range(len(classes))]


def check_test_split(classes: list[str], test: Dataset, train_where: str) -> None:
    """Refuse (DataError) a test split that does not hold the training split's classes: other
    class names where both splits name theirs (a class missing from one split would shift every
    label after it), or labels outside the training classes. The one rule of every source."""
    test_classes, where = class_names(test), _where(test)
    if classes and test_classes and not (_numbered(classes) or _numbered(test_classes)) \
            and test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        order = "" if only_train or only_test else " (the same names in another order)"
        raise DataError(f"{train_where} and {where} must hold the same classes{order}; only in "
                        f"{_short(train_where)}: {only_train}, only in {_short(where)}: "
                        f"{only_test}. Add or remove classes so that they match")
    labels = dataset_labels(test)
    if labels is not None:
        if not classes and (labels >= 0).any():
            raise DataError(f"{where} is labelled but the training split of {train_where} is "
                            "not; label both splits (class folders, or a labels array) or "
                            "neither")
        check_labels(labels, len(classes), f"{where} (test split of {train_where})")


def check_splits(train: Dataset, test: Dataset | None, data: str) -> int:
    """The number of classes of a (training, test or None) pair of any source, after
    check_test_split; warns that the test probes are off where the training split is
    unlabelled but a test split exists."""
    labels = dataset_labels(train)
    labelled = labels is None or (np.asarray(labels) >= 0).any()
    classes = class_names(train) if labelled else []
    if test is not None:
        check_test_split(classes, test, _where(train))
        if not classes:
            log.warning("%s has no labels (no class folders, no labels array): the test "
                        "probes are off", data)
    return len(classes)


def pretraining_datasets(cfg, views: Callable, test_transform: Callable
                         ) -> tuple[Dataset, Dataset | None, int]:
    """(pretraining set, test set or None, number of classes or 0) for a PretrainConfig: the
    training images through `views` (each item: (views, label)), the test images through
    `test_transform`."""
    name = cfg.data.lower()
    if name == "digits":
        train = ArrayImages(*digits("train"), transform=views)
        return train, ArrayImages(*digits("test"), transform=test_transform), 10
    if name in ("cifar10", "cifar100", "stl10"):
        train = _torchvision(name, cfg.data_root, "pretrain", cfg.download, views)
        test = _torchvision(name, cfg.data_root, "test", cfg.download, test_transform)
        return train, test, {"cifar10": 10, "cifar100": 100, "stl10": 10}[name]
    if name.endswith(".npz"):
        train = _npz_images(Path(cfg.data), views, cfg.strict_data)
        test_path = _npz_split(Path(cfg.data), "test")
        test = _npz_images(test_path, test_transform, cfg.strict_data) if test_path else None
        return train, test, check_splits(train, test, cfg.data)
    root = _existing_folder(cfg.data)
    if is_store(root):  # one store: labelled where made from class folders, no test split
        train = _split_images(root, views, cfg.strict_data)
        return train, None, check_splits(train, None, cfg.data)
    train_dir = _folder_split(root, ("train",))
    if train_dir is None:  # a plain folder of images: unlabelled pretraining, no probes
        return ImageFiles(root, views, cfg.strict_data), None, 0
    train = _split_images(train_dir, views, cfg.strict_data)
    test_dir = _folder_split(root, ("val", "test"))
    test = _split_images(test_dir, test_transform, cfg.strict_data) if test_dir else None
    return train, test, check_splits(train, test, str(train_dir))


def labelled_split(data: str, split: str, transform: Callable, data_root: str = "data",
                   download: bool = False, strict: bool = False) -> Dataset:
    """The labelled `split` ("train" or "test") of a dataset for evaluation; items (image, label).

    data: digits, cifar10, cifar100, stl10 (its 5,000 labelled training images, not the
    unlabelled split), an NAME_train.npz file (beside NAME_test.npz or NAME_val.npz), or a
    folder holding train/<class>/ and val/<class>/ (or test/<class>/),
    whose unreadable files are skipped (strict: raise DataError), or the stores `amdim
    prepare` made of one (OUT/train and OUT/val; a store of class folders alone: "train" only).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = data.lower()
    if name == "digits":
        return ArrayImages(*digits(split), transform=transform)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(name, data_root, split, download, transform)
    if name.endswith(".npz"):
        path = _npz_split(Path(data), split)
        if path is None:
            raise DataError(f"no test split beside {data}: expected a file named like "
                            f"{Path(data).name.replace('_train', '_test')}")
        test = _npz_images(path, transform, strict)
        classes = npz_classes(Path(data))
        if classes is not None:
            check_test_split(classes, test, data)
        return test
    root = _existing_folder(data)
    if is_store(root):  # one store (of class folders): a training split alone
        if split == "test":
            raise DataError(f"{root} is one image store, without a test split; prepare a folder "
                            "with train/ and val/ (amdim prepare SRC OUT gives OUT/train and "
                            "OUT/val) and pass OUT")
        images = _split_images(root, transform, strict)
        if not hasattr(images, "classes"):
            raise DataError(f"the image store {root} has no labels (it was made from a plain "
                            "folder); labelled evaluation needs one made from class folders")
        return images
    names = ("train",) if split == "train" else ("val", "test")
    folder = _folder_split(root, names)
    if folder is None:
        raise DataError(f"{root} has no {' or '.join(n + '/' for n in names)} subfolder; labelled "
                        f"evaluation needs {root}/train/<class>/ and {root}/val/<class>/ (or test/)")
    images = _split_images(folder, transform, strict)
    if split == "test":  # the training split's classes: its store's, or its folders listed
        train = root / "train"
        classes = (store_info(train)["classes"] if is_store(train)
                   else sorted(p.name for p in train.iterdir()
                               if p.is_dir() and not p.name.startswith("."))
                   if train.is_dir() else class_names(images))
        check_test_split(classes, images, str(train))
    return images


def class_names(dataset: Dataset) -> list[str]:
    """The class names of a labelled dataset (the label as a string where it has none)."""
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return [str(c) for c in classes]
    labels = getattr(dataset, "labels", None)
    if labels is None:
        raise DataError(f"{type(dataset).__name__} has neither `classes` nor `labels`; cannot "
                        "tell how many classes it holds")
    return [str(c) for c in range(int(np.max(labels)) + 1)]
