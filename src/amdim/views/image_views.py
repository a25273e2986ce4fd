"""Two augmented views of each image, exactly as the authors build them (amdim-public,
datasets.py), and the deterministic evaluation transforms.

32 px: translation by up to 4 px with reflection padding (p=0.8), colour jitter
0.4/0.4/0.4/0.2 (p=0.8), grayscale (p=0.25). 64 and 128 px: random resized crop (scale 0.3-1,
ratio 0.7-1.4, bicubic) instead of the translation; at 128 px the hue jitter is 0.1. One
horizontal flip is shared by both views. All randomness comes from torch's generator, so a
seed (and DataLoader's per-worker seeding) makes runs repeatable.

Other policies (`augment`, views.augment) keep these views and add to them after the crop:
imagenet-faa the Fast AutoAugment ImageNet policy, crop scale 0.2-0.9 and PCA lighting 0.1
(the authors' strongest ImageNet results); randaugment / trivialaugment torchvision's.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .augment import AUGMENTS, FAA_CROP_SCALE, FastAutoAugment, Lighting

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma: PIL's convert("L"), the batched grayscale
BICUBIC = T.InterpolationMode.BICUBIC
# the authors' settings; batch_views.py builds the same views on tensors from these
MAX_TRANSLATION = 4  # px, 32 px views
CROP_SCALE = (0.3, 1.0)  # fraction of the image area, 64/128 px views
CROP_RATIO = (0.7, 1.4)  # width / height
JITTER = 0.4  # brightness, contrast and saturation
EVAL_RESIZE = {32: 32, 64: 70, 128: 146}  # shorter side before the centre crop


def hue_jitter(image_size: int) -> float:
    """Maximum hue shift (in turns): 0.1 at 128 px, 0.2 below."""
    return 0.1 if image_size == 128 else 0.2


class RandomTranslateWithReflect:
    """Shift the image by up to `max_translation` px on each axis, filling by reflection."""

    def __init__(self, max_translation: int):
        self.max_translation = max_translation

    def __call__(self, image: Image.Image) -> Image.Image:
        m = self.max_translation
        dx, dy = torch.randint(-m, m + 1, (2,)).tolist()
        pixels = np.asarray(image)  # (H, W, 3)
        h, w = pixels.shape[:2]
        px, py = abs(dx), abs(dy)
        padded = np.pad(pixels, ((py, py), (px, px), (0, 0)), mode="reflect")
        # output pixel (i, j) is input pixel (i - dy, j - dx), reflected at the borders
        return Image.fromarray(padded[py - dy:py - dy + h, px - dx:px - dx + w])


class Fit:
    """Resize the shorter side to `size` and centre-crop; a no-op for images already size x size."""

    def __init__(self, size: int):
        self.resize = T.Compose([T.Resize(size, interpolation=BICUBIC), T.CenterCrop(size)])
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.size == (self.size, self.size) else self.resize(image)


def _to_tensor(mean: tuple, std: tuple) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def crop_scale(augment: str = "paper") -> tuple[float, float]:
    """The random resized crop's area range of a policy: 0.3-1 (paper), 0.2-0.9 (imagenet-faa)."""
    return FAA_CROP_SCALE if augment == "imagenet-faa" else CROP_SCALE


def augmentation(image_size: int, mean: tuple, std: tuple, augment: str = "paper"
                 ) -> T.Compose:
    """The per-view random augmentation (after the shared flip): PIL RGB -> (3, S, S) float.
    augment: paper (the authors' views), or one of views.augment.AUGMENTS added after the crop."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if image_size == 32:
        geometric = [Fit(32), T.RandomApply([RandomTranslateWithReflect(MAX_TRANSLATION)], p=0.8)]
    else:
        geometric = [T.RandomResizedCrop(image_size, scale=crop_scale(augment), ratio=CROP_RATIO,
                                         interpolation=BICUBIC)]
    policy = {"paper": [], "imagenet-faa": [FastAutoAugment()],
              "randaugment": [T.RandAugment()], "trivialaugment": [T.TrivialAugmentWide()]}
    colour = [T.RandomApply([T.ColorJitter(JITTER, JITTER, JITTER, hue_jitter(image_size))],
                            p=0.8),
              T.RandomGrayscale(p=0.25)]
    if augment == "imagenet-faa":  # lighting on [0, 1] values, before the normalisation
        tensor = [T.ToTensor(), Lighting(), T.Normalize(mean, std)]
    else:
        tensor = [_to_tensor(mean, std)]
    return T.Compose(geometric + policy[augment] + colour + tensor)


def evaluation_transform(image_size: int, mean: tuple, std: tuple) -> T.Compose:
    """Deterministic: 32 px as is; 64 px resize 70 + centre crop; 128 px resize 146 + crop."""
    if image_size == 32:
        geometric = [Fit(32)]
    else:
        geometric = [T.Resize(EVAL_RESIZE[image_size], interpolation=BICUBIC),
                     T.CenterCrop(image_size)]
    return T.Compose(geometric + [_to_tensor(mean, std)])


class TwoViews:
    """PIL image -> (view1, view2): one shared horizontal flip, then two independent draws."""

    def __init__(self, image_size: int, mean: tuple, std: tuple, augment: str = "paper"):
        self.flip = T.RandomHorizontalFlip(p=0.5)
        self.augment = augmentation(image_size, mean, std, augment)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.flip(image.convert("RGB"))
        return self.augment(image), self.augment(image)
