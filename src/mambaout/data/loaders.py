"""Samplers and loaders: sharded over ranks, resumable mid-epoch, and counting each evaluation image once. Every
training loader (here, `streaming.StreamLoader`, the gpu pipeline's) keeps the `EpochLoader` contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate
from torch.utils.data.distributed import DistributedSampler

from mambaout.data.streaming import IterableImages, StreamLoader
from mambaout.utils.interrupt import ignore_sigint


class EpochLoader:
    """What the trainer asks of a training loader; this base implements the epoch methods for a loader whose
    `sampler` is a `ResumableSampler`. The order is a function of (seed, epoch, rank) only."""

    sampler: ResumableSampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def skip_samples(self, n: int) -> None:
        """Start the next iteration after `n` of this rank's samples of the epoch (mid-epoch resume)."""
        self.sampler.skip = n

    def _require_a_batch(self, images: int, world_size: int, batch_size: int) -> None:
        if len(self) == 0:
            raise ValueError(
                f"the training set ({images} images over {world_size} processes) is smaller than one batch of "
                f"{batch_size}; lower --batch-size"
            )


@dataclass(frozen=True)
class Loading:
    """How batches are loaded: per-device batch sizes, worker processes, the shuffling seed, caching."""

    batch_size: int
    eval_batch_size: int
    workers: int = 0
    seed: int = 0
    cache: bool = False
    persistent_workers: bool = False


class ShardSampler(Sampler):
    """Indices `rank, rank + world, ...`: every image exactly once over all ranks (no padding duplicates)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, after `skip` of this rank's samples (mid-epoch resume):
    the epoch's order is the same permutation as ever (seeded by seed + epoch); only its head is left out."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def _seed_worker(worker_id: int) -> None:
    ignore_sigint()
    # torch seeds python's `random` and itself per worker; numpy (used by RandAugment and Mixup) it does not.
    np.random.seed(torch.initial_seed() % 2**32)


def train_loader(
    dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    workers: int,
    pin: bool = False,
    persistent: bool = False,
    collate_fn=None,
):
    """Shuffled, sharded (DistributedSampler, also at world size 1 so 1 and N processes see the same order).

    `persistent` keeps worker processes between epochs (saves their start-up on short GPU epochs). Off by default:
    fresh workers take their seeds from the per-epoch seeded main process, which makes `--resume` bit-exact.
    """
    if isinstance(dataset, IterableImages):
        dataset.training, dataset.rank, dataset.world_size, dataset.seed = True, rank, world_size, seed
        return StreamLoader(dataset, batch_size, workers, pin, drop_last=True)
    loader = ShuffledLoader(
        dataset,
        batch_size=batch_size,
        sampler=ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True),
        num_workers=workers,
        drop_last=True,
        pin_memory=pin,
        worker_init_fn=_seed_worker,
        persistent_workers=persistent and workers > 0,
        collate_fn=collate_fn,
    )
    loader._require_a_batch(len(dataset), world_size, batch_size)
    return loader


class ShuffledLoader(EpochLoader, DataLoader):
    """A DataLoader over a map-style set with its `ResumableSampler`, keeping the `EpochLoader` contract."""


def collate_readable(batch):
    """Collate `(image or None, target, skipped)` samples into `(images or None, targets or None, skipped names)`:
    unreadable samples (image None) are left out and named, so an evaluation counts each readable image once."""
    good = [(x, y) for x, y, _ in batch if x is not None]
    names = [name for x, _, name in batch if x is None]
    return (*default_collate(good), names) if good else (None, None, names)


def eval_loader(dataset, batch_size: int, rank: int = 0, world_size: int = 1, workers: int = 0, pin: bool = False):
    if isinstance(dataset, IterableImages):
        dataset.training, dataset.rank, dataset.world_size = False, rank, world_size
        return StreamLoader(dataset, batch_size, workers, pin, drop_last=False)
    if getattr(dataset, "substitute", False):
        raise ValueError("an evaluation set must not substitute unreadable images: build it with substitute=False")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        collate_fn=collate_readable,
        worker_init_fn=ignore_sigint,
    )


def num_steps(n_batches: int, accum_steps: int) -> int:
    """Optimizer steps per epoch: trailing micro-batches that cannot fill a whole accumulation are dropped."""
    return n_batches // accum_steps
