"""The bundle reader (kdedge.bundle.manifest): schema, versions, wiring, checksums, combine rules.

The bundles here are written by hand, as a program in another language would write them
from docs/bundle.md, so the reader is tested independently of the exporter.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kdedge.bundle.validate as bundle_mod
from kdedge.bundle.combine import combine
from kdedge.bundle.errors import BundleError, BundleVersionError, ChecksumError
from kdedge.bundle.files import path_bytes, sha256_path
from kdedge.bundle.manifest import Bundle
from kdedge.bundle.names import SCHEMA_VERSION, output_tensor_name, tensor_name
from kdedge.bundle.validate import validate_manifest
from kdedge.targets import open_bundle


def _file(root: Path, rel: str, data: bytes, **extra: Any) -> dict[str, Any]:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return {"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **extra}


def _io(binding: str, tensor: str, shape: list[Any]) -> dict[str, Any]:
    return {"binding": binding, "tensor": tensor, "shape": shape, "dtype": "float32"}


def _out(name: str, tensor: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "tensor": tensor, "shape": shape, "dtype": "float32"}


def write_bundle(root: Path) -> dict[str, Any]:
    """A two-stage bundle (members 1 and 2, stage1 reads stage0's feature) and one prefix."""
    root.mkdir(parents=True)
    (root / "profiles").mkdir()
    acc = {"mean_logits": 0.5, "last": 0.4}
    stages = [
        {"name": "stage0", "files": {"onnx": _file(root, "onnx/stage0.onnx", b"graph zero", precision="fp32")},
         "inputs": [_io("input", "input", [None, 3, 4, 4])],
         "outputs": [_out("logits", "stage0__logits", [None, 5]), _out("feat.a", "stage0__feat_a", [None, 2, 4, 4])],
         "logits": "logits", "members": 1, "members_total": 1, "macs": 100, "params": 10, "accuracy": acc,
         "last_stage": 0},
        {"name": "stage1", "files": {"onnx": _file(root, "onnx/stage1.onnx", b"graph one", precision="int8")},
         "inputs": [_io("stage0:feat.a", "stage0__feat_a", [None, 2, 4, 4])],
         "outputs": [_out("logits", "stage1__logits", [None, 5])],
         "logits": "logits", "members": 2, "members_total": 3, "macs": 200, "params": 20, "accuracy": acc,
         "last_stage": 1},
    ]
    prefixes = [
        {"name": "prefix0", "files": {"onnx": _file(root, "onnx/prefix0.onnx", b"prefix zero", precision="fp32")},
         "inputs": [_io("input", "input", [None, 3, 4, 4])], "outputs": [_out("logits", "prefix0__logits", [None, 5])],
         "logits": "logits", "members": 1, "members_total": 1, "macs": 100, "params": 10, "accuracy": acc,
         "last_stage": 0},
    ]
    manifest = {
        "format": "kdedge-bundle", "schema_version": 1, "kdedge_version": "0.1.0", "family": "test",
        "model": {"class": "Hand", "meta": {}}, "classes": ["a", "b", "c", "d", "e"],
        "input": {"name": "input", "shape": [None, 3, 4, 4], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {"dataset": "none", "input_size": [4, 4], "resize": None, "scale": 1 / 255,
                          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channel_order": "RGB"},
        "combine": {"default": "mean_logits", "supported": ["mean_logits", "last"]},
        "targets": ["onnx"], "stages": stages, "prefixes": prefixes,
        "evaluation": {"split": "val", "n": 10},
        "verification": {"passed": True, "target": "onnx", "atol": 1e-4, "rtol": 1e-3, "min_top1_agreement": 0.99,
                         "n": 10, "max_abs_error": 0.0, "max_rel_error": 0.0, "worst_ratio": 0.0, "min_top1": 1.0,
                         "report": "reports/verify.json"},
        "quantization": None,
        "reports": {"verify": _file(root, "reports/verify.json", b'{"passed": true}\n')},
        "provenance": {"created": "2025-01-01T00:00:00+00:00", "kdedge": "0.1.0", "python": "3.11", "torch": None,
                       "onnx": None, "onnxruntime": None, "opset": 18, "exporter": "dynamo", "run_dir": None,
                       "config": None},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def rewrite(root: Path, manifest: dict[str, Any]) -> None:
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_hand_written_bundle_opens(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b")
    b = open_bundle(tmp_path / "b")
    assert isinstance(b, Bundle)
    assert [s.name for s in b.stages] == ["stage0", "stage1"] and [p.name for p in b.prefixes] == ["prefix0"]
    assert b.combine_default == "mean_logits" and b.combine_supported == ("mean_logits", "last")
    assert b.input_shape == (None, 3, 4, 4) and b.num_classes == 5 and b.members_after(1) == 3
    assert b.file(b.stages[1], "onnx") == tmp_path / "b" / "onnx" / "stage1.onnx"
    s1 = b.stages[1]
    assert s1.inputs[0].binding == "stage0:feat.a" and s1.inputs[0].tensor == "stage0__feat_a"
    assert s1.logits_tensor == "stage1__logits" and s1.files["onnx"].precision == "int8"
    with pytest.raises(BundleError, match="no 'tensorrt' file"):
        b.file(s1, "tensorrt")
    with pytest.raises(BundleError, match="build them on the device with: kdedge build .* --target tensorrt"):
        open_bundle(tmp_path / "b", targets=["tensorrt"])
    with pytest.raises(BundleError, match="no 'torch' files .*kdedge export RUN_DIR --target torch"):
        open_bundle(tmp_path / "b", targets=["torch"])
    # an unknown name is not "missing from the bundle": it is unknown, with the known ones
    from kdedge.targets import TargetError

    with pytest.raises(TargetError, match=r"unknown target 'bogus'; known: onnx, torch") as info:
        open_bundle(tmp_path / "b", targets=["bogus"])
    assert "export" not in str(info.value) and "build" not in str(info.value)
    with pytest.raises(TargetError, match=r"unknown target 'onxx' \(did you mean 'onnx'\?\)"):
        open_bundle(tmp_path / "b", targets=["onxx"])


def test_newer_schema_names_the_release_to_upgrade_to(tmp_path: Path) -> None:
    m = write_bundle(tmp_path / "b")
    m["schema_version"] = SCHEMA_VERSION + 1
    m["kdedge_version"] = "0.7.0"
    m["something_new"] = {"the": "future"}
    rewrite(tmp_path / "b", m)
    with pytest.raises(BundleVersionError,
                       match=rf"schema version {SCHEMA_VERSION + 1}.*upgrade kdedge to 0\.7\.0 or later"):
        open_bundle(tmp_path / "b")


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(format="something-else"), "not a kdedge bundle manifest"),
    (lambda m: m.update(schema_version="1"), "schema_version must be a positive integer"),
    (lambda m: m.pop("stages"), "'stages' is a required property"),
    (lambda m: m["stages"][0].update(members=0), "at stages/0/members"),
    (lambda m: m["input"].update(shape=[1, 3, 4, 4]), "at input/shape/0"),
    (lambda m: m.update(extra_field=1), "Additional properties"),
    (lambda m: m["combine"].update(default="last", supported=["mean_logits"]), "combine.default 'last' is not in"),
    (lambda m: m["stages"][1]["inputs"][0].update(binding="stage1:feat.a", tensor="stage1__feat_a"),
     "not produced by an earlier stage"),
    (lambda m: m["stages"][1]["inputs"][0].update(tensor="feat"), "expected 'stage0__feat_a'"),
    (lambda m: m["stages"][1]["outputs"][0].update(tensor="logits"), "expected 'stage1__logits'"),
    (lambda m: m["stages"][1].update(members_total=2), "members_total 2 != 3"),
    (lambda m: m["prefixes"][0].update(members=3, members_total=3), "differs from the 1 members"),
    (lambda m: m["stages"][0].update(accuracy={"mean_logits": 0.5}), "one value per supported rule"),
    (lambda m: m["stages"][0].update(name="first"), "at stages/0/name"),
    (lambda m: m["stages"][0]["files"]["onnx"].update(path="../outside.onnx"), "without '..'"),
    (lambda m: m["stages"][0]["files"]["onnx"].update(path="/etc/passwd"), "at stages/0/files/onnx/path"),
    (lambda m: m["preprocessing"].update(mean=[0.5]), "mean/std need 3 values"),
    # 10**400 parses as a Python int; inspect's MAC column overflowed converting it to a float
    (lambda m: m["stages"][0].update(macs=10**400), r"an integer beyond 2\*\*63 at stages/0/macs"),
    (lambda m: m["stages"][1].update(params=-(2**64)), r"an integer beyond 2\*\*63 at stages/1/params"),
    # a NUL byte reached os.path as a bare "embedded null byte"
    (lambda m: m["stages"][0]["files"]["onnx"].update(path="onnx/stage0\x00.onnx"),
     r"stage0 \(onnx\): file path 'onnx/stage0\\x00.onnx' holds a control character"),
])
def test_invalid_manifests_fail_with_one_clear_line(tmp_path: Path, mutate: Any, message: str) -> None:
    m = write_bundle(tmp_path / "b")
    mutate(m)
    rewrite(tmp_path / "b", m)
    with pytest.raises(BundleError, match=message) as info:
        open_bundle(tmp_path / "b")
    assert "\n" not in str(info.value)


def test_tampered_and_missing_files(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b")
    (tmp_path / "b" / "onnx" / "stage1.onnx").write_bytes(b"graph 0ne")  # same size, other bytes
    with pytest.raises(ChecksumError, match="stage1 \\(onnx\\).*modified or damaged"):
        open_bundle(tmp_path / "b")
    assert open_bundle(tmp_path / "b", verify=False).stages[1].name == "stage1"
    with open(tmp_path / "b" / "onnx" / "stage0.onnx", "ab") as f:
        f.write(b"!")
    with pytest.raises(ChecksumError, match="stage0 \\(onnx\\).*11 bytes, the manifest records 10"):
        open_bundle(tmp_path / "b")
    write_bundle(tmp_path / "c")
    (tmp_path / "c" / "reports" / "verify.json").unlink()
    with pytest.raises(BundleError, match="report verify file reports/verify.json is missing"):
        open_bundle(tmp_path / "c")


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "partial").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path / "partial")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(tmp_path / "garbage")


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_manifest_that_links_outside_the_bundle_is_refused(tmp_path: Path, where: str) -> None:
    m = write_bundle(tmp_path / "b")
    real = tmp_path / "elsewhere.json" if where == "outside" else tmp_path / "b" / "reports" / "m.json"
    real.write_text(json.dumps(m))
    (tmp_path / "b" / "manifest.json").unlink()
    (tmp_path / "b" / "manifest.json").symlink_to(real)
    if where == "inside":  # a link within the bundle is the bundle's own file
        assert [s.name for s in open_bundle(tmp_path / "b", verify=False).stages] == ["stage0", "stage1"]
        return
    with pytest.raises(BundleError, match=r"manifest.json is a symbolic link to '.*elsewhere.json', outside the bundle"):
        open_bundle(tmp_path / "b")


def test_validate_manifest_accepts_a_copy_and_does_not_mutate(tmp_path: Path) -> None:
    m = write_bundle(tmp_path / "b")
    before = copy.deepcopy(m)
    validate_manifest(m)
    assert m == before


def test_tensor_names() -> None:
    assert tensor_name("input") == "input"
    assert tensor_name("stage3:feat.1") == "stage3__feat_1"
    assert output_tensor_name("stage3", "feat.1") == tensor_name("stage3:feat.1")
    with pytest.raises(BundleError, match="expected 'input' or 'stageK:NAME'"):
        tensor_name("prefix0:logits")


def test_sha256_of_directories_is_stable(tmp_path: Path) -> None:
    d = tmp_path / "pkg.mlpackage"
    (d / "Data").mkdir(parents=True)
    (d / "Data" / "w.bin").write_bytes(b"weights")
    (d / "Manifest.json").write_text("{}")
    first = sha256_path(d)
    assert first == sha256_path(d) and len(first) == 64
    (d / "Data" / "w.bin").write_bytes(b"weightz")
    assert sha256_path(d) != first


def test_directory_digest_follows_the_documented_definition(tmp_path: Path) -> None:
    # docs/bundle.md: sha256 of "<relative posix path>\0<sha256 hex>\n" per regular file, sorted
    # by the path string (so "a.b" comes before "a/b": '.' < '/'), empty directories ignored
    d = tmp_path / "pkg"
    (d / "a").mkdir(parents=True)
    (d / "empty").mkdir()
    (d / "a" / "b").write_bytes(b"one")
    (d / "a.b").write_bytes(b"two")
    lines = "".join(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n" for rel, data in [("a.b", b"two"), ("a/b", b"one")])
    assert sha256_path(d) == hashlib.sha256(lines.encode()).hexdigest()
    assert path_bytes(d) == 6


def _package(root: Path, rel: str = "coreml/model.mlpackage") -> dict[str, Any]:
    """A directory package like a CoreML .mlpackage; its file entry without ``function``."""
    d = root / rel
    (d / "Data" / "weights").mkdir(parents=True)
    (d / "Manifest.json").write_text('{"items": 2}')
    (d / "Data" / "model.mlmodel").write_bytes(b"program of three functions")
    (d / "Data" / "weights" / "weight.bin").write_bytes(b"\x00\x01" * 50)
    return {"path": rel, "sha256": sha256_path(d), "bytes": path_bytes(d), "precision": "fp16"}


def write_shared_bundle(root: Path) -> dict[str, Any]:
    """The bundle of :func:`write_bundle` (schema 2) with a 'coreml' target: one package whose
    functions are the three graphs."""
    m = write_bundle(root)
    entry = _package(root)
    m["schema_version"] = 2
    m["targets"] = ["onnx", "coreml"]
    for g in (*m["stages"], *m["prefixes"]):
        g["files"]["coreml"] = {**entry, "function": g["name"], "compute_units": "all"}
    rewrite(root, m)
    return m


def test_entries_of_one_target_share_a_package_as_functions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shared_bundle(tmp_path / "b")
    hashed: list[Path] = []
    real = bundle_mod.sha256_path
    monkeypatch.setattr(bundle_mod, "sha256_path", lambda p, *a: hashed.append(Path(p)) or real(p, *a))
    b = open_bundle(tmp_path / "b", targets=["coreml"])
    package = tmp_path / "b" / "coreml" / "model.mlpackage"
    assert hashed.count(package) == 1  # checked once for the three entries
    f = b.stages[1].files["coreml"]
    assert f.function == "stage1" and f.path == "coreml/model.mlpackage" and "function" not in f.extra
    assert f.extra["compute_units"] == "all" and b.prefixes[0].files["coreml"].function == "prefix0"
    assert b.file(b.stages[0], "coreml") == b.file(b.prefixes[0], "coreml") == package
    assert b.stages[0].files["onnx"].function is None


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m["stages"][1]["files"]["coreml"].pop("function"),
     r"stage1 \(coreml\) shares the path 'coreml/model.mlpackage' with stage0 \(coreml\) but names no 'function'"),
    (lambda m: m["prefixes"][0]["files"]["coreml"].update(function="stage0"),
     r"prefix0 \(coreml\) and stage0 \(coreml\) both name function 'stage0'"),
    (lambda m: m["stages"][1]["files"]["coreml"].update(sha256="0" * 64), "record different sha256 or bytes"),
    (lambda m: m["stages"][1]["files"]["coreml"].update(m["stages"][0]["files"]["onnx"], function="stage1"),
     r"stage1 \(coreml\) and stage0 \(onnx\) name the same file 'onnx/stage0.onnx'; only the entries of one target"),
    (lambda m: m["stages"][1]["files"]["coreml"].update(function=""), "at stages/1/files/coreml/function"),
    (lambda m: m.update(schema_version=1), r"stage1 \(coreml\) and stage0 \(coreml\) name the same file"),
])
def test_shared_paths_are_refused_unless_each_entry_names_its_function(tmp_path: Path, mutate: Any,
                                                                       message: str) -> None:
    m = write_shared_bundle(tmp_path / "b")
    mutate(m)
    rewrite(tmp_path / "b", m)
    with pytest.raises(BundleError, match=message) as info:
        open_bundle(tmp_path / "b", verify=False)
    assert "\n" not in str(info.value)


