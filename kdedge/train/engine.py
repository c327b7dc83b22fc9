"""The training loop: ``fit(cfg, run_dir)`` drives a task over the data, on one process or many.

One process: ``kdedge train ...``. Many: the same command under
``torchrun --nproc_per_node=N`` (DDP; gloo on CPU, nccl on GPU). Rank 0 alone logs, evaluates
and writes checkpoints; every rank sees a disjoint shard of each epoch via the distributed
sampler.

Reproducibility: at the start of epoch ``e`` the global torch RNG is reseeded from
``(seed, e, rank)`` and the sampler's order is a function of ``(seed, e)`` (and, under DDP, the
rank), so a run resumed from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run (same weights on CPU). ``data.labelled_per_batch`` swaps in a batch sampler
with a fixed number of labelled images per batch under the same contract.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
import torch.distributed as dist
from torch import nn

from kdedge.io import atomic_write_json, atomic_write_text, dumps_strict, loads_strict, sha256_file
from kdedge.train.checkpoint import load_checkpoint, save_checkpoint, save_weights
from kdedge.train.config import OptimConfig, RunConfig
from kdedge.train.rundir import RunDirError, RunDirLock, claim_run_dir, inspect_run_dir, plan_run


class Reporter(Protocol):
    """Progress sink (the CLI's rich progress bar, or nothing)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, losses: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, losses: dict[str, float]) -> None: ...
    def epoch_end(self, epoch: int, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info


def pick_device(pref: str, dinfo: DistInfo) -> torch.device:
    if pref == "cpu":
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={pref} but CUDA is not available here; use train.device=cpu")
        device = torch.device(pref if ":" in pref else f"cuda:{dinfo.local_rank}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"train.device={pref} but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s) (cuda:0 ...); use train.device=cuda")
        return device
    if pref != "auto":
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N; got {pref!r}")
    return torch.device(f"cuda:{dinfo.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def lr_at(cfg: OptimConfig, epochs: int, t: float) -> float:
    """Learning rate at fractional epoch ``t`` (per step; resumes exactly)."""
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1e-12) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if t >= m)
    span = max(epochs - cfg.warmup_epochs, 1e-12)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, (t - cfg.warmup_epochs) / span)))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def _amp_context(cfg_amp: str, device: torch.device) -> tuple[Any, torch.amp.GradScaler | None]:
    """Autocast on CUDA only (bf16 when supported, else fp16 with a grad scaler)."""
    if device.type != "cuda" or cfg_amp == "off":
        if cfg_amp == "on" and device.type != "cuda":
            raise ValueError("train.amp=on needs a CUDA device; use train.amp=auto or off on CPU")
        return nullcontext, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


def _trim_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only records of epochs < upto_epoch (a resumed run rewrites later ones). A line that is
    not a JSON record (a torn last line from a crash, a hand edit) is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = loads_strict(line)
        except ValueError:
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch < upto_epoch:
            keep.append(line)
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _reduce_mean(values: dict[str, float], dinfo: DistInfo, device: torch.device) -> dict[str, float]:
    if not dinfo.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dinfo.world_size for k, v in zip(keys, t.tolist())}


class OutOfMemory(ValueError):
    """The model or a batch does not fit this machine's (or GPU's) memory; the message says which
    setting to lower. A ValueError: the fix is a config change, like any other bad input."""


_OOM = re.compile(r"out of memory|can't allocate memory", re.I)
_OOM_BYTES = re.compile(r"tried to allocate (\d+) bytes")


@contextmanager
def _memory_named(what: str, fix: str) -> Iterator[None]:
    """Turn torch's allocation failures (``torch.OutOfMemoryError``, the CPU allocator's
    RuntimeError) into one line naming what was being done and the setting to lower."""
    try:
        yield
    except MemoryError:
        raise OutOfMemory(f"out of memory while {what}; {fix}") from None
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
        if not _OOM.search(str(e)):
            raise
        m = _OOM_BYTES.search(str(e))
        size = f" ({int(m.group(1)) / 2**30:.1f} GiB in one tensor)" if m else ""
        raise OutOfMemory(f"out of memory while {what}{size}; {fix}") from None


