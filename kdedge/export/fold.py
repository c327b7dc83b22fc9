"""Folding BatchNorm into the convolution before it, for export.

In eval mode ``bn(conv(x))`` is one convolution with scaled weights and a bias. Folding it in
torch before ``torch.onnx.export`` halves the operators the dynamo exporter traces and
decomposes (BatchNorm decomposes into several aten operators): on the paper-size CIFAR HNE
(``config: resnet``, B = 4) the fused prefix of 16 members exports in 6.8-7.5 s instead of
11.5-13.6 s, two runs each, interleaved (``bench/bench_paper_size.py`` measures the whole export).
onnxruntime folds the same pairs when it loads a graph, so the sessions compute the same thing;
verification still compares the exported graphs with the unfolded torch modules.

Only pairs whose order is known are folded: consecutive ``Conv2d`` → ``BatchNorm2d`` children of
an ``nn.Sequential``, and the attribute pairs a module class declares in ``fold_batchnorm``
(``(("conv", "bn"),)`` for a module whose forward computes ``bn(conv(x))``), or that
:data:`KNOWN_PAIRS` lists for torchvision's blocks.

Example:
    >>> folded, n = fold_batchnorm(stage)   # a folded copy; ``stage`` is unchanged
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["KNOWN_PAIRS", "fold_batchnorm"]

# torchvision blocks whose forward applies bnK(convK(x)) (torchvision/models/resnet.py)
KNOWN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision.models.resnet.BasicBlock": (("conv1", "bn1"), ("conv2", "bn2")),
    "torchvision.models.resnet.Bottleneck": (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    "torchvision.models.resnet.ResNet": (("conv1", "bn1"),),
}


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _pairs(module: nn.Module) -> tuple[tuple[str, str], ...]:
    cls = type(module)
    return tuple(getattr(cls, "fold_batchnorm", None) or KNOWN_PAIRS.get(f"{cls.__module__}.{cls.__qualname__}", ()))


def fold_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``module`` with every known Conv2d → BatchNorm2d pair folded into one
    convolution (the BatchNorm replaced by ``nn.Identity``), and how many pairs were folded."""
    folded = copy.deepcopy(module).eval()
    n = 0
    for mod in folded.modules():
        if isinstance(mod, nn.Sequential):
            names = list(mod._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = mod._modules[a], mod._modules[b]
                if conv is not None and bn is not None and _foldable(conv, bn):
                    mod._modules[a] = fuse_conv_bn_eval(conv, bn)
                    mod._modules[b] = nn.Identity()
                    n += 1
        for a, b in _pairs(mod):
            conv, bn = getattr(mod, a, None), getattr(mod, b, None)
            if conv is not None and bn is not None and _foldable(conv, bn):
                setattr(mod, a, fuse_conv_bn_eval(conv, bn))
                setattr(mod, b, nn.Identity())
                n += 1
    return folded, n
