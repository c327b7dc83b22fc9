"""Bad input to latency profiles: every damaged, hand-edited, foreign or out-of-bounds input is
one clear line (a ``ProfileError``/``ValueError``; ``error: ...`` and exit 2 on the CLI), never a
traceback, never a policy that silently switches itself off. Profiles here are crafted JSON (the
measured numbers of the toy bundle with fields replaced), so nothing depends on timing.

Classes: (1) validation of profile files and dicts, and policies refusing non-finite costs;
(2) merging batches into the stored profile; (3) bounds on ``kdedge profile`` arguments and
``kdedge run --profile`` paths; (4) strict JSON out (no NaN, no zero latency).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers_runtime import toy_bundle
from kdedge.cli.main import app
from kdedge.io import loads_strict
from kdedge.profile.latency import (MAX_BATCH, MAX_RUNS, STATS, ForeignProfileError, InvalidProfileError,
                                    LatencyProfile, NewerProfileError, ProfileError, StaleProfileError,
                                    check_measure_args, max_threads, measure_profile, profile_bundle, store_profile,
                                    summarize, timer_resolution_ms)
from kdedge.bundle.profile.merge import merge_profiles
from kdedge.profile.meters import EnergyReading, Meter
from kdedge.runtime import Deadline, Runner
from kdedge.runtime.policies import Context, Energy

cli = CliRunner()
X = np.zeros((1, 1, 8, 8), np.float32)


def invoke(*args: Any):
    return cli.invoke(app, [str(a) for a in args])


def one_line_error(res, *needles: str, code: int = 2) -> None:
    """The CLI contract for bad input: exit ``code``, an ``error:`` line with every needle, and
    neither an internal error nor a traceback."""
    assert res.exit_code == code, res.output
    out = res.output
    assert "error:" in out and "internal error" not in out and "Traceback" not in out, out
    flat = " ".join(out.split())  # rich wraps long lines on narrow terminals
    for n in needles:
        assert n in flat, (n, out)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the toy bundle with a measured 1-thread profile at batch 1, its JSON and an input file."""
    src = toy_bundle(tmp_path_factory.mktemp("bundles"))[0]
    root = tmp_path_factory.mktemp("bad-profile")
    bundle = root / "toy.kdedge"
    shutil.copytree(src, bundle)
    prof, path, _ = profile_bundle(bundle, batches=(1,), runs=3, warmup=0, threads=1, plot=False)
    np.save(root / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    return {"bundle": bundle, "path": path, "data": json.loads(path.read_text()), "root": root,
            "npy": root / "x.npy"}


def crafted(data: dict[str, Any], latency: float = 1.0, energy: float | None = None) -> dict[str, Any]:
    """``data`` with every latency statistic set to ``latency`` (and energy to ``energy``)."""
    d = copy.deepcopy(data)
    for per in d["graphs"].values():
        for e in per.values():
            e["latency_ms"] = {**{s: latency for s in STATS}, "n": 3}
            if energy is not None:
                e["energy_mj"] = {"mean": energy, "n": 3}
    if energy is not None:
        d["energy"] = {"measured": True, "source": "fake", "period_s": 0.01, "note": "", "runs_per_window": 3,
                       "clamped": []}
    return d


def rebatched(d: dict[str, Any], batch: int) -> dict[str, Any]:
    """``d`` (measured at batch 1) as if it had been measured at ``batch``."""
    d = copy.deepcopy(d)
    d["batches"] = [batch]
    d["graphs"] = {g: {str(batch): per["1"]} for g, per in d["graphs"].items()}
    d["measured"] = {str(batch): d["measured"]["1"]}
    return d


def lat(d: dict[str, Any], graph: str = "stage1", batch: str = "1") -> dict[str, Any]:
    return d["graphs"][graph][batch]["latency_ms"]


def write(tmp: Path, data: Any, name: str = "p.json") -> Path:
    p = tmp / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


# ---------------------------------------------------------------------------------------------
# (1) validation: files and dicts


def _set(path: str, value: Any):
    def edit(d: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node = d
        for k in head:
            node = node[k]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


_DELETE = object()
_S1 = "graphs.stage1.1.latency_ms"

BAD_FIELDS = [
    (_set(f"{_S1}.p99", None), "stage1 batch 1 p99 must be a finite number > 0 (ms), got null"),
    (_set(f"{_S1}.p99", _DELETE), "stage1 batch 1 latency_ms lacks p99"),
    (_set(f"{_S1}.p99", -3), "stage1 batch 1 p99 must be a finite number > 0 (ms), got -3"),
    (_set(f"{_S1}.min", 0), "stage1 batch 1 min must be a finite number > 0 (ms), got 0"),
    (_set(f"{_S1}.median", "1.0"), 'stage1 batch 1 median must be a finite number > 0 (ms), got "1.0"'),
    (_set(f"{_S1}.max", True), "stage1 batch 1 max must be a finite number > 0 (ms), got true"),
    (_set(f"{_S1}.n", 0), "stage1 batch 1 latency_ms n must be an integer >= 1, got 0"),
    (_set(f"{_S1}.p999", 1.0), "stage1 batch 1 latency_ms: Additional properties are not allowed"),
    (_set(f"{_S1}.p90", 5.0), "stage1 batch 1 latency_ms is out of order: p90 5.0 > p95 1.0"),
    (_set(f"{_S1}.mean", 9.0), "stage1 batch 1 latency_ms mean 9.0 is outside"),
    (_set("graphs.stage1.1", {}), "stage1 batch 1: 'latency_ms' is a required property"),
    (_set("graphs.stage1.0", {}), 'stage1: key "0" is not a batch size'),
    (_set("graphs.stage1", {}), "stage1"),
    (_set("graphs.stageX", {"1": {}}), 'graphs: key "stageX" is not a graph name'),
    (_set("graphs", {}), "graphs"),
    (_set("batches", [1, 2]), "stage0 is measured at batches 1 but the profile lists batches 1, 2"),
    (_set("batches", [0]), "batches.0"),
    (_set("batches", []), "batches"),
    (_set("threads", 0), "threads"),
    (_set("threads", "1"), "threads"),
    (_set("device", ""), "device"),
    (_set("device", _DELETE), "'device' is a required property"),
    (_set("bundle.fingerprint", "abc"), "bundle.fingerprint"),
    (_set("bundle", _DELETE), "'bundle' is a required property"),
    (_set("version", "1"), "version must be a positive integer, got \"1\""),
    (_set("version", 0), "version must be a positive integer, got 0"),
    (_set("format", "kdedge-bundle"), "is not a kdedge latency profile"),
    (_set("measured", {"7": {"runs": 3, "warmup": 0}}), "measured names batches 7"),
]


@pytest.mark.parametrize("edit, needle", BAD_FIELDS)
def test_a_bad_field_is_one_line_naming_file_and_field(base, tmp_path: Path, edit, needle: str) -> None:
    d = crafted(base["data"])
    edit(d)
    p = write(tmp_path, d)
    with pytest.raises(InvalidProfileError) as e:
        LatencyProfile.load(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and needle in msg and "\n" not in msg, msg
    with pytest.raises(InvalidProfileError, match="profile "):  # the same dict built in memory
        LatencyProfile(d)


@pytest.mark.parametrize("value, shown", [(float("nan"), "NaN"), (float("inf"), "Infinity"),
                                          (-float("inf"), "-Infinity")])
def test_non_finite_statistics_in_memory(base, value: float, shown: str) -> None:
    """A dict can hold what JSON cannot; JSON Schema's range keywords let NaN through."""
    d = crafted(base["data"])
    lat(d)["p99"] = value
    with pytest.raises(InvalidProfileError) as e:
        LatencyProfile(d)
    assert f"stage1 batch 1 p99 must be a finite number > 0 (ms), got {shown}" in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ('{"format": "kdedge-profile", "x": NaN}', "not strict JSON: NaN is not a JSON number"),
    ('{"format": "kdedge-profile", "x": Infinity}', "not strict JSON: Infinity is not a JSON number"),
    ('{"format": "kdedge-profile", "format": "kdedge-profile"}', "duplicate key 'format'"),
    ("[" * 500 + "]" * 500, "nested deeper than"),
    ("", "not valid JSON"),
    ("[1, 2]", "is not a kdedge latency profile (a JSON object), got a list"),
])
def test_not_strict_json_is_refused(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ProfileError) as e:
        LatencyProfile.load(p)
    assert needle in str(e.value) and str(p) in str(e.value)


def test_not_utf8_and_newer_version(base, tmp_path: Path) -> None:
    p = tmp_path / "bin.json"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ProfileError, match="not UTF-8"):
        LatencyProfile.load(p)
    d = crafted(base["data"])
    d["version"] = 2
    d["graphs"] = "whatever version 2 holds"  # the version is judged first: the message says to upgrade
    with pytest.raises(NewerProfileError, match="version 2 profile.*upgrade kdedge"):
        LatencyProfile.load(write(tmp_path, d))


