"""One contract suite over every target that runs here: the same outputs as onnxruntime within
tolerance, the same stage results through the runner, abort behaviour as declared. Targets
that cannot run on this machine are skipped with the reason (CoreML predicts on macOS only,
TensorRT and torch-on-CUDA need an NVIDIA GPU).

``tensorrt-emulated`` (and ``-graphs``, with CUDA graphs) runs the real TensorRT session code
on the emulated TensorRT and CUDA runtime of ``tests/fake_tensorrt.py``, on engines its fake
builder made from the toy bundle: it checks the orchestration (device buffers, carried tensors,
streams, graph capture), not TensorRT's numerics."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_anytime import digits, toy_bundle, trained_toy

from kdedge.bundle.errors import ChecksumError
from kdedge.runtime.policies import make_policy
from kdedge.runtime.runner import Runner
from kdedge.targets import get_target, open_bundle
from kdedge.targets.base import CompileSpec, TargetError
from kdedge.targets.session import StageAborted

CASES = ["onnx", "torch-cpu", "torch-cuda", "coreml", "tensorrt", "tensorrt-emulated", "tensorrt-emulated-graphs"]
EMULATED = ("tensorrt-emulated", "tensorrt-emulated-graphs")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _skip_reason(case: str) -> str | None:
    if case == "torch-cuda" and not _cuda():
        return "torch sees no CUDA device here (run on the GPU machine)"
    if case == "coreml" and sys.platform != "darwin":
        return "CoreML predicts only on macOS (the Linux checks are in test_targets_coreml.py)"
    if case == "tensorrt" and not get_target("tensorrt").can_run():
        return "TensorRT is not installed here (needs an NVIDIA GPU; see docs/targets.md)"
    return None


def _module_sources(root: Path) -> list[Any]:
    import torch

    from kdedge.export.graphs import graph_example_inputs, plan_model
    from kdedge.export.graphs import graph_sources

    _, _, xv, _, _ = digits()
    plan = plan_model(trained_toy())
    return graph_sources(plan, graph_example_inputs(plan, torch.from_numpy(xv[:2])), root)


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy bundle with torch (CPU) files added beside its ONNX files; other targets where they run."""
    from kdedge.bundle.writer import BundleDir
    from kdedge.targets.build import add_target

    src = toy_bundle()
    out = tmp_path_factory.mktemp("targets") / "toy.kdedge"
    _, _, xv, _, _ = digits()
    bundle = open_bundle(src)
    manifest = {**bundle.manifest, "stages": [dict(s, files=dict(s["files"])) for s in bundle.manifest["stages"]],
                "prefixes": [dict(s, files=dict(s["files"])) for s in bundle.manifest["prefixes"]]}
    with BundleDir(out, force=False) as bd:
        for item in src.iterdir():
            if item.name != "manifest.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, bd.tmp / item.name)
        sources = _module_sources(bd.tmp)
        add_target(bd.tmp, manifest, "torch", CompileSpec(device="cpu"), sources, verify_x=xv[:4])
        if _cuda():
            pass  # the same .pt2 files run on CUDA (device is a session option)
        if sys.platform == "darwin":
            add_target(bd.tmp, manifest, "coreml", CompileSpec(precision="fp32", device="cpu"), sources,
                       verify_x=xv[:4])
        bd.commit(manifest)
    if get_target("tensorrt").can_run():
        from kdedge.targets.build import build_bundle

        build_bundle(out, "tensorrt", CompileSpec(precision="fp32", max_batch=64))
    return out


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy bundle with engines built by the emulated TensorRT 10 (tests/fake_tensorrt.py) and
    verified against onnxruntime through the emulated sessions, as ``kdedge build`` does."""
    from fake_tensorrt import install

    from kdedge.targets.build import build_bundle

    out = tmp_path_factory.mktemp("trt") / "toy.kdedge"
    shutil.copytree(toy_bundle(), out)
    with pytest.MonkeyPatch.context() as mp:
        install(mp, tmp_path_factory.mktemp("home"))
        report = build_bundle(out, "tensorrt", CompileSpec(precision="fp32", max_batch=64))
    assert report["verified"] == "onnxruntime" and all(r["passed"] for r in report["graphs"].values()), report
    return out


def _bundle(case: str, multi: Path, request: pytest.FixtureRequest) -> Path:
    """The bundle a case runs; for the emulated TensorRT cases, with the fakes installed for this test."""
    if case not in EMULATED:
        return multi
    from fake_tensorrt import install

    path = request.getfixturevalue("emulated")
    install(request.getfixturevalue("monkeypatch"))
    return path


def _open(case: str, bundle: Path) -> tuple[str, dict[str, Any] | None]:
    if case == "torch-cpu":
        return "torch", {"device": "cpu"}
    if case == "torch-cuda":
        return "torch", {"device": "cuda"}
    if case == "tensorrt-emulated":
        return "tensorrt", None
    if case == "tensorrt-emulated-graphs":
        return "tensorrt", {"cuda_graphs": True}
    return case, None


@pytest.mark.parametrize("case", CASES)
def test_same_outputs_as_onnxruntime(case: str, multi: Path, request: pytest.FixtureRequest) -> None:
    if (why := _skip_reason(case)) is not None:
        pytest.skip(why)
    multi = _bundle(case, multi, request)
    name, opts = _open(case, multi)
    b = open_bundle(multi, targets=[name])
    target, onnx = get_target(name), get_target("onnx")
    _, _, xv, _, _ = digits()
    x = xv[:24]
    from kdedge.targets.build import _chain, compare

    for group in (b.stages, *[(p,) for p in b.prefixes]):
        ref = _chain([onnx.open_entry(b, e, None) for e in group], group, x)
        got = _chain([target.open_entry(b, e, opts) for e in group], group, x)
        assert sorted(got) == sorted(ref)
        res = compare(name, group[-1].files[name].precision, ref, got)
        assert res["passed"], res


@pytest.mark.parametrize("case", CASES)
def test_runner_gives_the_same_stage_results(case: str, multi: Path, request: pytest.FixtureRequest) -> None:
    if (why := _skip_reason(case)) is not None:
        pytest.skip(why)
    multi = _bundle(case, multi, request)
    name, opts = _open(case, multi)
    _, _, xv, _, _ = digits()
    x = xv[:32]
    with Runner(multi, target="onnx") as ref, Runner(multi, target=name, session_options=opts) as run:
        for policy in (None, make_policy(stages=2), make_policy(stages=2, fused=True), make_policy(confidence=0.3)):
            a, b = ref.run(x, policy), run.run(x, policy)
            assert a.graphs == b.graphs
            np.testing.assert_array_equal(a.stage, b.stage)
            np.testing.assert_array_equal(a.members, b.members)
            np.testing.assert_allclose(b.probs, a.probs, atol=1e-4)
        # the confidence policy let some samples leave early: the carried tensors were sliced
        assert len(set(ref.run(x, make_policy(confidence=0.3)).stage.tolist())) > 1


@pytest.mark.parametrize("case", CASES)
def test_abort_behaviour_as_declared(case: str, multi: Path, request: pytest.FixtureRequest) -> None:
    if (why := _skip_reason(case)) is not None:
        pytest.skip(why)
    multi = _bundle(case, multi, request)
    name, opts = _open(case, multi)
    b = open_bundle(multi, targets=[name])
    target = get_target(name)
    s = target.open_entry(b, b.stages[0], opts)
    try:
        assert s.can_abort is target.caps.can_abort
        _, _, xv, _, _ = digits()
        if target.caps.can_abort:
            h = s.abort_handle()
            h.abort()  # aborted before the call: the call must not return a result
            with pytest.raises(StageAborted):
                s.run({"input": xv[:4]}, h)
        else:
            with pytest.raises(TargetError, match="cannot abort"):
                s.abort_handle()
    finally:
        s.close()


def test_auto_picks_a_target_that_runs_here(multi: Path) -> None:
    with Runner(multi, target="auto") as r:
        assert r.target in ("torch", "coreml", "tensorrt")
        assert r.target != "coreml" or sys.platform == "darwin"


def test_tampered_program_is_refused_before_torch_loads_it(multi: Path, tmp_path: Path) -> None:
    copy = tmp_path / "t.kdedge"
    shutil.copytree(multi, copy)
    f = copy / "torch" / "stage1.pt2"
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ChecksumError, match="stage1 \\(torch\\)"):
        Runner(copy, target="torch")
    Runner(copy, target="onnx").close()  # the other target's files are still usable


def test_torch_session_checks_names_and_device(multi: Path) -> None:
    t = get_target("torch")
    path = multi / "torch" / "stage1.pt2"
    with pytest.raises(TargetError, match="re-export"):
        t.open(path, name="stage1", inputs=("stage0__f9",), outputs=("stage1__logits", "stage1__f1"))
    with pytest.raises(TargetError, match="unknown torch session option"):
        t.open(path, name="stage1", inputs=("stage0__f0",), outputs=("stage1__logits", "stage1__f1"), speed=3)
    if not _cuda():
        with pytest.raises(TargetError, match="no CUDA device"):
            t.open(path, name="stage1", inputs=("stage0__f0",), outputs=("stage1__logits", "stage1__f1"),
                   device="cuda")


def test_torch_keeps_carried_tensors_on_the_device(multi: Path) -> None:
    import torch

    b = open_bundle(multi, targets=["torch"])
    s = get_target("torch").open_entry(b, b.stages[0], {"device": "cpu"})
    _, _, xv, _, _ = digits()
    out = s.run({"input": xv[:3]})
    assert isinstance(out["stage0__logits"], np.ndarray)
    assert isinstance(out["stage0__f0"], torch.Tensor)  # carried: stays a device tensor for stage1


@pytest.mark.cuda
def test_torch_cuda_graphs_match_eager(multi: Path) -> None:
    if not _cuda():
        pytest.skip("torch sees no CUDA device here (run on the GPU machine)")
    b = open_bundle(multi, targets=["torch"])
    t = get_target("torch")
    _, _, xv, _, _ = digits()
    for e in b.stages[:1]:
        eager = t.open_entry(b, e, {"device": "cuda", "host_outputs": [o.tensor for o in e.outputs]})
        graphed = t.open_entry(b, e, {"device": "cuda", "cuda_graphs": True,
                                      "host_outputs": [o.tensor for o in e.outputs]})
        import torch

        assert not torch.backends.cudnn.allow_tf32  # an FP32 CUDA session runs FP32 convolutions
        for _ in range(2):
            a, g = eager.run({"input": xv[:8]}), graphed.run({"input": xv[:8]})
            for k in a:
                np.testing.assert_allclose(g[k], a[k], atol=1e-5)


# -- run options: device, CUDA graphs, and the profile key -------------------------------------


def test_run_key_names_the_target_device_and_cuda_graphs(multi: Path) -> None:
    from kdedge.targets.threads import default_threads

    with Runner(multi, target="onnx") as r:
        assert r.run_key == ""  # onnxruntime on the CPU: the profile file keeps its short name
    with Runner(multi, target="torch") as r:
        assert r.run_key == "torch-cpu"
        assert r.options == {"device": "cpu", "threads": default_threads()}  # explicit, so the key is true
    with Runner(multi, target="torch", threads=1, device="cpu") as r:
        assert r.options["threads"] == 1 and r.threads == 1


@pytest.mark.parametrize("kw, msg", [
    ({"target": "torch", "cuda_graphs": True}, "CUDA graphs need a CUDA device, not 'cpu'"),
    ({"target": "onnx", "cuda_graphs": True}, "target 'onnx' does not use CUDA graphs"),
    ({"target": "onnx", "device": "cuda:1"}, "takes no device index"),
    ({"target": "torch", "device": "npu"}, "target 'torch' does not run on device 'npu'"),
])
def test_run_requests_a_target_cannot_honour_are_refused(multi: Path, kw: dict[str, Any], msg: str) -> None:
    with pytest.raises(TargetError, match=msg):
        Runner(multi, **kw)


def test_cuda_runs_without_a_cuda_runtime_say_what_is_missing(multi: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider.*not available here"):
            Runner(multi, target="onnx", device="cuda")
    if not _cuda():
        with pytest.raises(TargetError, match="torch sees no CUDA device"):
            Runner(multi, target="torch", device="cuda")


def test_profiles_are_kept_per_run_key(multi: Path, tmp_path: Path) -> None:
    import json

    from kdedge.profile.latency import (
        ForeignProfileError,
        MissingProfileError,
        current_key,
        profile_bundle,
        profile_filename,
    )

    copy = tmp_path / "p.kdedge"
    shutil.copytree(multi, copy)
    kw: dict[str, Any] = dict(batches=(1,), runs=3, warmup=1, threads=1, plot=False)
    p_onnx, path_onnx, _ = profile_bundle(copy, target="onnx", **kw)
    with Runner(copy, target="torch", threads=1) as r:  # the onnx profile is not the torch run's
        with pytest.raises(MissingProfileError, match="run as torch-cpu.*--target torch --device cpu"):
            r.profile  # noqa: B018
    p_torch, path_torch, _ = profile_bundle(copy, target="torch", **kw)
    device, setting, _ = current_key(1)
    assert path_onnx.name == profile_filename(device, setting)
    assert path_torch.name == f"{device}-{setting}-torch-cpu.json" and path_onnx.is_file()
    assert (p_onnx.run_key, p_torch.run_key) == ("", "torch-cpu")
    assert p_torch.data["options"] == {"device": "cpu", "threads": 1}
    with Runner(copy, target="torch", threads=1) as r:
        assert r.profile.path == path_torch
    with Runner(copy, target="onnx", threads=1) as r:
        assert r.profile.path == path_onnx
    # a profile measured with CUDA graphs on the GPU is refused for a CPU run, with the flags to re-measure
    data = json.loads(path_torch.read_text())
    other = tmp_path / "cuda.json"
    other.write_text(json.dumps({**data, "run_key": "torch-cuda1-cudagraphs"}))
    with Runner(copy, target="torch", threads=1, profile=str(other)) as r:
        with pytest.raises(ForeignProfileError, match="measured as 'torch-cuda1-cudagraphs'.*runs 'torch-cpu'.*"
                                                      "--target torch --device cpu"):
            r.profile  # noqa: B018
    # a profile from before run keys existed reads as onnxruntime on the CPU
    legacy = {k: v for k, v in json.loads(path_onnx.read_text()).items() if k != "run_key"}
    path_onnx.write_text(json.dumps(legacy))
    with Runner(copy, target="onnx", threads=1) as r:
        assert r.profile.run_key == ""


def test_cli_profile_and_run_take_the_target_and_its_device(multi: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdedge.cli.main import app

    copy = tmp_path / "c.kdedge"
    shutil.copytree(multi, copy)
    _, _, xv, _, _ = digits()
    np.save(tmp_path / "x.npy", xv[:4])
    cli = CliRunner()
    res = cli.invoke(app, ["profile", str(copy), "--target", "torch", "--device", "cpu", "--threads", "1", "--runs",
                           "3", "--warmup", "1", "--no-plot", "--json"])
    assert res.exit_code == 0, res.output
    assert '"run_key": "torch-cpu"' in res.output
    res = cli.invoke(app, ["run", str(copy), "--target", "torch", "--threads", "1", "--input", str(tmp_path / "x.npy"),
                           "--deadline-ms", "1000", "--json"])
    assert res.exit_code == 0, res.output
    assert res.output.count('"budget_met": true') == 4
    res = cli.invoke(app, ["run", str(copy), "--target", "torch", "--cuda-graphs", "--input",
                           str(tmp_path / "x.npy")])
    assert res.exit_code == 2
    assert "CUDA graphs need a CUDA device" in res.output and "Traceback" not in res.output


@pytest.mark.cuda
def test_torch_cuda_profile_and_deadline_run(multi: Path, tmp_path: Path) -> None:
    if not _cuda():
        pytest.skip("torch sees no CUDA device here (run on the GPU machine)")
    from kdedge.profile.latency import profile_bundle

    copy = tmp_path / "g.kdedge"
    shutil.copytree(multi, copy)
    _, _, xv, _, _ = digits()
    for graphs in (False, True):
        prof, path, _ = profile_bundle(copy, target="torch", device="cuda", cuda_graphs=graphs, batches=(1, 8),
                                       runs=20, warmup=5, plot=False)
        assert prof.run_key == "torch-cuda" + ("-cudagraphs" if graphs else "")
        with Runner(copy, target="torch", device="cuda", cuda_graphs=graphs) as r:
            assert r.profile.path == path
            res = r.run(xv[:8], make_policy(deadline_ms=1000.0))
            assert res.stage.min() == r.num_stages - 1


def test_export_verifies_a_target_on_validation_images_within_its_batch_range(tmp_path: Path) -> None:
    import json

    from kdedge.export import export

    _, _, xv, yv, info = digits()
    out = tmp_path / "fp16.kdedge"
    export(trained_toy(), out, info=info, val_data=(xv[:40], yv[:40]), target="torch", precision="fp16",
           device="cuda", max_batch=16)
    m = json.loads((out / "manifest.json").read_text())
    rep = m["provenance"]["targets"]["torch"]
    assert rep["verified"] == "onnxruntime" and rep["n"] == 16  # capped at --max-batch
    assert rep["options"] == {"device": "cuda" if _cuda() else "cpu"}  # where it was checked is recorded
    assert m["stages"][0]["files"]["torch"]["device"] == "cuda"
    if not _cuda():  # compiled for CUDA: the runner goes there by default, and says when it cannot
        with pytest.raises(TargetError, match="torch sees no CUDA device"):
            Runner(out, target="torch")
        with Runner(out, target="torch", device="cpu") as r:
            assert r.run_key == "torch-cpu" and r.run(xv[:3]).stage.tolist() == [2, 2, 2]


def test_an_fp32_cuda_session_turns_tf32_off() -> None:
    torch = pytest.importorskip("torch")
    from kdedge.targets.torch_export import exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        exact_fp32(torch)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
