"""Checkpoints: tensors in safetensors, everything else in JSON; never pickle.

A checkpoint of epoch E is ``ckpt-eE.model.safetensors`` + ``ckpt-eE.optim.safetensors`` and
the pointer file ``checkpoint.json`` (written last, atomically), so an interrupted write leaves
the previous checkpoint in force. Optimiser state is flattened to ``"<param index>.<key>"``
tensors plus JSON scalars; the parameter order is the optimiser's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdedge.io import atomic_write, atomic_write_json

POINTER = "checkpoint.json"


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = state_tensors(model)
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata or {}))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights in {path} do not fit the model: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{idx}.{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, _, key = name.partition(".")
        state.setdefault(int(idx), {})[key] = t
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str | Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer,
                    extra: dict[str, Any]) -> Path:
    """Write the checkpoint of a finished epoch (1-based count of epochs done) atomically."""
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt-e{epoch:04d}"
    save_weights(model, ckdir / f"{stem}.model.safetensors")
    otensors, ometa = _flatten_optimizer(opt)
    atomic_write(ckdir / f"{stem}.optim.safetensors", lambda p: save_file(otensors, str(p)))
    pointer = {"epoch": epoch, "model": f"{stem}.model.safetensors", "optim": f"{stem}.optim.safetensors",
               "optim_meta": ometa, **extra}
    previous = read_pointer(run_dir)
    atomic_write_json(ckdir / POINTER, pointer)
    if previous and previous.get("epoch") != epoch:  # the new one is in force: drop the old files
        for key in ("model", "optim"):
            (ckdir / previous[key]).unlink(missing_ok=True)
    return ckdir / POINTER


def read_pointer(run_dir: str | Path) -> dict[str, Any] | None:
    p = Path(run_dir) / "checkpoints" / POINTER
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def load_checkpoint(run_dir: str | Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimiser; returns the pointer dict (epoch, task state, ...)."""
    pointer = read_pointer(run_dir)
    if pointer is None:
        raise ValueError(f"{run_dir} has no checkpoint to resume from")
    ckdir = Path(run_dir) / "checkpoints"
    load_weights(model, ckdir / pointer["model"])
    _unflatten_optimizer(opt, load_file(str(ckdir / pointer["optim"])), pointer["optim_meta"])
    return pointer
