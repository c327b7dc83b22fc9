"""Reference implementation of an HNE: every member evaluated as a separate network.

Member ``n`` is rebuilt as a plain sequence of one-node layers (ordinary, ungrouped
convolutions) whose weights are copied out of the tree's grouped tensors through the state
dict. Nothing here goes through the tree's grouped forward, its replication or its node
slicing, so tests can check that the grouped tree computes exactly these members, in this
order. The per-member loop is also the baseline of ``bench/bench_hne_throughput.py``.

Depth-first order: member ``n`` runs node ``n >> (B - d)`` at block ``d``. Members
``0 … 2^b − 1`` are the leaves under the first path's node at depth ``B − b``: they share
blocks ``0 … B − b`` with member 0 and no later block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdedge.models.hne import HNE
from kdedge.models.hne_layers import NodeModule

__all__ = ["member_path", "node_copy", "reference_member", "reference_members"]


def member_path(n: int, B: int) -> list[int]:
    """The node of member ``n`` at every block ``0 … B`` (depth-first numbering)."""
    if not 0 <= n < 2 ** B:
        raise ValueError(f"member {n} does not exist in a tree of {2 ** B} members")
    return [n >> (B - d) for d in range(B + 1)]


def node_copy(layer: NodeModule, node: int) -> NodeModule:
    """An independent one-node copy of node ``node`` of a grouped layer (copied tensors)."""
    single = layer.with_nodes(1)
    state = {name: t.clone() if t.dim() == 0 else t.unflatten(0, (layer.nodes, -1))[node].clone()
             for name, t in layer.state_dict().items()}
    single.load_state_dict(state)
    single.train(layer.training)
    return single.to(next(iter(layer.state_dict().values())).device)


def reference_member(model: HNE, n: int) -> nn.Sequential:
    """Member ``n`` as its own network with the tree's weights; ``forward`` gives [batch, classes]."""
    path = member_path(n, model.B)
    layers: list[nn.Module] = [node_copy(layer, path[d]) for d in range(model.B + 1) for layer in model.blocks[d]]
    layers.append(node_copy(model.head, n))
    return nn.Sequential(*layers)


def reference_members(model: HNE, x: Tensor) -> Tensor:
    """Logits of every member, one separate network at a time: ``[N, batch, classes]``."""
    return torch.stack([reference_member(model, n)(x) for n in range(model.num_members)])
