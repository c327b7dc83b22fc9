"""Hierarchical neural ensembles (Ruiz & Verbeek, AAAI 2021): N = 2^B networks sharing their
first blocks along a binary tree, computed with grouped convolutions (paper §3, Fig. 2).

The tree has B+1 blocks; block d holds 2^d nodes, computed in one grouped pass (see
``hne_layers.py`` for the channel layout). At each split every node's features go to its two
children, nodes ``2i`` and ``2i+1`` (the first convolutions after a split read the parents'
features directly, so the copy is made only where a layer needs it: ``hne_layers.enter``).
Member ``n`` (leaf ``n``) therefore runs node ``n >> (B - d)`` at block ``d``: the members are
numbered in the paper's depth-first order, member 0 is always the first path, and the first
2^b members are exactly the leaves under the first path's node at depth B−b, the sub-ensemble
the paper evaluates with 2^b members (Eq. 1).

Stages (the contract of ``kdedge.models.stages``), combined with ``mean_logits``:

- ``stage0`` computes member 0 along the first path and carries the first path's feature after
  every block d < B (``feat{d}``; a block without layers carries nothing, its children read the
  last earlier feature, or the input);
- ``stage{b}`` (b ≥ 1) reads the first path's feature after block B−b and computes the sub-tree
  of node 1 at block B−b+1: members 2^(b-1) … 2^b − 1, in one grouped pass; it returns the SUM
  of their logits (``members = 2^(b-1)``).

``prefixes()`` returns fused graphs: ``prefix{k}`` computes the first 2^k members from the
input in one pass (the first path down to depth B−k, then that node's sub-tree).

Example:
    >>> model = hne(num_classes=10, in_channels=1, input_size=(28, 28), config="mnist", B=2)
    >>> model(torch.zeros(8, 1, 28, 28)).shape      # member logits, depth-first order
    torch.Size([4, 8, 10])
    >>> [s.spec.members for s in model.stages()]
    [1, 1, 2]
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from kdedge.models.hne_configs import CONFIGS, LayerSpec, TreeSpec, resolve
from kdedge.models.hne_layers import (GBottleneck, GConv, GHead, GInvertedResidual, NodeModule, enter,
                                      node_slice)
from kdedge.models.stages import INPUT, Stage, StageSpec

__all__ = ["HNE", "HNEStage", "hne", "build_layer", "CONFIGS"]


def build_layer(spec: LayerSpec, nodes: int, cin: int, groups: int = 1) -> NodeModule:
    """The grouped module of one member layer for ``nodes`` tree nodes."""
    if spec.kind == "conv":
        if spec.depthwise and spec.out != cin:
            raise ValueError(f"a depth-wise layer keeps its channels: {cin} in, {spec.out} out")
        return GConv(nodes, cin, spec.out, spec.kernel, spec.stride, cin if spec.depthwise else 1, spec.act)
    if spec.kind == "bottleneck":
        return GBottleneck(nodes, cin, spec.out, spec.stride, spec.project, groups)
    if spec.kind == "mbconv":
        return GInvertedResidual(nodes, cin, spec.out, spec.stride, spec.expand, groups)
    raise ValueError(f"unknown layer kind {spec.kind!r}; known: conv, bottleneck, mbconv")


class HNE(nn.Module):
    """A hierarchical neural ensemble. Build it with :func:`hne`.

    ``forward(x)`` returns the logits of every member, ``[N, batch, classes]``, in depth-first
    order; the ensemble of the first 2^b members is ``out[: 2**b].mean(0)``.

    Attributes:
        tree: the resolved :class:`~kdedge.models.hne_configs.TreeSpec`.
        B, num_members: depth of the tree and N = 2^B.
        blocks: ``blocks[d]`` is the list of grouped layers of block d (2^d nodes).
        head: the grouped classifier of the 2^B leaves.
    """

    combine_rules: tuple[str, ...] = ("mean_logits",)

    def __init__(self, tree: TreeSpec, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"hne needs at least one class, got num_classes={num_classes}")
        self.tree = tree
        self.B = tree.B
        self.num_members = 2 ** tree.B
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.blocks = nn.ModuleList()
        cin = in_channels
        for d in range(self.B + 1):
            layers = nn.ModuleList()
            for spec in tree.block_layers(d):
                layers.append(build_layer(spec, 2 ** d, cin, tree.groups))
                cin = spec.out
            self.blocks.append(layers)
        self.head = GHead(self.num_members, cin, num_classes, tree.head_hidden)

    def forward(self, x: Tensor) -> Tensor:
        splits = 0  # splits since the last layer: the next layer reads its parents' features
        for d, block in enumerate(self.blocks):
            splits += d > 0
            for layer in block:
                x, splits = enter(layer, x, splits), 0
        return enter(self.head, x, splits).unflatten(1, (self.num_members, -1)).transpose(0, 1)

    # --- stages -----------------------------------------------------------------------------

    def _carried_blocks(self) -> list[int]:
        """Blocks d < B with layers: the first path's features stage 0 carries."""
        return [d for d in range(self.B) if len(self.blocks[d]) > 0]

    def stages(self) -> list[Stage]:
        """B+1 stages: stage 0 = member 0, stage b = the next 2^(b-1) members (module docstring).

        The stages share the model's storage (their layers are :func:`node_slice` views) and
        take its current train/eval mode; take them after moving the model to its device.
        """
        B = self.B
        carried = self._carried_blocks()
        stage0 = HNEStage(self, StageSpec("stage0", (INPUT,), ("logits", *[f"feat{d}" for d in carried]), members=1),
                          first_block=0, ranges=[(0, 1)] * (B + 1), carry=carried)
        out: list[Stage] = [stage0]
        for b in range(1, B + 1):
            earlier = [d for d in carried if d <= B - b]
            binding = f"stage0:feat{earlier[-1]}" if earlier else INPUT
            spec = StageSpec(f"stage{b}", (binding,), ("logits",), members=2 ** (b - 1))
            out.append(HNEStage(self, spec, first_block=B - b + 1, ranges=[(2 ** j, 2 ** (j + 1)) for j in range(b)]))
        return out

    def prefixes(self) -> list[Stage]:
        """B+1 fused graphs; ``prefix{k}`` computes the first 2^k members from the input."""
        B = self.B
        out: list[Stage] = []
        for k in range(B + 1):
            ranges = [(0, 1)] * (B - k + 1) + [(0, 2 ** j) for j in range(1, k + 1)]
            out.append(HNEStage(self, StageSpec(f"prefix{k}", (INPUT,), ("logits",), members=2 ** k),
                                first_block=0, ranges=ranges))
        return out

    def stage_meta(self) -> dict[str, Any]:
        """JSON-able facts for a bundle manifest."""
        t = self.tree
        return {"family": "hne", "config": t.config, "B": self.B, "members": self.num_members, "sharing": t.sharing,
                "splits": list(t.splits), "width": t.width, "groups": t.groups}

    def block_of_layer(self) -> list[int]:
        """The block index of every member layer (for reports)."""
        return [d for d in range(self.B + 1) for _ in self.blocks[d]]


