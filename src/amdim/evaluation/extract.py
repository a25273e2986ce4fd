"""Frozen features of a trained encoder: `embed` for a batch in Python, `extract_features` for a
whole dataset, and `amdim extract` to save them (.npz or .pt) with labels and file names.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from ..data.datasets import KNOWN_SIZES, STATS, class_names, labelled_split, normalisation
from ..data.image_files import DataError, ImageFiles
from ..data.store import ImageStore, is_store
from ..model.encoder import Encoder
from ..model.frozen_features import encode, encode_batch, extract_features, frozen, in_order
from ..runtime import check_output, file_tag, resolve_device
from ..training import checkpoint
from ..views.image_views import evaluation_transform

log = logging.getLogger("amdim")


def checkpoint_data(state: dict, data: str | None, data_root: str | None) -> tuple[str, str]:
    """(data, data_root): the flags if given, else what the checkpoint was trained on."""
    config = state.get("config") or {}
    given, data = data, data or config.get("data")
    if data is None:
        raise DataError("this checkpoint (the authors' format) does not record its data; pass "
                        "--data (digits, cifar10, cifar100, stl10, or a folder with train/<class>/ "
                        "and val/<class>/)")
    if not given and data.lower() not in KNOWN_SIZES and not Path(data).exists():
        raise DataError(f"the checkpoint's data {data} is not there (moved, or another "
                        "machine); pass --data with where it is now")
    return data, data_root or config.get("data_root", "data")


@torch.no_grad()
def embed(encoder: Encoder, images, data: str = "imagenet") -> torch.Tensor:
    """Global features (B, n_rkhs) of a batch of images, on the encoder's device.

    images: a float tensor (B, 3, S, S) already normalised as in training (S = the encoder's
    image size); or uint8 images (B, H, W, 3) (tensor or array) or a list of PIL images, which
    are fitted to S px as in evaluation and normalised with the statistics of `data` (a key of
    amdim.data.datasets.STATS: the dataset the encoder was trained on; folders use "imagenet").
    """
    if not (torch.is_tensor(images) and images.is_floating_point()):
        if data not in STATS:
            raise ValueError(f"data {data!r} has no normalisation; use one of {sorted(STATS)}")
        if isinstance(images, (torch.Tensor, np.ndarray)):
            pixels = np.asarray(images.cpu() if torch.is_tensor(images) else images)
            if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[3] != 3:
                raise ValueError(f"integer images must be uint8 (B, H, W, 3), got {pixels.dtype} "
                                 f"{pixels.shape}; or pass normalised float (B, 3, S, S)")
            images = [Image.fromarray(p) for p in pixels]
        transform = evaluation_transform(encoder.cfg.image_size, *STATS[data])
        images = torch.stack([transform(image.convert("RGB")) for image in images])
    was_training = encoder.training
    encoder.eval()  # batch-norm running statistics must not move
    try:
        return encode_batch(encoder, images).r1.flatten(1)
    finally:
        encoder.train(was_training)


def sample_names(dataset: Dataset, root: Path | None = None) -> list[str]:
    """Each item's file path relative to `root` for image folders, else its index as a string."""
    files = ([path for path, _ in dataset.samples] if hasattr(dataset, "samples")
             else getattr(dataset, "files", None))
    if files is None:
        return [str(i) for i in range(len(dataset))]
    return [Path(f).relative_to(root).as_posix() if root else str(f) for f in files]


def save_features(arrays: dict, path: str | os.PathLike) -> Path:
    """Write tensors and string lists to .npz (numpy, no pickles) or .pt (torch.save)."""
    path = Path(path)
    if path.suffix == ".npz":
        np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    elif path.suffix == ".pt":
        torch.save(arrays, path)
    else:
        raise ValueError(f"--out {path}: the file name must end in .npz or .pt")
    return path


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read what `amdim extract` wrote (.npz or .pt) as numpy arrays, never unpickling objects."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            values = dict(arrays)
    else:
        values = {k: np.asarray(v) for k, v in torch.load(path, weights_only=True).items()}
    if "features" not in values:
        raise ValueError(f"{path} holds no 'features' array; make one with amdim extract")
    return values


def same_data(data: str, other: str) -> bool:
    """Whether two --data values name the same data (a dataset name, or the same path)."""
    if data.lower() == other.lower():
        return True
    return Path(data).exists() and Path(other).exists() and Path(data).resolve() == Path(
        other).resolve()


