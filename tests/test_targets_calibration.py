"""Calibration data for INT8 engines (kdedge.targets.calibration): every graph gets exactly the
tensors the onnxruntime chain feeds it, in fixed-size batches, with digests that follow the data;
images from a path or from the training data layer. GPU-free and TensorRT-free (the calibrator
and the build with fake TensorRT/CUDA modules are in test_targets_tensorrt.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdedge.export.evaluate import images_from_dataset
from kdedge.targets import open_bundle
from kdedge.targets.calibration import (
    DEFAULT_COUNT,
    DEFAULT_SPLIT,
    CalibrationError,
    calibration_set,

    images_from_path,
    subset,
)

cli = CliRunner()


@pytest.fixture(scope="module")
def bundle():
    from helpers_anytime import toy_bundle

    return open_bundle(toy_bundle("fp32", True), targets=["onnx"])


@pytest.fixture(scope="module")
def images():
    from helpers_anytime import digits

    return digits()[2][:100]  # validation images, preprocessed float32 [100, 1, 8, 8]


def _ort_chain(bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """The runner's chain with plain onnxruntime sessions: every tensor a graph can be fed."""
    import onnxruntime as ort

    values = {"input": x}
    for e in bundle.stages:
        s = ort.InferenceSession(str(bundle.file(e, "onnx")), providers=["CPUExecutionProvider"])
        outs = s.run(None, {i.tensor: values[i.tensor] for i in e.inputs})
        values.update(zip([o.name for o in s.get_outputs()], outs))
    return values


def _onnx_inputs(bundle, entry) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(bundle.file(entry, "onnx"))).graph.input]


def test_defaults_match_the_onnx_int8_export() -> None:
    import inspect

    from kdedge.cli.export import command as export_command

    calib_size = inspect.signature(export_command).parameters["calib_size"].default
    assert DEFAULT_COUNT == getattr(calib_size, "default", calib_size) == 256 and DEFAULT_SPLIT == "train"


def test_subset_is_deterministic_evenly_spaced_and_whole_batches() -> None:
    idx = subset(100, 70, 16)
    assert len(idx) == 64 and len(set(idx.tolist())) == 64 and idx[0] == 0 and idx[-1] < 100
    assert np.array_equal(idx, subset(100, 70, 16))
    assert np.diff(idx).min() >= 1 and np.diff(idx).max() <= 2  # spread over the whole source
    assert np.array_equal(subset(8, 256, 4), np.arange(8))  # fewer images than count: all of them
    assert np.array_equal(subset(10, 256, 4), [0, 1, 2, 3, 5, 6, 7, 8])  # ... in whole batches, still spread
    with pytest.raises(CalibrationError, match="at least one full batch of 16 images, the source has 10"):
        subset(10, 256, 16)
    with pytest.raises(CalibrationError, match="batch size must be a positive integer"):
        subset(10, 4, 0)


def test_each_graph_gets_exactly_the_tensors_the_chain_feeds_it(bundle, images) -> None:
    cs = calibration_set(bundle, images, count=70, batch_size=16)
    try:
        assert cs.count == 64 and cs.batches == 4 and cs.images.shape == (64, 1, 8, 8)
        assert np.array_equal(cs.images, images[subset(100, 70, 16)])
        graphs = (*bundle.stages, *bundle.prefixes)
        assert cs.graph_names == tuple(e.name for e in graphs)
        assert cs.for_graph("stage2").inputs == ("stage0__f0", "stage1__f1")  # several carried inputs
        for e in graphs:
            gb = cs.for_graph(e.name)
            got = list(gb)
            assert len(got) == len(gb) == 4
            for k, feeds in enumerate(got):
                assert list(feeds) == [i.tensor for i in e.inputs] == _onnx_inputs(bundle, e)
                want = _ort_chain(bundle, cs.images[16 * k: 16 * (k + 1)])
                for t, a in feeds.items():
                    assert a.shape[0] == 16 and a.dtype == np.float32 and a.flags.c_contiguous
                    np.testing.assert_allclose(a, want[t], rtol=1e-5, atol=1e-6)
            again = list(gb)  # re-iterable: one pass per calibrator, same batches
            assert all(np.array_equal(a[t], b[t]) for a, b in zip(got, again) for t in a)
    finally:
        cs.close()
    with pytest.raises(CalibrationError, match="no graph 'stage9'"):
        cs.for_graph("stage9")


