"""Hierarchical branches for AHBF-OKD: where each backbone splits and how deep each branch is.

A backbone is cut into a *shared trunk* (the paper's low-level layers θ_ll) and the *owned
stages* that every branch gets its own copy of (θ_hl^m plus the auxiliary blocks θ_a^m). The
branches differ only in how many blocks their owned stages hold:

- hierarchical mode (the paper's default): branch 1 is the target network itself; branch m
  adds (m−1) chunks of ``aux`` blocks. Chunks go to the owned stages round-robin, lowest stage
  first (the authors' ImageNet and MobileNetV2 code does this "for optimization stability"). A
  backbone with one owned stage (CIFAR ResNets) puts every chunk in it: n + (m−1)·a blocks.
- compression mode (paper §"Target model compression", Table 5): the *deepest* branch M is the
  target network and branch m has (M−m) chunks of ``aux`` blocks *removed*, highest stage first,
  skipping stages that hold a single block.

Branches are always numbered in hierarchy order, shallowest first (index 0 = the paper's
branch 1); the recursive teacher assistants run in that order in both modes.

Split points (``BACKBONES`` documents each):

- CIFAR ResNet-(6n+2): conv1/layer1/layer2 shared, layer3 owned (the paper's ResNet-32/110).
  In compression mode layer2 is owned too (as in the authors' compression model), so that
  four branches fit into ResNet-32's 5 + 5 blocks.
- MobileNetV2: stem and the 16/24/32/64-channel stages shared; the 96/160/320-channel stages
  and the 1×1 head convolution owned (the authors' split; chunks go to 96, 160, 320 in turn).
- torchvision ResNets (any ``torchvision.models`` ResNet by name, ``tv_`` prefix): stem,
  layer1 and layer2 shared; layer3 and layer4 owned (the paper's ImageNet ResNet-18/34).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torch import nn

from kdedge.models.backbones import (
    MBV2_SETTING,
    CifarResNet,
    InvertedResidual,
    MobileNetV2,
    init_weights,
    make_cifar_layer,
    make_divisible,
)


@dataclass
class BranchLayout:
    """A backbone cut for AHBF: the shared trunk plus one feature module and head per branch.

    Attributes:
        shared: the shared low-level layers; maps the input to ``shared_channels`` maps.
        branches: per branch, the owned stages (an ``nn.Sequential``); maps the trunk's output to
            the branch's last feature map with ``num_features`` channels.
        heads: per branch, the classifier (a Linear on the globally pooled feature map).
        blocks: per branch, the block count of each owned stage.
        stage_names: names of the owned stages, e.g. ``("layer3",)``.
        shared_channels: channels of the trunk's output (ONE's gate reads it).
        num_features: channels of every branch's last feature map.
    """

    shared: nn.Module
    branches: list[nn.Module]
    heads: list[nn.Linear]
    blocks: list[tuple[int, ...]]
    stage_names: tuple[str, ...]
    shared_channels: int
    num_features: int


def branch_blocks(base: Sequence[int], branches: int, aux: int, compression: bool = False,
                  stage_names: Sequence[str] | None = None) -> list[tuple[int, ...]]:
    """Blocks per owned stage for every branch, shallowest branch first.

    Args:
        base: block counts of the owned stages in the unmodified backbone.
        branches: number of branches M (>= 1).
        aux: blocks per chunk a (>= 0).
        compression: remove chunks (target = deepest branch) instead of adding them.
        stage_names: names used in error messages.

    Returns:
        ``M`` tuples of ``len(base)`` block counts.

    Example:
        >>> branch_blocks([2, 2], branches=4, aux=2)             # ImageNet ResNet-18, layer3/4
        [(2, 2), (4, 2), (4, 4), (6, 4)]
        >>> branch_blocks([5, 5], branches=4, aux=2, compression=True)  # ResNet-32 layer2/3
        [(3, 1), (3, 3), (5, 3), (5, 5)]
    """
    names = list(stage_names) if stage_names is not None else [f"stage{k}" for k in range(len(base))]
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if aux < 0:
        raise ValueError(f"aux (auxiliary blocks per hierarchy level) must be >= 0, got {aux}")
    if not compression:
        out = []
        for i in range(branches):
            counts = list(base)
            for chunk in range(i):
                counts[chunk % len(base)] += aux
            out.append(tuple(counts))
        return out
    removable = [k for k in reversed(range(len(base))) if base[k] > 1]
    if branches > 1 and aux == 0:
        raise ValueError("compression mode needs aux >= 1 (blocks removed per hierarchy level); "
                         "set aux >= 1 or compression: false")
    if branches > 1 and not removable:
        raise ValueError(f"compression mode removes blocks, but every owned stage has a single block "
                         f"({dict(zip(names, base))}); use a deeper backbone or compression: false")
    out = []
    for i in range(branches):
        counts = list(base)
        for chunk in range(branches - 1 - i):
            counts[removable[chunk % len(removable)]] -= aux
        bad = [names[k] for k, c in enumerate(counts) if c < 1]
        if bad:
            fit = _max_compression_branches(base, aux, removable)
            raise ValueError(
                f"compression with {branches} branches and aux={aux} leaves branch {i + 1} with no block in "
                f"{', '.join(bad)} (owned stages {dict(zip(names, base))}); use at most {fit} branches or a smaller aux"
            )
        out.append(tuple(counts))
    return out


def _max_compression_branches(base: Sequence[int], aux: int, removable: list[int]) -> int:
    counts, m = list(base), 1
    while True:
        k = removable[(m - 1) % len(removable)]
        counts[k] -= aux
        if counts[k] < 1:
            return m
        m += 1


def _linear_head(features: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(features, num_classes)
    init_weights(head)
    return head


# --- CIFAR ResNets ------------------------------------------------------------------------


def cifar_resnet_layout(depth: int, num_classes: int, in_channels: int, branches: int, aux: int,
                        compression: bool, width: int = 16) -> BranchLayout:
    """Branches on a CIFAR ResNet-(6n+2) of base ``width`` (16 in the paper)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    ref = CifarResNet(depth, num_classes, in_channels, width)  # validates depth; shared layers come from it
    n = ref.blocks_per_layer
    if compression:
        names, base = ("layer2", "layer3"), (n, n)
        shared = nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.layer1)
        shared_channels = width
    else:
        names, base = ("layer3",), (n,)
        shared = nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.layer1, ref.layer2)
        shared_channels = 2 * width
    blocks = branch_blocks(base, branches, aux, compression, names)
    owned = []
    for counts in blocks:
        layers = []
        if compression:
            layers.append(make_cifar_layer(width, 2 * width, counts[0], 2))
        layers.append(make_cifar_layer(2 * width, 4 * width, counts[-1], 2))
        module = nn.Sequential(*layers)
        init_weights(module)
        owned.append(module)
    heads = [_linear_head(4 * width, num_classes) for _ in blocks]
    return BranchLayout(shared, owned, heads, blocks, names, shared_channels, 4 * width)