ENERGY_FIELDS = [
    (lambda d: d["graphs"]["stage1"]["1"]["energy_mj"].update(mean=-1.0),
     "stage1 batch 1 energy_mj mean must be a finite number >= 0 (mJ), got -1.0"),
    (lambda d: d["graphs"]["stage1"]["1"]["energy_mj"].update(mean=None), "energy_mj mean must be"),
    (lambda d: d["graphs"]["stage1"]["1"]["energy_mj"].update(mean=float("nan")), "got NaN"),
    (lambda d: d["graphs"]["stage1"]["1"]["energy_mj"].pop("n"), "energy_mj n must be an integer >= 1"),
    (lambda d: d["graphs"]["stage1"]["1"]["energy_mj"].update(p99=1.0), "Additional properties"),
    (lambda d: d.pop("energy"), "has energy_mj but the profile's energy section is missing"),
    (lambda d: d["energy"].update(measured=False), "says measured: false"),
    (lambda d: d["energy"].update(period_s=0), "energy period_s must be null or a finite number > 0"),
    (lambda d: d["energy"].update(period_s=float("inf")), "energy period_s"),
    (lambda d: d["energy"].update(clamped=["stage1"]), "energy.clamped.0"),
    (lambda d: d["energy"].update(clamped=["stage1@4"]), "energy clamped names stage1@4"),
    (lambda d: d["energy"].pop("measured"), "'measured' is a required property"),
]


