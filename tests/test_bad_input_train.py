"""Bad input on the training side: one clear line and a non-zero exit, never a traceback or a
hang, and never lost data; a failed or killed start never blocks the next one.

Classes (each with cases beyond the first example found):
1. the run directory's lifecycle: validation before any write, failed starts taken over,
   kills at chosen points, damaged checkpoints on --resume;
2. numeric config fields: range and finiteness, with the key named;
3. strict YAML: duplicate keys, aliases, tags, depth, files that are not text;
4. a non-finite loss;
5. the culprit named in messages (a file where a run directory is expected, ...);
6. help texts that name commands or options that do not exist.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdedge.cli.main import app
from kdedge.train.checkpoint import CheckpointError
from kdedge.train.config import OptimConfig, RunConfig, TrainConfig, load_config, read_yaml
from kdedge.train.data import DataConfig, DataError, DatasetInfo
from kdedge.train.engine import RunDirError, fit
from kdedge.train.fields import RANGE, ConfigError, build_dataclass
from kdedge.train.run import RunError, load_trained
from kdedge.train.rundir import LOCK, RunDirLock, inspect_run_dir
from kdedge.train.task import METHODS, get_task_class

runner = CliRunner()
TINY_SET = ["data.name=synthetic", "data.batch_size=32", "model.name=small_cnn", "model.args.width=4",
            "optim.lr=0.05", "train.device=cpu"]
# for the CLI, with --data synthetic (small_cnn is the default model, and --model must be able to change it)
TINY_CLI = [arg for item in TINY_SET if not item.startswith(("data.name", "model.name")) for arg in ("--set", item)]


def tiny(*extra: str) -> RunConfig:
    return load_config(None, [*TINY_SET, "train.epochs=2", *extra])


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def run_cli(*args: str, driver: str | None = None) -> subprocess.CompletedProcess:
    """``kdedge ARGS`` in a fresh process (``driver``: python code run first, to plant a kill)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    code = (driver or "") + textwrap.dedent("""
        import sys
        from kdedge.cli.main import main
        sys.argv = ["kdedge", *sys.argv[1:]]
        main()
    """)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def error_line(text: str) -> str:
    """The single line of error a failure prints; fails when there is more (a traceback, a warning)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert "Traceback" not in text, text
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def names(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --- 1. the run directory's lifecycle ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "bogus"], "unknown model 'bogus'"),
        (["--set", "model.args.width=0"], "width must be >= 1"),
        (["--set", "model.args.widht=4"], "has no option 'widht'"),
        (["--set", "model.args.width=[4]"], "model 'small_cnn' cannot be built from model.args"),
        (["--data", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--method", "hne", "--model", "small_cnn"], "model.name: hne"),  # a model the method cannot train
        (["--set", "data.per_class=1000"], "has only"),
        (["--set", "train.amp=on"], "train.amp=on needs a CUDA device"),
        # 72 MB, then 262 TiB: beyond any address space, so the allocation fails at once everywhere
        (["--set", "model.args.width=2000000"], "out of memory while building model 'small_cnn' (268220.9 GiB"),
    ],
)
def test_a_start_that_fails_validation_writes_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "r"
    res = invoke("train", "--data", "synthetic", "--epochs", "1", "--out", str(out), *TINY_CLI, *args, "--quiet")
    assert res.exit_code == 2, res.output
    assert needle in error_line(res.output)
    assert not out.exists()  # nothing, not even the directory, is left to block the next attempt


def test_a_run_directory_with_a_config_and_nothing_else_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("model: {name: bogus}\n")  # left by an older kdedge's failed start
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n{"epo')  # an epoch never checkpointed, torn
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "ckpt-e0001.model.safetensors").write_bytes(b"half")  # no record: no checkpoint
    (out / ".config.yaml.x1y2z3.tmp").write_text("")
    assert inspect_run_dir(out).kind == "failed_start"
    res = fit(tiny(), out)
    assert res["status"] == "finished"
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / ".config.yaml.x1y2z3.tmp").exists()
    assert "bogus" not in (out / "config.yaml").read_text()


def test_resume_of_a_failed_start_starts_it_from_epoch_1(tmp_path: Path) -> None:
    out, ref = tmp_path / "r", tmp_path / "ref"
    fit(tiny(), ref)
    out.mkdir()
    (out / "config.yaml").write_text((ref / "config.yaml").read_text())
    assert fit(tiny(), out, resume=True)["status"] == "finished"
    same_weights(ref, out)
    out2 = tmp_path / "r2"
    out2.mkdir()
    (out2 / "config.yaml").write_text((ref / "config.yaml").read_text())
    with pytest.raises(RunDirError, match="before its first checkpoint, with another config; rerun without --resume"):
        fit(tiny("optim.lr=0.01"), out2, resume=True)
    assert names(out2) == {"config.yaml"}


def test_a_failed_start_with_files_kdedge_did_not_write_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"files kdedge did not write \(notes.txt\)"):
        fit(tiny(), out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.yaml").read_text() == "seed: 0\n"
    (out / "notes.txt").unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "best.pt").write_bytes(b"x")
    with pytest.raises(RunDirError, match=r"checkpoints/best.pt"):
        fit(tiny(), out)
    assert (out / "checkpoints" / "best.pt").read_bytes() == b"x"


def test_a_live_run_is_not_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")  # looks like a failed start ...
    lock = RunDirLock(out)
    lock.acquire()  # ... but another kdedge train holds it, in its first epoch
    try:
        with pytest.raises(RunDirError, match=rf"in use by another kdedge train \(pid {os.getpid()}\)"):
            fit(tiny(), out)
        assert (out / "config.yaml").read_text() == "seed: 0\n"
    finally:
        lock.release()
    assert fit(tiny(), out)["status"] == "finished"


def test_nothing_with_a_checkpoint_is_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "r"
    fit(tiny("train.epochs=3"), out, stop_after_epochs=1)
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    with pytest.raises(RunDirError, match="unfinished run; add --resume"):
        fit(tiny("train.epochs=3"), out)
    with pytest.raises(RunDirError, match="different run"):
        fit(tiny("train.epochs=3", "optim.lr=0.01"), out)
    with pytest.raises(RunDirError, match="different run"):
        fit(tiny("train.epochs=3", "optim.lr=0.01"), out, resume=True)
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == before


KILL = textwrap.dedent("""
    import os, signal
    SIG = signal.{sig}
    def die(*args, **kwargs):
        os.kill(os.getpid(), SIG)
    POINT = {point!r}
    if POINT == "claimed":            # right after config.yaml is written
        import kdedge.train.engine as engine
        real_claim = engine.claim_run_dir
        def claim(*args, **kwargs):
            result = real_claim(*args, **kwargs)
            die()
            return result
        engine.claim_run_dir = claim
    elif POINT == "first-step":       # inside the first training step
        from kdedge.train.tasks.baseline import BaselineTask
        BaselineTask.training_step = lambda self, *args: die()
    elif POINT == "checkpoint-1":     # epoch 1 done and logged, its checkpoint not yet written
        import kdedge.train.engine as engine
        engine.save_checkpoint = die
    elif POINT == "pointer-2":        # epoch 2's files and record written, its pointer not yet
        import kdedge.train.checkpoint as ck
        real_write = ck.atomic_write_json
        def write(path, obj):
            if path.name == ck.POINTER and obj["epoch"] == 2:
                die()
            return real_write(path, obj)
        ck.atomic_write_json = write
