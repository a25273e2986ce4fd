"""`amdim segment`: the mixture posterior as segmentation maps (paper section 3.7, figure 4).

Each test image's global mixture f1^1..f1^K predicts the 7x7 and 5x5 local features of the
same image; the posterior q(j | location) is upsampled to the image and its most probable
component drawn as one colour per component. Optionally measures how spatially coherent the
maps are: the fraction of 4-neighbour location pairs given the same component, against the
chance level of the components' marginal frequencies.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PretrainConfig
from ..data.datasets import normalisation
from ..data.image_files import DataError
from ..model.encoder import Encoder
from ..model.mixture import MixtureHead, assignments
from ..runtime import check_output, resolve_device
from ..training.checkpoint import CheckpointError, is_authors, load_model
from ..training.inputs import build_datasets

log = logging.getLogger(__name__)
OVERLAY_OPACITY = 0.5  # colour vs image in the overlays: both stay readable
MAX_IMAGES = 64  # rows of one grid: matplotlib's layout of hundreds takes minutes


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment", help="draw the mixture posterior q(component | location) over test images",
        description="Draw each test image's mixture posterior q(component | location) over "
                    "its 7x7 and 5x5 maps as a PNG grid (paper section 3.7).")
    parser.add_argument("checkpoint", help="an amdim checkpoint pretrained with --n-mixtures K >= 2")
    parser.add_argument("--data", default=None,
                        help="dataset name or folder (default: the checkpoint's)")
    parser.add_argument("--data-root", default=None,
                        help="where torchvision datasets are (default: the checkpoint's)")
    parser.add_argument("--out", required=True, help="PNG to write: one row per image (a "
                        "folder: CHECKPOINT.segment.png in it)")
    parser.add_argument("--n-images", type=int,
                        help=f"test images to draw, the first ones (2 to {MAX_IMAGES}; "
                        "default 16)")
    parser.add_argument("--indices", type=int, nargs="+", default=None,
                        help="draw the test images at these indices instead of the first "
                             "--n-images (>= 2 of them)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:1")
    parser.add_argument("--view", help="a checkpoint of --views lab or paired (required "
                        "there): the view whose encoder's maps to draw, over that view's images")
    parser.add_argument("--spatial-coherence", action="store_true",
                        help="print the neighbour agreement of the maps and write it as JSON "
                             "beside the PNG")
    parser.set_defaults(func=main)


def load_mixture_model(path: str | os.PathLike, view: str | None = None
                       ) -> tuple[Encoder, MixtureHead, PretrainConfig]:
    """Encoder and mixture head (eval mode) and the config, from one of our checkpoints (or
    an export of one). view: for a checkpoint of --views lab or paired, the view whose
    encoder to draw (required there)."""
    return _load_mixture_model(path, view)[:3]


def _load_mixture_model(path, view: str | None):
    """load_mixture_model's (encoder, head, cfg), and the checkpoint dict."""
    from ..model.multiview import ALL

    if view == ALL:
        raise CheckpointError(f"segment draws the maps of one view's encoder: pass --view "
                              f"NAME, not --view {ALL}")
    encoder, _, state = load_model(path, view)
    config = state.get("config", {}) if not is_authors(state) else {}
    n_mixtures = config.get("n_mixtures", 1)
    if n_mixtures <= 1:
        raise CheckpointError(
            f"{path} was pretrained without a mixture (n_mixtures={n_mixtures}): no mixture "
            "head, no posterior to draw; pretrain with --n-mixtures K (K >= 2) to get one")
    if state.get("mixture_head") is None:
        raise CheckpointError(
            f"{path} was pretrained with --n-mixtures {n_mixtures} but holds no mixture head "
            "(an encoder export of an older amdim left it out): draw the run's checkpoint.pt, "
            "or export it again")
    cfg = PretrainConfig.from_dict(config)
    head = MixtureHead(cfg.n_rkhs, cfg.n_mixtures)
    try:
        head.load_state_dict(state["mixture_head"])
    except RuntimeError as error:
        raise CheckpointError(f"{path}: the mixture head does not match its config: {error}") from None
    return encoder, head.eval(), cfg, state


