"""Multi-exit networks (Phuong & Lampert 2019): MSDNet, or exits attached to any backbone.

Two builders, registered in :data:`kdedge.models.MODELS`:

- ``msdnet(...)``: the multi-scale dense network of :mod:`kdedge.models.msdnet`; ``config``
  picks a preset (``"cifar"``: the paper's 3 scales × 24 layers, 11 exits; ``"small"``: 5 exits
  for 28×28 demos; ``"tiny"``: tests), keyword arguments override single fields.
- ``multiexit(...)``: a backbone from :mod:`kdedge.models.backbones` with exits after chosen
  feature blocks (``exits``, indices into ``feature_blocks()``); the last exit is the backbone's
  own classifier.

Both return a model whose ``forward(x)`` is the list of exit logits (first exit first) and
which exposes its stages (:mod:`kdedge.models.stages`): stage m returns exit m's logits
(``members = 1``) and carries what later stages read. A backbone's stage m runs the blocks
between exit m-1 and exit m and carries the feature map ``feat``; an MSDNet stage computes
only the grid nodes exit m needs and carries one node per scale (``s0``, ``s1``, …; see
:mod:`kdedge.models.msdnet`, where its stage class lives). Combine rules: ``mean_probs``
(anytime mode, the default) and ``last`` (budget mode). ``prefixes()`` is empty: see
docs/multiexit.md.

Example:
    >>> m = create_model("msdnet", num_classes=100, in_channels=3, input_size=(32, 32), config="cifar")
    >>> len(m(torch.zeros(2, 3, 32, 32)))
    11
    >>> r = create_model("multiexit", num_classes=10, input_size=(32, 32), backbone="resnet32", exits=[5, 10])
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from kdedge.models.exit_heads import HEADS, ExitHead, init_multiexit_weights
from kdedge.models.msdnet import MSDNet, MSDNetStage, build_msdnet
from kdedge.models.stages import INPUT, Stage, StageSpec

__all__ = ["BackboneMultiExit", "MSDNet", "MSDNetStage", "BackboneStage", "msdnet", "multiexit", "num_exits"]

# multi-exit or multi-branch families that cannot serve as a backbone
_NOT_BACKBONES = ("msdnet", "multiexit", "hne", "ahbf")


def msdnet(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
           config: str = "cifar", num_scales: int | None = None, num_exits: int | None = None,
           layers_to_first_exit: int | None = None, layers_between_exits: int | None = None,
           scale_channels: Sequence[int] | None = None, init_multiple: int | None = None,
           growth_multiple: int | None = None, prune: str | None = None, reduction: float | None = None,
           bottleneck: int | None = None, exit_width: int | None = None, stem: str | None = None) -> MSDNet:
    """MSDNet from a preset (``cifar`` | ``small`` | ``tiny``); other arguments override the
    preset's fields (None keeps it; ``prune="none"`` turns pruning off). See
    :class:`kdedge.models.msdnet.MSDNetConfig` for their meaning.

    Example:
        >>> msdnet(num_classes=10, in_channels=1, input_size=(28, 28), config="small", num_exits=4)
    """
    overrides = dict(num_scales=num_scales, num_exits=num_exits, layers_to_first_exit=layers_to_first_exit,
                     layers_between_exits=layers_between_exits, scale_channels=scale_channels,
                     init_multiple=init_multiple, growth_multiple=growth_multiple, prune=prune, reduction=reduction,
                     bottleneck=bottleneck, exit_width=exit_width, stem=stem)
    return build_msdnet(num_classes, in_channels, input_size, config, overrides)


class _BackboneHead(nn.Module):
    """The backbone's own classifier (``forward_head``) as a module for the last stage.

    Registers only the backbone modules that own head parameters or buffers (not its blocks),
    so the stage graph holds exactly the weights it uses.
    """

    def __init__(self, backbone: nn.Module, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)
        in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
        parts = []
        for mod in backbone.modules():
            own = [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
            if own and not any(id(t) in in_blocks for t in own):
                parts.append(mod)
        self.parts = nn.ModuleList(parts)

    def forward(self, f: Tensor) -> Tensor:
        return self._backbone.forward_head(f)  # type: ignore[operator]


class BackboneStage(Stage):
    """Stage m of a backbone with exits: blocks after exit m-1 up to exit m, then exit m.

    Inputs: the image (m = 0) or ``stage{m-1}:feat``. Outputs: ``logits`` and, except for the
    last stage, ``feat`` (the feature map after the exit's block).
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, m: int, last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.last = last
        self.spec = StageSpec(name=f"stage{m}", inputs=(INPUT,) if m == 0 else (f"stage{m - 1}:feat",),
                              outputs=("logits",) if last else ("logits", "feat"), members=1)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        for b in self.blocks:
            x = b(x)
        logits = self.head(x)
        return (logits,) if self.last else (logits, x)


class BackboneMultiExit(nn.Module):
    """A backbone with early exits after chosen feature blocks; the last exit is its own head.

    Attributes:
        backbone: the wrapped backbone (its parameters are saved once, under ``backbone.``).
        exit_blocks: block index after which each exit sits (the last is the final block).
        heads: the early exits' :class:`ExitHead` modules.
    """

    combine_rules = ("mean_probs", "last")

    def __init__(self, backbone: nn.Module, name: str, exits: Sequence[int], head: str, head_width: int,
                 num_classes: int, shapes: Sequence[tuple[int, ...]]) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone_name, self.head_kind, self.head_width, self.num_classes = name, head, head_width, num_classes
        blocks = list(backbone.feature_blocks())  # type: ignore[operator]
        # a plain attribute: the blocks' parameters already live in self.backbone, and a second
        # registration would duplicate state_dict keys (safetensors refuses shared tensors)
        object.__setattr__(self, "_blocks", blocks)
        last = len(blocks) - 1
        self.exit_blocks = tuple(sorted(set(exits) | {last}))
        self.num_exits = len(self.exit_blocks)
        self.heads = nn.ModuleList([ExitHead(shapes[e][0], num_classes, head, head_width) for e in self.exit_blocks[:-1]])
        init_multiexit_weights(self.heads)

    def forward(self, x: Tensor) -> list[Tensor]:
        logits, start = [], 0
        for k, end in enumerate(self.exit_blocks):
            for b in self._blocks[start:end + 1]:
                x = b(x)
            logits.append(self.heads[k](x) if k < len(self.heads) else self.backbone.forward_head(x))  # type: ignore[operator]
            start = end + 1
        return logits

    def stages(self) -> list[nn.Module]:
        out: list[nn.Module] = []
        start = 0
        for k, end in enumerate(self.exit_blocks):
            last = k == self.num_exits - 1
            head = _BackboneHead(self.backbone, self._blocks) if last else self.heads[k]
            stage = BackboneStage(self._blocks[start:end + 1], head, k, last)
            # the wrappers follow the model's mode (the wrapped modules already do)
            stage.training = head.training = self.training
            out.append(stage)
            start = end + 1
        return out

    def prefixes(self) -> list[nn.Module]:
        return []

    def stage_meta(self) -> dict[str, Any]:
        return {"family": "multiexit", "architecture": "backbone", "backbone": self.backbone_name,
                "exit_blocks": list(self.exit_blocks), "head": self.head_kind, "head_width": self.head_width,
                "num_exits": self.num_exits, "combine_rules": list(self.combine_rules)}


def _default_exits(shapes: Sequence[tuple[int, ...]]) -> list[int]:
    """The last block of every resolution: where the feature map is about to shrink."""
    return [k for k in range(len(shapes) - 1) if shapes[k][1:] != shapes[k + 1][1:]]


def multiexit(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
              backbone: str = "resnet32", exits: Sequence[int] | None = None, head: str = "paper",
              head_width: int = 128, backbone_args: dict[str, Any] | None = None) -> BackboneMultiExit:
    """A backbone with exits after the feature blocks listed in ``exits``.

    Args:
        num_classes, in_channels, input_size: from the dataset.
        backbone: a backbone name in the model registry (resnet20/32/56/110, mobilenetv2,
            tv_resnet18/34/50, tv_mobilenet_v2, small_cnn).
        exits: strictly increasing indices into ``feature_blocks()``; an exit sits after that
            block. The last block always carries the backbone's own classifier as the final
            exit (listing it is allowed). Default: the last block of every resolution.
        head: early exits' head, ``"paper"`` (two stride-2 3×3 conv-BN-ReLU + pool + Linear) or
            ``"linear"`` (pool + Linear).
        head_width: channels of the paper head.
        backbone_args: extra keyword arguments for the backbone builder (e.g. ``{"width": 8}``).

    Raises:
        ValueError: an exit position the backbone does not have (the message lists valid ones),
            an unknown head, or a backbone without ``feature_blocks()``.

    Example:
        >>> multiexit(num_classes=100, input_size=(32, 32), backbone="resnet32", exits=[5, 10])
    """
    from kdedge.models import create_model
    from kdedge.models.backbones import feature_shapes

    if head not in HEADS:
        raise ValueError(f"multiexit: unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if isinstance(head_width, bool) or not isinstance(head_width, int) or head_width < 1:
        raise ValueError(f"multiexit: head_width must be a positive integer, got {head_width!r}")
    if backbone in _NOT_BACKBONES:
        raise ValueError(f"multiexit: {backbone!r} is not a backbone; use resnet20/32/56/110, mobilenetv2, "
                         f"tv_resnet18/34/50, tv_mobilenet_v2 or small_cnn")
    net = create_model(backbone, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                       **(backbone_args or {}))
    if not all(callable(getattr(net, a, None)) for a in ("feature_blocks", "forward_head")):
        raise ValueError(f"multiexit: {backbone!r} exposes no feature_blocks()/forward_head(); pick a backbone "
                         f"from kdedge.models.backbones")
    size = tuple(input_size) if input_size is not None else (64, 64)  # channel counts only; any valid size
    shapes = feature_shapes(net, (in_channels, int(size[0]), int(size[1])))
    n = len(shapes)
    valid = "; ".join(f"{k}: {'x'.join(str(d) for d in s)}" for k, s in enumerate(shapes))
    if exits is None:
        exits = _default_exits(shapes)
    exits = list(exits)
    for e in exits:
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < n:
            raise ValueError(f"multiexit: {backbone} has no exit position {e!r}; valid positions are 0..{n - 1} "
                             f"(after feature block k; {n - 1} is the backbone's own classifier). "
                             f"Block outputs (C x H x W): {valid}")
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise ValueError(f"multiexit: exits must be strictly increasing block indices, got {exits}")
    return BackboneMultiExit(net, backbone, exits, head, head_width, num_classes, shapes)


def num_exits(model: nn.Module) -> int:
    """Number of exits of a multi-exit model (raises ValueError for other models)."""
    n = getattr(model, "num_exits", None)
    if not isinstance(n, int) or not callable(getattr(model, "stages", None)):
        raise ValueError(f"{type(model).__name__} is not a multi-exit network; build one with model.name "
                         f"'msdnet' or 'multiexit'")
    return n
