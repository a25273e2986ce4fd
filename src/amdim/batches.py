"""Batches of two views for pretraining: the DataLoader path and the choice of data path.

path "device": uint8 images cached on the training device once, views built there in batches
(tensor_data, batch_views); "loader": DataLoader workers run the PIL augmentation (views).
"""
from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch_views import BatchEvaluation, BatchViews
from .config import PretrainConfig
from .data import DataError, normalisation
from .tensor_data import EvalBatches, TrainBatches, cache_dataset, fits_in_memory

log = logging.getLogger("amdim")


class EpochBatches(Sampler[list[int]]):
    """This rank's part of each global batch of the epoch's shuffled order, from global batch
    `start`. The order depends only on (seed, epoch), so a resumed run sees the same batches,
    and N ranks together see exactly the batches one process would (rank r takes the r-th
    slice of each)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.local = rank, batch_size // world_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.epoch)).tolist()
        for batch in range(self.start, self.n // self.batch_size):  # full batches only
            first = batch * self.batch_size + self.rank * self.local
            yield order[first:first + self.local]

    def __len__(self) -> int:
        return max(0, self.n // self.batch_size - self.start)


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
        # the workers' seeds come from this generator: a function of the run and the position
        seed = cfg.seed + 7919 * self.epoch + 104729 * self.rank + self.batch
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=cfg.workers,
                               pin_memory=self.device.type == "cuda",
                               generator=torch.Generator().manual_seed(seed)))


def make_batches(cfg: PretrainConfig, train_set: Dataset, test_set: Dataset | None,
                 device: torch.device, rank: int, world_size: int, chosen: str | None):
    """(path, training batches, test batches or None). path "device": uint8 images cached on
    the device once, views built there in batches (tensor_data); "loader": DataLoader workers.
    A resumed run keeps the path it started with (`chosen`)."""
    path = chosen or cfg.data_path
    if path == "auto":
        path = "device" if fits_in_memory(len(train_set), cfg.image_size, device) else "loader"
    if path == "device":
        stats = normalisation(cfg.data)
        try:
            cache = cache_dataset(train_set, device)
        except DataError as error:
            if cfg.data_path == "device" or chosen:
                raise
            log.info("data on the loader path: %s", error)
            return make_batches(cfg, train_set, test_set, device, rank, world_size, "loader")
        train = TrainBatches(cache, BatchViews(cfg.image_size, *stats), cfg.batch_size,
                             seed=cfg.seed, rank=rank, world_size=world_size)
        test = None if test_set is None else EvalBatches(
            cache_dataset(test_set, device), BatchEvaluation(cfg.image_size, *stats),
            cfg.batch_size)
        return path, train, test
    train = LoaderBatches(train_set, cfg, device, rank, world_size)
    test = None if test_set is None else DataLoader(  # the whole test set, in order
        test_set, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda")
    return path, train, test
