"""Bad input to the bundle reader, the runtime and the inputs: one clear line and a non-zero exit,
never a traceback, a hang or a silently wrong answer.

One section per class of failure the sweep found: tracebacks (hostile manifests, manifests that
disagree with themselves or with their graphs, hostile .npy and image files), exit code 0 on
failure (``kdedge inspect`` of a damaged bundle), silently wrong output (NaN from overflowing
inputs, NaN in manifests), wrong culprit in the message, and hangs (thread counts, FIFOs,
devices, huge directories). Through the CLI (in process, and in a subprocess where a hang or a
traceback must be seen as the user sees it) and through the Python API.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from helpers_runtime import GREY, RGB, FakeClock, fake_factory, toy_bundle
from PIL import Image
from typer.testing import CliRunner

from kdedge.bundle import inputs as bundle_inputs
from kdedge.bundle.errors import BundleError, ChecksumError
from kdedge.bundle.files import NotRegularFile, describe_path, open_regular
from kdedge.bundle.manifest import read_manifest
from kdedge.bundle.validate import validate_manifest
from kdedge.cli.main import app
from kdedge.runtime import (
    Confidence,
    Fixed,
    Full,
    InputError,
    OrtOptions,
    OutputError,
    Runner,
    combine,
    load_inputs,
    open_bundle,
)
from kdedge.bundle import input_files as inputs_mod

cli = CliRunner()
POSIX = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad")
    src, _, data = toy_bundle(tmp_path_factory.mktemp("bundles"))
    bundle = root / "toy.kdedge"
    shutil.copytree(src, bundle)
    np.save(root / "x.npy", data["x"][:4])
    return {"bundle": bundle, "root": root, "x": data["x"][:4]}


def invoke(*args: Any):
    return cli.invoke(app, [str(a) for a in args])


def assert_one_line_error(res: Any, *needles: str, code: int = 2) -> str:
    """Exit ``code``, an ``error:`` line holding every needle, and neither a traceback nor an
    internal error."""
    text = res.output if hasattr(res, "output") else res.stdout + res.stderr
    flat = " ".join(text.split())
    assert getattr(res, "exit_code", getattr(res, "returncode", None)) == code, text
    assert "Traceback" not in text and "internal error" not in text, text
    assert "error:" in text, text
    for n in needles:
        assert n in flat, f"{n!r} not in: {flat}"
    return flat


def subprocess_cli(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real command in a fresh process; the timeout turns a hang into a failed test."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "kdedge.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def tampered(env: dict[str, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], Any], name: str = "t") -> Path:
    """A copy of the toy bundle whose manifest ``edit`` changed (it may return the manifest text)."""
    dst = tmp_path / f"{name}.kdedge"
    shutil.copytree(env["bundle"], dst)
    m = json.loads((dst / "manifest.json").read_text())
    text = edit(m)
    (dst / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(m))
    return dst


def _graphs(m: dict[str, Any]) -> list[dict[str, Any]]:
    return [*m["stages"], *m["prefixes"]]


def save(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def npy_claiming(path: Path, shape: tuple[int, ...], dtype: Any = np.float32, data: bytes = b"") -> Path:
    """A .npy whose header says ``shape`` but which holds only ``data``."""
    from numpy.lib import format as npy

    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                       "shape": shape})
        f.write(data)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` (greyscale) but which holds two rows: tiny on
    disk, enormous if decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 2)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# =============================================================================================
# 1. tracebacks: hostile and inconsistent manifests


def _deep(m: dict[str, Any]) -> str:
    return "[" * 200_000 + "]" * 200_000


def _nan_accuracy(m: dict[str, Any]) -> str:
    m["stages"][0]["accuracy"]["last"] = 12345.0
    return json.dumps(m).replace("12345.0", "NaN")


def _overflowing_number(m: dict[str, Any]) -> str:
    m["verification"]["max_abs_error"] = 12345.0
    return json.dumps(m).replace("12345.0", "1e400")  # parses as infinity


def _duplicate_key(m: dict[str, Any]) -> str:
    return json.dumps(m)[:-1] + ', "family": "again"}'


def _classes(n: int) -> Callable[[dict[str, Any]], None]:
    def edit(m: dict[str, Any]) -> None:
        m["classes"] = [f"c{i}" for i in range(n)]
    return edit


def _huge_output(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["shape"] = [None, 8, 100_000, 100_000]  # 3.6 TiB per batch of 16


def _huge_input(m: dict[str, Any]) -> None:
    m["input"]["shape"] = [None, 1, 100_000, 100_000]
    m["preprocessing"]["input_size"] = [100_000, 100_000]


def _output_disagrees_with_reader(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["shape"] = [None, 8, 4, 4]


def _dtype_disagrees_with_reader(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["dtype"] = "float16"


def _input_binding_shape(m: dict[str, Any]) -> None:
    m["stages"][0]["inputs"][0]["shape"] = [None, 1, 9, 9]


def _float_dimension(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["shape"] = [None, 8.0, 8, 8]


def _rank(m: dict[str, Any]) -> None:
    m["stages"][2]["outputs"][0]["shape"] = [None, 1, 1, 1, 1, 1, 1, 1, 10]


def _twice(m: dict[str, Any]) -> None:
    m["stages"][2]["inputs"].append(dict(m["stages"][2]["inputs"][0]))


def _tiny_std(m: dict[str, Any]) -> None:
    m["preprocessing"]["std"] = [1e-300]


def _resize_below_crop(m: dict[str, Any]) -> None:
    m["preprocessing"]["resize"] = 4


def _logits_of_a_prefix(m: dict[str, Any]) -> None:
    m["prefixes"][1]["outputs"][0]["shape"] = [None, 11]


MANIFESTS = [
    (_deep, "nested deeper than 64 levels"),
    (_nan_accuracy, "NaN is not a JSON number"),
    (_overflowing_number, "is not strict JSON: 1e400 overflows a double"),
    (_duplicate_key, "duplicate key 'family'"),
    (_classes(3), "with 3 classes they must be [N, 3]"),
    (_classes(20), "with 20 classes they must be [N, 20]"),
    (_huge_output, "80,000,000,000 elements per sample"),
    (_huge_input, "input declares shape [N, 1, 100000, 100000]"),
    (_output_disagrees_with_reader, "stage1 input 'stage0__f0' is declared [N, 8, 8, 8] float32, but it reads "
                                    "output 'stage0:f0', which is [N, 8, 4, 4] float32"),
    (_dtype_disagrees_with_reader, "which is [N, 8, 8, 8] float16"),
    (_input_binding_shape, "reads the bundle input, which is [N, 1, 8, 8] float32"),
    (_float_dimension, "8.0 is not of type 'integer'"),
    (_rank, "schema at stages/2/outputs/0/shape"),
    (_twice, "stage2 lists an input twice"),
    (_tiny_std, "does not give finite float32 values"),
    (_resize_below_crop, "resize 4 is smaller than the crop"),
    (_logits_of_a_prefix, "prefix1 logits 'prefix1__logits' are declared [N, 11]"),
]


@pytest.mark.parametrize("edit, needle", MANIFESTS, ids=[e.__name__ for e, _ in MANIFESTS])
def test_a_bad_manifest_is_one_line_through_run_and_inspect(env, tmp_path: Path, edit, needle: str) -> None:
    bundle = tampered(env, tmp_path, edit)
    for args in (("run", bundle, "--input", env["root"] / "x.npy", "--threads", "1"), ("inspect", bundle),
                 ("inspect", bundle, "--json")):
        res = invoke(*args)
        assert_one_line_error(res, needle)
        if "--json" in args:  # strict JSON saying why (a message may name NaN; no value is one)
            def strict(c: str) -> None:
                raise AssertionError(f"non-strict JSON constant {c}")

            d = json.loads(res.stdout, parse_constant=strict)
            assert d["status"] == "unreadable" and needle in d["problems"][0], d
        else:
            assert "NaN" not in res.stdout and "Infinity" not in res.stdout
    with pytest.raises(BundleError, match="."):
        open_bundle(bundle)


def test_messages_of_the_wiring_rules_name_the_bundle(env, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["combine"]["default"] = "last"
        m["combine"]["supported"] = ["mean_logits"]
        for g in _graphs(m):
            g["accuracy"] = {"mean_logits": 0.5}

    bundle = tampered(env, tmp_path, edit)
    with pytest.raises(BundleError, match=rf"^bundle {bundle}: combine.default 'last' is not in"):
        read_manifest(bundle)


def test_validate_manifest_refuses_non_finite_numbers_built_in_python(env) -> None:
    """The writer validates with the same function before it writes (BundleDir.commit), so an
    export can never write a NaN into a manifest either."""
    m = json.loads((env["bundle"] / "manifest.json").read_text())
    validate_manifest(m)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = json.loads(json.dumps(m))
        bad["stages"][1]["accuracy"]["mean_probs"] = value
        with pytest.raises(BundleError, match="non-finite number .* at stages/1/accuracy/mean_probs"):
            validate_manifest(bad, where="the new manifest")


def test_export_commit_refuses_a_manifest_with_nan(env, tmp_path: Path) -> None:
    from kdedge.bundle.writer import BundleDir
    from kdedge.export.errors import ExportError

    m = json.loads((env["bundle"] / "manifest.json").read_text())
    m["verification"]["max_abs_error"] = float("nan")
    with pytest.raises(ExportError), BundleDir(tmp_path / "out.kdedge", force=False) as bd:
        bd.commit(m)
    assert not (tmp_path / "out.kdedge").exists()


def test_is_bundle_dir_survives_hostile_manifests(tmp_path: Path) -> None:
    from kdedge.bundle.writer import is_bundle_dir

    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    assert is_bundle_dir(deep) is False
    listy = tmp_path / "listy"
    listy.mkdir()
    (listy / "manifest.json").write_text("[1, 2]")
    assert is_bundle_dir(listy) is False


# -- manifests that agree with themselves but not with their graphs: checked when sessions open


def _input_9x9(m: dict[str, Any]) -> None:
    m["input"]["shape"] = [None, 1, 9, 9]
    m["preprocessing"]["input_size"] = [9, 9]
    for g in _graphs(m):
        for i in g["inputs"]:
            if i["binding"] == "input":
                i["shape"] = [None, 1, 9, 9]


def _carried_4x4(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["shape"] = [None, 8, 4, 4]
    for s in m["stages"][1:]:
        for i in s["inputs"]:
            if i["binding"] == "stage0:f0":
                i["shape"] = [None, 8, 4, 4]


def _five_classes(m: dict[str, Any]) -> None:
    m["classes"] = [str(i) for i in range(5)]
    for g in _graphs(m):
        for o in g["outputs"]:
            if o["name"] == g["logits"]:
                o["shape"] = [None, 5]


def _carried_float16(m: dict[str, Any]) -> None:
    m["stages"][0]["outputs"][1]["dtype"] = "float16"
    for s in m["stages"][1:]:
        for i in s["inputs"]:
            if i["binding"] == "stage0:f0":
                i["dtype"] = "float16"


GRAPH_MISMATCHES = [
    (_input_9x9, "stage0's graph declares input 'input' as [?, 1, 8, 8] tensor(float), the manifest says "
                 "[N, 1, 9, 9] float32"),
    (_carried_4x4, "stage0's graph declares output 'stage0__f0' as [?, 8, 8, 8] tensor(float), the manifest says "
                   "[N, 8, 4, 4]"),
    (_five_classes, "stage0's graph declares output 'stage0__logits' as [?, 10] tensor(float), the manifest says "
                    "[N, 5]"),
    (_carried_float16, "declares output 'stage0__f0' as [?, 8, 8, 8] tensor(float), the manifest says [N, 8, 8, 8] "
                       "float16"),
]


@pytest.mark.parametrize("edit, needle", GRAPH_MISMATCHES, ids=[e.__name__ for e, _ in GRAPH_MISMATCHES])
def test_a_manifest_that_contradicts_its_graphs_fails_when_sessions_open(env, tmp_path: Path, edit,
                                                                         needle: str) -> None:
    bundle = tampered(env, tmp_path, edit)
    open_bundle(bundle)  # consistent with itself, checksums intact: the reader alone cannot tell
    x = np.zeros((2, *open_bundle(bundle).input_shape[1:]), np.float32)
    np.save(tmp_path / "x.npy", x)
    res = invoke("run", bundle, "--input", tmp_path / "x.npy", "--threads", "1")
    assert_one_line_error(res, needle, "re-export the bundle")
    with pytest.raises(ValueError, match="re-export the bundle"):
        Runner(bundle, threads=1)


def test_prefix_graphs_are_checked_when_first_used(env, tmp_path: Path) -> None:
    """prefix0's file replaced by prefix1's (checksums updated): the stages run, the fused
    prefix fails in one line when a request first uses it."""
    import hashlib

    bundle = tmp_path / "p.kdedge"
    shutil.copytree(env["bundle"], bundle)
    data = (bundle / "onnx" / "prefix1.onnx").read_bytes()
    (bundle / "onnx" / "prefix0.onnx").write_bytes(data)
    m = json.loads((bundle / "manifest.json").read_text())
    m["prefixes"][0]["files"]["onnx"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / "manifest.json").write_text(json.dumps(m))
    with Runner(bundle, threads=1) as r:
        assert r.run(env["x"][:1]).stage[0] == 2
        with pytest.raises(ValueError, match="prefix0.onnx has inputs .* re-export the bundle"):
            r.run(env["x"][:1], Fixed(1, fused=True))


def test_graph_mismatch_rules() -> None:
    from kdedge.targets.ort_session import _graph_mismatch

    assert _graph_mismatch(["batch", 1, 8, 8], "tensor(float)", (None, 1, 8, 8), "float32") == (None, False)
    problem, _ = _graph_mismatch([1, 1, 8, 8], "tensor(float)", (None, 1, 8, 8), "float32")
    assert problem is not None and "fixed batch size" in problem
    assert _graph_mismatch(["batch", "h", 8], "tensor(float)", (None, 4, 8), "float32") == (None, True)
    assert _graph_mismatch(None, "tensor(float)", (None, 4), "float32") == (None, True)
    assert _graph_mismatch(["b", 4], "tensor(int64)", (None, 4), "float32")[0] is not None
    assert _graph_mismatch(["b", 4, 4], "tensor(float)", (None, 4), "float32")[0] is not None


def test_a_session_returning_logits_of_the_wrong_shape_is_an_error_not_an_index_error(env) -> None:
    clock = FakeClock()
    logits = {f"stage{k}": np.arange(3, dtype=np.float64) for k in range(3)}  # 3 classes, the bundle has 10
    factory = fake_factory(clock, {f"stage{k}": 1.0 for k in range(3)}, logits, [])
    with Runner(env["bundle"], threads=1, session_factory=factory, clock=clock) as r:
        with pytest.raises(ValueError, match=r"stage0 returned logits stage0__logits of shape \[1, 3\] .* \[N, 10\]"):
            r.run(np.zeros((1, 1, 8, 8), np.float32))


@pytest.mark.parametrize("bad", [("stage1",), ("stage2",), ("stage1", "stage2")])
def test_non_finite_logits_of_a_later_stage_name_the_first_such_stage(env, bad: tuple[str, ...]) -> None:
    """The runner checks and combines the logits of consecutive stages together (after the last
    stage, or when a policy first reads the probabilities): the error still names the first
    stage whose logits are not finite, under every policy."""
    clock = FakeClock()
    logits = {f"stage{k}": np.linspace(0.0, 1.0, 10) for k in range(3)}
    for name in bad:
        logits[name] = np.full(10, np.nan)
    factory = fake_factory(clock, {f"stage{k}": 1.0 for k in range(3)}, logits, [])
    with Runner(env["bundle"], threads=1, session_factory=factory, clock=clock, profile=None) as r:
        for policy in (Full(), Fixed(3, fused=False), Confidence(0.99)):
            with pytest.raises(OutputError, match=rf"^{bad[0]} computed NaN or infinite logits"):
                r.run(np.zeros((2, 1, 8, 8), np.float32), policy)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs", "last"])
def test_infinite_logits_of_opposite_signs_name_their_stage_without_a_warning(env, rule: str) -> None:
    """+inf in one stage and -inf in the next sum to NaN in the runner's one check of the
    combination: still an OutputError naming the first stage, under every combine rule, and no
    numpy RuntimeWarning beside it."""
    import warnings

    clock = FakeClock()
    logits = {"stage0": np.linspace(0.0, 1.0, 10), "stage1": np.full(10, np.inf), "stage2": np.full(10, -np.inf)}
    factory = fake_factory(clock, {f"stage{k}": 1.0 for k in range(3)}, logits, [])
    with Runner(env["bundle"], threads=1, session_factory=factory, clock=clock, profile=None) as r:
        r.combine = rule
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(OutputError, match=r"^stage1 computed NaN or infinite logits"):
                r.run(np.zeros((2, 1, 8, 8), np.float32), Full())
    logits["stage1"] = logits["stage2"] = np.linspace(1.0, 0.0, 10) * 1e30  # large but finite: answered
    factory = fake_factory(clock, {f"stage{k}": 1.0 for k in range(3)}, logits, [])
    with Runner(env["bundle"], threads=1, session_factory=factory, clock=clock, profile=None) as r:
        r.combine = rule
        assert np.isfinite(r.run(np.zeros((2, 1, 8, 8), np.float32), Full()).probs).all()


# -- hostile .npy files


@pytest.mark.parametrize("make, needle", [
    (lambda p: npy_claiming(p / "a.npy", (10**8, 1, 8, 8), data=b"\0" * 1024),
     "is truncated: its header describes a float32 array of shape [100000000, 1, 8, 8] (25,600,000,000 bytes"),
    (lambda p: npy_claiming(p / "a.npy", (10**8, 8, 8), np.uint8, data=b"\0" * 64), "is truncated"),
    (lambda p: npy_claiming(p / "a.npy", (2**40, 2**40, 1, 8, 8)), "has shape [1099511627776, 1099511627776, 1, 8, 8]"),
    (lambda p: npy_claiming(p / "a.npy", (3, 1, 8, 8), data=b"\0" * 100), "holds 100 bytes after the header"),
    (lambda p: npy_claiming(p / "a.npy", (0, 1, 8, 8)), "expects [N, 1, 8, 8] with N >= 1"),
    (lambda p: npy_claiming(p / "a.npy", (0, 8, 8), np.uint8), "holds no images"),
    (lambda p: npy_claiming(p / "a.npy", (2, 0, 5), np.uint8), "holds empty images of 0x5 pixels"),
    (lambda p: save(p / "a.npy", np.zeros((), np.float32)), "has shape []"),
    (lambda p: save(p / "a.npy", np.zeros((1, 1, 1, 8, 8), np.float32)), "has shape [1, 1, 1, 8, 8]"),
    (lambda p: save(p / "a.npy", np.zeros((2, 1, 8, 8), np.float16)), "dtype float16"),
    (lambda p: save(p / "a.npy", np.zeros((2, 1, 8, 8), np.int8)), "dtype int8"),
    (lambda p: save(p / "a.npy", np.zeros((2, 1, 8, 8), bool)), "dtype bool"),
    (lambda p: save(p / "a.npy", np.zeros((2, 1, 8, 8), np.complex64)), "dtype complex64"),
    (lambda p: save(p / "a.npy", np.zeros(3, dtype=[("a", "<f4"), ("b", "<f4")])), "dtype"),
    (lambda p: save(p / "a.npy", np.array([None, {"a": 1}], dtype=object)), "object arrays are refused"),
    (lambda p: write(p / "a.npy", b""), "not a valid .npy file"),
    (lambda p: write(p / "a.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'"), "not a valid .npy file"),
    (lambda p: write(p / "a.npy", b"\x93NUMPY\x07\x00" + b"\0" * 64), "format version 7.0"),
])
def test_hostile_npy_files_fail_before_their_data_is_read(tmp_path: Path, make, needle: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        load_inputs(path, GREY)
    msg = str(info.value)
    assert needle in msg and str(path) in msg and "\n" not in msg, msg


def test_a_truncated_float_npy_is_called_truncated_not_an_object_array(env, tmp_path: Path) -> None:
    np.save(tmp_path / "t.npy", env["x"])
    with open(tmp_path / "t.npy", "r+b") as f:
        f.truncate(300)
    flat = assert_one_line_error(invoke("run", env["bundle"], "--input", tmp_path / "t.npy"), "is truncated")
    assert "object" not in flat


def test_big_endian_fortran_and_memory_mapped_npy_give_the_same_batch(env, tmp_path: Path) -> None:
    x = env["x"]
    ref = load_inputs(save(tmp_path / "c.npy", x), GREY).x
    np.testing.assert_array_equal(load_inputs(save(tmp_path / "b.npy", x.astype(">f4")), GREY).x, ref)
    np.testing.assert_array_equal(load_inputs(save(tmp_path / "f.npy", np.asfortranarray(x)), GREY).x, ref)
    with Runner(env["bundle"], threads=1) as r:  # a memory-mapped batch runs like an array
        np.testing.assert_allclose(r.run(load_inputs(tmp_path / "c.npy", r.bundle).x).probs, r.run(x).probs)


def test_training_side_preprocess_refuses_empty_images() -> None:
    from kdedge.bundle.inputs import InputSpec as InputInfo
    from kdedge.bundle.inputs import InputError as PrepError
    from kdedge.bundle.inputs import preprocess as train_preprocess

    info = InputInfo(name="imagefolder", num_classes=2, in_channels=3, input_size=(12, 12), mean=(0.5,) * 3,
                     std=(0.5,) * 3, scale=1 / 255, channel_order="RGB", class_names=("a", "b"), resize=14)
    for raw in (np.zeros((2, 0, 5, 3), np.uint8), np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(PrepError, match="no pixels|empty"):
            train_preprocess(raw, info)
    with pytest.raises(InputError, match="empty images"):
        inputs_mod.preprocess(np.zeros((2, 0, 5, 3), np.uint8), RGB)


# -- hostile images


def test_an_image_claiming_400_megapixels_is_refused_before_decoding(env, tmp_path: Path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 10_000
    for manifest in (GREY, RGB):
        with pytest.raises(InputError, match="too large|MP kdedge decodes|bundle expects"):
            load_inputs(bomb, manifest)
    with pytest.raises(InputError, match="too large to decode safely"):
        inputs_mod.read_image(bomb, "L")
    assert_one_line_error(invoke("run", env["bundle"], "--input", bomb), "bomb.png")


def test_an_image_above_the_pixel_bound_or_of_the_wrong_size_is_refused_from_its_header(tmp_path: Path) -> None:
    big = png_claiming(tmp_path / "big.png", 9000, 9000)  # 81 MP: below Pillow's limits, above kdedge's
    with pytest.raises(InputError, match=r"is 9000x9000 pixels \(81 MP\), more than the 67 MP"):
        load_inputs(big, RGB)
    with pytest.raises(InputError, match="has images of size 9000x9000, the bundle expects 8x8"):
        load_inputs(big, GREY)


def test_a_truncated_image_is_one_line(tmp_path: Path) -> None:
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 16).astype(np.uint8), "L").save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "short.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read image .*short.png: image file is truncated"):
        inputs_mod.read_image(tmp_path / "short.png", "L")


# =============================================================================================
# 2. exit code 0 on failure


def test_inspect_of_an_intact_bundle_exits_0_with_status_ok(env) -> None:
    res = invoke("inspect", env["bundle"], "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["status"] == "ok" and info["problems"] == [] and info["intact"]


@pytest.mark.parametrize("damage, needle", [
    (lambda b: (b / "onnx" / "stage1.onnx").open("ab").write(b"\0"), "stage1 (onnx) file onnx/stage1.onnx has"),
    (lambda b: (b / "onnx" / "stage2.onnx").unlink(), "is incomplete: stage2 (onnx) file onnx/stage2.onnx is missing"),
    (lambda b: (b / "reports" / "verify.json").write_text("{}"), "report:verify"),
])
def test_inspect_of_a_damaged_bundle_exits_non_zero_and_still_prints_json(env, tmp_path: Path, damage,
                                                                         needle: str) -> None:
    bundle = tmp_path / "d.kdedge"
    shutil.copytree(env["bundle"], bundle)
    damage(bundle)
    res = invoke("inspect", bundle)
    assert_one_line_error(res, needle, "(status: damaged)")
    assert "DAMAGED" in res.stdout  # the table is still shown
    res = invoke("inspect", bundle, "--json")
    assert_one_line_error(res, needle)
    info = json.loads(res.stdout)
    assert info["status"] == "damaged" and not info["intact"] and needle in info["problems"][0]


def test_inspect_of_a_bundle_whose_verification_failed_exits_non_zero(env, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["verification"]["passed"] = False

    res = invoke("inspect", tampered(env, tmp_path, edit), "--json")
    assert_one_line_error(res, "failed verification", "(status: unverified)")
    assert json.loads(res.stdout)["status"] == "unverified"


def test_inspect_in_a_subprocess_so_that_shells_see_the_status(env, tmp_path: Path) -> None:
    bundle = tmp_path / "d.kdedge"
    shutil.copytree(env["bundle"], bundle)
    (bundle / "onnx" / "stage0.onnx").open("ab").write(b"\0")
    res = subprocess_cli("inspect", bundle, "--json")
    assert res.returncode == 2 and json.loads(res.stdout)["status"] == "damaged", res.stderr
    assert res.stderr.startswith("error:") and "Traceback" not in res.stderr


@pytest.mark.parametrize("value", ["-1", "1000000000"])
def test_build_refuses_a_verify_count_out_of_range(env, value: str) -> None:
    assert_one_line_error(invoke("build", env["bundle"], "--target", "tensorrt", "--verify-n", value), "--verify-n")


# =============================================================================================
# 3. silently wrong output


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs", "last"])
def test_overflowing_input_is_an_error_never_a_nan_confidence(env, tmp_path: Path, rule: str) -> None:
    x = np.full((3, 1, 8, 8), 3e38, np.float32)  # finite, but every stage overflows to inf/NaN
    with Runner(env["bundle"], threads=1, combine=rule) as r:
        for policy in (Full(), Fixed(2, fused=True), Fixed(2, fused=False), Confidence(0.5)):
            with pytest.raises(OutputError, match=r"stage0 computed NaN or infinite logits|prefix1 computed") as info:
                r.run(x, policy)
            assert "3e+38" in str(info.value)
    np.save(tmp_path / "big.npy", x)
    res = invoke("run", env["bundle"], "--input", tmp_path / "big.npy", "--combine", rule, "--json")
    assert_one_line_error(res, "input big.npy[0]: stage0 computed NaN or infinite logits (stage0__logits)")
    assert "NaN" not in res.stdout and "null" not in res.stdout


def test_every_answer_is_finite_or_refused(env) -> None:
    """Huge but less extreme inputs either overflow (refused) or give finite probabilities."""
    with Runner(env["bundle"], threads=1) as r:
        for v in (1e20, 1e30, 1e36, -1e36):
            try:
                res = r.run(np.full((2, 1, 8, 8), v, np.float32))
            except OutputError:
                continue
            assert np.isfinite(res.probs).all() and all(np.isfinite(p.confidence) for p in res)


def test_the_sample_named_in_the_error_is_the_requests_index(env) -> None:
    x = np.concatenate([env["x"][:2], np.full((1, 1, 8, 8), 3e38, np.float32)])
    with Runner(env["bundle"], threads=1) as r:
        with pytest.raises(OutputError, match="for 1 of 3 sample") as info:
            r.run(x)
        assert info.value.sample == 2
        with pytest.raises(OutputError, match="^sample 2 of 3: "):
            r.evaluate(x, batch=2)


def test_softmax_of_huge_finite_logits_is_finite_and_combine_refuses_non_finite() -> None:
    import kdedge.bundle.combine as bundle_mod
    from kdedge.bundle.combine import Running, softmax

    big = np.array([[3e38, -3e38, 1.0]], np.float32)
    for rule in ("mean_logits", "mean_probs", "last"):
        p = combine(rule, [big, big], [1, 2])
        assert np.isfinite(p).all() and p[0, 0] == pytest.approx(1.0)
        assert np.isfinite(bundle_mod.combine(rule, [big, big], [1, 2])).all()
        run = Running(rule)
        run.add(big, 1)
        run.add(big, 3)
        assert np.isfinite(run.probs()).all()
    assert np.isfinite(softmax(np.array([[1e308, -1e308]]), 0.5)).all()
    for bad in (np.inf, -np.inf, np.nan):
        with pytest.raises(ValueError, match="stage 1 hold NaN or infinite"):
            combine("mean_logits", [np.zeros((1, 3)), np.array([[bad, 0.0, 0.0]])], [1, 1])
        with pytest.raises(ValueError, match="stage 0 hold NaN or infinite"):
            bundle_mod.combine("last", [np.array([[bad, 0.0]])], [1])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_bundle_input_is_refused(env, tmp_path: Path, value: float) -> None:
    x = env["x"].copy()
    x[1, 0, 3, 3] = value
    with Runner(env["bundle"], threads=1) as r, pytest.raises(InputError, match=r"NaN or infinite values \(in 1 of 4"):
        r.run(x)
    np.save(tmp_path / "n.npy", x)
    assert_one_line_error(invoke("run", env["bundle"], "--input", tmp_path / "n.npy"), "NaN or infinite", "n.npy")


def test_inspect_json_never_holds_nan(env, tmp_path: Path) -> None:
    assert_one_line_error(invoke("inspect", tampered(env, tmp_path, _nan_accuracy), "--json"), "NaN")
    res = invoke("inspect", env["bundle"], "--json")
    assert res.exit_code == 0 and "NaN" not in res.stdout and "Infinity" not in res.stdout


def test_exit_modes_refuse_values_that_would_pass_every_comparison() -> None:
    from kdedge.runtime import exits

    p = np.full((2, 3, 2), 0.5)
    with pytest.raises(ValueError, match="cumulative"):
        exits.select_budget_exits([0.1, 0.2], [1, float("nan")], [3])
    with pytest.raises(ValueError, match="target cost must be a finite"):
        exits.fit_thresholds_for_cost(p, [0, 1, 0], [1, 2], float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        exits.accuracies(np.full((2, 3, 2), np.nan), [0, 1, 0])
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        exits.accuracies(p, [0, 1, 5])
    with pytest.raises(ValueError, match="class indices"):
        exits.accuracies(p, [0, 1.5, 0])
    with pytest.raises(ValueError, match="thresholds must be finite"):
        exits.evaluate_thresholds(p, [0, 1, 0], [float("nan"), 0.0], [1, 2])
    with pytest.raises(ValueError, match="ratio > 0"):
        exits.geometric_fractions(3, float("inf"))


def test_markup_in_names_is_printed_as_it_is(env, tmp_path: Path) -> None:
    def edit(m: dict[str, Any]) -> None:
        m["classes"] = ["[/]" if i == 0 else f"[bold]c{i}" for i in range(10)]

    bundle = tampered(env, tmp_path, edit)
    np.save(tmp_path / "[b]x.npy", np.zeros((2, 1, 8, 8), np.float32))
    res = invoke("run", bundle, "--input", tmp_path / "[b]x.npy", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "[b]x.npy[0]" in res.output and ("[/]" in res.output or "[bold]c" in res.output)


# =============================================================================================
# 4. the culprit and the fix in the message


@pytest.mark.parametrize("target, needles, absent", [
    ("bogus", ["unknown target 'bogus'", "known: onnx, torch, coreml, tensorrt"], ["export", "build"]),
    ("onxx", ["unknown target 'onxx' (did you mean 'onnx'?)"], ["export", "build"]),
    ("tensorrtt", ["did you mean 'tensorrt'?"], ["export"]),
    ("tensorrt", ["has no 'tensorrt' files (it holds onnx)", "kdedge build", "--target tensorrt"], ["unknown"]),
    ("torch", ["has no 'torch' files", "kdedge export", "--target torch"], ["unknown", "kdedge build"]),
])
def test_run_target_messages(env, target: str, needles: list[str], absent: list[str]) -> None:
    flat = assert_one_line_error(invoke("run", env["bundle"], "--input", env["root"] / "x.npy", "--target", target),
                                 *needles)
    for a in absent:
        assert a not in flat, flat


def test_runner_on_an_opened_bundle_names_the_target_problem(env) -> None:
    from kdedge.targets import TargetError

    b = open_bundle(env["bundle"])
    with pytest.raises(TargetError, match="unknown target 'bogus'"):
        Runner(b, target="bogus")
    with pytest.raises(BundleError, match="no 'tensorrt' files .*kdedge build"):
        Runner(b, target="tensorrt")


def test_a_path_that_is_not_a_bundle_says_what_it_is(env, tmp_path: Path) -> None:
    x = env["root"] / "x.npy"
    assert_one_line_error(invoke("run", x, "--input", x), "x.npy is a file, not a bundle")
    assert_one_line_error(invoke("inspect", x), "x.npy is a file, not a bundle")
    assert_one_line_error(invoke("run", x / "model.kdedge", "--input", x), "cannot exist", "x.npy is a regular file")
    (tmp_path / "link.kdedge").symlink_to(tmp_path / "gone")
    assert_one_line_error(invoke("inspect", tmp_path / "link.kdedge"), "is a broken symbolic link")
    assert_one_line_error(invoke("inspect", tmp_path / "nothing"), "bundle", "nothing does not exist")
    half = tmp_path / "half.kdedge"
    (half / "manifest.json").mkdir(parents=True)
    assert_one_line_error(invoke("inspect", half), "manifest.json is not a regular file")


def test_input_paths_say_what_is_wrong(env, tmp_path: Path) -> None:
    x = env["root"] / "x.npy"
    assert_one_line_error(invoke("run", env["bundle"], "--input", x / "a.png"), "cannot exist", "is a regular file")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert_one_line_error(invoke("run", env["bundle"], "--input", tmp_path / "gone.png"), "broken symbolic link")


def test_a_crop_that_does_not_fit_names_the_file() -> None:
    m = json.loads(json.dumps(RGB))
    m["preprocessing"]["resize"] = 10  # a hand-made manifest dict: not validated here
    with pytest.raises(InputError, match="^cam.png: the center crop 12x12 does not fit"):
        inputs_mod.preprocess(np.zeros((20, 20, 3), np.uint8), m, where="cam.png")


def test_describe_path() -> None:
    assert describe_path("/nonexistent-dir/x", "input") == "input /nonexistent-dir/x does not exist"
    assert "cannot exist: /dev/null is a character device, not a directory" in describe_path("/dev/null/x")


# =============================================================================================
# 5. hangs


@pytest.mark.parametrize("threads", ["100000", "0", "-3"])
def test_thread_counts_are_bounded_in_one_place(env, threads: str) -> None:
    assert_one_line_error(invoke("run", env["bundle"], "--input", env["root"] / "x.npy", "--threads", threads),
                          "threads must be an integer from 1 to", f"got {int(threads)}")


def test_the_thread_bound_applies_before_any_session_opens(env) -> None:
    from kdedge.targets.threads import check_threads, max_threads

    opened: list[str] = []

    def factory(bundle: Any, entry: Any, options: Any) -> Any:
        opened.append(entry.name)
        raise AssertionError("no session may open")

    for bad in (10**6, max_threads() + 1, 0, -1, 2.5, True):
        with pytest.raises(ValueError, match="threads must be an integer"):
            Runner(env["bundle"], threads=bad, session_factory=factory)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="threads must be an integer"):
            OrtOptions(threads=bad)  # type: ignore[arg-type]
    assert opened == []
    assert check_threads(max_threads()) == max_threads() and check_threads(None) is None
    assert check_threads(np.int64(1)) == 1


@POSIX
def test_special_files_as_input_are_refused_without_blocking(env, tmp_path: Path) -> None:
    fifo = tmp_path / "x.npy"
    os.mkfifo(fifo)
    pipe_png = tmp_path / "p.png"
    os.mkfifo(pipe_png)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "a.png")
    os.mkfifo(folder / "b.png")
    cases = [(fifo, "is a FIFO (named pipe)"), (pipe_png, "is a FIFO (named pipe)"),
             (Path("/dev/zero"), "is a character device"), (tmp_path / "zero.png", "is a character device"),
             (folder, "b.png is a FIFO (named pipe), not a regular file")]
    for path, needle in cases:
        assert_one_line_error(subprocess_cli("run", env["bundle"], "--input", path, "--threads", "1"), needle)
        with pytest.raises(InputError, match=needle.split(" (")[0]):  # the API says the same (never opens a FIFO)
            load_inputs(path, GREY)


@POSIX
def test_open_regular_never_blocks(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(NotRegularFile):
            open_regular(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_regular(tmp_path / "none")
    (tmp_path / "r").write_bytes(b"ok")
    with open_regular(tmp_path / "r") as f:
        assert f.read() == b"ok"


@POSIX
@pytest.mark.parametrize("where", ["onnx/stage1.onnx", "manifest.json", "reports/verify.json"])
def test_a_fifo_inside_a_bundle_neither_hangs_run_nor_inspect(env, tmp_path: Path, where: str) -> None:
    bundle = tmp_path / "f.kdedge"
    shutil.copytree(env["bundle"], bundle)
    (bundle / where).unlink()
    os.mkfifo(bundle / where)
    needle = "not a regular file"
    assert_one_line_error(subprocess_cli("run", bundle, "--input", env["root"] / "x.npy", "--threads", "1"), needle)
    res = subprocess_cli("inspect", bundle, "--json")
    assert_one_line_error(res, needle)
    with pytest.raises(BundleError, match=needle):
        open_bundle(bundle)


@POSIX
def test_a_fifo_in_a_package_directory_is_refused(env, tmp_path: Path) -> None:
    """Directory digests (CoreML packages) walk regular files only."""
    from kdedge.bundle.files import sha256_path

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a").write_bytes(b"x")
    os.mkfifo(pkg / "b")
    with pytest.raises(BundleError, match="not a regular file"):
        sha256_path(pkg)


def test_directories_of_inputs_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        Image.fromarray(np.full((8, 8), i, np.uint8), "L").save(tmp_path / f"{i}.png")
    assert len(load_inputs(tmp_path, GREY)) == 5
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_FILES", 3)
    with pytest.raises(InputError, match="holds more than 3 image files"):
        load_inputs(tmp_path, GREY)
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_FILES", 100)
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_BYTES", 4 * 64 * 4)  # four 1x8x8 float32 images
    monkeypatch.setattr(bundle_inputs, "MAX_INPUT_BYTES", 4 * 64 * 4)
    with pytest.raises(InputError, match="holds 5 images, .* more than the"):
        load_inputs(tmp_path, GREY)
    np.save(tmp_path / "raw.npy", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(InputError, match="holds 5 images"):
        load_inputs(tmp_path / "raw.npy", GREY)


def test_an_image_above_a_lowered_pixel_bound_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((30, 20, 3), np.uint8), "RGB").save(tmp_path / "a.png")
    assert load_inputs(tmp_path / "a.png", RGB).x.shape == (1, 3, 12, 12)
    monkeypatch.setattr(inputs_mod, "MAX_IMAGE_PIXELS", 500)
    monkeypatch.setattr(bundle_inputs, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(InputError, match=r"is 20x30 pixels"):
        load_inputs(tmp_path / "a.png", RGB)
    with pytest.raises(InputError, match=r"images of 20x30 pixels \(600 pixels\), more than the 500"):  # raw arrays too
        inputs_mod.preprocess(np.zeros((30, 20, 3), np.uint8), RGB)


def test_checksums_are_not_computed_on_a_file_of_the_wrong_size(env, tmp_path: Path) -> None:
    bundle = tmp_path / "s.kdedge"
    shutil.copytree(env["bundle"], bundle)
    (bundle / "onnx" / "stage1.onnx").write_bytes(b"\0" * 10)
    with pytest.raises(ChecksumError, match="has 10 bytes, the manifest records"):
        open_bundle(bundle)


def test_the_user_sees_exactly_one_line_on_stderr(env, tmp_path: Path) -> None:
    """In a real process: no numpy RuntimeWarning, Pillow warning or traceback beside the error."""
    mixed = env["x"].copy()
    mixed[0, 0, 0, 0], mixed[0, 0, 0, 1] = np.inf, -np.inf  # +inf + -inf in one sum
    huge = np.full((1, 1, 8, 8), -1e36, np.float32)  # the toy's stage1 logits overflow to +inf, -inf and NaN
    for name, arr in (("mixed.npy", mixed), ("huge.npy", huge)):
        np.save(tmp_path / name, arr)
        res = subprocess_cli("run", env["bundle"], "--input", tmp_path / name, "--threads", "1", "--json")
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
        assert res.stdout == ""
    res = subprocess_cli("run", env["bundle"], "--input", png_claiming(tmp_path / "bomb.png", 20_000, 20_000))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and "bomb.png" in lines[0], res.stderr


def test_a_dataset_split_too_large_to_load_says_to_limit_it(env, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.setattr(inputs_mod, "MAX_INPUT_BYTES", 10 * 64 * 4)  # ten 1x8x8 float32 images
    monkeypatch.setattr(bundle_inputs, "MAX_INPUT_BYTES", 10 * 64 * 4)
    assert_one_line_error(invoke("run", env["bundle"], "--data", "digits", "--threads", "1"), "pass --limit 10 or less")
    res = invoke("run", env["bundle"], "--data", "digits", "--threads", "1", "--limit", "10", "--json")
    assert res.exit_code == 0, res.output
