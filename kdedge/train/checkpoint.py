"""Checkpoints: tensors in safetensors, everything else in JSON; never pickle.

A checkpoint of epoch E is ``ckpt-eE.model.safetensors`` + ``ckpt-eE.optim.safetensors`` + its
record ``ckpt-eE.json`` (epoch, file names, their sha256, optimiser scalars, the task's state),
written in that order, each atomically; then the pointer ``checkpoint.json`` (a copy of the
record) is written last, so an interrupted write leaves the previous checkpoint in force. The
two newest checkpoints are kept: when the newest one is damaged on disk (a truncated file, a bit
flip, a damaged pointer), :func:`load_checkpoint` falls back to the one before and says so.

Optimiser state is flattened to ``"<param index>.<key>"`` tensors plus JSON scalars; the
parameter order is the optimiser's own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdedge.io import atomic_write, atomic_write_bytes, atomic_write_json, read_json_strict, sha256_file

POINTER = "checkpoint.json"
KEEP = 2  # checkpoints kept on disk: the newest and one to fall back to
CHECKPOINT_FILE = re.compile(r"ckpt-e(\d{4,})\.(model\.safetensors|optim\.safetensors|json)")


class CheckpointError(ValueError):
    """A checkpoint (or final weights) that cannot be read back; the message names the file."""


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its metadata keys in sorted order: safetensors writes
    them in hash order, which changes with the process, so equal weights would hash unequal in
    ``run.json``. The header keeps its length (the tensors' offsets do not move)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    if not meta:
        return data
    out = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                     ensure_ascii=False).encode()
    if len(out) > n:  # not the serializer we know: keep the file as written
        return data
    return data[:8] + out.ljust(n, b" ") + data[8 + n:]


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = state_tensors(model)
    atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata or {})))


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file.

    Raises:
        CheckpointError: the file is missing or damaged (truncated, not safetensors).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on damage
        raise CheckpointError(f"{path} is damaged ({_first_line(e)})") from None


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a safetensors file into ``model``.

    Raises:
        CheckpointError: the file is missing or damaged, or its tensors do not fit the model.
    """
    _apply_weights(model, read_tensors(path), path, strict)


