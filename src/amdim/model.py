"""The pretraining model: encoder -> (r1, r5, r7) of both views -> NCE, plus online probes.

One module whose forward takes both views, so that DistributedDataParallel sees one forward
per backward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .classifiers import Probes, clipped_cross_entropy
from .config import PretrainConfig
from .encoder import Encoder, Features
from .nce import multiscale_nce


class AMDIM(nn.Module):
    """forward(x1, x2: (B, 3, S, S), labels: (B,) with -1 for unlabelled) -> dict of scalars:
    the NCE terms, `probe_loss`, `loss` (what to minimise), and `correct_linear`, `correct_mlp`,
    `n_labelled` (counts on this batch, both views)."""

    def __init__(self, cfg: PretrainConfig, n_classes: int):
        super().__init__()
        self.tclip, self.mixture_entropy = cfg.tclip, cfg.mixture_entropy
        self.encoder = Encoder(cfg.encoder)
        self.probes = Probes(cfg.n_rkhs, n_classes) if n_classes else None
        self.mixture_head = None
        if cfg.n_mixtures > 1:
            from .mixture import MixtureHead

            self.mixture_head = MixtureHead(cfg.n_rkhs, cfg.n_mixtures)
        # set by distributed training: gathers Features from every rank (keeps gradients)
        self.gather: Callable[[Features], Features] | None = None

    def nce(self, f1: Features, f2: Features) -> dict[str, torch.Tensor]:
        if self.gather is not None:
            f1, f2 = self.gather(f1), self.gather(f2)
        if self.mixture_head is None:
            return multiscale_nce(f1, f2, self.tclip)
        from .mixture import multiscale_mixture_nce

        return multiscale_mixture_nce(f1, f2, self.mixture_head, self.tclip,
                                      self.mixture_entropy)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        f1, f2 = self.encoder(x1), self.encoder(x2)  # two passes: batch norm sees each view alone
        out = self.nce(f1, f2)
        out["loss"] = sum(out.values())
        if self.probes is None:
            return out
        # the probes read detached global features of both views
        logits_mlp, logits_linear = self.probes(torch.cat([f1.r1, f2.r1]))
        labels = torch.cat([labels, labels])
        out["probe_loss"] = (clipped_cross_entropy(logits_mlp, labels)
                             + clipped_cross_entropy(logits_linear, labels))
        out["loss"] = out["loss"] + out["probe_loss"]
        out["correct_mlp"] = (logits_mlp.argmax(1) == labels).sum()
        out["correct_linear"] = (logits_linear.argmax(1) == labels).sum()
        out["n_labelled"] = (labels >= 0).sum()
        return out
