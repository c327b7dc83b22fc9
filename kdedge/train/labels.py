"""The label that marks an unlabelled sample.

Semi-supervised training appends an unlabelled pool to the training set with every label set to
:data:`IGNORE_INDEX`; the cross-entropy terms skip those samples (``ignore_index``), the
distillation terms use them, and evaluation drops them. This is the one definition: the data
layer, the losses, the tasks and the evaluation import it from here. Standard library only, so
a loss module (or export's data batches) can import it without importing a task or torch.

Example:
    >>> from kdedge.train.labels import IGNORE_INDEX
    >>> IGNORE_INDEX
    -100
"""

from __future__ import annotations

IGNORE_INDEX = -100  # torch's default ignore_index of cross_entropy, so F.cross_entropy agrees

__all__ = ["IGNORE_INDEX"]