# --- MobileNetV2 --------------------------------------------------------------------------

_MBV2_SPLIT = 4  # settings 0..3 (16/24/32/64 channels) shared, 4..6 (96/160/320) owned


def mobilenetv2_layout(num_classes: int, in_channels: int, branches: int, aux: int, compression: bool,
                       width_mult: float, cifar: bool) -> BranchLayout:
    """Branches on MobileNetV2 ×``width_mult``; the split follows the authors' model."""
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    ref = MobileNetV2(num_classes, width_mult, in_channels, cifar)
    n_shared = 1 + sum(n for _, _, n, _ in MBV2_SETTING[:_MBV2_SPLIT])
    shared = nn.Sequential(*list(ref.features)[:n_shared])
    shared_channels = make_divisible(MBV2_SETTING[_MBV2_SPLIT - 1][1] * width_mult)
    owned_settings = MBV2_SETTING[_MBV2_SPLIT:]
    names = tuple(f"ir{c}" for _, c, _, _ in owned_settings)
    blocks = branch_blocks([n for _, _, n, _ in owned_settings], branches, aux, compression, names)
    owned = []
    for counts in blocks:
        inp, layers = shared_channels, []
        for (t, c, _, s), n in zip(owned_settings, counts):
            oup = make_divisible(c * width_mult)
            stage = []
            for j in range(n):
                stage.append(InvertedResidual(inp, oup, s if j == 0 else 1, t))
                inp = oup
            layers.append(nn.Sequential(*stage))
        layers.append(nn.Sequential(nn.Conv2d(inp, ref.last_channel, 1, bias=False),
                                    nn.BatchNorm2d(ref.last_channel), nn.ReLU6(inplace=True)))
        module = nn.Sequential(*layers)
        init_weights(module)
        owned.append(module)
    heads = [_linear_head(ref.last_channel, num_classes) for _ in blocks]
    return BranchLayout(shared, owned, heads, blocks, names, shared_channels, ref.last_channel)


# --- torchvision ResNets ------------------------------------------------------------------


def torchvision_resnet_names() -> list[str]:
    """Names of the torchvision models that are ResNets (resnet18 … wide_resnet101_2)."""
    import torchvision

    return sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                  if torchvision.models.get_model_builder(n).__module__ == "torchvision.models.resnet")


def torchvision_resnet_layout(arch: str, num_classes: int, in_channels: int, branches: int, aux: int,
                              compression: bool) -> BranchLayout:
    """Branches on a torchvision ResNet (weights=None): layer3 and layer4 owned by each branch."""
    import torchvision
    from torchvision.models.resnet import ResNet

    known = torchvision_resnet_names()
    if arch not in known:
        raise ValueError(f"{arch!r} is not a torchvision ResNet; known: {', '.join(known)}")
    ref = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        ref.conv1 = nn.Conv2d(in_channels, ref.conv1.out_channels, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(ref.conv1.weight, mode="fan_out", nonlinearity="relu")
    shared = nn.Sequential(ref.conv1, ref.bn1, ref.relu, ref.maxpool, ref.layer1, ref.layer2)
    block = type(ref.layer1[0])
    depth = [len(ref.layer1), len(ref.layer2), len(ref.layer3), len(ref.layer4)]
    names = ("layer3", "layer4")
    blocks = branch_blocks(depth[2:], branches, aux, compression, names)
    owned, heads = [], []
    for counts in blocks:
        # a whole torchvision ResNet per branch, so blocks, strides and initialisation are exactly
        # torchvision's; only its layer3, layer4 and fc are kept.
        net = ResNet(block, [depth[0], depth[1], *counts], num_classes=num_classes,
                     groups=ref.groups, width_per_group=ref.base_width)
        owned.append(nn.Sequential(net.layer3, net.layer4))
        heads.append(net.fc)
    shared_channels = _out_channels(ref.layer2)
    return BranchLayout(shared, owned, heads, blocks, names, shared_channels, ref.fc.in_features)


def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = getattr(last, "bn3", None) or last.bn2
    return int(bn.num_features)


__all__ = [
    "BranchLayout",
    "branch_blocks",
    "cifar_resnet_layout",
    "mobilenetv2_layout",
    "torchvision_resnet_layout",
    "torchvision_resnet_names",
]