def spatial_coherence(assignments: torch.Tensor) -> dict[str, float]:
    """How often 4-neighbour locations share their most probable component.

    assignments: (B, K, H, W) posterior q(j | location).
    Returns agreement (fraction of horizontal and vertical neighbour pairs whose argmax agrees)
    and chance (sum_j p_j^2, p_j the fraction of locations whose argmax is j: the agreement
    of maps with the same component frequencies but no spatial structure).
    """
    labels = assignments.argmax(1)  # (B, K, H, W) -> (B, H, W)
    same = torch.cat([(labels[:, :, 1:] == labels[:, :, :-1]).flatten(),
                      (labels[:, 1:, :] == labels[:, :-1, :]).flatten()])
    if same.numel() == 0:
        raise ValueError(f"maps of shape {tuple(assignments.shape)} have no neighbouring locations")
    frequencies = torch.bincount(labels.flatten(), minlength=assignments.shape[1]).double()
    frequencies = frequencies / labels.numel()
    return {"agreement": same.double().mean().item(), "chance": frequencies.square().sum().item()}


def within_image_structure(assignments: torch.Tensor) -> dict[str, float]:
    """What spatial_coherence's chance level misses when whole images take one component.

    assignments: (B, K, H, W). Returns chance_within_image (the mean over images of
    sum_j p_bj^2, p_bj the fraction of image b's locations whose argmax is j: the agreement
    of each image's own labels in random places; an image-level clustering gives 1) and
    components_per_image (the mean number of distinct components in an image's map)."""
    labels = assignments.argmax(1).flatten(1)  # (B, K, H, W) -> (B, H*W)
    counts = F.one_hot(labels, assignments.shape[1]).sum(1).double()  # (B, K)
    frequencies = counts / labels.shape[1]
    return {"chance_within_image": frequencies.square().sum(1).mean().item(),
            "components_per_image": (counts > 0).sum(1).double().mean().item()}


def _palette(n_mixtures: int) -> np.ndarray:
    """(K, 3) RGB in [0, 1]: tab10's distinct colours while they last."""
    from matplotlib import colormaps  # only when drawing: training needs no matplotlib

    name = "tab10" if n_mixtures <= 10 else "tab20" if n_mixtures <= 20 else "hsv"
    cmap = colormaps[name]
    positions = np.arange(n_mixtures) if name != "hsv" else np.linspace(0, 1, n_mixtures, endpoint=False)
    return np.asarray(cmap(positions))[:, :3]


def overlays(pictures: np.ndarray, posterior: torch.Tensor) -> np.ndarray:
    """Colour each pixel by its most probable component over the pictures.

    pictures: (B, S, S, 3) in [0, 1]; posterior: (B, K, h, w).
    Returns (B, S, S, 3) in [0, 1].
    """
    size = pictures.shape[1:3]
    # bilinear on the probabilities, then argmax: smooth borders between components
    labels = F.interpolate(posterior.float(), size=size, mode="bilinear", align_corners=False)
    colours = _palette(posterior.shape[1])[labels.argmax(1).numpy()]  # (B, S, S, 3)
    return (1 - OVERLAY_OPACITY) * pictures + OVERLAY_OPACITY * colours


