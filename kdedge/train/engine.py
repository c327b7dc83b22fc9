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

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from kdedge.config import OptimConfig, RunConfig
from kdedge.io import atomic_write_json, atomic_write_text
from kdedge.train.checkpoint import load_checkpoint, read_pointer, save_checkpoint, save_weights


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


class RunDirError(ValueError):
    """The output directory cannot take this run (holds another run, not writable, ...)."""


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
        return torch.device(pref if ":" in pref else f"cuda:{dinfo.local_rank}")
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


def _same_config(saved: str, new: str) -> bool:
    """The saved config.yaml describes the same run as ``new``: equal text, or equal once both are
    resolved (a config written before an option existed lacks it; its default applies)."""
    if saved == new:
        return True
    import yaml

    from kdedge.config import config_from_dict

    try:
        return config_from_dict(yaml.safe_load(saved)).to_dict() == config_from_dict(yaml.safe_load(new)).to_dict()
    except (ValueError, TypeError, AttributeError, yaml.YAMLError):
        return False


def prepare_run_dir(run_dir: Path, cfg_yaml: str, resume: bool) -> None:
    """Refuse to mix runs: an existing run directory must hold the same config (and --resume)."""
    saved = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a directory")
    if saved.is_file():
        if not _same_config(saved.read_text(), cfg_yaml):
            raise RunDirError(f"{run_dir} already holds a different run (its config.yaml differs); "
                              f"choose another --out, or resume it with its own config")
        status = _read_status(run_dir)
        if status.get("status") == "finished":
            raise RunDirError(f"{run_dir} holds a finished run; choose another --out")
        if not resume:
            raise RunDirError(f"{run_dir} holds an unfinished run; add --resume to continue it")
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir} is not empty and holds no kdedge run; choose another --out")
    elif resume:
        raise RunDirError(f"--resume: {run_dir} holds no run to resume")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"cannot write to {run_dir}: {e.strerror or e}") from None


def _read_status(run_dir: Path) -> dict[str, Any]:
    p = run_dir / "run.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _trim_metrics(path: Path, upto_epoch: int) -> None:
    """Keep only records of epochs < upto_epoch (a resumed run rewrites later ones)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) < upto_epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a crash
    atomic_write_text(path, "".join(k + "\n" for k in keep))


def _reduce_mean(values: dict[str, float], dinfo: DistInfo, device: torch.device) -> dict[str, float]:
    if not dinfo.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / dinfo.world_size for k, v in zip(keys, t.tolist())}


def fit(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False, reporter: Reporter | None = None,
        stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir``; returns the final record (val and test metrics).

    Args:
        cfg: a validated RunConfig (``kdedge.config.load_config``).
        run_dir: output directory; holds config.yaml, metrics.jsonl, checkpoints/, model.safetensors, run.json.
        resume: continue from the last checkpoint in ``run_dir``.
        reporter: progress sink; nothing is printed without one.
        stop_after_epochs: stop (as if interrupted) after this many epochs in this call; for tests.

    Example:
        >>> fit(load_config("configs/hne_mnist_demo.yaml"), "runs/hne-demo")
    """
    from kdedge.config import dump_yaml
    from kdedge.models import create_model
    from kdedge.train.data import load_data, make_loader, set_loader_epoch
    from kdedge.train.task import get_task_class, unwrap

    reporter = reporter or SilentReporter()
    run_dir = Path(run_dir)
    dinfo = init_distributed(cfg.train.device)
    device = pick_device(cfg.train.device, dinfo)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    cfg_yaml = dump_yaml(cfg)
    if dinfo.main:
        prepare_run_dir(run_dir, cfg_yaml, resume)
        atomic_write_text(run_dir / "config.yaml", cfg_yaml)
    if dinfo.enabled:
        dist.barrier()

    splits = load_data(cfg.data, cfg.seed)
    info = splits.info
    train_set = splits.train_set(cfg.data)
    train_loader = make_loader(train_set, cfg.data.batch_size, train=True, seed=cfg.seed, distributed=dinfo.enabled,
                               num_workers=cfg.data.num_workers, labelled_per_batch=cfg.data.labelled_per_batch)
    val_loader = make_loader(splits.val, cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = create_model(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                         input_size=tuple(info.input_size), **cfg.model.args)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training split is smaller than one batch; lower data.batch_size")
    task = get_task_class(cfg.method)(cfg.loss, num_classes=info.num_classes, epochs=cfg.train.epochs,
                                      steps_per_epoch=steps_per_epoch)
    task.check_model(model)
    model.to(device)
    opt = build_optimizer(model, cfg.optim)

    start_epoch = 0
    if resume:
        pointer = read_pointer(run_dir)
        if pointer is None:
            raise RunDirError(f"--resume: {run_dir} has no checkpoint yet; start it again without --resume")
        pointer = load_checkpoint(run_dir, model, opt)
        task.load_state_dict(pointer.get("task", {}))
        start_epoch = int(pointer["epoch"])
        if dinfo.main:
            _trim_metrics(run_dir / "metrics.jsonl", start_epoch)
            reporter.message(f"resuming {run_dir} after epoch {start_epoch}")

    train_model: nn.Module = model
    if dinfo.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast, scaler = _amp_context(cfg.train.amp, device)

    epochs = cfg.train.epochs
    last_val: dict[str, Any] = {}
    done_this_call = 0
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(cfg.seed * 100_003 + epoch * 101 + dinfo.rank)
        set_loader_epoch(train_loader, epoch)
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        if dinfo.main:
            reporter.epoch_start(epoch, epochs, steps_per_epoch)
        for i, (x, y) in enumerate(train_loader):
            t = epoch + i / steps_per_epoch
            lr = lr_at(cfg.optim, epochs, t)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                out = task.training_step(train_model, x, y, t)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {float(loss)} at epoch {epoch} step {i}; "
                                         f"lower optim.lr or enable optim.grad_clip")
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
        means = _reduce_mean({k: v / steps_per_epoch for k, v in sums.items()}, dinfo, device)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train": means, **task.log_values(),
                                  "seconds": round(time.perf_counter() - t0, 3)}
        if dinfo.main and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs):
            last_val = task.evaluate(unwrap(model), val_loader, device)
            record["val"] = last_val
        if dinfo.main:
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if (epoch + 1) % cfg.train.checkpoint_every == 0 or epoch + 1 == epochs:
                save_checkpoint(run_dir, epoch + 1, model, opt, {"task": task.state_dict()})
            reporter.epoch_end(epoch, record)
        if dinfo.enabled:
            dist.barrier()
        done_this_call += 1
        if stop_after_epochs is not None and done_this_call >= stop_after_epochs and epoch + 1 < epochs:
            return {"status": "stopped", "epoch": epoch + 1}

    result: dict[str, Any] = {"status": "finished"}
    if dinfo.main:
        test_loader = make_loader(splits.test, cfg.data.eval_batch_size, train=False, num_workers=cfg.data.num_workers)
        test = task.evaluate_final(model, val_loader, test_loader, device)
        save_weights(model, run_dir / "model.safetensors", metadata={"kdedge": "weights", "method": cfg.method})
        result = {"status": "finished", "method": cfg.method, "model": cfg.model.name, "epochs": epochs,
                  "world_size": dinfo.world_size, "device": str(device), "data_info": info.to_dict(),
                  "val": last_val, "test": test}
        atomic_write_json(run_dir / "run.json", result)
    if dinfo.enabled:
        dist.barrier()
    return result