@contextmanager
def _writing(what: Path, keeps: str) -> Iterator[None]:
    """Name the file and what is still safe when a write fails (disk full, permissions): the
    bare OSError names only a temporary file."""
    try:
        yield
    except OSError as e:
        raise RunDirError(f"cannot write {what}: {e.strerror or e}; {keeps}") from None


@dataclass
class _Parts:
    """Everything a run needs, built (and so validated) before the run directory is touched."""

    splits: Any
    train_loader: Any
    val_loader: Any
    model: nn.Module
    task: Any
    opt: torch.optim.Optimizer
    steps_per_epoch: int


def _create_model(cfg: RunConfig, info: Any) -> nn.Module:
    """``create_model`` with the config's names in its errors: a builder that rejects its
    arguments (a list where it wants an int, ...) raises TypeError/ValueError naming its own
    parameter, which means nothing without the key it came from."""
    from kdedge.models import UnknownNameError, create_model
    from kdedge.train.fields import ConfigError

    try:
        return create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                            input_size=tuple(info.input_size), **cfg.model.args)
    except UnknownNameError:
        raise  # already names the model or the option, with a suggestion
    except (TypeError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if cfg.model.name in text:
            raise ConfigError(f"model.args: {text}") from None
        args = repr(cfg.model.args)
        args = args if len(args) <= 80 else args[:77] + "..."
        raise ConfigError(f"model {cfg.model.name!r} cannot be built from model.args {args}: {text}") from None


def _build(cfg: RunConfig, dinfo: DistInfo, device: torch.device) -> _Parts:
    """Data, loaders, model, task and optimiser: every input is checked here, before any write."""
    from kdedge.train.data import load_data, make_loader
    from kdedge.train.task import get_task_class

    splits = load_data(cfg.data, cfg.seed)
    info = splits.info
    train_set = splits.train_set(cfg.data)
    train_loader = make_loader(train_set, cfg.data.batch_size, train=True, seed=cfg.seed, distributed=dinfo.enabled,
                               num_workers=cfg.data.num_workers, labelled_per_batch=cfg.data.labelled_per_batch)
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with _memory_named(f"building model {cfg.model.name!r}", "use smaller model.args (width, depth, ...)"):
        model = _create_model(cfg, info)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training split is smaller than one batch; lower data.batch_size")
    task = get_task_class(cfg.method)(cfg.loss, num_classes=info.num_classes, epochs=cfg.train.epochs,
                                      steps_per_epoch=steps_per_epoch)
    task.check_model(model)
    with _memory_named(f"moving the model to {device}", "use smaller model.args or another train.device"):
        model.to(device)
    opt = build_optimizer(model, cfg.optim)
    return _Parts(splits, train_loader, val_loader, model, task, opt, steps_per_epoch)


_PLANS = ("new", "takeover", "resume")


def _claim(run_dir: Path, cfg_yaml: str, resume: bool, dinfo: DistInfo,
           device: torch.device) -> tuple[RunDirLock | None, str]:
    """Rank 0 takes the run directory; every rank learns whether that worked and the plan, so
    a refusal on rank 0 ends every rank instead of leaving the others waiting at a barrier."""
    lock, plan, error = None, "new", None
    if dinfo.main:
        try:
            lock, plan = claim_run_dir(run_dir, cfg_yaml, resume)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
            error = e
    if dinfo.enabled:
        flag = torch.tensor([0 if error else 1, _PLANS.index(plan)], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        if not dinfo.main:
            if int(flag[0]) == 0:
                raise RunDirError(f"rank 0 could not take the run directory {run_dir}; see its error")
            plan = _PLANS[int(flag[1])]
    if error is not None:
        raise error
    return lock, plan


def fit(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, reporter: Reporter | None = None,
        stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the final record (val and test metrics).

    Nothing is written before every input has been checked (config, run directory, data,
    model, method); a run directory that holds only a failed start (config.yaml, no
    checkpoint) is taken over; see :mod:`kdedge.train.rundir`.

    Args:
        cfg: a validated RunConfig (``kdedge.train.config.load_config``).
        run_dir: output directory; holds config.yaml, metrics.jsonl, checkpoints/, model.safetensors, run.json.
        resume: continue from the last checkpoint in ``run_dir`` (falling back to the one before
            when it is damaged, with a message); a failed start is started again from epoch 1.
        reporter: progress sink; nothing is printed without one.
        stop_after_epochs: stop (as if interrupted) after this many epochs in this call; for tests.

    Example:
        >>> fit(load_config("configs/hne_mnist_demo.yaml"), "runs/hne-demo")
    """
    from kdedge.train.config import dump_yaml

    reporter = reporter or SilentReporter()
    run_dir = Path(run_dir)
    dinfo = init_distributed(cfg.train.device)
    cfg_yaml = dump_yaml(cfg)
    plan_run(inspect_run_dir(run_dir), cfg_yaml, resume)  # refuse early (reads only), before loading data
    device = pick_device(cfg.train.device, dinfo)
    autocast, scaler = _amp_context(cfg.train.amp, device)
    with _torch_settings(cfg.train.threads, cfg.train.deterministic):
        parts = _build(cfg, dinfo, device)
        lock, plan = _claim(run_dir, cfg_yaml, resume, dinfo, device)
        try:
            return _run(cfg, run_dir, parts, plan, dinfo, device, autocast, scaler, reporter, stop_after_epochs)
        finally:
            if lock is not None:
                lock.release()


@contextmanager
def _torch_settings(threads: int | None, deterministic: bool) -> Iterator[None]:
    """torch's thread count and deterministic-algorithms mode for the run, restored after it.

    Both are process-wide: left set, a run with ``train.threads: 2`` would make every later
    run in the same process (a notebook, a test session) use two threads too, and float sums
    then differ from a run started afresh, which breaks exact resumption across processes.
    """
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if threads:
            torch.set_num_threads(threads)
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        if torch.get_num_threads() != saved[0]:
            torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


def _restore(run_dir: Path, parts: _Parts, plan: str, dinfo: DistInfo, reporter: Reporter) -> tuple[int, list[str]]:
    """The epoch to start at, after loading the checkpoint when resuming; and notes for the user."""
    notes: list[str] = []
    if plan == "takeover":
        if dinfo.main:
            reporter.message(f"{run_dir} held a run that stopped before its first checkpoint; starting it over")
        return 0, notes
    if plan != "resume":
        return 0, notes
    restored = load_checkpoint(run_dir, parts.model, parts.opt,
                               restore=lambda record: parts.task.load_state_dict(record.get("task", {})))
    if restored.notice:
        notes.append(restored.notice)
        if dinfo.main:
            reporter.message(restored.notice)
    if dinfo.main:
        _trim_metrics(run_dir / "metrics.jsonl", restored.epoch)
        reporter.message(f"resuming {run_dir} after epoch {restored.epoch}")
    return restored.epoch, notes


def _train_epoch(cfg: RunConfig, parts: _Parts, train_model: nn.Module, epoch: int, device: torch.device,
                 autocast: Any, scaler: Any, dinfo: DistInfo, reporter: Reporter,
                 run_dir: Path) -> tuple[dict[str, float], float]:
    """One pass over the training loader; returns the mean of every logged value and the last lr."""
    from kdedge.train.data import set_loader_epoch

    model, task, opt, steps = parts.model, parts.task, parts.opt, parts.steps_per_epoch
    torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + dinfo.rank)
    set_loader_epoch(parts.train_loader, epoch)
    model.train()
    sums: dict[str, float] = {}
    lr = lr_at(cfg.optim, cfg.train.epochs, epoch)
    for i, (x, y) in enumerate(parts.train_loader):
        t = epoch + i / steps
        lr = lr_at(cfg.optim, cfg.train.epochs, t)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = task.training_step(train_model, x, y, t)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(_non_finite_message(float(loss.detach()), epoch, i, steps, run_dir))
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        vals = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        for k, v in vals.items():
            sums[k] = sums.get(k, 0.0) + v
        if dinfo.main:
            reporter.step(vals)
    return _reduce_mean({k: v / steps for k, v in sums.items()}, dinfo, device), lr


def _non_finite_message(value: float, epoch: int, step: int, steps: int, run_dir: Path) -> str:
    """Say where the loss broke and what the run directory now allows (1-based epochs and steps)."""
    from kdedge.train.checkpoint import has_checkpoint

    where = f"the loss became {value} in epoch {epoch + 1}, step {step + 1} of {steps}"
    if has_checkpoint(run_dir):
        return (f"{where}; lower optim.lr or set optim.grad_clip and train into a new --out "
                f"({run_dir} keeps its last checkpoint)")
    return (f"{where}; lower optim.lr or set optim.grad_clip and run again "
            f"(nothing was checkpointed: --out can be reused)")


def _run(cfg: RunConfig, run_dir: Path, parts: _Parts, plan: str, dinfo: DistInfo, device: torch.device,
         autocast: Any, scaler: Any, reporter: Reporter, stop_after_epochs: int | None) -> dict[str, Any]:
    from kdedge.train.data import make_loader
    from kdedge.train.distributed import unwrap

    model, task = parts.model, parts.task
    start_epoch, notes = _restore(run_dir, parts, plan, dinfo, reporter)
    train_model: nn.Module = model
    if dinfo.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    epochs = cfg.train.epochs
    last_val: dict[str, Any] = {}
    done_this_call = 0
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        if dinfo.main:
            reporter.epoch_start(epoch, epochs, parts.steps_per_epoch)
        with _memory_named(f"training epoch {epoch + 1} on {device}", "lower data.batch_size"):
            means, lr = _train_epoch(cfg, parts, train_model, epoch, device, autocast, scaler, dinfo, reporter, run_dir)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train": means, **task.log_values(),
                                  "seconds": round(time.perf_counter() - t0, 3)}
        if dinfo.main and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs):
            with _memory_named(f"validating on {device}", "lower data.eval_batch_size"):
                last_val = task.evaluate(unwrap(model), parts.val_loader, device)
            record["val"] = last_val
        if dinfo.main:
            keeps = "the last checkpoint written is intact (--resume continues from it)"
            with _writing(run_dir / "metrics.jsonl", keeps):
                with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(dumps_strict(record, indent=None) + "\n")
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == epochs:
                with _writing(run_dir / "checkpoints", keeps):
                    save_checkpoint(run_dir, epoch + 1, model, parts.opt, {"task": task.state_dict()})
            reporter.epoch_end(epoch, record)
        if dinfo.enabled:
            dist.barrier()
        done_this_call += 1
        if stop_after_epochs is not None and done_this_call >= stop_after_epochs and epoch + 1 < epochs:
            return {"status": "stopped", "epoch": epoch + 1}

    result: dict[str, Any] = {"status": "finished"}
    if dinfo.main:
        test_loader = make_loader(parts.splits.test, cfg.data.eval_batch_size, train=False,
                                  num_workers=cfg.data.num_workers)
        with _memory_named(f"testing on {device}", "lower data.eval_batch_size"):
            test = task.evaluate_final(model, parts.val_loader, test_loader, device)
        weights = run_dir / "model.safetensors"
        keeps = "the final checkpoint is intact: --resume writes the final weights again"
        with _writing(weights, keeps):
            save_weights(model, weights, metadata={"kdedge": "weights", "method": cfg.method})
        result = {"status": "finished", "method": cfg.method, "model": cfg.model.name, "epochs": epochs,
                  "world_size": dinfo.world_size, "device": str(device), "data_info": parts.splits.info.to_dict(),
                  "val": last_val, "test": test, "model_sha256": sha256_file(weights)}
        with _writing(run_dir / "run.json", keeps):
            atomic_write_json(run_dir / "run.json", result)
        if notes:
            result = {**result, "notes": notes}
    if dinfo.enabled:
        dist.barrier()
    return result
