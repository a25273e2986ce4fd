"""Classifiers on frozen global features: the authors' linear and MLP classifiers, their
clipped loss and one training epoch of them; the weighted kNN classifier.

Layer names follow the authors' Evaluator (block_glb_mlp / block_glb_lin with a
`block_forward` Sequential) so that their checkpoints' `evaluator.*` weights load unchanged.
"""
from __future__ import annotations

from typing import Iterable

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


def train_epoch(probes: Probes, optimizer: torch.optim.Optimizer, batches: Iterable
                ) -> torch.Tensor:
    """One epoch of the classifiers on batches of (features (B, D), labels (B,)); returns the
    mean loss as a 0-dim tensor on the probes' device, never read here: no host sync."""
    total, steps = torch.zeros((), device=next(probes.parameters()).device), 0
    for features, labels in batches:
        logits_mlp, logits_linear = probes(features)
        loss = clipped_cross_entropy(logits_mlp, labels) + clipped_cross_entropy(
            logits_linear, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.detach(), steps + 1
    return total / max(steps, 1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Rows of scores (N, C) whose label (N,) is among the k highest (k capped at C)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return int((top == labels[:, None]).any(1).sum())


@torch.no_grad()
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor,
               test_features: torch.Tensor, n_classes: int, k: int = 200,
               temperature: float = 0.07) -> torch.Tensor:
    """Weighted kNN votes (N_test, C): features (N, D) are L2-normalised, each test row takes
    its k most cosine-similar training rows (labels (N,), -1 ignored), each voting exp(sim / T)
    for its class."""
    # unlabelled rows are masked, not removed: a boolean index would wait for the GPU
    unlabelled = train_labels < 0
    train = F.normalize(train_features, dim=1)  # (N, D)
    k = min(k, len(train))
    votes = []
    chunk = max(1, 2**26 // len(train))  # keeps each (chunk, N) similarity block ~256 MB
    for test in F.normalize(test_features, dim=1).split(chunk):
        similarity = (test @ train.t()).masked_fill(unlabelled, float("-inf"))  # (n, N)
        similarity, index = similarity.topk(k, dim=1)  # (n, k)
        weight = (similarity / temperature).exp()  # 0 for an unlabelled row
        votes.append(torch.zeros(len(test), n_classes, device=test.device).scatter_add_(
            1, train_labels.clamp(min=0)[index], weight))
    return torch.cat(votes)