def _apply_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, strict: bool = True) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if strict and (missing or unexpected or wrong):
        raise CheckpointError(f"weights in {path} do not fit the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, other shapes {wrong[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k not in wrong}, strict=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


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
    names = {"model": f"{stem}.model.safetensors", "optim": f"{stem}.optim.safetensors"}
    save_weights(model, ckdir / names["model"])
    otensors, ometa = _flatten_optimizer(opt)
    atomic_write(ckdir / names["optim"], lambda p: save_file(otensors, str(p)))
    record = {"epoch": epoch, **names, "sha256": {k: sha256_file(ckdir / n) for k, n in names.items()},
              "bytes": {k: (ckdir / n).stat().st_size for k, n in names.items()}, "optim_meta": ometa, **extra}
    atomic_write_json(ckdir / f"{stem}.json", record)
    atomic_write_json(ckdir / POINTER, record)  # last: from here on this checkpoint is in force
    _prune(ckdir, epoch)
    return ckdir / POINTER


def _epoch_files(ckdir: Path) -> dict[int, list[Path]]:
    out: dict[int, list[Path]] = {}
    if ckdir.is_dir():
        for p in ckdir.iterdir():
            m = CHECKPOINT_FILE.fullmatch(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append(p)
    return out


def _prune(ckdir: Path, epoch: int) -> None:
    """Keep the checkpoint in force and the newest complete one before it; drop the rest (older
    ones, leftovers of epochs after ``epoch`` from an attempt that was rolled back, temp files)."""
    files = _epoch_files(ckdir)
    complete = sorted(e for e, ps in files.items() if e < epoch and any(p.suffix == ".json" for p in ps))
    keep = {epoch, *complete[-(KEEP - 1):]} if KEEP > 1 else {epoch}
    for e, paths in files.items():
        if e not in keep:
            for p in paths:
                p.unlink(missing_ok=True)
    for p in ckdir.glob(".*.tmp"):  # left by a write that was killed (the run directory is locked: none is live)
        p.unlink(missing_ok=True)


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint, intact or not: a pointer or a checkpoint record.
    Tensor files without a record are the remains of an interrupted write, not a checkpoint."""
    ckdir = Path(run_dir) / "checkpoints"
    return (ckdir / POINTER).exists() or any(p.suffix == ".json" for ps in _epoch_files(ckdir).values() for p in ps)


def read_pointer(run_dir: str | Path) -> dict[str, Any] | None:
    """The pointer record, or None when there is none.

    Raises:
        CheckpointError: the pointer exists but is damaged (the message names it).
    """
    p = Path(run_dir) / "checkpoints" / POINTER
    if not p.exists():
        return None
    return _read_record(p)


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = read_json_strict(path)
    except ValueError as e:  # JSONError: already names the file
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    problem = _record_problem(record)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem})")
    return record


def _record_problem(record: Any) -> str | None:
    """What is wrong with a checkpoint record's structure, or None. File names must be plain
    checkpoint names in the same folder: a record never points elsewhere."""
    if not isinstance(record, dict):
        return "not a JSON object"
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return f"bad epoch {epoch!r}"
    for key in ("model", "optim"):
        name = record.get(key)
        if not isinstance(name, str) or not CHECKPOINT_FILE.fullmatch(name) or not name.endswith(f".{key}.safetensors"):
            return f"bad {key} file name {name!r}"
    meta = record.get("optim_meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) \
            or not isinstance(meta.get("scalars"), dict):
        return "bad optimiser record"
    for key in ("sha256", "bytes"):
        if not isinstance(record.get(key, {}), dict):
            return f"bad {key} record"
    return None


@dataclass
class Restored:
    """The checkpoint a resume continues from.

    Attributes:
        epoch: epochs done in it.
        record: its record (the task state is ``record["task"]``).
        path: its record file (the pointer, or ``ckpt-eNNNN.json`` after a fallback).
        skipped: one line per newer checkpoint that was damaged and skipped; empty normally.
    """

    epoch: int
    record: dict[str, Any]
    path: Path
    skipped: list[str] = field(default_factory=list)

    @property
    def notice(self) -> str | None:
        """The line to show the user when a fallback happened."""
        if not self.skipped:
            return None
        return (f"{'; '.join(self.skipped)}; resuming from {self.path.parent.name}/{self.path.name} "
                f"(after epoch {self.epoch}) instead")


def load_checkpoint(run_dir: str | Path, model: nn.Module, opt: torch.optim.Optimizer,
                    restore: Callable[[dict[str, Any]], None] | None = None) -> Restored:
    """Restore model, optimiser and (through ``restore(record)``) the task from the newest intact
    checkpoint: the pointer's, else the newest checkpoint record whose files are intact.

    Args:
        restore: applies the rest of a record (e.g. ``task.load_state_dict(record["task"])``);
            a ``ValueError`` from it marks that checkpoint as damaged.

    Raises:
        CheckpointError: no checkpoint, or none intact (the message names every damaged file).
    """
    ckdir = Path(run_dir) / "checkpoints"
    skipped: list[str] = []
    tried: set[tuple[str, str]] = set()
    for path in _candidates(ckdir):
        try:
            record = _read_record(path)
            files = (record["model"], record["optim"])
            if files in tried:
                continue  # the pointer's record again: same files, same damage
            tried.add(files)
            _restore(ckdir, path, record, model, opt, restore)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return Restored(epoch=record["epoch"], record=record, path=path, skipped=skipped)
    if not skipped:
        raise CheckpointError(f"{run_dir} has no checkpoint to resume from")
    raise CheckpointError(f"cannot resume {run_dir}: {'; '.join(skipped)}; no intact checkpoint is left "
                          f"(train into a new --out)")


def _candidates(ckdir: Path) -> list[Path]:
    """The pointer first, then every checkpoint record, newest first."""
    records = sorted((e, p) for e, ps in _epoch_files(ckdir).items() for p in ps if p.suffix == ".json")
    pointer = [ckdir / POINTER] if (ckdir / POINTER).exists() else []
    return pointer + [p for _, p in reversed(records)]


def _restore(ckdir: Path, source: Path, record: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
             restore: Callable[[dict[str, Any]], None] | None) -> None:
    tensors = {}
    for key in ("model", "optim"):
        path = ckdir / record[key]
        size, want = record.get("bytes", {}).get(key), record.get("sha256", {}).get(key)
        if path.is_file() and isinstance(size, int) and path.stat().st_size != size:
            raise CheckpointError(f"{path} is truncated or overwritten ({path.stat().st_size} bytes, "
                                  f"{size} written)")
        if path.is_file() and want is not None and sha256_file(path) != want:
            raise CheckpointError(f"{path} is damaged (its sha256 differs from the one recorded)")
        tensors[key] = read_tensors(path)
    _apply_weights(model, tensors["model"], ckdir / record["model"])
    try:
        _unflatten_optimizer(opt, tensors["optim"], record["optim_meta"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{ckdir / record['optim']} does not fit this run ({_first_line(e)})") from None
    if restore is not None:
        try:
            restore(record)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{source} is damaged ({_first_line(e)})") from None
