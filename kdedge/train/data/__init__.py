"""Named datasets, deterministic splits and reproducible loaders.

``load_data(cfg, seed)`` reads a dataset by name (``DATASETS``: mnist5k, digits, cifar10,
cifar100, imagefolder, synthetic), splits it into stratified, disjoint train / val / test (and,
with ``per_class``, an unlabelled pool) and returns :class:`Splits` with a :class:`DatasetInfo`
that travels into the bundle. Nothing is ever downloaded: CIFAR and imagefolder are read from
``cfg.root``. Datasets yield ``(x float32 [C, H, W] normalised, y int64 scalar)``; unlabelled
samples carry ``y = -100`` (``kdedge.train.labels.IGNORE_INDEX``). ``preprocess(raw, info)`` is the
same input rule in numpy, for the runtime.

Sampler contract (what makes a resumed run see the same batches):

- ``make_loader(..., train=True)`` returns a loader whose order ``set_loader_epoch(loader, epoch)``
  selects; it must be called at the start of every epoch, before iterating. The order of epoch
  ``e`` is ``torch.randperm(n, generator=manual_seed(seed + e))``, a function of (seed, epoch)
  only: it draws from no global RNG and ignores how many epochs ran before. Without it every
  iteration repeats epoch 0's order.
- Under DDP (``distributed=True``) the sampler is ``torch.utils.data.distributed.DistributedSampler``
  with the same seed on every rank; rank r takes every world-th index of the same permutation
  (padded to equal shards). With one process its order equals the single-process order.
- ``labelled_per_batch=k`` (``data.labelled_per_batch``; semi-supervised training) batches with a
  :class:`LabelledBatchSampler` instead: every batch holds exactly k labelled samples and
  ``batch_size - k`` unlabelled ones (label -100); an epoch is one pass over the unlabelled pool,
  the labelled samples are cycled through fresh permutations. Its order is a function of
  (seed, epoch) and, under DDP, rank (disjoint shards, equal batch counts).
- Augmentation draws from torch's global RNG (in the main process, or in workers seeded from it
  when ``num_workers > 0``). The training engine reseeds the global RNG at each epoch start from
  (seed, epoch), so the augmented batches repeat too.
- Resuming is exact at epoch boundaries only: a run resumed at epoch e builds the same loader,
  selects epoch e and reseeds, and sees the batches an uninterrupted run sees.
- Evaluation loaders (``train=False``) keep the dataset order; distributed, each rank takes
  indices ``rank::world`` with no padding, so every sample is counted once.

Example:
    >>> cfg = DataConfig(name="mnist5k", per_class=50, unlabelled=True)
    >>> splits = load_data(cfg, seed=0)
    >>> loader = make_loader(splits.train_set(cfg), cfg.batch_size, train=True, seed=0)
    >>> set_loader_epoch(loader, 3)
"""

from __future__ import annotations

from kdedge.train.data.config import DATASETS, DataConfig, DataError, DatasetInfo
from kdedge.train.data.datasets import ImageDataset
from kdedge.train.data.loaders import EpochSampler, LabelledBatchSampler, ShardSampler, make_loader, set_loader_epoch
from kdedge.bundle.inputs import preprocess
from kdedge.train.data.splits import TEST_SPLIT_SEED, Splits, load_data

__all__ = [
    "DATASETS",
    "TEST_SPLIT_SEED",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "EpochSampler",
    "ImageDataset",
    "LabelledBatchSampler",
    "ShardSampler",
    "Splits",
    "load_data",
    "make_loader",
    "preprocess",
    "set_loader_epoch",
]