@pytest.mark.parametrize("edit, needle", ENERGY_FIELDS)
def test_bad_energy_is_refused(base, edit, needle: str) -> None:
    d = crafted(base["data"], energy=1.0)
    LatencyProfile(copy.deepcopy(d))  # the crafted profile itself is valid
    edit(d)
    with pytest.raises(InvalidProfileError) as e:
        LatencyProfile(d)
    assert needle in str(e.value), str(e.value)


def test_energy_may_be_zero_and_measured_energy_needs_entries(base) -> None:
    """0 mJ is a stage whose energy difference was clamped: meaningful, accepted. A section
    that claims a measurement without any entry is refused."""
    assert LatencyProfile(crafted(base["data"], energy=0.0)).stat("stage1", 1, "mean", "energy_mj") == 0.0
    d = crafted(base["data"])
    d["energy"] = {"measured": True, "source": "fake", "period_s": None, "note": "", "runs_per_window": 3}
    with pytest.raises(InvalidProfileError, match="no graph has energy_mj"):
        LatencyProfile(d)


def test_profile_for_another_bundle_is_foreign(base, tmp_path: Path) -> None:
    d = crafted(base["data"])
    d["graphs"]["stage7"] = copy.deepcopy(d["graphs"]["stage0"])
    with Runner(base["bundle"], threads=1, profile=write(tmp_path, d, "more.json")) as r:
        with pytest.raises(ForeignProfileError, match="measures stage7, which bundle .* does not have.*another bundle"):
            r.profile  # noqa: B018
    d = crafted(base["data"])
    del d["graphs"]["stage2"]
    with Runner(base["bundle"], threads=1, profile=write(tmp_path, d, "fewer.json")) as r:
        with pytest.raises(ForeignProfileError, match="no measurements of stage2"):
            r.run(X, Deadline(5.0))
    d = crafted(base["data"])
    d["bundle"] = {**d["bundle"], "fingerprint": "a" * 64, "path": "/elsewhere/big.kdedge"}
    with Runner(base["bundle"], threads=1, profile=write(tmp_path, d, "other.json")) as r:
        with pytest.raises(StaleProfileError, match="or the profile is of the bundle at /elsewhere/big.kdedge"):
            r.profile  # noqa: B018
    with Runner(base["bundle"], threads=1, profile=42) as r:  # type: ignore[arg-type]
        with pytest.raises(ProfileError, match="profile= takes 'auto', a path or a LatencyProfile, got int"):
            r.profile  # noqa: B018


def test_prefixes_are_optional_but_asked_for_clearly(base) -> None:
    d = crafted(base["data"], latency=0.5)
    for j in range(3):
        del d["graphs"][f"prefix{j}"]
    with Runner(base["bundle"], threads=1, profile=LatencyProfile(d)) as r:
        assert r.run(X, Deadline(1000.0)).stage.tolist() == [2]
        with pytest.raises(ProfileError, match="no measurements of prefix2"):
            r.run(X, Deadline(1000.0, fused=True))


