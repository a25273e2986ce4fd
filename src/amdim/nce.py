"""The multiscale NCE (InfoNCE) objective of AMDIM, as a pure function.

Tasks: the global feature of one view predicts every 7x7 and 5x5 location of the other view
(1t7, 1t5), and one random 5x5 location of one view predicts the 5x5 locations of the other
(5t5). The positive of a source vector is each location of the same image's other view; the
negatives are all locations of every other image in the batch. Each task is run in both
directions and averaged, as in the authors' code (amdim-public, costs.py).
"""
from __future__ import annotations

import torch

from .encoder import Features

SCORE_PENALTY = 0.05  # weight of mean(raw_score ** 2), keeps scores from drifting


def nce_task(source: torch.Tensor, target: torch.Tensor, tclip: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE loss of predicting the target maps from the source vectors, and the score penalty.

    source: (B, D) one antecedent vector per image.
    target: (B, D, H, W) consequent maps of the other view.
    Returns (loss, score_reg), both scalars in float32.
    """
    batch, dim = source.shape
    n_loc = target.shape[2] * target.shape[3]
    # (B, D, H, W) -> (D, B*H*W): one matmul scores every source against every location
    target = target.flatten(2).transpose(0, 1).reshape(dim, batch * n_loc)
    scores = (source @ target).float().view(batch, batch, n_loc) / dim ** 0.5
    score_reg = SCORE_PENALTY * scores.square().mean()
    scores = tclip * torch.tanh(scores / tclip)  # soft clip to (-tclip, tclip)
    same_image = torch.eye(batch, dtype=torch.bool, device=scores.device)
    positive = scores.diagonal().t()  # (B, B, L) -> (B, L): image i's source vs its own view
    # (B, B, L) -> (B,): log-sum-exp over every location of every other image
    negative = scores.masked_fill(same_image[:, :, None], float("-inf")).flatten(1).logsumexp(1)
    # log-softmax of each positive against the shared negatives: (B, L)
    log_prob = positive - torch.logaddexp(positive, negative[:, None])
    return -log_prob.mean(), score_reg


def _pick_locations(r5: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
    """(B, D, 5, 5), (B,) flat indices row*5+col -> (B, D) the chosen 5x5 vector per image."""
    return r5.flatten(2)[torch.arange(r5.shape[0], device=r5.device), :, locations]


def random_locations(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 5x5 source location (flat index row*5+col) per image, for each view: 2 x (B,)."""
    return tuple(torch.randint(0, 25, (batch,), device=device) for _ in range(2))


def directions(features_x1: Features, features_x2: Features,
               source_locations: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[tuple[Features, Features, torch.Tensor], ...]:
    """The two prediction directions, ((source, target, 5x5 source locations) for x1 -> x2
    and for x2 -> x1), with the locations drawn at random when not given."""
    batch = features_x1.r1.shape[0]
    if batch < 2:
        raise ValueError("NCE needs at least 2 images per batch: the other images are the "
                         f"negatives (got batch size {batch}); raise the batch size")
    if source_locations is None:
        source_locations = random_locations(batch, features_x1.r5.device)
    return ((features_x1, features_x2, source_locations[0]),
            (features_x2, features_x1, source_locations[1]))


def multiscale_nce(
    features_x1: Features,
    features_x2: Features,
    tclip: float = 20.0,
    source_locations: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """AMDIM's multiscale NCE between two views of the same B images (B >= 2).

    features_x1, features_x2: Features(r1: (B, D, 1, 1), r5: (B, D, 5, 5), r7: (B, D, 7, 7)).
    tclip: soft clip of the scaled scores, tclip * tanh(score / tclip).
    source_locations: optional (loc_x1, loc_x2), each (B,) int64 flat 5x5 indices row*5+col
        choosing the 5t5 source vector per image and view; drawn at random when None.
    Returns float32 scalars loss_1t5, loss_1t7, loss_5t5, score_reg; the training objective
    is their sum.
    """
    losses = {"loss_1t5": 0.0, "loss_1t7": 0.0, "loss_5t5": 0.0, "score_reg": 0.0}
    for source, target, locations in directions(features_x1, features_x2, source_locations):
        r1 = source.r1.flatten(1)  # (B, D, 1, 1) -> (B, D)
        r5 = _pick_locations(source.r5, locations)
        for name, vectors, maps in (("loss_1t5", r1, target.r5), ("loss_1t7", r1, target.r7),
                                    ("loss_5t5", r5, target.r5)):
            loss, score_reg = nce_task(vectors, maps, tclip)
            losses[name] = losses[name] + 0.5 * loss  # mean over the two directions
            losses["score_reg"] = losses["score_reg"] + 0.5 * score_reg
    return losses
