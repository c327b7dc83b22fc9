"""Exit heads (classifiers attached inside a network) and the weight initialisation of
multi-exit networks.

- ``"paper"``: the MSDNet / Phuong & Lampert exit: two 3×3 stride-2 conv-BN-ReLU layers of
  ``width`` channels (128 on CIFAR) → average pool → Linear. The original pools with a fixed
  2×2 window (its CIFAR feature map is 2×2 there); we pool adaptively to 1×1, which is the same
  on CIFAR and lets the head sit on any feature-map size (28×28 digits, 8×8 digits, ImageNet).
- ``"linear"``: global average pool → Linear (the head of a plain ResNet).
"""

from __future__ import annotations

from torch import Tensor, nn

HEADS = ("paper", "linear")


class ExitHead(nn.Module):
    """One exit: feature map [N, C, H, W] → logits [N, classes].

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: number of classes.
        kind: ``"paper"`` or ``"linear"``.
        width: channels of the paper head's convolutions.
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "paper", width: int = 128) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown exit head {kind!r}; choose one of {', '.join(HEADS)}")
        self.kind = kind
        if kind == "paper":
            self.features: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            features = width
        else:
            self.features = nn.Identity()
            features = in_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # flatten, not view(x.shape[0], -1): keeps the batch dimension symbolic in exported graphs
        return self.fc(self.pool(self.features(x)).flatten(1))


def init_multiexit_weights(module: nn.Module) -> None:
    """MSDNet's initialisation: convs N(0, 2/(k²·C_out)) (Kaiming, fan-out), BN weight 1 and
    bias 0, linear biases 0 (linear weights keep torch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