@pytest.mark.parametrize("cost", [float("nan"), float("inf"), -1.0, None, "1"])
def test_policies_refuse_a_non_finite_or_negative_cost(cost: Any) -> None:
    """A cost lookup that yields NaN made ``latency + margin > left`` False: the deadline went
    off. Now every lookup through ``Context.cost`` is checked."""
    ctx = Context(1, 3, 0.0, 1, 1, 0, None, lambda graph, batch, stat, metric: cost)
    with pytest.raises(ProfileError, match="stage1 at batch 1 a p99 latency_ms of .*finite number >= 0"):
        Deadline(0.001).decide(ctx)
    with pytest.raises(ProfileError, match="energy_mj of .*finite number >= 0"):
        Energy(5.0).decide(ctx)
    ok = Context(1, 3, 0.0, 1, 1, 0, None, lambda graph, batch, stat, metric: 0.0)
    assert Deadline(5.0).decide(ok).go is True  # zero is a cost a policy can plan with


def test_a_profile_damaged_after_loading_stops_the_request(base) -> None:
    """Even a profile whose dict is changed after validation cannot switch the deadline off."""
    prof = LatencyProfile(crafted(base["data"], latency=1.0))
    with Runner(base["bundle"], threads=1, profile=prof) as r:
        assert r.run(X, Deadline(1.05)).stage.tolist() == [0]  # 1 ms + 0.1 margin > 1.05 ms, however fast
        r.reload_profile()
        lat(prof.data)["p99"] = float("nan")  # NaN + margin > left is False: it would run every stage
        with pytest.raises(ProfileError, match="stage1 at batch 1 a p99 latency_ms of nan"):
            r.run(X, Deadline(1.05))


