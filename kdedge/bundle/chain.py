"""Running stage graphs as a chain: graph k reads the model input and what graphs 0..k-1 produced,
by graph tensor name (``input``, ``stageK__NAME``: the names of :mod:`kdedge.bundle.names`).

One helper for every place that chains sessions outside the runner: export's verification and
metrics (onnxruntime), ``kdedge build``'s verification against onnxruntime, and the calibration
batches of a carried input. The runner keeps its own loop: it runs on buffers preallocated and
bound once per batch size and drops finished samples between stages, which a generic loop over
dicts cannot do without allocating per call.

Example:
    >>> outs = chain([[t.tensor for t in e.inputs] for e in bundle.stages],
    ...              lambda k, feeds: sessions[k].run(feeds), x)
    >>> outs[-1]["stage2__logits"]
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from kdedge.bundle.errors import BundleError
from kdedge.bundle.names import INPUT, parse_binding

__all__ = ["chain", "producers"]


def chain(inputs: Sequence[Sequence[str]], call: Callable[[int, dict[str, Any]], Mapping[str, Any]], x: Any, *,
          upto: int | None = None, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run graphs ``0..upto-1`` (all by default) in order on the model input ``x``.

    Args:
        inputs: per graph, the tensor names it reads.
        call: ``call(k, feeds)`` runs graph k on ``{tensor name: value}`` (exactly its inputs)
            and returns its outputs by tensor name. Values are passed on as ``call`` returned
            them (device tensors stay on the device).
        x: the model input (the tensor ``input``).
        names: graph names for messages (default ``graph K``).

    Returns:
        per graph run, its outputs.

    Raises:
        BundleError: a graph reads a tensor that neither the input nor an earlier graph produced.
    """
    values: dict[str, Any] = {INPUT: x}
    outs: list[dict[str, Any]] = []
    for k, wanted in enumerate(inputs[:upto]):
        missing = [t for t in wanted if t not in values]
        if missing:
            name = names[k] if names is not None else f"graph {k}"
            raise BundleError(f"{name} reads {missing}, which no earlier stage produced")
        out = dict(call(k, {t: values[t] for t in wanted}))
        values.update(out)
        outs.append(out)
    return outs


def producers(bindings: Sequence[str | None], stage_names: Sequence[str], where: str = "graph") -> int:
    """How many stages (0..m-1) must run to compute inputs bound to ``bindings`` (0: the input only).

    Raises:
        BundleError: a binding to a stage that is not in ``stage_names``.
    """
    m = 0
    for b in bindings:
        parsed = None if b is None else parse_binding(b)
        if parsed is None:
            continue
        src = f"stage{parsed[0]}"
        if src not in stage_names:
            raise BundleError(f"{where}: an input is bound to {b!r}, which is not a stage of the bundle")
        m = max(m, list(stage_names).index(src) + 1)
    return m
