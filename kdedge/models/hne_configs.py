"""Named HNE configurations and their resolution into a tree (which layers form which block).

A configuration is the layer list of ONE member network plus the positions where the tree may
split. ``B`` picks how many splits are used (N = 2^B members): the tree's block ``d`` is the run
of layers between split ``d`` and split ``d+1``, built for 2^d nodes. The member architecture
does not depend on B; the baselines of the paper's §4.1 are other split placements of the same
members: *independent* networks put every split before the first layer (nothing shared),
*multi-branch* puts every split at one point (a shared backbone that splits once into N
branches; the paper's backbone is the first three of five blocks).

Configurations (channels per member; ``width`` scales them):

=============== ============ ==========================================================
name            input        what
=============== ============ ==========================================================
``resnet``      32×32        paper Table 2: ResNet, depth-wise separable bottlenecks
``resnet_small`` 32×32       paper's HNE-small: Table 2 with half the channels
``mobilenetv2`` 224×224      paper Table 3: MobileNetV2 ×1.4 members, MobileNetV3-style head
``mnist``       28×28        small bottleneck ResNet for the mnist5k demo
``digits``      8×8          small bottleneck ResNet for sklearn's 8×8 digits
``tiny``        ≥ 4×4        a few hundred parameters per member, for tests
=============== ============ ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

from kdedge.models.backbones import make_divisible
from kdedge.registry import unknown

MAX_B = 5
SHARING = ("tree", "independent", "multibranch")

# Which of a configuration's five split candidates a tree with B splits uses. B = 4 uses the
# first four: the paper's branching layers. Other B keep blocks of similar cost (the paper's
# complexity analysis assumes equal-cost blocks).
SPLIT_CHOICE: dict[int, tuple[int, ...]] = {0: (), 1: (2,), 2: (1, 3), 3: (1, 2, 3), 4: (0, 1, 2, 3), 5: (0, 1, 2, 3, 4)}


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a member network.

    Attributes:
        kind: ``"conv"`` (conv + BN + act), ``"bottleneck"`` (ResNet HNE layer) or ``"mbconv"``
            (MobileNetV2 inverted residual).
        out: output channels of one member.
        stride: spatial stride.
        kernel: kernel size (``conv`` only).
        depthwise: depth-wise convolution, ``out`` must equal the input channels (``conv`` only).
        act: activation (``conv`` only).
        project: 1×1 projection shortcut even when the shape is kept (``bottleneck``; the
            paper's "ResNet+Branching" layers use one).
        expand: expansion ratio (``mbconv``).
    """

    kind: str
    out: int
    stride: int = 1
    kernel: int = 3
    depthwise: bool = False
    act: str | None = "relu"
    project: bool = False
    expand: int = 6


@dataclass(frozen=True)
class TreeConfig:
    """A named configuration: one member's layers, its head and the split candidates.

    Attributes:
        candidates: five layer indices (ascending) where a split may go; a split at index i
            replicates the features just before layer i (i = len(layers): before the head).
        head_hidden: width of the hidden linear layer of the head, or None.
        divisor: channels are rounded to a multiple of this after width scaling.
        input_size: the input size the configuration was designed for.
    """

    name: str
    description: str
    layers: tuple[LayerSpec, ...]
    candidates: tuple[int, ...]
    head_hidden: int | None = None
    divisor: int = 4
    input_size: tuple[int, int] = (32, 32)

    @property
    def stride(self) -> int:
        return math.prod(layer.stride for layer in self.layers)


def _conv(out: int, kernel: int = 3, stride: int = 1, act: str | None = "relu", depthwise: bool = False) -> LayerSpec:
    return LayerSpec("conv", out, stride, kernel=kernel, act=act, depthwise=depthwise)


def _bneck(out: int, stride: int = 1, project: bool = False) -> LayerSpec:
    return LayerSpec("bottleneck", out, stride, project=project)


def _mb(out: int, stride: int = 1) -> LayerSpec:
    return LayerSpec("mbconv", out, stride, expand=6)


def _scaled(cfg: TreeConfig, factor: float, name: str, description: str) -> TreeConfig:
    layers = tuple(replace(l, out=make_divisible(l.out * factor, cfg.divisor)) for l in cfg.layers)
    hidden = None if cfg.head_hidden is None else make_divisible(cfg.head_hidden * factor, cfg.divisor)
    return replace(cfg, name=name, description=description, layers=layers, head_hidden=hidden)


