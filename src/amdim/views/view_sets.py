"""Contexts -> training items: each view of a context resized to the encoder's image size,
optionally lightly augmented on its own, normalised; and the CIE Lab split of RGB images
(--views lab: L, 1 channel, and ab, 2 channels).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.image_files import DataError, skipped_files
from ..data.paired import as_hwc

LAB = (("L", 1), ("ab", 2))  # the layout of --views lab: view names and channel counts
# Lab normalisation: L in [0, 100], a and b within about +-100 (|ab| < 30 for most pixels)
LAB_SHIFT, LAB_SCALE = (50.0, 0.0, 0.0), (25.0, 25.0, 25.0)
UINT8_MEAN, UINT8_STD = 0.45, 0.25  # of x / 255 for views from the data, every channel
CROP_SCALE, CROP_RATIO = (0.5, 1.0), (3 / 4, 4 / 3)  # the light per-view augmentation
# sRGB (D65) -> CIE XYZ, and the D65 white point (IEC 61966-2-1; CIE 15)
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))
WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], (..., 3, H, W) -> CIE L*a*b* (D65), (..., 3, H, W): L in [0, 100]."""
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    # (..., 3, H, W) -> (..., H, W, 3) @ (3, 3)^T -> (..., 3, H, W), relative to white
    xyz = (linear.movedim(-3, -1) @ matrix.T / white).movedim(-1, -3)
    delta = 6 / 29
    f = torch.where(xyz > delta ** 3, xyz.clamp_min(delta ** 3) ** (1 / 3),
                    xyz / (3 * delta ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -3)


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """A random resized crop box (top, left, h, w): area CROP_SCALE of the image, aspect
    ratio in CROP_RATIO (log-uniform), drawn from torch's generator."""
    u = torch.rand(4).tolist()
    area = height * width * (CROP_SCALE[0] + u[0] * (CROP_SCALE[1] - CROP_SCALE[0]))
    ratio = math.exp(math.log(CROP_RATIO[0]) + u[1] * math.log(CROP_RATIO[1] / CROP_RATIO[0]))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w


def resize(view: torch.Tensor, size: int, augment: bool) -> torch.Tensor:
    """(C, H, W) float -> (C, size, size): a random resized crop and flip when augment, else
    the central square."""
    _, height, width = view.shape
    if augment:
        top, left, h, w = crop_box(height, width)
    else:
        h = w = min(height, width)
        top, left = (height - h) // 2, (width - w) // 2
    view = view[:, top:top + h, left:left + w]
    if augment and torch.rand(()) < 0.5:
        view = view.flip(-1)
    if (h, w) != (size, size):
        view = F.interpolate(view[None], size=(size, size), mode="bilinear",
                             align_corners=False, antialias=h > size or w > size)[0]
    return view


class ViewSet(Dataset):
    """Training or evaluation items of a source of contexts: ((K views, each (C_k, S, S)
    float32), label). mode "lab": the source's one RGB view, augmented (random resized crop and
    flip, the same for both views) when training, split into L (1 channel) and ab (2); mode
    "paired": the source's views, each resized to S. view_augment: when training, every view
    also gets its own crop and flip."""

    def __init__(self, source: Dataset, image_size: int, mode: str, train: bool,
                 view_augment: bool = False):
        if mode not in ("lab", "paired"):
            raise ValueError(f"mode must be lab or paired, got {mode!r}")
        self.source, self.image_size, self.mode = source, image_size, mode
        self.train, self.view_augment = train, view_augment
        self.classes = list(getattr(source, "classes", []))
        self.skipped = skipped_files(source)
        if mode == "lab":
            self.layout = LAB
        else:
            names = getattr(source, "names", None)
            channels = getattr(source, "channels", None)
            if names is None or channels is None:  # any Dataset: read the first context
                views, _ = source[0]
                names = tuple(f"view{i}" for i in range(len(views)))
                channels = tuple(as_hwc(np.asarray(v)).shape[2] for v in views)
            self.layout = tuple(zip(names, channels))

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int]:
        views, label = self.source[index]
        # (H, W, C) uint8 -> (C, H, W) float in [0, 1]
        views = [torch.from_numpy(np.array(as_hwc(np.asarray(v)))).permute(2, 0, 1).float() / 255
                 for v in views]
        size, jitter = self.image_size, self.train and self.view_augment
        if self.mode == "lab":
            lab = rgb_to_lab(resize(views[0], size, self.train))
            shift = torch.tensor(LAB_SHIFT)[:, None, None]
            lab = (lab - shift) / torch.tensor(LAB_SCALE)[:, None, None]
            views = [lab[:1], lab[1:]]
            out = [resize(v, size, True) if jitter else v for v in views]
        else:
            out = [(resize(v, size, jitter) - UINT8_MEAN) / UINT8_STD for v in views]
        return tuple(v.contiguous() for v in out), label


def check_colour(source: Dataset, data: str, samples: int = 64) -> None:
    """Raise DataError if the one RGB view of a --views lab source (contexts ((H, W, 3),)) is
    grey in every one of up to `samples` evenly spaced images: its ab channels would be
    constant, and the ab encoder would learn nothing."""
    for index in np.linspace(0, len(source) - 1, min(len(source), samples)).round():
        views, _ = source[int(index)]
        image = as_hwc(np.asarray(views[0]))
        if image.shape[2] >= 3 and not ((image[..., 0] == image[..., 1]).all()
                                        and (image[..., 1] == image[..., 2]).all()):
            return
    raise DataError(f"--views lab splits colour images into their L and ab channels, but "
                    f"{data} is grey (R = G = B in every image looked at), so the ab view "
                    "would be constant: use --views augment for grey images")
