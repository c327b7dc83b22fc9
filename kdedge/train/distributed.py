"""What tasks and evaluation need of DDP: the module inside a wrapper, and a mean over ranks.

Kept apart from :mod:`kdedge.train.task` so that the evaluation helpers, which every task uses,
and the tasks themselves import it without importing each other.
"""

from __future__ import annotations

from torch import Tensor, nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP / compiled wrapper (``model`` itself when it is not wrapped).

    Args:
        model: a module, possibly wrapped (``DistributedDataParallel``, ``torch.compile``).

    Returns:
        The innermost module, whose attributes (``stages()``, ``combine_rules``) are the model's.

    Example:
        >>> inner = unwrap(torch.nn.parallel.DistributedDataParallel(model))  # doctest: +SKIP
    """
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # type: ignore[union-attr]
        model = model.module  # type: ignore[assignment]
    return model


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar over DDP ranks (the value itself on one process).

    Tasks that anneal a temperature from batch statistics use it so that every rank anneals
    identically and the replicas stay equal.

    Args:
        value: a scalar tensor on this rank's device.

    Returns:
        A new tensor holding the mean over ranks (``value`` unchanged on one process).

    Example:
        >>> float(mean_over_ranks(torch.tensor(0.5)))  # one process
        0.5
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


__all__ = ["mean_over_ranks", "unwrap"]
