"""Colour on a batch of images on their device, for batch_views: grayscale, and the colour
jitter of views.image_views (brightness, contrast, saturation, hue in a random order per image)
as a few batched steps.

Brightness, contrast and saturation are each a per-image 3x3 colour matrix (contrast adds its
image's mean), so one baddbmm applies whichever op each image has at a step. The hue sits once
in every image's order of four: three blending steps can come before it and three after, so
the jitter is 3 blend steps, one hue step, 3 blend steps, an image's ops placed around its hue
and the unused steps identity: 7 steps for all orders, where applying every op at every
position takes 16.
"""
from __future__ import annotations

import torch

from .image_views import LUMA


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def colour_constants(input_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The fixed tensors of the colour steps; the first blend step also multiplies its input
    by input_scale (1/255 takes uint8 values to [0, 1])."""
    eye, gray = torch.eye(3), torch.tensor(LUMA).expand(3, 3)  # gray @ rgb: luma in each channel
    zero = torch.zeros(3, 3)
    # per blending op (brightness, contrast, saturation): the change of (A, B) per unit of
    # gain (factor - 1), where a blend step maps x to A x + B mean(x)
    basis = torch.stack([torch.stack([eye, zero]), torch.stack([eye, -gray]),
                         torch.stack([eye - gray, zero])]).view(3, 18)
    slot_scale = torch.tensor([input_scale] + [1.0] * 6)[:, None]  # (7, 1)
    identity = (torch.stack([eye, zero]).view(1, 18) * slot_scale)  # (7, 18)
    # the rows of (g - b, b - r, r - g): the hue's offset within the sextant of each max channel
    diff = torch.tensor([[0.0, 1, -1], [-1, 0, 1], [1, -1, 0]])
    return {"basis": basis, "identity": identity, "slot_scale": slot_scale,
            "slots": torch.arange(7)[:, None] - 3, "diff": diff, "four": torch.tensor([4.0]),
            "hue_channels": torch.tensor([[5.0], [3.0], [1.0]])}


def colour_matrices(gains: torch.Tensor, rank: torch.Tensor, const: dict[str, torch.Tensor]
                     ) -> torch.Tensor:
    """gains (N, 3): factor - 1 of brightness, contrast, saturation (0: no change); rank (N, 4):
    the position of each of (brightness, contrast, saturation, hue) in the image's order.
    Returns (N, 7, 2, 3, 3): for each of the 7 steps the matrices (A, B) of x -> A x + B mean(x);
    step 3 is the hue's, and each blending op goes to step 3 + its position relative to it."""
    chosen = (rank[:, None, :3] - rank[:, None, 3:]) == const["slots"]  # (N, 7, 3): step holds op
    delta = (chosen * gains[:, None, :]) @ const["basis"]  # (N, 7, 3) @ (3, 18) -> (N, 7, 18)
    return torch.addcmul(const["identity"], delta, const["slot_scale"]).view(-1, 7, 2, 3, 3)


def hue_step(x: torch.Tensor, offsets: torch.Tensor, const: dict[str, torch.Tensor],
              out: torch.Tensor) -> torch.Tensor:
    """torchvision's RGB -> HSV -> hue shift -> RGB, fused, on x (N, 3, P) in [0, 1], into out
    (x is overwritten); offsets (N, 3, 1): (5, 3, 1) + 6 * the shift in turns. A hue shift
    keeps each pixel's max and min channel (value and chroma), so only the hue is computed and
    the channels rebuilt from it."""
    maxc, argmax = x.max(1, keepdim=True)  # (N, 1, P); the first max on ties, as torchvision
    minc = x.amin(1, keepdim=True)
    chroma = torch.sub(maxc, minc, out=minc).clamp_(min=torch.finfo(x.dtype).tiny)
    # (g - b, b - r, r - g) at the max channel: the hue's offset in that channel's sextant
    offset = torch.bmm(const["diff"].expand(len(x), 3, 3), x, out=out).gather(1, argmax)
    # channel n of (R, G, B) is max - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6
    # and 6 h = 2 argmax + offset / chroma (grey pixels: 0 / tiny, hue 0)
    k = torch.add(offsets, argmax, alpha=2, out=x).addcdiv_(offset, chroma).remainder_(6)
    weight = torch.minimum(k, torch.sub(const["four"], k, out=out), out=out).clamp_(0, 1)
    return torch.addcmul(maxc, chroma, weight, value=-1, out=out)


def colour_steps(x: torch.Tensor, matrices: torch.Tensor, hue_offsets: torch.Tensor,
                  const: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 7 jitter steps on x (N, 3, P), which they overwrite: blend steps clamp
    A x + B mean(x) to [0, 1]; step 3 is the hue."""
    # two buffers serve all steps, x and the first step's output: on the CPU a fresh large
    # buffer per step costs more than the step (page faults)
    spare = None
    for step in range(7):
        if step == 3:
            out = hue_step(x, hue_offsets, const, out=spare)
        else:
            a, b = matrices[:, step].unbind(1)  # (N, 3, 3) each
            out = torch.baddbmm(torch.bmm(b, x.mean(2, keepdim=True)), a, x, out=spare)
            out.clamp_(0, 1)
        x, spare = out, x
    return x


def colour_jitter(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor, hue: torch.Tensor, order: torch.Tensor,
                  subset: bool | None = None) -> torch.Tensor:
    """torchvision's ColorJitter with per-image factors, on float images (B, 3, H, W) in [0, 1].

    brightness, contrast, saturation: (B,) blend factors; hue: (B,) shift in turns;
    order: (B, 4) a permutation of 0..3 per image (0 brightness, 1 contrast, 2 saturation,
    3 hue), as ColorJitter's fn_idx. Brightness blends with black, contrast with the mean of
    the grayscale image, saturation with the grayscale image; clamped to [0, 1] after each.
    subset: no longer used (every image is computed, with no device sync, on every device).
    """
    const = {k: v.to(images.device) for k, v in colour_constants().items()}
    gains = torch.stack([brightness, contrast, saturation], 1) - 1
    matrices = colour_matrices(gains, order.argsort(1), const)
    hue_offsets = torch.add(const["hue_channels"], hue.view(-1, 1, 1), alpha=6)
    x = colour_steps(images.flatten(2).to(torch.float32, copy=True), matrices, hue_offsets,
                      const)
    return x.view(images.shape)
