"""Two augmented views of a whole batch of uint8 images, built with batched tensor ops on the
images' device: the on-GPU counterpart of views.TwoViews, and the deterministic evaluation
transform on tensors.

The augmentations and probabilities are those of views.py: one horizontal flip shared by both
views (p=0.5); then per view, independently and with per-image random parameters: 32 px:
translation by an integer in [-4, 4] on each axis with reflection padding (p=0.8); 64/128 px:
random resized crop (scale 0.3-1, ratio 0.7-1.4, torchvision's 10 tries and centre-crop
fallback); colour jitter 0.4/0.4/0.4/hue 0.2 (0.1 at 128 px) in a random order per image
(p=0.8); grayscale (p=0.25); normalisation.

Resampling (crop and resize) is neither F.grid_sample nor a loop of per-box F.interpolate: each
image's crop-and-resize is a separable linear map, so it is two batched matmuls with per-image
weight matrices, out = Wy @ x @ Wx^T, (B, S, H) @ (B, 3, H, W) @ (B, W, S). The weights are
PIL's antialiased bicubic filter (a = -0.5, support widened by the downscale factor, zero
outside the crop box, normalised per output pixel), which is what the CPU path applies (PIL)
and what torchvision's tensor resize computes with antialias=True. grid_sample's bicubic uses
a = -0.75 and no antialiasing (it aliases when downscaling, e.g. 96 px STL-10 crops to 64), and
per-box interpolate costs one kernel launch per image; the matmuls cost ~25 MFLOP per 128 px
view and no host synchronisation. (With TF32 matmuls enabled globally they are accurate to
about 1e-3, a quarter of a grey level.)

Differences from the CPU path, by design: every step works in float32 in [0, 1] (clamped after
each step), where PIL rounds to uint8 after each step; contrast blends with the exact mean of
the grayscale image where PIL rounds it to an integer grey level.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .encoder import IMAGE_SIZES
from .views import CROP_RATIO, CROP_SCALE, EVAL_RESIZE, JITTER, MAX_TRANSLATION, hue_jitter

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") in the CPU path
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params


def _uniform(shape: tuple, low: float, high: float, generator, device, dtype=torch.float32):
    return low + (high - low) * torch.rand(shape, generator=generator, device=device, dtype=dtype)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), zero for |x| >= 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int
                     ) -> torch.Tensor:
    """Rows that resize the crop [start, start + length) of an axis of in_size px to out_size px.

    start, length: (B,) integer tensors (pixels). Returns (B, out_size, in_size) float32:
    PIL's antialiased bicubic weights, zero outside the crop, each row summing to 1.
    """
    start = start.to(torch.float32)[:, None, None]
    length = length.to(torch.float32)[:, None, None]
    device = start.device
    scale = length / out_size  # input px per output px
    support_scale = scale.clamp(min=1.0)  # widen the kernel when downscaling (antialias)
    # (B, out, 1) centre of each output pixel, in crop coordinates
    centre = (torch.arange(out_size, device=device, dtype=torch.float32)[None, :, None] + 0.5)
    centre = centre * scale
    # (B, 1, in) pixel index in crop coordinates
    pixel = torch.arange(in_size, device=device, dtype=torch.float32)[None, None, :] - start
    weights = _bicubic((pixel + 0.5 - centre) / support_scale)  # (B, out, in)
    weights = weights * ((pixel >= 0) & (pixel < length))
    return weights / weights.sum(-1, keepdim=True)


def resized_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                 height: torch.Tensor, width: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box (top, left, height, width), each (B,) px, of float images (B, C, H, W) in
    [0, 1], resized to (B, C, size, size) with antialiased bicubic, clamped to [0, 1]."""
    rows = resample_weights(top, height, images.shape[2], size)  # (B, S, H)
    cols = resample_weights(left, width, images.shape[3], size)  # (B, S, W)
    # (B, 1, S, H) @ (B, C, H, W) @ (B, 1, W, S) -> (B, C, S, S)
    return (rows[:, None] @ images.float() @ cols.transpose(1, 2)[:, None]).clamp_(0, 1)