def test_digests_follow_the_data_the_batch_and_the_chain(bundle, images) -> None:
    a = calibration_set(bundle, images, count=64, batch_size=16)
    assert calibration_set(bundle, images.copy(), count=64, batch_size=16).digest == a.digest
    changed = images.copy()
    changed[0, 0, 0, 0] += 1e-3
    assert calibration_set(bundle, changed, count=64, batch_size=16).digest != a.digest
    assert calibration_set(bundle, images, count=64, batch_size=32).digest != a.digest
    assert calibration_set(bundle, images, count=32, batch_size=16).digest != a.digest
    per_graph = {n: a.for_graph(n).digest for n in a.graph_names}
    assert len(set(per_graph.values())) == len(per_graph)
    # another stage0 ONNX changes what stage1/stage2 are fed, not what stage0 and the prefixes read
    s0 = bundle.stages[0]
    other = dataclasses.replace(s0, files={**s0.files, "onnx": dataclasses.replace(s0.files["onnx"], sha256="0" * 64)})
    b2 = dataclasses.replace(bundle, stages=(other, *bundle.stages[1:]))
    c = calibration_set(b2, images, count=64, batch_size=16)
    assert c.digest == a.digest
    for n in a.graph_names:
        assert (c.for_graph(n).digest == per_graph[n]) == (n in ("stage0", "prefix0", "prefix1", "prefix2"))
    with pytest.raises(CalibrationError, match="computed with the ONNX files of"):
        c.check_bundle(bundle)
    a.check_bundle(bundle)
    rec = a.record()
    assert rec == {"kind": "array", "count": 64, "batch_size": 16, "digest": a.digest}