def _draw(panels: list[list[np.ndarray]], titles: list[str], row_labels: list[str],
          n_mixtures: int, out: Path, dpi: int = 100) -> None:
    """A grid of (S, S, 3) panels, column titles over the first row, a label left of each
    row, and a legend of the K component colours."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n_rows, n_cols = len(panels), len(panels[0])
    # a bare Figure renders with the Agg canvas: no pyplot, no global backend switch
    figure = Figure(figsize=(1.6 * n_cols, 1.6 * n_rows + 0.4), layout="constrained")
    axes = figure.subplots(n_rows, n_cols, squeeze=False)
    for row in range(n_rows):
        for col in range(n_cols):
            axes[row, col].imshow(panels[row][col].clip(0, 1), interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            axes[row, col].spines[:].set_visible(False)
            if row == 0 and titles[col]:
                axes[row, col].set_title(titles[col], fontsize=8)
        if row_labels[row]:
            axes[row, 0].set_ylabel(row_labels[row].replace(", ", "\n"), fontsize=9)
    handles = [Patch(color=c, label=f"component {j}") for j, c in enumerate(_palette(n_mixtures))]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(n_mixtures, 8),
                  fontsize=8)
    figure.savefig(out, dpi=dpi, bbox_inches="tight")


def _write_grid(pictures: np.ndarray, maps: dict[str, torch.Tensor], out: Path) -> None:
    """One row per image: the image, its 7x7 map and its 5x5 map."""
    columns = [pictures, overlays(pictures, maps["r7"]), overlays(pictures, maps["r5"])]
    panels = [[column[row] for column in columns] for row in range(len(pictures))]
    _draw(panels, ["image", "7x7 (r7)", "5x5 (r5)"], [""] * len(pictures),
          maps["r7"].shape[1], out)


def compare_maps(pictures: np.ndarray, maps: dict[str, torch.Tensor], out: str | os.PathLike,
                 dpi: int = 100) -> None:
    """One column per image, one row per model: the images, then each model's map.

    pictures: (B, S, S, 3) in [0, 1]; maps: model label -> posterior (B, K_m, h, w)."""
    rows = [pictures] + [overlays(pictures, posterior) for posterior in maps.values()]
    _draw([list(row) for row in rows], [""] * len(pictures), ["image", *maps],
          max(posterior.shape[1] for posterior in maps.values()), Path(out), dpi)


@torch.no_grad()
def posterior_maps(encoder: Encoder, head: MixtureHead, images: torch.Tensor,
                   tclip: float = 20.0, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Each image's mixture posterior over its own maps, computed on the encoder's device
    (the head must be there too) and returned on the CPU: {"r5": (B, K, 5, 5), "r7": (B, K, 7, 7)}.

    images: (B, 3, S, S) normalised, on any device, B >= 2 (the other images are the NCE
    negatives)."""
    features = encoder(images.to(next(encoder.parameters()).device))
    maps = assignments(features, features, head, tclip, alpha)
    return {name: posterior.float().cpu() for name, posterior in maps.items()}


def pictures(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
             ) -> torch.Tensor:
    """Normalised images (B, 3, S, S) on any device -> CPU (B, S, S, 3) in [0, 1], to draw."""
    images = images.float().cpu()
    scale, shift = torch.tensor(std)[:, None, None], torch.tensor(mean)[:, None, None]
    return (images * scale + shift).clamp(0, 1).permute(0, 2, 3, 1)


def view_pictures(images: torch.Tensor) -> torch.Tensor:
    """A view's images (B, C, S, S), normalised by its ViewSet, -> CPU (B, S, S, 3) in [0, 1]
    to draw: each image scaled to its own range; 3 channels as colour, others as grey (their
    mean)."""
    images = images.float().cpu()
    if images.shape[1] != 3:
        images = images.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    low = images.amin((1, 2, 3), keepdim=True)
    high = images.amax((1, 2, 3), keepdim=True)
    return ((images - low) / (high - low).clamp(min=1e-6)).permute(0, 2, 3, 1)


def segment_images(encoder: Encoder, head: MixtureHead, images: torch.Tensor,
                   mean: tuple[float, ...], std: tuple[float, ...], out: str | os.PathLike,
                   tclip: float = 20.0, alpha: float = 1.0) -> dict[str, dict[str, float]]:
    """Write the segmentation grid of a batch of images and return its spatial coherence.

    images: (B, 3, S, S) normalised with (mean, std), B >= 2 (the other images are the NCE
    negatives); each image's global mixture is scored against its own 7x7 and 5x5 maps, on
    the encoder's device. Returns {"r7": spatial_coherence(...), "r5": ...}.
    """
    maps = posterior_maps(encoder, head, images, tclip, alpha)  # CPU
    _write_grid(pictures(images, mean, std).numpy(), maps, Path(out))
    return {name: spatial_coherence(maps[name]) for name in ("r7", "r5")}


