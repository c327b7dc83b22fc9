"""DataLoaders whose order is a function of (seed, epoch) only; see the package docstring for the contract."""

from __future__ import annotations

from typing import Iterator, Sized

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdedge.train.data.config import DataError


class EpochSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from ``seed + epoch`` alone.

    It draws from its own generator (never torch's global RNG) and uses the same formula as
    ``DistributedSampler``, so one process gives the order a one-process DDP run gives.

    Args:
        n: dataset length.
        seed: base seed of the permutation.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """Evaluation order: indices ``rank, rank + world, ...`` (no shuffling, no padding).

    Unlike ``DistributedSampler``, no sample is repeated to even out the shards, so metrics summed
    over ranks count each sample exactly once. ``set_epoch`` is accepted and has no effect.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside a world of size {world_size}")
        self.n, self.rank, self.world_size = int(n), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DataError("make_loader(distributed=True) needs an initialised torch.distributed process group "
                        "(launch with torchrun and call init_process_group first)")
    return dist.get_rank(), dist.get_world_size()


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader over ``ds`` whose ``loader.sampler.set_epoch(epoch)`` fixes the order.

    Args:
        ds: a map-style dataset.
        batch_size: samples per batch (per process when distributed).
        train: shuffle per (seed, epoch); otherwise keep the dataset order.
        seed: base seed of the shuffle (same on every rank).
        distributed: shard over the ranks of the initialised process group: training uses
            ``DistributedSampler(seed=seed)`` (pads to equal shards), evaluation a
            :class:`ShardSampler` (no padding).
        drop_last: drop a last partial batch; None = drop it when training and at least one full
            batch exists (a batch of one sample breaks BatchNorm), keep it when evaluating.
        num_workers: worker processes; their seeds derive from torch's global RNG, which the
            training engine reseeds at each epoch start.

    Returns:
        a DataLoader whose ``sampler`` has ``set_epoch``.

    Example:
        >>> loader = make_loader(splits.train_set(cfg), cfg.batch_size, train=True, seed=seed)
        >>> for epoch in range(start, epochs):
        ...     loader.sampler.set_epoch(epoch)
        ...     for x, y in loader: ...
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(ds, Sized):
        raise DataError("make_loader needs a map-style dataset with a length")
    n = len(ds)
    sampler: Sampler[int]
    if distributed:
        rank, world = _world()
        if train:
            from torch.utils.data.distributed import DistributedSampler

            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        else:
            sampler = ShardSampler(n, rank, world)
    else:
        sampler = EpochSampler(n, seed) if train else ShardSampler(n)
    if drop_last is None:
        drop_last = train and len(sampler) >= batch_size  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)
