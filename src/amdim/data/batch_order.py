"""Which images form each pretraining batch, and the seed of each random stream: one rule for
both data paths (batches.EpochBatches for the DataLoader, batches.TrainBatches on the
device).

Every draw is a function of the run's seed and integer keys alone: the order of epoch e from
(seed, e), the views of batch k of epoch e on rank r from (seed, e, k, r). So a run resumed
at (epoch, batch) sees exactly the batches and views the uninterrupted run saw, whichever
process or worker builds them, and N ranks together see exactly the batches one process would.
"""
from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit torch seed for the stream that `keys` (e.g. epoch, batch, rank) name under the
    run's `seed`: numpy's SeedSequence with the keys as its spawn key, the same in every
    process and Python version (unlike hash()); (e,) and (e, 0) name different streams."""
    # SeedSequence takes non-negative integers only: % 2**64 maps any int seed onto one
    state = np.random.SeedSequence(seed % 2**64, spawn_key=keys).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def batch_indices(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """The images that rank `rank` takes from each global batch of epoch `epoch`: int64
    (n // batch_size, batch_size // world_size) on the CPU, row k for batch k.

    The epoch's order is a permutation of range(n) drawn from (seed, epoch); global batch k is
    its k-th run of batch_size images, of which rank r takes the r-th slice; the last partial
    batch is dropped (NCE wants full batches)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    n_batches, local = n // batch_size, batch_size // world_size
    # (n_batches * batch_size,) -> (n_batches, world_size, local)
    return order[:n_batches * batch_size].view(n_batches, world_size, local)[:, rank]


SHARD_KEY = 2**32  # beyond any epoch: the keys of the shards' streams never name an epoch's


def shard_indices(n: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """The images rank `rank` of `world_size` holds on the sharded device path: every
    world_size-th image of one permutation of range(n) drawn from (seed, world_size), fixed for
    the run (class-sorted sets give every rank every class). All shards hold n // world_size
    images; the remainder is left out. int64 (n // world_size,), sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(
        derive_seed(seed, SHARD_KEY + world_size)))
    return order[:n // world_size * world_size].view(-1, world_size)[:, rank].sort().values


def shard_batch_indices(n_shard: int, local_batch: int, seed: int, epoch: int, rank: int
                        ) -> torch.Tensor:
    """Rank `rank`'s part of each global batch of epoch `epoch` on the sharded path: positions
    in its shard, int64 (n_shard // local_batch, local_batch). Each rank draws its own order of
    its shard from (seed, epoch, rank): every held image once an epoch, and a global batch is
    local_batch random images of each shard rather than a random draw from the whole set."""
    order = torch.randperm(n_shard, generator=torch.Generator().manual_seed(
        derive_seed(seed, epoch, SHARD_KEY + rank)))
    n_batches = n_shard // local_batch
    return order[:n_batches * local_batch].view(n_batches, local_batch)
