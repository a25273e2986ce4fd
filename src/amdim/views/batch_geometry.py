"""Geometry of batched views on the images' device: resampling (crop and resize) as separable
linear maps with per-image weights, torchvision's random-resized-crop boxes drawn for a whole
batch at once, and translation with reflection. Used by batch_views.BatchViews; see its
docstring for why each is built this way (a fixed number of kernels a batch on a GPU).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .image_views import CROP_RATIO, CROP_SCALE

CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params


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


def centre_crop_weights(height: int, width: int, resize: int, size: int, device=None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's Resize(resize) (shorter side, bicubic, antialiased) then CenterCrop(size)
    of height x width images, as weights (rows (S, H), cols (S, W)): out = rows @ x @ cols^T."""
    h, w = height, width
    # torchvision: the shorter side becomes `resize`, the longer int(resize * long / short)
    new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    if new_h < size or new_w < size:
        raise ValueError(f"resize {resize} is smaller than the crop {size}")
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    rows = resample_weights(zero, zero + h, h, new_h)[0, top:top + size]  # (S, H)
    cols = resample_weights(zero, zero + w, w, new_w)[0, left:left + size]  # (S, W)
    return rows, cols


def resize_centre_crop(images: torch.Tensor, resize: int, size: int) -> torch.Tensor:
    """torchvision's Resize(resize) (shorter side, bicubic, antialiased) then CenterCrop(size),
    on float images (B, C, H, W) in [0, 1]. An image already size x size with resize == size
    comes back unchanged."""
    rows, cols = centre_crop_weights(*images.shape[2:], resize, size, images.device)
    # (S, H) @ (B, C, H, W) @ (W, S) -> (B, C, S, S)
    return (rows @ images.float() @ cols.T).clamp_(0, 1)


def crop_windows(in_size: int, size: int, device) -> torch.Tensor:
    """The resampling weights of every crop box on an axis of up to in_size px, made once:
    (length, window, S, in_size), where the weights of box (start, length) are at
    [length, in_size - start]. (L + 1) * S * 2L floats: 26 MB for 160 px images at 128 px."""
    lengths = torch.arange(1, in_size + 1, device=device)
    weights = resample_weights(torch.zeros_like(lengths), lengths, in_size, size)  # (L, S, L)
    # (length 0..L, S, offset -L..L-1): the box's weights at offset i - start, zero left of it
    table = torch.zeros(in_size + 1, size, 2 * in_size, device=device)
    table[1:, :, in_size:] = weights
    # (length, S, window w, L) -> (length, w, S, L): window w is offsets w - L .. w - 1, a view
    return table.unfold(2, in_size, 1).permute(0, 2, 1, 3)


def crop_constants(height: int, width: int, scale: Sequence[float] = CROP_SCALE,
                    ratio: Sequence[float] = CROP_RATIO) -> dict[str, torch.Tensor]:
    """torchvision's RandomResizedCrop.get_params for height x width images, as tensors."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    # the fallback when no try fits: the whole image, cut to the nearest allowed ratio, centred
    if width / height < min(ratio):
        fallback = (int(round(width / min(ratio))), width)
    elif width / height > max(ratio):
        fallback = (height, int(round(height * max(ratio))))
    else:
        fallback = (height, width)
    # (2, 1) columns against tries (..., 2, T); (2,) against boxes (..., 2)
    return {"try_low": torch.tensor([[area * scale[0]], [log_ratio[0]]]),
            "try_span": torch.tensor([[area * (scale[1] - scale[0])],
                                      [log_ratio[1] - log_ratio[0]]]),
            "signs": torch.tensor([[-1.0], [1.0]]),  # height divides by the ratio, width times
            "limits": torch.tensor([[height], [width]], dtype=torch.float32),
            "limits_plus_one": torch.tensor([height + 1.0, width + 1.0]),
            "fallback_size": torch.tensor(fallback, dtype=torch.float32),
            "fallback_start": torch.tensor([(height - fallback[0]) // 2,
                                            (width - fallback[1]) // 2], dtype=torch.float32)}


def image_crop_constants(sizes: torch.Tensor, scale: Sequence[float] = CROP_SCALE,
                         ratio: Sequence[float] = CROP_RATIO) -> dict[str, torch.Tensor]:
    """crop_constants for a batch of images of their own sizes, sizes (B, 2) (height, width)
    on the images' device: the same tensors with a leading batch dimension (but "signs", the
    same for all: take crop_constants'), so crop_boxes draws each image's box within its own
    bounds (images of a padded canvas, top left). Made on the device from sizes alone: no
    host copy, no sync."""
    hw = sizes.float()
    area, aspect = hw[:, 0] * hw[:, 1], hw[:, 1] / hw[:, 0]
    low, high = min(ratio), max(ratio)
    # the fallback: the whole image, cut to the nearest allowed ratio (round half to even,
    # as Python's round in crop_constants)
    fallback = torch.stack([torch.where(aspect < low, torch.round(hw[:, 1] / low), hw[:, 0]),
                            torch.where(aspect > high, torch.round(hw[:, 0] * high), hw[:, 1])], 1)
    log_ratio = torch.full_like(area, math.log(low))
    span = torch.full_like(area, math.log(high) - math.log(low))
    return {"try_low": torch.stack([area * scale[0], log_ratio], 1)[..., None],
            "try_span": torch.stack([area * (scale[1] - scale[0]), span], 1)[..., None],
            "limits": hw[..., None], "limits_plus_one": hw + 1,
            "fallback_size": fallback, "fallback_start": torch.floor((hw - fallback) / 2)}


def image_fit_weights(sizes: torch.Tensor, canvas: tuple[int, int], size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, S, H) and columns (B, S, W) that fit each image of a padded canvas (sizes
    (B, 2), top left) to size x size: its centred square, resized (views.Fit, to within half a
    pixel of its Resize-then-CenterCrop)."""
    short = sizes.min(1).values
    starts = torch.div(sizes - short[:, None], 2, rounding_mode="floor")
    return (resample_weights(starts[:, 0], short, canvas[0], size),
            resample_weights(starts[:, 1], short, canvas[1], size))


