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

The parameters are grouped into blocks, one per exit: block m holds the layers after exit m-1 up
to exit m (and a transition that follows its last layer); ``forward`` runs them block by block.

**Stages defer scales** (:func:`plan_stages`). Exit m reads the coarsest scale at its column e_m,
which reads scales S-1 and S-2 one layer earlier, and so on: the grid nodes (scale, column) that
exit m depends on form a cone that reaches scale s only up to about S-1-s layers before e_m.
Stage m computes exactly the nodes of exit m's cone that no earlier stage computed, in column
order, then exit m's head; a node that only later exits read is left to the first stage whose
exit needs it. Stage m carries the last node of each scale it computed that a later stage reads
(output ``s{scale}``), and a stage binds each scale it reads to the stage that computed it
(usually the previous one). Every node is computed once, by the same modules on the same inputs
as in ``forward``, so each exit is bit-identical to the full forward's, the stages' MACs still
add up to one forward of the whole network, and stopping after exit m costs exactly exit m's
cone plus heads 0..m (CIFAR: exit 1 costs 10.5 M MACs instead of 15.3 M).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

from torch import Tensor, nn

from kdedge.models.exit_heads import ExitHead, init_multiexit_weights
from kdedge.models.msdnet_layers import DenseLayer, FirstLayer, GridColumn, Transition
from kdedge.models.stages import INPUT, Stage, StageSpec
from kdedge.registry import suggest

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


Node = tuple[int, int]  # (scale, column) of the grid
IMAGE: Node = (0, -1)  # the input image, read by layer 0's scale 0


def node_reads(columns: Sequence[Column], node: Node) -> tuple[Node | None, Node | None]:
    """The nodes grid node ``(s, c)`` reads: ``(same, finer)`` as passed to
    :meth:`~kdedge.models.msdnet_layers.GridColumn.forward_scale` (None: not read).

    Layer 0: scale 0 reads the image (:data:`IMAGE`), scale s > 0 layer 0's scale s-1. A layer:
    scale s of the previous column and, when the previous column has it, scale s-1 (the strided
    ``conv_down``). A transition: scale s of the previous column.
    """
    s, c = node
    col = columns[c]
    if not col.channels[s]:
        raise ValueError(f"msdnet: column {c} does not compute scale {s}")
    if col.kind == "first":
        return None, (IMAGE if s == 0 else (s - 1, 0))
    if col.kind == "transition":
        return (s, c - 1), None
    return (s, c - 1), ((s - 1, c - 1) if s > 0 and columns[c - 1].channels[s - 1] else None)


@dataclass(frozen=True)
class StagePlan:
    """What one stage computes (:func:`plan_stages`).

    Attributes:
        nodes: grid nodes ``(scale, column)`` it computes, in an order that respects their reads
            (column by column, finer scales first).
        exit_node: the node its exit head reads (the coarsest scale at the exit's column).
        inputs: ``(scale, column, stage)`` of every node it reads that an earlier stage computed,
            one per scale at most, finer scales first (stage 0: none, it reads the image).
        carry: nodes it computed that later stages read, one per scale at most, finer first.
    """

    nodes: tuple[Node, ...]
    exit_node: Node
    inputs: tuple[tuple[int, int, int], ...]
    carry: tuple[Node, ...]


def plan_stages(columns: Sequence[Column], exit_columns: Sequence[int]) -> list[StagePlan]:
    """Split the grid into stages, each computing only what its exit needs (module docstring).

    Args:
        columns, exit_columns: from :func:`plan_columns`.

    Returns:
        One :class:`StagePlan` per exit.

    Raises:
        RuntimeError: the grid would make a stage carry or read two columns of one scale (no
            configuration of :class:`MSDNetConfig` does; a guard for new column kinds).

    Example:
        >>> plans = plan_stages(*plan_columns(PRESETS["cifar"]))
        >>> plans[0].carry      # stage 0 hands on scale 0 at layer 2, scale 1 at 3, scale 2 at 4
        ((0, 2), (1, 3), (2, 4))
    """
    S = len(columns[0].channels)
    owner: dict[Node, int] = {}  # node -> the stage that computes it
    per_stage: list[list[Node]] = []
    for m, e in enumerate(exit_columns):
        todo, mine = [(S - 1, e)], set()
        while todo:  # the exit's cone, less what earlier stages computed
            node = todo.pop()
            if node in owner or node in mine or node == IMAGE:
                continue
            mine.add(node)
            todo.extend(n for n in node_reads(columns, node) if n is not None)
        for node in mine:
            owner[node] = m
        per_stage.append(sorted(mine, key=lambda n: (n[1], n[0])))
    reads: list[set[Node]] = [set() for _ in exit_columns]  # nodes of earlier stages each stage reads
    for m, nodes in enumerate(per_stage):
        for node in nodes:
            reads[m].update(n for n in node_reads(columns, node) if n is not None and n != IMAGE and owner[n] != m)
    plans = []
    for m, nodes in enumerate(per_stage):
        carry = tuple(sorted({n for k in range(m + 1, len(per_stage)) for n in reads[k] if owner[n] == m}))
        ins = tuple(sorted(reads[m]))
        for what, got in (("carry", carry), ("read", ins)):
            scales = [n[0] for n in got]
            if len(set(scales)) != len(scales):
                raise RuntimeError(f"msdnet stage {m} would {what} several columns of one scale: {list(got)}")
        plans.append(StagePlan(nodes=tuple(nodes), exit_node=(S - 1, exit_columns[m]),
                               inputs=tuple((s, c, owner[(s, c)]) for s, c in ins), carry=carry))
    return plans


