"""Image datasets for pretraining and evaluation.

`build_datasets(cfg)` gives the pretraining set (each item: ((view1, view2), label)) and the
labelled test set (each item: (image, label), deterministic transform). Labels are -1 where an
image has none (STL-10's unlabelled split, an unlabelled folder): the probes ignore those.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from .views import TwoViews, evaluation_transform

# per-dataset normalisation (mean, std), the authors' values where they give them
STATS = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
    "stl10": ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # any image folder
    "digits": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """Data that is missing or unusable, with what to do about it."""


class ArrayImages(Dataset):
    """uint8 images (N, H, W, 3) in memory with int labels, served as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class ImageFiles(Dataset):
    """Every image file below a folder, unlabelled (label -1): for pretraining only."""

    def __init__(self, root: Path, transform: Callable):
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.files:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found below {root}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB")), -1


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


def _torchvision(name: str, root: str, train: bool, download: bool, transform: Callable):
    try:
        if name == "stl10":
            split = "train+unlabeled" if train else "test"
            return datasets.STL10(root, split=split, download=download, transform=transform)
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        return cls(root, train=train, download=download, transform=transform)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        hint = "" if download else " or pass --download to fetch it"
        raise DataError(f"{name} not found under {Path(root).resolve()} ({error}); point "
                        f"--data-root at the folder that holds it{hint}") from None


def _folder_split(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _labelled_folder(path: Path, transform: Callable) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise DataError(f"{path} must hold one subfolder of images per class: {error}") from None


def build_datasets(cfg) -> tuple[Dataset, Dataset | None, int]:
    """(pretraining set, test set or None, number of classes or 0) for a PretrainConfig."""
    name = cfg.data.lower()
    stats = STATS.get(name, STATS["imagenet"])
    views = TwoViews(cfg.image_size, *stats)
    test_transform = evaluation_transform(cfg.image_size, *stats)
    if name == "digits":
        train = ArrayImages(*digits("train"), transform=views)
        return train, ArrayImages(*digits("test"), transform=test_transform), 10
    if name in ("cifar10", "cifar100", "stl10"):
        train = _torchvision(name, cfg.data_root, True, cfg.download, views)
        test = _torchvision(name, cfg.data_root, False, cfg.download, test_transform)
        return train, test, {"cifar10": 10, "cifar100": 100, "stl10": 10}[name]
    root = Path(cfg.data)
    if not root.is_dir():
        raise DataError(f"--data {cfg.data!r} is neither a known dataset (digits, cifar10, "
                        "cifar100, stl10) nor an existing folder")
    train_dir = _folder_split(root, ("train",))
    if train_dir is None:  # a plain folder of images: unlabelled pretraining, no probes
        return ImageFiles(root, views), None, 0
    train = _labelled_folder(train_dir, views)
    test_dir = _folder_split(root, ("val", "test"))
    test = _labelled_folder(test_dir, test_transform) if test_dir else None
    if test is not None and test.classes != train.classes:
        raise DataError(f"{test_dir} and {train_dir} must hold the same class folders")
    return train, test, len(train.classes)


def labelled_split(data: str, split: str, transform: Callable, data_root: str = "data",
                   download: bool = False) -> Dataset:
    """The labelled `split` ("train" or "test") of a dataset for evaluation; items (image, label).

    data: digits, cifar10, cifar100, stl10 (its 5,000 labelled training images, not the
    unlabelled split), or a folder holding train/<class>/ and val/<class>/ (or test/<class>/).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    name = data.lower()
    if name == "digits":
        return ArrayImages(*digits(split), transform=transform)
    if name == "stl10" and split == "train":
        try:
            return datasets.STL10(data_root, split="train", download=download, transform=transform)
        except RuntimeError as error:
            raise DataError(f"stl10 not found under {Path(data_root).resolve()} ({error}); point "
                            "--data-root at the folder that holds it") from None
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision(name, data_root, split == "train", download, transform)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data!r} is neither a known dataset (digits, cifar10, cifar100, "
                        "stl10) nor an existing folder")
    names = ("train",) if split == "train" else ("val", "test")
    folder = _folder_split(root, names)
    if folder is None:
        raise DataError(f"{root} has no {' or '.join(n + '/' for n in names)} subfolder; labelled "
                        f"evaluation needs {root}/train/<class>/ and {root}/val/<class>/ (or test/)")
    return _labelled_folder(folder, transform)


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