""")


@pytest.mark.parametrize("point, sig", [("claimed", "SIGKILL"), ("first-step", "SIGKILL"),
                                        ("checkpoint-1", "SIGKILL"), ("first-step", "SIGINT"),
                                        ("first-step", "SIGTERM")])
def test_a_start_killed_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path: Path, point: str,
                                                                            sig: str) -> None:
    out = tmp_path / "r"
    args = ["train", "--data", "synthetic", "--epochs", "2", "--out", str(out), *TINY_CLI, "--quiet"]
    proc = run_cli(*args, driver=KILL.format(point=point, sig=sig))
    if sig in ("SIGKILL", "SIGTERM"):  # SIGTERM (a scheduler or torchrun stopping the job) ends it as SIGKILL does
        assert proc.returncode == -getattr(signal, sig), proc.stderr
    else:
        assert proc.returncode == 130, proc.stderr
        assert "interrupted" in error_line(proc.stderr)
    assert "config.yaml" in names(out) and not (out / "checkpoints" / "checkpoint.json").exists()
    assert inspect_run_dir(out).kind == "failed_start"
    res = invoke(*args)  # the same command again: no --resume, no hand clean-up
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_a_run_killed_while_writing_a_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    out, ref = tmp_path / "r", tmp_path / "ref"
    args = ["--data", "synthetic", "--epochs", "3", *TINY_CLI, "--quiet"]
    assert invoke("train", "--out", str(ref), *args).exit_code == 0
    proc = run_cli("train", "--out", str(out), *args, driver=KILL.format(point="pointer-2", sig="SIGKILL"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert inspect_run_dir(out).kind == "unfinished"
    res = invoke("train", "--out", str(out), *args)
    assert res.exit_code == 2 and "unfinished run; add --resume" in error_line(res.output)
    res = invoke("train", "--out", str(out), *args, "--resume")
    assert res.exit_code == 0, res.output
    same_weights(ref, out)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def _stopped(tmp_path: Path, name: str = "r") -> Path:
    out = tmp_path / name
    assert fit(tiny("train.epochs=4"), out, stop_after_epochs=3)["status"] == "stopped"
    return out


class Messages:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def epoch_start(self, *args: Any) -> None: ...
    def step(self, *args: Any) -> None: ...
    def epoch_end(self, *args: Any) -> None: ...

    def message(self, text: str) -> None:
        self.lines.append(text)


@pytest.mark.parametrize("damage", ["truncate-model", "flip-optim", "delete-model", "pointer-garbage"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, damage: str) -> None:
    ref = tmp_path / "ref"
    fit(tiny("train.epochs=4"), ref)
    out = _stopped(tmp_path)
    ck = out / "checkpoints"
    assert {p.name for p in ck.iterdir()} == {"checkpoint.json", *(f"ckpt-e000{e}.{k}" for e in (2, 3)
                                               for k in ("json", "model.safetensors", "optim.safetensors"))}
    if damage == "truncate-model":
        victim = ck / "ckpt-e0003.model.safetensors"
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "flip-optim":
        victim = ck / "ckpt-e0003.optim.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "delete-model":
        victim = ck / "ckpt-e0003.model.safetensors"
        victim.unlink()
    else:
        victim = ck / "checkpoint.json"
        victim.write_text('{"epoch": 3, "model": ')
    messages = Messages()
    res = fit(tiny("train.epochs=4"), out, resume=True, reporter=messages)
    notice = next(line for line in messages.lines if "instead" in line)
    assert str(victim) in notice and res["notes"] == [notice]
    expected = "ckpt-e0003.json (after epoch 3)" if damage == "pointer-garbage" else "ckpt-e0002.json (after epoch 2)"
    assert expected in notice
    same_weights(ref, out)  # one epoch done twice, deterministically: nothing lost
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_no_intact_checkpoint_is_one_line_naming_the_files_and_changes_nothing(tmp_path: Path) -> None:
    out = _stopped(tmp_path)
    ck = out / "checkpoints"
    for e in (2, 3):
        (ck / f"ckpt-e000{e}.model.safetensors").write_bytes(b"\0" * 10)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    res = invoke("train", "--out", str(out), "--resume", "--quiet")
    assert res.exit_code == 2
    line = error_line(res.output)
    assert "cannot resume" in line and "ckpt-e0003.model.safetensors" in line and "ckpt-e0002.model.safetensors" in line
    assert "no intact checkpoint is left" in line
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before


@pytest.mark.parametrize("edit, needle", [
    (lambda r: {**r, "model": "../../model.safetensors"}, "bad model file name"),
    (lambda r: {**r, "epoch": "three"}, "bad epoch"),
    (lambda r: [r], "not a JSON object"),
    (lambda r: {**r, "task": {"temperature": -1}}, "invalid temperature"),
])
def test_a_checkpoint_record_is_checked_before_use(tmp_path: Path, edit: Any, needle: str) -> None:
    out = tmp_path / "r"
    cfg = tiny("train.epochs=3", "method=hne", "model.name=hne", "model.args={config: tiny, B: 1}")
    fit(cfg, out, stop_after_epochs=1)
    ck = out / "checkpoints"
    record = json.loads((ck / "checkpoint.json").read_text())
    for name in ("checkpoint.json", "ckpt-e0001.json"):
        (ck / name).write_text(json.dumps(edit(record)))
    with pytest.raises(CheckpointError, match=needle):
        fit(cfg, out, resume=True)


def test_a_checkpoint_of_an_older_kdedge_still_resumes(tmp_path: Path) -> None:
    """Before checkpoint records and checksums: a pointer only."""
    ref = tmp_path / "ref"
    fit(tiny("train.epochs=3"), ref)
    out = tmp_path / "r"
    fit(tiny("train.epochs=3"), out, stop_after_epochs=2)
    ck = out / "checkpoints"
    pointer = json.loads((ck / "checkpoint.json").read_text())
    for key in ("sha256", "bytes"):
        del pointer[key]
    (ck / "checkpoint.json").write_text(json.dumps(pointer))
    for p in ck.glob("ckpt-e*.json"):
        p.unlink()
    (ck / "ckpt-e0001.model.safetensors").unlink()
    (ck / "ckpt-e0001.optim.safetensors").unlink()
    fit(tiny("train.epochs=3"), out, resume=True)
    same_weights(ref, out)


def test_a_full_disk_names_the_file_and_what_is_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import kdedge.train.engine as engine

    real = engine.save_checkpoint

    def disk_full_at_epoch_2(run_dir: Any, epoch: int, *args: Any) -> Any:
        if epoch == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "checkpoints" / ".ckpt.x.tmp"))
        return real(run_dir, epoch, *args)

    out = tmp_path / "r"
    monkeypatch.setattr(engine, "save_checkpoint", disk_full_at_epoch_2)
    with pytest.raises(RunDirError, match=rf"^cannot write {re.escape(str(out / 'checkpoints'))}: No space left on "
                                          r"device; the last checkpoint written is intact \(--resume continues"):
        fit(tiny("train.epochs=3"), out)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    assert fit(tiny("train.epochs=3"), out, resume=True)["status"] == "finished"


# --- 2. numeric config fields --------------------------------------------------------------------


def _config_classes() -> list[tuple[type, str]]:
    classes: list[tuple[type, str]] = [(OptimConfig, "optim"), (TrainConfig, "train"), (DataConfig, "data")]
    for method in METHODS:
        cls = get_task_class(method).Config
        if dataclasses.fields(cls):
            classes.append((cls, "loss"))
    return classes


def _numeric_fields(cls: type) -> list[dataclasses.Field]:
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        text = str(hints[f.name])
        if re.search(r"\b(int|float)\b", text) and "str" not in text and hints[f.name] is not bool:
            out.append(f)
    return out


def test_every_numeric_config_field_declares_its_range() -> None:
    """A new numeric option without a declared range is how NaN learning rates got in."""
    missing = [f"{cls.__name__}.{f.name}" for cls, _ in _config_classes() for f in _numeric_fields(cls)
               if RANGE not in f.metadata]
    seed = next(f for f in dataclasses.fields(RunConfig) if f.name == "seed")
    missing += [] if RANGE in seed.metadata else ["RunConfig.seed"]
    assert missing == []


@pytest.mark.parametrize("cls, section", _config_classes(), ids=lambda v: getattr(v, "__name__", v))
def test_every_numeric_field_refuses_nan_inf_and_out_of_range_values_by_name(cls: type, section: str) -> None:
    import typing

    for f in _numeric_fields(cls):
        rng = f.metadata[RANGE]
        integer = "float" not in str(typing.get_type_hints(cls)[f.name])
        bad: list[Any] = [-10**30] if integer else [math.nan, math.inf, -math.inf]
        if rng.le is not None or rng.lt is not None:
            bad.append(10**30 if integer else 1e300)
        for value in bad:
            with pytest.raises((ConfigError, DataError), match=rf"^{section}\.{f.name}(\[0\])? must be .*, got ") as e:
                build_dataclass(cls, {f.name: [value] if str(f.type).startswith("list") else value}, section)
            assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=.nan", "optim.lr must be a number in (0, 1e+30], got nan"),
    ("optim.lr=-.inf", "optim.lr must be a number in (0, 1e+30], got -inf"),
    ("optim.lr=1e300", "optim.lr must be a number in (0, 1e+30], got 1e+300"),
    ("optim.lr=0", "optim.lr must be a number in (0, 1e+30], got 0.0"),
    ("optim.weight_decay=.inf", "optim.weight_decay must be a number in [0, 1], got inf"),
    ("optim.weight_decay=1e300", "optim.weight_decay must be a number in [0, 1], got 1e+300"),
    ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number > 0 (or null), got nan"),
    ("optim.momentum=1.5", "optim.momentum must be a number in [0, 1), got 1.5"),
    ("optim.gamma=.nan", "optim.gamma must be a number in (0, 1], got nan"),
    ("optim.milestones=[1, .inf]", "optim.milestones[1] must be a finite number >= 0, got inf"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be an integer >= 0, got -1"),
    ("train.threads=-1", "train.threads must be an integer in [1, 1024] (or null), got -1"),
    ("train.threads=100000", "train.threads must be an integer in [1, 1024] (or null), got 100000"),
    ("train.epochs=0", "train.epochs must be an integer in [1, 1000000], got 0"),
    ("train.eval_every=0", "train.eval_every must be an integer >= 1, got 0"),
    ("train.checkpoint_every=-3", "train.checkpoint_every must be an integer >= 1, got -3"),
    ("train.device=cuda:x", "train.device must be auto, cpu, cuda or cuda:N; got 'cuda:x'"),
    ("seed=99999999999999999999999", "seed must be an integer in [0, 4294967295], got 99999999999999999999999"),
    ("seed=-1", "seed must be an integer in [0, 4294967295], got -1"),
    ("seed=.nan", "seed: expected an integer, got nan"),
    ("data.batch_size=0", "data.batch_size must be an integer in [1, 1048576], got 0"),
    ("data.eval_batch_size=-1", "data.eval_batch_size must be an integer in [1, 1048576], got -1"),
    ("data.batch_size=1e30", "data.batch_size must be an integer in [1, 1048576], got 1000000000000000019884624838656"),
    ("data.val_fraction=.nan", "data.val_fraction must be a fraction in [0, 1), got nan"),
    ("data.num_workers=100000", "data.num_workers must be an integer in [0, 256], got 100000"),
    ("data.image_size=100000", "data.image_size must be an integer in [4, 4096] (or null), got 100000"),
    ("data.synthetic_size=100000", "data.synthetic_size must be an integer in [4, 1024], got 100000"),
    ("model.args.width=.nan", "model.args.width must be a finite number, got nan"),
    ("model.args={1: 2}", "model.args keys must be option names, got 1"),
    ("optim.lr=1" + "0" * 400, "optim.lr must be a finite number, got 1000"),
])
def test_bad_numbers_are_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method, override, message", [
    ("hne", "loss.T=.inf", "loss.T must be a positive temperature"),
    ("hne", "loss.alpha=.nan", "loss.alpha must be a number in [0, 1], got nan"),
    ("hne", "loss.anneal_factor=.inf", "loss.anneal_factor must be > 1 and at most 10"),
    ("multiexit", "loss.tau_factor=.inf", "loss.tau_factor must be > 1 and at most 10"),
    ("multiexit", "loss.mu=.nan", "loss.mu must be a confidence bound in (0, 1), got nan"),
    ("ahbf", "loss.lambda1=.inf", "loss.lambda1 must be a number in [0, 1000], got inf"),
    ("ahbf", "loss.tau=1e300", "loss.tau must be a positive temperature, at most 1000, got 1e+300"),
    ("hne", "loss.T=1e300", "loss.T must be a positive temperature, at most 1000, got 1e+300"),
    ("ahbf", "loss.rampup_epochs=.nan", "loss.rampup_epochs must be a finite number >= 0 (or null), got nan"),
])
def test_bad_loss_numbers_are_refused_naming_the_key(method: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(None, [f"method={method}", override])
    assert str(e.value).startswith("loss.")  # not "loss: loss.T ..."


def test_bad_numbers_from_the_cli_are_one_line_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "r"
    proc = run_cli("train", "--data", "synthetic", "--seed", "99999999999999999999999", "--out", str(out), "--quiet")
    assert proc.returncode == 2
    assert "seed must be an integer in [0, 4294967295]" in error_line(proc.stderr)
    recipe = tmp_path / "nan.yaml"
    recipe.write_text("optim: {lr: .nan}\ntrain: {threads: -1}\n")
    res = invoke("train", "--config", str(recipe), "--out", str(out), "--quiet")
    assert res.exit_code == 2 and "optim.lr must be a number in (0, 1e+30], got nan" in error_line(res.output)
    assert not out.exists()


def test_yaml_1_1_surprises_read_as_meant(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string and ``off`` as false; a recipe author means a
    number and the word (``train.amp: off`` is one of the documented values)."""
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-4", "train.epochs=1e1", "train.amp=off"])
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0005 and cfg.train.epochs == 10
    assert cfg.train.amp == "off"
    assert load_config(recipe(tmp_path, "train: {amp: on}\n")).train.amp == "on"
    with pytest.raises(ConfigError, match="optim.nesterov: expected true or false, got 'yes'"):
        load_config(None, ["optim.nesterov=yes"])
    assert load_config(None, ["optim.nesterov=True"]).optim.nesterov is True


