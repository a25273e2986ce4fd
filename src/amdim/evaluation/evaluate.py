"""`amdim evaluate`: linear, MLP and kNN classification on the frozen encoder.

The linear and MLP classifiers are the authors' (model.classifiers.Probes, clipped loss, their
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
The classifiers themselves are trained in classifier_training.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..config import finite_float
from ..runtime import check_output, file_tag
from ..data.datasets import class_names, labelled_split, normalisation
from ..data.image_files import DataError
from ..model.encoder import Features
from ..training import checkpoint
from ..views.image_views import augmentation, evaluation_transform
from .classifier_training import (PROTOCOLS, SCHEDULES, EvaluationConfig, EvaluationError,
                                  evaluate, runtime, with_schedule)
from .extract import checkpoint_data, same_data, view_split

log = logging.getLogger("amdim")


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


def evaluate_checkpoint(path: str, data: str | None = None, data_root: str | None = None,
                        cfg: EvaluationConfig = EvaluationConfig(), out: str | None = None,
                        download: bool = False, view: str | None = None) -> dict:
    """Evaluate a checkpoint (ours or the authors') on labelled data (default: the data it was
    trained on; other data is a transfer evaluation, e.g. Places205 with --schedule places205:
    new classifiers for its label set on the frozen encoder); writes the results as JSON to
    `out` (default CHECKPOINT.eval-MODE[-VIEW][-PROTOCOL][-on-DATA].json: the view, a
    protocol other than standard and the data of a transfer name the file), never over the
    checkpoint or a run folder's files.
    view: for a checkpoint of --views lab or paired (required there), the view whose encoder
    to evaluate, or "all" (every view's global feature, concatenated)."""
    start = time.perf_counter()
    encoder, _, state = checkpoint.load_model(path, view)
    encoder_data = (state.get("config") or {}).get("data")  # None: the authors' format
    given = data
    data, data_root = checkpoint_data(state, data, data_root)
    transfer = None if encoder_data is None else not same_data(data, encoder_data)
    # results of other settings go to other files: the native evaluation's is not replaced
    suffix = "-".join([cfg.mode, *([] if view is None else [file_tag(view)]),
                       *([] if cfg.protocol == "standard" else [cfg.protocol]),
                       *([f"on-{file_tag(data)}"] if transfer or (given and transfer is None)
                         else [])])
    out = check_output(out or Path(path).with_suffix(f".eval-{suffix}.json"), [path])
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
    from ..model.multiview import ALL

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
    parser.add_argument("--lr", type=finite_float, default=2e-4, help="Adam learning rate")
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
    parser.add_argument("--knn-temperature", type=finite_float, default=0.07)
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
                        "with --view, --protocol authors or a transfer to other --data, "
                        "CHECKPOINT.eval-MODE[-VIEW][-authors][-on-DATA].json)")
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
