"""Evaluation shared by every method: plain accuracy, or per-stage accuracy of an anytime model.

Every task scores a model the same way: the model in eval mode (its mode restored after, also on
error), over the labelled samples of every batch (:func:`labelled_batches`), an evaluation split
without any being an error. The tasks' own evaluations (HNE members, multi-exit exits, AHBF
branches) use these helpers, and :func:`stage_logits` for anytime models.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from kdedge.models.stages import combine_torch, run_stages
from kdedge.train.distributed import unwrap
from kdedge.train.labels import IGNORE_INDEX


def is_anytime(model: nn.Module) -> bool:
    return callable(getattr(model, "stages", None)) and hasattr(model, "combine_rules")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for a ``with`` block and give it back in the mode it had.

    Args:
        model: the module to evaluate.

    Returns:
        A context manager yielding ``model``.

    Example:
        >>> with eval_mode(model):
        ...     logits = model(x)
    """
    flags = [(m, m.training) for m in model.modules()]  # per module: a frozen BN stays in eval
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


def labelled_batches(loader: Iterable[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """The labelled samples of every batch of ``loader``; batches with none are skipped.

    Samples labelled ``IGNORE_INDEX`` (the semi-supervised unlabelled pool) have nothing to be
    scored against. Tensors stay where the loader put them: callers move what they need.

    Args:
        loader: yields ``(x, y)`` batches.

    Returns:
        An iterator of ``(x, y)`` restricted to ``y != IGNORE_INDEX``.

    Raises:
        ValueError: the loader holds no labelled sample at all (raised once it is exhausted).
    """
    found = False
    for x, y in loader:
        keep = y != IGNORE_INDEX
        if not bool(keep.any()):
            continue
        found = True
        yield x[keep], y[keep]
    if not found:
        raise ValueError("evaluation split holds no labelled samples")


class StageLogits(NamedTuple):
    """What :func:`stage_logits` collects over a loader."""

    logits: list[Tensor]  # per stage, (N, C) float32 on the CPU
    members: list[int]  # ensemble members each stage adds
    labels: Tensor  # (N,) on the CPU
    input_shape: tuple[int, ...]  # (C, H, W) of one input, for cost counts


@torch.no_grad()
def stage_logits(model: nn.Module, loader: Any, device: Any) -> StageLogits:
    """Run an anytime model's stages over the labelled samples of a loader, in eval mode.

    Args:
        model: a model with ``stages()`` (a DDP or compiled wrapper is unwrapped).
        loader: yields ``(x, y)`` batches; unlabelled samples are dropped.
        device: where the stages run.

    Returns:
        The per-stage logits concatenated over the loader, the members per stage, the labels and
        the input shape (:class:`StageLogits`).

    Raises:
        ValueError: the loader holds no labelled sample.
    """
    model = unwrap(model)
    chunks: list[list[Tensor]] = []
    labels: list[Tensor] = []
    shape: tuple[int, ...] = ()
    with eval_mode(model):
        stages = model.stages()  # type: ignore[operator]  # after eval(): the wrappers copy the model's mode
        chunks = [[] for _ in stages]
        for x, y in labelled_batches(loader):
            x = x.to(device)
            shape = tuple(int(d) for d in x.shape[1:])
            for k, (o, s) in enumerate(zip(run_stages(stages, x), stages)):
                chunks[k].append(o[s.spec.logits].float().cpu())
            labels.append(y.cpu())
    return StageLogits([torch.cat(c) for c in chunks], [s.spec.members for s in stages], torch.cat(labels), shape)


def anytime_accuracies(logits: list[Tensor], members: list[int], labels: Tensor, rule: str) -> list[float]:
    """Accuracy of the combined prediction after each stage under a combine rule."""
    return [
        float((combine_torch(rule, logits[: k + 1], members[: k + 1]).argmax(1) == labels).float().mean())
        for k in range(len(logits))
    ]


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, device: Any) -> dict[str, Any]:
    """Accuracy (and loss) of a model on a loader.

    For an anytime model (one with ``stages()``), also the accuracy of the combined prediction
    after every stage under each combine rule it supports; ``accuracy`` is that of all stages
    under the default rule (the first of ``combine_rules``).
    """
    inner = unwrap(model)
    if is_anytime(inner):
        logits, members, labels, _ = stage_logits(inner, loader, device)
        rules = list(inner.combine_rules)
        per_rule = {r: anytime_accuracies(logits, members, labels, r) for r in rules}
        return {
            "accuracy": per_rule[rules[0]][-1],
            "combine": rules[0],
            "stages": [
                {"stage": k, "members": sum(members[: k + 1]), **{f"accuracy_{r}": per_rule[r][k] for r in rules}}
                for k in range(len(logits))
            ],
            "n": int(labels.numel()),
        }
    correct, total, loss_sum = 0, 0, 0.0
    with eval_mode(inner):
        for x, y in labelled_batches(loader):
            x, y = x.to(device), y.to(device)
            out = inner(x)
            loss_sum += float(torch.nn.functional.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += int(y.numel())
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}
