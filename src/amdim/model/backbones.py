"""Standard backbones under AMDIM's heads: torchvision ResNets and timm models -> (r1, r5, r7).

The multiscale objective needs one global vector and two local maps per image, so any
convolutional backbone that gives feature maps at several stages can take the paper's
encoder's place. The heads attach as in the paper's encoder (model.encoder):
- r1: the last stage averaged over its locations, then a 1x1 residual embedding to n_rkhs
  (FakeRKHSConvNet, ending in batch norm as the paper's r1 does);
- r7 and r5: for each of the paper's grids g = 7 and g = 5, the stage whose side is nearest to
  g (ratio of sides, i.e. in log scale; a tie goes to the larger, then the deeper stage),
  brought to g x g by adaptive average pooling (which averages a larger map down and
  interpolates a smaller one linearly, half-pixel aligned), then its own 1x1 residual embedding.
The maps are always 7x7 and 5x5, so the NCE, its random 5x5 source locations, the probes,
mixtures, extract and segment take a backbone exactly as they take the paper's encoder.

torchvision ResNets are built for 224 px and would shrink 32 px images to 1x1; their stem is
cut until the last stage is 4x4 at every image size, so the stages are 32, 16, 8, 4 px:
    128 px: the torchvision stem as is (7x7/2 conv, 3x3/2 max-pool);
     64 px: no max-pool;
     32 px: a 3x3/1 conv and no max-pool (the CIFAR ResNet of He et al. 2016, as in solo-learn).
So r7 is stage 3 (8x8 averaged to 7x7), r5 stage 4 (4x4 interpolated to 5x5), r1 stage 4.
timm models are taken as built (`features_only=True`: every stage timm lists in
feature_info) and the same rule picks their stages, e.g. a stride-32 model at 128 px has
stages 64, 32, 16, 8, 4 px: r7 from 8, r5 from 4.

Backbones start from random init. Pretrained weights are never downloaded (amdim runs
offline); load weights you have into `encoder.trunk` yourself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (IMAGE_SIZES, RESNETS, TIMM_PREFIX, EncoderConfig,  # noqa: F401 (API)
                      check_backbone)
from .encoder import Encoder, FakeRKHSConvNet, Features  # noqa: F401 (API)

def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """The encoder cfg describes: the paper's Encoder, or a BackboneEncoder. Both map
    (B, 3, S, S) to Features(r1, r5, r7) and have .cfg and .global_features."""
    return Encoder(cfg) if cfg.backbone == "amdim" else BackboneEncoder(cfg)


class ResNetStages(nn.Module):
    """A torchvision ResNet (random init) without its classifier, its stem cut so that the
    last stage is 4x4: forward(x: (B, 3, S, S)) -> the 4 stage outputs, 32, 16, 8, 4 px."""

    def __init__(self, name: str, image_size: int):
        super().__init__()
        import torchvision.models  # here: slow to import, and only the backbones need it

        net = getattr(torchvision.models, name)(weights=None)
        if image_size == 32:  # 3x3/1: the first stage sees every pixel
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        if image_size <= 64:
            net.maxpool = nn.Identity()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = type(net.layer1[0]).expansion  # 1 for BasicBlock, 4 for Bottleneck
        self.channels = [width * expansion for width in (64, 128, 256, 512)]
        stem_stride = image_size // 32  # 1, 2 or 4: the first stage is 32 px
        self.reductions = [stem_stride * 2 ** i for i in range(4)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps


def timm_stages(name: str, image_size: int | None = None
                ) -> tuple[nn.Module, list[int], list[int]]:
    """timm model `name` (random init) returning every stage's map, with the stages' channels
    and strides. image_size: refuse (ValueError, with what to do) a model that cannot take
    images of that size, such as a ViT or MLP-Mixer built for a fixed input size."""
    try:
        import timm  # here: seconds to import, and an optional dependency
    except ImportError:
        raise ImportError(f"backbone timm:{name} needs timm: pip install 'amdim[timm]'") from None
    try:
        net = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as error:  # timm's "Unknown model"
        raise ValueError(f"backbone timm:{name}: {error}") from None
    if image_size is not None:
        _check_input_size(net, name, image_size)
    return net, net.feature_info.channels(), net.feature_info.reduction()


def _check_input_size(net: nn.Module, name: str, image_size: int) -> None:
    """Raise ValueError unless timm model `net` takes (B, 3, image_size, image_size)."""
    fixed = getattr(net, "pretrained_cfg", None) or {}
    size = tuple(fixed.get("input_size", (3, 0, 0)))[1:]
    what = (f"use a convolutional timm model (e.g. timm:resnet26d, timm:convnext_atto), "
            f"which takes any size, or --backbone amdim; AMDIM's image sizes are "
            f"{', '.join(map(str, IMAGE_SIZES))} px")
    if fixed.get("fixed_input_size") and size != (image_size, image_size):
        raise ValueError(f"backbone timm:{name} takes only {size[0]}x{size[1]} px images (a "
                         f"fixed input size, as ViT and MLP-Mixer have); this run's images are "
                         f"{image_size} px (--image-size, or the preset's): {what}")
    was_training = net.training
    try:  # a dry run: other models with their own input rules say so here, not mid-training
        with torch.no_grad():
            net.eval()(torch.zeros(2, 3, image_size, image_size))
    except (AssertionError, RuntimeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(
            error).__name__
        raise ValueError(f"backbone timm:{name} cannot take {image_size} px images "
                         f"({reason}): {what}") from None
    finally:
        net.train(was_training)


def nearest_stage(sides: list[int], grid: int) -> int:
    """Index of the stage whose side is nearest to grid by ratio; ties: larger, then deeper."""
    return min(range(len(sides)),
               key=lambda i: (abs(math.log(sides[i] / grid)), -sides[i], -i))


class BackboneEncoder(nn.Module):
    """A standard backbone under the paper's heads (module docstring).
    forward(x: (B, 3, S, S)) -> Features(r1, r5, r7), S = cfg.image_size."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone in RESNETS:
            self.trunk = ResNetStages(cfg.backbone, cfg.image_size)
            channels, reductions = self.trunk.channels, self.trunk.reductions
        else:
            self.trunk, channels, reductions = timm_stages(cfg.backbone[len(TIMM_PREFIX):],
                                                           cfg.image_size)
        sides = [max(1, math.ceil(cfg.image_size / r)) for r in reductions]
        self.index_7, self.index_5 = nearest_stage(sides, 7), nearest_stage(sides, 5)
        self.stage_sides = sides  # what the trunk gives at cfg.image_size, shallow to deep
        self.rkhs_block_1 = FakeRKHSConvNet(channels[-1], cfg.n_rkhs, cfg.use_bn)
        self.rkhs_block_5 = FakeRKHSConvNet(channels[self.index_5], cfg.n_rkhs, cfg.use_bn)
        self.rkhs_block_7 = FakeRKHSConvNet(channels[self.index_7], cfg.n_rkhs, cfg.use_bn)
        for head in (self.rkhs_block_1, self.rkhs_block_5, self.rkhs_block_7):
            head.init_weights()  # the paper's head init; the trunk keeps its library's

    def forward(self, x: torch.Tensor) -> Features:
        size = self.cfg.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"this encoder takes images of shape (B, 3, {size}, {size}), got "
                f"{tuple(x.shape)}; resize or crop inputs to {size} px, or build an encoder "
                f"with image_size matching your images")
        maps = self.trunk(x)  # list of (B, C_i, H_i, W_i), shallow to deep
        r1 = maps[-1].mean((2, 3), keepdim=True)  # (B, C, H, W) -> (B, C, 1, 1)
        r5 = F.adaptive_avg_pool2d(maps[self.index_5], 5)  # (B, C5, H, W) -> (B, C5, 5, 5)
        r7 = F.adaptive_avg_pool2d(maps[self.index_7], 7)  # (B, C7, H, W) -> (B, C7, 7, 7)
        return Features(r1=self.rkhs_block_1(r1), r5=self.rkhs_block_5(r5),
                        r7=self.rkhs_block_7(r7))

    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flat global feature used for evaluation: (B, 3, S, S) -> (B, n_rkhs)."""
        return self(x).r1.flatten(1)
