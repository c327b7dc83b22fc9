from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdedge.cli.main import COMMANDS, app

runner = CliRunner()
TINY = ["--set", "data.batch_size=32", "--set", "model.args.width=4", "--set", "train.device=cpu"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_command() -> None:
    res = invoke("--help")
    assert res.exit_code == 0
    for name in ("train", "eval", "export", "run", "profile", "inspect", "build", "doctor", "serve"):
        assert name in res.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_has_help_with_an_example(name: str) -> None:
    res = invoke(name, "--help")
    assert res.exit_code == 0, res.output
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    if "Not available yet" not in module.HELP:
        assert "Example" in module.HELP and f"kdedge {name}" in module.HELP


def test_reflow_joins_prose_and_keeps_what_is_laid_out_by_hand() -> None:
    from kdedge.cli.main import reflow

    text = "First line\nof the first.\n\nA second\nparagraph.\n\nExamples:\n\n  kdedge run a\n  kdedge run b\n\n" \
           "name    kind\nonnx    graph"
    assert reflow(text).split("\n\n") == ["First line of the first.", "A second paragraph.", "Examples:",
                                          "  kdedge run a\n  kdedge run b", "name    kind\nonnx    graph"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_prose_wraps_at_the_terminal_width_not_at_the_source_lines(name: str) -> None:
    """At 80 columns no line of a prose paragraph ends short of the width except its last (the
    renderer used to keep the source's line breaks and wrap again: 'device, setting,')."""
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0, res.output
    text = res.output.split("╭")[0]  # the description, before the option panels
    body = [ln.rstrip() for ln in text.splitlines()][3:]  # after the usage line
    paragraphs: list[list[str]] = [[]]
    for ln in body:
        if ln.strip():
            paragraphs[-1].append(ln)
        elif paragraphs[-1]:
            paragraphs.append([])
    assert len([p for p in paragraphs if p]) >= 2, res.output
    for par in paragraphs:
        laid_out = any(ln.startswith("  ") or "   " in ln.strip() for ln in par)
        if laid_out:
            continue
        # a line broken early: the next line's first word would have fitted on it
        short = [ln for ln, nxt in zip(par, par[1:]) if len(ln) + 1 + len(nxt.split()[0]) < 79]
        assert not short, f"{name}: {short} in\n" + "\n".join(par)


def test_one_epoch_training_run_and_eval(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = invoke("train", "--data", "synthetic", "--epochs", "1", "--out", str(out), "--json", *TINY)
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["status"] == "finished"
    res = invoke("eval", str(out), "--json", "--split", "val")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["split"] == "val"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kdedge.cli.main", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--data", "nosuchdata", "--epochs", "1"], "unknown dataset"),
        (["train", "--method", "hnee", "--epochs", "1"], "did you mean 'hne'"),
        (["train", "--epochs", "-2"], "--epochs must be at least 1"),
        (["train", "--set", "optim.lrr=1"], "did you mean 'lr'"),
        (["train", "--model", "resnet33"], "did you mean"),
        (["train", "--data", "cifar10", "--data-root", "/nonexistent/cifar"], "/nonexistent/cifar"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run_cli(*args, "--out", str(tmp_path / "r"), "--quiet")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.strip().splitlines() if line.strip()]) <= 3


