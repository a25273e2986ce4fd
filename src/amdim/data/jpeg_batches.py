"""The decode data path: loader workers hand the stored JPEG bytes of each batch, the
training device decodes them together (torchvision.io.decode_jpeg on a list: nvJPEG's batched
decoder on CUDA, libjpeg-turbo on a CPU) and the batched views (views.batch_views) are built
there, as on the device path. For image folders and stores (data.store) too large to keep
decoded: a worker no longer decodes and augments each full-size image (2 ms for a 500x375
JPEG alone, before the views).

Images of one batch differ in size: they are laid at the top left of one canvas, and the views
read each within its own (height, width) (BatchViews' sizes). Which images form each batch and
the seed of its views follow batch_order, as on the other paths, so resuming is exact.
"""
from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from .batch_order import derive_seed
from .batches import (EpochBatches, ResumableBatches, SeededBatches,
                      leave_stops_to_the_main_process)
from .image_files import DataError, to_rgb

JPEG_START = b"\xff\xd8"
CANVAS_STEP = 32  # canvas sides round up to a multiple: few distinct shapes to set up views for


def _decode_jpeg(data, device: torch.device):
    """torchvision's decode_jpeg in RGB. torchvision 0.29 deprecates its image codecs for
    TorchCodec, whose batched GPU decoding of a list of images is not there yet: its warning,
    once a batch, is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).contiguous()


class RawImages(Dataset):
    """The items of an image folder (image_files.ImageClasses, ImageFiles) or store
    (data.store.ImageStore) as stored: (JPEG bytes, uint8 (L,), label), or for an image that is
    not a JPEG, (its pixels decoded here, uint8 (3, H, W), label). A file that cannot be read
    is replaced as the folder's own items replace it (the next readable one, warned)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.plain = copy.copy(dataset)  # the same items without their views
        self.plain.transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if hasattr(self.dataset, "jpeg"):  # a store: a view of its memory map, copied once
            return torch.from_numpy(np.array(self.dataset.jpeg(index))), int(
                self.dataset.labels[index])
        path, label = self.dataset.samples[index]
        try:
            data = Path(path).read_bytes()
        except OSError:
            data = b""  # the folder's own item below substitutes and warns
        if data[:2] == JPEG_START:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        image, label = self.plain[index]
        return _pixels(image), label


def raw_batch(items: list[tuple[torch.Tensor, int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DataLoader collate_fn of RawImages: (list of byte or pixel tensors, labels (B,))."""
    return [data for data, _ in items], torch.tensor([label for _, label in items])


def decode_batch(items: list[torch.Tensor], device: torch.device,
                 canvas: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG byte tensors (and already decoded (3, H, W) pixels) -> (images uint8 (B, 3, H, W)
    on `device`, each at the top left of a canvas of the largest height and width (rounded up
    to CANVAS_STEP, or `canvas` where given), sizes int64 (B, 2) on `device`). A JPEG that the
    batched decoder refuses (CMYK, damaged) is decoded by PIL on the host."""
    jpegs = [i for i, data in enumerate(items) if data.dim() == 1]
    images = list(items)
    try:
        decoded = _decode_jpeg([items[i] for i in jpegs], device) if jpegs else []
    except RuntimeError:  # one image in the batch: find which, one by one
        decoded = [_decode_one(items[i], device) for i in jpegs]
    for i, image in zip(jpegs, decoded):
        images[i] = image
    sizes = [tuple(image.shape[1:]) for image in images]
    if canvas is None:
        canvas = tuple(-(-max(s[k] for s in sizes) // CANVAS_STEP) * CANVAS_STEP for k in (0, 1))
    out = torch.zeros((len(images), 3, *canvas), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        out[i, :, :image.shape[1], :image.shape[2]] = image  # host pixels: copied here
    return out, _to_device(torch.tensor(sizes, dtype=torch.int64), device)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for its queued kernels: a copy from pageable
    memory would synchronise the stream first; from pinned memory it is queued."""
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return _decode_jpeg(data, device)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                return _pixels(image).to(device)
        except Exception as error:  # noqa: BLE001 - Pillow's plugins raise many kinds
            raise DataError(f"an image of the batch does not decode ({type(error).__name__}: "
                            f"{error}); was the store or folder changed after it was checked? "
                            "Run amdim prepare again, or replace the file") from None


class DecodedBatches(ResumableBatches):
    """((view1, view2), labels) batches of an image folder or store, decoded on `device` from
    the bytes `workers` loader processes read (0: in this process); views built there by
    `views(images, generator, sizes=...)`. Same interface as batches.TrainBatches."""

    def __init__(self, dataset: Dataset, views: Callable, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0):
        if len(dataset) < batch_size:
            raise DataError(f"the dataset has {len(dataset)} images, fewer than one batch of "
                            f"{batch_size}: lower the batch size")
        self.raw, self.views, self.batch_size, self.device = RawImages(dataset), views, \
            batch_size, device
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, workers
        self.epoch, self.batch = 0, 0
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return len(self.raw) // self.batch_size

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        epoch, start = self.epoch, self.batch
        keys = EpochBatches(len(self.raw), self.batch_size, self.seed, epoch, start, self.rank,
                            self.world_size)
        loader = DataLoader(SeededBatches(self.raw, self.seed, self.rank), batch_sampler=keys,
                            num_workers=self.workers, collate_fn=raw_batch,
                            worker_init_fn=leave_stops_to_the_main_process,
                            prefetch_factor=4 if self.workers else None,
                            generator=torch.Generator().manual_seed(self.seed))
        for k, (items, labels) in enumerate(loader, start):
            images, sizes = decode_batch(items, self.device)
            self.generator.manual_seed(derive_seed(self.seed, epoch, k, self.rank))
            views = self.views(images, self.generator, sizes=sizes)
            self.set_epoch(epoch, k + 1)  # so that iterating again goes on after this batch
            yield views, _to_device(labels, self.device)
