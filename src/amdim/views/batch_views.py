"""Two augmented views of a whole batch of uint8 images, built with batched tensor ops on the
images' device: the on-GPU counterpart of views.TwoViews, and the deterministic evaluation
transform on tensors.

The augmentations and probabilities are those of image_views.py: one horizontal flip shared by both
views (p=0.5); then per view, independently and with per-image random parameters: 32 px:
translation by an integer in [-4, 4] on each axis with reflection padding (p=0.8); 64/128 px:
random resized crop (scale 0.3-1, ratio 0.7-1.4, torchvision's 10 tries and centre-crop
fallback); colour jitter 0.4/0.4/0.4/hue 0.2 (0.1 at 128 px) in a random order per image
(p=0.8); grayscale (p=0.25); normalisation.

On a GPU these batches are small and the work is launch-bound, so a batch costs a fixed number
of kernels (65 at 32 px, 77 at 64 and 128 px, where it was 590 and 812;
tests/views/test_batch_views.py counts them), none of which waits for the host:
- every random number of the batch comes from one torch.rand on the device; constants are
  made on the device once per BatchViews;
- resampling (crop and resize) is a separable linear map, out = Wy @ x @ Wx^T, two batched
  matmuls with per-image weights. The weights are PIL's antialiased bicubic filter (a = -0.5,
  support widened by the downscale factor, zero outside the crop box, normalised per output
  pixel), what the CPU path applies (PIL) and torchvision's tensor resize with antialias=True.
  They depend on the box's length alone, shifted by its start, so each box's are read from a
  table made once (one gather per axis). grid_sample's bicubic uses a = -0.75 and aliases
  when downscaling; per-box interpolate costs one launch per image. On a CPU, where a launch
  costs nothing and the dense matrices cost the whole image's area, each box is resized alone
  by that interpolate (the same weights; tested equal);
- the colour jitter is 7 batched colour-matrix and hue steps for every order of its four ops
  (batch_colour);
- grayscale and normalisation are one more colour matrix.
With TF32 matmuls enabled globally the resampling and the colour matrices are accurate to
about 1e-3, a quarter of a grey level.

Differences from the CPU path, by design: every step works in float32 (clamped after each
step), where PIL rounds to uint8 after each step; contrast blends with the exact mean of the
grayscale image where PIL rounds it to an integer grey level.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..config import IMAGE_SIZES
from .augment import LIGHTING_STD, PCA_EIGVAL, PCA_EIGVEC
from .batch_geometry import (CROP_TRIES, centre_crop_weights, crop_boxes,  # noqa: F401 (API)
                             crop_constants, crop_windows, flip_within, image_crop_constants,
                             image_fit_weights, reflected, resize_centre_crop, resized_crop,
                             sample_crop_boxes, translate)
from .batch_colour import (colour_constants, colour_jitter,  # noqa: F401 (API: colour_jitter)
                           colour_matrices, colour_steps, grayscale)
from .batch_policy import BatchFastAutoAugment
from .image_views import (CROP_RATIO, CROP_SCALE, EVAL_RESIZE, JITTER, LUMA,  # noqa: F401
                          MAX_TRANSLATION, crop_scale, hue_jitter)

# columns of the batch's random draw (copies, B, COLUMNS): flags compared with their
# probabilities, jitter gains and hue, keys of the jitter order, then the geometry
FLAGS, GAINS, ORDER, GEOMETRY = slice(0, 4), slice(4, 8), slice(8, 12), 12
COLUMNS = GEOMETRY + 2 * CROP_TRIES + 2
KEEP_SHAPES = 8  # image (canvas) shapes whose constants are kept: the most recent


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
    the images' device; the device's default generator when None). channels_last: the views
    come in that memory format, as a channels-last model wants them (no copy per step).

    The probabilities are arguments only so that tests can isolate one augmentation; the
    defaults are the paper's (image_views.py). augment: paper, or imagenet-faa (image_views.py's: crop
    scale 0.2-0.9, the Fast AutoAugment ImageNet policy after the crop, grouped by operation
    in batch_policy, and PCA lighting folded into the normalisation); seed: of the policy's
    host draws.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], *,
                 flip_p: float = 0.5, translate_p: float = 0.8, jitter_p: float = 0.8,
                 grayscale_p: float = 0.25, channels_last: bool = False,
                 augment: str = "paper", seed: int = 0):
        if augment not in ("paper", "imagenet-faa"):
            raise ValueError(f"the device data path builds the views paper and imagenet-faa; "
                             f"--augment {augment} runs on the loader path (--data-path loader)")
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
        self.channels_last = channels_last
        self.augment, self.crop_scale = augment, crop_scale(augment)
        self.policy = None
        if augment == "imagenet-faa":
            self.policy = BatchFastAutoAugment(seed=seed)
        self._constants: dict[tuple, dict[str, torch.Tensor]] = {}  # per (device, H, W)
        self._windows: dict[tuple, torch.Tensor] = {}  # per (device, longer side)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sizes: for images of different sizes, padded into one canvas at its top left
        (data.jpeg_batches), each image's (height, width), int (B, 2) on the images' device;
        None: every image fills the canvas."""
        views = self._views(images, generator, copies=2, flip=True, sizes=sizes)  # (2, B, ...)
        return views[0], views[1]

    def view(self, images: torch.Tensor, generator: torch.Generator | None = None,
             sizes: torch.Tensor | None = None) -> torch.Tensor:
        """One independent random view (no flip) of uint8 images (B, 3, H, W)."""
        return self._views(images, generator, copies=1, flip=False, sizes=sizes)[0]

    def _views(self, images: torch.Tensor, generator: torch.Generator | None, copies: int,
               flip: bool, sizes: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(images)
        if generator is not None and generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on "
                             f"{images.device}; pass torch.Generator(device=images.device)")
        if sizes is not None and (sizes.shape != (len(images), 2)
                                  or sizes.device != images.device):
            raise ValueError(f"sizes must be (B, 2) on {images.device}, one (height, width) per "
                             f"image; got {tuple(sizes.shape)} on {sizes.device}")
        batch, n, size = len(images), copies * len(images), self.image_size
        const = self._constants_for(images)
        # every random number of the batch in one draw, (copies, B, COLUMNS)
        u = torch.rand((copies, batch, COLUMNS), generator=generator, device=images.device)
        flags = u[..., FLAGS] < const["probabilities"]  # flip, translate, jitter, grayscale
        if flip and sizes is not None:  # one flip per image, shared by its views
            images = flip_within(images, sizes[:, 1], flags[0, :, 0])
        elif flip:  # the first view's draw
            images = torch.where(flags[0, :, 0].view(-1, 1, 1, 1), images.flip(-1), images)
        with torch.autocast(images.device.type, enabled=False):  # float32 matmuls
            if size == 32:
                x = self._translated(images, u, flags, const, sizes)
            else:
                if sizes is not None:  # each image's boxes within its own bounds
                    const = {**const, **image_crop_constants(sizes, self.crop_scale)}
                x = self._cropped(images, u, const)
            if self.policy is not None:  # (N, 3, S*S) in 0..255, as uint8 values
                # its host draws follow the generator's seed, a host value (no sync)
                seed = None if generator is None else generator.initial_seed()
                x = self.policy(x.view(n, 3, size, size), seed).view(n, 3, size * size)
            x = self._jittered(x, u, flags, const)  # (N, 3, S*S) in [0, 1]
            # grayscale and normalisation: one colour matrix per image
            matrix = torch.where(flags[..., 3].view(n, 1, 1), const["gray_normalise"],
                                 const["normalise"])  # (N, 3, 3)
            offset = const["offset"]  # (3, 1)
            if self.policy is not None:  # PCA lighting: eigvec @ (alpha * eigval) / std
                alpha = torch.randn((n, 3), generator=generator, device=images.device)
                offset = offset + (alpha @ const["lighting"]).unsqueeze(2)  # (N, 3, 1)
            if self.channels_last:  # (N, S*S, 3): the channels-last layout of (N, 3, S, S)
                out = torch.baddbmm(offset.mT, x.transpose(1, 2), matrix.mT)
                return out.view(copies, batch, size, size, 3).permute(0, 1, 4, 2, 3)
            out = torch.baddbmm(offset, matrix, x)
            return out.view(copies, batch, 3, size, size)

    def _translated(self, images: torch.Tensor, u: torch.Tensor, flags: torch.Tensor,
                    const: dict[str, torch.Tensor], sizes: torch.Tensor | None) -> torch.Tensor:
        """32 px: (copies, B, ...) random draws -> translated views (N, 3, 1024) in 0..255."""
        copies, batch = u.shape[:2]
        if sizes is not None:  # each image's centred square to 32 x 32
            rows, cols = image_fit_weights(sizes, images.shape[2:], 32)
            images = (rows[:, None] @ images.float() @ cols.transpose(1, 2)[:, None]).clamp_(0, 255)
        elif images.shape[2:] != (32, 32):  # views.Fit: shorter side to 32, centre crop
            images = (const["fit_rows"] @ images.float() @ const["fit_cols"].T).clamp_(0, 255)
        # integer shifts (dy, dx) in [-4, 4], 0 where the view is not translated: (copies, B, 2)
        shift = torch.floor(torch.addcmul(const["shift_low"], u[..., GEOMETRY:GEOMETRY + 2],
                                          const["shift_span"])) * flags[..., 1:2]
        # output (i, j) reads input (i - dy, j - dx), reflected: (copies, B, 2, 32) rows, columns
        source = reflected(const["pixels"] - shift[..., None], 32)
        index = torch.add(source[..., 1, None, :], source[..., 0, :, None], alpha=32).long()
        index = index.view(copies, batch, 1, 1024).expand(-1, -1, 3, -1)
        # (copies, B, 3, 1024) gathered from the same images for every copy
        x = images.flatten(2).expand(copies, -1, -1, -1).gather(3, index)
        return x.view(copies * batch, 3, 1024).float()

    def _cropped(self, images: torch.Tensor, u: torch.Tensor, const: dict[str, torch.Tensor],
                 one_by_one: bool | None = None) -> torch.Tensor:
        """64/128 px: random resized crops (N, 3, S*S) in [0, 255]."""
        copies, batch = u.shape[:2]
        n, height, width, size = copies * batch, *images.shape[2:], self.image_size
        tries = u[..., GEOMETRY:COLUMNS - 2].unflatten(-1, (2, CROP_TRIES))  # area, ratio
        sizes, starts = crop_boxes(tries, u[..., COLUMNS - 2:], const)  # (copies, B, 2) each
        if images.device.type == "cpu" if one_by_one is None else one_by_one:
            return _cropped_one_by_one(images, sizes, starts, size)
        # each box's (S, L) weights, gathered from the table by (length, window): for the
        # rows one copy per channel, as the batched matmul wants them
        # the batched matmuls' weight table, made at their first batch (a CPU never needs it)
        table = self._windows_for(max(height, width), images.device)
        lengths, windows = sizes.long(), (max(height, width) - starts).long()
        cols = table[lengths[..., 1], windows[..., 1]]  # (copies, B, S, L)
        cols = cols[..., :width].reshape(n, size, width)
        rows = table[lengths[..., 0, None].expand(-1, -1, 3),
                     windows[..., 0, None].expand(-1, -1, 3)]  # (copies, B, 3, S, L)
        rows = rows[..., :height].reshape(3 * n, size, height)
        pixels = images.expand(copies, -1, -1, -1, -1).float()  # (copies, B, 3, H, W)
        # (N, 3H, W) @ (N, W, S) -> (N * 3, H, S); (N * 3, S, H) @ (N * 3, H, S) -> (N * 3, S, S)
        x = torch.bmm(pixels.reshape(n, 3 * height, width), cols.transpose(1, 2))
        x = torch.bmm(rows, x.view(3 * n, height, size))
        return x.view(n, 3, size * size).clamp_(0, 255)  # bicubic overshoot, as PIL's uint8

    def _jittered(self, x: torch.Tensor, u: torch.Tensor, flags: torch.Tensor,
                  const: dict[str, torch.Tensor]) -> torch.Tensor:
        """Colour jitter (p=jitter_p) on x (N, 3, P) in 0..255 -> [0, 1]."""
        n = len(x)
        # gains (factor - 1) of brightness, contrast, saturation and the hue shift (turns):
        # all 0, the identity, where the view is not jittered. (N, 4)
        gains = (torch.addcmul(const["jitter_low"], u[..., GAINS], const["jitter_span"])
                 * flags[..., 2:3]).view(n, 4)
        # the position of each op in a uniformly random order (a random permutation's inverse
        # is one too)
        rank = u[..., ORDER].argsort(-1).view(n, 4)
        matrices = colour_matrices(gains[:, :3], rank, const)
        hue_offsets = torch.add(const["hue_channels"], gains[:, 3].view(n, 1, 1), alpha=6)
        return colour_steps(x, matrices, hue_offsets, const)

    def _constants_for(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fixed tensors for images like these, made on their device at the first batch
        (a non-blocking copy or device ops: no host sync) and kept."""
        key = (images.device, *images.shape[2:])
        if key not in self._constants:
            height, width = images.shape[2:]
            std = torch.tensor(self.std)
            const = {"probabilities": torch.tensor([self.flip_p, self.translate_p,
                                                    self.jitter_p, self.grayscale_p]),
                     "jitter_low": torch.tensor([-JITTER] * 3 + [-self.hue]),
                     "jitter_span": torch.tensor([2 * JITTER] * 3 + [2 * self.hue]),
                     "normalise": torch.eye(3) / std[:, None],
                     "gray_normalise": torch.tensor(LUMA).expand(3, 3) / std[:, None],
                     "offset": (-torch.tensor(self.mean) / std)[:, None],  # (3, 1)
                     # alpha (N, 3) @ this -> each image's lighting shift, normalised
                     "lighting": (LIGHTING_STD * torch.tensor(PCA_EIGVAL)[:, None]
                                  * torch.tensor(PCA_EIGVEC).T / std),
                     **colour_constants(1 / 255)}
            if self.image_size == 32:
                const.update(shift_low=torch.tensor([-float(MAX_TRANSLATION)]),
                             shift_span=torch.tensor([2.0 * MAX_TRANSLATION + 1]),
                             pixels=torch.arange(32, dtype=torch.float32))
            else:
                const.update(crop_constants(height, width, self.crop_scale))
            const = {k: v.to(images.device, non_blocking=True) for k, v in const.items()}
            if self.image_size == 32 and (height, width) != (32, 32):
                const["fit_rows"], const["fit_cols"] = centre_crop_weights(
                    height, width, 32, 32, images.device)
            if len(self._constants) >= KEEP_SHAPES:  # canvases of the decode path: the oldest
                del self._constants[next(iter(self._constants))]
            self._constants[key] = const
        return self._constants[key]

    def _windows_for(self, side: int, device: torch.device) -> torch.Tensor:
        """crop_windows for canvases of up to `side` px, shared by every canvas shape."""
        key = (device, side)
        if key not in self._windows:
            if len(self._windows) >= KEEP_SHAPES // 2:  # 90 MB each for 288 px at 128 px
                del self._windows[next(iter(self._windows))]
            self._windows[key] = crop_windows(side, self.image_size, device)
        return self._windows[key]


def _cropped_one_by_one(images: torch.Tensor, sizes: torch.Tensor, starts: torch.Tensor,
                        size: int) -> torch.Tensor:
    """_cropped on a CPU: each box (sizes, starts (copies, B, 2)) cut out and resized alone by
    torch's antialiased bicubic, the same weights as the batched matmuls (tested equal), with
    work in proportion to the box instead of the whole image: 1 launch a view costs nothing
    on a CPU, and a 256 x 400 image's dense resampling matrices cost 10x the box's."""
    copies, batch = sizes.shape[:2]
    out = torch.empty(copies, batch, 3, size, size)
    boxes = torch.cat([starts, sizes], -1).long().tolist()  # the host's own numbers: no sync
    for c in range(copies):
        for b in range(batch):
            top, left, h, w = boxes[c][b]
            box = images[b, None, :, top:top + h, left:left + w].float()
            out[c, b] = torch.nn.functional.interpolate(box, (size, size), mode="bicubic",
                                                        antialias=True, align_corners=False)[0]
    return out.view(copies * batch, 3, size * size).clamp_(0, 255)


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
