"""DataLoaders whose order is a function of (seed, epoch) only; see the package docstring for the contract."""

from __future__ import annotations

from typing import Iterator, Sequence, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdedge.train.data.config import DataError
from kdedge.train.labels import IGNORE_INDEX


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


class LabelledBatchSampler(Sampler[list[int]]):
    """Training batches of exactly ``labelled_per_batch`` labelled images plus unlabelled ones.

    For semi-supervised training (labelled images plus an unlabelled pool with label -100): every
    batch holds ``labelled_per_batch`` labelled indices followed by ``batch_size -
    labelled_per_batch`` unlabelled ones, instead of whatever a uniform shuffle of both puts there.

    An epoch is one pass over the unlabelled pool (the larger set in the low-data setting), in a
    random order. The labelled set is cycled: its indices come from a stream of fresh random
    permutations of the labelled set, as many as the epoch needs, so within an epoch every
    labelled image is used equally often (to within one, over all ranks together). A batch can
    hold an image twice only where two permutations meet in it (always possible once
    ``labelled_per_batch * world_size`` exceeds the labelled set).

    Both orders come from one generator seeded with ``seed + epoch`` (the unlabelled permutation
    first, then the labelled permutations): a function of (seed, epoch) only, never of torch's
    global RNG or of the epochs run before, so a resumed run sees the same batches.

    Under DDP, rank ``r`` of ``world_size`` takes every ``world_size``-th element of both the
    unlabelled permutation and the labelled stream (the same arrays on every rank), so the ranks
    share no unlabelled image (but for the padding below) and take disjoint positions of the
    labelled stream, and every rank yields the same number of batches.

    ``drop_last`` (the training loader's rule): True drops the unlabelled images that do not fill
    a last batch on every rank (a different random few each epoch; ranks stay disjoint); False
    keeps a last, smaller batch (still ``labelled_per_batch`` labelled images) and, under DDP,
    first pads the unlabelled permutation by repeating its start so every rank gets as many
    images (as ``DistributedSampler`` does). None = True when every rank has at least one full
    batch, else False.

    Args:
        labelled: dataset indices of the labelled images.
        unlabelled: dataset indices of the unlabelled pool.
        batch_size: images per batch (per process under DDP).
        labelled_per_batch: labelled images per batch, in ``[1, batch_size)``.
        seed: base seed (the same on every rank).
        rank, world_size: this process's shard.
        drop_last: see above.

    Example:
        >>> sampler = LabelledBatchSampler(range(100), range(100, 1300), 64, 16, seed=0)
        >>> sampler.set_epoch(3)
        >>> batches = list(sampler)          # 1200 // 48 = 25 batches of 16 + 48 indices
    """

    def __init__(
        self,
        labelled: Sequence[int] | np.ndarray,
        unlabelled: Sequence[int] | np.ndarray,
        batch_size: int,
        labelled_per_batch: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool | None = None,
    ) -> None:
        for name, value, minimum in (("batch_size", batch_size, 2), ("labelled_per_batch", labelled_per_batch, 1),
                                     ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if labelled_per_batch >= batch_size:
            raise DataError(f"labelled_per_batch={labelled_per_batch} must be smaller than batch_size={batch_size}: "
                            "each batch needs room for unlabelled images")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside a world of size {world_size}")
        self.labelled = np.asarray(labelled, dtype=np.int64).reshape(-1)
        self.unlabelled = np.asarray(unlabelled, dtype=np.int64).reshape(-1)
        if len(self.labelled) == 0:
            raise DataError("labelled_per_batch needs labelled images, and the training set has none")
        if len(self.unlabelled) == 0:
            raise DataError("labelled_per_batch needs an unlabelled pool (label -100), and the training set has none; "
                            "lower data.per_class or leave labelled_per_batch unset")
        self.batch_size, self.k, self.u = batch_size, labelled_per_batch, batch_size - labelled_per_batch
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        n_u = len(self.unlabelled)
        if drop_last is None:
            drop_last = n_u // world_size >= self.u
        self.drop_last = bool(drop_last)
        self.per_rank = n_u // world_size if self.drop_last else -(-n_u // world_size)
        self.num_batches = self.per_rank // self.u if self.drop_last else -(-self.per_rank // self.u)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        n_u, n_l, world = len(self.unlabelled), len(self.labelled), self.world_size
        if self.num_batches == 0:  # drop_last=True with less than one batch per rank
            return
        perm = torch.randperm(n_u, generator=g)
        if not self.drop_last:  # pad by cycling so every rank gets per_rank images (DistributedSampler's rule)
            total = self.per_rank * world
            perm = perm.repeat(-(-total // n_u))[:total]
        unl = perm[self.rank :: world][: self.num_batches * self.u].numpy()
        need = self.num_batches * self.k * world  # the labelled stream of all ranks together
        passes = -(-need // n_l)
        stream = torch.cat([torch.randperm(n_l, generator=g) for _ in range(passes)])[:need]
        lab = stream[self.rank :: world].numpy()  # exactly num_batches * k: need is a multiple of world
        for j in range(self.num_batches):
            batch = np.concatenate([self.labelled[lab[j * self.k : (j + 1) * self.k]],
                                    self.unlabelled[unl[j * self.u : (j + 1) * self.u]]])
            yield batch.tolist()


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
    labelled_per_batch: int | None = None,
) -> DataLoader:
    """A DataLoader over ``ds`` whose order ``set_loader_epoch(loader, epoch)`` fixes.

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
        labelled_per_batch: training only: batch with a :class:`LabelledBatchSampler` so that
            every batch holds exactly this many labelled samples (``ds.targets`` >= 0) and
            ``batch_size - labelled_per_batch`` unlabelled ones (``IGNORE_INDEX``); an epoch is
            one pass over the unlabelled ones. None = shuffle everything together.

    Returns:
        a DataLoader whose ``sampler`` (or, with ``labelled_per_batch``, ``batch_sampler``) has
        ``set_epoch``.

    Example:
        >>> loader = make_loader(splits.train_set(cfg), cfg.batch_size, train=True, seed=seed)
        >>> for epoch in range(start, epochs):
        ...     set_loader_epoch(loader, epoch)
        ...     for x, y in loader: ...
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(ds, Sized):
        raise DataError("make_loader needs a map-style dataset with a length")
    if labelled_per_batch is not None:
        if not train:
            raise DataError("labelled_per_batch applies to training loaders only")
        targets = getattr(ds, "targets", None)
        if targets is None:
            raise DataError("labelled_per_batch needs a dataset with a targets array (an ImageDataset)")
        targets = np.asarray(targets)
        rank, world = _world() if distributed else (0, 1)
        batches = LabelledBatchSampler(np.flatnonzero(targets != IGNORE_INDEX), np.flatnonzero(targets == IGNORE_INDEX),
                                       batch_size, labelled_per_batch, seed=seed, rank=rank, world_size=world,
                                       drop_last=drop_last)
        return DataLoader(ds, batch_sampler=batches, num_workers=num_workers)
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


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch whose order ``loader`` yields next: ``set_epoch`` on its sampler, or on
    its batch sampler when that is a :class:`LabelledBatchSampler` (the loader's ``sampler`` is
    then torch's unused default).

    Args:
        loader: a loader from :func:`make_loader`.
        epoch: the epoch about to start.
    """
    for s in (loader.batch_sampler, loader.sampler):
        if hasattr(s, "set_epoch"):
            s.set_epoch(epoch)  # type: ignore[union-attr]
