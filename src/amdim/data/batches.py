"""Batches of two views for pretraining, on both data paths, in the order batch_order draws.

"loader": DataLoader workers run the per-image views of the dataset (LoaderBatches);
"device": the views of each batch are built on the device from an ImageCache (TrainBatches;
EvalBatches for the deterministic test transform). Which views: the caller's (a views
callable; training.inputs passes views.batch_views.BatchViews / BatchEvaluation).
"""
from __future__ import annotations

import signal
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import PretrainConfig
from .batch_order import batch_indices, derive_seed, shard_batch_indices
from .device_images import ImageCache
from .image_files import DataError


def leave_stops_to_the_main_process(worker_id: int) -> None:
    """worker_init_fn of every DataLoader of a run: SLURM's --signal=TERM and a terminal's
    Ctrl-C reach every process of the job, and a worker they end would end the run at once,
    from its last checkpoint. Ignoring them, the workers let the main process stop at the end
    of its step and save there; they still end with it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochBatches(Sampler[list[tuple[int, int, int]]]):
    """This rank's part of each global batch of epoch `epoch` (batch_order.batch_indices), from
    global batch `start` on, as keys (epoch, batch, image index) for SeededBatches."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        rows = batch_indices(self.n, self.batch_size, self.seed, self.epoch, self.rank,
                             self.world_size)  # (batches, batch_size // world_size)
        for batch in range(self.start, len(rows)):
            yield [(self.epoch, batch, i) for i in rows[batch].tolist()]

    def __len__(self) -> int:
        return max(0, self.n // self.batch_size - self.start)


class SeededBatches(Dataset):
    """Serves the keys of EpochBatches: each batch's augmentation draws from torch's generator
    seeded by derive_seed(seed, epoch, batch, rank) alone, whichever worker builds it, so a
    run resumed mid-epoch, with any number of workers, draws exactly what the uninterrupted
    run drew."""

    def __init__(self, dataset: Dataset, seed: int, rank: int):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> list:
        epoch, batch, _ = keys[0]
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(derive_seed(self.seed, epoch, batch, self.rank))
            return [self.dataset[index] for _, _, index in keys]


class LoaderBatches:
    """((view1, view2), labels) batches from DataLoader workers running the PIL augmentation:
    any dataset size. Same interface as TrainBatches."""

    def __init__(self, dataset: Dataset, cfg: PretrainConfig, device: torch.device, rank: int,
                 world_size: int):
        self.dataset, self.cfg, self.device = dataset, cfg, device
        self.rank, self.world_size = rank, world_size
        self.epoch, self.batch = 0, 0

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def __iter__(self):
        cfg = self.cfg
        batches = EpochBatches(len(self.dataset), cfg.batch_size, cfg.seed, self.epoch,
                               self.batch, self.rank, self.world_size)
        # a generator of its own: without one the loader draws its workers' base seed from
        # the global generator, which would shift the model's random stream on resume
        return iter(DataLoader(SeededBatches(self.dataset, cfg.seed, self.rank),
                               batch_sampler=batches, num_workers=cfg.workers,
                               pin_memory=self.device.type == "cuda",
                               worker_init_fn=leave_stops_to_the_main_process,
                               generator=torch.Generator().manual_seed(cfg.seed)))


class ResumableBatches:
    """Batches served from (epoch, batch) on, len(self) of them an epoch (TrainBatches,
    jpeg_batches.DecodedBatches): set_epoch picks where the next iteration starts."""

    epoch: int
    batch: int

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        """Serve epoch `epoch` next, starting after its first `batch` batches."""
        if epoch < 0 or not 0 <= batch <= len(self):
            raise ValueError(f"need epoch >= 0 and 0 <= batch <= {len(self)}, got {epoch}, {batch}")
        self.epoch, self.batch = (epoch + 1, 0) if batch == len(self) else (epoch, batch)


class TrainBatches(ResumableBatches):
    """Shuffled full batches ((view1, view2), labels) of an ImageCache, views built on its
    device; which images and which random draws follow batch_order. Under distributed
    training every rank holds the whole cache and takes its slice of each global batch of
    batch_size images; sharded, each rank's cache is its shard (batch_order.shard_indices) and
    it takes batch_size // world_size images of it per batch (batch_order.shard_batch_indices).
    Iterating again goes on where the last iteration stopped: the next epoch after a whole
    one."""

    def __init__(self, cache: ImageCache, views: Callable, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, sharded: bool = False):
        if batch_size < 1 or batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 divisible by world_size and 0 <= rank < "
                             f"world_size; got {batch_size}, {rank}, {world_size}")
        self.sharded, self.local_batch = sharded, batch_size // world_size
        if len(cache) < (self.local_batch if sharded else batch_size):
            raise DataError(f"the dataset has {len(cache)} images{' in this shard' * sharded}, "
                            f"fewer than one batch of {batch_size}: lower the batch size")
        self.cache, self.views, self.batch_size = cache, views, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.batch = 0, 0
        self.generator = torch.Generator(device=cache.images.device)

    def __len__(self) -> int:
        return len(self.cache) // (self.local_batch if self.sharded else self.batch_size)

    def __iter__(self) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
        epoch, start, images = self.epoch, self.batch, self.cache.images
        # (batches, batch_size // world_size), copied to the device once per epoch
        if self.sharded:
            rows = shard_batch_indices(len(images), self.local_batch, self.seed, epoch, self.rank)
        else:
            rows = batch_indices(len(images), self.batch_size, self.seed, epoch, self.rank,
                                 self.world_size)
        rows = rows.to(images.device)
        for k in range(start, len(rows)):
            self.generator.manual_seed(derive_seed(self.seed, epoch, k, self.rank))
            views = self.views(images[rows[k]], self.generator)
            self.set_epoch(epoch, k + 1)  # so that iterating again goes on after this batch
            yield views, self.cache.labels[rows[k]]


class EvalBatches:
    """Batches (images, labels) of an ImageCache in order, through the deterministic
    evaluation transform; the last batch may be smaller."""

    def __init__(self, cache: ImageCache, transform: Callable, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.cache, self.transform, self.batch_size = cache, transform, batch_size

    def __len__(self) -> int:
        return -(-len(self.cache) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.cache), self.batch_size):
            stop = start + self.batch_size
            yield self.transform(self.cache.images[start:stop]), self.cache.labels[start:stop]


class Shard(Dataset):
    """The images `indices` of a dataset, for the sharded device path: items, `labels`,
    `classes` and the `transform` (which data.device_images.cache_dataset bypasses while
    decoding) are the dataset's; an in-memory set's `images` are sliced, not read back."""

    def __init__(self, dataset: Dataset, indices: torch.Tensor):
        self.dataset, self.indices = dataset, indices.tolist()
        pixels, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
        if pixels is not None and labels is not None:
            self.images, self.labels = pixels[self.indices], np.asarray(labels)[self.indices]
        if hasattr(dataset, "classes"):
            self.classes = dataset.classes

    @property
    def transform(self):
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]
