"""`amdim evaluate`: linear, MLP and kNN classification on the frozen encoder.

The linear and MLP classifiers are the authors' (amdim.classifiers.Probes, clipped loss, their
Adam settings), retrained from scratch. Mode "full" trains them on augmented training images
as the authors do; mode "features" extracts deterministic features once and trains on those.
The kNN classifier is InstDisc/DINO's: cosine similarity, k nearest, votes exp(sim / T).
The test set is read whole and in order with the encoder in eval mode, and, as in MoCo's
linear evaluation, the run fails if any encoder weight or batch-norm statistic changed.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from . import checkpoint
from .classifiers import Probes, clipped_cross_entropy
from .data import DataError, class_names, dataset_name, labelled_split, normalisation
from .encoder import Encoder
from .config import resolve_device
from .extract import checkpoint_data, extract_features
from .views import augmentation, evaluation_transform

log = logging.getLogger("amdim")


class EvaluationError(RuntimeError):
    """An evaluation that cannot run or whose result cannot be trusted."""


@dataclass(frozen=True)
class EvaluationConfig:
    mode: str = "full"  # full: augmented images each epoch (the authors'); features: cached
    epochs: int | None = None  # None: the data's schedule (see schedule())
    lr_milestones: tuple[int, ...] | None = None  # epochs at which the lr is multiplied by 0.2
    lr: float = 2e-4  # the authors' Adam settings, on the classifiers only
    betas: tuple[float, float] = (0.8, 0.999)
    weight_decay: float = 1e-5
    eps: float = 1e-8
    batch_size: int = 200
    workers: int = 2
    device: str = "auto"
    knn_k: int = 200  # neighbours (InstDisc, DINO)
    knn_temperature: float = 0.07  # a neighbour's vote is exp(cosine similarity / T)
    seed: int = 0  # classifier init and shuffling

    def __post_init__(self) -> None:
        if self.mode not in ("full", "features"):
            raise ValueError(f"mode must be 'full' or 'features', got {self.mode!r}")
        if self.batch_size < 2 or self.knn_k < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError("batch_size must be >= 2, knn_k and epochs >= 1")


def schedule(data: str, n_classes: int) -> tuple[int, tuple[int, ...]]:
    """(epochs, lr milestones) of the classifiers: CIFAR/STL/digits 120 (80, 110); image folders
    30 (15, 25), Places205 (a folder of 205 classes) 15 (7, 12)."""
    if dataset_name(data) in ("digits", "cifar10", "cifar100", "stl10"):
        return 120, (80, 110)
    return (15, (7, 12)) if n_classes == 205 else (30, (15, 25))


def check_unchanged(encoder: Encoder, before: dict[str, torch.Tensor]) -> None:
    """Raise EvaluationError if any weight or buffer (batch-norm statistics included) of the
    encoder differs from the `before` snapshot (MoCo's sanity check)."""
    changed = [name for name, value in encoder.state_dict().items()
               if not torch.equal(value.cpu(), before[name])]
    if changed:
        raise EvaluationError(f"the frozen encoder changed during evaluation ({len(changed)} "
                              f"tensors, e.g. {changed[:3]}); its results are not valid")


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows of scores (N, C) whose label (N,) is among the k highest (k capped at C)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(1).sum())


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor,
               test_features: torch.Tensor, n_classes: int, k: int = 200,
               temperature: float = 0.07) -> torch.Tensor:
    """Weighted kNN votes (N_test, C): features (N, D) are L2-normalised, each test row takes
    its k most cosine-similar training rows (labels (N,), -1 ignored), each voting exp(sim / T)
    for its class."""
    keep = train_labels >= 0
    train = F.normalize(train_features[keep], dim=1)  # (N, D)
    train_labels = train_labels[keep]
    k = min(k, len(train))
    votes = []
    chunk = max(1, 2**26 // len(train))  # keeps each (chunk, N) similarity block ~256 MB
    for test in F.normalize(test_features, dim=1).split(chunk):
        similarity, index = (test @ train.t()).topk(k, dim=1)  # (n, N) -> (n, k)
        weight = (similarity / temperature).exp()
        votes.append(torch.zeros(len(test), n_classes, device=test.device).scatter_add_(
            1, train_labels[index], weight))
    return torch.cat(votes)


def _scores(name: str, scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    n = len(labels)
    return {f"{name}_top1": topk_correct(scores, labels, 1) / n,
            f"{name}_top5": topk_correct(scores, labels, 5) / n}


def train_probes(probes: Probes, batches, cfg: EvaluationConfig) -> None:
    """cfg.epochs of Adam (the authors' settings) on the probes only, lr x0.2 at each of
    cfg.lr_milestones. batches(): one epoch of (features (B, D), labels (B,))."""
    optimizer = torch.optim.Adam(probes.parameters(), lr=cfg.lr, betas=cfg.betas,
                                 eps=cfg.eps, weight_decay=cfg.weight_decay)
    # the authors step their scheduler with the finished epoch's index, so each decay starts
    # one epoch after its milestone
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, [m + 1 for m in cfg.lr_milestones], gamma=0.2)
    probes.train()
    bar = tqdm(range(cfg.epochs), desc="classifiers", unit="epoch", leave=False)
    for _ in bar:
        total, steps = 0.0, 0
        for features, labels in batches():
            logits_mlp, logits_linear = probes(features)
            loss = clipped_cross_entropy(logits_mlp, labels) + clipped_cross_entropy(
                logits_linear, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        scheduler.step()
        bar.set_postfix(loss=f"{total / max(steps, 1):.3f}", refresh=False)
    probes.eval()


def evaluate(encoder: Encoder, train_set: Dataset, test_set: Dataset, n_classes: int,
             cfg: EvaluationConfig, augmented_train_set: Dataset | None = None
             ) -> dict[str, float]:
    """Top-1/top-5 test accuracy of new linear and MLP classifiers and of kNN on the frozen
    encoder. train_set/test_set give (image (3, S, S), label) with the deterministic transform;
    mode "full" trains the classifiers on augmented_train_set (the same images augmented).
    cfg.epochs and cfg.lr_milestones must be set (schedule() gives the usual ones). The encoder
    is moved to cfg.device and left in eval mode."""
    if cfg.epochs is None or cfg.lr_milestones is None:
        raise ValueError("set cfg.epochs and cfg.lr_milestones, e.g. from schedule(data, n_classes)")
    if cfg.mode == "full" and augmented_train_set is None:
        raise ValueError("mode 'full' needs augmented_train_set")
    device = resolve_device(cfg.device)
    encoder.to(device).eval()
    before = {name: value.detach().cpu().clone() for name, value in encoder.state_dict().items()}
    torch.manual_seed(cfg.seed)
    extract = dict(device=device, batch_size=cfg.batch_size, workers=cfg.workers)
    train = extract_features(encoder, train_set, **extract)
    test = extract_features(encoder, test_set, **extract)
    x_train, y_train = train["features"].to(device), train["labels"].to(device)
    x_test, y_test = test["features"].to(device), test["labels"].to(device)
    if len(x_train) < 2:
        raise EvaluationError("the training set needs at least 2 images")
    # drop a last partial batch: the MLP's batch norm cannot train on a single row
    drop_last = len(x_train) > cfg.batch_size

    def cached_batches():
        order = torch.randperm(len(x_train), device=device)
        for index in order.split(cfg.batch_size):
            if len(index) == cfg.batch_size or not drop_last:
                yield x_train[index], y_train[index]

    def image_batches():
        loader = DataLoader(augmented_train_set, batch_size=cfg.batch_size, shuffle=True,
                            drop_last=drop_last, num_workers=cfg.workers,
                            pin_memory=device.type == "cuda")
        for images, labels in loader:
            with torch.no_grad():
                features = encoder.global_features(images.to(device, non_blocking=True))
            yield features, labels.to(device)

    probes = Probes(encoder.cfg.n_rkhs, n_classes).to(device)
    train_probes(probes, image_batches if cfg.mode == "full" else cached_batches, cfg)
    with torch.no_grad():
        logits_mlp, logits_linear = probes(x_test)
    results = {**_scores("linear", logits_linear, y_test), **_scores("mlp", logits_mlp, y_test),
               **_scores("knn", knn_scores(x_train, y_train, x_test, n_classes, cfg.knn_k,
                                           cfg.knn_temperature), y_test)}
    check_unchanged(encoder, before)
    return results


def evaluate_checkpoint(path: str, data: str | None = None, data_root: str | None = None,
                        cfg: EvaluationConfig = EvaluationConfig(), out: str | None = None,
                        download: bool = False) -> dict:
    """Evaluate a checkpoint (ours or the authors') on labelled data (default: the data it was
    trained on); writes the results as JSON to `out` (default CHECKPOINT.eval-MODE.json)."""
    start = time.perf_counter()
    encoder, _, state = checkpoint.load_model(path)
    data, data_root = checkpoint_data(state, data, data_root)
    size, stats = encoder.cfg.image_size, normalisation(data)
    plain = evaluation_transform(size, *stats)
    train_set = labelled_split(data, "train", plain, data_root, download)
    test_set = labelled_split(data, "test", plain, data_root, download)
    classes = class_names(train_set)
    augmented = None
    if cfg.mode == "full":  # one view of the pretraining augmentation, after a random flip
        augmented = labelled_split(data, "train", T.Compose(
            [T.RandomHorizontalFlip(), augmentation(size, *stats)]), data_root)
    default_epochs, default_milestones = schedule(data, len(classes))
    cfg = replace(cfg, epochs=cfg.epochs or default_epochs, lr_milestones=tuple(
        default_milestones if cfg.lr_milestones is None else cfg.lr_milestones))
    log.info("evaluating %s on %s: %d train / %d test images, %d classes, %s mode, %d epochs",
             path, data, len(train_set), len(test_set), len(classes), cfg.mode, cfg.epochs)
    results = evaluate(encoder, train_set, test_set, len(classes), cfg, augmented)
    report = {"checkpoint": str(path), "data": data, "n_train": len(train_set),
              "n_test": len(test_set), "n_classes": len(classes), **asdict(cfg), **results, "seconds": round(time.perf_counter() - start, 1)}
    out = Path(out) if out else Path(path).with_suffix(f".eval-{cfg.mode}.json")
    try:
        out.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:
        raise EvaluationError(f"cannot write the results to {out} ({error}); pass --out") from None
    report["out"] = str(out)
    return report


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
                             device: torch.device) -> dict[str, float]:
    """Linear-probe accuracy of the trained encoder next to the same architecture at random
    init: the proof that pretraining learned something. Prints both."""
    train_plain = copy.copy(train_set)  # the training images with the deterministic transform
    train_plain.transform = test_set.transform
    torch.manual_seed(seed)
    random_init = Encoder(encoder.cfg).to(device)
    trained = linear_probe_accuracy(encoder, train_plain, test_set, device)
    baseline = linear_probe_accuracy(random_init, train_plain, test_set, device)
    print(f"linear probe on frozen features: trained encoder {100 * trained:.1f}% | "
          f"same architecture at random init {100 * baseline:.1f}%")
    return {"final_linear_probe_acc": trained, "random_init_linear_probe_acc": baseline}


def table(report: dict) -> str:
    """The results as a small text table, accuracies in percent."""
    rows = [f"{report['checkpoint']} on {report['data']} ({report['mode']} mode, "
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
                        "train/<class>/ and val/<class>/ (default: the checkpoint's data)")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: the checkpoint's)")
    parser.add_argument("--download", action="store_true", help="let torchvision download")
    parser.add_argument("--mode", default="full", choices=("full", "features"),
                        help="full: augmented images every epoch, as the authors (slow); "
                        "features: deterministic features extracted once (fast)")
    parser.add_argument("--epochs", type=int, help="classifier epochs (default: CIFAR/STL 120, "
                        "image folders 30, Places205 15)")
    parser.add_argument("--lr-milestones", type=int, nargs="*", metavar="EPOCH",
                        help="lr x0.2 at these epochs (default: 80 110 | 15 25 | 7 12)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    parser.add_argument("--knn-k", type=int, default=200)
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="results JSON (default: CHECKPOINT.eval-MODE.json)")
    parser.set_defaults(func=_run)


def _run(args) -> None:
    try:
        cfg = EvaluationConfig(
            mode=args.mode, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            lr_milestones=None if args.lr_milestones is None else tuple(args.lr_milestones),
            workers=args.workers, device=args.device, knn_k=args.knn_k,
            knn_temperature=args.knn_temperature, seed=args.seed)
        report = evaluate_checkpoint(args.checkpoint, args.data, args.data_root, cfg, args.out,
                                     args.download)
    except (ValueError, DataError, EvaluationError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim evaluate: {error}") from None
    print(table(report))
    print(f"results: {report['out']}")
