"""The classifiers of `amdim evaluate`, trained on a frozen encoder: the configuration and
schedules of the evaluation protocols, the batches they train on (cached on the device or from
a DataLoader), the authors' batch-norm refresh, and `evaluate`, which trains the linear, MLP and
kNN classifiers and scores them on the test set.

On a GPU the frozen encoder runs channels-last under bf16 autocast without gradients; a set
held in memory (digits, CIFAR, STL-10, .npz) that fits is decoded onto the GPU once and
transformed and augmented there in batches (views.batch_views), as in pretraining; the losses stay
on the device and are read once per epoch.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import check_floats, milestone_factor
from ..data.batches import EvalBatches, TrainBatches
from ..data.datasets import dataset_name
from ..data.device_images import cache_dataset, fits_in_memory, stored_size
from ..model.classifiers import Probes, knn_scores, topk_correct, train_epoch
from ..model.encoder import Encoder
from ..model.frozen_features import encode, encode_batch, frozen, in_order
from ..runtime import resolve_device
from ..views.batch_views import BatchEvaluation, BatchViews

log = logging.getLogger("amdim")
# the authors' classifier schedules: epochs, and the epochs after which the lr is x LR_GAMMA
SCHEDULES = {"cifar": (120, (80, 110)),  # CIFAR-10/100, STL-10 (and digits)
             "imagenet": (30, (15, 25)),  # ImageNet and other image folders
             "places205": (15, (7, 12))}
LR_GAMMA = 0.2
PROTOCOLS = ("standard", "authors")
AUTHORS_REFRESH_BATCHES = 50  # test batches of the authors' batch-norm refresh (utils.py)


class EvaluationError(RuntimeError):
    """An evaluation that cannot run or whose result cannot be trusted."""


@dataclass(frozen=True)
class EvaluationConfig:
    mode: str = "full"  # full: augmented images each epoch (the authors'); features: cached
    schedule: str | None = None  # a key of SCHEDULES; None: default_schedule(data)
    epochs: int | None = None  # None: the schedule's
    lr_milestones: tuple[int, ...] | None = None  # lr x LR_GAMMA after each; None: the schedule's
    lr: float = 2e-4  # the authors' Adam settings, on the classifiers only
    betas: tuple[float, float] = (0.8, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    batch_size: int = 200
    workers: int = 2
    device: str = "auto"
    precision: str | None = None  # autocast of the frozen encoder; None: bf16 on CUDA, else fp32
    data_path: str = "auto"  # device (sets decoded onto it), loader, auto: see runtime()
    knn_k: int = 200  # neighbours (InstDisc, DINO)
    knn_temperature: float = 0.07  # a neighbour's vote is exp(cosine similarity / T)
    seed: int = 0  # classifier init and shuffling
    protocol: str = "standard"  # standard: eval mode, whole test set; authors: see the docstring

    def __post_init__(self) -> None:
        if self.mode not in ("full", "features"):
            raise ValueError(f"mode must be 'full' or 'features', got {self.mode!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.batch_size < 2 or self.knn_k < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError("batch_size must be >= 2, knn_k and epochs >= 1")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.data_path not in ("auto", "device", "loader"):
            raise ValueError(f"data_path must be auto, device or loader, got {self.data_path!r}")
        check_floats(self, FLOAT_RANGES)


# the accepted range of EvaluationConfig's floats (config.check_floats: all must be finite)
FLOAT_RANGES = {"lr": (lambda v: v > 0, "> 0 (e.g. --lr 2e-4)"),
                "knn_temperature": (lambda v: v > 0, "> 0 (e.g. --knn-temperature 0.07)"),
                "betas": (lambda v: 0 <= v < 1, "in [0, 1) (e.g. (0.8, 0.999))"),
                "weight_decay": (lambda v: v >= 0, ">= 0"), "eps": (lambda v: v > 0, "> 0")}


def default_schedule(data: str) -> str:
    """The classifier schedule of a --data value: cifar for digits, CIFAR-10/100 and STL-10
    (names, or .npz files named after them), imagenet for anything else."""
    small = dataset_name(data) in ("digits", "cifar10", "cifar100", "stl10")
    return "cifar" if small else "imagenet"


def with_schedule(cfg: EvaluationConfig, data: str) -> EvaluationConfig:
    """cfg with its schedule (default: the data's), epochs and lr milestones filled in."""
    name = cfg.schedule or default_schedule(data)
    epochs, milestones = SCHEDULES[name]
    return replace(cfg, schedule=name, epochs=cfg.epochs or epochs, lr_milestones=tuple(
        milestones if cfg.lr_milestones is None else cfg.lr_milestones))


def runtime(cfg: EvaluationConfig, train_set: Dataset, test_set: Dataset,
            stats: tuple | None) -> EvaluationConfig:
    """cfg with device, precision, data path and knn_k (at most the training set's size) made
    concrete: what runs, and what the results record. Data path auto: device on a GPU
    when both sets are in memory with one stored image size, `stats` (their (mean, std)) is
    known, and their uint8 copy fits in half the free GPU memory; else loader."""
    device = resolve_device(cfg.device)
    data_path = cfg.data_path
    if data_path == "auto":
        size = stored_size(train_set)
        data_path = "device" if (
            stats is not None and size is not None and size == stored_size(test_set)
            and len(train_set) >= cfg.batch_size and fits_in_memory(
                len(train_set) + len(test_set), size[0], device, height=size[0], width=size[1])
        ) else "loader"
    if data_path == "device" and stats is None:
        raise ValueError("data_path 'device' needs the sets' normalisation statistics (stats)")
    knn_k = min(cfg.knn_k, len(train_set))  # what kNN can use, and what the results record
    if knn_k < cfg.knn_k:
        log.warning("--knn-k %d is more than the %d training images; kNN uses k=%d",
                    cfg.knn_k, len(train_set), knn_k)
    return replace(cfg, device=str(device), data_path=data_path, knn_k=knn_k,
                   precision=cfg.precision or ("bf16" if device.type == "cuda" else "fp32"))


class FlippedView:
    """One view of the pretraining augmentation after a random horizontal flip (p=0.5) of each
    uint8 image (B, 3, H, W): mode "full"'s training transform on the device path, called by
    TrainBatches in place of BatchViews' two views."""

    def __init__(self, views: BatchViews):
        self.views = views

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return self.views.view(images, generator)  # (B, 3, S, S) normalised


def check_unchanged(encoder: Encoder, before: dict[str, torch.Tensor]) -> None:
    """Raise EvaluationError if any weight or buffer (batch-norm statistics included) of the
    encoder differs from the `before` snapshot (MoCo's sanity check)."""
    changed = [name for name, value in encoder.state_dict().items()
               if not torch.equal(value.cpu(), before[name])]
    if changed:
        raise EvaluationError(f"the frozen encoder changed during evaluation ({len(changed)} "
                              f"tensors, e.g. {changed[:3]}); its results are not valid")


def _scores(name: str, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = len(labels)
    return {f"{name}_top1": topk_correct(scores, labels, 1) / n,
            f"{name}_top5": topk_correct(scores, labels, 5) / n}


@torch.no_grad()
def refresh_batch_norm(encoder: Encoder, probes: Probes, batches, precision: str = "fp32",
                       max_batches: int = AUTHORS_REFRESH_BATCHES) -> Encoder:
    """The authors' test-time refresh (amdim-public utils.py _warmup_batchnorm): a copy of the
    encoder, and the probes in place, run in train mode on up to max_batches batches of
    (images, labels), so that their batch-norm running statistics move to those images.
    Returns the copy; both are left in eval mode. `encoder` itself is not changed."""
    scorer = copy.deepcopy(encoder).train()
    probes.train()
    for i, (images, _) in enumerate(batches):
        if i == max_batches:
            break
        probes(encode_batch(scorer, images, precision).r1.flatten(1).float())
    probes.eval()
    return scorer.eval()


def train_probes(probes: Probes, batches, cfg: EvaluationConfig) -> None:
    """cfg.epochs of Adam (the authors' settings) on the probes only, lr x LR_GAMMA from the
    epoch after each of cfg.lr_milestones (config.milestone_factor, as in pretraining).
    batches(): one epoch of (features (B, D), labels (B,))."""
    # fused on CUDA: one kernel per step, and the step count kept on the device
    optimizer = torch.optim.Adam(probes.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 weight_decay=cfg.weight_decay,
                                 fused=next(probes.parameters()).device.type == "cuda")
    probes.train()
    bar = tqdm(range(cfg.epochs), desc="classifiers", unit="epoch", leave=False)
    for epoch in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * milestone_factor(epoch, cfg.lr_milestones, LR_GAMMA)
        loss = train_epoch(probes, optimizer, batches())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)  # one host sync per epoch
    probes.eval()


def _batches(cfg: EvaluationConfig, image_size: int, train_set: Dataset, test_set: Dataset,
             augmented_train_set: Dataset | None, stats: tuple | None):
    """(train, test, augmented, refresh) on cfg.data_path: batches (normalised images,
    labels) of both sets in order, (mode "full") an iterable that gives one epoch of shuffled
    augmented training batches each time it is iterated, and (protocol "authors") shuffled
    full batches of the test set for the batch-norm refresh."""
    device = torch.device(cfg.device)
    authors = cfg.protocol == "authors"
    if authors and len(test_set) < cfg.batch_size:
        raise EvaluationError(f"the authors' protocol scores full test batches; the test set "
                              f"has {len(test_set)} images, fewer than --batch-size "
                              f"{cfg.batch_size}")
    if cfg.data_path == "device":  # uint8 images on the device, transformed there in batches
        train_cache, test_cache = cache_dataset(train_set, device), cache_dataset(test_set, device)
        plain = BatchEvaluation(image_size, *stats)
        augmented = None if cfg.mode == "features" else TrainBatches(
            train_cache, FlippedView(BatchViews(image_size, *stats)), cfg.batch_size, cfg.seed)
        refresh = TrainBatches(test_cache, lambda images, _: plain(images), cfg.batch_size,
                               cfg.seed) if authors else None
        return (EvalBatches(train_cache, plain, cfg.batch_size),
                EvalBatches(test_cache, plain, cfg.batch_size), augmented, refresh)
    # drop a last partial batch: the MLP's batch norm cannot train on a single row
    augmented = None if cfg.mode == "features" else DataLoader(
        augmented_train_set, batch_size=cfg.batch_size, shuffle=True,
        drop_last=len(train_set) > cfg.batch_size, num_workers=cfg.workers,
        pin_memory=device.type == "cuda")
    refresh = DataLoader(test_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                         generator=torch.Generator().manual_seed(cfg.seed)) if authors else None
    return (in_order(train_set, device, cfg.batch_size, cfg.workers),
            in_order(test_set, device, cfg.batch_size, cfg.workers), augmented, refresh)


def evaluate(encoder: Encoder, train_set: Dataset, test_set: Dataset, n_classes: int,
             cfg: EvaluationConfig, augmented_train_set: Dataset | None = None,
             stats: tuple | None = None) -> dict[str, float]:
    """Top-1/top-5 test accuracy of new linear and MLP classifiers and of kNN on the frozen
    encoder. train_set/test_set give (image (3, S, S), label) with the deterministic transform;
    mode "full" trains the classifiers on augmented_train_set (the same images augmented).
    stats: the (mean, std) the sets are normalised with, which the device data path needs
    (see runtime()). cfg.epochs and cfg.lr_milestones must be set (with_schedule() sets them).
    The encoder is moved to cfg.device (channels-last on CUDA) and left in eval mode."""
    if cfg.epochs is None or cfg.lr_milestones is None:
        raise ValueError("set cfg.epochs and cfg.lr_milestones, e.g. with with_schedule(cfg, data)")
    cfg = runtime(cfg, train_set, test_set, stats)
    if cfg.mode == "full" and cfg.data_path == "loader" and augmented_train_set is None:
        raise ValueError("mode 'full' needs augmented_train_set (or the device data path)")
    device = torch.device(cfg.device)
    frozen(encoder, device)
    before = {name: value.detach().cpu().clone() for name, value in encoder.state_dict().items()}
    train_batches, test_batches, augmented, refresh = _batches(
        cfg, encoder.cfg.image_size, train_set, test_set, augmented_train_set, stats)
    progress = dict(desc="features", unit="batch", leave=False, mininterval=1.0)
    train = encode(encoder, tqdm(train_batches, **progress), cfg.precision)
    test = encode(encoder, tqdm(test_batches, **progress), cfg.precision)
    x_train, y_train = train["features"], train["labels"]  # (N, D), (N,) on the device
    x_test, y_test = test["features"], test["labels"]
    if len(x_train) < 2:
        raise EvaluationError("the training set needs at least 2 images")
    # drop a last partial batch: the MLP's batch norm cannot train on a single row
    drop_last = len(x_train) > cfg.batch_size

    def cached_batches():
        order = torch.randperm(len(x_train), device=device)
        for index in order.split(cfg.batch_size):
            if len(index) == cfg.batch_size or not drop_last:
                yield x_train[index], y_train[index]

    def augmented_batches():
        for images, labels in augmented:
            features = encode_batch(encoder, images, cfg.precision).r1.flatten(1).float()
            yield features, labels.to(device, non_blocking=True)

    # seeded after the features: the loaders above draw from the global generator, the device
    # path does not, and the classifiers must not depend on which ran
    torch.manual_seed(cfg.seed)
    probes = Probes(encoder.cfg.n_rkhs, n_classes).to(device)
    train_probes(probes, augmented_batches if cfg.mode == "full" else cached_batches, cfg)
    scored = {}
    if cfg.protocol == "authors":  # the only difference: the refresh and what is scored
        scorer = refresh_batch_norm(encoder, probes, refresh, cfg.precision)
        test = encode(scorer, tqdm(test_batches, **progress), cfg.precision)
        # a shuffled drop_last loader scores a random subset of whole batches (eval mode:
        # each image's features do not depend on its batch)
        keep = torch.randperm(len(test["labels"]), generator=torch.Generator().manual_seed(
            cfg.seed))[:len(test["labels"]) // cfg.batch_size * cfg.batch_size].to(device)
        x_test, y_test = test["features"][keep], test["labels"][keep]
        scored = {"n_test_scored": len(keep)}
    with torch.no_grad():
        logits_mlp, logits_linear = probes(x_test)
    results = {**_scores("linear", logits_linear, y_test), **_scores("mlp", logits_mlp, y_test),
               **_scores("knn", knn_scores(x_train, y_train, x_test, n_classes, cfg.knn_k,
                                           cfg.knn_temperature), y_test), **scored}
    check_unchanged(encoder, before)
    return results


