"""What the scheduler plans with: each stage's (and fused prefix's) time at each batch size, from a
latency profile, interpolated between the batch sizes it measured."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

__all__ = ["Costs"]


class Costs:
    """Planned latency (ms) of each graph at each batch size 1 … ``max_batch``.

    Args:
        table: graph name (``stage0``, ``prefix3``) -> the cost at batch 1, 2, …, max_batch.

    Example:
        >>> costs = Costs.from_profile(runner.profile, ["stage0", "stage1"], max_batch=32)
        >>> costs("stage1", 8)
        0.21
    """

    def __init__(self, table: dict[str, Sequence[float]]) -> None:
        if not table:
            raise ValueError("a cost table needs at least one graph")
        sizes = {len(v) for v in table.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError("every graph of a cost table needs one cost per batch size 1 … max_batch")
        self.max_batch = sizes.pop()
        self._t: dict[str, tuple[float, ...]] = {}
        for g, v in table.items():
            vals = tuple(float(c) for c in v)
            if not all(math.isfinite(c) and c >= 0 for c in vals):
                raise ValueError(f"costs of {g} must be finite numbers >= 0 ms, got {list(v)!r}")
            self._t[g] = vals

    def __call__(self, graph: str, n: int) -> float:
        """The cost of ``graph`` at batch ``n`` (beyond ``max_batch``: scaled proportionally)."""
        row = self._t[graph]
        if n <= len(row):
            return row[max(n, 1) - 1]
        return row[-1] * n / len(row)

    def __contains__(self, graph: str) -> bool:
        return graph in self._t

    @classmethod
    def from_function(cls, fn: Callable[[str, int], float], graphs: Sequence[str], max_batch: int) -> Costs:
        """A table from ``fn(graph, batch) -> ms`` (tests, simulations)."""
        return cls({g: [fn(g, n) for n in range(1, max_batch + 1)] for g in graphs})

    @classmethod
    def from_profile(cls, profile: Any, graphs: Sequence[str], max_batch: int, stat: str = "p99") -> Costs:
        """A table from a :class:`~kdedge.profile.latency.LatencyProfile`: its ``stat`` at each
        measured batch size, linearly interpolated between them (a stage's latency is close to
        affine in the batch size; the profile's own lookup takes the next larger measured batch,
        which would plan batch 2 as batch 32); below the smallest measured batch, that batch's
        cost; beyond the largest, scaled proportionally.

        Raises:
            ProfileError: the profile lacks a graph or the statistic.
        """
        batches = [int(b) for b in profile.batches]
        table: dict[str, list[float]] = {}
        for g in graphs:
            pts = [(b, float(profile.stat(g, b, stat=stat))) for b in batches]
            row = []
            for n in range(1, max_batch + 1):
                row.append(_interpolate(pts, n))
            table[g] = row
        return cls(table)


def _interpolate(pts: Sequence[tuple[int, float]], n: int) -> float:
    if n <= pts[0][0]:
        return pts[0][1]
    for (b0, c0), (b1, c1) in zip(pts, pts[1:]):
        if n <= b1:
            return c0 + (c1 - c0) * (n - b0) / (b1 - b0)
    b, c = pts[-1]
    return c * n / b
