"""Which graphs a model exports: its stages (and fused prefixes), checked against the stage
contract of :mod:`kdedge.models.stages`, with the graph tensor names of the bundle.

Works for any model family: only ``stages()``, ``prefixes()``, ``combine_rules`` and each
stage's ``spec`` are read. A model with ``deploy()`` (AHBF: the target student without its
auxiliary branches) is exported as ``model.deploy()``. A plain classifier (no ``stages()``)
is exported as one stage with members = 1 and the ``last`` rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdedge.bundle.names import output_tensor_name, tensor_name
from kdedge.export.errors import ExportError
from kdedge.models.stages import COMBINE_RULES, INPUT, Stage, StageSpec, check_stage_list, run_stages
from kdedge.targets.base import GraphSource


class WholeModelStage(Stage):
    """A plain classifier as a one-stage anytime model (``logits = model(input)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.spec = StageSpec(name="stage0", inputs=(INPUT,), outputs=("logits",), logits="logits", members=1)

    def forward(self, x: Tensor) -> tuple[Tensor]:
        return (self.model(x),)


@dataclass
class Graph:
    """One graph to export: a stage or a fused prefix.

    ``inputs``/``outputs`` are the graph tensor names (docs/bundle.md, "Tensor names").
    """

    kind: str  # "stage" | "prefix"
    index: int
    module: nn.Module
    spec: StageSpec
    members_total: int
    last_stage: int
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def logits_tensor(self) -> str:
        return self.outputs[self.spec.outputs.index(self.spec.logits)]


@dataclass
class ModelPlan:
    """The deployed model and the graphs it exports."""

    model: nn.Module
    family: str
    model_class: str
    meta: dict[str, Any]
    rules: tuple[str, ...]
    stages: list[Graph]
    prefixes: list[Graph]

    @property
    def graphs(self) -> list[Graph]:
        return self.stages + self.prefixes

    @property
    def members(self) -> list[int]:
        return [g.spec.members for g in self.stages]


def deployed(model: nn.Module) -> nn.Module:
    """``model.deploy()`` when the family strips training-only parts for deployment, else the model."""
    deploy = getattr(model, "deploy", None)
    if callable(deploy):
        out = deploy()
        if not isinstance(out, nn.Module):
            raise ExportError(f"{type(model).__name__}.deploy() returned a {type(out).__name__}, not an nn.Module")
        return out
    return model


def _family(model: nn.Module, meta: dict[str, Any]) -> str:
    for value in (getattr(model, "family", None), meta.get("family")):
        if isinstance(value, str) and value:
            return value
    return type(model).__name__.lower()


def _names(kind: str, spec: StageSpec) -> tuple[list[str], list[str]]:
    ins = [tensor_name(b) for b in spec.inputs]
    outs = [output_tensor_name(spec.name, o) for o in spec.outputs]
    if len(set(outs)) != len(outs):
        raise ExportError(f"{spec.name}: output names {spec.outputs} collide once made safe ({outs}); rename them "
                          "to letters, digits and '_'")
    if len(set(ins)) != len(ins):
        raise ExportError(f"{spec.name}: inputs {spec.inputs} bind the same tensor twice; bind it once")
    return ins, outs


def plan_model(model: nn.Module) -> ModelPlan:
    """Check a model against the stage contract and list its graphs.

    The graphs are exported from CPU in eval mode: a model with weights elsewhere is copied to
    the CPU (the caller's model stays where it is); eval mode is set on the model itself, so
    callers restore training flags if they need them (:func:`kdedge.export.export` does).

    Raises:
        ExportError: the model breaks the contract (the message names the rule).
    """
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        import copy

        model = copy.deepcopy(model).cpu()
    model = deployed(model).eval()
    if callable(getattr(model, "stages", None)):
        rules = tuple(getattr(model, "combine_rules", ()))
        if not rules:
            raise ExportError(f"{type(model).__name__} has stages() but no combine_rules; the first rule is the default")
        stage_mods = list(model.stages())
        prefix_fn = getattr(model, "prefixes", None)
        prefix_mods = list(prefix_fn()) if callable(prefix_fn) else []
    else:
        rules = ("last",)
        stage_mods = [WholeModelStage(model)]
        prefix_mods = []
    unknown = [r for r in rules if r not in COMBINE_RULES]
    if unknown:
        raise ExportError(f"{type(model).__name__}.combine_rules has unknown rule(s) {unknown}; known: {COMBINE_RULES}")
    if not stage_mods:
        raise ExportError(f"{type(model).__name__}.stages() returned no stages")
    try:
        check_stage_list(stage_mods)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{type(model).__name__} breaks the stage contract: {e}") from None
    meta_fn = getattr(model, "stage_meta", None)
    meta = dict(meta_fn()) if callable(meta_fn) else {}
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ExportError(f"{type(model).__name__}.stage_meta() is not JSON-serialisable: {e}") from None

    stages: list[Graph] = []
    total = 0
    for k, mod in enumerate(stage_mods):
        spec = mod.spec
        total += spec.members
        ins, outs = _names("stage", spec)
        stages.append(Graph("stage", k, mod, spec, total, k, ins, outs))
    prefixes: list[Graph] = []
    for k, mod in enumerate(prefix_mods):
        spec = getattr(mod, "spec", None)
        if not isinstance(spec, StageSpec):
            raise ExportError(f"prefix {k} of {type(model).__name__} has no StageSpec")
        if spec.name != f"prefix{k}":
            raise ExportError(f"prefix {k} is named {spec.name!r}, expected 'prefix{k}'")
        if tuple(spec.inputs) != (INPUT,):
            raise ExportError(f"{spec.name} must read only 'input', it reads {spec.inputs}")
        if k >= len(stages):
            raise ExportError(f"{type(model).__name__} has {len(prefix_mods)} prefixes for {len(stages)} stages")
        if spec.members != stages[k].members_total:
            raise ExportError(f"{spec.name} has members={spec.members}, but stages 0..{k} complete "
                              f"{stages[k].members_total} members")
        ins, outs = _names("prefix", spec)
        prefixes.append(Graph("prefix", k, mod, spec, spec.members, k, ins, outs))
    return ModelPlan(model=model, family=_family(model, meta), model_class=type(model).__name__, meta=meta,
                     rules=rules, stages=stages, prefixes=prefixes)


@torch.no_grad()
def run_torch(plan: ModelPlan, x: Tensor, prefixes: bool = True) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Run the stages (and prefixes) in torch; outputs keyed by graph tensor name."""
    raw = run_stages([g.module for g in plan.stages], x)
    stage_outs = [{t: raw[k][o] for t, o in zip(g.outputs, g.spec.outputs)} for k, g in enumerate(plan.stages)]
    prefix_outs: list[dict[str, Tensor]] = []
    if prefixes:
        for g in plan.prefixes:
            res = g.module(x)
            res = (res,) if isinstance(res, Tensor) else tuple(res)
            if len(res) != len(g.outputs):
                raise ExportError(f"{g.name} returned {len(res)} tensors, its spec lists {len(g.outputs)}")
            prefix_outs.append(dict(zip(g.outputs, res)))
    return stage_outs, prefix_outs


def graph_example_inputs(plan: ModelPlan, x: Tensor) -> dict[str, tuple[Tensor, ...]]:
    """Example positional inputs of every graph, from running the stages on ``x``."""
    stage_outs, _ = run_torch(plan, x, prefixes=False)
    carried = {t: v for outs in stage_outs for t, v in outs.items()}
    carried[INPUT] = x
    return {g.name: tuple(carried[t] for t in g.inputs) for g in plan.graphs}


def shapes_of(tensors: Sequence[Tensor]) -> list[list[int | None]]:
    """Shapes with the batch dimension made dynamic (``None``)."""
    return [[None, *[int(d) for d in t.shape[1:]]] for t in tensors]


def graph_sources(plan: Any, examples: dict[str, tuple[Any, ...]], root: Path, folder: str = "onnx",
                  suffix: str = ".onnx") -> list[GraphSource]:
    """The graphs of an export plan (:class:`kdedge.export.graphs.ModelPlan`) with their modules,
    example inputs and the ONNX files written under ``root/folder``."""
    from kdedge.export.onnx import dtype_name


    out = []
    for g in plan.graphs:
        ex = tuple(examples[g.name])
        out.append(GraphSource(name=g.name, inputs=tuple(g.inputs), outputs=tuple(g.outputs),
                               input_shapes=tuple(tuple(int(d) for d in t.shape[1:]) for t in ex),
                               input_dtypes=tuple(dtype_name(t) for t in ex), module=g.module, example=ex,
                               onnx=root / folder / f"{g.name}{suffix}"))
    return out
