"""A minimal onnxruntime runner for stage files: run stages in order, feeding each stage the
bundle input and the tensors carried from earlier stages by their graph tensor names.

This is what export-time verification, INT8 calibration and ``evaluate_bundle`` use; the
anytime runner with budgets and policies is ``kdedge.runtime``. numpy + onnxruntime only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kdedge.bundle.chain import chain
from kdedge.bundle.manifest import Bundle, StageEntry
from kdedge.bundle.names import INPUT


@dataclass(frozen=True)
class RunGraph:
    """What the runner needs to know about one graph file."""

    name: str
    path: Path
    inputs: tuple[str, ...]   # graph tensor names: "input" or "stageK__NAME"
    outputs: tuple[str, ...]
    logits: str               # tensor name of the logits output
    members: int

    @classmethod
    def from_entry(cls, bundle: Bundle, entry: StageEntry, target: str = "onnx") -> RunGraph:
        return cls(name=entry.name, path=bundle.file(entry, target), inputs=tuple(i.tensor for i in entry.inputs),
                   outputs=tuple(o.tensor for o in entry.outputs), logits=entry.logits_tensor, members=entry.members)


def make_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OrtChain:
    """Sessions for a list of graphs run in order (stages) or one by one (prefixes).

    Args:
        graphs: the graphs, in execution order.
        threads: intra-op threads per session (None: onnxruntime's default).

    Example:
        >>> chain = OrtChain([RunGraph.from_entry(b, s) for s in b.stages])
        >>> outs = chain.run(x)           # one dict per stage, tensor name -> array
        >>> logits = [o[g.logits] for o, g in zip(outs, chain.graphs)]
    """

    def __init__(self, graphs: Sequence[RunGraph], threads: int | None = None) -> None:
        self.graphs = list(graphs)
        self.sessions = [make_session(g.path, threads) for g in self.graphs]

    def run_one(self, k: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph k on its inputs (``feeds``: tensor name -> array, exactly what it reads)."""
        g = self.graphs[k]
        values = self.sessions[k].run(list(g.outputs), {t: feeds[t] for t in g.inputs})
        return dict(zip(g.outputs, values))

    def run(self, x: np.ndarray, upto: int | None = None) -> list[dict[str, np.ndarray]]:
        """Run graphs 0..upto-1 (all by default) as a stage chain on the input batch ``x``."""
        return chain([g.inputs for g in self.graphs], self.run_one, np.ascontiguousarray(x, dtype=np.float32),
                     upto=upto, names=[g.name for g in self.graphs])

    def run_each(self, x: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Run every graph on ``x`` alone (fused prefixes read only the input)."""
        feeds = {INPUT: np.ascontiguousarray(x, dtype=np.float32)}
        return [self.run_one(k, feeds) for k in range(len(self.graphs))]

    def logits(self, outs: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
        return [o[g.logits] for o, g in zip(outs, self.graphs)]
