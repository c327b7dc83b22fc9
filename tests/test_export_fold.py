"""Folding BatchNorm into the convolution before export: same outputs, only pairs whose order is known."""

from __future__ import annotations

import torch
from torch import nn

from kdedge.export.fold import fold_batchnorm
from kdedge.models import create_model


def _randomise_bn(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


def test_sequential_pairs_fold_and_the_original_is_untouched() -> None:
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                        nn.BatchNorm2d(4)).eval()
    _randomise_bn(seq)
    x = torch.randn(2, 3, 6, 6)
    folded, n = fold_batchnorm(seq)
    assert n == 2
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    assert isinstance(seq[1], nn.BatchNorm2d)  # a copy was folded
    torch.testing.assert_close(folded(x), seq(x), atol=1e-5, rtol=1e-5)


def test_an_undeclared_attribute_pair_is_left_alone() -> None:
    class BnFirst(nn.Module):  # bn before conv: folding it would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x))

    m = BnFirst().eval()
    folded, n = fold_batchnorm(m)
    assert n == 0 and isinstance(folded.bn, nn.BatchNorm2d)


def test_every_family_folds_with_the_same_outputs() -> None:
    torch.manual_seed(0)
    models = {
        "hne": create_model("hne", num_classes=5, in_channels=1, input_size=(16, 16), config="mnist", B=2),
        "resnet20": create_model("resnet20", num_classes=5, in_channels=3),
        "msdnet": create_model("msdnet", num_classes=5, in_channels=3, input_size=(32, 32), config="cifar"),
    }
    for name, model in models.items():
        model.eval()
        _randomise_bn(model)
        x = torch.randn(2, 1 if name == "hne" else 3, *((16, 16) if name == "hne" else (32, 32)))
        folded, n = fold_batchnorm(model)
        assert n > 0, name
        with torch.no_grad():
            a, b = model(x), folded(x)
        for u, v in zip(a if isinstance(a, (list, tuple)) else [a], b if isinstance(b, (list, tuple)) else [b]):
            torch.testing.assert_close(v, u, atol=1e-4, rtol=1e-4, msg=name)