def test_bad_images_are_refused_in_one_line(bundle, images) -> None:
    with pytest.raises(CalibrationError, match=r"has 3 channel\(s\).*expects 1"):
        calibration_set(bundle, np.zeros((8, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="dtype float64"):
        calibration_set(bundle, images.astype(np.float64))
    with pytest.raises(CalibrationError, match="at least one full batch of 32 images, the source has 10"):
        calibration_set(bundle, images[:10], batch_size=32)
    bad = images[:16].copy()
    bad[3, 0, 1, 1] = np.nan
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        calibration_set(bundle, bad, batch_size=8)


def test_images_from_a_directory_an_npy_and_a_missing_path(bundle, tmp_path: Path) -> None:
    raw = (np.random.default_rng(0).random((5, 8, 8)) * 16).astype(np.uint8)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, a in enumerate(raw):
        Image.fromarray(a, "L").save(d / f"{i}.png")
    x, src = images_from_path(d, bundle)
    assert x.shape == (5, 1, 8, 8) and src == {"kind": "path", "path": str(d.absolute()), "available": 5}
    from kdedge.runtime.inputs import preprocess

    np.testing.assert_allclose(x, preprocess(raw, bundle))
    # with a count, a directory's files are subset before they are read, as calibration_set would
    xs, srcs = images_from_path(d, bundle, count=4, batch_size=2)
    assert np.array_equal(xs, x[subset(5, 4, 2)]) and srcs["available"] == 5
    (d / "3.png").write_bytes(b"not a png")  # subset(5, 4, 2) picks files 0, 1, 2, 3: this one is read
    with pytest.raises(CalibrationError, match="cannot read image .*3.png"):
        images_from_path(d, bundle, count=4, batch_size=2)
    (d / "3.png").unlink()
    xs, _ = images_from_path(d, bundle, count=2, batch_size=2)  # subset(4, 2, 2): files 0.png and 2.png
    assert np.array_equal(xs, x[[0, 2]])
    np.save(tmp_path / "x.npy", x)
    x2, src2 = images_from_path(tmp_path / "x.npy", bundle)
    assert np.array_equal(x, x2) and src2["available"] == 5
    with pytest.raises(CalibrationError, match="calibration images: input .*nope does not exist"):
        images_from_path(tmp_path / "nope", bundle)
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match=r"has 3 channel\(s\)"):
        images_from_path(tmp_path / "rgb.npy", bundle)


def test_images_from_the_data_layer(bundle) -> None:
    from kdedge.runtime.inputs import preprocess
    from kdedge.train.data import DataConfig, load_data

    x, src = images_from_dataset(bundle, "digits", count=40, batch_size=16)
    train = load_data(DataConfig(name="digits"), 0).train
    idx = subset(len(train), 40, 16)
    assert x.shape == (32, 1, 8, 8)
    np.testing.assert_array_equal(x, preprocess(np.stack([train.raw(int(i)) for i in idx]), bundle))
    assert src == {"kind": "dataset", "name": "digits", "split": "train", "seed": 0, "root": None,
                   "available": len(train)}
    cs = calibration_set(bundle, x, count=40, batch_size=16, source=src)
    assert cs.count == 32 and np.array_equal(cs.images, x)  # the subset was taken once, at the source
    xv, srcv = images_from_dataset(bundle, "digits", split="val", count=16, batch_size=16)
    assert srcv["split"] == "val" and not np.array_equal(xv, x[:16])
    with pytest.raises(CalibrationError, match="split must be 'train' or 'val', got 'test'"):
        images_from_dataset(bundle, "digits", split="test")
    with pytest.raises(CalibrationError, match="does not fit bundle"):
        images_from_dataset(bundle, "synthetic", count=16, batch_size=16)


def test_the_data_layer_without_torch_says_what_is_missing(bundle) -> None:
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
sys.meta_path.insert(0, Block())
from kdedge.export.evaluate import images_from_dataset
from kdedge.targets import open_bundle
from kdedge.export.evaluate import images_from_dataset
try:
    images_from_dataset(open_bundle({str(bundle.path)!r}, targets=["onnx"]), "digits")
except ValueError as e:
    print("ERR", e)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR --calib-data reads datasets with kdedge's training data layer, which needs torch" in res.stdout
    assert "--calib PATH" in res.stdout


def _invoke(*args: object):
    from kdedge.cli.main import app

    return cli.invoke(app, [str(a) for a in args])


def _one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, res.output
    assert needle in res.output.replace("\n", " "), res.output
    assert "Traceback" not in res.output and res.output.strip().startswith("error:")
    assert len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("args, needle", [
    (("--precision", "fp16", "--calib", "x.npy"), "calibration images are used only to build int8 engines, this "
                                                  "build is fp16"),
    (("--precision", "int8", "--calib", "x.npy", "--calib-data", "digits"), "not both"),
    (("--precision", "int8", "--calib-count", "8"), "--calib-count applies to calibration images"),
    (("--precision", "int8", "--calib", "x.npy", "--calib-root", "d"), "--calib-root applies to --calib-data"),
    (("--precision", "int8", "--calib", "x.npy", "--calib-batch", "0"), "--calib-batch must be a positive integer"),
])
def test_cli_refuses_inconsistent_calibration_options(bundle, args, needle) -> None:
    _one_line_error(_invoke("build", bundle.path, "--target", "tensorrt", *args), needle)


def test_cli_calibration_for_a_target_without_it(bundle, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b.kdedge"
    shutil.copytree(bundle.path, copy)
    res = _invoke("build", copy, "--target", "onnx", "--precision", "int8", "--calib", tmp_path / "x.npy")
    _one_line_error(res, "target 'onnx' takes no calibration images")
