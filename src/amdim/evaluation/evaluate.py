"""`amdim evaluate`: linear, MLP and kNN classification on the frozen encoder.

The linear and MLP classifiers are the authors' (amdim.classifiers.Probes, clipped loss, their
Adam settings), retrained from scratch. Mode "full" trains them on augmented training images
as the authors do; mode "features" extracts deterministic features once and trains on those.
The kNN classifier is InstDisc/DINO's: cosine similarity, k nearest, votes exp(sim / T).
Protocol "standard" (the default): the test set is read whole and in order with the encoder in
eval mode, and, as in MoCo's linear evaluation, the run fails if any encoder weight or
batch-norm statistic changed. Protocol "authors", for exact comparison with the authors'
numbers (amdim-public utils.py test_model): the batch-norm statistics of a copy of the encoder
and of the MLP probe are re-estimated in train mode on up to 50 shuffled test batches, then the
test set is scored shuffled with drop_last (the last partial batch's images are not scored).
The JSON records the protocol, and with --data other than the encoder's training data, that
the result is a transfer and what the encoder was trained on.
A checkpoint of --views lab or paired is evaluated for one view (--view NAME: that view's
encoder on that view's images) or all (the concatenated global features of every view's
encoder), on the data loader path; its data is read as `amdim extract --view` reads it
(extract.view_split), and mode "full" trains on the checkpoint's own pretraining augmentation
of the views (lab: crop and flip; paired: --view-augment's crop and flip, or none).

On a GPU the frozen encoder runs channels-last under bf16 autocast without gradients; a set
held in memory (digits, CIFAR, STL-10, .npz) that fits is decoded onto the GPU once and
transformed and augmented there in batches (batch_views), as in pretraining; the losses stay
on the device and are read once per epoch.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from tqdm import tqdm

from . import checkpoint
from .backbones import build_encoder
from .batch_views import BatchEvaluation, BatchViews
from .batches import stored_size
from .classifiers import Probes, knn_scores, topk_correct, train_epoch
from .config import milestone_factor, resolve_device
from .data import DataError, class_names, dataset_name, labelled_split, normalisation
from .encoder import Encoder, Features
from .extract import (checkpoint_data, encode, encode_batch, extract_features, frozen, in_order,
                      view_split)
from .tensor_data import EvalBatches, TrainBatches, cache_dataset, fits_in_memory
from .views import augmentation, evaluation_transform

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
        if self.knn_temperature <= 0 or self.lr <= 0:
            raise ValueError(f"knn_temperature and lr must be > 0 (got {self.knn_temperature}, "
                             f"{self.lr}); e.g. --knn-temperature 0.07")


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
    """cfg with device, precision and data path made concrete. Data path auto: device on a GPU
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
    return replace(cfg, device=str(device), data_path=data_path,
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


class ChosenViews(Dataset):
    """(image, label) items of a ViewSet for evaluate(): the views at `indices`, concatenated
    along the channels: K views (C_k, S, S) -> (sum C_k, S, S)."""

    def __init__(self, views: Dataset, indices: list[int]):
        self.views, self.indices = views, indices
        self.classes = views.classes

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        views, label = self.views[index]
        return torch.cat([views[i] for i in self.indices]), label


class ConcatenatedViews(nn.Module):
    """A multiview.ViewsEncoder as one encoder for evaluate(): images (B, sum C_k, S, S), the
    K views concatenated along the channels in view order -> Features whose r1, r5 and r7 are
    every view's, concatenated: (B, K*n_rkhs, ...). cfg: a view encoder's, with in_channels
    and n_rkhs summed over the views."""

    def __init__(self, views: nn.Module):
        super().__init__()
        self.views, self.channels = views, list(views.view_layout["channels"])
        first = views.model.encoder_of(views.views[0]).cfg
        self.cfg = replace(first, in_channels=sum(self.channels),
                           n_rkhs=len(self.channels) * first.n_rkhs)

    def forward(self, images: torch.Tensor) -> Features:
        # (B, sum C_k, S, S) -> K views (B, C_k, S, S)
        features = self.views(images.split(self.channels, dim=1))
        return Features(*(torch.cat(maps, 1) for maps in zip(*features)))


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


def evaluate_checkpoint(path: str, data: str | None = None, data_root: str | None = None,
                        cfg: EvaluationConfig = EvaluationConfig(), out: str | None = None,
                        download: bool = False, view: str | None = None) -> dict:
    """Evaluate a checkpoint (ours or the authors') on labelled data (default: the data it was
    trained on; other data is a transfer evaluation, e.g. Places205 with --schedule places205:
    new classifiers for its label set on the frozen encoder); writes the results as JSON to
    `out` (default CHECKPOINT.eval-MODE.json, CHECKPOINT.eval-MODE-VIEW.json with a view).
    view: for a checkpoint of --views lab or paired (required there), the view whose encoder
    to evaluate, or "all" (every view's global feature, concatenated)."""
    start = time.perf_counter()
    encoder, _, state = checkpoint.load_model(path, view)
    encoder_data = (state.get("config") or {}).get("data")  # None: the authors' format
    data, data_root = checkpoint_data(state, data, data_root)
    transfer = None if encoder_data is None else not _same_data(data, encoder_data)
    augmented = None  # the device path augments the cached train_set itself
    if view is not None:  # load_model refused a view of any other checkpoint
        encoder, train_set, test_set, augmented = _view_sets(encoder, state, view, data,
                                                             data_root, cfg)
        stats = None  # the loader path: ViewSets normalise each view themselves
    else:
        size, stats = encoder.cfg.image_size, normalisation(data)
        plain = evaluation_transform(size, *stats)
        train_set = labelled_split(data, "train", plain, data_root, download)
        test_set = labelled_split(data, "test", plain, data_root, download)
    classes = class_names(train_set)
    cfg = runtime(with_schedule(cfg, data), train_set, test_set, stats)
    if view is None and cfg.mode == "full" and cfg.data_path == "loader":
        # one view of the pretraining augmentation, after a random flip
        augmented = labelled_split(data, "train", T.Compose(
            [T.RandomHorizontalFlip(), augmentation(size, *stats)]), data_root)
    log.info("evaluating %s%s on %s%s: %d train / %d test images, %d classes, %s mode, %s "
             "schedule (%d epochs), %s protocol, %s, %s, %s data path", path,
             "" if view is None else f" (view {view})", data,
             f" (transfer from {encoder_data})" if transfer else "", len(train_set),
             len(test_set), len(classes), cfg.mode, cfg.schedule, cfg.epochs, cfg.protocol,
             cfg.device, cfg.precision, cfg.data_path)
    results = evaluate(encoder, train_set, test_set, len(classes), cfg, augmented, stats)
    # transfer: null where the checkpoint does not record its training data (the authors')
    report = {"checkpoint": str(path), **({} if view is None else {"view": view}),
              "data": data, "encoder_data": encoder_data,
              "transfer": transfer, "n_train": len(train_set), "n_test": len(test_set),
              "n_classes": len(classes), **asdict(cfg), **results,
              "seconds": round(time.perf_counter() - start, 1)}
    suffix = cfg.mode if view is None else f"{cfg.mode}-{view}"
    out = Path(out) if out else Path(path).with_suffix(f".eval-{suffix}.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:  # the results are not lost: they go to stdout first
        print(json.dumps(report, indent=2))
        raise EvaluationError(f"cannot write the results to {out} ({error.strerror or error}); "
                              "they are printed above. Pass --out elsewhere") from None
    report["out"] = str(out)
    return report


def _view_sets(encoder: nn.Module, state: dict, view: str, data: str, data_root: str,
               cfg: EvaluationConfig) -> tuple[nn.Module, Dataset, Dataset, Dataset]:
    """(encoder, train, test, augmented train) for evaluate() of one view of a --views lab /
    paired checkpoint, or of all: the views as `amdim extract --view` reads them, the chosen
    ones concatenated along the channels (ChosenViews; all: for ConcatenatedViews)."""
    from .multiview import ALL

    if cfg.data_path == "device":
        raise EvaluationError("a checkpoint of --views lab or paired is evaluated on the data "
                              "loader path; drop --data-path device")
    train, test = (view_split(state, data, data_root, split) for split in ("train", "test"))
    if not train.classes:
        raise DataError(f"{data} has no labels (class folders, or a labels array) to evaluate "
                        "its views on")
    names = list(state["views"]["names"])
    indices = list(range(len(names))) if view == ALL else [names.index(view)]
    if view == ALL:
        encoder = ConcatenatedViews(encoder)
    augmented = copy.copy(train)  # the checkpoint's pretraining augmentation of the views
    augmented.train = True
    return (encoder, *(ChosenViews(views, indices) for views in (train, test, augmented)))


def _same_data(data: str, other: str) -> bool:
    """Whether two --data values name the same data (a dataset name, or the same path)."""
    if data.lower() == other.lower():
        return True
    return Path(data).exists() and Path(other).exists() and Path(data).resolve() == Path(
        other).resolve()


def linear_probe_accuracy(encoder: Encoder, train_set: Dataset, test_set: Dataset,
                          device: torch.device) -> float:
    """Test accuracy of a logistic regression fitted on frozen, standardised global features
    (scikit-learn's: a robust solver, nothing to tune, fine for small sets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = extract_features(encoder, train_set, device)
    test = extract_features(encoder, test_set, device)
    keep = train["labels"] >= 0
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train["features"][keep].numpy(), train["labels"][keep].numpy())
    return float(probe.score(test["features"].numpy(), test["labels"].numpy()))


def compare_with_random_init(encoder: Encoder, seed: int, train_set: Dataset, test_set: Dataset,
                             device: torch.device, max_images: int = 0) -> dict[str, float]:
    """Linear-probe accuracy of the trained encoder next to the same architecture at random
    init: the proof that pretraining learned something. Prints both. max_images: fit on a
    fixed random sample of this many training images (0: all)."""
    train_plain = copy.copy(train_set)  # the training images with the deterministic transform
    train_plain.transform = test_set.transform
    if 0 < max_images < len(train_plain):
        sample = torch.randperm(len(train_plain), generator=torch.Generator().manual_seed(seed))
        train_plain = Subset(train_plain, sample[:max_images].tolist())
    torch.manual_seed(seed)
    random_init = build_encoder(encoder.cfg).to(device)
    log.info("final probe: logistic regression on %d training images, for the trained encoder "
             "and at random init", len(train_plain))
    trained, baseline = (linear_probe_accuracy(model, train_plain, test_set, device)
                         for model in tqdm((encoder, random_init), desc="final probe",
                                           unit="encoder", leave=False))
    print(f"linear probe on frozen features: trained encoder {100 * trained:.1f}% | "
          f"same architecture at random init {100 * baseline:.1f}%")
    return {"final_linear_probe_acc": trained, "random_init_linear_probe_acc": baseline}


def table(report: dict) -> str:
    """The results as a small text table, accuracies in percent."""
    transfer = f", transfer from {report['encoder_data']}" if report.get("transfer") else ""
    view = f" (view {report['view']})" if "view" in report else ""
    rows = [f"{report['checkpoint']}{view} on {report['data']} ({report['mode']} mode, "
            f"{report.get('protocol', 'standard')} protocol{transfer}, "
            f"{report['n_train']} train / {report['n_test']} test images)",
            f"{'classifier':<12}{'top-1':>8}{'top-5':>8}"]
    for name, label in (("linear", "linear"), ("mlp", "MLP"), ("knn", f"kNN k={report['knn_k']}")):
        rows.append(f"{label:<12}{100 * report[name + '_top1']:>7.2f}%"
                    f"{100 * report[name + '_top5']:>7.2f}%")
    return "\n".join(rows)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="linear, MLP and kNN accuracy of a checkpoint's frozen encoder",
        description="Train the authors' linear and MLP classifiers from scratch on the frozen "
        "encoder and run a kNN classifier; print top-1/top-5 test accuracy and write them as "
        "JSON beside the checkpoint. Reads our checkpoints and the authors'.")
    parser.add_argument("checkpoint", help="checkpoint file (ours or the authors')")
    parser.add_argument("--data", help="digits, cifar10, cifar100, stl10, or a folder with "
                        "train/<class>/ and val/<class>/ (default: the checkpoint's data; other "
                        "data is evaluated as a transfer, e.g. Places205 with --schedule "
                        "places205, and the JSON names the encoder's own training data)")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: the checkpoint's)")
    parser.add_argument("--download", action="store_true", help="let torchvision download")
    parser.add_argument("--mode", default="full", choices=("full", "features"),
                        help="full: augmented images every epoch, as the authors (slow); "
                        "features: deterministic features extracted once (fast)")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES),
                        help="the authors' classifier schedule: cifar 120 epochs, lr x0.2 after "
                        "80 and 110; imagenet 30 (15, 25); places205 15 (7, 12) (default: cifar "
                        "for digits, cifar10, cifar100, stl10, else imagenet)")
    parser.add_argument("--epochs", type=int, help="classifier epochs (default: the schedule's)")
    parser.add_argument("--lr-milestones", type=int, nargs="*", metavar="EPOCH",
                        help="lr x0.2 after these epochs (default: the schedule's)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="autocast of the frozen encoder (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--data-path", default="auto", choices=("auto", "device", "loader"),
                        help="device: decode the images once onto the device and transform them "
                        "there in batches; loader: DataLoader workers; auto: device on a GPU for "
                        "in-memory sets that fit in half its free memory")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--protocol", default="standard", choices=PROTOCOLS,
                        help="standard: the encoder in eval mode on the whole test set, in "
                        "order; authors: as amdim-public scores, for exact comparison with "
                        "their numbers: batch-norm statistics re-estimated on up to 50 shuffled "
                        "test batches in train mode, then shuffled drop_last scoring")
    parser.add_argument("--view", help="a checkpoint of --views lab or paired (required "
                        "there): the view whose encoder to evaluate on that view's images (e.g. "
                        "L, ab, or a folder view's name), or all (every view's global feature, "
                        "concatenated)")
    parser.add_argument("--out", help="results JSON (default: CHECKPOINT.eval-MODE.json; "
                        "CHECKPOINT.eval-MODE-VIEW.json with --view)")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    try:
        cfg = EvaluationConfig(
            mode=args.mode, schedule=args.schedule, epochs=args.epochs, lr=args.lr,
            lr_milestones=None if args.lr_milestones is None else tuple(args.lr_milestones),
            batch_size=args.batch_size, workers=args.workers, device=args.device,
            precision=args.precision, data_path=args.data_path, knn_k=args.knn_k,
            knn_temperature=args.knn_temperature, seed=args.seed, protocol=args.protocol)
        report = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, cfg, args.out,
                                     args.download, args.view)
    except (ValueError, DataError, EvaluationError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim evaluate: {error}") from None
    print(table(report))
    print(f"results: {report['out']}")
