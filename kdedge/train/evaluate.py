"""Evaluation shared by every method: plain accuracy, or per-stage accuracy of an anytime model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdedge.models.stages import combine_torch, run_stages
from kdedge.train.task import IGNORE_INDEX, unwrap


def is_anytime(model: nn.Module) -> bool:
    return callable(getattr(model, "stages", None)) and hasattr(model, "combine_rules")


@torch.no_grad()
def stage_logits(model: nn.Module, loader: Any, device: Any) -> tuple[list[Tensor], list[int], Tensor]:
    """Run an anytime model's stages over a loader.

    Returns (per-stage logits concatenated over the loader [K x (N, C)], members per stage,
    labels (N,)). Unlabelled samples are dropped.
    """
    model = unwrap(model)
    was_training = model.training
    model.eval()
    stages = model.stages()
    members = [s.spec.members for s in stages]
    chunks: list[list[Tensor]] = [[] for _ in stages]
    labels: list[Tensor] = []
    try:
        for x, y in loader:
            keep = y != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            x = x[keep].to(device)
            outs = run_stages(stages, x)
            for k, (o, s) in enumerate(zip(outs, stages)):
                chunks[k].append(o[s.spec.logits].float().cpu())
            labels.append(y[keep].cpu())
    finally:
        model.train(was_training)
    return [torch.cat(c) for c in chunks], members, torch.cat(labels)


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
        logits, members, labels = stage_logits(inner, loader, device)
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
    was_training = inner.training
    inner.eval()
    correct, total, loss_sum = 0, 0, 0.0
    try:
        for x, y in loader:
            keep = y != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            x, y = x[keep].to(device), y[keep].to(device)
            out = inner(x)
            loss_sum += float(torch.nn.functional.cross_entropy(out.float(), y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += int(y.numel())
    finally:
        inner.train(was_training)
    if total == 0:
        raise ValueError("evaluation split holds no labelled samples")
    return {"accuracy": correct / total, "loss": loss_sum / total, "n": total}
