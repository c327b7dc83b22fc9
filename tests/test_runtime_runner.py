"""The runner against torch, its combine rules, batching, the bound fast path and thread safety."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_runtime import student_bundle, toy_bundle

import kdedge.bundle.combine as bundle_mod
from kdedge.models.stages import combine_torch, run_stages
from kdedge.runtime import COMBINE_RULES, ChecksumError, Fixed, Full, InputError, Runner, Running, combine, open_bundle


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return toy_bundle(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="module")
def runner(toy):
    with Runner(toy[0], threads=1) as r:
        yield r


def torch_probs(model, x: np.ndarray, rule: str, upto: int) -> np.ndarray:
    stages = model.stages()
    with torch.no_grad():
        outs = run_stages(stages, torch.from_numpy(x), upto=upto)
        logits = [o[s.spec.logits] for o, s in zip(outs, stages)]
        return combine_torch(rule, logits, [s.spec.members for s in stages[:upto]]).double().numpy()


def test_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "import kdedge.runtime, kdedge.runtime.runner, kdedge.runtime.policies, kdedge.profile.latency\n"
            "from kdedge.runtime import Runner, Deadline, Confidence, Fixed, load_inputs\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_runner_runs_a_bundle_without_torch(toy, tmp_path: Path) -> None:
    x = toy[2]["x"][:3]
    np.save(tmp_path / "x.npy", x)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import json, numpy as np; from kdedge.runtime import Runner\n"
            f"r = Runner({str(toy[0])!r}, threads=1)\n"
            f"res = r.run(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(json.dumps({'labels': res.labels.tolist(), 'stages': res.stage.tolist()}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    with Runner(toy[0], threads=1) as r:
        assert got == {"labels": r.run(x).labels.tolist(), "stages": [2, 2, 2]}


@pytest.mark.parametrize("rule", COMBINE_RULES)
def test_combine_matches_torch_and_bundle(rule: str) -> None:
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((5, 7)).astype(np.float32) * 3 for _ in range(3)]
    members = [1, 2, 4]
    ref = combine_torch(rule, [torch.from_numpy(l) for l in logits], members).double().numpy()
    np.testing.assert_allclose(combine(rule, logits, members), ref, atol=1e-6)
    np.testing.assert_allclose(bundle_mod.combine(rule, logits, members), ref, atol=1e-6)
    run = Running(rule)
    for k, (l, m) in enumerate(zip(logits, members)):
        run.add(l, m)
        np.testing.assert_allclose(run.probs(), combine(rule, logits[: k + 1], members[: k + 1]), atol=1e-12)
    assert run.members == 7 and run.stages == 3


def test_running_keeps_a_subset_and_rejects_bad_input() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    run = Running("mean_probs")
    run.add(a, 1)
    mask = np.array([True, False, True, False])
    run.keep(mask)
    run.add(b[mask], 1)
    np.testing.assert_allclose(run.probs(), combine("mean_probs", [a[mask], b[mask]], [1, 1]))
    with pytest.raises(ValueError, match="unknown combine rule"):
        Running("median")
    with pytest.raises(ValueError, match="no stage"):
        Running("last").probs()


@pytest.mark.parametrize("rule", COMBINE_RULES)
def test_full_policy_matches_torch(toy, rule: str) -> None:
    path, model, data = toy
    x = data["x"][:16]
    with Runner(path, threads=1, combine=rule) as r:
        res = r.run(x)
    np.testing.assert_allclose(res.probs, torch_probs(model, x, rule, 3), atol=2e-5)
    assert res.stage.tolist() == [2] * 16 and res.members.tolist() == [4] * 16
    assert res.graphs == ("stage0", "stage1", "stage2") and len(res.stage_ms) == 3
    assert res.budget_met.all() and res.aborted is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fixed_stages_and_fused_prefixes_match_torch(toy, runner: Runner, k: int) -> None:
    path, model, data = toy
    x = data["x"][:9]
    res = runner.run(x, Fixed(k, fused=False))
    assert res.graphs == tuple(f"stage{j}" for j in range(k))
    np.testing.assert_allclose(res.probs, torch_probs(model, x, "mean_logits", k), atol=2e-5)
    fused = runner.run(x, Fixed(k, fused=True))
    assert fused.graphs == (f"prefix{k - 1}",) and len(fused.stage_ms) == 1
    assert fused.stage.tolist() == [k - 1] * 9 and fused.members.tolist() == [[1, 3, 4][k - 1]] * 9
    np.testing.assert_allclose(fused.probs, res.probs, atol=2e-5)


def test_fixed_beyond_the_bundle_is_refused(runner: Runner) -> None:
    with pytest.raises(ValueError, match="more stages than the bundle has"):
        runner.run(np.zeros((1, 1, 8, 8), np.float32), Fixed(4))


def test_single_stage_student_bundle(tmp_path_factory: pytest.TempPathFactory) -> None:
    path, student = student_bundle(tmp_path_factory.mktemp("student"))
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    with Runner(path, threads=1) as r:
        assert r.combine == "last" and r.num_stages == 1 and r.num_prefixes == 0
        res = r.run(x, Fixed(1))  # no prefix: runs the stage
        with torch.no_grad():
            ref = torch.softmax(student(torch.from_numpy(x)), -1).double().numpy()
        np.testing.assert_allclose(res.probs, ref, atol=2e-5)
        with pytest.raises(ValueError, match="does not support combine rule"):
            Runner(path, combine="mean_logits")


def test_batches_of_every_size_and_bound_equals_unbound(toy) -> None:
    path, _, data = toy
    x = data["x"][:33]
    with Runner(path, threads=1) as fast, Runner(path, threads=1, bind=False) as slow:
        assert fast._stages_bindable and not slow._stages_bindable
        whole = fast.run(x)
        for n in (1, 2, 7, 33):
            a, b = fast.run(x[:n]), slow.run(x[:n])
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
            np.testing.assert_allclose(a.probs, whole.probs[:n], atol=1e-5)
        # the bound buffers are reused by the next call: earlier results must not change
        first = fast.run(x[:4]).probs.copy()
        kept = fast.run(x[:4])
        fast.run(x[4:8])
        np.testing.assert_array_equal(kept.probs, first)


def test_result_per_sample(runner: Runner, toy) -> None:
    x = toy[2]["x"][:3]
    res = runner.run(x)
    assert len(res) == 3 and [r.label for r in res] == res.labels.tolist()
    r0 = res[0]
    assert r0.class_name == runner.classes[r0.label] and r0.stage == 2 and r0.members == 4
    assert len(r0.stage_ms) == 3 and r0.total_ms >= sum(r0.stage_ms) and r0.budget_met
    assert abs(r0.confidence - r0.probs.max()) < 1e-12 and abs(r0.probs.sum() - 1) < 1e-9
    d = res.to_dict()
    assert d["graphs"] == ["stage0", "stage1", "stage2"] and len(d["results"]) == 3
    json.dumps(d)


@pytest.mark.parametrize("bad, needle", [
    (np.zeros((2, 1, 8, 8), np.float64), "dtype float64"),
    (np.zeros((2, 3, 8, 8), np.float32), "3 channel"),
    (np.zeros((2, 1, 9, 8), np.float32), "size 9x8"),
    (np.zeros((1, 8, 8), np.float32), "expects \\[N, 1, 8, 8\\]"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "NaN"),
    ([[0.0]], "numpy array"),
])
def test_bad_batches_are_refused(runner: Runner, bad, needle: str) -> None:
    with pytest.raises(InputError, match=needle):
        runner.run(bad)


def test_thread_safety_same_results_as_sequential(toy) -> None:
    path, _, data = toy
    x = data["x"][:40]
    with Runner(path, threads=1) as r:
        sizes = [1, 3, 8, 1, 5]
        chunks = [x[i: i + n] for i, n in zip(range(0, 40, 8), sizes)]
        policies = [Full(), Fixed(2), Fixed(1, fused=False), Full(), Fixed(3)]
        expected = [r.run(c, p).probs for c, p in zip(chunks, policies)]
        errors: list[BaseException] = []
        got: dict[tuple[int, int], np.ndarray] = {}

        def work(t: int) -> None:
            try:
                for rep in range(30):
                    i = (t + rep) % len(chunks)
                    got[(t, rep)] = r.run(chunks[i], policies[i]).probs
                    np.testing.assert_allclose(got[(t, rep)], expected[i], atol=1e-6)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        assert len(got) == 4 * 30


def test_evaluate_and_warmup(runner: Runner, toy) -> None:
    x, y = toy[2]["x"][:20], toy[2]["y"][:20]
    runner.warmup((1, 4), runs=1)
    out = runner.evaluate(x, y, Full(), batch=4)
    ref = (runner.run(x).labels == y).mean()
    assert out["n"] == 20 and abs(out["accuracy"] - ref) < 1e-12
    assert out["stage_counts"] == [0, 0, 20] and out["mean_stage"] == 2.0 and out["misses"] == 0
    assert out["latency_ms"]["p50"] > 0


def test_warmup_ends_with_a_full_collection_so_none_is_due_in_the_first_requests(runner: Runner) -> None:
    import gc

    full: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(seen)
    try:
        runner.warmup((1,), runs=1)
        counts = gc.get_count()
    finally:
        gc.callbacks.remove(seen)
    # one full collection at the end of the warm-up: no younger collection since has counted
    # towards the next one
    assert full and counts[2] == 0
    assert not gc.get_freeze_count() or runner.realtime is not None  # no freeze without --realtime


def test_tampered_bundle_and_closed_runner(toy, tmp_path: Path) -> None:
    import shutil

    dst = tmp_path / "t.kdedge"
    shutil.copytree(toy[0], dst)
    f = dst / "onnx" / "stage1.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        Runner(dst)
    r = Runner(toy[0], threads=1)
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.run(np.zeros((1, 1, 8, 8), np.float32))


def test_manifest_of_a_newer_schema_is_refused(toy, tmp_path: Path) -> None:
    import shutil

    dst = tmp_path / "new.kdedge"
    shutil.copytree(toy[0], dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["schema_version"] = 99
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="schema version 99"):
        Runner(dst)
    from kdedge.bundle.names import SCHEMA_VERSION

    assert open_bundle(toy[0]).schema_version == SCHEMA_VERSION == 2


def test_runner_agrees_with_export_evaluation(toy) -> None:
    from kdedge.export import evaluate_bundle

    path, _, data = toy
    x, y = data["x"][:150], data["y"][:150]
    ev = evaluate_bundle(path, x, y, threads=1)
    for rule in COMBINE_RULES:
        with Runner(path, threads=1, combine=rule) as r:
            for k in range(1, r.num_stages + 1):
                acc = float((r.run(x, Fixed(k, fused=False)).labels == y).mean())
                assert acc == pytest.approx(ev["stages"][k - 1][f"accuracy_{rule}"]), (rule, k)
    with Runner(path, threads=1) as r:
        for p in ev["prefixes"]:
            acc = float((r.run(x, Fixed(p["prefix"] + 1)).labels == y).mean())
            assert acc == pytest.approx(p["accuracy"])