@pytest.mark.parametrize("change, needle", [
    ({"mean": [math.nan]}, "mean"),
    ({"std": [0.0]}, "std"),
    ({"std": [math.inf]}, "std"),
    ({"scale": math.inf}, "scale"),
    ({"scale": 0.0}, "scale"),
    ({"mean": "abc"}, "wrong type"),
    ({"resize": 10**9}, "resize"),
])
def test_preprocessing_numbers_must_be_finite_and_positive(change: dict, needle: str) -> None:
    info = {"name": "x", "num_classes": 2, "in_channels": 1, "input_size": [8, 8], "mean": [0.5], "std": [0.25],
            "scale": 1 / 255, "channel_order": "L", "class_names": ["a", "b"], "resize": None}
    with pytest.raises(DataError, match=needle) as e:
        DatasetInfo.from_dict({**info, **change})
    assert "\n" not in str(e.value)


# --- 3. strict YAML ------------------------------------------------------------------------------


def recipe(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


@pytest.mark.parametrize("text, message", [
    ("optim:\n  lr: 0.1\n  lr: 0.2\n", "at line 3, column 3: duplicate key 'lr' (first at line 2)"),
    ("seed: 1\ntrain: {epochs: 2}\nseed: 2\n", "at line 3, column 1: duplicate key 'seed' (first at line 1)"),
    ("model: {name: hne, args: {B: 2, B: 3}}\n", "duplicate key 'B' (first at line 1)"),
    ("optim: {lr: &x 0.1, momentum: *x}\n", "anchors (&x) are not allowed"),
    ("seed: !!int 3\n", "tags (!!int) are not allowed"),
    ("seed: !!python/object/apply:os.system ['echo pwned']\n",
     "tags (!!python/object/apply:os.system) are not allowed"),
    ("model: {args: {x: " + "[" * 200 + "]" * 200 + "}}\n", "nested deeper than 32 levels"),
])
def test_yaml_that_kdedge_refuses_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        load_config(recipe(tmp_path, text))
    assert str(e.value).startswith(f"config file '{tmp_path / 'recipe.yaml'}' is not valid YAML")


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]  # 9^9 = 387M strings
    text = "model:\n  name: small_cnn\n  args:\n" + "".join(f"    {line}\n" for line in lines)
    with pytest.raises(ConfigError, match=re.escape("at line 4, column 9: anchors (&a0) are not allowed")):
        load_config(recipe(tmp_path, text))
    with pytest.raises(ConfigError, match=r"--set model.args.x: .*anchors \(&a\) are not allowed"):
        load_config(None, ["model.args.x=[&a [1, 1], *a, *a]"])


