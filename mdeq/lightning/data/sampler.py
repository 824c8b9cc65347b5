"""The DataModules' sampler: a permutation from (seed, epoch) alone, sharded across processes."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler


class EpochSeededSampler(DistributedSampler):
    """Random permutation drawn from (seed, epoch) only, never from the global RNG, so a run
    resumed from a checkpoint sees exactly the batches of an uninterrupted run.

    It is a ``DistributedSampler`` that finds the process group itself: in a single process it
    yields the whole permutation; with N processes rank r yields every N-th index of the *same*
    permutation, so the N local batches together are exactly the single-process batch (and
    Lightning keeps it instead of substituting its own sampler). Lightning calls
    :meth:`set_epoch` at every epoch.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True) -> None:
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
