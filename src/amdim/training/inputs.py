"""Pretraining's inputs, where the data meets the views: the datasets of two views (or of a
context's views), and their batches on the data path a run takes.

path "device": uint8 images cached on the training device once (data.device_images), views
built there in batches (views.batch_views); "sharded": the same, each rank caching its shard;
"decode": loader workers read each batch's JPEG bytes, the device decodes them and builds the
views (data.jpeg_batches); "loader": DataLoader workers run the PIL views
(views.image_views) on each image (data.batches.LoaderBatches).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import BATCHED_PATHS, PretrainConfig
from ..data.batch_order import shard_indices
from ..data.batches import (EvalBatches, LoaderBatches, Shard, TrainBatches,
                            leave_stops_to_the_main_process)
from ..data.datasets import DataError, normalisation, pretraining_datasets, stored_image_size
from ..data.device_images import cache_dataset, fits_in_memory, stored_size
from ..data.image_files import ImageClasses, ImageFiles
from ..data.jpeg_batches import DecodedBatches
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


def choose_data_path(cfg: PretrainConfig, train_set: Dataset, device: torch.device,
                     world_size: int = 1) -> str:
    """cfg.data_path, with auto resolved (README, "How it runs"):
    - device: an in-memory set of one image size whose uint8 copy fits in half the GPU's free
      memory (a quarter of the available RAM on a CPU);
    - sharded: under distributed training, where only 1/world_size of it fits;
    - decode: an image folder or store, views paper or imagenet-faa; on a CPU only where its
      images are at most twice the view size (a store's shorter sides, a folder's first image's
      longer side): there it keeps every core for the step, and decoding larger images in
      this process would cost the step more than a loader worker does;
    - else loader."""
    if cfg.data_path != "auto":
        return cfg.data_path
    if cfg.augment in ("randaugment", "trivialaugment"):  # torchvision's PIL policies
        return "loader"
    size = stored_size(train_set)
    for path, n in (("device", len(train_set)), ("sharded", len(train_set) // world_size)):
        if size is not None and (path == "device" or world_size > 1) and fits_in_memory(
                n, cfg.image_size, device, height=size[0], width=size[1]):
            return path
    if decodable(train_set):  # (a store of one size that does not fit, too)
        if device.type == "cuda":
            return "decode"
        sizes = getattr(train_set, "sizes", None)  # a store's: its median shorter side
        side = (float(np.median(sizes.min(-1))) if sizes is not None
                else stored_image_size(cfg.data))  # a folder's: its first image's longer
        return "decode" if side is not None and side <= 2 * cfg.image_size else "loader"
    return "loader"


def decodable(dataset: Dataset) -> bool:
    """Whether the decode path can read a dataset: a store, or an image folder."""
    return hasattr(dataset, "jpeg") or isinstance(dataset, (ImageFiles, ImageClasses))


def make_batches(cfg: PretrainConfig, path: str, train_set: Dataset, test_set: Dataset | None,
                 device: torch.device, rank: int, world_size: int):
    """(training batches, test batches or None) on the data path `path`."""
    if path in BATCHED_PATHS:
        stats = normalisation(cfg.data)
        views = BatchViews(cfg.image_size, *stats, channels_last=cfg.channels_last,
                           augment=cfg.augment, seed=cfg.seed)
    if path == "decode":
        if not decodable(train_set):
            raise DataError(f"--data-path decode reads image folders and amdim prepare stores; "
                            f"{cfg.data} is neither: use --data-path device or loader (or auto)")
        train = DecodedBatches(train_set, views, cfg.batch_size, device, cfg.seed, rank,
                               world_size, cfg.workers)
        return train, _test_loader(cfg, test_set, device)
    if path in ("device", "sharded"):
        sharded = path == "sharded"
        shard = (Shard(train_set, shard_indices(len(train_set), cfg.seed, rank, world_size))
                 if sharded else train_set)
        try:
            cache = cache_dataset(shard, device)
            test_cache = None if test_set is None else cache_dataset(test_set, device)
        except MemoryError:
            raise DataError(f"{cfg.data} does not fit in memory decoded; use --data-path "
                            f"{'decode or ' * decodable(train_set)}loader") from None
        train = TrainBatches(cache, views, cfg.batch_size, seed=cfg.seed, rank=rank,
                             world_size=world_size, sharded=sharded)
        test = None if test_cache is None else EvalBatches(
            test_cache, BatchEvaluation(cfg.image_size, *stats), cfg.eval_batch_size)
        return train, test
    return LoaderBatches(train_set, cfg, device, rank, world_size), _test_loader(
        cfg, test_set, device)


def _test_loader(cfg: PretrainConfig, test_set: Dataset | None, device: torch.device):
    """The whole test set, in order, through DataLoader workers (the probes' test batches)."""
    return None if test_set is None else DataLoader(
        test_set, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.workers,
        pin_memory=device.type == "cuda", worker_init_fn=leave_stops_to_the_main_process,
        generator=torch.Generator().manual_seed(cfg.seed))