@pytest.mark.parametrize("kind, needle", [
    ("huge", "is larger than 1024 KiB"),
    ("binary", "holds binary data (a NUL byte at offset 7)"),
    ("latin1", "is not UTF-8 text (byte 7)"),
    ("directory", "is a directory, not a file"),
    ("fifo", "is not a regular file (a pipe, device or socket)"),
    ("device", "is not a regular file (a pipe, device or socket)"),
    ("missing", "does not exist"),
])
def test_a_recipe_that_is_not_a_text_file_is_one_line_and_never_hangs(tmp_path: Path, kind: str, needle: str) -> None:
    path = tmp_path / "recipe.yaml"
    if kind == "huge":
        path.write_text("# padding\n" * 200_000)
    elif kind == "binary":
        path.write_bytes(b"seed: 1\0\x01\x02")
    elif kind == "latin1":
        path.write_bytes("# comme\xe7a\nseed: 1\n".encode("latin-1"))
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        os.mkfifo(path)  # nobody ever writes: opening it for reading the ordinary way would block forever
    elif kind == "device":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        path = Path("/dev/zero")  # endless
    proc = run_cli("train", "--config", str(path), "--out", str(tmp_path / "r"), "--quiet")  # timeout: 120 s
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert needle in line and str(path) in line


