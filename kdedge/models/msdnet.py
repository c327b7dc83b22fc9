"""Multi-Scale Dense Network (MSDNet, Huang et al. 2018) as used by Phuong & Lampert (2019).

The network is a grid of S scales (rows) × L layers (columns). Layer 0 builds the scales from
the image (scale s has 1/2^s the resolution of scale 0). Every later layer appends new feature
maps to each scale it computes (dense connectivity): scale s concatenates

    [x_s, conv(x_s), conv_down(x_{s-1})]                         (s > 0: half the growth each)
    [x_0, conv(x_0)]                                             (s = 0)

where ``conv`` is a bottleneck (1×1 conv-BN-ReLU → 3×3 conv-BN-ReLU) and ``conv_down`` the same
with a stride-2 3×3. Transition layers (1×1 conv-BN-ReLU per scale) compress the channels by
``reduction`` at fixed depths. Exits read the coarsest scale only.

Channel counts follow the authors' configuration: at column c scale s holds
``scale_channels[s] · h_c`` channels, with ``h_0 = init_multiple``, ``h`` growing by
``growth_multiple`` per layer and ``h ← floor(h · reduction)`` at a transition.

*Pruning* drops scales that no later exit needs:
- ``"min"`` (the authors' CIFAR setting): the last S-1 layers drop the finest scales one by one,
  the least computation that still feeds the last exit; transitions after layers ⌊L/3⌋, ⌊2L/3⌋.
- ``"max"`` (the original MSDNet): every ⌈L/S⌉ layers the finest scale is dropped, followed by a
  transition;
- ``None``: keep every scale; transitions as for ``"min"``.

The network is cut into blocks, one per exit: block m holds the layers after exit m-1 up to exit
m (and a transition that follows its last layer), so stage m of the anytime model is block m plus
exit m's head, carrying the scales that block m+1 reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kdedge.models.exit_heads import ExitHead, init_multiexit_weights

PRUNE_MODES = ("min", "max", None)
STEMS = ("cifar", "imagenet")
MAX_SCALES = 8  # stage modules take at most this many carried scales (explicit forward parameters)


@dataclass(frozen=True)
class MSDNetConfig:
    """Architecture hyper-parameters (see the module docstring for what each one does).

    Args:
        num_scales: S, number of resolutions.
        num_exits: number of exits (classifiers).
        layers_to_first_exit: layers before the first exit (the paper's CIFAR net: 4).
        layers_between_exits: layers between consecutive exits (CIFAR: 2).
        scale_channels: per-scale channel unit (the growth of one layer), coarser scales last.
        init_multiple: layer 0 gives scale s ``init_multiple · scale_channels[s]`` channels.
        growth_multiple: each layer adds ``growth_multiple · scale_channels[s]`` channels.
        prune: ``"min"``, ``"max"`` or None.
        reduction: transition compression factor in (0, 1]; 0 disables transitions.
        bottleneck: bottleneck width factor (inner channels ``min(C_in, bottleneck · growth)``);
            0 means a single 3×3 conv.
        exit_width: channels of the two convolutions of each exit head.
        stem: ``"cifar"`` (3×3 stride-1 conv) or ``"imagenet"`` (7×7 stride-2 conv + max-pool).
    """

    num_scales: int = 3
    num_exits: int = 11
    layers_to_first_exit: int = 4
    layers_between_exits: int = 2
    scale_channels: tuple[int, ...] = (6, 12, 24)
    init_multiple: int = 1
    growth_multiple: int = 1
    prune: str | None = "min"
    reduction: float = 0.5
    bottleneck: int = 4
    exit_width: int = 128
    stem: str = "cifar"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"msdnet: {msg}")

        for name in ("num_scales", "num_exits", "layers_to_first_exit", "layers_between_exits",
                     "init_multiple", "growth_multiple", "exit_width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 0:
            raise bad(f"bottleneck must be an integer >= 0 (0 = none), got {self.bottleneck!r}")
        if self.num_scales > MAX_SCALES:
            raise bad(f"num_scales must be at most {MAX_SCALES} (a {2 ** (MAX_SCALES - 1)}x downsampling), "
                      f"got {self.num_scales}")
        if len(self.scale_channels) != self.num_scales:
            raise bad(f"scale_channels has {len(self.scale_channels)} entries for num_scales={self.num_scales}; "
                      f"give one channel unit per scale")
        if any(int(c) < 1 for c in self.scale_channels):
            raise bad(f"scale_channels must be positive, got {list(self.scale_channels)}")
        for s, c in enumerate(self.scale_channels[1:], start=1):
            if (c * self.growth_multiple) % 2:
                raise bad(f"scale {s} grows by {c * self.growth_multiple} channels per layer, split evenly between "
                          f"its own conv and the strided conv from scale {s - 1}; make scale_channels[{s}] even")
        if self.prune not in PRUNE_MODES:
            raise bad(f"prune must be 'min', 'max' or null, got {self.prune!r}")
        if not 0.0 <= self.reduction <= 1.0:
            raise bad(f"reduction must be in [0, 1] (0 = no transitions), got {self.reduction!r}")
        if self.stem not in STEMS:
            raise bad(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")

    @property
    def num_layers(self) -> int:
        """L, the layers after layer 0."""
        return self.layers_to_first_exit + self.layers_between_exits * (self.num_exits - 1)


# The paper's CIFAR-100 network (3 scales × 24 layers, 11 exits) with the authors' channel
# settings; "small" for 28×28 demos (a few minutes of CPU training); "tiny" for tests.
PRESETS: dict[str, MSDNetConfig] = {
    "cifar": MSDNetConfig(),
    "small": MSDNetConfig(num_scales=3, num_exits=5, layers_to_first_exit=2, layers_between_exits=2,
                          scale_channels=(4, 8, 16), init_multiple=2, exit_width=32),
    "tiny": MSDNetConfig(num_scales=2, num_exits=3, layers_to_first_exit=1, layers_between_exits=1,
                         scale_channels=(2, 4), init_multiple=2, bottleneck=2, exit_width=8),
}


@dataclass(frozen=True)
class Column:
    """One column of the grid: ``kind`` is first | layer | transition; ``channels[s]`` is 0 for
    a scale the column does not compute."""

    kind: str
    channels: tuple[int, ...]


def plan_columns(cfg: MSDNetConfig) -> tuple[list[Column], list[int]]:
    """The grid's columns and, for each exit, the index of the column it reads.

    Returns:
        (columns, exit_columns); block m is columns ``exit_columns[m-1]+1 .. exit_columns[m]``
        (block 0 starts at column 0).
    """
    S, L = cfg.num_scales, cfg.num_layers

    def pruned(layer: int) -> int:  # how many of the finest scales layer ``layer`` (1..L) drops
        if cfg.prune == "min":
            return max(0, S - (L - layer + 1))
        if cfg.prune == "max":
            return min(S - 1, (layer - 1) // math.ceil(L / S))
        return 0

    if cfg.reduction <= 0:
        transitions: set[int] = set()
    elif cfg.prune == "max":
        interval = math.ceil(L / S)
        transitions = set(range(interval + 1, L + 1, interval))
    else:
        transitions = {L // 3, (2 * L) // 3} - {0}
    transitions.discard(L)  # a transition after the last layer would feed nothing but the last exit

    def channels(h: int, drop: int) -> tuple[int, ...]:
        return tuple(0 if s < drop else cfg.scale_channels[s] * h for s in range(S))

    h = cfg.init_multiple
    columns = [Column("first", channels(h, 0))]
    exit_after = {cfg.layers_to_first_exit + k * cfg.layers_between_exits for k in range(cfg.num_exits)}
    exit_columns: list[int] = []
    for layer in range(1, L + 1):
        h += cfg.growth_multiple
        columns.append(Column("layer", channels(h, pruned(layer))))
        if layer in transitions:
            h = max(1, math.floor(h * cfg.reduction))
            columns.append(Column("transition", channels(h, pruned(layer))))
        if layer in exit_after:
            exit_columns.append(len(columns) - 1)
    return columns, exit_columns


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _bottleneck(c_in: int, c_out: int, stride: int, width: int) -> nn.Sequential:
    if width <= 0:
        return _conv_bn_relu(c_in, c_out, 3, stride)
    mid = min(c_in, width * c_out)
    return nn.Sequential(_conv_bn_relu(c_in, mid, 1), _conv_bn_relu(mid, c_out, 3, stride))


class FirstLayer(nn.Module):
    """Layer 0: the image to every scale (stride 2 between scales)."""

    def __init__(self, in_channels: int, channels: Sequence[int], stem: str) -> None:
        super().__init__()
        first: nn.Module = _conv_bn_relu(in_channels, channels[0], 3)
        if stem == "imagenet":
            first = nn.Sequential(_conv_bn_relu(in_channels, channels[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        self.convs = nn.ModuleList([first] + [_conv_bn_relu(channels[s - 1], channels[s], 3, 2)
                                              for s in range(1, len(channels))])

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        x = xs[0]
        out: list[Tensor | None] = []
        for conv in self.convs:
            x = conv(x)
            out.append(x)
        return out


class DenseLayer(nn.Module):
    """One MSDNet layer: every computed scale appends conv(x_s) (and conv_down(x_{s-1}))."""

    def __init__(self, prev: Sequence[int], new: Sequence[int], bottleneck: int) -> None:
        super().__init__()
        self.scales = tuple(s for s, c in enumerate(new) if c)
        self.has_down = tuple(s > 0 and prev[s - 1] > 0 for s in self.scales)
        self.same = nn.ModuleList()
        self.down = nn.ModuleList()  # only for scales with a finer input, in scale order
        for s, down in zip(self.scales, self.has_down):
            growth = new[s] - prev[s]
            if growth <= 0 or prev[s] <= 0:
                raise ValueError(f"msdnet: scale {s} grows from {prev[s]} to {new[s]} channels; check the config")
            if down:
                self.down.append(_bottleneck(prev[s - 1], growth // 2, 2, bottleneck))
                growth -= growth // 2
            self.same.append(_bottleneck(prev[s], growth, 1, bottleneck))

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(xs)
        d = 0
        for i, (s, down) in enumerate(zip(self.scales, self.has_down)):
            x = xs[s]
            parts = [x, self.same[i](x)]
            if down:
                parts.append(self.down[d](xs[s - 1]))
                d += 1
            out[s] = torch.cat(parts, dim=1)
        return out


class Transition(nn.Module):
    """1×1 conv-BN-ReLU per computed scale, compressing channels."""

    def __init__(self, prev: Sequence[int], new: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(s for s, c in enumerate(new) if c)
        self.convs = nn.ModuleList([_conv_bn_relu(prev[s], new[s], 1) for s in self.scales])

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(xs)
        for s, conv in zip(self.scales, self.convs):
            out[s] = conv(xs[s])
        return out


class MSDBlock(nn.Module):
    """The columns between two exits, applied in order to a list of per-scale tensors."""

    def __init__(self, columns: Sequence[nn.Module], needs: tuple[int, ...], gives: tuple[int, ...]) -> None:
        super().__init__()
        self.columns = nn.ModuleList(columns)
        self.needs = needs  # scales read from the previous block (the image for block 0)
        self.gives = gives  # scales its last column computes

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        for col in self.columns:
            xs = col(xs)
        return xs


def _needed_scales(column: Column, prev: Column) -> tuple[int, ...]:
    """Scales of ``prev`` that ``column`` reads."""
    new = [s for s, c in enumerate(column.channels) if c]
    if column.kind == "transition":
        return tuple(new)
    need = set(new)
    need.update(s - 1 for s in new if s > 0 and prev.channels[s - 1] > 0)
    return tuple(sorted(need))


class MSDNet(nn.Module):
    """MSDNet; ``forward`` returns the list of exit logits, first exit first.

    Attributes:
        cfg: the :class:`MSDNetConfig`.
        blocks: one :class:`MSDBlock` per exit. ``exits``: one :class:`ExitHead` per exit.
        num_exits: number of exits. ``combine_rules``: anytime (``mean_probs``), then budget (``last``).
    """

    combine_rules = ("mean_probs", "last")

    def __init__(self, cfg: MSDNetConfig, num_classes: int, in_channels: int,
                 input_size: tuple[int, int] | None = None, preset: str | None = None) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.in_channels, self.preset = cfg, num_classes, in_channels, preset
        self.input_size = input_size
        columns, exit_cols = plan_columns(cfg)
        self.columns_plan = columns
        self.num_exits = cfg.num_exits
        blocks, exits = [], []
        start = 0
        for m, end in enumerate(exit_cols):
            mods: list[nn.Module] = []
            for c in range(start, end + 1):
                col = columns[c]
                if col.kind == "first":
                    mods.append(FirstLayer(in_channels, col.channels, cfg.stem))
                elif col.kind == "layer":
                    mods.append(DenseLayer(columns[c - 1].channels, col.channels, cfg.bottleneck))
                else:
                    mods.append(Transition(columns[c - 1].channels, col.channels))
            needs = (0,) if start == 0 else _needed_scales(columns[start], columns[start - 1])
            gives = tuple(s for s, ch in enumerate(columns[end].channels) if ch)
            blocks.append(MSDBlock(mods, needs, gives))
            exits.append(ExitHead(columns[end].channels[-1], num_classes, "paper", cfg.exit_width))
            start = end + 1
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(exits)
        init_multiexit_weights(self)

    def carried(self, m: int) -> tuple[int, ...]:
        """Scales stage m passes on (those block m+1 reads); empty for the last stage."""
        if m + 1 >= self.num_exits:
            return ()
        return self.blocks[m + 1].needs  # type: ignore[union-attr,return-value]

    def forward(self, x: Tensor) -> list[Tensor]:
        xs: list[Tensor | None] = [x] + [None] * (self.cfg.num_scales - 1)
        logits = []
        for block, head in zip(self.blocks, self.exits):
            xs = block(xs)
            logits.append(head(xs[-1]))
        return logits

    def stages(self) -> list[nn.Module]:
        from kdedge.models.multiexit import MSDNetStage

        return [MSDNetStage(self, m) for m in range(self.num_exits)]

    def prefixes(self) -> list[nn.Module]:
        return []

    def stage_meta(self) -> dict[str, Any]:
        d = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}
        d["scale_channels"] = list(self.cfg.scale_channels)
        return {"family": "multiexit", "architecture": "msdnet", "preset": self.preset, "config": d,
                "num_exits": self.num_exits, "combine_rules": list(self.combine_rules)}


def build_msdnet(num_classes: int, in_channels: int, input_size: Sequence[int] | None, config: str,
                 overrides: dict[str, Any]) -> MSDNet:
    """An MSDNet from a preset name plus overrides (None values keep the preset's)."""
    if config not in PRESETS:
        from kdedge.models import suggest

        raise ValueError(f"msdnet: unknown config {config!r}; {suggest(config, PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "scale_channels" in given:
        given["scale_channels"] = tuple(int(c) for c in given["scale_channels"])
    if "prune" in given and given["prune"] in ("none", "None", "null"):
        given["prune"] = None
    cfg = replace(PRESETS[config], **given)
    size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
    if size is not None:
        down = 2 ** (cfg.num_scales - 1) * (4 if cfg.stem == "imagenet" else 1)
        if min(size) < down:
            raise ValueError(f"msdnet: {cfg.num_scales} scales with the {cfg.stem} stem need inputs of at least "
                             f"{down}x{down}, got {size[0]}x{size[1]}; use fewer scales (num_scales) or larger images")
    return MSDNet(cfg, num_classes, in_channels, size, preset=config)
