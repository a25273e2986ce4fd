"""`amdim plot`: training curves of a run folder, and a 2-D t-SNE map of test features.

PATH is a run folder (curves from its metrics.jsonl; with --tsne also the map of its
checkpoint), a checkpoint (the map of its test features), or features saved by `amdim extract`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from ..runtime import CHECKPOINT, check_output, file_tag

log = logging.getLogger("amdim")
METRICS = "metrics.jsonl"
# panels of the training curves: title, y label, which metrics
NCE = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg", "loss")
PANELS = (("NCE objective", "loss", lambda k: k in NCE),
          ("Probe accuracy", "accuracy (%)", lambda k: k.endswith("_acc")),
          ("Throughput", "images / s", lambda k: k == "images_per_s"),
          ("Learning rate", "lr", lambda k: k == "lr"))
AXES = ("epoch", "step")


def _pyplot():
    """pyplot on the Agg backend (files only, no display), imported when a plot is drawn: the
    other commands do not need matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a metrics.jsonl, one per line; a torn or bad line is skipped with a
    warning (a run killed mid-write leaves one)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} at {path}; pass a run folder of amdim pretrain")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON; skipped", path, number)
    if not rows:
        raise ValueError(f"{path} holds no metrics yet; plot it after the first epoch")
    return rows


def plot_curves(rows: list[dict], out: str | os.PathLike, title: str = "") -> Path:
    """One panel per group of metrics present in `rows` (NCE terms, probe accuracies,
    throughput, lr, then any other numbers), against epoch (or step, or line number)."""
    x_name = next((a for a in AXES if all(a in r for r in rows)), None)
    x = [r[x_name] for r in rows] if x_name else list(range(1, len(rows) + 1))
    numeric = [k for k in dict.fromkeys(k for r in rows for k in r)
               if k not in AXES and all(isinstance(r.get(k, 0.0), (int, float)) for r in rows)]
    panels = [(t, y, [k for k in numeric if test(k)]) for t, y, test in PANELS]
    grouped = {k for _, _, keys in panels for k in keys}
    panels.append(("Other", "value", [k for k in numeric if k not in grouped]))
    panels = [p for p in panels if p[2]]
    columns = min(2, len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    plt = _pyplot()
    figure, axes = plt.subplots(rows_of_panels, columns, squeeze=False,
                                figsize=(6 * columns, 3.8 * rows_of_panels))
    for axis, (panel_title, y_label, keys) in zip(axes.flat, panels):
        scale = 100 if panel_title == "Probe accuracy" else 1
        for key in keys:
            points = [(xi, r[key] * scale) for xi, r in zip(x, rows) if key in r]
            style = dict(color="black", linestyle="--") if key == "loss" else {}
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None,
                      markersize=3, label=key, **style)
        if panel_title == "Learning rate":
            axis.set_yscale("log")
        axis.set(title=panel_title, xlabel=x_name or "line", ylabel=y_label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return Path(out)


def tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): t-SNE of the L2-normalised features (cosine geometry, as kNN), after
    PCA to 50 dimensions, which keeps t-SNE fast on wide features."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    if features.shape[1] > 50 and len(features) > 50:
        features = PCA(50, random_state=seed).fit_transform(features)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def plot_tsne(features: np.ndarray, labels: np.ndarray, out: str | os.PathLike,
              classes: list[str] | None = None, max_points: int = 5000, seed: int = 0,
              title: str = "") -> Path:
    """A t-SNE map of features (N, D) coloured by labels (N,) (-1: unlabelled, grey), of at most
    max_points random points."""
    if len(features) < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {len(features)}")
    if len(features) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(features), max_points, replace=False))
        features, labels = features[keep], labels[keep]
    points = tsne(np.asarray(features, dtype=np.float32), seed)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    present = sorted(set(labels.tolist()) - {-1})
    if len(present) <= 20:  # distinct qualitative colours, in their usual order
        colours = plt.get_cmap("tab10" if len(present) <= 10 else "tab20").colors
    else:
        colours = plt.get_cmap("turbo")(np.linspace(0, 1, len(present)))
    if (labels < 0).any():
        axis.scatter(*points[labels < 0].T, s=4, color="lightgrey", label="unlabelled")
    for i, label in enumerate(present):
        name = classes[label] if classes is not None and label < len(classes) else str(label)
        axis.scatter(*points[labels == label].T, s=6, color=colours[i], label=name)
    if len(present) <= 20:
        axis.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))
    axis.set(title=title or f"t-SNE of {len(points)} feature vectors", xticks=[], yticks=[])
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return Path(out)