def flip_within(images: torch.Tensor, widths: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the images (B, C, H, W) of a padded canvas left to right within their own widths
    (B,) where flip (B,) is true: column j reads column width - 1 - j; the padding stays."""
    columns = torch.arange(images.shape[3], device=images.device)
    mirrored = widths[:, None] - 1 - columns
    source = torch.where(flip[:, None] & (mirrored >= 0), mirrored, columns)  # (B, W)
    index = source.view(len(images), 1, 1, -1).expand(-1, *images.shape[1:3], -1)
    return images.gather(3, index)


def crop_boxes(tries: torch.Tensor, offsets: torch.Tensor, const: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes from uniform numbers: tries (..., 2, T) for the area and log aspect ratio of
    each try, offsets (..., 2) for the position. The first try that fits wins, else the
    fallback. Returns sizes (..., 2) (height, width) and starts (..., 2) (top, left), float
    integers."""
    drawn = torch.addcmul(const["try_low"], tries, const["try_span"])  # area, log ratio
    # (height, width) = (sqrt(area / ratio), sqrt(area * ratio)), rounded as torchvision
    sizes = torch.sqrt(drawn[..., :1, :] * torch.exp(drawn[..., 1:, :] * const["signs"])).round()
    # (torchvision also asks for sizes > 0: true from 2 x 2 px, as area >= 0.3 * 4 px)
    found, first = (sizes <= const["limits"]).all(-2).max(-1, keepdim=True)  # (..., 1)
    chosen = sizes.gather(-1, first.unsqueeze(-2).expand(*first.shape[:-1], 2, 1)).squeeze(-1)
    size = torch.where(found, chosen, const["fallback_size"])
    # a uniform integer in [0, limit - size], as torch.randint: floor(u * (limit + 1 - size)),
    # one rounding, stays below limit + 1 - size in float32 for u < 1
    start = torch.floor(offsets * (const["limits_plus_one"] - size))
    start = torch.where(found, start, const["fallback_start"])
    return size, start


def sample_crop_boxes(batch: int, height: int, width: int, generator=None, device=None,
                      scale: Sequence[float] = CROP_SCALE, ratio: Sequence[float] = CROP_RATIO
                      ) -> tuple[torch.Tensor, ...]:
    """torchvision's RandomResizedCrop.get_params for `batch` images of height x width, drawn
    at once: up to 10 tries of (area, log-uniform aspect), the first that fits wins, else the
    centre-crop fallback. Returns (top, left, crop_height, crop_width), each (B,) int64."""
    device = torch.device("cpu") if device is None else device
    const = {k: v.to(device) for k, v in crop_constants(height, width, scale, ratio).items()}
    u = torch.rand((batch, 2 * CROP_TRIES + 2), generator=generator, device=device)
    sizes, starts = crop_boxes(u[:, :-2].unflatten(1, (2, CROP_TRIES)), u[:, -2:], const)
    return starts[:, 0].long(), starts[:, 1].long(), sizes[:, 0].long(), sizes[:, 1].long()


def reflected(index: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect indices in [-(n-1), 2(n-1)] into [0, n) without repeating the edge (np 'reflect')."""
    return (n - 1) - ((n - 1) - index.abs()).abs()


def translate(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Shift each image (B, C, H, W) right by dx and down by dy px ((B,) integers, |d| < size),
    filling by reflection: output pixel (i, j) is input pixel (i - dy, j - dx), reflected."""
    batch, channels, h, w = images.shape
    rows = reflected(torch.arange(h, device=images.device)[None] - dy[:, None], h)  # (B, H)
    cols = reflected(torch.arange(w, device=images.device)[None] - dx[:, None], w)  # (B, W)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(batch, 1, h * w)
    # (B, C, H*W) gathered at the same (B, 1, H*W) source positions in every channel
    return images.flatten(2).gather(2, index.expand(-1, channels, -1)).view(batch, channels, h, w)
