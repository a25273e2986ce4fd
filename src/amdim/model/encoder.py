"""The authors' AMDIM encoder: images -> (r1, r5, r7) embeddings.

Module and parameter names follow the authors' code (amdim-public, model.py) on purpose:
their checkpoints load into this encoder by stripping the `encoder.module.` key prefix.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import (EncoderConfig)  # noqa: F401 (API: the encoder's configuration, defined with the others)

class Features(NamedTuple):
    """The three embeddings of a batch of images, each (B, n_rkhs, H, W)."""

    r1: torch.Tensor  # (B, n_rkhs, 1, 1): the global feature
    r5: torch.Tensor  # (B, n_rkhs, 5, 5)
    r7: torch.Tensor  # (B, n_rkhs, 7, 7)


class MaybeBatchNorm2d(nn.Module):
    """Batch norm that always owns its parameters but only applies them when `use_bn`."""

    def __init__(self, n_ftr: int, affine: bool, use_bn: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(n_ftr, affine=affine)
        self.use_bn = use_bn
        # unused parameters stay (the authors' checkpoints hold them) but are not trained, so
        # that optimisers and DistributedDataParallel see only parameters that get gradients
        self.bn.requires_grad_(use_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) if self.use_bn else x


class Conv3x3(nn.Module):
    """Pad (optionally), conv with bias, ReLU: the stem layers."""

    def __init__(self, n_in: int, n_out: int, n_kern: int, n_stride: int, n_pad: int,
                 pad_mode: str = "constant"):
        super().__init__()
        self.n_pad = (n_pad,) * 4
        self.pad_mode = pad_mode
        self.conv = nn.Conv2d(n_in, n_out, n_kern, n_stride, 0, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_pad[0] > 0:
            x = F.pad(x, self.n_pad, mode=self.pad_mode)
        return F.relu(self.conv(x))


class ConvResNxN(nn.Module):
    """Unpadded residual layer: conv(width, stride) -> BN? -> ReLU -> 1x1 conv, plus an
    average-pool shortcut over the same window (zero-padded in channels when widening),
    which keeps each output's receptive field exactly that of the convolution."""

    def __init__(self, n_in: int, n_out: int, width: int, stride: int, pad: int, use_bn: bool):
        super().__init__()
        assert n_out >= n_in, "the shortcut can only widen"
        self.n_in, self.n_out = n_in, n_out
        self.width, self.stride, self.pad = width, stride, pad
        self.conv1 = nn.Conv2d(n_in, n_out, width, stride, pad, bias=False)
        self.conv2 = nn.Conv2d(n_out, n_out, 1, 1, 0, bias=False)
        self.bn1 = MaybeBatchNorm2d(n_out, True, use_bn)

    def init_weights(self, init_scale: float = 1.0) -> None:
        nn.init.kaiming_uniform_(self.conv1.weight, a=math.sqrt(5))
        self.conv1.weight.data.mul_(init_scale)
        nn.init.zeros_(self.conv2.weight)  # fixup-style: each block starts as its shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.bn1(self.conv1(x))))
        shortcut = F.avg_pool2d(x, self.width, self.stride, self.pad)
        if self.n_out > self.n_in:  # (B, n_in, H, W) -> (B, n_out, H, W), new channels zero
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.n_out - self.n_in))
        return residual + shortcut


