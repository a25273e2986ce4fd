"""The Fast AutoAugment ImageNet policy (views.augment) on a batch of views on their device:
the counterpart of augment.FastAutoAugment for batch_views.BatchViews.

Each image draws a sub-policy and, per step, whether the step applies, its sign (the random
mirror of geometric operations) and a Cutout position. These draws are made on the host, from
this object's own generator, so that the images can be grouped without reading anything back
from the device: per step, the images whose drawn step is operation k form one group, and
operation k runs once on that group (index_select, the operation, index_copy_) with per-image
arguments. A batch costs at most 2 steps x 15 operations, whatever its size, and two copies
from the host (the group indices and the arguments), neither of which waits for the device.

The operations follow PIL's on uint8 images (augmentations.py uses PIL): values are rounded
to integers in [0, 255] after each; geometric operations sample the nearest input pixel at
each output pixel's centre and fill with black; blends (Brightness, Color, Contrast,
Sharpness) truncate as PIL's ImagingBlend.
"""
from __future__ import annotations

import math

import torch

from .augment import CUTOUT_FILL, FAA_RANGES, MIRRORED, magnitude
from .faa_imagenet import FAA_IMAGENET
from .image_views import LUMA

OPERATIONS = tuple(FAA_RANGES)  # the 15 operations, in a fixed order
AFFINE = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
SMOOTH = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))  # PIL's ImageFilter.SMOOTH, / 13


def affine_coefficients(name: str, value: float, height: int, width: int) -> list[float]:
    """PIL's inverse affine map (a, b, c, d, e, f) of a geometric operation: output pixel
    (x, y) reads input (a x + b y + c, d x + e y + f), as augmentations.py and Image.rotate."""
    if name == "ShearX":
        return [1, value, 0, 0, 1, 0]
    if name == "ShearY":
        return [1, 0, 0, value, 1, 0]
    if name == "TranslateX":
        return [1, 0, value * width, 0, 1, 0]
    if name == "TranslateY":
        return [1, 0, 0, 0, 1, value * height]
    # Rotate: counter-clockwise by value degrees about the centre (Image.rotate)
    angle, cx, cy = -math.radians(value), width / 2, height / 2
    a, b, d, e = math.cos(angle), math.sin(angle), -math.sin(angle), math.cos(angle)
    return [a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy]