# Paper Table 2. Blocks 1-4 start with a ResNet+Branching layer (projection shortcut). The table
# gives stride 2 for block 4's branching layer but 8×8 both in and out; we follow the
# resolutions (stride 1). The fifth split candidate halves block 4, the most expensive block.
RESNET = TreeConfig(
    name="resnet",
    description="paper Table 2: 16 ResNets of depth 50 with depth-wise separable bottlenecks at B=4 (CIFAR)",
    layers=(
        _conv(16, 3), _conv(64, 1),                                  # block 0
        _bneck(64, 1, True), _bneck(64), _bneck(64),                 # block 1, 32×32
        _bneck(128, 2, True), *[_bneck(128)] * 3,                    # block 2, 16×16
        _bneck(256, 2, True), *[_bneck(256)] * 3,                    # block 3, 8×8
        _bneck(256, 1, True), *[_bneck(256)] * 4,                    # block 4, 8×8
    ),
    candidates=(2, 5, 9, 13, 15),
)

RESNET_SMALL = _scaled(RESNET, 0.5, "resnet_small", "the paper's HNE-small: Table 2 with half the channels (CIFAR)")

# Paper Table 3: MobileNetV2 ×1.4 members (channels 24, 32, 48, 88, 136, 224 = make_divisible of
# 1.4 × MobileNetV2's), the last inverted residual and the 1×1 conv to 1792 replaced by a 1×1
# conv to 1344 and Linear(1344→1792)+ReLU6 as in MobileNetV3. The table lists block 3's
# branching layer as "stride 2, 28×28 → 14×14"; its input is 14×14 and MobileNetV2 keeps the
# resolution there, so we use stride 1.
MOBILENETV2 = TreeConfig(
    name="mobilenetv2",
    description="paper Table 3: 16 MobileNetV2 x1.4 networks with a MobileNetV3-style head at B=4 (ImageNet)",
    layers=(
        _conv(24, 3, 2, "relu6"), _conv(24, 3, 1, "relu6", depthwise=True), _mb(32, 2), _mb(32),  # block 0
        _mb(48, 2), _mb(48), _mb(48),                                # block 1, 28×28
        _mb(88, 2), *[_mb(88)] * 3,                                  # block 2, 14×14
        _mb(136, 1), *[_mb(136)] * 2,                                # block 3, 14×14
        _mb(224, 2), *[_mb(224)] * 2,                                # block 4, 7×7
        _conv(1344, 1, 1, "relu6"),
    ),
    candidates=(4, 7, 11, 14, 16),
    head_hidden=1792,
    divisor=8,
    input_size=(224, 224),
)

MNIST = TreeConfig(
    name="mnist",
    description="small bottleneck ResNet for 28x28 grey digits (mnist5k demo)",
    layers=(
        _conv(16, 3),                                                # 28×28
        _bneck(32, 2, True), _bneck(32),                             # 14×14
        _bneck(64, 2, True), _bneck(64),                             # 7×7
        _bneck(128, 2, True), _bneck(128),                           # 4×4
    ),
    candidates=(1, 2, 4, 5, 6),  # B = 2: blocks of 0.39, 0.52, 0.47 M MACs
    input_size=(28, 28),
)

DIGITS = TreeConfig(
    name="digits",
    description="small bottleneck ResNet for 8x8 digits (sklearn load_digits)",
    layers=(
        _conv(16, 3),                                                # 8×8
        _bneck(32, 1, True), _bneck(32),
        _bneck(64, 2, True), _bneck(64),                             # 4×4
        _bneck(128, 2, True), _bneck(128),                           # 2×2
    ),
    candidates=(1, 3, 4, 5, 6),
    input_size=(8, 8),
)

TINY = TreeConfig(
    name="tiny",
    description="a few hundred parameters per member, for tests (inputs of 4x4 and more)",
    layers=(_conv(4, 3), _bneck(8, 1, True), _bneck(8, 2, True), _bneck(8), _bneck(16, 2, True), _bneck(16)),
    candidates=(1, 2, 3, 4, 5),
    input_size=(8, 8),
)

CONFIGS: dict[str, TreeConfig] = {c.name: c for c in (RESNET, RESNET_SMALL, MOBILENETV2, MNIST, DIGITS, TINY)}


