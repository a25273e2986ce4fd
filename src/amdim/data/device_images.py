"""The whole dataset in device memory: decoded once into a uint8 tensor (an ImageCache, from
the compact .npz store or any in-memory dataset), then served as shuffled batches of views
built on the device (data.batches.TrainBatches with views.batch_views), as airbench does.

    cache = load_npz("cifar10_jpeg_train.npz", device)      # or cache_dataset(dataset, device)
    batches = TrainBatches(cache, BatchViews(32, *STATS["cifar10"]), batch_size=200, seed=0)
    for epoch in range(start_epoch, epochs):
        batches.set_epoch(epoch)
        for (view1, view2), labels in batches: ...

Batches and the seeds of their views follow batch_order, as on the DataLoader path, so
resuming is exact from the epoch number alone (set_epoch(epoch)); from the middle of an epoch,
also pass the number of batches already taken (set_epoch(epoch, batch)).
"""
from __future__ import annotations

import io
import logging
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .image_files import WARN_FILES, DataError, to_rgb

log = logging.getLogger("amdim")
NPZ_KEYS = ("jpeg", "offsets", "labels")  # required; "classes" is optional
DECODE_CHUNK = 512  # images per decoding task


@dataclass(frozen=True)
class ImageCache:
    """A decoded dataset on one device: images uint8 (N, 3, H, W), labels int64 (N,)
    (-1: unlabelled), class names, and the entries left out as undecodable ("FILE[i]")."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"need one label per image: {len(self.images)} images, labels of "
                             f"shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        return self.images.numel() + 8 * self.labels.numel()


def cache_bytes(n_images: int, height: int, width: int) -> int:
    """Device memory of an ImageCache: uint8 pixels and int64 labels."""
    return n_images * (3 * height * width + 8)


def fits_in_memory(n_images: int, image_size: int, device: torch.device | str, *,
                   height: int | None = None, width: int | None = None, fraction: float = 0.5,
                   force: bool = False) -> bool:
    """Whether to keep the dataset on `device` (TrainBatches) rather than use a DataLoader.

    True when the uint8 cache of n_images (height x width, image_size square by default: pass
    the stored size when it differs, e.g. 96 for STL-10 at image_size 64) takes at most
    `fraction` of the device's free memory now (torch.cuda.mem_get_info); the rest is left to
    the model, activations and the views of each batch. Call it once the model and optimiser
    are on the device. On a CPU: half of `fraction` of the available RAM (the batched views
    beat PIL workers there too: 15,700 views/s on one core at 32 px against a training step
    of 470 images/s, so the data path costs 4% of the step). Other devices: False, unless
    `force`.
    """
    if force:
        return True
    device = torch.device(device)
    if device.type == "cpu":
        free, fraction = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), fraction / 2
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        return False
    return cache_bytes(n_images, height or image_size, width or image_size) <= fraction * free


def stored_size(dataset: Dataset) -> tuple[int, int] | None:
    """(height, width) shared by every image of an in-memory set (digits, .npz, torchvision's
    CIFAR and STL-10) or of a store (data.store: its sizes, known without decoding), or None
    (images of several sizes; image folders: sizes unknown until decoded)."""
    sizes = getattr(dataset, "sizes", None)
    if isinstance(sizes, np.ndarray) and sizes.ndim == 2 and len(sizes):
        return tuple(int(v) for v in sizes[0]) if (sizes == sizes[0]).all() else None
    pixels = getattr(dataset, "images", getattr(dataset, "data", None))
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 4:
        return None
    # (N, H, W, 3) for digits, npz and CIFAR; (N, 3, H, W) for STL-10
    return tuple(pixels.shape[1:3]) if pixels.shape[3] == 3 else tuple(pixels.shape[2:4])


def _decode_into(out: np.ndarray, labels: np.ndarray, item: Callable[[int], tuple],
                 where: str, workers: int | None) -> None:
    """Fill out (N, 3, H, W) and labels (N,) from item(i) -> (RGB array (H, W, 3), label),
    in chunks on a thread pool (Pillow releases the GIL while decoding); an item whose
    pixels are None is left as zeros."""
    shape = out.shape[2], out.shape[3], 3

    def decode(start: int) -> None:
        for i in range(start, min(start + DECODE_CHUNK, len(out))):
            pixels, labels[i] = item(i)
            if pixels is None:
                continue
            if pixels.shape != shape:
                raise DataError(
                    f"{where}: image {i} is {pixels.shape[1]}x{pixels.shape[0]} px but image 0 "
                    f"is {shape[1]}x{shape[0]}; the device cache needs one size for all images: "
                    "resize them to one size first, or decode them batch by batch (--data-path "
                    "decode, or loader)")
            out[i] = pixels.transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(0, len(out), DECODE_CHUNK)))


def _to_device(images: np.ndarray, labels: np.ndarray, device, classes, where: str) -> ImageCache:
    try:
        return ImageCache(torch.from_numpy(images).to(device),
                          torch.from_numpy(labels).to(device), tuple(classes))
    except torch.OutOfMemoryError:
        raise DataError(f"{where}: {images.nbytes / 2**30:.2f} GiB of images do not fit on "
                        f"{device}; check fits_in_memory first, or use the DataLoader path "
                        "(--data-path loader)") from None


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(image))  # 16-bit pixels scaled, not clipped to white


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(jpeg, offsets, labels, classes) of a .npz dataset, checked: a DataError says what is
    wrong with a file that is not one, is damaged, or holds offsets or labels that cannot be."""
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the path of a .npz dataset file")
    with open(path, "rb") as f:
        start = f.read(4)
    if start != b"PK\x03\x04":  # every .npz is a zip archive
        raise DataError(f"{path} is not a readable .npz archive (it starts with {start!r}, not "
                        "a zip header); pass a dataset written with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing} (has {archive.files}); the "
                                "format is jpeg (uint8 bytes), offsets (N+1), labels (N), "
                                "classes (C)")
            # each archive[key] access decompresses again: read every array once
            jpeg, offsets = archive["jpeg"], archive["offsets"].astype(np.int64)
            labels = archive["labels"].astype(np.int64)
            classes = [str(c) for c in archive["classes"]] if "classes" in archive.files else []
    # a damaged archive: zipfile, zlib and numpy each raise their own
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{path} is not a readable .npz archive: damaged (truncated or changed "
                        f"bytes: {type(error).__name__}: {error}); copy it again") from None
    n = len(labels)
    if len(offsets) != n + 1 or n == 0:
        raise DataError(f"{path}: offsets has {len(offsets)} entries for {n} labels; need N+1 "
                        "offsets for N > 0 images")
    if offsets[0] < 0 or offsets[-1] > len(jpeg) or np.any(np.diff(offsets) < 0):
        raise DataError(f"{path}: the offsets are not increasing from 0 to at most the "
                        f"{len(jpeg)} bytes of jpeg (they run from {offsets[0]} to "
                        f"{offsets[-1]}); the file is damaged or was written wrongly")
    top = len(classes) if classes else np.iinfo(np.int64).max
    bad = (labels < -1) | (labels >= top)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{path}: {int(bad.sum())} labels lie outside -1..{top - 1} (the "
                        f"{len(classes)} classes), e.g. image {i} has label {labels[i]}")
    return jpeg, offsets, labels, classes


