"""Data-parallel training across processes (torchrun), with negatives from the whole batch.

`batch_size` is the global batch: each of N ranks encodes batch_size / N images, the features
of every rank are gathered (keeping gradients), and every rank computes the NCE over the whole
global batch, exactly as one process would. DDP then averages the gradients. Each rank sums the
gathered gradients back onto its own slice, so the update equals that of one process on the
concatenated batch (tests/test_distributed.py checks it with 2 CPU processes).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn



_features_group = None  # our collectives inside the model's backward: kept apart from DDP's


def setup(device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; joins the process group
    (NCCL for CUDA devices, gloo otherwise)."""
    global _features_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend)
    # DDP all-reduces gradient buckets asynchronously during backward; the gathers' and batch
    # norms' collectives run in the same backward, so they get a group of their own
    _features_group = dist.new_group()
    return dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


class _Gather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch, ctx.rank = tensor.shape[0], dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous(), group=_features_group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=_features_group)  # every rank's loss uses these features
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each of N ranks -> (N*b, ...) in rank order, on every rank, with gradients."""
    return _Gather.apply(tensor)


class _AllReduce(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's copy flows back to every input."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=_features_group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=_features_group)
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch for any backend (torch's SyncBatchNorm needs a GPU):
    batch sums and sums of squares are all-reduced with gradients. Works for (B, C, ...)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (B, C, ...), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        # two passes (mean, then squared deviations) avoid the cancellation of E[x^2] - E[x]^2
        mean = _AllReduce.apply(x.sum(dims)) / count  # (C,)
        centred = x - mean.view(shape)
        var = _AllReduce.apply(centred.square().sum(dims)) / count
        with torch.no_grad():  # running statistics use the unbiased variance, as BatchNorm does
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / max(count - 1, 1), self.momentum)
            self.num_batches_tracked += 1
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def synchronise_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm normalises over the global batch: torch's SyncBatchNorm on CUDA,
    AllReduceBatchNorm elsewhere. Parameters and statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            replacement = AllReduceBatchNorm(child.num_features, child.eps, child.momentum,
                                             child.affine, child.track_running_stats)
            replacement.load_state_dict(child.state_dict())
            if child.affine:  # the same Parameter objects: optimisers and requires_grad carry over
                replacement.weight, replacement.bias = child.weight, child.bias
            setattr(module, name, replacement.to(device))
        else:
            synchronise_batchnorm(child, device)
    return module