class HNEStage(Stage):
    """Part of the tree as one graph: node range ``ranges[j]`` at block ``first_block + j``,
    down to the leaves; returns the summed logits of its leaves, then the features after the
    blocks listed in ``carry``.

    Its layers are views of the model's (no copies). Python control flow depends only on the
    structure fixed at construction, so the module exports with a dynamic batch.
    """

    def __init__(self, model: HNE, spec: StageSpec, first_block: int, ranges: Sequence[tuple[int, int]],
                 carry: Sequence[int] = ()) -> None:
        super().__init__()
        if first_block + len(ranges) != model.B + 1:
            raise ValueError(f"{spec.name}: node ranges must reach the leaves (block {model.B})")
        self.spec = spec
        self.first_block = first_block
        self.widths = [hi - lo for lo, hi in ranges]
        for prev, n in zip(self.widths, self.widths[1:]):
            if n not in (prev, 2 * prev):
                raise ValueError(f"{spec.name}: node ranges {list(ranges)} do not follow the tree")
        self.carry = tuple(carry)
        self.blocks = nn.ModuleList(
            nn.ModuleList(node_slice(layer, lo, hi) for layer in model.blocks[first_block + j])
            for j, (lo, hi) in enumerate(ranges))
        self.head = node_slice(model.head, *ranges[-1])
        self.members = self.widths[-1]
        if self.members != spec.members:
            raise ValueError(f"{spec.name}: computes {self.members} members but its spec says {spec.members}")
        self.train(model.training)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        feats: list[Tensor] = []
        prev, splits = self.widths[0], 0
        for j, block in enumerate(self.blocks):
            splits += self.widths[j] != prev
            prev = self.widths[j]
            for layer in block:
                x, splits = enter(layer, x, splits), 0
            if self.first_block + j in self.carry:  # only stage 0 carries, and it never splits
                feats.append(x)
        logits = enter(self.head, x, splits)
        if self.members > 1:
            logits = logits.unflatten(1, (self.members, -1)).sum(1)
        return (logits, *feats)


def hne(num_classes: int = 10, in_channels: int = 3, input_size: Sequence[int] | None = None,
        config: str = "resnet_small", B: int = 4, width: float = 1.0, sharing: str = "tree",
        splits: Sequence[int] | None = None, groups: int = 1) -> HNE:
    """Build a hierarchical neural ensemble of N = 2^B members.

    Args:
        num_classes, in_channels, input_size: from the dataset (``input_size`` is (H, W); a
            configuration refuses inputs smaller than its total stride).
        config: member architecture, one of ``kdedge.models.hne_configs.CONFIGS``: ``resnet``
            (paper Table 2), ``resnet_small`` (HNE-small), ``mobilenetv2`` (Table 3),
            ``mnist`` (28×28), ``digits`` (8×8), ``tiny`` (tests).
        B: number of splits, 0…5 (B = 4, 16 members, in the paper).
        width: channel multiplier on top of the configuration (rounded to its divisor).
        sharing: ``tree`` (HNE), ``independent`` (N networks, nothing shared) or
            ``multibranch`` (a shared backbone of the first three blocks, then N branches);
            the two baselines of the paper's §4.1.
        splits: explicit ascending layer indices of the B splits (overrides ``sharing``).
        groups: groups of the 1×1 convolutions inside each member's residual layers (1 = paper).

    Returns:
        An :class:`HNE` whose ``forward`` returns member logits ``[N, batch, classes]``.

    Raises:
        ValueError: an impossible configuration (the message names the fix).

    Example:
        >>> m = hne(num_classes=100, config="resnet", B=4)      # the paper's CIFAR-100 HNE
    """
    tree = resolve(config, B, width, sharing, splits, groups, input_size, in_channels)
    return HNE(tree, num_classes, in_channels)

