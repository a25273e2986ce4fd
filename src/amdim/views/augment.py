"""Augmentation policies beyond the paper's views (`--augment`): the Fast AutoAugment ImageNet
policy with AlexNet's PCA lighting noise (the recipe of the authors' strongest ImageNet results,
their README and amdim-public issue #5), and torchvision's RandAugment and TrivialAugment.

The Fast AutoAugment operations and their ranges are kakaobrain/fast-autoaugment's
(FastAutoAugment/augmentations.py, `augment_list()` and `apply_augment()`, commit 35b482a):
a table level in [0, 1] maps linearly onto the operation's range, geometric operations flip
their sign with p=0.5 ("random_mirror"), and everything is PIL on uint8 images. The lighting
noise is their data.py's `Lighting(0.1, _IMAGENET_PCA...)` (AlexNet's), added after ToTensor.
All randomness comes from torch's generator, as in image_views.py.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from .faa_imagenet import FAA_IMAGENET

AUGMENTS = ("paper", "imagenet-faa", "randaugment", "trivialaugment")
FAA_CROP_SCALE = (0.2, 0.9)  # the authors' crop scale with the FAA policy (issue #5)
LIGHTING_STD = 0.1  # std of AlexNet's PCA lighting coefficients
# ImageNet's RGB eigenvalues and eigenvectors (columns), pixel values in [0, 1]; as
# fast-autoaugment's data.py _IMAGENET_PCA
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
CUTOUT_FILL = (125, 123, 114)  # their CutoutAbs colour: ImageNet's mean, uint8
# (low, high) of each operation: level 0 -> low, level 1 -> high (augment_list)
FAA_RANGES = {"ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
              "TranslateX": (-0.45, 0.45), "TranslateY": (-0.45, 0.45),  # x image size
              "Rotate": (-30.0, 30.0),  # degrees, counter-clockwise
              "AutoContrast": (0.0, 1.0), "Invert": (0.0, 1.0), "Equalize": (0.0, 1.0),
              "Solarize": (0.0, 256.0),  # threshold: values >= it are inverted
              "Posterize": (4.0, 8.0),  # bits kept (int)
              "Contrast": (0.1, 1.9), "Color": (0.1, 1.9), "Brightness": (0.1, 1.9),
              "Sharpness": (0.1, 1.9),  # enhancement factors, 1: unchanged
              "Cutout": (0.0, 0.2)}  # square side, x image width
MIRRORED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def magnitude(name: str, level: float) -> float:
    """The argument of operation `name` at table level `level` (apply_augment's mapping)."""
    low, high = FAA_RANGES[name]
    return level * (high - low) + low


def apply_operation(image: Image.Image, name: str, value: float) -> Image.Image:
    """One Fast AutoAugment operation with its argument `value` (after magnitude(), with the
    sign already drawn) on an RGB PIL image, as their augmentations.py."""
    affine = {"ShearX": (1, value, 0, 0, 1, 0), "ShearY": (1, 0, 0, value, 1, 0),
              "TranslateX": (1, 0, value * image.size[0], 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, value * image.size[1])}
    if name in affine:
        return image.transform(image.size, Image.AFFINE, affine[name])
    if name == "Rotate":
        return image.rotate(value)
    if name in ("AutoContrast", "Invert", "Equalize"):
        return getattr(ImageOps, name.lower())(image)
    if name == "Solarize":
        return ImageOps.solarize(image, value)
    if name == "Posterize":
        return ImageOps.posterize(image, int(value))
    if name in ("Contrast", "Color", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(image).enhance(value)
    if name == "Cutout":
        return cutout(image, value * image.size[0], *torch.rand(2).tolist())
    raise ValueError(f"unknown Fast AutoAugment operation {name!r}")


def cutout(image: Image.Image, side: float, u: float, v: float) -> Image.Image:
    """Their CutoutAbs: a side x side square of CUTOUT_FILL centred at (u * width, v * height)
    for uniform u, v, its corner clamped at the image's top left."""
    if side <= 0:
        return image
    width, height = image.size
    x0, y0 = int(max(0, u * width - side / 2)), int(max(0, v * height - side / 2))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(width, x0 + side), min(height, y0 + side)),
                                    CUTOUT_FILL)
    return image


class FastAutoAugment:
    """A Fast AutoAugment policy on PIL images: one sub-policy drawn uniformly per call, each
    of its steps applied with its probability (their data.py `Augmentation`)."""

    def __init__(self, policy: list = FAA_IMAGENET):
        self.policy = policy

    def __call__(self, image: Image.Image) -> Image.Image:
        for name, probability, level in self.policy[int(torch.randint(len(self.policy), ()))]:
            if torch.rand(()) > probability:  # applied with the probability
                continue
            value = magnitude(name, level)
            if name in MIRRORED and torch.rand(()) < 0.5:
                value = -value
            image = apply_operation(image, name, value)
        return image


class Lighting:
    """AlexNet's PCA lighting noise on a (3, H, W) tensor in [0, 1]: adds
    eigvec @ (alpha * eigval) per image, alpha ~ N(0, std^2) per component; not clamped."""

    def __init__(self, std: float = LIGHTING_STD):
        self.std = std
        self.eigval, self.eigvec = torch.tensor(PCA_EIGVAL), torch.tensor(PCA_EIGVEC)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        alpha = torch.randn(3) * self.std
        return image + (self.eigvec @ (alpha * self.eigval)).view(3, 1, 1)
