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
