"""``kdedge run`` and ``kdedge profile``: each input kind, each policy option, each bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_runtime import toy_bundle
from PIL import Image
from typer.testing import CliRunner

from kdedge.cli.main import app

cli = CliRunner()


def invoke(*args: str):
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """A profiled copy of the toy bundle and inputs of every kind."""
    root = tmp_path_factory.mktemp("cli")
    src, model, data = toy_bundle(tmp_path_factory.mktemp("bundles"))
    bundle = root / "toy.kdedge"
    shutil.copytree(src, bundle)
    res = invoke("profile", bundle, "--threads", "1", "--runs", "5", "--warmup", "1", "--json")
    assert res.exit_code == 0, res.output
    imgs = root / "imgs"
    imgs.mkdir()
    raw = (np.random.default_rng(0).random((3, 8, 8)) * 16).astype(np.uint8)
    for i, a in enumerate(raw):
        Image.fromarray(a, "L").save(imgs / f"d{i}.png")
    np.save(root / "x.npy", data["x"][:5])
    return {"bundle": bundle, "root": root, "imgs": imgs, "profile": json.loads(res.stdout), "model": model}


def run_json(*args: str) -> dict:
    res = invoke("run", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_profile_json_and_table(env) -> None:
    prof = env["profile"]
    assert prof["threads"] == 1 and Path(prof["path"]).is_file() and prof["plot"].endswith(".png")
    assert "stage2" in prof["graphs"] and prof["graphs"]["stage0"]["1"]["latency_ms"]["n"] == 5
    res = invoke("profile", env["bundle"], "--threads", "1", "--runs", "3", "--warmup", "0", "--batch", "1,2",
                 "--quiet", "--no-plot")
    assert res.exit_code == 0, res.output
    assert "stage0" in res.output and "prefix2" in res.output and "p99" in res.output and "profile:" in res.output


def test_run_an_image_file(env) -> None:
    res = invoke("run", env["bundle"], "--input", env["imgs"] / "d1.png", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "d1.png" in res.output and "mean stage reached 2.00" in res.output


def test_run_a_directory_as_json(env) -> None:
    out = run_json(env["bundle"], "--input", env["imgs"], "--threads", "1")
    assert [r["input"] for r in out["results"]] == ["d0.png", "d1.png", "d2.png"]
    r = out["results"][0]
    assert r["stage"] == 2 and r["members"] == 4 and len(r["stage_ms"]) == 3 and r["total_ms"] > 0
    assert out["summary"]["n"] == 3 and out["policy"] == "full"


def test_run_a_npy_batch_with_each_policy(env) -> None:
    b, x = env["bundle"], env["root"] / "x.npy"
    out = run_json(b, "--input", x, "--threads", "1", "--batch", "2")
    assert len(out["results"]) == 5
    out = run_json(b, "--input", x, "--threads", "1", "--stages", "2")
    assert {r["stage"] for r in out["results"]} == {1} and {r["members"] for r in out["results"]} == {3}
    out = run_json(b, "--input", x, "--threads", "1", "--confidence", "0")
    assert {r["stage"] for r in out["results"]} == {0}
    out = run_json(b, "--input", x, "--threads", "1", "--deadline-ms", "1000")
    assert out["policy"] == "deadline-1000ms" and all(r["budget_met"] for r in out["results"])
    assert {r["stage"] for r in out["results"]} == {2}
    out = run_json(b, "--input", x, "--threads", "1", "--deadline-ms", "0.000001")
    assert {r["stage"] for r in out["results"]} == {0} and not any(r["budget_met"] for r in out["results"])
    assert out["summary"]["misses"] == 5
    out = run_json(b, "--input", x, "--threads", "1", "--deadline-ms", "1000", "--fused")
    assert out["policy"] == "deadline-1000ms-fused" and {r["stage"] for r in out["results"]} == {2}
    assert {len(r["stage_ms"]) for r in out["results"]} == {1}  # one fused graph
    out = run_json(b, "--input", x, "--threads", "1", "--deadline-ms", "1000", "--confidence", "0")
    assert out["policy"] == "deadline-1000ms+confidence-max-0" and {r["stage"] for r in out["results"]} == {0}


def test_run_over_a_dataset(env) -> None:
    import torch

    from kdedge.models.stages import combine_torch, run_stages
    from kdedge.train.data import DataConfig, load_data

    out = run_json(env["bundle"], "--data", "digits", "--threads", "1", "--deadline-ms", "1000", "--limit", "60")
    assert out["n"] == 60 and out["misses"] == 0 and out["split"] == "test"
    assert out["mean_stage"] == 2.0 and out["stage_counts"] == [0, 0, 60] and out["latency_ms"]["p99"] > 0
    # the same accuracy as the torch model on the split's raw images under the bundle's rule
    # (the toy was trained with scale 1/16, mean 0.3, std 0.4: helpers_anytime.digits_data)
    ds = load_data(DataConfig(name="digits"), 0).test
    raw = np.stack([ds.raw(i) for i in range(60)]).astype(np.float32)  # [N, 8, 8, 1], 0..16
    x = torch.from_numpy(((raw / 16 - 0.3) / 0.4).transpose(0, 3, 1, 2).copy())
    y = np.asarray([int(ds[i][1]) for i in range(60)])
    stages = env["model"].stages()
    with torch.no_grad():
        outs = run_stages(stages, x)
        p = combine_torch("mean_logits", [o["logits"] for o in outs], [s.spec.members for s in stages])
    assert out["accuracy"] == pytest.approx(float((p.argmax(1).numpy() == y).mean()))
    assert out["accuracy"] > 0.3  # a trained toy: far above chance (0.1)
    res = invoke("run", env["bundle"], "--data", "digits", "--threads", "1", "--stages", "1", "--limit", "20")
    assert res.exit_code == 0 and "accuracy" in res.output and "mean stage reached 0.00" in res.output


def _tampered(env, tmp_path: Path) -> Path:
    dst = tmp_path / "tampered.kdedge"
    shutil.copytree(env["bundle"], dst)
    f = dst / "onnx" / "stage2.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return dst


def _newer(env, tmp_path: Path) -> Path:
    dst = tmp_path / "newer.kdedge"
    shutil.copytree(env["bundle"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["schema_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _foreign(env, tmp_path: Path) -> Path:
    p = Path(env["profile"]["path"])
    data = json.loads(p.read_text())
    data["device"] = "nvidia-jetson-agx-orin"
    out = tmp_path / "foreign.json"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("setup, needle", [
    (lambda env, t: ["--input", _save(t / "s.npy", np.zeros((2, 1, 9, 9), np.float32))], "expects 8x8"),
    (lambda env, t: ["--input", _save(t / "c.npy", np.zeros((2, 3, 8, 8), np.float32))], "3 channel"),
    (lambda env, t: ["--input", _save(t / "d.npy", np.zeros((2, 1, 8, 8), np.float64))], "dtype float64"),
    (lambda env, t: ["--input", _save(t / "n.npy", np.full((1, 1, 8, 8), np.nan, np.float32))], "NaN"),
    (lambda env, t: ["--input", _bytes(t / "x.png", b"\x89PNG broken")], "cannot read image"),
    (lambda env, t: ["--input", t / "missing.png"], "does not exist"),
    (lambda env, t: [], "exactly one of --input"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--stages", "2", "--deadline-ms", "3"], "cannot be combined"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--stages", "9"], "more stages than the bundle has"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--threads", "2", "--deadline-ms", "3"], "kdedge profile"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--threads", "1", "--deadline-ms", "3", "--profile",
                     _foreign(env, t)], "measured on device 'nvidia-jetson-agx-orin'"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--confidence", "1.5"], "in \\[0, 1\\]"),
    (lambda env, t: ["--data", "digits", "--limit", "0"], "--limit"),
    # options that would change nothing are refused, not ignored
    (lambda env, t: ["--input", env["root"] / "x.npy", "--limit", "3", "--seed", "5"],
     "--limit, --seed apply to --data"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--split", "val", "--data-root", str(t)],
     "--data-root, --split apply to --data"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--margin-ms", "2", "--stat", "max"],
     "--margin-ms, --stat apply to --deadline-ms"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--measure", "margin"], "--measure applies to --confidence"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--online"], "--online applies to --deadline-ms"),
    (lambda env, t: ["--input", env["root"] / "x.npy", "--seed", "0"], "--seed applies to --data"),  # given, if default
    (lambda env, t: ["--input", env["root"] / "x.npy", "--confidence", "0.5", "--fused"],
     "--fused/--no-fused choose how --stages or --deadline-ms run"),
])
def test_bad_input_gives_one_clear_line(env, tmp_path: Path, setup, needle: str) -> None:
    import re

    res = invoke("run", env["bundle"], *setup(env, tmp_path))
    assert res.exit_code == 2, res.output
    assert re.search(needle, res.output.replace("\n", " ")), res.output
    assert "Traceback" not in res.output and res.output.strip().startswith("error:")


@pytest.mark.parametrize("make, needle", [(_tampered, "sha256"), (_newer, "schema version 99")])
def test_bad_bundle_gives_one_clear_line(env, tmp_path: Path, make, needle: str) -> None:
    res = invoke("run", make(env, tmp_path), "--input", env["root"] / "x.npy")
    assert res.exit_code == 2 and needle in res.output.replace("\n", " ") and "Traceback" not in res.output


def test_subprocess_exit_code_and_no_traceback(env, tmp_path: Path) -> None:
    envv = {**os.environ, "OMP_NUM_THREADS": "1"}
    envv.pop("KDEDGE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "kdedge.cli.main", "run", str(_tampered(env, tmp_path)), "--input",
                          str(env["root"] / "x.npy")], capture_output=True, text=True, env=envv, timeout=120)
    assert res.returncode == 2 and "sha256" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "kdedge.cli.main", "profile", str(env["bundle"]), "--batch", "0"],
                         capture_output=True, text=True, env=envv, timeout=120)
    assert res.returncode == 2 and "--batch" in res.stderr and "Traceback" not in res.stderr


def _save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
