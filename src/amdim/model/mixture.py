"""Mixture-based representations (paper section 3.7): K global features per image.

The head maps each global feature f1 (B, D) to K features f1^j = f1 + MLP(f1)_j. A consequent
location i of the other view is then predicted by a mixture: the per-component NCE log-softmax
scores s_j(i) are combined under a posterior q(j | i) with an entropy bonus,

    maximise  sum_j q(j|i) s_j(i) + alpha * H(q(.|i)),

whose optimum over q is q = softmax_j(s_j / alpha), giving alpha * logsumexp_j(s_j / alpha).
Each component is a full NCE of its own: the negatives of component j are the other images'
locations scored by component j of the source image. Only the global -> local tasks (1t5, 1t7)
use the mixture; 5t5 is the plain task of model.nce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import Features
from .nce import multiscale_nce, nce_log_probs

OUTPUT_INIT_SCALE = 0.1  # output layer starts at 0.1x the default init: small, but random


class MixtureHead(nn.Module):
    """m_k of the paper: one ReLU hidden layer, residual from f1 to every component.

    forward(f1: (B, D)) -> (B, K, D).
    """

    def __init__(self, n_rkhs: int, n_mixtures: int):
        super().__init__()
        if n_rkhs < 1 or n_mixtures < 1:
            raise ValueError(f"n_rkhs and n_mixtures must be positive, got {n_rkhs}, {n_mixtures}")
        self.n_rkhs, self.n_mixtures = n_rkhs, n_mixtures
        self.hidden = nn.Linear(n_rkhs, n_rkhs)
        self.output = nn.Linear(n_rkhs, n_mixtures * n_rkhs)
        # not zero: identical components get identical gradients and would never separate
        with torch.no_grad():
            self.output.weight.mul_(OUTPUT_INIT_SCALE)
            self.output.bias.zero_()

    def forward(self, f1: torch.Tensor) -> torch.Tensor:
        batch, dim = f1.shape
        # (B, D) -> (B, K*D) -> (B, K, D), plus f1 broadcast over the K components
        residual = self.output(F.relu(self.hidden(f1))).view(batch, self.n_mixtures, dim)
        return f1[:, None, :] + residual


def mixture_nce_task(sources: torch.Tensor, target: torch.Tensor, tclip: float, alpha: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixture NCE of predicting the target maps from K source vectors per image.

    sources: (B, K, D) the mixture components of each image's global feature.
    target: (B, D, H, W) consequent maps of the other view.
    alpha: weight of the posterior's entropy bonus (> 0).
    Returns (loss, score_reg, assignments): loss = -mean over (image, location) of
    alpha * logsumexp_j(s_j / alpha), score_reg averaged over components (float32 scalars),
    and the detached posterior q(j | location), (B, K, H, W). With K = 1 equals nce_task.
    """
    if alpha <= 0:
        raise ValueError(f"alpha (the mixture entropy weight) must be > 0, got {alpha}")
    log_prob, score_reg = nce_log_probs(sources, target, tclip)  # (B, K, L)
    batch, n_mix = log_prob.shape[:2]
    if n_mix == 1:  # logsumexp of one term is the term; skip the /alpha*alpha rounding
        objective = log_prob[:, 0]
    else:
        objective = alpha * torch.logsumexp(log_prob / alpha, dim=1)  # (B, L)
    posterior = torch.softmax(log_prob.detach() / alpha, dim=1)
    return -objective.mean(), score_reg, posterior.view(batch, n_mix, *target.shape[2:])


def multiscale_mixture_nce(
    features_x1: Features,
    features_x2: Features,
    head: MixtureHead | None,
    tclip: float = 20.0,
    alpha: float = 1.0,
    source_locations: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """amdim.multiscale_nce with the mixture head on the global -> local tasks (1t5, 1t7).

    features_x1, features_x2: Features(r1: (B, D, 1, 1), r5: (B, D, 5, 5), r7: (B, D, 7, 7)).
    head: the MixtureHead; None gives exactly multiscale_nce (K = 1).
    alpha: weight of the entropy bonus of the mixture posterior.
    source_locations: optional (loc_x1, loc_x2), each (B,) flat 5x5 indices for 5t5.
    Returns float32 scalars loss_1t5, loss_1t7, loss_5t5, score_reg (the objective is their sum).
    """
    if head is None:
        return multiscale_nce(features_x1, features_x2, tclip, source_locations)

    def global_task(r1: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the head runs once per task: a (B, D) MLP, negligible beside the (B*K, B*H*W) scores
        loss, score_reg, _ = mixture_nce_task(head(r1), maps, tclip, alpha)  # (B, D) -> (B, K, D)
        return loss, score_reg

    return multiscale_nce(features_x1, features_x2, tclip, source_locations, global_task)


@torch.no_grad()
def assignments(features_source: Features, features_target: Features, head: MixtureHead,
                tclip: float = 20.0, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Posterior q(j | location) of each image's global mixture over the target's local maps.

    features_source, features_target: Features of the same B >= 2 images (pass the same
    Features twice to segment each image by its own global feature).
    Returns {"r5": (B, K, 5, 5), "r7": (B, K, 7, 7)}, float32, summing to 1 over K.
    """
    if features_source.r1.shape[0] < 2:
        raise ValueError("the mixture posterior needs at least 2 images: the other images "
                         "are the NCE negatives")
    mixture = head(features_source.r1.flatten(1))  # (B, K, D)
    return {name: mixture_nce_task(mixture, getattr(features_target, name), tclip, alpha)[2]
            for name in ("r5", "r7")}