def test_a_tampered_package_is_refused(tmp_path: Path) -> None:
    write_shared_bundle(tmp_path / "b")
    w = tmp_path / "b" / "coreml" / "model.mlpackage" / "Data" / "weights" / "weight.bin"
    data = bytearray(w.read_bytes())
    data[7] ^= 0x10  # same size, other bytes
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"stage0 \(coreml\) file coreml/model.mlpackage has sha256"):
        open_bundle(tmp_path / "b")
    assert open_bundle(tmp_path / "b", targets=["onnx"]).targets == ("onnx", "coreml")  # not read: not checked
    write_shared_bundle(tmp_path / "c")
    (tmp_path / "c" / "coreml" / "model.mlpackage" / "Data" / "extra.bin").write_bytes(b"!")
    with pytest.raises(ChecksumError, match="has 139 bytes, the manifest records 138"):
        open_bundle(tmp_path / "c")


@pytest.mark.parametrize("link", ["file", "dir", "outside"])
def test_symlinks_inside_a_package_are_refused_not_followed(tmp_path: Path, link: str) -> None:
    m = write_shared_bundle(tmp_path / "b")
    pkg = tmp_path / "b" / "coreml" / "model.mlpackage"
    w = pkg / "Data" / "weights" / "weight.bin"
    (tmp_path / "elsewhere").mkdir()
    if link == "file":  # the same bytes through a link: the digest would match if links were followed
        real = pkg / "weight.real"
        os.replace(w, real)
        w.symlink_to(real)
        for g in (*m["stages"], *m["prefixes"]):  # the bytes the manifest counts stay the same
            g["files"]["coreml"]["bytes"] += real.stat().st_size
        rewrite(tmp_path / "b", m)
    elif link == "dir":
        (pkg / "Data" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    else:
        (pkg / "secret").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match=r"model.mlpackage holds a symbolic link '.*'; .*links are not followed"):
        open_bundle(tmp_path / "b")


