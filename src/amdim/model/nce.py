"""The multiscale NCE (InfoNCE) objective of AMDIM, as pure functions.

Tasks: the global feature of one view predicts every 7x7 and 5x5 location of the other view
(1t7, 1t5), and one random 5x5 location of one view predicts the 5x5 locations of the other
(5t5). The positive of a source vector is each location of the same image's other view; the
negatives are all locations of every other image in the batch. Each task is run in both
directions and averaged, as in the authors' code (amdim-public, costs.py).

`nce_log_probs` is the one scoring arithmetic: it scores K source vectors per image, so plain
AMDIM is its K = 1 case and the mixture objective (model.mixture) its K > 1 case.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from .encoder import Features

SCORE_PENALTY = 0.05  # weight of mean(raw_score ** 2), keeps scores from drifting
# the training objective is the sum of these terms of multiscale_nce's result, and nothing else
OBJECTIVE_TERMS = ("loss_1t5", "loss_1t7", "loss_5t5", "score_reg")

# (B, D) global source vectors, (B, D, H, W) target maps -> (loss, score_reg)
GlobalTask = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def nce_log_probs(sources: torch.Tensor, target: torch.Tensor, tclip: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE log-softmax of every positive, for K source vectors per image, and the score penalty.

    sources: (B, K, D) K antecedent vectors per image (K = 1 for plain AMDIM).
    target: (B, D, H, W) consequent maps of the other view.
    Returns (log_prob (B, K, H*W), score_reg scalar), both float32. log_prob[b, k, l] scores
    component k of image b against location l of its own target, with the negatives of
    component k: every location of every other image.
    """
    batch, n_mix, dim = sources.shape
    n_loc = target.shape[2] * target.shape[3]
    # scaled before the matmul, whose result is rounded to the autocast dtype: a raw fp16 dot
    # product overflows at 65504, the score scaled by 1/sqrt(D) does not
    sources = sources / dim ** 0.5
    # (B, D, H, W) -> (D, B*H*W); (B, K, D) -> (B*K, D): one matmul scores every component
    # of every source against every location of every image
    target = target.flatten(2).transpose(0, 1).reshape(dim, batch * n_loc)
    scores = (sources.reshape(batch * n_mix, dim) @ target).float()
    scores = scores.view(batch, n_mix, batch, n_loc)  # (source, K, image, L)
    score_reg = SCORE_PENALTY * scores.square().mean()  # mean over components too
    scores = tclip * torch.tanh(scores / tclip)  # soft clip to (-tclip, tclip)
    same_image = torch.eye(batch, dtype=torch.bool, device=scores.device)
    # (B, K, B, L) -> (K, L, B) -> (B, K, L): image b's components vs its own view
    positive = scores.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    # (B, K, B, L) -> (B, K): each component's log-sum-exp over all locations of other images
    negative = scores.masked_fill(same_image[:, None, :, None], float("-inf")).flatten(2)
    negative = negative.logsumexp(2)
    # log-softmax of each positive against its component's negatives: (B, K, L)
    return positive - torch.logaddexp(positive, negative[:, :, None]), score_reg


def nce_task(source: torch.Tensor, target: torch.Tensor, tclip: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """NCE loss of predicting the target maps from the source vectors, and the score penalty.

    source: (B, D) one antecedent vector per image.
    target: (B, D, H, W) consequent maps of the other view.
    Returns (loss, score_reg), both scalars in float32.
    """
    log_prob, score_reg = nce_log_probs(source[:, None], target, tclip)  # (B, 1, H*W)
    return -log_prob.mean(), score_reg


def pick_locations(r5: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
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
    global_task: GlobalTask | None = None,
) -> dict[str, torch.Tensor]:
    """AMDIM's multiscale NCE between two views of the same B images (B >= 2).

    features_x1, features_x2: Features(r1: (B, D, 1, 1), r5: (B, D, 5, 5), r7: (B, D, 7, 7)).
    tclip: soft clip of the scaled scores, tclip * tanh(score / tclip).
    source_locations: optional (loc_x1, loc_x2), each (B,) int64 flat 5x5 indices row*5+col
        choosing the 5t5 source vector per image and view; drawn at random when None.
    global_task: the global -> local tasks (1t5, 1t7) as (r1 (B, D), maps) -> (loss,
        score_reg); None is nce_task, as for 5t5 (model.mixture passes its mixture task).
    Returns float32 scalars named by OBJECTIVE_TERMS: loss_1t5, loss_1t7, loss_5t5,
    score_reg; the training objective is their sum (`objective`).
    """
    plain_task = partial(nce_task, tclip=tclip)
    global_task = global_task or plain_task
    losses = dict.fromkeys(OBJECTIVE_TERMS, 0.0)
    for source, target, locations in directions(features_x1, features_x2, source_locations):
        r1 = source.r1.flatten(1)  # (B, D, 1, 1) -> (B, D)
        r5 = pick_locations(source.r5, locations)  # (B, D, 5, 5) -> (B, D)
        for name, task, vectors, maps in (("loss_1t5", global_task, r1, target.r5),
                                          ("loss_1t7", global_task, r1, target.r7),
                                          ("loss_5t5", plain_task, r5, target.r5)):
            loss, score_reg = task(vectors, maps)
            losses[name] = losses[name] + 0.5 * loss  # mean over the two directions
            losses["score_reg"] = losses["score_reg"] + 0.5 * score_reg
    return losses


def objective(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training objective: the sum of the OBJECTIVE_TERMS of a multiscale_nce result."""
    return sum(losses[name] for name in OBJECTIVE_TERMS)
