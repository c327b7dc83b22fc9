"""Grouped layers of a hierarchical neural ensemble: one module computes a layer for many tree
nodes at once (paper Fig. 2).

Layout (every layer, every tensor): the features of ``n`` nodes sit contiguously along the
channel axis, node ``i`` in channels ``[i·C, (i+1)·C)``; every parameter and buffer is laid out
the same way along its first dimension (a grouped convolution with ``n·g`` groups keeps node
``i``'s filters in rows ``[i·C_out, (i+1)·C_out)``). Hence:

- a layer built for ``n`` nodes is ``n`` independent layers, computed in one call;
- a layer built for one node is an ordinary (ungrouped) layer of a member network;
- the layer of a contiguous node range ``[lo, hi)`` is the same class built for ``hi - lo``
  nodes whose tensors are row slices of the big one (:func:`node_slice`, views, no copies).
  Stages and prefixes are made of such slices.

At a split the features are replicated (:func:`replicate`): node ``i`` feeds its children
``2i`` and ``2i+1``, which keeps the depth-first member order contiguous (see ``hne.py``).

The replicated tensor need not exist: children ``2i`` and ``2i+1`` of a convolution read the
same input, node ``i``'s channels, and their filters sit next to each other (rows
``[2i·C_out, (2i+2)·C_out)``), so the layer's ``2n``-node convolution applied with ``n`` groups
to the ``n``-node parent computes both children at once, in node order, with the same weight
tensor. :meth:`NodeModule.forward_split` (and :func:`enter`) does that for the convolutions
that read a layer's input (a bottleneck's reduction and projection shortcut, an inverted
residual's expansion, a plain convolution, the head), and replicates only where a layer needs
the copy itself (an identity shortcut, a depth-wise or inner-grouped first convolution). A
split then costs no copy, and no conversion between onnxruntime's blocked NCHWc layout and
NCHW around it (the ``Reshape``/``Concat`` of :func:`replicate` are not NCHWc operators).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("relu", "relu6", None)


def activation(x: Tensor, name: str | None) -> Tensor:
    if name == "relu":
        return F.relu(x, inplace=True)
    if name == "relu6":
        return F.relu6(x, inplace=True)
    return x


def replicate(x: Tensor, nodes: int) -> Tensor:
    """Split every node in two: ``[N, nodes·C, H, W] → [N, 2·nodes·C, H, W]``.

    Node ``i``'s features are copied to nodes ``2i`` and ``2i+1`` (its two children). Written
    with ``unflatten``/``cat``/``flatten`` on the channel axis only, so the batch stays dynamic
    in exported graphs; the spatial axes are flattened first so no tensor exceeds rank 5
    (CoreML's limit).
    """
    h, w = x.shape[-2:]
    u = x.flatten(2).unflatten(1, (nodes, 1, -1))  # [N, nodes, 1, C, H·W]
    return torch.cat([u, u], dim=2).flatten(1, 3).unflatten(2, (h, w))


def enter(layer: NodeModule, x: Tensor, splits: int) -> Tensor:
    """``layer`` on ``x``, which holds ``layer.nodes / 2**splits`` nodes: the tree splits ``splits``
    times between them (blocks without layers in between). All but the last split replicate;
    the last is :meth:`NodeModule.forward_split`."""
    if splits == 0:
        return layer(x)
    for k in range(splits - 1, 0, -1):
        x = replicate(x, layer.nodes >> (k + 1))
    return layer.forward_split(x)


class NodeModule(nn.Module):
    """A layer of ``nodes`` tree nodes. Subclasses store their constructor arguments (all but
    ``nodes``) in ``self.kwargs`` so that :meth:`with_nodes` can rebuild them."""

    nodes: int
    kwargs: dict[str, Any]

    def __init__(self, nodes: int) -> None:
        super().__init__()
        if nodes < 1:
            raise ValueError(f"a layer needs at least one node, got {nodes}")
        self.nodes = nodes

    def with_nodes(self, nodes: int) -> NodeModule:
        """A freshly initialised layer of the same kind for ``nodes`` nodes."""
        return type(self)(nodes, **self.kwargs)

    def forward_split(self, x: Tensor) -> Tensor:
        """The layer on the children of ``x``'s ``nodes / 2`` nodes: ``self(replicate(x, nodes / 2))``,
        computed without the replicated copy where the layer allows (module docstring)."""
        return self(replicate(x, self.nodes // 2))

    def reset_parameters(self) -> None:
        for m in self.children():
            if isinstance(m, NodeModule):
                m.reset_parameters()


class GConv(NodeModule):
    """Convolution (+ BatchNorm) (+ activation) of every node.

    Args:
        nodes: number of tree nodes computed at once.
        cin, cout: channels of ONE node.
        kernel, stride: square kernel size (padding ``kernel // 2``) and stride.
        groups: groups inside one node (``cin`` for a depth-wise convolution).
        act: ``"relu"``, ``"relu6"`` or None.
        bn: BatchNorm after the convolution (otherwise the convolution has a bias).
    """

    # forward computes bn(conv(x)): export folds the pair into one convolution (kdedge/export/fold.py)
    fold_batchnorm = (("conv", "bn"),)

    def __init__(self, nodes: int, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: str | None = "relu", bn: bool = True) -> None:
        super().__init__(nodes)
        if cin % groups or cout % groups:
            raise ValueError(f"a convolution with {cin} in / {cout} out channels cannot have {groups} groups")
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; known: relu, relu6, None")
        self.kwargs = dict(cin=cin, cout=cout, kernel=kernel, stride=stride, groups=groups, act=act, bn=bn)
        self.cin, self.cout, self.kernel, self.groups, self.act = cin, cout, kernel, groups, act
        self.conv = nn.Conv2d(nodes * cin, nodes * cout, kernel, stride, kernel // 2, groups=nodes * groups, bias=not bn)
        self.bn = nn.BatchNorm2d(nodes * cout) if bn else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-normal with the fan-out of ONE node's convolution ([cout, cin/g, k, k]), as a
        # member built on its own would get; torch's helper would use the fan-out of all nodes
        # together and start a 16-node layer 4x too small. Every node draws its own values: the
        # different initialisation per branch that the paper relies on for diversity.
        std = math.sqrt(2.0 / (self.cout * self.kernel * self.kernel))
        with torch.no_grad():
            self.conv.weight.normal_(0.0, std)
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        if isinstance(self.bn, nn.BatchNorm2d):
            self.bn.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return activation(self.bn(self.conv(x)), self.act)

    @property
    def splits_in_place(self) -> bool:
        """Whether :meth:`forward_split` needs no replicated input: one group per node (a
        depth-wise or inner-grouped convolution would interleave the children's channels)."""
        return self.groups == 1 and self.nodes % 2 == 0

    def forward_split(self, x: Tensor) -> Tensor:
        if not self.splits_in_place:
            return super().forward_split(x)
        c = self.conv
        y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups // 2)
        return activation(self.bn(y), self.act)


class GBottleneck(NodeModule):
    """ResNet bottleneck whose 3×3 convolution is depth-wise separable (paper App. A, Fig. 7).

    ``1×1 cin→mid`` → ``3×3 depth-wise (stride)`` → ``1×1 mid→mid`` (the point-wise half of the
    separable convolution) → ``1×1 mid→cout``, each with BatchNorm, ReLU between; plus the
    shortcut (identity, or 1×1 convolution + BatchNorm when ``project`` or the shape changes);
    ReLU after the sum. ``mid = cout / expansion``. A ``project=True`` layer is the paper's
    "ResNet+Branching" layer when the tree splits before it.

    Args:
        groups: groups of the 1×1 convolutions inside one node (1 in the paper).
    """

    def __init__(self, nodes: int, cin: int, cout: int, stride: int = 1, project: bool = False, groups: int = 1,
                 expansion: int = 4) -> None:
        super().__init__(nodes)
        if cout % expansion:
            raise ValueError(f"a bottleneck with {cout} output channels needs a multiple of its expansion {expansion}")
        self.kwargs = dict(cin=cin, cout=cout, stride=stride, project=project, groups=groups, expansion=expansion)
        mid = cout // expansion
        self.reduce = GConv(nodes, cin, mid, 1, 1, groups, "relu")
        self.dw = GConv(nodes, mid, mid, 3, stride, mid, "relu")
        self.pw = GConv(nodes, mid, mid, 1, 1, groups, "relu")
        self.expand = GConv(nodes, mid, cout, 1, 1, groups, None)
        self.shortcut = (GConv(nodes, cin, cout, 1, stride, groups, None)
                         if project or stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(self.pw(self.dw(self.reduce(x))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)), inplace=True)

    def forward_split(self, x: Tensor) -> Tensor:
        # an identity shortcut adds the children's (replicated) input itself
        if self.shortcut is None or not (self.reduce.splits_in_place and self.shortcut.splits_in_place):
            return super().forward_split(x)
        out = self.expand(self.pw(self.dw(self.reduce.forward_split(x))))
        return F.relu(out + self.shortcut.forward_split(x), inplace=True)


class GInvertedResidual(NodeModule):
    """MobileNetV2 inverted residual (paper App. A, Fig. 8: "MBNet").

    ``1×1 cin→cin·expand`` (ReLU6, skipped when ``expand == 1``) → ``3×3 depth-wise (stride)``
    (ReLU6) → ``1×1 →cout`` (linear), BatchNorm after each; residual when the shape is kept.

    Args:
        groups: groups of the 1×1 convolutions inside one node (1 in the paper).
    """

    def __init__(self, nodes: int, cin: int, cout: int, stride: int = 1, expand: int = 6, groups: int = 1) -> None:
        super().__init__(nodes)
        self.kwargs = dict(cin=cin, cout=cout, stride=stride, expand=expand, groups=groups)
        hidden = cin * expand
        self.expand = GConv(nodes, cin, hidden, 1, 1, groups, "relu6") if expand != 1 else None
        self.dw = GConv(nodes, hidden, hidden, 3, stride, hidden, "relu6")
        self.project = GConv(nodes, hidden, cout, 1, 1, groups, None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.dw(x if self.expand is None else self.expand(x)))
        return x + out if self.residual else out

    def forward_split(self, x: Tensor) -> Tensor:
        # without an expansion the first convolution is depth-wise; a residual adds the input
        if self.expand is None or self.residual or not self.expand.splits_in_place:
            return super().forward_split(x)
        return self.project(self.dw(self.expand.forward_split(x)))


class GHead(NodeModule):
    """Classifier of every leaf: global average pool → [Linear + ReLU6] → Linear.

    The linear layers are grouped 1×1 convolutions on the pooled 1×1 map, so ``n`` classifiers
    run in one call. Output: ``[batch, nodes·num_classes]``, node-major.

    Args:
        cin: channels of one node's last feature map.
        hidden: width of the hidden linear layer (the MobileNet HNE's 1792), or None.
    """

    def __init__(self, nodes: int, cin: int, num_classes: int, hidden: int | None = None) -> None:
        super().__init__(nodes)
        self.kwargs = dict(cin=cin, num_classes=num_classes, hidden=hidden)
        self.num_classes = num_classes
        width = cin
        self.hidden: nn.Conv2d | None = None
        if hidden is not None:
            self.hidden = nn.Conv2d(nodes * cin, nodes * hidden, 1, groups=nodes)
            width = hidden
        self.fc = nn.Conv2d(nodes * width, nodes * num_classes, 1, groups=nodes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the initialisation of the backbones' linear layers (kdedge.models.backbones.init_weights)
        with torch.no_grad():
            for m in (self.hidden, self.fc):
                if m is not None:
                    m.weight.normal_(0.0, 0.01)
                    m.bias.zero_()  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        x = x.mean(dim=(2, 3), keepdim=True)
        if self.hidden is not None:
            x = F.relu6(self.hidden(x), inplace=True)
        return self.fc(x).flatten(1)

    def forward_split(self, x: Tensor) -> Tensor:
        if self.nodes % 2:
            return super().forward_split(x)
        x = x.mean(dim=(2, 3), keepdim=True)  # pooling commutes with the replication
        first = self.fc if self.hidden is None else self.hidden
        x = F.conv2d(x, first.weight, first.bias, groups=first.groups // 2)
        if self.hidden is not None:
            x = self.fc(F.relu6(x, inplace=True))
        return x.flatten(1)


def node_slice(layer: NodeModule, lo: int, hi: int) -> NodeModule:
    """The layer of nodes ``lo … hi-1`` of ``layer``, sharing its storage (views, no copies).

    The returned module is the same class built for ``hi - lo`` nodes; its parameters and
    buffers are row slices of ``layer``'s, so an in-place update of the model (an optimiser
    step, ``load_state_dict``) shows in the slice. It is an inference view: its parameters are
    separate leaves (no gradient reaches ``layer``), and moving ``layer`` to another device or
    dtype afterwards leaves the slice on the old storage: take slices after moving the model.
    """
    if not 0 <= lo < hi <= layer.nodes:
        raise ValueError(f"node range [{lo}, {hi}) is outside the layer's {layer.nodes} nodes")
    if (lo, hi) == (0, layer.nodes):
        return layer
    with torch.device("meta"):  # the constructor's tensors are replaced right below
        part = layer.with_nodes(hi - lo)
    part.train(layer.training)
    named = dict(layer.named_modules())
    for mod_name, sub in part.named_modules():
        src = named[mod_name]
        for name, p in list(sub.named_parameters(recurse=False)):
            full = getattr(src, name)
            rows = full.shape[0] // layer.nodes
            sub._parameters[name] = nn.Parameter(full.detach()[lo * rows: hi * rows], requires_grad=False)
        for name, buf in list(sub.named_buffers(recurse=False)):
            full = getattr(src, name)
            if full.dim() == 0:  # BatchNorm's num_batches_tracked: one counter for all nodes
                sub._buffers[name] = full
                continue
            rows = full.shape[0] // layer.nodes
            sub._buffers[name] = full[lo * rows: hi * rows]
    return part