def affine(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """x (G, 3, H, W), coefficients (G, 6) -> nearest-pixel affine warp, black outside."""
    groups, channels, height, width = x.shape
    rows = torch.arange(height, device=x.device, dtype=torch.float32)
    cols = torch.arange(width, device=x.device, dtype=torch.float32)
    # (3, P): the centre (x + 0.5, y + 0.5, 1) of every output pixel
    centres = torch.stack([(cols + 0.5).expand(height, width),
                           (rows[:, None] + 0.5).expand(height, width),
                           torch.ones(height, width, device=x.device)]).view(3, -1)
    source = torch.floor(coefficients.view(groups, 2, 3) @ centres)  # (G, 2, P): x, y
    sx, sy = source.unbind(1)
    inside = (sx >= 0) & (sx < width) & (sy >= 0) & (sy < height)  # (G, P)
    index = (sy.clamp(0, height - 1) * width + sx.clamp(0, width - 1)).long()
    out = x.flatten(2).gather(2, index[:, None].expand(-1, channels, -1)) * inside[:, None]
    return out.view(x.shape)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(G, 3, H, W) -> (G, 1, H, W) PIL's convert("L"), rounded."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).round().unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend(degenerate, x, factor) on uint8 values: truncated, clamped."""
    return torch.lerp(degenerate.expand_as(x), x, factor.view(-1, 1, 1, 1)).clamp_(0, 255).floor_()


def equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel on integer values (G, 3, H, W) in [0, 255]."""
    values = x.flatten(2).long()  # (G, 3, P)
    counts = torch.zeros(*values.shape[:2], 256, device=x.device).scatter_add_(
        2, values, torch.ones_like(values, dtype=torch.float32))  # (G, 3, 256) histograms
    last = counts.gather(2, values.amax(2, keepdim=True))  # count of the highest value
    step = torch.floor((values.shape[2] - last) / 255)  # (G, 3, 1)
    before = counts.cumsum(2) - counts  # pixels below each value
    lut = torch.floor((torch.floor(step / 2) + before) / step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device, dtype=torch.float32))
    return lut.gather(2, values).view(x.shape)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast (cutoff 0) per channel: lowest value to 0, highest to 255."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    stretched = torch.floor((x - low) * (255 / (high - low).clamp(min=1)))
    return torch.where(high > low, stretched, x)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (edges unfiltered)."""
    # made on the device (torch.tensor(..., device=) would copy from the host and wait)
    kernel = torch.full((3, 1, 3, 3), SMOOTH[0][0] / 13, device=x.device)
    kernel[..., 1, 1] = SMOOTH[1][1] / 13
    smooth = torch.nn.functional.conv2d(x, kernel, groups=3).round_()
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def cutout(x: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """box (G, 4): x0, y0, x1, y1 (inclusive) of each image's square of CUTOUT_FILL."""
    height, width = x.shape[2:]
    cols = torch.arange(width, device=x.device)
    rows = torch.arange(height, device=x.device)[:, None]
    x0, y0, x1, y1 = (v.view(-1, 1, 1) for v in box.unbind(1))
    inside = ((cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1))[:, None]
    channel = torch.arange(3, device=x.device).view(1, 3, 1, 1)  # the fill, made on the device
    fill = torch.where(channel == 0, CUTOUT_FILL[0],
                       torch.where(channel == 1, CUTOUT_FILL[1], CUTOUT_FILL[2])).to(x.dtype)
    return torch.where(inside, fill, x)


def apply(name: str, x: torch.Tensor, arguments: torch.Tensor) -> torch.Tensor:
    """One operation on a group x (G, 3, H, W) of integer values in [0, 255]; arguments (G, 6):
    the affine coefficients, the Cutout box, or the signed value in column 0."""
    value = arguments[:, 0]
    if name in AFFINE:
        return affine(x, arguments)
    if name == "AutoContrast":
        return autocontrast(x)
    if name == "Invert":
        return 255 - x
    if name == "Equalize":
        return equalize(x)
    if name == "Solarize":  # values at or above the threshold are inverted
        return torch.where(x >= value.view(-1, 1, 1, 1), 255 - x, x)
    if name == "Posterize":  # keep the top int(value) bits
        scale = torch.exp2(8 - torch.floor(value)).view(-1, 1, 1, 1)
        return torch.floor(x / scale) * scale
    if name == "Brightness":
        return _blend(torch.zeros_like(x[:, :1]), x, value)
    if name == "Color":
        return _blend(_luma(x), x, value)
    if name == "Contrast":  # the degenerate image is the rounded mean grey level
        return _blend(torch.floor(_luma(x).mean((2, 3), keepdim=True) + 0.5), x, value)
    if name == "Sharpness":
        return sharpness(x, value)
    if name == "Cutout":
        return cutout(x, arguments[:, :4])
    raise ValueError(f"unknown Fast AutoAugment operation {name!r}")


class BatchFastAutoAugment:
    """A Fast AutoAugment policy on a batch (N, 3, H, W) of float views in [0, 255] on any
    device, grouped by operation (see the module docstring). seed: of the host generator that
    draws the sub-policies, steps, signs and Cutout positions, unless a call gives its own."""

    def __init__(self, policy: list = FAA_IMAGENET, seed: int = 0):
        self.policy = policy
        self.operation = torch.tensor([[OPERATIONS.index(s[0]) for s in p] for p in policy])
        self.probability = torch.tensor([[s[1] for s in p] for p in policy], dtype=torch.float64)
        self.generator = torch.Generator().manual_seed(seed)
        self._last_seed, self._calls = None, 0

    def draw(self, n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor,
                                                              list[tuple[int, str, int, int]]]:
        """Host draws for n images: (indices (M,), arguments (n, 2, 6), groups [(step,
        operation, start, end)]) where indices[start:end] are the images of that group."""
        g = self.generator
        choice = torch.randint(len(self.policy), (n,), generator=g)
        applied = torch.rand(n, 2, generator=g, dtype=torch.float64) <= self.probability[choice]
        flip, position = torch.rand(n, 2, generator=g) < 0.5, torch.rand(n, 2, 2, generator=g)
        arguments = torch.zeros(n, 2, 6)
        for i, sub_policy in enumerate(choice.tolist()):
            for step, (name, _, level) in enumerate(self.policy[sub_policy]):
                value = magnitude(name, level)
                if name in MIRRORED and flip[i, step]:
                    value = -value
                if name in AFFINE:
                    arguments[i, step] = torch.tensor(
                        affine_coefficients(name, value, height, width))
                elif name == "Cutout":  # their CutoutAbs: side value x width px
                    side = value * width
                    u, v = position[i, step].tolist()
                    x0, y0 = int(max(0, u * width - side / 2)), int(max(0, v * height - side / 2))
                    arguments[i, step, :4] = torch.tensor(
                        [x0, y0, math.floor(min(width, x0 + side)),
                         math.floor(min(height, y0 + side))]) if side > 0 else -1.0
                else:
                    arguments[i, step, 0] = value
        groups, indices, start = [], [], 0
        for step in range(2):
            for k, name in enumerate(OPERATIONS):
                members = torch.nonzero(applied[:, step] & (self.operation[choice, step] == k))
                if len(members):
                    indices.append(members.view(-1))
                    groups.append((step, name, start, start + len(members)))
                    start += len(members)
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64)
        return index, arguments, groups

    def __call__(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """x (N, 3, H, W) float in [0, 255] -> the policy applied, integer values in [0, 255].
        seed: the host draws follow it (and the number of calls in a row with it), so that a
        batch's draws follow its device generator's seed (TrainBatches seeds one per batch:
        a resumed run draws what it would have); None: this object's generator goes on."""
        if seed is not None:
            self._calls = self._calls + 1 if seed == self._last_seed else 0
            self._last_seed = seed
            self.generator.manual_seed((seed * 1_000_003 + self._calls) % 2 ** 63)
        n, _, height, width = x.shape
        index, arguments, groups = self.draw(n, height, width)
        # two copies from the host, queued without waiting: the group members and arguments
        index = index.to(x.device, non_blocking=True)
        arguments = arguments.to(x.device, non_blocking=True)
        x = x.round()
        for step, name, start, end in groups:
            members = index[start:end]  # a view: no kernel
            group = x.index_select(0, members)
            out = apply(name, group, arguments[:, step].index_select(0, members))
            x.index_copy_(0, members, out)
        return x
