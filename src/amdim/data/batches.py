"""Batches of two views for pretraining: the DataLoader path and the choice of data path.

path "device": uint8 images cached on the training device once, views built there in batches
(tensor_data, batch_views); "loader": DataLoader workers run the PIL augmentation (views).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch_order import batch_indices, derive_seed
from .batch_views import BatchEvaluation, BatchViews
from .config import PretrainConfig
from .data import DataError, normalisation
from .tensor_data import EvalBatches, TrainBatches, cache_dataset, fits_in_memory


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
    any dataset size. Same interface as tensor_data.TrainBatches."""

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
                               generator=torch.Generator().manual_seed(cfg.seed)))


def stored_size(dataset: Dataset) -> tuple[int, int] | None:
    """(height, width) shared by every image of an in-memory set (digits, .npz, torchvision's
    CIFAR and STL-10), or None (image folders: sizes unknown until decoded)."""
    pixels = getattr(dataset, "images", getattr(dataset, "data", None))
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 4:
        return None
    # (N, H, W, 3) for digits, npz and CIFAR; (N, 3, H, W) for STL-10
    return tuple(pixels.shape[1:3]) if pixels.shape[3] == 3 else tuple(pixels.shape[2:4])


def choose_data_path(cfg: PretrainConfig, train_set: Dataset, device: torch.device) -> str:
    """cfg.data_path, with auto resolved: the device path for an in-memory set of one image
    size whose uint8 copy fits in half the GPU's free memory (a quarter of the available RAM on a
    CPU), else the loader."""
    if cfg.data_path != "auto":
        return cfg.data_path
    if cfg.augment in ("randaugment", "trivialaugment"):  # torchvision's PIL policies
        return "loader"
    size = stored_size(train_set)
    fits = size is not None and fits_in_memory(len(train_set), cfg.image_size, device,
                                               height=size[0], width=size[1])
    return "device" if fits else "loader"


def make_batches(cfg: PretrainConfig, path: str, train_set: Dataset, test_set: Dataset | None,
                 device: torch.device, rank: int, world_size: int):
    """(training batches, test batches or None) on the data path `path`."""
    if path == "device":
        stats = normalisation(cfg.data)
        try:
            cache = cache_dataset(train_set, device)
            test_cache = None if test_set is None else cache_dataset(test_set, device)
        except MemoryError:
            raise DataError(f"{cfg.data} does not fit in memory decoded; use --data-path "
                            "loader") from None
        views = BatchViews(cfg.image_size, *stats, channels_last=cfg.channels_last,
                           augment=cfg.augment, seed=cfg.seed)
        train = TrainBatches(cache, views, cfg.batch_size, seed=cfg.seed, rank=rank,
                             world_size=world_size)
        test = None if test_cache is None else EvalBatches(
            test_cache, BatchEvaluation(cfg.image_size, *stats), cfg.batch_size)
        return train, test
    train = LoaderBatches(train_set, cfg, device, rank, world_size)
    test = None if test_set is None else DataLoader(  # the whole test set, in order
        test_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(cfg.seed))
    return train, test