@dataclass(frozen=True)
class TreeSpec:
    """A resolved tree: member layers (width applied), split positions, and what they imply.

    Attributes:
        splits: B layer indices, ascending; block d is ``layers[bounds[d]:bounds[d+1]]``.
    """

    config: str
    layers: tuple[LayerSpec, ...]
    splits: tuple[int, ...]
    head_hidden: int | None
    sharing: str
    width: float
    groups: int

    @property
    def B(self) -> int:
        return len(self.splits)

    @property
    def bounds(self) -> tuple[int, ...]:
        return (0, *self.splits, len(self.layers))

    def block_layers(self, d: int) -> tuple[LayerSpec, ...]:
        b = self.bounds
        return self.layers[b[d]: b[d + 1]]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve(config: str, B: int, width: float = 1.0, sharing: str = "tree", splits: Sequence[int] | None = None,
            groups: int = 1, input_size: Sequence[int] | None = None, in_channels: int = 3) -> TreeSpec:
    """Check a request and return the tree it describes. Every impossible request raises a
    ``ValueError`` naming the fix."""
    if config not in CONFIGS:
        raise unknown(config, CONFIGS, what="hne config")
    cfg = CONFIGS[config]
    if isinstance(B, bool) or not isinstance(B, int) or not 0 <= B <= MAX_B:
        raise ValueError(f"hne B must be an integer from 0 to {MAX_B} (N = 2^B members), got {B!r}; "
                         f"set model.args.B to one of 0..{MAX_B}")
    if not width > 0:
        raise ValueError(f"hne width must be positive, got {width}; use e.g. width: 0.5 for half the channels")
    if in_channels < 1:
        raise ValueError(f"hne needs at least one input channel, got {in_channels}")
    if sharing not in SHARING:
        raise unknown(sharing, SHARING, what="hne sharing")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"hne groups must be a positive integer, got {groups!r}")
    if input_size is not None:
        size = tuple(int(s) for s in input_size)
        if len(size) != 2 or min(size) < cfg.stride:
            raise ValueError(
                f"hne config {config!r} downsamples by {cfg.stride} and needs inputs of at least "
                f"{cfg.stride}x{cfg.stride}, got {size}; resize the data (data.image_size) or pick a config for "
                f"small inputs ('mnist' 28x28, 'digits' 8x8, 'tiny')")
    if splits is not None:
        if sharing != "tree":
            raise ValueError(f"give either splits or sharing={sharing!r}, not both; drop one of them")
        chosen = tuple(int(s) for s in splits)
        if len(chosen) != B:
            raise ValueError(f"splits lists {len(chosen)} split points but B={B}; give B={len(chosen)} or {B} split points")
        if list(chosen) != sorted(chosen) or not all(0 <= s <= len(cfg.layers) for s in chosen):
            raise ValueError(f"splits must be ascending layer indices in 0..{len(cfg.layers)} for config {config!r}, "
                             f"got {list(chosen)}")
    elif sharing == "independent":
        chosen = (0,) * B
    elif sharing == "multibranch":
        chosen = (cfg.candidates[2],) * B  # backbone = the first three of the five blocks (paper §4.1)
    else:
        chosen = tuple(cfg.candidates[i] for i in SPLIT_CHOICE[B])

    scaled = cfg if width == 1.0 else _scaled(cfg, width, cfg.name, cfg.description)
    _check_groups(scaled, groups, width)
    return TreeSpec(config=config, layers=scaled.layers, splits=chosen, head_hidden=scaled.head_hidden,
                    sharing=sharing if splits is None else "custom", width=width, groups=groups)


def _check_groups(cfg: TreeConfig, groups: int, width: float) -> None:
    """Every 1×1 convolution inside a residual layer is split into ``groups``: all its channel
    counts must be multiples of ``groups``."""
    if groups == 1:
        return
    counts: list[tuple[int, int]] = []
    cin = None
    for i, layer in enumerate(cfg.layers):
        if cin is not None and layer.kind == "bottleneck":
            counts += [(i, cin), (i, layer.out), (i, layer.out // 4)]
        elif cin is not None and layer.kind == "mbconv":
            counts += [(i, cin), (i, layer.out), (i, cin * layer.expand)]
        cin = layer.out
    bad = [(i, c) for i, c in counts if c % groups]
    if bad:
        i, c = bad[0]
        common = math.gcd(*(c for _, c in counts))
        raise ValueError(
            f"hne groups={groups} does not divide the {c} channels of layer {i} of config {cfg.name!r} at width "
            f"{width}; use groups in {_divisors(common)} or another width")