def test_malformed_yaml_and_unwritable_out(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 2\n")
    proc = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
    locked = tmp_path / "locked"
    locked.write_text("a file, not a directory")
    proc = run_cli("train", "--data", "synthetic", "--out", str(locked), *TINY)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    assert locked.read_text() == "a file, not a directory"


def test_doctor_json() -> None:
    res = invoke("doctor", "--json")
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    assert facts["python"] and "providers" in facts["onnxruntime"]
    assert "CPUExecutionProvider" in facts["onnxruntime"]["providers"]
    assert "onnx" in facts["targets"]
    serve = facts["serve"]
    assert set(serve["libraries"]) == {"starlette", "uvicorn", "prometheus_client", "orjson"}
    import importlib.util

    have = all(importlib.util.find_spec(m) for m in serve["libraries"])
    assert serve["ready"] is have and (serve["png_decoder"] in ("opencv", "pillow") if have else
                                       serve["png_decoder"] is None)


def test_doctor_says_serve_cannot_run_when_an_installed_library_fails_to_import(tmp_path: Path) -> None:
    pytest.importorskip("starlette", reason="the serve extra is not installed")
    (tmp_path / "starlette").mkdir()
    (tmp_path / "starlette" / "__init__.py").write_text("raise ImportError('a broken install')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kdedge.cli.main", "doctor", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    serve = json.loads(proc.stdout)["serve"]
    assert serve["ready"] is False and "cannot be imported (ImportError: a broken install)" in serve["libraries"]["starlette"]
    proc = subprocess.run([sys.executable, "-m", "kdedge.cli.main", "serve", "/nonexistent.kdedge"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "needs its serving packages (a broken install)" in proc.stderr, proc.stderr


def test_eval_missing_path() -> None:
    res = invoke("eval", "/nonexistent/run")
    assert res.exit_code == 2


def test_export_inspect_and_eval_bundle_agree_with_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = invoke("train", "--data", "synthetic", "--epochs", "1", "--out", str(run), "--json", *TINY)
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "b.kdedge"
    res = invoke("export", str(run), "--out", str(bundle), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["verification"]["passed"] is True
    res = invoke("export", str(run), "--out", str(bundle))
    assert res.exit_code == 2 and "--force" in res.output  # never overwritten silently
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert all(isinstance(e["files"]["onnx"]["padded_convs"], int) for e in manifest["stages"])
    res = invoke("export", str(run), "--out", str(tmp_path / "c.kdedge"), "--pad-channels", "12")
    assert res.exit_code == 2 and "pad_channels must be one of 0, 8, 16, 32" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "c.kdedge").exists()
    res = invoke("inspect", str(bundle), "--json")
    assert res.exit_code == 0, res.output
    res = invoke("eval", str(bundle), "--json")
    assert res.exit_code == 0, res.output
    from_bundle = json.loads(res.stdout)["accuracy"]
    from_run = json.loads(invoke("eval", str(run), "--json").stdout)["accuracy"]
    assert from_bundle == pytest.approx(from_run, abs=1e-9)


def _folder_tree(root: Path, names: tuple[str, ...]) -> None:
    from PIL import Image

    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for i, name in enumerate(names):
            d = root / split / name
            d.mkdir(parents=True)
            for j in range(n):
                Image.fromarray((rng.random((16, 16)) * 80 + 120 * i).astype(np.uint8), "L").save(d / f"{j}.png")


def test_class_names_in_another_order_are_named() -> None:
    from kdedge.bundle.inputs import class_mismatch

    assert class_mismatch(["a", "b", "c"], ("a", "b", "c")) is None
    assert "label 1 is 'c' in the data, 'b' in the model" in class_mismatch(["a", "c", "b"], ["a", "b", "c"])
    assert "the data has 'd'" in class_mismatch(["a", "d"], ["a", "b"])


def test_eval_refuses_data_whose_classes_are_not_the_models_and_a_plot_path_it_would_clobber(tmp_path: Path) -> None:
    _folder_tree(tmp_path / "ok", ("cat", "dog"))
    run = tmp_path / "run"
    res = invoke("train", "--data", "imagefolder", "--data-root", str(tmp_path / "ok"), "--set", "data.image_size=16",
                 "--epochs", "1", "--out", str(run), *TINY)
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "b.kdedge"
    assert invoke("export", str(run), "--out", str(bundle)).exit_code == 0
    _folder_tree(tmp_path / "renamed", ("acat", "zdog"))
    _folder_tree(tmp_path / "other", ("cat", "wolf"))
    for data, why in (("renamed", "the data has 'acat', 'zdog', which the model does not"),
                      ("other", "the data has 'wolf', which the model does not")):
        for target in (run, bundle):
            res = invoke("eval", str(target), "--data-root", str(tmp_path / data))
            assert res.exit_code == 2 and why in res.output and "wrong labels" in res.output, (data, target, res.output)
    assert invoke("eval", str(run), "--data-root", str(tmp_path / "ok")).exit_code == 0
    # --plot never replaces what is not a plot, and is checked before the evaluation
    weights = run / "model.safetensors"
    before = weights.read_bytes()
    for plot, words in ((weights, "exists and is not a PNG plot"), (tmp_path, "is a directory"),
                        (tmp_path / "no" / "p.png", "does not exist")):
        res = invoke("eval", str(run), "--plot", str(plot))
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
    assert weights.read_bytes() == before
    png = tmp_path / "p.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n an earlier plot")
    assert invoke("eval", str(run), "--plot", str(png)).exit_code == 0  # may be replaced (a baseline draws none)


def test_an_interrupt_says_how_to_go_on_for_the_command_that_was_stopped(capsys) -> None:
    import typer

    from kdedge.cli.common import handle_errors

    def stopped() -> None:
        raise KeyboardInterrupt

    for module, words in (("kdedge.cli.train", "training resumes with --resume"),
                          ("kdedge.cli.export", "nothing half-written is left; rerun the command")):
        stopped.__module__ = module
        with pytest.raises((SystemExit, typer.Exit)) as e:
            handle_errors(stopped)()
        assert getattr(e.value, "code", getattr(e.value, "exit_code", None)) == 130
        err = capsys.readouterr().err
        assert words in err and "\n" == err[-1] and err.count("\n") == 1, err


def test_inspect_json_answers_for_what_is_not_a_bundle_too(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (tmp_path / "half.kdedge").mkdir()
    (tmp_path / "nan.kdedge").mkdir()
    (tmp_path / "nan.kdedge" / "manifest.json").write_text('{"format": NaN}')
    for path, words in ((run, "is a training run directory, not a bundle; make one with `kdedge export"),
                        (tmp_path / "half.kdedge", "manifest.json is missing"),
                        (tmp_path / "nan.kdedge", "NaN"), (tmp_path / "none", "does not exist")):
        res = invoke("inspect", str(path), "--json")
        assert res.exit_code == 2, res.output
        d = json.loads(res.stdout)
        assert d["status"] == "unreadable" and words in d["problems"][0] and d["bundle"] == str(path), d
        assert words in res.stderr