def test_what_kdedge_writes_it_reads_back(tmp_path: Path) -> None:
    out = tmp_path / "r"
    cfg = tiny("train.epochs=1", "optim.milestones=[0.5]", "optim.schedule=step")
    fit(cfg, out)
    assert load_config(out / "config.yaml") == cfg
    assert read_yaml(out / "config.yaml")["optim"]["milestones"] == [0.5]


# --- 4. a non-finite loss ------------------------------------------------------------------------


def test_a_nan_loss_at_the_start_is_one_line_and_the_rerun_is_free(tmp_path: Path) -> None:
    out = tmp_path / "r"
    args = ["train", "--data", "synthetic", "--epochs", "2", "--out", str(out), *TINY_CLI, "--quiet"]
    proc = run_cli(*args, "--set", "optim.lr=1e30")
    assert proc.returncode == 1
    line = error_line(proc.stderr)
    assert re.search(r"the loss became (nan|inf) in epoch 1, step \d+ of \d+; lower optim.lr", line), line
    assert "nothing was checkpointed: --out can be reused" in line
    assert proc.stderr.strip() == line  # no UserWarning or anything else around it
    assert names(out) <= {"config.yaml", LOCK}
    res = invoke(*args)  # a sensible learning rate, same --out, no clean-up
    assert res.exit_code == 0, res.output