def _test_images(cfg: PretrainConfig, n_images: int, indices: list[int] | None = None,
                 state: dict | None = None, view: str | None = None
                 ) -> tuple[torch.Tensor, tuple, tuple]:
    """The first n images of the test set (or those at `indices`), (n, C, S, S) normalised,
    and (mean, std); with a view of a --views lab / paired checkpoint (`state`), that view's
    images, which the ViewSet normalises, and (None, None)."""
    if view is not None:
        from .extract import view_split

        dataset = view_split(state, cfg.data, cfg.data_root, "test")
        index = list(state["views"]["names"]).index(view)
        stats = (None, None)
    else:
        train, test, _ = build_datasets(cfg)
        if test is None:
            log.warning("%s has no test split; drawing augmented views of training images",
                        cfg.data)
        dataset = test if test is not None else train
        index, stats = 0, normalisation(cfg.data)
    if indices is None:
        if n_images > len(dataset):
            log.warning("the test set has %d images; drawing %d, not --n-images %d",
                        len(dataset), len(dataset), n_images)
        indices = range(min(n_images, len(dataset)))
    elif not all(0 <= i < len(dataset) for i in indices):
        raise ValueError(f"--indices must lie in [0, {len(dataset)}), the test set's size; "
                         f"got {sorted(indices)}")
    items = [dataset[i][0] for i in indices]
    images = torch.stack([item[index] if isinstance(item, tuple) else item for item in items])
    return images, *stats


def grid_path(out: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """The PNG that --out names: a folder (existing, or ending in /) gets
    CHECKPOINT.segment.png inside it; a name without a suffix gets .png (as matplotlib would
    add)."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        return path / f"{Path(checkpoint).stem}.segment.png"
    return path if path.suffix else path.with_suffix(".png")


def main(args: argparse.Namespace) -> None:
    try:
        _segment(args)
    except (ValueError, CheckpointError, DataError) as error:
        raise SystemExit(f"amdim segment: {error}") from None
    except OSError as error:  # e.g. a full disk or a read-only folder for --out
        raise SystemExit(f"amdim segment: cannot write {error.filename or args.out} "
                         f"({error.strerror or error})") from None


def _segment(args: argparse.Namespace) -> None:
    if args.indices is not None and args.n_images is not None:
        raise SystemExit("amdim segment: --indices names the images to draw, --n-images how "
                         "many of the first: give one of them")
    n_images = (len(args.indices) if args.indices is not None
                else 16 if args.n_images is None else args.n_images)
    if n_images < 2:
        raise SystemExit(f"amdim segment: draw at least 2 images (got {n_images}): the other "
                         "images are the negatives that the posterior is computed against")
    if n_images > MAX_IMAGES:
        raise SystemExit(f"amdim segment: {n_images} images are {n_images} rows of one grid; "
                         f"draw at most {MAX_IMAGES} (matplotlib takes minutes to lay out "
                         "more): pick them with --indices, one grid per command")
    out = check_output(grid_path(args.out, args.checkpoint), [args.checkpoint])
    coherence_path = check_output(out.with_name(out.stem + "_coherence.json"),
                                  [args.checkpoint])
    encoder, head, cfg, state = _load_mixture_model(args.checkpoint, args.view)
    device = resolve_device(args.device)
    encoder.to(device)
    head.to(device)
    overrides = {k: v for k, v in (("data", args.data), ("data_root", args.data_root)) if v}
    cfg = PretrainConfig.from_dict({**cfg.to_dict(), **overrides})
    images, mean, std = _test_images(cfg, n_images, args.indices, state, args.view)
    out.parent.mkdir(parents=True, exist_ok=True)
    maps = posterior_maps(encoder, head, images, cfg.tclip, cfg.mixture_entropy)  # CPU
    drawn = (pictures(images, mean, std) if mean is not None else view_pictures(images))
    _write_grid(drawn.numpy(), maps, out)
    coherence = {name: spatial_coherence(maps[name]) for name in ("r7", "r5")}
    log.info("wrote %s (%d images, %d components)", out, len(images), cfg.n_mixtures)
    print(out)
    if args.spatial_coherence:
        coherence_path.write_text(json.dumps(coherence, indent=2) + "\n")
        print(json.dumps(coherence))
        log.info("wrote %s", coherence_path)