class ConvResBlock(nn.Module):
    """One strided/windowed ConvResNxN followed by n_depth - 1 1x1 ConvResNxN layers."""

    def __init__(self, n_in: int, n_out: int, width: int, stride: int, pad: int, depth: int,
                 use_bn: bool):
        super().__init__()
        layers = [ConvResNxN(n_in, n_out, width, stride, pad, use_bn)]
        layers += [ConvResNxN(n_out, n_out, 1, 1, 0, use_bn) for _ in range(depth - 1)]
        self.layer_list = nn.Sequential(*layers)

    def init_weights(self, init_scale: float = 1.0) -> None:
        for layer in self.layer_list:
            layer.init_weights(init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_list(x)


class FakeRKHSConvNet(nn.Module):
    """Embedding head for a local map: 1x1 residual MLP with a near-identity linear shortcut
    and a batch-normed output."""

    def __init__(self, n_input: int, n_output: int, use_bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(n_input, n_output, 1, 1, 0, bias=False)
        self.bn_hid = MaybeBatchNorm2d(n_output, True, use_bn)
        self.conv2 = nn.Conv2d(n_output, n_output, 1, 1, 0, bias=False)
        self.bn_out = MaybeBatchNorm2d(n_output, True, True)
        self.shortcut = nn.Conv2d(n_input, n_output, 1, 1, 0, bias=True)

    def init_weights(self, init_scale: float = 1.0) -> None:
        nn.init.kaiming_uniform_(self.conv1.weight, a=math.sqrt(5))
        self.conv1.weight.data.mul_(init_scale)
        nn.init.zeros_(self.conv2.weight)
        # shortcut starts as identity on the first n_input channels plus U(-0.01, 0.01) noise
        n_output, n_input = self.shortcut.weight.shape[:2]
        if n_output >= n_input:
            with torch.no_grad():
                self.shortcut.weight.uniform_(-0.01, 0.01)
                eye = torch.arange(n_input)
                self.shortcut.weight[eye, eye, 0, 0] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.conv2(F.relu(self.bn_hid(self.conv1(x))))
        return self.bn_out(residual + self.shortcut(x))


def _trunk(cfg: EncoderConfig) -> tuple[list[nn.Module], int, int]:
    """The authors' layer list for cfg.image_size, and the indices of its 7x7 and 5x5 outputs."""
    ndf, depth, bn, colours = cfg.ndf, cfg.n_depth, cfg.use_bn, cfg.in_channels
    if cfg.image_size == 32:
        # 32 -> 30 -> 30 -> 14 -> 7 -> 7 -> 5 -> 3 -> 1
        stem = [Conv3x3(colours, ndf, 3, 1, 0), ConvResNxN(ndf, ndf, 1, 1, 0, bn)]
        down = [ConvResBlock(ndf, ndf * 2, 4, 2, 0, depth, bn),
                ConvResBlock(ndf * 2, ndf * 4, 2, 2, 0, depth, bn)]
    else:
        # 64 -> 62 -> 30 -> 14 -> 7 -> 7 -> 5 -> 3 -> 1 (128 px: a 5x5/2 reflect-padded stem
        # first takes 128 -> 64)
        if cfg.image_size == 64:
            stem = [Conv3x3(colours, ndf, 3, 1, 0)]
        else:
            stem = [Conv3x3(colours, ndf, 5, 2, 2, "reflect"), Conv3x3(ndf, ndf, 3, 1, 0)]
        down = [ConvResBlock(ndf, ndf * 2, 4, 2, 0, depth, bn),
                ConvResBlock(ndf * 2, ndf * 4, 4, 2, 0, depth, bn),
                ConvResBlock(ndf * 4, ndf * 8, 2, 2, 0, depth, bn)]
    width = cfg.trunk_width
    layers = stem + down + [
        MaybeBatchNorm2d(width, True, bn),  # the 7x7 map
        ConvResBlock(width, width, 3, 1, 0, depth, bn),  # the 5x5 map
        ConvResBlock(width, width, 3, 1, 0, depth, bn),  # 3x3
        ConvResNxN(width, cfg.n_rkhs, 3, 1, 0, bn),  # 1x1
        MaybeBatchNorm2d(cfg.n_rkhs, True, True),  # the global feature
    ]
    index_7 = len(stem) + len(down)
    return layers, index_7, index_7 + 1


class Encoder(nn.Module):
    """AMDIM encoder. forward(x: (B, 3, S, S)) -> Features(r1, r5, r7), S = cfg.image_size."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        if cfg.backbone != "amdim":
            raise ValueError(f"Encoder is the paper's encoder; build backbone {cfg.backbone!r} "
                             "with amdim.build_encoder(cfg)")
        self.cfg = cfg
        layers, self.index_7, self.index_5 = _trunk(cfg)
        self.layer_list = nn.ModuleList(layers)
        self.rkhs_block_5 = FakeRKHSConvNet(cfg.trunk_width, cfg.n_rkhs, cfg.use_bn)
        self.rkhs_block_7 = FakeRKHSConvNet(cfg.trunk_width, cfg.n_rkhs, cfg.use_bn)
        self.init_weights()

    def init_weights(self, init_scale: float = 1.0) -> None:
        """The authors' init: default convs, zeroed second convs, near-identity shortcuts."""
        for module in self.modules():
            if isinstance(module, (ConvResNxN, FakeRKHSConvNet)):
                module.init_weights(init_scale)

    def forward(self, x: torch.Tensor) -> Features:
        size, colours = self.cfg.image_size, self.cfg.in_channels
        if x.dim() != 4 or x.shape[1] != colours or x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"this encoder takes images of shape (B, {colours}, {size}, {size}), got "
                f"{tuple(x.shape)}; resize or crop inputs to {size} px, or build an encoder "
                f"with image_size matching your images"
            )
        h, r5, r7 = x, None, None
        for i, layer in enumerate(self.layer_list):
            h = layer(h)
            if i == self.index_7:
                r7 = h
            elif i == self.index_5:
                r5 = h
        return Features(r1=h, r5=self.rkhs_block_5(r5), r7=self.rkhs_block_7(r7))

    def global_features(self, x: torch.Tensor) -> torch.Tensor:
        """The flat global feature used for evaluation: (B, 3, S, S) -> (B, n_rkhs)."""
        return self(x).r1.flatten(1)
