"""The stage contract that joins models, export and the runtime.

An anytime model is an ordered list of stages S_0 … S_{K-1}. Each stage is a plain
``nn.Module`` whose ``forward`` takes positional tensors in the order of ``spec.inputs`` and
returns a tuple of tensors in the order of ``spec.outputs``. One output (``spec.logits``) holds
the SUM of the logits of the ``spec.members`` ensemble members the stage completes; the other
outputs are tensors carried to later stages.

Input bindings name where each input comes from:
- ``"input"``: the (preprocessed) bundle input image batch, shape [N, C, H, W];
- ``"stageK:NAME"``: the output ``NAME`` of stage K (K smaller than this stage's index).

Slicing happens here, in torch, before any export format; every target receives the same
stage graphs. A fused *prefix* (stages 0..k computed in one module) is a Stage too, with
``members`` equal to the total member count of those stages and ``inputs == ("input",)``.

Example:
    >>> stages = model.stages()
    >>> outs = run_stages(stages, x)       # list of dicts, one per stage
    >>> probs = combine_torch("mean_logits", [o[s.spec.logits] for o, s in zip(outs, stages)],
    ...                       [s.spec.members for s in stages])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from kdedge.bundle.combine import COMBINE_RULES  # the rule names have one home (the torch twin is below)
from kdedge.bundle.names import INPUT


@dataclass(frozen=True)
class StageSpec:
    """Wiring of one stage.

    Args:
        name: stage name, ``stage0`` … (prefixes: ``prefix0`` …).
        inputs: bindings, ``"input"`` or ``"stageK:NAME"``.
        outputs: output names in forward order; must contain ``logits``.
        logits: name of the logits output (sum over ``members`` members).
        members: number of ensemble members whose logits are summed in ``logits``.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    logits: str = "logits"
    members: int = 1

    def __post_init__(self) -> None:
        if self.logits not in self.outputs:
            raise ValueError(f"stage {self.name}: logits output {self.logits!r} not in outputs {self.outputs}")
        if self.members < 1:
            raise ValueError(f"stage {self.name}: members must be >= 1, got {self.members}")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"stage {self.name}: duplicate output names {self.outputs}")


class Stage(nn.Module):
    """Base class for a stage module; subclasses set ``self.spec`` and implement ``forward``."""

    spec: StageSpec


@runtime_checkable
class AnytimeModel(Protocol):
    """What every exportable model family exposes.

    ``combine_rules`` lists the supported combine rules, the first being the default.
    ``prefixes()`` may return an empty list when the family has no fused prefix graphs.
    ``stage_meta()`` returns JSON-able extra facts for the manifest (family, configuration).
    """

    combine_rules: tuple[str, ...]

    def stages(self) -> list[Stage]: ...

    def prefixes(self) -> list[Stage]: ...


@dataclass
class StageOutputs:
    """Outputs of running a stage list: ``values[k][name]`` is stage k's output ``name``."""

    values: list[dict[str, Tensor]] = field(default_factory=list)


def resolve_binding(binding: str, x: Tensor, previous: Sequence[dict[str, Tensor]]) -> Tensor:
    """Return the tensor a binding names, given the input and earlier stages' outputs."""
    if binding == INPUT:
        return x
    stage_name, _, tensor_name = binding.partition(":")
    if not stage_name.startswith("stage") or not tensor_name:
        raise ValueError(f"bad binding {binding!r}: expected 'input' or 'stageK:NAME'")
    k = int(stage_name[len("stage"):])
    if k >= len(previous):
        raise ValueError(f"binding {binding!r} reads stage {k}, which has not run yet")
    return previous[k][tensor_name]


def run_stages(stages: Sequence[nn.Module], x: Tensor, upto: int | None = None) -> list[dict[str, Tensor]]:
    """Run stages 0..upto-1 (all by default) in order, wiring inputs by their bindings."""
    outs: list[dict[str, Tensor]] = []
    for stage in stages[: len(stages) if upto is None else upto]:
        spec: StageSpec = stage.spec  # type: ignore[assignment]
        args = [resolve_binding(b, x, outs) for b in spec.inputs]
        result = stage(*args)
        if isinstance(result, Tensor):
            result = (result,)
        if len(result) != len(spec.outputs):
            raise RuntimeError(f"{spec.name} returned {len(result)} tensors, spec lists {len(spec.outputs)}")
        outs.append(dict(zip(spec.outputs, result)))
    return outs


def combine_torch(rule: str, logits: Sequence[Tensor], members: Sequence[int]) -> Tensor:
    """Combined class probabilities after the given completed stages (see DESIGN.md).

    - ``mean_logits``: softmax(Σ logits_j / Σ members_j)
    - ``mean_probs``: mean_j softmax(logits_j / members_j)
    - ``last``: softmax(logits_last / members_last)
    """
    if not logits:
        raise ValueError("combine needs at least one completed stage")
    if rule == "mean_logits":
        return torch.softmax(torch.stack(list(logits)).sum(0) / float(sum(members)), dim=-1)
    if rule == "mean_probs":
        return torch.stack([torch.softmax(l / m, dim=-1) for l, m in zip(logits, members)]).mean(0)
    if rule == "last":
        return torch.softmax(logits[-1] / members[-1], dim=-1)
    raise ValueError(f"unknown combine rule {rule!r}; known: {', '.join(COMBINE_RULES)}")


def check_stage_list(stages: Sequence[nn.Module]) -> None:
    """Validate wiring: names are stage0..stageK-1 and every binding points backwards."""
    produced: dict[str, set[str]] = {}
    for k, stage in enumerate(stages):
        spec = getattr(stage, "spec", None)
        if not isinstance(spec, StageSpec):
            raise TypeError(f"stage {k} has no StageSpec")
        if spec.name != f"stage{k}":
            raise ValueError(f"stage {k} is named {spec.name!r}, expected 'stage{k}'")
        for b in spec.inputs:
            if b == INPUT:
                continue
            src, _, name = b.partition(":")
            if src not in produced or name not in produced[src]:
                raise ValueError(f"{spec.name} input {b!r} is not produced by an earlier stage")
        produced[spec.name] = set(spec.outputs)
