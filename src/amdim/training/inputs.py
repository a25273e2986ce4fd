"""Pretraining's inputs, where the data meets the views: the datasets of two views (or of a
context's views), and their batches on the data path a run takes.

path "device": uint8 images cached on the training device once (data.device_images), views
built there in batches (views.batch_views); "loader": DataLoader workers run the PIL views
(views.image_views) on each image (data.batches.LoaderBatches).
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..config import PretrainConfig
from ..data.batches import (EvalBatches, LoaderBatches, TrainBatches,
                            leave_stops_to_the_main_process)
from ..data.datasets import DataError, normalisation, pretraining_datasets
from ..data.device_images import cache_dataset, fits_in_memory, stored_size
from ..data.paired import view_sources
from ..views.batch_views import BatchEvaluation, BatchViews
from ..views.image_views import TwoViews, evaluation_transform
from ..views.view_sets import ViewSet


def build_datasets(cfg) -> tuple[Dataset, Dataset | None, int]:
    """(pretraining set, test set or None, number of classes or 0) for a PretrainConfig."""
    stats = normalisation(cfg.data)
    views = TwoViews(cfg.image_size, *stats, getattr(cfg, "augment", "paper"))
    return pretraining_datasets(cfg, views, evaluation_transform(cfg.image_size, *stats))


def build_view_datasets(cfg, sources=None) -> tuple[ViewSet, ViewSet | None, int]:
    """(pretraining set, test set or None, number of classes or 0) of ViewSets for a
    PretrainConfig with views lab or paired. sources: with views paired, a Dataset of
    (views, label), or (train, test or None) such Datasets, instead of cfg.data's."""
    train, test, n_classes = view_sources(cfg, sources)
    test = (ViewSet(test, cfg.image_size, cfg.views, False) if test is not None and n_classes
            else None)
    return ViewSet(train, cfg.image_size, cfg.views, True, cfg.view_augment), test, n_classes


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
            test_cache, BatchEvaluation(cfg.image_size, *stats), cfg.eval_batch_size)
        return train, test
    train = LoaderBatches(train_set, cfg, device, rank, world_size)
    test = None if test_set is None else DataLoader(  # the whole test set, in order
        test_set, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", worker_init_fn=leave_stops_to_the_main_process,
        generator=torch.Generator().manual_seed(cfg.seed))
    return train, test