def test_a_nan_loss_after_a_checkpoint_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.train.tasks.baseline import BaselineTask

    real = BaselineTask.training_step

    def breaks_in_epoch_2(self: Any, model: Any, x: Any, y: Any, epoch: float) -> dict:
        out = real(self, model, x, y, epoch)
        return {**out, "loss": out["loss"] * math.nan} if epoch >= 1 else out

    out = tmp_path / "r"
    monkeypatch.setattr(BaselineTask, "training_step", breaks_in_epoch_2)
    with pytest.raises(FloatingPointError,
                       match=r"in epoch 2, step 1 of \d+; .*train into a new --out .*keeps its last checkpoint"):
        fit(tiny("train.epochs=3"), out)
    monkeypatch.setattr(BaselineTask, "training_step", real)
    assert inspect_run_dir(out).kind == "unfinished"
    assert fit(tiny("train.epochs=3"), out, resume=True)["status"] == "finished"


# --- 5. the culprit named ------------------------------------------------------------------------


def test_a_file_where_a_run_directory_is_expected_is_called_a_file(tmp_path: Path) -> None:
    f = tmp_path / "somefile"
    f.write_text("x")
    for args in (["eval", str(f)], ["export", str(f), "--out", str(tmp_path / "b")]):
        res = invoke(*args)
        assert res.exit_code == 2
        assert f"{f} is a file, not a run directory" in error_line(res.output)
    res = invoke("train", "--data", "synthetic", "--out", str(f), "--quiet")
    assert res.exit_code == 2 and f"--out {f} is a file, not a directory for a run" in error_line(res.output)
    res = invoke("train", "--data", "synthetic", "--out", str(f / "run"), "--quiet")
    assert res.exit_code == 2 and f"{f} is a file, not a directory" in error_line(res.output)
    assert f.read_text() == "x" and not (tmp_path / "b").exists()