def npz_first_image(path: str | os.PathLike) -> Image.Image:
    """The first image of a .npz dataset, read without decompressing the rest."""
    with zipfile.ZipFile(path) as archive:
        offsets = np.load(archive.open("offsets.npy"))
        with archive.open("jpeg.npy") as f:
            fmt = np.lib.format
            header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                      else fmt.read_array_header_2_0)
            header(f)  # the array's bytes follow
            f.read(int(offsets[0]))
            image = Image.open(io.BytesIO(f.read(int(offsets[1] - offsets[0]))))
            image.load()
            return image


def load_npz(path: str | os.PathLike, device: torch.device | str = "cpu",
             workers: int | None = None, strict: bool = False) -> ImageCache:
    """Decode a compact .npz dataset (keys jpeg, offsets, labels, classes: one JPEG stream
    per image laid end to end, see shared/data/README.md) into an ImageCache on `device`.
    Entries that do not decode are left out with a warning and listed in its `skipped`
    (strict: a DataError)."""
    path = Path(path)
    jpeg, offsets, labels, classes = _read_npz(path)
    n, problems = len(labels), {}

    def item(i: int) -> tuple[np.ndarray | None, int]:
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as image:
                return _rgb(image), labels[i]
        # any exception: Pillow's plugins raise OSError, SyntaxError, ValueError, ...
        except Exception as error:  # noqa: BLE001
            problems[i] = f"{type(error).__name__}: {error}"
            return None, labels[i]

    first = next((pixels for pixels, _ in map(item, range(n)) if pixels is not None), None)
    if first is None:
        raise DataError(f"none of the {n} images in {path} decode (image 0: {problems[0]})")
    images = np.empty((n, 3) + first.shape[:2], dtype=np.uint8)
    _decode_into(images, labels, item, str(path), workers)
    if problems and strict:
        raise DataError(f"{len(problems)} undecodable image(s) in {path} (e.g. image "
                        f"{min(problems)}: {problems[min(problems)]}); run without "
                        "--strict-data to skip them with a warning")
    for i in sorted(problems)[:WARN_FILES]:
        log.warning("skipping undecodable image %d of %s (%s)", i, path, problems[i])
    if len(problems) > WARN_FILES:
        log.warning("skipping %d more undecodable images of %s", len(problems) - WARN_FILES, path)
    keep = np.setdiff1d(np.arange(n), sorted(problems))
    if len(problems):
        images, labels = images[keep], labels[keep]
    cache = _to_device(images, labels, device, classes, str(path))
    return dataclasses.replace(cache, skipped=tuple(f"{path}[{i}]" for i in sorted(problems)))


