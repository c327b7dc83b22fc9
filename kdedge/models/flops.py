"""Multiply-add (MAC) and parameter counts for models and stages.

What is counted, everywhere in kdedge (manifests, reports, tests):

- **MACs** (what the papers and most model zoos call "FLOPs"): one multiply-add per weight
  use. A convolution costs ``out_elems · (C_in / groups) · kH · kW``, so grouped and depthwise
  convolutions (including ``F.conv2d(..., groups=g)`` called directly) are counted correctly;
  a linear layer costs ``batch · in_features · out_features``; ``mm``/``bmm``/``matmul``,
  ``einsum`` contractions (they lower to ``bmm``), matrix-vector and dot products and scaled
  dot-product attention are counted as their inner products.
- **Not counted**: biases, BatchNorm (it folds into the preceding conv at inference),
  activations, pooling, elementwise adds/multiplies (residuals, attention weights) and softmax.
  They are small next to the convolutions of the networks kdedge builds, and leaving them out is
  the convention of the published numbers we compare with (ResNet ≈ 1.82 G for resnet18 at
  224², MobileNetV2 ≈ 300 M).
- **Parameters**: unique ``nn.Parameter`` objects (a parameter shared by two submodules is
  counted once), BatchNorm affine weights included, buffers (running statistics) excluded.

The MAC count uses :class:`torch.utils.flop_counter.FlopCounterMode`, which intercepts aten
operators at dispatch, so it sees functional code and any module that takes several tensors
and returns a tuple (the stage modules of :mod:`kdedge.models.stages`). It reports FLOPs as
2·MACs; we halve them.

Example:
    >>> from kdedge.models import create_model
    >>> cost = count_cost(create_model("resnet32").eval(), torch.zeros(1, 3, 32, 32))
    >>> round(cost.macs / 1e6, 1), round(cost.params / 1e6, 3)
    (69.1, 0.467)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdedge.models.stages import StageSpec, run_stages

__all__ = ["Cost", "count_cost", "count_macs", "count_params", "stage_costs"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass of one sample.

    Attributes:
        macs: multiply-adds (the "FLOPs" of the papers; 2·macs floating-point operations).
        params: number of unique parameters.
    """

    macs: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)