def test_eval_and_export_say_what_a_run_directory_lacks(tmp_path: Path) -> None:
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "config.yaml").write_text("seed: 0\n")
    res = invoke("eval", str(failed))
    assert res.exit_code == 2 and "stopped before its first checkpoint" in error_line(res.output)
    empty = tmp_path / "empty"
    empty.mkdir()
    res = invoke("export", str(empty), "--out", str(tmp_path / "b"))
    assert res.exit_code == 2 and "not a kdedge run directory (no config.yaml)" in error_line(res.output)


@pytest.mark.parametrize("damage, needle", [
    (lambda run: (run / "run.json").write_text("{"), "run.json is not valid JSON"),
    (lambda run: (run / "run.json").write_text((run / "run.json").read_text().replace('"mean": [', '"mean": [NaN, ')),
     "run.json is not strict JSON"),
    (lambda run: (run / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes()[:50]),
     "model.safetensors is damaged"),
    (lambda run: (run / "config.yaml").write_text("seed: 1\nseed: 2\n"), "config.yaml' is not valid YAML at line 2"),
])
def test_a_damaged_finished_run_names_the_damaged_file(tmp_path: Path, damage: Any, needle: str) -> None:
    run = tmp_path / "r"
    fit(tiny("train.epochs=1"), run)
    damage(run)
    with pytest.raises((RunError, ConfigError), match=re.escape(needle)):
        load_trained(run)
    res = invoke("eval", str(run))
    assert res.exit_code == 2 and needle in error_line(res.output)