def resize_centre_crop(images: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """torchvision's Resize(resize) (shorter side, bicubic, antialiased) then CenterCrop(size),
    on float images (B, C, H, W) in [0, 1]. An image already size x size with resize == size
    comes back unchanged."""
    batch, _, h, w = images.shape
    # torchvision: the shorter side becomes `resize`, the longer int(resize * long / short)
    new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    if new_h < size or new_w < size:
        raise ValueError(f"resize {resize} is smaller than the crop {size}")
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    zero = torch.zeros(1, dtype=torch.int64, device=images.device)
    rows = resample_weights(zero, zero + h, h, new_h)[:, top:top + size]  # (1, S, H)
    cols = resample_weights(zero, zero + w, w, new_w)[:, left:left + size]  # (1, S, W)
    return (rows[:, None] @ images.float() @ cols.transpose(1, 2)[:, None]).clamp_(0, 1)


def _reflect(index: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices in [-(n-1), 2(n-1)] into [0, n) without repeating the edge (np 'reflect')."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image (B, C, H, W) right by dx and down by dy px ((B,) integers, |d| < size),
    filling by reflection: output pixel (i, j) is input pixel (i - dy, j - dx), reflected."""
    batch, channels, h, w = images.shape
    rows = _reflect(torch.arange(h, device=images.device)[None] - dy[:, None], h)  # (B, H)
    cols = _reflect(torch.arange(w, device=images.device)[None] - dx[:, None], w)  # (B, W)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(batch, 1, h * w)
    # (B, C, H*W) gathered at the same (B, 1, H*W) source positions in every channel
    return images.flatten(2).gather(2, index.expand(-1, channels, -1)).view(batch, channels, h, w)


def sample_crop_boxes(batch: int, height: int, width: int, generator=None, device=None,
                      scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO
                      ) -> tuple[torch.Tensor, ...]:
    """torchvision's RandomResizedCrop.get_params for `batch` images of height x width, drawn
    at once: up to 10 tries of (area, log-uniform aspect), the first that fits wins, else the
    centre-crop fallback. Returns (top, left, crop_height, crop_width), each (B,) int64."""
    area = height * width
    target = area * _uniform((batch, CROP_TRIES), *scale, generator, device, torch.float64)
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64)).tolist()
    aspect = torch.exp(_uniform((batch, CROP_TRIES), *log_ratio, generator, device, torch.float64))
    w = torch.round(torch.sqrt(target * aspect)).long()  # (B, tries)
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    tries = torch.arange(CROP_TRIES, device=fits.device)
    # the first try that fits (the last if none: then the fallback below is used)
    first = torch.where(fits, tries, CROP_TRIES - 1).amin(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    # fallback: the whole image, cut to the nearest allowed aspect ratio, centred
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    # uniform integer offsets in [0, H - h] and [0, W - w], as torch.randint
    offsets = torch.rand((2, batch), generator=generator, device=device, dtype=torch.float64)
    top = torch.minimum((offsets[0] * (height - h + 1)).long(), height - h)
    left = torch.minimum((offsets[1] * (width - w + 1)).long(), width - w)
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    return top, left, h, w


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each image (B, 3, H, W) in [0, 1] by hue (B,) turns: torchvision's
    RGB -> HSV -> RGB round trip, fused. A hue shift keeps each pixel's max and min channel
    (value and chroma), so only the hue is computed and the channels rebuilt from it."""
    r, g, b = images.unbind(1)  # each (B, H, W)
    maxc, minc = images.amax(1), images.amin(1)
    chroma = maxc - minc
    divisor = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey: hue 0
    # hue in sixths of a turn, from whichever channel is the max (torchvision's _rgb2hsv)
    sixths = torch.where(maxc == r, (g - b) / divisor,
                         torch.where(maxc == g, 2.0 + (b - r) / divisor, 4.0 + (r - g) / divisor))
    h = torch.fmod(sixths / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + hue.view(-1, 1, 1), 1.0)  # (B, H, W) in [0, 1)
    # HSV -> RGB: channel n of (R, G, B) is max - chroma * clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 h) mod 6 with n = 5, 3, 1
    # 5, 3, 1 made on the device: a host -> device copy would synchronise the stream
    n = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = n + 6.0 * h[:, None]  # (B, 3, H, W) in [1, 11)
    k = torch.where(k >= 6.0, k - 6.0, k)
    return maxc[:, None] - chroma[:, None] * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def _where_apply(mask: torch.Tensor, function, x: torch.Tensor, *args: torch.Tensor,
                 subset: bool | None = None) -> torch.Tensor:
    """function(x, *args) for the images where mask (B,) is True, x elsewhere. With subset
    (the default on CPU, where a host sync is free) only the selected images are computed;
    otherwise the whole batch is, and torch.where keeps the selected ones: no device sync."""
    if subset is None:
        subset = x.device.type == "cpu"
    if not subset:
        return torch.where(mask.view(-1, 1, 1, 1), function(x, *args), x)
    index = mask.nonzero()[:, 0]
    return x.index_copy(0, index, function(x[index], *(a[index] for a in args)))


def colour_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue: torch.Tensor, order: torch.Tensor,
                  subset: bool | None = None) -> torch.Tensor:
    """torchvision's ColorJitter with per-image factors, on float images (B, 3, H, W) in [0, 1].

    brightness, contrast, saturation: (B,) blend factors; hue: (B,) shift in turns;
    order: (B, 4) a permutation of 0..3 per image (0 brightness, 1 contrast, 2 saturation,
    3 hue), as ColorJitter's fn_idx. Brightness blends with black, contrast with the mean of
    the grayscale image, saturation with the grayscale image; clamped to [0, 1] after each.
    subset: see _where_apply (the result is the same either way).
    """
    x = images.float()
    for step in range(4):
        op = order[:, step].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        # one blend serves the three blending ops; images whose op is hue get factor 1 (x kept)
        factor = torch.where(op == 0, brightness.view(-1, 1, 1, 1),
                             torch.where(op == 1, contrast.view(-1, 1, 1, 1),
                                         torch.where(op == 2, saturation.view(-1, 1, 1, 1), 1.0)))
        gray = grayscale(x)  # (B, 1, H, W)
        degenerate = ((op == 2) * gray  # saturation: the grayscale image
                      + (op == 1) * gray.mean((1, 2, 3), keepdim=True))  # contrast: its mean
        x = (factor * x + (1.0 - factor) * degenerate).clamp(0, 1)  # brightness: black (0)
        x = _where_apply(op.view(-1) == 3, adjust_hue, x, hue, subset=subset)
    return x


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != 3:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got {got}; convert "
                         "RGB images with torch.from_numpy(array).permute(0, 3, 1, 2)")