class MSDBlock(nn.Module):
    """The columns between two exits, applied in order to a list of per-scale tensors."""

    def __init__(self, columns: Sequence[nn.Module]) -> None:
        super().__init__()
        self.columns = nn.ModuleList(columns)

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        for col in self.columns:
            xs = col(xs)
        return xs


class MSDNet(nn.Module):
    """MSDNet; ``forward`` returns the list of exit logits, first exit first.

    Attributes:
        cfg: the :class:`MSDNetConfig`.
        blocks: one :class:`MSDBlock` per exit. ``exits``: one :class:`ExitHead` per exit.
        stage_plans: one :class:`StagePlan` per exit (what each stage computes).
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
        self.exit_columns = tuple(exit_cols)
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
            blocks.append(MSDBlock(mods))
            exits.append(ExitHead(columns[end].channels[-1], num_classes, "paper", cfg.exit_width))
            start = end + 1
        self.blocks = nn.ModuleList(blocks)
        self.exits = nn.ModuleList(exits)
        self.stage_plans = plan_stages(columns, exit_cols)
        init_multiexit_weights(self)

    def grid_columns(self) -> list[GridColumn]:
        """The column modules in grid order (``grid_columns()[c]`` computes column c)."""
        return [col for block in self.blocks for col in block.columns]  # type: ignore[union-attr,misc]

    def forward(self, x: Tensor) -> list[Tensor]:
        xs: list[Tensor | None] = [x] + [None] * (self.cfg.num_scales - 1)
        logits = []
        for block, head in zip(self.blocks, self.exits):
            xs = block(xs)
            logits.append(head(xs[-1]))
        return logits

    def stages(self) -> list[Stage]:
        """One stage per exit, each computing only what its exit needs (module docstring)."""
        return [MSDNetStage(self, m) for m in range(self.num_exits)]

    def prefixes(self) -> list[Stage]:
        return []

    def stage_meta(self) -> dict[str, Any]:
        """JSON-able facts for a bundle manifest; ``stage_columns[m][s]`` is the range of columns
        ``[first, last]`` of scale s that stage m computes (None: none)."""
        d = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}
        d["scale_channels"] = list(self.cfg.scale_channels)
        spans = []
        for plan in self.stage_plans:
            cols: list[list[int] | None] = []
            for s in range(self.cfg.num_scales):
                mine = [c for sc, c in plan.nodes if sc == s]
                cols.append([min(mine), max(mine)] if mine else None)
            spans.append(cols)
        return {"family": "multiexit", "architecture": "msdnet", "preset": self.preset, "config": d,
                "num_exits": self.num_exits, "combine_rules": list(self.combine_rules), "stage_columns": spans}


class MSDNetStage(Stage):
    """Stage m of an MSDNet: the grid nodes of its :class:`StagePlan`, then exit m's head
    (parameters shared with the model).

    Inputs: the image (m = 0), else one carried node per scale it reads, finer scales first,
    each bound to the stage that computed it (``stageK:s{scale}``). Outputs: ``logits``, then
    ``s{scale}`` for every node it carries (finer first).
    """

    def __init__(self, model: MSDNet, m: int) -> None:
        super().__init__()
        plan = model.stage_plans[m]
        self.plan = plan
        cols = model.grid_columns()
        # the modules run through their column (a plain attribute, not registered twice); the
        # weights this stage uses are registered, so the stage's graph and parameter count hold
        # exactly those
        object.__setattr__(self, "_columns", cols)
        self.parts = nn.ModuleList(mod for s, c in plan.nodes for mod in cols[c].scale_modules(s))
        self.head = model.exits[m]
        self._reads = [node_reads(model.columns_plan, node) for node in plan.nodes]
        if m == 0:
            self.input_nodes: tuple[Node, ...] = (IMAGE,)
            inputs: tuple[str, ...] = (INPUT,)
        else:
            self.input_nodes = tuple((s, c) for s, c, _ in plan.inputs)
            inputs = tuple(f"stage{k}:s{s}" for s, _, k in plan.inputs)
        if len(self.input_nodes) > MAX_SCALES:  # a plan error, not a user error
            raise RuntimeError(f"msdnet stage {m} reads {len(self.input_nodes)} tensors, more than {MAX_SCALES}")
        self.spec = StageSpec(name=f"stage{m}", inputs=inputs,
                              outputs=("logits", *(f"s{s}" for s, _ in plan.carry)), members=1)
        self.training = model.training  # the wrapper follows the model (export warns in train mode)

    # Explicit positional parameters rather than *inputs: torch.export matches ``dynamic_shapes``
    # (one entry per input) to named parameters, which varargs would nest one level deeper.
    def forward(self, x0: Tensor, x1: Tensor | None = None, x2: Tensor | None = None, x3: Tensor | None = None,
                x4: Tensor | None = None, x5: Tensor | None = None, x6: Tensor | None = None,
                x7: Tensor | None = None) -> tuple[Tensor, ...]:
        given = (x0, x1, x2, x3, x4, x5, x6, x7)[: len(self.input_nodes)]
        vals: dict[Node, Tensor | None] = dict(zip(self.input_nodes, given))
        for (s, c), (same, finer) in zip(self.plan.nodes, self._reads):
            vals[(s, c)] = self._columns[c].forward_scale(s, None if same is None else vals[same],
                                                          None if finer is None else vals[finer])
        logits = self.head(vals[self.plan.exit_node])
        return (logits, *(vals[n] for n in self.plan.carry))  # type: ignore[misc]


def build_msdnet(num_classes: int, in_channels: int, input_size: Sequence[int] | None, config: str,
                 overrides: dict[str, Any]) -> MSDNet:
    """An MSDNet from a preset name plus overrides (None values keep the preset's)."""
    if config not in PRESETS:
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
