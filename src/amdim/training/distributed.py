"""Data-parallel training across processes (torchrun), with negatives from the whole batch.

`batch_size` is the global batch: each of N ranks encodes batch_size / N images, the features
of every rank are gathered (keeping gradients), and every rank computes the NCE over the whole
global batch, exactly as one process would. DDP then averages the gradients, so the update
equals that of one process on the concatenated batch (tests/training/test_distributed.py
checks it with 2 CPU processes).

The collectives inside the model are torch's functional collectives: autograd and
torch.compile trace through them, so they add no graph break and no host sync.

Each start of the processes (an elastic restart of torchrun included) joins under key names of
its own in torchrun's store (see _store_of_this_start).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.constants import default_pg_timeout
from torch import nn

log = logging.getLogger("amdim")
# all_gather_single is torch 2.13+; all_gather_tensor (2.11-2.12, the GPU image's 2.11) is the
# same collective, deprecated with a warning from 2.13 on
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_features_group = None  # our collectives inside the model's backward: kept apart from DDP's


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join torchrun's process group: (rank, world_size, this rank's device).

    device: the requested device; under torchrun a CUDA device becomes cuda:LOCAL_RANK, made
    current before the process group starts (NCCL for CUDA, gloo otherwise).
    A device type string (the old call) returns LOCAL_RANK in place of the device.
    """
    global _features_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        rank = int(os.environ["RANK"])
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=_store_of_this_start(rank, world_size), rank=rank,
                                world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    # DDP all-reduces gradient buckets asynchronously during backward; the gathers' and batch
    # norms' collectives run in the same backward, so they get a group of their own
    _features_group = dist.new_group()
    return dist.get_rank(), world_size, device


def _store_of_this_start(rank: int, world_size: int,
                         timeout: timedelta = default_pg_timeout) -> dist.Store:
    """torchrun's store (MASTER_ADDR:MASTER_PORT), under a key prefix that rank 0 draws anew
    at every start of the processes.

    torchrun (c10d rendezvous) keeps one store across elastic restarts (--max-restarts), and
    the process group's keys carry no attempt number: restarted ranks would read the dead
    ranks' addresses and fail to connect, or hang (pytorch/pytorch#135712). The restart count
    cannot name the attempt: each machine's agent counts its own restarts. So each rank but 0
    posts a nonce of its own, rank 0 answers every nonce it sees with the fresh prefix (an
    answer to a dead rank's stale nonce is never read) until all ranks have taken it.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"amdim/nonce/{rank}", nonce)
        prefix = store.get(f"amdim/prefix/{nonce}").decode()  # waits up to timeout
        store.add(f"amdim/{prefix}/joined", 1)
        return dist.PrefixStore(f"amdim/{prefix}/", store)
    prefix, answered = uuid.uuid4().hex, set()
    deadline = time.monotonic() + timeout.total_seconds()
    while store.add(f"amdim/{prefix}/joined", 0) < world_size - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{world_size - 1 - store.add(f'amdim/{prefix}/joined', 0)} of "
                               f"the {world_size} processes did not join within {timeout}")
        for other in range(1, world_size):
            key = f"amdim/nonce/{other}"
            if store.check([key]) and (nonce := store.get(key).decode()) not in answered:
                store.set(f"amdim/prefix/{nonce}", prefix)
                answered.add(nonce)
        time.sleep(0.02)
    return dist.PrefixStore(f"amdim/{prefix}/", store)


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward is this rank's slice of the gradient, times N.

    Every rank computes the same loss from the same gathered features, so the gradient is the
    same on every rank and its sum over ranks (the exact backward of a gather) is N times it:
    no collective is needed. DDP's mean over ranks then divides the N back out.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
        # contiguous in and out: a channels-last (b, C, H, W) map is gathered in its logical
        # layout, as (N*b, C, H, W) NCHW
        gathered = _all_gather(tensor.contiguous(), 0, _features_group)
        return funcol.wait_tensor(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        batch = grad.shape[0] // ctx.world_size
        return grad[ctx.rank * batch:(ctx.rank + 1) * batch] * ctx.world_size


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each of N ranks -> (N*b, ...) in rank order, on every rank, with gradients.
    Only for inputs of a loss that every rank computes identically (see _Gather)."""
    return _Gather.apply(tensor)


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    # every rank's copy of the sum is used by its loss: the backward sums the gradients too
    return funcol.all_reduce(tensor, "sum", _features_group)


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for any backend, without host syncs (unlike torch's
    SyncBatchNorm): batch sums and sums of squares are all-reduced with gradients.
    Works for (B, C, ...)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (B, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        # statistics in float32 whatever the autocast dtype of x, as torch's batch norm keeps them;
        # two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2
        mean = _sum_over_ranks(x.sum(dims, dtype=torch.float32)) / count  # (C,)
        centred = x - mean.view(shape)  # float32
        var = _sum_over_ranks(centred.square().sum(dims)) / count
        if self.track_running_stats:  # running statistics use the unbiased variance, as BatchNorm
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * count / max(count - 1, 1), self.momentum)
                self.num_batches_tracked += 1
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def synchronise_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch norm in module normalises over the global batch (AllReduceBatchNorm, on
    every device). Parameters and statistics are kept: the same tensors, on their device.
    Pass the encoder only: the probes read detached features and keep per-rank batch norm.
    Subclasses that do more than normalise (timm's BatchNormAct2d holds an activation) are
    left per-rank, with a warning, rather than replaced by a plain batch norm."""
    for name, child in module.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            replacement = AllReduceBatchNorm(child.num_features, child.eps, child.momentum,
                                             child.affine, child.track_running_stats)
            # the same Parameter objects (optimisers and requires_grad carry over) and buffers
            for key, tensor in [*child.named_parameters(recurse=False),
                                *child.named_buffers(recurse=False)]:
                setattr(replacement, key, tensor)
            setattr(module, name, replacement.train(child.training))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            log.warning("%s (%s) keeps per-rank statistics: only plain batch norms are "
                        "synchronised across ranks", name, type(child).__name__)
        else:
            synchronise_batchnorm(child)
    return module