class BatchViews:
    """uint8 images (B, 3, H, W) on any device -> (view1, view2), each float32 (B, 3, S, S)
    normalised, with per-image random parameters drawn from `generator` (a torch.Generator on
    the images' device; the device's default generator when None).

    The probabilities are arguments only so that tests can isolate one augmentation; the
    defaults are the paper's (views.py).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 flip_p: float = 0.5, translate_p: float = 0.8, jitter_p: float = 0.8,
                 grayscale_p: float = 0.25):
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size {image_size} has no AMDIM encoder; use one of "
                             f"{IMAGE_SIZES}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (RGB), std > 0; got {mean}, {std}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.hue = hue_jitter(image_size)  # max hue shift, turns
        self.flip_p, self.translate_p = flip_p, translate_p
        self.jitter_p, self.grayscale_p = jitter_p, grayscale_p

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_images(images)
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on "
                             f"{images.device}; pass torch.Generator(device=images.device)")
        flip = torch.rand(len(images), generator=generator, device=images.device) < self.flip_p
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return self.view(images, generator), self.view(images, generator)

    def view(self, images: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """One independent random view (no flip) of uint8 images (B, 3, H, W)."""
        batch, device, size = len(images), images.device, self.image_size
        if size == 32:
            x = images.float() / 255
            if x.shape[2:] != (32, 32):  # views.Fit: shorter side to 32, centre crop
                x = resize_centre_crop(x, 32, 32)
            shift = torch.randint(-MAX_TRANSLATION, MAX_TRANSLATION + 1, (2, batch),
                                  generator=generator, device=device)
            shift *= torch.rand(batch, generator=generator, device=device) < self.translate_p
            x = translate(x, shift[0], shift[1])
        else:
            boxes = sample_crop_boxes(batch, images.shape[2], images.shape[3], generator, device)
            x = resized_crop(images.float() / 255, *boxes, size)
        jitter = torch.rand(batch, generator=generator, device=device) < self.jitter_p
        factors = _uniform((3, batch), 1 - JITTER, 1 + JITTER, generator, device)
        hue = _uniform((batch,), -self.hue, self.hue, generator, device)
        order = torch.rand((batch, 4), generator=generator, device=device).argsort(1)
        if self.jitter_p > 0:  # (the draws above keep the random stream the same either way)
            x = _where_apply(jitter, colour_jitter, x, *factors, hue, order)
        gray = torch.rand(batch, generator=generator, device=device) < self.grayscale_p
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        return normalise(x, self.mean, self.std)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (x - mean) / std per channel."""
    # per-channel scale and shift made on the device: torch.tensor(mean, device=...) would copy
    # from the host and synchronise the stream, stalling the queue of training kernels
    channel = torch.arange(3, device=images.device).view(1, 3, 1, 1)
    pick = lambda values: torch.where(channel == 0, values[0],  # noqa: E731
                                      torch.where(channel == 1, values[1], values[2]))
    return (images - pick(mean)) / pick(std)


class BatchEvaluation:
    """The deterministic evaluation transform of views.evaluation_transform on a batch:
    uint8 (B, 3, H, W) -> float32 (B, 3, S, S) normalised. 32 px: as is (views.Fit if not
    32 x 32); 64 px: resize 70 + centre crop 64; 128 px: resize 146 + centre crop 128."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        if image_size not in IMAGE_SIZES:
            raise ValueError(f"image_size {image_size} has no AMDIM encoder; use one of "
                             f"{IMAGE_SIZES}")
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images)
        x = images.float() / 255
        if not (self.image_size == 32 and x.shape[2:] == (32, 32)):
            x = resize_centre_crop(x, EVAL_RESIZE[self.image_size], self.image_size)
        return normalise(x, self.mean, self.std)
