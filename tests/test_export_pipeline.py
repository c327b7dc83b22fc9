"""The export pipeline end to end: atomic writes, --force, bad requests, evaluate and inspect,
and export from a run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_anytime import ToyOnline, digits, toy_bundle, trained_toy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdedge.bundle.errors import BundleError
from kdedge.export import ExportError, evaluate_bundle, export, export_run, format_inspect, inspect_bundle
from kdedge.targets import open_bundle


def _small_export(out: Path, **kw: object) -> Path:
    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    return export(ToyOnline().eval(), out, info=info, val_data=(xv[:32], yv[:32]), **kw)  # type: ignore[arg-type]


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_existing_bundle_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "b.kdedge"
    shutil.copytree(toy_bundle(), out)
    with pytest.raises(ExportError, match="b.kdedge exists; pass --force"):
        _small_export(out)
    assert open_bundle(out).family == "toy"
    _small_export(out, force=True)
    assert open_bundle(out).family == "toy-online"
    assert _siblings(out) == ["b.kdedge"]  # no partial or old directory left


def test_force_never_replaces_something_that_is_not_a_bundle(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ExportError, match="is not a kdedge bundle; refusing to replace it"):
        _small_export(out, force=True)
    assert (out / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["kdedge.export.pipeline.verify", "kdedge.bundle.writer._fsync_tree"])
def test_interrupted_export_keeps_the_old_bundle_and_leaves_no_half_bundle(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    out = tmp_path / "b.kdedge"
    shutil.copytree(toy_bundle(), out)
    before = (out / "manifest.json").read_text()

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _small_export(out, force=True)
    assert (out / "manifest.json").read_text() == before
    open_bundle(out)  # still whole, checksums included
    assert _siblings(out) == ["b.kdedge"]
    with pytest.raises(KeyboardInterrupt):
        _small_export(tmp_path / "new.kdedge")
    assert not (tmp_path / "new.kdedge").exists() and _siblings(out) == ["b.kdedge"]


def test_leftovers_of_a_killed_export_are_recovered(tmp_path: Path) -> None:
    """A process killed while replacing a bundle (old one moved aside) or while building one:
    the next export puts the old bundle back and deletes the partial directory."""
    dead = 999999999  # above any pid_max: no such process
    shutil.copytree(toy_bundle(), tmp_path / f".b.kdedge.old-{dead}-x1")
    (tmp_path / f".b.kdedge.partial-{dead}-x2" / "onnx").mkdir(parents=True)
    live = tmp_path / f".b.kdedge.partial-{__import__('os').getpid()}-x3"  # a running export: left alone
    live.mkdir()
    with pytest.raises(ExportError, match="exists; pass --force"):
        _small_export(tmp_path / "b.kdedge")
    assert open_bundle(tmp_path / "b.kdedge").family == "toy"
    assert _siblings(tmp_path / "b.kdedge") == [live.name, "b.kdedge"]


def test_bad_requests_fail_with_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, xv, yv, info = digits()
    model = trained_toy(False)
    out = tmp_path / "b"
    cases = [
        (dict(target="tflite"), "unknown export target 'tflite'"),
        (dict(precision="fp8"), "unknown precision 'fp8'; known: fp32, fp16, int8"),
        (dict(precision="fp16"), "target 'onnx' does not compile precision 'fp16'; it compiles: fp32, int8"),
        (dict(opset=7), "opset must be an integer between 13 and"),
        (dict(exporter="magic"), "unknown exporter 'magic'"),
        (dict(info={**info, "num_classes": 5, "class_names": list("abcde")}),
         r"stage0 logits have shape \(2, 10\), expected \[N, 5\]"),
        (dict(info={**info, "input_size": [9, 9]}), r"validation images are \(1, 8, 8\), the dataset info says"),
        (dict(info={"num_classes": 10}), "dataset info lacks"),
        (dict(val_data=(xv[:0], yv[:0])), "validation data: the data source holds no images"),
    ]
    for kw, message in cases:
        args = dict(info=info, val_data=(xv[:16], yv[:16]))
        args.update(kw)
        with pytest.raises(ExportError, match=message) as err:
            export(model, out, **args)  # type: ignore[arg-type]
        assert "\n" not in str(err.value), str(err.value)
    import kdedge.targets as targets
    from kdedge.targets.base import Capabilities, Target

    class Missing(Target):
        name, description, extra = "missinglib", "needs a missing library", "nosuch"
        caps = Capabilities(precisions=("fp32",), dynamic_batch=True, can_abort=False, devices=("cpu",),
                            source="module")
        compile_requires = ("kdedge_no_such_runtime",)

    monkeypatch.setitem(targets.TARGETS, "missinglib", "unused:Missing")
    monkeypatch.setitem(targets._CACHE, "missinglib", Missing())
    with pytest.raises(ExportError, match=r"target 'missinglib' needs kdedge_no_such_runtime to compile, which is "
                                          r"not available here; install it with: pip install 'kdedge\[nosuch\]'"):
        export(model, out, info=info, val_data=(xv[:16], yv[:16]), target="missinglib")
    assert "missinglib" in targets.format_table()
    from kdedge.export import pipeline

    monkeypatch.setattr(pipeline, "EXPORT_REQUIRES", (*pipeline.EXPORT_REQUIRES, "kdedge_no_such_exporter"))
    with pytest.raises(ExportError, match=r"export needs kdedge_no_such_exporter, which is not installed; "
                                          r"install it with: pip install 'kdedge\[train\]'"):
        export(model, out, info=info, val_data=(xv[:16], yv[:16]))
    assert not out.exists()


def test_evaluate_bundle_agrees_with_torch_evaluation() -> None:
    from kdedge.train.evaluate import evaluate_model

    _, _, xv, yv, _ = digits()
    loader = DataLoader(TensorDataset(torch.from_numpy(xv), torch.from_numpy(yv)), batch_size=50)
    ref = evaluate_model(trained_toy(), loader, torch.device("cpu"))
    got = evaluate_bundle(toy_bundle(), xv, yv)
    assert got["n"] == ref["n"] == len(yv) and got["combine"] == ref["combine"] == "mean_logits"
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1.01 / len(yv))
    for g, r in zip(got["stages"], ref["stages"]):
        assert g["stage"] == r["stage"] and g["members"] == r["members"]
        for rule in ("mean_logits", "mean_probs", "last"):
            assert g[f"accuracy_{rule}"] == pytest.approx(r[f"accuracy_{rule}"], abs=1.01 / len(yv))
    # the manifest's accuracies were measured the same way on the same images
    b = open_bundle(toy_bundle())
    for g, s in zip(got["stages"], b.stages):
        assert g["accuracy_mean_logits"] == s.accuracy["mean_logits"]
    assert [p["accuracy"] for p in got["prefixes"]] == [p.accuracy["mean_logits"] for p in b.prefixes]
    assert [s["macs"] for s in got["stages"]] == list(np.cumsum([s.macs for s in b.stages]))
    # a DataLoader works too, and one rule can be asked for
    one = evaluate_bundle(toy_bundle(), loader, rule="last", prefixes=False)
    assert set(one["stages"][0]) == {"stage", "members", "macs", "accuracy_last"} and one["combine"] == "last"
    assert one["accuracy"] == got["stages"][-1]["accuracy_last"]
    with pytest.raises(BundleError, match="does not support combine rule 'vote'"):
        evaluate_bundle(toy_bundle(), xv, yv, rule="vote")
    with pytest.raises(BundleError, match=r"images are \(1, 4, 4\)"):
        evaluate_bundle(toy_bundle(), xv[:, :, :4, :4], yv)


def test_inspect_reports_sizes_checksums_and_verification(tmp_path: Path) -> None:
    info = inspect_bundle(toy_bundle())
    assert info["intact"] and info["family"] == "toy" and info["verification"]["passed"]
    assert [s["name"] for s in info["stages"]] == ["stage0", "stage1", "stage2"]
    assert info["stages"][1]["inputs"] == ["stage0:f0"] and info["stages"][1]["members_total"] == 3
    assert info["total_bytes"] == sum((toy_bundle() / f["path"]).stat().st_size for f in info["files"])
    assert info["verify_report"]["passed"] and "config" not in info["provenance"]
    json.dumps(info)  # --json must work
    text = format_inspect(info)
    assert "intact" in text and "onnx/stage2.onnx" in text and "prefix1" in text
    copy = tmp_path / "c.kdedge"
    shutil.copytree(toy_bundle(), copy)
    with open(copy / "onnx" / "stage1.onnx", "ab") as f:
        f.write(b"\0")
    damaged = inspect_bundle(copy)
    assert not damaged["intact"]
    assert [f["graph"] for f in damaged["files"] if not f["sha256_ok"]] == ["stage1"]
    assert "DAMAGED" in format_inspect(damaged)


def test_plain_classifier_exports_as_one_stage(tmp_path: Path) -> None:
    _, _, xv, yv, info = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).train()
    b = open_bundle(export(net, tmp_path / "plain", info=info, val_data=(xv[:32], yv[:32])))
    assert all(m.training for m in net.modules()), "export must give the model back in training mode"
    assert b.family == "sequential" and b.combine_supported == ("last",) and len(b.stages) == 1
    assert [i.binding for i in b.stages[0].inputs] == ["input"] and b.stages[0].logits_tensor == "stage0__logits"


def test_unfinished_run_directory_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: baseline\n")
    with pytest.raises(ExportError, match="holds no finished training run"):
        export_run(run, tmp_path / "b")
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nothing", tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_run_from_a_trained_run(tmp_path: Path) -> None:
    from kdedge.config import load_config
    from kdedge.export import evaluate_bundle_on_data
    from kdedge.train.engine import fit

    cfg = load_config(None, ["method=hne", "data.name=synthetic", "data.batch_size=32", "model.name=hne",
                             "model.args.config=tiny", "model.args.B=1", "train.epochs=1", "train.device=cpu"])
    fit(cfg, tmp_path / "run")
    path = export_run(tmp_path / "run", tmp_path / "hne.kdedge", precision="int8", calib_size=32)
    b = open_bundle(path)
    m = b.manifest
    assert b.family == "hne" and len(b.stages) == 2 and len(b.prefixes) == 2
    assert m["provenance"]["run_dir"] == str((tmp_path / "run").absolute())
    assert m["provenance"]["config"]["method"] == "hne" and m["evaluation"]["split"] == "val"
    assert m["quantization"]["n_calibration"] == 32
    res = evaluate_bundle_on_data(path, split="val")
    assert res["n"] == m["evaluation"]["n"] and res["data"] == "synthetic"
    assert [s["accuracy_mean_logits"] for s in res["stages"]] == [s.accuracy["mean_logits"] for s in b.stages]


def test_calibration_images_are_spread_over_a_sorted_pool() -> None:
    from kdedge.export.data import Batches, Spread

    class Pool:  # a map-style dataset sorted by class, as image folders are
        labels = np.repeat(np.arange(10), 30)

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return np.full((1, 2, 2), i, np.float32), int(self.labels[i])

    pool = Pool()
    first = np.concatenate([y for _, y in Batches(pool, 8, limit=20)])
    assert len(set(first.tolist())) == 1  # the first 20 images: one class
    spread = Spread(pool, 20)
    got = np.concatenate([y for _, y in Batches(spread, 8)])
    assert len(got) == 20 and sorted(set(got.tolist())) == list(range(10))
    assert len(set(spread.indices.tolist())) == 20
    np.testing.assert_array_equal(spread.indices, Spread(pool, 20).indices)
    assert len(Spread(pool, 1000)) == 300
