"""The pretraining model: encoder -> (r1, r5, r7) of both views -> NCE, plus online probes.

One module whose forward takes both views, so that DistributedDataParallel sees one forward
per backward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import PretrainConfig
from .backbones import build_encoder
from .classifiers import Probes, clipped_cross_entropy
from .encoder import Features
from .nce import multiscale_nce, objective, random_locations


class AMDIM(nn.Module):
    """forward(x1, x2: (B, 3, S, S), labels: (B,) with -1 for unlabelled[, source_locations])
    -> dict of scalars:
    the NCE terms (nce.OBJECTIVE_TERMS), `probe_loss`, `loss` (what to minimise: the NCE terms
    plus `probe_loss`), and `correct_linear`, `correct_mlp`, `n_labelled` (counts on this batch,
    both views)."""

    def __init__(self, cfg: PretrainConfig, n_classes: int):
        super().__init__()
        self.tclip, self.mixture_entropy = cfg.tclip, cfg.mixture_entropy
        self.encoder = build_encoder(cfg.encoder)  # the paper's, or a standard backbone
        self.probes = Probes(cfg.n_rkhs, n_classes) if n_classes else None
        self.mixture_head = None
        if cfg.n_mixtures > 1:
            from .mixture import MixtureHead

            self.mixture_head = MixtureHead(cfg.n_rkhs, cfg.n_mixtures)
        # set by distributed training: (b, ...) per rank -> (N*b, ...), keeping gradients
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    def nce(self, f1: Features, f2: Features,
            source_locations: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> dict[str, torch.Tensor]:
        if source_locations is None:  # the random 5x5 source location per image and view
            source_locations = random_locations(f1.r5.shape[0], f1.r5.device)
        if self.gather is not None:  # this rank's images -> the global batch, in rank order
            f1, f2 = (Features(*map(self.gather, f)) for f in (f1, f2))
            source_locations = tuple(self.gather(loc) for loc in source_locations)
        if self.mixture_head is None:
            return multiscale_nce(f1, f2, self.tclip, source_locations)
        from .mixture import multiscale_mixture_nce

        return multiscale_mixture_nce(f1, f2, self.mixture_head, self.tclip,
                                      self.mixture_entropy, source_locations)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, labels: torch.Tensor,
                source_locations: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        f1, f2 = self.encoder(x1), self.encoder(x2)  # two passes: batch norm sees each view alone
        out = self.nce(f1, f2, source_locations)
        out["loss"] = objective(out)  # the named NCE terms, not whatever else nce() returns
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
