from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdedge.train.config import load_config
from kdedge.train.engine import RunDirError, fit, lr_at
from kdedge.train.run import RunError, load_trained

TINY = ["data.name=synthetic", "data.batch_size=32", "model.name=small_cnn", "model.args.width=4",
        "train.epochs=3", "optim.lr=0.05", "train.device=cpu"]


def tiny(*extra: str):
    return load_config(None, [*TINY, *extra])


def test_fit_writes_a_finished_run(tmp_path: Path) -> None:
    res = fit(tiny(), tmp_path / "run")
    run = tmp_path / "run"
    assert res["status"] == "finished"
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "run.json", "checkpoints"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert all("loss" in r["train"] and "accuracy" in r["val"] for r in records)
    # the synthetic task is learnable: the model beats chance (4 classes) clearly
    assert res["test"]["accuracy"] > 0.5
    loaded = load_trained(run)
    assert loaded.info.num_classes == 4
    x = torch.randn(2, 1, 8, 8)
    assert loaded.model(x).shape == (2, 4)


def test_resume_is_exact(tmp_path: Path) -> None:
    fit(tiny(), tmp_path / "full")
    stopped = fit(tiny(), tmp_path / "part", stop_after_epochs=1)
    assert stopped["status"] == "stopped"
    with pytest.raises(RunError, match="no finished training run"):
        load_trained(tmp_path / "part")
    fit(tiny(), tmp_path / "part", resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics of the resumed run hold each epoch once
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_run_dir_guards(tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(tiny("train.epochs=1"), run)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="different run"):
        fit(tiny("train.epochs=2"), run)
    with pytest.raises(RunDirError, match="finished run"):
        fit(tiny("train.epochs=1"), run)
    assert (run / "model.safetensors").read_bytes() == before  # nothing lost
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(RunDirError, match="not empty"):
        fit(tiny(), other)
    assert (other / "precious.txt").read_text() == "keep"
    with pytest.raises(RunDirError, match="no run to resume"):
        fit(tiny(), tmp_path / "fresh", resume=True)


def test_a_run_saved_before_an_option_existed_still_resumes(tmp_path: Path) -> None:
    import yaml

    run = tmp_path / "old"
    fit(tiny(), run, stop_after_epochs=1)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]["labelled_per_batch"]  # as written by a kdedge without the option
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert fit(tiny(), run, resume=True)["status"] == "finished"


def test_unfinished_run_needs_resume(tmp_path: Path) -> None:
    fit(tiny(), tmp_path / "r", stop_after_epochs=1)
    with pytest.raises(RunDirError, match="--resume"):
        fit(tiny(), tmp_path / "r")


def test_lr_schedules() -> None:
    cos = load_config(None, ["optim.lr=0.1", "train.epochs=10"]).optim
    assert lr_at(cos, 10, 0) == pytest.approx(0.1)
    assert lr_at(cos, 10, 5) == pytest.approx(0.05)
    assert lr_at(cos, 10, 10) == pytest.approx(0.0, abs=1e-12)
    step = load_config(None, ["optim.schedule=step", "optim.milestones=[3, 6]", "optim.gamma=0.1", "train.epochs=10"]).optim
    assert [round(lr_at(step, 10, t), 6) for t in (0, 2.9, 3, 6.5)] == [0.1, 0.1, 0.01, 0.001]
    warm = load_config(None, ["optim.warmup_epochs=2", "train.epochs=10"]).optim
    assert lr_at(warm, 10, 1.0) == pytest.approx(0.05)


SEMI = ["data.name=digits", "data.per_class=10", "data.unlabelled=true", "data.batch_size=64",
        "data.labelled_per_batch=16", "model.name=small_cnn", "model.args.width=4", "train.epochs=2",
        "optim.lr=0.2", "train.device=cpu"]


class StepCounter:
    """A reporter that records the steps announced per epoch."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.steps.append(steps)

    def step(self, losses: dict) -> None: ...
    def epoch_end(self, epoch: int, record: dict) -> None: ...
    def message(self, text: str) -> None: ...


def test_fixed_labelled_batches_train_and_resume_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.train.data import LabelledBatchSampler

    epochs_set: list[int] = []
    original = LabelledBatchSampler.set_epoch

    def recording(self: LabelledBatchSampler, epoch: int) -> None:
        epochs_set.append(epoch)
        original(self, epoch)

    monkeypatch.setattr(LabelledBatchSampler, "set_epoch", recording)
    cfg = load_config(None, SEMI)
    counter = StepCounter()
    res = fit(cfg, tmp_path / "full", reporter=counter)
    assert res["status"] == "finished" and res["test"]["accuracy"] > 0.25  # 10 classes (chance 0.1): it learns from 100 labels
    # an epoch is one pass over the 1,193 unlabelled images, 48 a batch: 24 steps, not (100 + 1,193) // 64 = 20
    assert counter.steps == [24, 24] and epochs_set == [0, 1]
    epochs_set.clear()
    assert fit(cfg, tmp_path / "part", stop_after_epochs=1)["status"] == "stopped"
    fit(cfg, tmp_path / "part", resume=True)
    assert epochs_set == [0, 1]  # the resumed call selected epoch 1, not 0 again
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_final_weights_are_the_same_bytes_whatever_the_hash_seed(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, torch; from kdedge.train.checkpoint import save_weights, read_tensors; "
            "torch.manual_seed(0); m = torch.nn.Linear(3, 2); "
            "save_weights(m, sys.argv[1], {'method': 'hne', 'kdedge': '1', 'config': 'x', 'z': 'y'}); "
            "assert torch.equal(read_tensors(sys.argv[1])['weight'], m.weight.detach())")
    blobs = set()
    for seed in ("1", "2", "3", "4"):
        out = tmp_path / f"w{seed}.safetensors"
        proc = subprocess.run([sys.executable, "-c", code, str(out)], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        blobs.add(out.read_bytes())
    assert len(blobs) == 1
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"method": "hne", "kdedge": "1", "config": "x", "z": "y"}