def cache_dataset(dataset, device: torch.device | str = "cpu",
                  workers: int | None = None) -> ImageCache:
    """Decode a map-style dataset of (PIL image or uint8 (H, W, 3) array, label) once into an
    ImageCache on `device`. A `transform` attribute (torchvision's datasets, data.datasets') is
    bypassed while decoding, so the datasets of data.build_datasets(cfg) can be passed as
    they are. All images must share one size. A dataset that holds its decoded pixels as
    `images` uint8 (N, H, W, 3) and `labels` (N,) (data.ArrayImages: digits, .npz) is copied
    as it is rather than read back image by image."""
    n = len(dataset)
    if n == 0:
        raise DataError("the dataset is empty; nothing to cache")
    where = type(dataset).__name__
    pixels, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 4
            and pixels.shape[0] == n and pixels.shape[3] == 3 and labels is not None):
        images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # (N, H, W, 3) -> (N, 3, H, W)
        return _to_device(images, np.asarray(labels, dtype=np.int64), device,
                          getattr(dataset, "classes", ()), where)
    has_transform = getattr(dataset, "transform", None) is not None
    saved = getattr(dataset, "transform", None)

    def item(i: int) -> tuple[np.ndarray, int]:
        image, label = dataset[i]
        if isinstance(image, Image.Image):
            return _rgb(image), int(label)
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
            return image, int(label)
        raise DataError(f"{where}[{i}] gave a {type(image).__name__}, not a PIL image or a "
                        "uint8 (H, W, 3) array: build the dataset with transform=None")

    try:
        if has_transform:
            dataset.transform = lambda image: image  # identity while decoding
        first = item(0)[0]
        images = np.empty((n, 3) + first.shape[:2], dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)
        _decode_into(images, labels, item, where, workers)
    finally:
        if has_transform:
            dataset.transform = saved
    return _to_device(images, labels, device, getattr(dataset, "classes", ()), where)
