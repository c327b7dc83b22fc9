"""Carried tensors in onnxruntime's blocked (NCHWc) layout (kdedge/targets/ort_blocked.py): the
stage graphs as onnxruntime optimises them here, minus the layout conversions at the tensors one
stage hands to the next; the answers must be exactly those of the bundle's graphs."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from kdedge.runtime import Confidence, Fixed, Full, Runner  # noqa: E402
from kdedge.targets import onnxruntime as ort_target  # noqa: E402
from kdedge.targets.ort_blocked import CarriedTensor, _Graph, block_carried  # noqa: E402
from kdedge.targets.ort_session import OrtOptions  # noqa: E402


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDEDGE_ORT_BLOCKED", "1")


def test_it_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdedge.targets.ort_blocked import blocked_carry_enabled

    assert blocked_carry_enabled()
    monkeypatch.delenv("KDEDGE_ORT_BLOCKED")
    assert not blocked_carry_enabled()
    monkeypatch.setenv("KDEDGE_ORT_BLOCKED", "0")
    assert not blocked_carry_enabled()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, np.ndarray]:
    from helpers_anytime import ToyTree, digits_data
    from kdedge.export import export

    _, _, xv, yv, info = digits_data()
    torch.manual_seed(0)
    model = ToyTree().eval()
    path = export(model, tmp_path_factory.mktemp("blocked") / "tree.kdedge", info=info, val_data=(xv[:64], yv[:64]),
                  exporter="legacy")
    return path, model, xv[:40].astype(np.float32)


def _optimised(path: Path, tmp: Path) -> list[bytes]:
    import onnxruntime as ort

    out = []
    for name in ("stage0", "stage1"):
        so = OrtOptions(threads=1).session_options()
        so.optimized_model_filepath = str(tmp / f"{name}.onnx")
        ort.InferenceSession(str(path / "onnx" / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        out.append(Path(so.optimized_model_filepath).read_bytes())
    return out


def test_the_wire_level_edit_copies_an_untouched_model_byte_for_byte(tree: Any, tmp_path: Path) -> None:
    for model in _optimised(tree[0], tmp_path):
        g = _Graph(model)
        assert g.nodes and any(n.op_type == "Conv" for n in g.nodes)
        for n in g.nodes:
            n.changed = True  # every node written out again from its parsed fields
        assert g.serialise() == model


def test_the_carried_feature_map_loses_its_two_conversions(tree: Any, tmp_path: Path) -> None:
    models = _optimised(tree[0], tmp_path)
    before = [[n.op_type for n in _Graph(m).nodes] for m in models]
    assert "ReorderOutput" in before[0] and before[1][0] == "ReorderInput"
    edited, names = block_carried(models, [CarriedTensor("stage0__f", 0, (1,), (None, 16, 8, 8))])
    assert names == ("stage0__f",) and sorted(edited) == [0, 1]
    after = [[n.op_type for n in _Graph(edited[k]).nodes if n is not None] for k in (0, 1)]
    assert after[0].count("ReorderOutput") == before[0].count("ReorderOutput") - 1
    assert after[1].count("ReorderInput") == before[1].count("ReorderInput") - 1
    out0 = [n.outputs for n in _Graph(edited[0]).nodes if n is not None]
    assert any("stage0__f" in o for o in out0)  # the blocked convolution now writes the carried tensor


def test_a_tensor_that_is_not_a_multiple_of_the_block_or_read_otherwise_is_left_alone(tree: Any,
                                                                                      tmp_path: Path) -> None:
    models = _optimised(tree[0], tmp_path)
    assert block_carried(models, [CarriedTensor("stage0__f", 0, (1,), (None, 24, 8, 8))]) == ({}, ())
    assert block_carried(models, [CarriedTensor("stage0__f", 0, (), (None, 16, 8, 8))]) == ({}, ())
    # the toy bundle's f0 is also read by its own stage's pooling: it stays NCHW
    from helpers_runtime import toy_bundle

    with Runner(toy_bundle(tmp_path)[0]) as r:
        assert all(s.blocked == () for s in r.sessions)


def test_the_runner_answers_exactly_as_with_the_bundles_graphs(tree: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path, model, x = tree
    with Runner(path) as blocked:
        assert [s.blocked for s in blocked.sessions] == [("stage0__f",), ("stage0__f",)]
        monkeypatch.setenv("KDEDGE_ORT_BLOCKED", "0")
        with Runner(path) as plain:
            assert all(s.blocked == () for s in plain.sessions)
            # untrained: a threshold at the median stage-0 confidence lets half the samples leave there
            median = float(np.median(plain.run(x, Fixed(1, fused=False)).probs.max(1)))
            for policy in (Full(), Fixed(1, fused=False), Confidence(median)):
                for n in (1, 7, 40):
                    a, b = blocked.run(x[:n], policy), plain.run(x[:n], policy)
                    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.stage, b.stage)
            mixed = blocked.run(x, Confidence(median)).stage
            assert 0 < int((mixed == 0).sum()) < len(x), "the check needs samples leaving at both stages"
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    ref = torch.softmax((logits[0] + logits[1]) / 2, 1).numpy()
    assert np.allclose(Runner(path).run(x, Full()).probs, ref, atol=1e-4)


def test_other_optimisation_levels_and_providers_run_the_bundles_graphs(tree: Any) -> None:
    with Runner(tree[0], optimization="extended") as r:
        assert all(s.blocked == () for s in r.sessions)
    assert not ort_target._blockable(OrtOptions(providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    assert ort_target._blockable(OrtOptions(threads=2, shared_pool=False))


def test_an_edit_that_answers_differently_is_not_used(tree: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort_target, "_same_logits", lambda *a: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Runner(tree[0]) as r:
            assert all(s.blocked == () for s in r.sessions)
            r.run(tree[2][:3], Full())
    assert any("answered differently" in str(w.message) for w in caught)


def test_the_check_at_open_sees_a_stage_that_differs(tree: Any) -> None:
    with Runner(tree[0]) as r:
        entries, sessions = r.entries, r.sessions
        assert ort_target._same_logits(entries, sessions, dict(enumerate(sessions)), r.bundle.input_shape)

        class Off:
            def run(self, feeds: Any, abort: Any = None) -> dict[str, np.ndarray]:
                out = sessions[1].run(feeds)
                return {k: v + np.float32(1e-3) for k, v in out.items()}

        assert not ort_target._same_logits(entries, sessions, {0: sessions[0], 1: Off()}, r.bundle.input_shape)
