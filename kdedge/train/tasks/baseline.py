"""Plain cross-entropy training of any model whose forward returns logits."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdedge.train.labels import IGNORE_INDEX
from kdedge.train.task import Task


class BaselineTask(Task):
    """Cross-entropy on labelled samples; unlabelled samples (label -100) are ignored."""

    name = "baseline"

    def training_step(self, model: nn.Module, x: Tensor, y: Tensor, epoch: float) -> dict[str, Tensor]:
        logits = model(x)
        if not isinstance(logits, Tensor):
            raise ValueError("the baseline method needs a model whose forward returns one logits tensor")
        if bool((y != IGNORE_INDEX).any()):
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        else:  # a batch of only unlabelled samples contributes nothing but keeps DDP in step
            loss = logits.sum() * 0.0
        return {"loss": loss, "ce": loss.detach()}
