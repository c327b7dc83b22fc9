"""Labelled image batches for verification, calibration and evaluation, from whatever the
caller has: arrays, a torch Dataset, or a DataLoader.

Every source becomes a re-iterable :class:`Batches` of ``(x float32 [B, C, H, W], y int64 [B])``
numpy pairs, with unlabelled samples (label ``-100``) dropped and an optional cap on the
number of samples. Images are the model input (already normalised), as the training data
layer yields them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from kdedge.targets.calibration import spread_indices  # numpy only
from kdedge.train.labels import IGNORE_INDEX  # noqa: E402 - the one definition


def _is_dataset(src: Any) -> bool:
    """A map-style dataset: ``len`` and ``[i] -> (x, y)`` (a list is read as a list of batches)."""
    return hasattr(src, "__getitem__") and hasattr(src, "__len__") and not isinstance(src, (list, tuple, dict))


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor; no torch import needed
        a = a.detach().cpu().numpy()
    return np.asarray(a)


@dataclass
class Batches:
    """A re-iterable source of ``(x, y)`` numpy batches.

    Args:
        source: ``(x, y)`` arrays/tensors, a map-style dataset (``len`` and ``[i] -> (x, y)``),
            or a re-iterable of ``(x, y)`` batches (a DataLoader).
        batch_size: batch size for arrays and datasets (a DataLoader keeps its own).
        limit: use at most this many samples (None: all).
        keep_unlabelled: keep samples labelled ``-100`` (calibration needs no labels).
    """

    source: Any
    batch_size: int = 256
    limit: int | None = None
    keep_unlabelled: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"the sample limit must be >= 1, got {self.limit}")
        src = self.source
        if isinstance(src, Batches):
            self.source = src.source
            self.limit = src.limit if self.limit is None else min(self.limit, src.limit or self.limit)
        elif isinstance(src, tuple) and len(src) == 2:
            x, y = _to_numpy(src[0]), _to_numpy(src[1])
            if x.ndim != 4:
                raise ValueError(f"images must be a [N, C, H, W] array, got shape {x.shape}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels must be a [N] array matching {x.shape[0]} images, got shape {y.shape}")
            self.source = (x, y)
        elif _is_dataset(src):
            pass
        elif hasattr(src, "__iter__"):
            if iter(src) is src:  # a one-shot iterator: keep its batches so they can be read again
                self.source = [(_to_numpy(x), _to_numpy(y)) for x, y in src]
        else:
            raise ValueError(f"cannot read labelled images from a {type(src).__name__}; pass (x, y) arrays, "
                             "a Dataset or a DataLoader")

    def _raw(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        src = self.source
        if isinstance(src, tuple):
            x, y = src
            for i in range(0, len(x), self.batch_size):
                yield x[i : i + self.batch_size], y[i : i + self.batch_size]
        elif _is_dataset(src):
            for i in range(0, len(src), self.batch_size):
                items = [src[j] for j in range(i, min(i + self.batch_size, len(src)))]
                yield (np.stack([_to_numpy(it[0]) for it in items]),
                       np.asarray([int(_to_numpy(it[1])) for it in items]))
        else:
            for x, y in src:
                yield _to_numpy(x), _to_numpy(y)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        seen = 0
        for x, y in self._raw():
            keep = y != IGNORE_INDEX
            if not self.keep_unlabelled and not keep.all():
                x, y = x[keep], y[keep]
            if self.limit is not None:
                x, y = x[: self.limit - seen], y[: self.limit - seen]
            if len(y) == 0:
                if self.limit is not None and seen >= self.limit:
                    return
                continue
            seen += len(y)
            yield np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)
            if self.limit is not None and seen >= self.limit:
                return

    def first(self, n: int) -> np.ndarray:
        """The first ``n`` images (fewer if the source is smaller)."""
        out: list[np.ndarray] = []
        got = 0
        for x, _ in self:
            out.append(x[: n - got])
            got += len(out[-1])
            if got >= n:
                break
        if not out:
            raise ValueError("the data source holds no images")
        return np.concatenate(out)

    def count(self) -> int:
        """Number of samples (reads the source once)."""
        return sum(len(y) for _, y in self)


class Spread:
    """``count`` samples of a map-style dataset, evenly spaced over its indices.

    Training pools are often sorted (image folders by class, stratified splits by index), so
    the first ``count`` samples can cover one or two classes; evenly spaced ones cover the whole
    pool. Deterministic: the same dataset and count give the same samples.
    """

    def __init__(self, dataset: Any, count: int) -> None:
        n = len(dataset)
        if count < 1:
            raise ValueError(f"the sample count must be >= 1, got {count}")
        self.dataset = dataset
        self.indices = spread_indices(n, count)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.indices[i])]

