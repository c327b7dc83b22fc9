"""The columns of an MSDNet grid (:mod:`kdedge.models.msdnet`): layer 0, dense layers and
transitions, each computing every scale it holds, or one scale at a time.

A column maps the list of per-scale tensors of the previous column to its own (``None`` for a
scale it does not compute). ``forward_scale(s, same, finer)`` computes scale ``s`` alone from
the previous column's scale ``s`` (``same``) and scale ``s-1`` (``finer``), with exactly the
operations ``forward`` runs for that scale, so a stage that computes the grid node by node
(deferring scales that only later exits read) gives bit-identical results.

Example:
    >>> layer = DenseLayer(prev=(6, 12, 24), new=(12, 24, 48), bottleneck=4)
    >>> ys = layer([torch.zeros(1, 6, 32, 32), torch.zeros(1, 12, 16, 16), torch.zeros(1, 24, 8, 8)])
    >>> [y.shape[1] for y in ys]
    [12, 24, 48]
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GridColumn", "DenseLayer", "FirstLayer", "Transition", "conv_bn_relu", "bottleneck"]


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """``kernel``×``kernel`` convolution (padding ``kernel // 2``, no bias), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def bottleneck(c_in: int, c_out: int, stride: int, width: int) -> nn.Sequential:
    """1×1 conv-BN-ReLU to ``min(c_in, width · c_out)`` channels, then a 3×3 one (``stride``);
    a single 3×3 conv-BN-ReLU when ``width`` is 0."""
    if width <= 0:
        return conv_bn_relu(c_in, c_out, 3, stride)
    mid = min(c_in, width * c_out)
    return nn.Sequential(conv_bn_relu(c_in, mid, 1), conv_bn_relu(mid, c_out, 3, stride))


class GridColumn(nn.Module):
    """A column of the grid; ``scales`` lists the scales it computes."""

    scales: tuple[int, ...]

    def forward_scale(self, s: int, same: Tensor | None, finer: Tensor | None) -> Tensor:
        """Scale ``s`` of this column from ``same`` and ``finer`` (see the module docstring)."""
        raise NotImplementedError

    def scale_modules(self, s: int) -> list[nn.Module]:
        """The submodules (all the weights) that computing scale ``s`` uses."""
        raise NotImplementedError


class FirstLayer(GridColumn):
    """Layer 0: the image to every scale (stride 2 between scales).

    Scale 0 reads the image (pass it as ``finer``); scale s > 0 reads this layer's scale s-1.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], stem: str) -> None:
        super().__init__()
        first: nn.Module = conv_bn_relu(in_channels, channels[0], 3)
        if stem == "imagenet":
            first = nn.Sequential(conv_bn_relu(in_channels, channels[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        self.convs = nn.ModuleList([first] + [conv_bn_relu(channels[s - 1], channels[s], 3, 2)
                                              for s in range(1, len(channels))])
        self.scales = tuple(range(len(channels)))

    def forward_scale(self, s: int, same: Tensor | None, finer: Tensor | None) -> Tensor:
        return self.convs[s](finer)

    def scale_modules(self, s: int) -> list[nn.Module]:
        return [self.convs[s]]

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        x = xs[0]
        out: list[Tensor | None] = []
        for s in self.scales:
            x = self.forward_scale(s, None, x)
            out.append(x)
        return out


class DenseLayer(GridColumn):
    """One MSDNet layer: every computed scale appends conv(x_s) (and conv_down(x_{s-1}))."""

    def __init__(self, prev: Sequence[int], new: Sequence[int], bottleneck_width: int) -> None:
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
                self.down.append(bottleneck(prev[s - 1], growth // 2, 2, bottleneck_width))
                growth -= growth // 2
            self.same.append(bottleneck(prev[s], growth, 1, bottleneck_width))
        # scale -> (index into same, index into down or -1)
        downs = [i for i, d in enumerate(self.has_down) if d]
        self._index = {s: (i, downs.index(i) if d else -1)
                       for i, (s, d) in enumerate(zip(self.scales, self.has_down))}

    def forward_scale(self, s: int, same: Tensor | None, finer: Tensor | None) -> Tensor:
        i, d = self._index[s]
        parts = [same, self.same[i](same)]
        if d >= 0:
            parts.append(self.down[d](finer))
        return torch.cat(parts, dim=1)

    def scale_modules(self, s: int) -> list[nn.Module]:
        i, d = self._index[s]
        return [self.same[i]] + ([self.down[d]] if d >= 0 else [])

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(xs)
        for s in self.scales:
            out[s] = self.forward_scale(s, xs[s], xs[s - 1] if s > 0 else None)
        return out


class Transition(GridColumn):
    """1×1 conv-BN-ReLU per computed scale, compressing channels."""

    def __init__(self, prev: Sequence[int], new: Sequence[int]) -> None:
        super().__init__()
        self.scales = tuple(s for s, c in enumerate(new) if c)
        self.convs = nn.ModuleList([conv_bn_relu(prev[s], new[s], 1) for s in self.scales])
        self._index = {s: i for i, s in enumerate(self.scales)}

    def forward_scale(self, s: int, same: Tensor | None, finer: Tensor | None) -> Tensor:
        return self.convs[self._index[s]](same)

    def scale_modules(self, s: int) -> list[nn.Module]:
        return [self.convs[self._index[s]]]

    def forward(self, xs: list[Tensor | None]) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(xs)
        for s in self.scales:
            out[s] = self.forward_scale(s, xs[s], None)
        return out