@pytest.mark.parametrize("make, needle", [
    (lambda: Deadline(5, latencies_ms=[1, float("nan"), 1]), "latencies_ms\\[1\\] must be a finite number >= 0"),
    (lambda: Deadline(5, latencies_ms=[1, -2, 1]), "latencies_ms\\[1\\]"),
    (lambda: Deadline(5, latencies_ms=[]), "latencies_ms is empty"),
    (lambda: Deadline(5, latencies_ms=[1, 1, 1], fused=True, prefix_latencies_ms=[float("inf")]),
     "prefix_latencies_ms\\[0\\]"),
    (lambda: Deadline(float("nan")), "positive number"),
    (lambda: Deadline(True), "positive number"),
    (lambda: Deadline(5, watchdog_min_ms=float("nan")), "watchdog_min_ms"),
    (lambda: Energy(5, energies_mj=[1, float("nan"), 1]), "energies_mj\\[1\\]"),
    (lambda: Energy(5, energies_mj="123"), "sequence of numbers"),
    (lambda: Energy(float("inf")), "positive number"),
])
def test_explicit_costs_are_checked_at_construction(make, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make()


@pytest.mark.parametrize("field, value, needle", [
    ("p99", None, "stage1 batch 1 p99 must be a finite number > 0 (ms), got null"),
    ("p99", -3, "stage1 batch 1 p99 must be a finite number > 0 (ms), got -3"),
    ("p99", "NaN", "not strict JSON: NaN is not a JSON number"),
])
def test_cli_run_with_a_bad_profile(base, tmp_path: Path, field: str, value: Any, needle: str) -> None:
    d = crafted(base["data"])
    lat(d)[field] = value
    text = json.dumps(d).replace('"NaN"', "NaN")
    p = write(tmp_path, text)
    res = invoke("run", base["bundle"], "--input", base["npy"], "--deadline-ms", "0.001", "--threads", "1",
                 "--profile", p)
    one_line_error(res, needle, p.name)


def test_cli_run_with_a_damaged_bundle_profile(base, tmp_path: Path) -> None:
    """The bundle's own profile (found by name, not passed) is validated the same way."""
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(base["bundle"], bundle)
    own = bundle / "profiles" / base["path"].name
    d = crafted(base["data"], energy=1.0)
    d["graphs"]["stage2"]["1"]["energy_mj"]["mean"] = -0.5
    own.write_text(json.dumps(d))
    res = invoke("run", bundle, "--input", base["npy"], "--energy-mj", "3", "--threads", "1")
    one_line_error(res, f"profiles/{own.name}: stage2 batch 1 energy_mj mean must be a finite number >= 0")


# ---------------------------------------------------------------------------------------------
# (2) merging batches into the stored profile


def _fresh(base, tmp_path: Path, name: str = "m.kdedge") -> Path:
    bundle = tmp_path / name
    shutil.copytree(base["bundle"], bundle)
    shutil.rmtree(bundle / "profiles")
    (bundle / "profiles").mkdir()
    return bundle


def test_measuring_another_batch_merges(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    notes: list[str] = []
    kw: dict[str, Any] = dict(warmup=0, threads=1, plot=False, report=notes.append)
    p1, path, _ = profile_bundle(bundle, batches=(1,), runs=2, **kw)
    first = json.loads(path.read_text())
    assert notes == [] and first["batches"] == [1]
    p2, path2, _ = profile_bundle(bundle, batches=(4,), runs=3, **kw)
    assert path2 == path and p2.batches == [1, 4] and notes[-1].endswith("added batch 4, kept batch 1")
    second = json.loads(path.read_text())
    for g in first["graphs"]:  # batch 1 kept as it was; batch 4 added (3 runs)
        assert second["graphs"][g]["1"] == first["graphs"][g]["1"]
        assert second["graphs"][g]["4"]["latency_ms"]["n"] == 3
    assert second["measured"]["1"]["runs"] == 2 and second["measured"]["4"]["runs"] == 3
    p3, _, _ = profile_bundle(bundle, batches=(4, 8), runs=4, **kw)
    third = json.loads(path.read_text())
    assert third["batches"] == [1, 4, 8] and "added batch 8, re-measured batch 4, kept batch 1" in notes[-1]
    assert third["graphs"]["stage0"]["1"] == first["graphs"]["stage0"]["1"]
    assert third["graphs"]["stage0"]["4"]["latency_ms"]["n"] == 4  # re-measured batches are replaced
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with Runner(bundle, threads=1) as r:  # the merged profile serves every batch
        assert r.profile.batches == [1, 4, 8]


def test_a_stale_stored_profile_is_replaced_with_a_message(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    notes: list[str] = []
    _, path, _ = profile_bundle(bundle, batches=(1, 2), runs=2, warmup=0, threads=1, plot=False)
    d = json.loads(path.read_text())
    d["bundle"]["fingerprint"] = "0" * 64  # as if the bundle had been re-exported since
    path.write_text(json.dumps(d))
    prof, _, _ = profile_bundle(bundle, batches=(4,), runs=2, warmup=0, threads=1, plot=False, report=notes.append)
    assert prof.batches == [4] and json.loads(path.read_text())["batches"] == [4]
    assert "replaced the stale profile" in notes[0] and "bundle changed" in notes[0] and "--batch 1,2" in notes[0]


def test_a_stored_profile_with_another_key_is_replaced(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    out = bundle / "profiles" / "x.json"
    old = crafted(base["data"])
    old["options"] = {"optimization": "basic", "providers": ["CPUExecutionProvider"]}
    out.write_text(json.dumps(old))
    new = rebatched(crafted(base["data"], latency=2.0), 4)
    notes: list[str] = []
    stored = store_profile(open_bundle_of(bundle), LatencyProfile(new), out, report=notes.append)
    assert stored.batches == [4] and "replaced" in notes[0] and "options" in notes[0]


def open_bundle_of(path: Path) -> Any:
    from kdedge.runtime import open_bundle

    return open_bundle(path)


def test_an_invalid_stored_profile_is_moved_aside_never_lost(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    _, path, _ = profile_bundle(bundle, batches=(1,), runs=1, warmup=0, threads=1, plot=False)
    path.write_text('{"format": "kdedge-profile", "version": 1, "graphs": NaN}')
    notes: list[str] = []
    prof, _, _ = profile_bundle(bundle, batches=(2,), runs=1, warmup=0, threads=1, plot=False, report=notes.append)
    aside = path.with_name(path.name + ".invalid")
    assert aside.read_text() == '{"format": "kdedge-profile", "version": 1, "graphs": NaN}'
    assert prof.batches == [2] and "not a usable profile" in notes[0] and aside.name in notes[0]
    path.write_text("{broken")  # a second one does not overwrite the first
    profile_bundle(bundle, batches=(2,), runs=1, warmup=0, threads=1, plot=False)
    assert aside.read_text().startswith('{"format"') and path.with_name(aside.name + ".1").read_text() == "{broken"


def test_a_newer_stored_profile_is_not_overwritten(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    _, path, _ = profile_bundle(bundle, batches=(1,), runs=1, warmup=0, threads=1, plot=False)
    text = json.dumps({**json.loads(path.read_text()), "version": 2})
    path.write_text(text)
    with pytest.raises(NewerProfileError, match="newer kdedge.*not overwritten"):
        profile_bundle(bundle, batches=(2,), runs=1, warmup=0, threads=1, plot=False)
    assert path.read_text() == text


def test_a_failed_write_keeps_the_stored_profile(base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _fresh(base, tmp_path)
    _, path, _ = profile_bundle(bundle, batches=(1,), runs=1, warmup=0, threads=1, plot=False)
    before = path.read_bytes()

    def full_disk(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        profile_bundle(bundle, batches=(2,), runs=1, warmup=0, threads=1, plot=False)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_concurrent_stores_keep_both_batches(base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs storing at once: read-merge-write is serialised by a lock on profiles/, so
    neither drops the other's batch (the slow merge widens the race window to certainty)."""
    import kdedge.bundle.profile.store as latency

    bundle = _fresh(base, tmp_path)
    b = open_bundle_of(bundle)
    out = bundle / "profiles" / "x.json"

    def at(batch: int) -> LatencyProfile:
        return LatencyProfile(rebatched(crafted(base["data"]), batch))

    real = latency.merge_profiles

    def slow_merge(*args: Any) -> Any:
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(latency, "merge_profiles", slow_merge)
    threads = [threading.Thread(target=store_profile, args=(b, at(n), out)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(out.read_text())["batches"] == [2, 3]


def test_merge_keeps_energy_of_the_same_meter_only(base) -> None:
    def at(batch: int, energy: float | None, source: str = "fake") -> dict[str, Any]:
        d = rebatched(crafted(base["data"], energy=energy), batch)
        if energy is not None:
            d["energy"]["source"] = source
            d["energy"]["clamped"] = [f"stage2@{batch}"]
        return d

    same, note = merge_profiles(at(1, 2.0), at(4, 5.0), "p.json")
    prof = LatencyProfile(same)  # the merge is a valid profile
    assert prof.stat("stage0", 1, "mean", "energy_mj") == 2.0 and prof.stat("stage0", 4, "mean", "energy_mj") == 5.0
    assert same["energy"]["clamped"] == ["stage2@1", "stage2@4"] and note == "p.json: added batch 4, kept batch 1"
    other, note = merge_profiles(at(1, 2.0, "rapl"), at(4, 5.0, "nvml"), "p.json")
    prof = LatencyProfile(other)
    assert "energy_mj" not in other["graphs"]["stage0"]["1"] and "latency_ms" in other["graphs"]["stage0"]["1"]
    assert other["energy"]["source"] == "nvml" and other["energy"]["clamped"] == ["stage2@4"]
    assert "energy of batch 1 (meter rapl) was dropped" in note
    assert prof.stat("stage0", 1, "mean", "energy_mj") == 5.0  # next larger batch with energy: an upper bound
    no_meter, note = merge_profiles(at(4, 2.0), at(1, None), "p.json")
    prof = LatencyProfile(no_meter)
    assert no_meter["energy"]["source"] == "fake" and "energy_mj" not in no_meter["graphs"]["stage0"]["1"]
    assert prof.stat("stage0", 1, "mean", "energy_mj") == 2.0


def test_cli_profile_merges_batches(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    args = ("--threads", "1", "--runs", "2", "--warmup", "0", "--no-plot", "--quiet")
    assert invoke("profile", bundle, *args).exit_code == 0
    res = invoke("profile", bundle, *args, "--batch", "3", "--json")
    assert res.exit_code == 0, res.output
    out = loads_strict(res.stdout)
    assert out["batches"] == [1, 3] and "added batch 3, kept batch 1" in " ".join(res.stderr.split())
    stored = loads_strict(Path(out["path"]).read_text())
    assert stored["batches"] == [1, 3] and set(stored["graphs"]["stage0"]) == {"1", "3"}


# ---------------------------------------------------------------------------------------------
# (3) argument bounds


@pytest.mark.parametrize("args, needle", [
    (("--batch", "0"), "--batch takes comma-separated integers from 1 to"),
    (("--batch", "-1"), "--batch takes"),
    (("--batch", "abc"), "got 'abc'"),
    (("--batch", "1,,x"), "got '1,,x'"),
    (("--batch", "1e3"), "got '1e3'"),
    (("--batch", "+3"), "got '+3'"),
    (("--batch", "1,,2"), "got '1,,2'"),
    (("--batch", "1,"), "got '1,'"),
    (("--batch", str(MAX_BATCH + 1)), f"from 1 to {MAX_BATCH}"),
    (("--batch", "9" * 40), "--batch takes"),
    (("--runs", "0"), "--runs must be from 1 to"),
    (("--runs", str(MAX_RUNS + 1)), f"--runs must be from 1 to {MAX_RUNS}"),
    (("--runs", "9" * 30), "--runs must be"),
    (("--warmup", "-1"), "--warmup must be from 0 to"),
    (("--warmup", str(MAX_RUNS + 1)), "--warmup must be"),
    (("--threads", "0"), "--threads must be an integer from 1 to"),
    (("--threads", "-1"), "--threads takes a thread count or comma-separated counts"),
    (("--threads", "1,x"), "--threads takes a thread count or comma-separated counts"),
    (("--threads", str(max_threads() + 1)), f"--threads must be an integer from 1 to {max_threads()}"),
    (("--meter", "none", "--meter-period-ms", "nan"), "--meter-period-ms must be"),
    (("--meter", "none", "--meter-period-ms", "inf"), "--meter-period-ms must be"),
    (("--meter", "none", "--meter-period-ms", "0"), "--meter-period-ms must be"),
    (("--meter", "none", "--meter-period-ms", "1e9"), "--meter-period-ms must be"),
])
def test_cli_profile_arguments_out_of_bounds(base, args: tuple[str, ...], needle: str) -> None:
    before = sorted((base["bundle"] / "profiles").iterdir())
    res = invoke("profile", base["bundle"], *args, "--no-plot", "--quiet")
    one_line_error(res, needle)
    assert sorted((base["bundle"] / "profiles").iterdir()) == before  # nothing measured, nothing written


def test_cli_profile_argument_of_the_wrong_type(base) -> None:
    res = invoke("profile", base["bundle"], "--runs", "abc")
    assert res.exit_code == 2 and "Traceback" not in res.output and "internal error" not in res.output


@pytest.mark.parametrize("kwargs, needle", [
    (dict(batches=(0,)), "batch sizes must be integers from 1 to"),
    (dict(batches=()), "batch sizes must be"),
    (dict(batches=(1.5,)), "batch sizes must be"),
    (dict(batches=(True,)), "batch sizes must be"),
    (dict(runs=0), "need runs >= 1"),
    (dict(runs=MAX_RUNS + 1), "need runs >= 1"),
    (dict(warmup=-1), "need warmup >= 0"),
    (dict(threads=0), "threads must be an integer from 1 to"),
    (dict(threads=max_threads() + 1), f"from 1 to {max_threads()}"),
])
def test_api_measure_arguments_out_of_bounds(base, kwargs: dict[str, Any], needle: str) -> None:
    full: dict[str, Any] = dict(batches=(1,), runs=1, warmup=0, threads=1) | kwargs
    with pytest.raises(ValueError, match=needle):
        measure_profile(base["bundle"], **full)


def test_threads_bound_is_four_times_the_cpus() -> None:
    assert max_threads() == 4 * (os.cpu_count() or 1)
    assert check_measure_args([3, 1, 3], 1, 0, max_threads()) == [1, 3]


def test_api_input_too_large_for_memory(base, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdedge.profile.latency as latency

    monkeypatch.setattr(latency, "MAX_INPUT_BYTES", 1024)
    with pytest.raises(ValueError, match="batch 8 of inputs .* GiB of float32 input.*smaller --batch"):
        measure_profile(base["bundle"], batches=(8,), runs=1, warmup=0, threads=1)


@pytest.mark.parametrize("kind", ["directory", "empty", "not-json", "binary", "other-bundle", "missing"])
def test_cli_run_profile_paths(base, tmp_path: Path, kind: str) -> None:
    p = tmp_path / "prof.json"
    needle = {"directory": "not a regular file", "empty": "not valid JSON", "not-json": "not valid JSON",
              "binary": "not UTF-8", "other-bundle": "belongs to another bundle", "missing": "does not exist"}[kind]
    if kind == "directory":
        p.mkdir()
    elif kind == "empty":
        p.write_text("")
    elif kind == "not-json":
        p.write_text("stage0: 1 ms\n")
    elif kind == "binary":
        p.write_bytes(bytes(range(128, 256)))
    elif kind == "other-bundle":
        d = crafted(base["data"])
        d["graphs"] = {f"stage{k}": d["graphs"]["stage0"] for k in range(6)}
        p.write_text(json.dumps(d))
    res = invoke("run", base["bundle"], "--input", base["npy"], "--deadline-ms", "1", "--threads", "1",
                 "--profile", p)
    one_line_error(res, needle)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_cli_run_profile_fifo_does_not_hang(base, tmp_path: Path) -> None:
    """A FIFO would block ``open`` until a writer comes: it is refused before it is opened (a
    subprocess with a timeout, so that a regression fails instead of hanging the suite)."""
    fifo = tmp_path / "prof.json"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "kdedge.cli.main", "run", str(base["bundle"]), "--input", str(base["npy"]),
           "--deadline-ms", "1", "--threads", "1", "--profile", str(fifo)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200", "KDEDGE_DEBUG": ""})
    assert res.returncode == 2, res.stderr
    assert "not a regular file" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_in_place_of_the_bundles_own_profile_is_named_not_called_missing(base, tmp_path: Path) -> None:
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(base["bundle"], bundle)
    own = bundle / "profiles" / base["path"].name
    own.unlink()
    os.mkfifo(own)
    cmd = [sys.executable, "-m", "kdedge.cli.main", "run", str(bundle), "--input", str(base["npy"]),
           "--deadline-ms", "1", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200", "KDEDGE_DEBUG": ""})
    assert res.returncode == 2, res.stderr
    assert "not a regular file" in res.stderr and "no latency profile" not in res.stderr
    assert "Traceback" not in res.stderr


def test_a_profiles_folder_that_links_elsewhere_is_neither_written_nor_read(base, tmp_path: Path) -> None:
    """``kdedge profile`` wrote through a linked ``profiles/`` to wherever it pointed."""
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(base["bundle"], bundle)
    elsewhere = tmp_path / "elsewhere"
    shutil.move(bundle / "profiles", elsewhere)
    (bundle / "profiles").symlink_to(elsewhere, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    res = invoke("profile", bundle, "--batch", "2", "--runs", "3", "--warmup", "0", "--threads", "1", "--no-plot")
    one_line_error(res, "profiles is a symbolic link", "only inside the bundle")
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    res = invoke("run", bundle, "--input", base["npy"], "--deadline-ms", "1", "--threads", "1")
    one_line_error(res, "profiles is a symbolic link")
    # a file where the folder should be
    (bundle / "profiles").unlink()
    (bundle / "profiles").write_text("x")
    res = invoke("profile", bundle, "--batch", "2", "--runs", "3", "--warmup", "0", "--threads", "1", "--no-plot")
    one_line_error(res, "profiles is a regular file, not a directory")


# ---------------------------------------------------------------------------------------------
# (4) strict JSON out


def test_profile_json_is_strict_and_positive(base, tmp_path: Path) -> None:
    bundle = _fresh(base, tmp_path)
    res = invoke("profile", bundle, "--threads", "1", "--runs", "2", "--warmup", "0", "--no-plot", "--json")
    assert res.exit_code == 0, res.output
    for doc in (loads_strict(res.stdout), loads_strict(Path(loads_strict(res.stdout)["path"]).read_text())):
        for per in doc["graphs"].values():
            for e in per.values():
                assert all(e["latency_ms"][s] > 0 for s in STATS)


def test_a_clock_that_does_not_move_gives_the_timer_resolution(base, tmp_path: Path) -> None:
    """0.0 ms at timer resolution is recorded as the resolution: every statistic stays > 0 and
    the profile is valid (a frozen clock is the extreme of a coarse one)."""
    bundle = _fresh(base, tmp_path)
    prof = measure_profile(bundle, batches=(1,), runs=3, warmup=0, threads=1, clock=lambda: 0.0)
    res = timer_resolution_ms()
    assert {prof.stat(g, 1, s) for g in prof.graphs for s in STATS} == {res}
    stored = store_profile(open_bundle_of(bundle), prof)
    assert loads_strict(stored.path.read_text())["graphs"]["stage0"]["1"]["latency_ms"]["max"] == res


@pytest.mark.parametrize("samples", [[1.0, float("nan")], [1.0, float("inf")], [-0.5, 1.0]])
def test_summarize_refuses_a_broken_clock(samples: list[float]) -> None:
    with pytest.raises(ValueError, match="non-finite or negative"):
        summarize(samples)


class BrokenMeter(Meter):
    """A meter whose every window reads ``joules`` (NaN: a broken sensor; < 0: a counter wrap)."""

    name = "broken"

    def __init__(self, joules: float) -> None:
        self.joules = joules

    def probe(self) -> str:
        return "broken"

    def start(self) -> None:
        pass

    def stop(self) -> EnergyReading:
        return EnergyReading(joules=self.joules, mean_watts=self.joules, seconds=1.0, samples=2, period_s=0.01,
                             source=self.name)


@pytest.mark.parametrize("joules", [float("nan"), float("inf"), -1e-3])
def test_a_broken_meter_reading_is_refused_and_nothing_is_written(base, tmp_path: Path, joules: float) -> None:
    bundle = _fresh(base, tmp_path)
    with pytest.raises(ValueError, match=r"power meter broken read .* J over the window of stages 0\.\.0.*finite"):
        profile_bundle(bundle, batches=(1,), runs=1, warmup=0, threads=1, plot=False, meter=BrokenMeter(joules))
    assert list((bundle / "profiles").iterdir()) == []


def test_to_json_is_strict(base) -> None:
    text = LatencyProfile(crafted(base["data"], energy=0.0)).to_json()
    assert loads_strict(text)["format"] == "kdedge-profile"