# --- 6. help texts -------------------------------------------------------------------------------


def test_help_texts_name_only_commands_and_options_that_exist() -> None:
    import typer

    cli = typer.main.get_command(app)
    options = {name: {o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
               | {"--help"} for name, cmd in cli.commands.items()}
    mention = re.compile(r"kdedge ([a-z]+)((?:(?!kdedge\s)[^\n;)`#|])*)")
    wrong = []
    for name, cmd in cli.commands.items():
        for where, text in [("help", cmd.help or ""), *((p.name, getattr(p, "help", "") or "") for p in cmd.params)]:
            for m in mention.finditer(text):
                if m.group(1) not in options:
                    if m.group(1) not in ("run", "bundle"):  # "a kdedge run directory", "the kdedge bundle"
                        wrong.append(f"{name} {where}: kdedge {m.group(1)}")
                    continue
                for opt in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", m.group(2)):
                    if opt not in options[m.group(1)]:
                        wrong.append(f"{name} {where}: kdedge {m.group(1)} {opt}")
    assert wrong == []


def test_train_help_names_real_models() -> None:
    from kdedge.models import MODELS

    res = invoke("train", "--help")
    assert res.exit_code == 0 and "doctor --models" not in res.output
    import kdedge.cli.train as train_cli
    import inspect

    help_text = inspect.signature(train_cli.command).parameters["model"].default.help
    named = re.findall(r"[a-z][a-z0-9_]+", help_text.split("e.g.")[1].split("(")[0])
    assert named and all(n in MODELS for n in named), named


@pytest.mark.parametrize("model", ["5", "[hne]", "hne"])
def test_a_recipe_whose_model_is_not_a_mapping_is_refused_in_one_line(model: str, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: hne\ndata: {{name: synthetic}}\nmodel: {model}\n")
    res = invoke("train", "-c", str(recipe), "--out", str(tmp_path / "run"))
    assert res.exit_code == 2, res.output
    assert "model: expected a mapping" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