def extract(path: str, data: str | None = None, split: str = "test", out: str | None = None,
            maps: bool = False, data_root: str | None = None, device: str = "auto",
            batch_size: int = 256, workers: int = 0, view: str | None = None,
            kind: str = "features") -> Path:
    """Features of a checkpoint's encoder on a dataset split, saved to `out` (.npz or .pt;
    default CHECKPOINT.SPLIT-KIND[-VIEW][-on-DATA].npz, the view and data other than the
    checkpoint's naming the file), never over the checkpoint or a run folder's files.
    view: for a checkpoint of --views lab or paired, the view whose encoder to run, or "all"
    (every view's global feature, concatenated)."""
    if out is not None and Path(out).suffix not in (".npz", ".pt"):
        raise ValueError(f"--out {out}: the file name must end in .npz or .pt")
    if out is not None:
        check_output(out, [path])  # before the checkpoint is read: a clear message first
    encoder, _, state = checkpoint.load_model(path, view)
    own = (state.get("config") or {}).get("data")
    other = data is not None and (own is None or not same_data(data, own))
    data, data_root = checkpoint_data(state, data, data_root)
    tags = ([] if view is None else [file_tag(view)]) + ([f"on-{file_tag(data)}"] if other
                                                          else [])
    out = check_output(out or Path(path).with_suffix(
        f".{split}-{'-'.join([kind, *tags])}.npz"), [path])
    target = resolve_device(device)
    frozen(encoder, target)
    if state.get("views") is not None:
        arrays = _view_features(encoder, state, view, data, data_root, split, target,
                                batch_size, workers, maps)
        return _save(arrays, out)
    transform = evaluation_transform(encoder.cfg.image_size,
                                     *normalisation(data))
    root = Path(data) if Path(data).is_dir() else None
    if root is not None and is_store(root):  # one store (amdim prepare): all of its images
        dataset = ImageStore(root, transform)
        classes = getattr(dataset, "classes", [])
    elif root is not None and not (root / "train").is_dir():
        dataset, classes = ImageFiles(root, transform), []  # a plain folder: no labels
    else:
        dataset = labelled_split(data, split, transform, data_root)
        classes = class_names(dataset)
    if maps:
        n = len(dataset) * encoder.cfg.n_rkhs * (25 + 49) * 4 / 2**30
        log.info("--maps: the r5 and r7 maps will take %.1f GiB", n)
    arrays = extract_features(encoder, dataset, target, batch_size, workers, maps)
    arrays["names"] = sample_names(dataset, root)
    arrays["classes"] = classes
    return _save(arrays, out)


def view_split(state: dict, data: str, data_root: str, split: str):
    """The contexts of a split of `data` as a view_sets.ViewSet for the encoders of a --views
    lab / paired checkpoint (`state`), without augmentation (set .train for the checkpoint's
    pretraining augmentation); refuses data whose views are not the checkpoint's."""
    from dataclasses import replace

    from ..config import PretrainConfig
    from ..data.paired import view_source
    from ..views.view_sets import ViewSet

    cfg = replace(PretrainConfig.from_dict(state["config"]), data=data, data_root=data_root)
    source = view_source(cfg, split)
    if source is None:
        raise DataError(f"{data} has no {split} split of its views")
    dataset = ViewSet(source, cfg.image_size, cfg.views, False, cfg.view_augment)
    layout = state["views"]
    found = [list(x) for x in zip(*dataset.layout)]
    if found != [list(layout["names"]), list(layout["channels"])]:
        raise DataError(f"the views of {data} ({split}) are {dict(zip(*found))} (name: "
                        f"channels); the checkpoint's encoders take "
                        f"{dict(zip(layout['names'], layout['channels']))}")
    return dataset


def _view_features(encoder, state: dict, view: str | None, data: str, data_root: str,
                   split: str, device: torch.device, batch_size: int, workers: int,
                   maps: bool) -> dict:
    """extract's arrays for one view of a --views lab / paired checkpoint, or all views."""
    from ..model.multiview import ALL

    names = state["views"]["names"]
    dataset = view_split(state, data, data_root, split)
    source = dataset.source
    loader = tqdm(in_order(dataset, device, batch_size, workers), desc="features",
                  unit="batch", leave=False, mininterval=1.0)
    if view == ALL:
        if maps:
            raise ValueError("--maps needs one view (--view NAME), not all")
        parts, labels = [], []
        with torch.no_grad():
            for views, label in loader:
                parts.append(encoder.global_features([v.to(device) for v in views]).float().cpu())
                labels.append(label)
        arrays = {"features": torch.cat(parts), "labels": torch.cat(labels)}
    else:
        index = names.index(view)
        arrays = encode(encoder, ((views[index], label) for views, label in loader), maps=maps,
                        out="cpu")
    # paired folders: each context's path relative to its view folders; else its index
    arrays["names"] = list(getattr(source, "paths", None) or map(str, range(len(dataset))))
    arrays["classes"] = list(getattr(source, "classes", []))
    return arrays


def _save(arrays: dict, out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_features(arrays, out)
    except OSError as error:
        raise DataError(f"cannot write the features to {out} ({error.strerror or error}); "
                        "free some space or pass --out elsewhere") from None
    log.info("%d x %d features -> %s", *arrays["features"].shape, out)
    return out


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract", help="save frozen features of a checkpoint's encoder",
        description="Save the global features (N, n_rkhs), labels, file names (image folders: "
        "paths relative to --data; other sets: the index) and class names of one split; "
        "--maps adds the r5/r7 maps. Reads our checkpoints and the authors'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint file (ours or the authors')")
    parser.add_argument("--data", help="digits, cifar10, cifar100, stl10, or a folder (default: "
                        "the checkpoint's data); a folder without train/ is read unlabelled")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: the "
                        "checkpoint's)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--out", help=".npz or .pt (default: beside the checkpoint, "
                        "CHECKPOINT.SPLIT-features[-VIEW][-on-DATA].npz)")
    parser.add_argument("--maps", action="store_true", help="also save the r5 and r7 maps")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes")
    parser.add_argument("--view", help="a checkpoint of --views lab or paired: the view whose "
                        "encoder to run (e.g. L, ab, or a folder view's name), or all (every "
                        "view's global feature, concatenated; required where each view has "
                        "its own encoder)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    try:
        extract(args.checkpoint, args.data, args.split, args.out, args.maps, args.data_root,
                args.device, args.batch_size, args.workers, args.view)
    except (ValueError, DataError, checkpoint.CheckpointError) as error:
        raise SystemExit(f"amdim extract: {error}") from None
