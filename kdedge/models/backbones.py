"""Backbones the three methods share: CIFAR ResNets, MobileNetV2 with a width multiplier,
torchvision models by name, and a small CNN for tests.

Every backbone exposes its structure the same way (timm-style):
- ``feature_blocks()``: the ordered list of blocks whose composition maps the input to the
  last feature map (multi-exit networks attach exits after chosen blocks; AHBF splits here);
- ``forward_features(x)``: the last feature map; ``forward_head(f)``: pool + classifier;
- ``forward(x) = forward_head(forward_features(x))``; attribute ``num_features``.

No builder downloads weights: torchvision models are built with ``weights=None``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def _check_input(name: str, input_size: Sequence[int] | None, min_size: int) -> None:
    if input_size is not None and (
        isinstance(input_size, (int, str)) or len(input_size) != 2 or any(int(s) < 1 for s in input_size)
    ):
        raise ValueError(f"{name}: input_size must be an (H, W) pair of positive sizes, got {input_size!r}")
    if input_size is not None and min(input_size) < min_size:
        raise ValueError(
            f"{name} needs inputs of at least {min_size}x{min_size}, got {tuple(input_size)}; "
            f"resize the data (data.image_size) or pick a smaller model"
        )


class BasicBlock(nn.Module):
    """The CIFAR ResNet basic block (He et al. 2016, option B shortcut: 1x1 conv + BN)."""

    expansion = 1
    fold_batchnorm = (("conv1", "bn1"), ("conv2", "bn2"))  # forward: bnK(convK(x)); export folds them

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def _check_positive(name: str, **values: float) -> None:
    for key, v in values.items():
        if not v > 0:
            raise ValueError(f"{name}: {key} must be positive, got {v!r}")


def make_cifar_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` BasicBlocks, the first with ``stride``."""
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, small linear: the CIFAR ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv1 (16) → layer1 (16) → layer2 (32, /2) → layer3 (64, /2).

    Attributes ``conv1``, ``bn1``, ``layer1``, ``layer2``, ``layer3``, ``fc`` (AHBF shares
    conv1..layer2 and gives each branch its own layer3).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.blocks_per_layer = depth, n
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = make_cifar_layer(width, width, n, 1)
        self.layer2 = make_cifar_layer(width, 2 * width, n, 2)
        self.layer3 = make_cifar_layer(2 * width, 4 * width, n, 2)
        self.num_features = 4 * width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def feature_blocks(self) -> list[nn.Module]:
        return [_Stem(self), *self.layer1, *self.layer2, *self.layer3]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(self.pool(f).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class _Stem(nn.Module):
    """conv1-bn1-relu of a CIFAR ResNet as a block (shares the parent's parameters)."""

    fold_batchnorm = (("conv1", "bn1"),)  # forward: bn1(conv1(x)); export folds them

    def __init__(self, parent: CifarResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = parent.conv1, parent.bn1, parent.relu

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


def _cifar_resnet(depth: int) -> Callable[..., CifarResNet]:
    def build(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
              width: int = 16) -> CifarResNet:
        _check_input(f"resnet{depth}", input_size, 8)
        _check_positive(f"resnet{depth}", num_classes=num_classes, in_channels=in_channels, width=width)
        return CifarResNet(depth, num_classes, in_channels, width)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"CIFAR ResNet-{depth} (3 stages of {(depth - 2) // 6} basic blocks)."
    return build


resnet20 = _cifar_resnet(20)
resnet32 = _cifar_resnet(32)
resnet56 = _cifar_resnet(56)
resnet110 = _cifar_resnet(110)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels as MobileNetV2 does (never more than 10 % down)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand → 3x3 depthwise → 1x1 project, residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers += [nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand t, channels c, repeats n, stride s) from the MobileNetV2 paper, Table 2.
MBV2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier.

    ``cifar=True`` uses stride 1 in the stem and the first downsampling stage (32x32 inputs,
    as in the AHBF paper's CIFAR experiments); otherwise the ImageNet strides.
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 cifar: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        stem_c = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        blocks: list[nn.Module] = [nn.Sequential(
            nn.Conv2d(in_channels, stem_c, 3, 1 if cifar else 2, 1, bias=False), nn.BatchNorm2d(stem_c),
            nn.ReLU6(inplace=True))]
        inp = stem_c
        for i, (t, c, n, s) in enumerate(MBV2_SETTING):
            oup = make_divisible(c * width_mult)
            if cifar and i == 1:
                s = 1
            for j in range(n):
                blocks.append(InvertedResidual(inp, oup, s if j == 0 else 1, t))
                inp = oup
        blocks.append(nn.Sequential(nn.Conv2d(inp, self.last_channel, 1, bias=False),
                                    nn.BatchNorm2d(self.last_channel), nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*blocks)
        self.num_features = self.last_channel
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.last_channel, num_classes)
        init_weights(self)

    def feature_blocks(self) -> list[nn.Module]:
        return list(self.features)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, f: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(f).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
                width_mult: float = 1.0, cifar: bool | None = None, dropout: float = 0.0) -> MobileNetV2:
    """MobileNetV2 ×width_mult; ``cifar`` defaults to True for inputs smaller than 64 pixels."""
    if cifar is None:
        cifar = input_size is not None and min(input_size) < 64
    _check_input("mobilenetv2", input_size, 8 if cifar else 32)
    _check_positive("mobilenetv2", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
    return MobileNetV2(num_classes, width_mult, in_channels, cifar, dropout)


class TorchvisionBackbone(nn.Module):
    """A torchvision classification model behind the backbone interface (no weights)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], classifier: nn.Module, num_features: int) -> None:
        super().__init__()
        self.model = model
        # plain lists/attributes bypassing nn.Module registration: the parameters live in
        # self.model once, so state_dict keys are unique (safetensors refuses shared tensors).
        object.__setattr__(self, "_blocks", blocks)
        object.__setattr__(self, "_classifier", classifier)
        self.num_features = num_features

    def feature_blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def forward_features(self, x: Tensor) -> Tensor:
        for b in self._blocks:
            x = b(x)
        return x

    def forward_head(self, f: Tensor) -> Tensor:
        return self._classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _tv_resnet(arch: str) -> Callable[..., TorchvisionBackbone]:
    def build(num_classes: int = 1000, in_channels: int = 3, input_size: Sequence[int] | None = None) -> TorchvisionBackbone:
        import torchvision

        _check_input(f"tv_{arch}", input_size, 32)
        _check_positive(arch, num_classes=num_classes, in_channels=in_channels)
        m = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        blocks = [stem, *m.layer1, *m.layer2, *m.layer3, *m.layer4]
        return TorchvisionBackbone(m, blocks, m.fc, m.fc.in_features)

    build.__name__ = f"tv_{arch}"
    build.__doc__ = f"torchvision {arch} (weights=None), ImageNet-size input."
    return build


tv_resnet18 = _tv_resnet("resnet18")
tv_resnet34 = _tv_resnet("resnet34")
tv_resnet50 = _tv_resnet("resnet50")


def tv_mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, input_size: Sequence[int] | None = None,
                    width_mult: float = 1.0) -> TorchvisionBackbone:
    """torchvision mobilenet_v2 (weights=None)."""
    import torchvision

    _check_input("tv_mobilenet_v2", input_size, 32)
    _check_positive("tv_mobilenet_v2", num_classes=num_classes, in_channels=in_channels, width_mult=width_mult)
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    if in_channels != 3:
        c = m.features[0][0]
        m.features[0][0] = nn.Conv2d(in_channels, c.out_channels, 3, 2, 1, bias=False)
    return TorchvisionBackbone(m, list(m.features), m.classifier, m.last_channel)


class SmallCNN(nn.Module):
    """A tiny conv net for tests and demos on 8x8 / 28x28 digits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True))
        self.block3 = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU(inplace=True))
        self.num_features = 4 * width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    def feature_blocks(self) -> list[nn.Module]:
        return [self.block1, self.block2, self.block3]

    def forward_features(self, x: Tensor) -> Tensor:
        return self.block3(self.block2(self.block1(x)))

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(self.pool(f).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def small_cnn(num_classes: int = 10, in_channels: int = 1, input_size: Sequence[int] | None = None,
              width: int = 16) -> SmallCNN:
    """A 3-block CNN (width, 2·width, 4·width channels) for tiny inputs."""
    _check_input("small_cnn", input_size, 4)
    _check_positive("small_cnn", num_classes=num_classes, in_channels=in_channels)
    if width < 1:
        raise ValueError(f"small_cnn width must be >= 1, got {width}")
    return SmallCNN(num_classes, in_channels, width)


@torch.no_grad()
def feature_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Output shape of every feature block for one input of shape (C, H, W)."""
    x = torch.zeros(1, *input_shape)
    shapes = []
    was = model.training
    model.eval()
    for b in model.feature_blocks():  # type: ignore[operator]
        x = b(x)
        shapes.append(tuple(x.shape[1:]))
    model.train(was)
    return shapes
