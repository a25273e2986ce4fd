"""Features of a frozen encoder (eval mode, no gradients, any device): a batch, an iterable of
batches or a whole dataset in order; and the linear probe on them that ends pretraining, the
trained encoder next to the same architecture at random init."""
from __future__ import annotations

import copy
import logging
from typing import Iterable

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..runtime import autocast_for
from .backbones import build_encoder
from .encoder import Encoder, Features

log = logging.getLogger("amdim")


def _layout(device: torch.device) -> torch.memory_format:
    # convolutions run fastest channels-last on CUDA; the values are the same either way
    return torch.channels_last if device.type == "cuda" else torch.preserve_format


def frozen(encoder: Encoder, device: torch.device) -> Encoder:
    """The encoder moved to `device` (channels-last on CUDA) and put in eval mode."""
    return encoder.to(device, memory_format=_layout(device)).eval()


@torch.no_grad()
def encode_batch(encoder: Encoder, images: torch.Tensor, precision: str = "fp32") -> Features:
    """The encoder's Features of normalised images (B, 3, S, S) (any device: moved to the
    encoder's, channels-last on CUDA), under autocast at `precision`, without gradients."""
    device = next(encoder.parameters()).device
    with autocast_for(precision, device)():
        return encoder(images.to(device, non_blocking=True, memory_format=_layout(device)))


@torch.no_grad()
def encode(encoder: Encoder, batches: Iterable, precision: str = "fp32", maps: bool = False,
           out: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Run the frozen encoder (eval mode) over batches of (normalised images (B, 3, S, S),
    labels (B,)), in order.

    Returns float32 features (N, n_rkhs), labels (N,) int64 (-1: unlabelled) and, with
    `maps`, r5 (N, n_rkhs, 5, 5) and r7 (N, n_rkhs, 7, 7), on `out` (default: the encoder's
    device, which needs no host synchronisation; "cpu" copies each batch back).
    """
    out = torch.device(out) if out is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    # copies to the device are queued; a copy to the host must wait for its values
    copy = dict(device=out, non_blocking=out.type != "cpu")
    parts: dict[str, list] = {"features": [], "labels": [], "r5": [], "r7": []}
    for images, labels in batches:
        r1, r5, r7 = encode_batch(encoder, images, precision)
        parts["features"].append(r1.flatten(1).float().to(**copy))  # (B, D, 1, 1) -> (B, D)
        parts["labels"].append(torch.as_tensor(labels, dtype=torch.int64).to(**copy))
        if maps:
            parts["r5"].append(r5.float().to(**copy))
            parts["r7"].append(r7.float().to(**copy))
    encoder.train(was_training)
    return {k: torch.cat(v) for k, v in parts.items() if v}


def in_order(dataset: Dataset, device: torch.device, batch_size: int = 256, workers: int = 0
             ) -> DataLoader:
    """Every item of a dataset once, in order, batched (pinned for a copy to CUDA)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda")


def extract_features(encoder: Encoder, dataset: Dataset, device: torch.device,
                     batch_size: int = 256, workers: int = 0, maps: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Run the frozen encoder (eval mode; it must be on `device`) over a dataset, in order,
    every image once, in fp32.

    Returns float32 CPU tensors features (N, n_rkhs), labels (N,) int64 (-1: unlabelled) and,
    with `maps`, r5 (N, n_rkhs, 5, 5) and r7 (N, n_rkhs, 7, 7).
    """
    batches = tqdm(in_order(dataset, device, batch_size, workers), desc="features",
                   unit="batch", leave=False, mininterval=1.0)
    return encode(encoder, batches, maps=maps, out="cpu")


def linear_probe_accuracy(encoder: Encoder, train_set: Dataset, test_set: Dataset,
                          device: torch.device) -> float:
    """Test accuracy of a logistic regression fitted on frozen, standardised global features
    (scikit-learn's: a robust solver, nothing to tune, fine for small sets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = extract_features(encoder, train_set, device)
    test = extract_features(encoder, test_set, device)
    keep = train["labels"] >= 0
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train["features"][keep].numpy(), train["labels"][keep].numpy())
    return float(probe.score(test["features"].numpy(), test["labels"].numpy()))


def compare_with_random_init(encoder: Encoder, seed: int, train_set: Dataset, test_set: Dataset,
                             device: torch.device, max_images: int = 0) -> dict[str, float]:
    """Linear-probe accuracy of the trained encoder next to the same architecture at random
    init: the proof that pretraining learned something. Prints both. max_images: fit on a
    fixed random sample of this many training images (0: all)."""
    train_plain = copy.copy(train_set)  # the training images with the deterministic transform
    train_plain.transform = test_set.transform
    if 0 < max_images < len(train_plain):
        sample = torch.randperm(len(train_plain), generator=torch.Generator().manual_seed(seed))
        train_plain = Subset(train_plain, sample[:max_images].tolist())
    torch.manual_seed(seed)
    random_init = build_encoder(encoder.cfg).to(device)
    log.info("final probe: logistic regression on %d training images, for the trained encoder "
             "and at random init", len(train_plain))
    trained, baseline = (linear_probe_accuracy(model, train_plain, test_set, device)
                         for model in tqdm((encoder, random_init), desc="final probe",
                                           unit="encoder", leave=False))
    print(f"linear probe on frozen features: trained encoder {100 * trained:.1f}% | "
          f"same architecture at random init {100 * baseline:.1f}%")
    return {"final_linear_probe_acc": trained, "random_init_linear_probe_acc": baseline}