def plot(path: str, out: str | None = None, tsne_map: bool = False, **extract_options) -> list[Path]:
    """Draw what PATH holds (see the module docstring); returns the PNG files written."""
    from .extract import extract, load_features

    path = Path(path)
    written = []
    if path.is_dir():
        curves = check_output(png_path(out or path / "curves.png"), [path / METRICS])
        written.append(plot_curves(read_metrics(path), curves, title=str(path)))
        if not tsne_map:
            return written
        out, path = path / "tsne.png", path / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    view = extract_options.get("view")
    out = check_output(png_path(out or path.with_suffix(
        ".tsne.png" if view is None else f".tsne-{file_tag(view)}.png")), [path])
    if path.suffix == ".npz" or _holds_features(path):
        given = [k for k in ("data", "view") if extract_options.get(k) is not None]
        if given:  # the features are what they are: say so rather than ignore the flags
            log.warning("%s holds features already: %s apply to checkpoints only; not used",
                        path, ", ".join(f"--{k}" for k in given))
        arrays = load_features(path)
    else:  # a checkpoint: extract its test features to a file of its own (not extract's)
        arrays = load_features(extract(str(path), kind="tsne-features", **extract_options))
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    labels = arrays.get("labels", np.full(len(arrays["features"]), -1))
    written.append(plot_tsne(arrays["features"], labels, out, classes, title=f"t-SNE: {path}"))
    return written


def png_path(out: str | os.PathLike) -> Path:
    """The file matplotlib writes for `out`: .png added to a name without a suffix."""
    out = Path(out)
    return out if out.suffix else out.with_suffix(".png")


def _holds_features(path: Path) -> bool:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a readable torch file: load_model will say what is wrong
        return False
    return isinstance(state, dict) and "features" in state


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="training curves and t-SNE maps (PNG)",
        description="Draw PNGs beside each PATH: a run folder gives curves.png from its "
        "metrics.jsonl (and tsne.png of its checkpoint with --tsne); a checkpoint gives a t-SNE "
        "map of its test features (CHECKPOINT.tsne.png); features from amdim extract give theirs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="run folder, checkpoint, or features (.npz/.pt)")
    parser.add_argument("--out", help="PNG file (one PATH only; default: beside PATH)")
    parser.add_argument("--tsne", action="store_true", help="run folders: also the t-SNE map")
    parser.add_argument("--data", help="checkpoints: the labelled data (default: the checkpoint's)")
    parser.add_argument("--data-root", help="where torchvision datasets are")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--view", help="checkpoints of --views lab or paired (required there): "
                        "the view whose features to map, or all (every view's, concatenated)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    from ..training.checkpoint import CheckpointError
    from ..data.image_files import DataError

    if args.out and len(args.paths) > 1:
        raise SystemExit("amdim plot: --out names one file; pass one PATH with it")
    for path in args.paths:
        try:
            written = plot(path, args.out, args.tsne, data=args.data, data_root=args.data_root,
                           device=args.device, batch_size=args.batch_size, workers=args.workers,
                           view=args.view)
        except (OSError, ValueError, DataError, CheckpointError) as error:
            raise SystemExit(f"amdim plot: {error}") from None
        for png in written:
            print(png)