# FlopCounterMode has no formulas for matrix-vector and dot products (``x @ v`` with a 1-D v);
# without these, such a product would silently count zero. Formulas return FLOPs (2·MACs) like
# the built-in ones; the ``out_shape`` keyword is supplied by FlopCounterMode's shape wrapper.
def _mv_flop(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    m, n = a_shape
    return 2 * m * n


def _addmv_flop(self_shape: Any, a_shape: Sequence[int], b_shape: Sequence[int], *args: Any,
                out_shape: Any = None, **kwargs: Any) -> int:
    return _mv_flop(a_shape, b_shape)


def _dot_flop(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * a_shape[0]


_EXTRA_FORMULAS = {aten.mv: _mv_flop, aten.addmv: _addmv_flop, aten.dot: _dot_flop, aten.vdot: _dot_flop}


@contextlib.contextmanager
def _eval_no_grad(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Eval mode and no grad for the duration; restore each submodule's own training flag
    afterwards (``module.train(was)`` would overwrite flags set per submodule, e.g. frozen BN)."""
    flags = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for top in modules:
            top.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was in flags:
            m.training = was


def _check_batch_one(inputs: Sequence[Any]) -> None:
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] != 1:
            raise ValueError(
                f"cost counting is per sample: input {i} has shape {tuple(x.shape)}, batch {x.shape[0]}; "
                f"pass example inputs with batch size 1"
            )


def _macs_of_call(module: nn.Module, inputs: Sequence[Any]) -> tuple[int, Any]:
    """Run ``module(*inputs)`` under a FLOP counter; return (MACs, output)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        out = module(*inputs)
    flops = counter.get_total_flops()
    # Every formula counts 2 FLOPs per multiply-add, so this division is exact.
    return flops // 2, out


def count_params(module: nn.Module) -> int:
    """Number of unique parameters of ``module`` (a parameter shared by several submodules,
    e.g. tied weights or a block reused by two stages, is counted once).

    Example:
        >>> count_params(nn.Linear(4, 3))
        15
    """
    return sum(p.numel() for p in _unique_params(module))


def _unique_params(module: nn.Module) -> list[nn.Parameter]:
    # parameters() already de-duplicates by identity; the dict keeps that explicit and ordered.
    return list({id(p): p for p in module.parameters()}.values())


def count_macs(module: nn.Module, *example_inputs: Any) -> int:
    """Multiply-adds of one forward pass of ``module`` on ``example_inputs`` (batch size 1).

    The module runs in eval mode under ``torch.no_grad()``; its training flags are restored.
    See the module docstring for what is and is not counted.

    Raises:
        ValueError: an input of two or more dimensions has a batch size other than 1.

    Example:
        >>> count_macs(nn.Conv2d(8, 16, 3, padding=1, groups=2), torch.zeros(1, 8, 10, 10))
        57600
    """
    _check_batch_one(example_inputs)
    with _eval_no_grad([module]):
        macs, _ = _macs_of_call(module, example_inputs)
    return macs


def count_cost(module: nn.Module, *example_inputs: Any) -> Cost:
    """MACs of one forward pass on batch-1 ``example_inputs`` and the unique parameter count.

    Works for any module whose forward takes several tensors and returns a tuple (stages).

    Example:
        >>> count_cost(nn.Linear(4, 3), torch.zeros(1, 4))
        Cost(macs=12, params=15)
    """
    return Cost(count_macs(module, *example_inputs), count_params(module))


class _CountingStage(nn.Module):
    """Wraps a stage so that ``run_stages`` wires it as usual while its own MACs are counted."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        spec = getattr(stage, "spec", None)
        if not isinstance(spec, StageSpec):
            raise ValueError(f"{type(stage).__name__} is not a stage (it has no StageSpec in .spec)")
        self.stage = stage
        self.spec = spec
        self.macs = 0

    def forward(self, *inputs: Tensor) -> Any:
        self.macs, out = _macs_of_call(self.stage, inputs)
        return out


def _example_input(stages: Sequence[nn.Module], input_shape: tuple[int, int, int]) -> Tensor:
    """A batch-1 zero image on the device (and floating dtype) of the stages' parameters."""
    for stage in stages:
        for p in stage.parameters():
            dtype = p.dtype if p.dtype.is_floating_point else torch.float32
            return torch.zeros(1, *input_shape, device=p.device, dtype=dtype)
    return torch.zeros(1, *input_shape)


def stage_costs(stages: Sequence[nn.Module], input_shape: tuple[int, int, int]) -> list[Cost]:
    """The cost of each stage of an anytime model, in execution order.

    The stages run with :func:`~kdedge.models.stages.run_stages` on a batch-1 zero input of
    shape ``(1, *input_shape)``, in eval mode (training flags are restored). Stage k's MACs are
    those of its own forward pass only (tensors carried from earlier stages are not recomputed).
    Stage k's parameters are those it owns that no earlier stage owns: a parameter shared with
    an earlier stage (e.g. a trunk referenced by several exits) is counted in the first stage
    that uses it only, so ``sum(c.params for c in stage_costs(...))`` is the number of unique
    parameters of the whole stage list.

    Args:
        stages: stage modules (each with a ``spec``), e.g. ``model.stages()``.
        input_shape: ``(C, H, W)`` of one input image.

    Returns:
        One :class:`Cost` per stage.

    Raises:
        ValueError: ``input_shape`` is not three positive sizes, or a module is not a stage.

    Example:
        >>> costs = stage_costs(model.stages(), (3, 32, 32))
        >>> [c.macs for c in costs]
    """
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    counting = [_CountingStage(s) for s in stages]
    x = _example_input(stages, tuple(int(s) for s in input_shape))  # type: ignore[arg-type]
    with _eval_no_grad(list(stages)):
        run_stages(counting, x)
    seen: set[int] = set()
    costs = []
    for c in counting:
        own = [p for p in _unique_params(c.stage) if id(p) not in seen]
        seen.update(id(p) for p in own)
        costs.append(Cost(c.macs, sum(p.numel() for p in own)))
    return costs
