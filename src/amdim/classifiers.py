"""Linear and MLP classifiers on frozen global features, and the authors' clipped loss.

Layer names follow the authors' Evaluator (block_glb_mlp / block_glb_lin with a
`block_forward` Sequential) so that their checkpoints' `evaluator.*` weights load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_CLIP = 10.0  # tanh soft clip of the logits inside the cross-entropy
LOGIT_PENALTY = 1e-3  # weight of mean(logit ** 2)


class Classifier(nn.Module):
    """Linear (n_hidden=None) or one-hidden-layer MLP with batch norm, as the authors build it.

    forward(features: (B, n_input)) -> logits (B, n_classes).
    """

    def __init__(self, n_input: int, n_classes: int, n_hidden: int | None, dropout: float):
        super().__init__()
        if n_hidden is None:
            layers = [nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_input, n_classes)]
        else:
            layers = [nn.Flatten(), nn.Dropout(dropout), nn.Linear(n_input, n_hidden, bias=False),
                      nn.BatchNorm1d(n_hidden), nn.ReLU(), nn.Dropout(dropout),
                      nn.Linear(n_hidden, n_classes)]
        self.block_forward = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.block_forward(features)


class Probes(nn.Module):
    """The MLP (1024 hidden, dropout 0.2) and linear classifiers on the global feature.

    forward(features: (B, n_rkhs[, 1, 1])) -> (logits_mlp, logits_linear), each (B, n_classes).
    The features are detached: no gradient from the probes ever reaches the encoder.
    """

    def __init__(self, n_features: int, n_classes: int):
        super().__init__()
        self.block_glb_mlp = Classifier(n_features, n_classes, n_hidden=1024, dropout=0.2)
        self.block_glb_lin = Classifier(n_features, n_classes, n_hidden=None, dropout=0.0)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.detach().flatten(1)
        return self.block_glb_mlp(features), self.block_glb_lin(features)


def clipped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The authors' classifier loss: cross-entropy of tanh-clipped logits + a logit penalty.

    logits: (B, C) float; labels: (B,) int64, entries < 0 are ignored.
    """
    logits = logits.float()
    clipped = LOGIT_CLIP * torch.tanh(logits / LOGIT_CLIP)
    # mean over labelled rows; 0 (not NaN) for a batch with no labels at all
    n_labelled = (labels >= 0).sum().clamp(min=1)
    xent = F.cross_entropy(clipped, labels, ignore_index=-1, reduction="sum") / n_labelled
    return xent + LOGIT_PENALTY * logits.square().mean()