def test_combine_rules_match_the_torch_contract() -> None:
    import torch

    from kdedge.models.stages import combine_torch

    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(6, 5)).astype(np.float32) * 3 for _ in range(3)]
    members = [1, 2, 4]
    for rule in ("mean_logits", "mean_probs", "last"):
        for k in range(1, 4):
            ours = combine(rule, logits[:k], members[:k])
            ref = combine_torch(rule, [torch.from_numpy(l) for l in logits[:k]], members[:k]).numpy()
            np.testing.assert_allclose(ours, ref, atol=1e-6)
            np.testing.assert_allclose(ours.sum(-1), 1.0, atol=1e-9)
    # the formulas of docs/bundle.md, written out
    np.testing.assert_allclose(combine("mean_logits", logits[:2], [1, 2]),
                               _softmax((logits[0] + logits[1]) / 3.0), atol=1e-9)
    np.testing.assert_allclose(combine("mean_probs", logits[:2], [1, 2]),
                               (_softmax(logits[0]) + _softmax(logits[1] / 2)) / 2, atol=1e-9)
    np.testing.assert_allclose(combine("last", logits[:2], [1, 2]), _softmax(logits[1] / 2), atol=1e-9)
    with pytest.raises(ValueError, match="unknown combine rule"):
        combine("vote", logits, members)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_reader_imports_without_torch(tmp_path: Path) -> None:
    write_bundle(tmp_path / "b")
    code = ("import sys; sys.modules['torch'] = None\n"  # any torch import now raises ImportError
            "from kdedge.bundle import open_bundle\n"
            f"b = open_bundle({str(tmp_path / 'b')!r}); print(len(b.stages))\n"
            "assert 'onnx' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2"


def test_input_info_drives_the_shared_preprocess(tmp_path: Path) -> None:
    from kdedge.bundle.inputs import preprocess

    write_bundle(tmp_path / "b")
    info = open_bundle(tmp_path / "b").input_info
    assert info.in_channels == 3 and info.input_size == (4, 4) and info.class_names == ("a", "b", "c", "d", "e")
    raw = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    x = preprocess(raw, info)
    expected = ((raw.astype(np.float32) / 255 - 0.5) / 0.25).transpose(0, 3, 1, 2)  # (raw * scale - mean) / std
    assert x.shape == (2, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-6)
