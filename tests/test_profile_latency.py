"""Latency profiles: measure, write atomically into the bundle, read back, refuse stale/foreign ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_runtime import toy_bundle
from kdedge.profile.latency import (CHAIN, STATS, ForeignProfileError, LatencyProfile, MissingProfileError,
                                    ProfileError, StaleProfileError, current_key, format_table, profile_bundle,
                                    profile_filename, summarize)
from kdedge.runtime import Deadline, Runner, open_bundle


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory):
    """A copy of the toy bundle with a 1-thread profile at batch 1 and 3."""
    src = toy_bundle(tmp_path_factory.mktemp("bundles"))[0]
    dst = tmp_path_factory.mktemp("profiled") / "toy.kdedge"
    shutil.copytree(src, dst)
    prof, path, png = profile_bundle(dst, batches=(1, 3), runs=8, warmup=2, threads=1)
    return dst, prof, path, png


def test_summarize() -> None:
    s = summarize(list(range(1, 101)))
    assert (s["min"], s["max"], s["median"], s["n"]) == (1, 100, 50.5, 100)
    assert (s["p90"], s["p95"], s["p99"]) == (90, 95, 99) and s["mean"] == pytest.approx(50.5)
    assert set(STATS) <= set(s)
    with pytest.raises(ValueError):
        summarize([])


def test_profile_is_written_into_the_bundle(profiled) -> None:
    dst, prof, path, png = profiled
    device, setting, _ = current_key(1)
    assert path == dst / "profiles" / profile_filename(device, setting) and path.is_file()
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    data = json.loads(path.read_text())
    assert data["device"] == device and data["setting"] == setting and data["threads"] == 1
    assert data["batches"] == [1, 3] and data["runs"] == 8 and data["warmup"] == 2
    assert sorted(data["graphs"]) == sorted(["stage0", "stage1", "stage2", "prefix0", "prefix1", "prefix2", CHAIN])
    for g in data["graphs"].values():
        for n in ("1", "3"):
            s = g[n]["latency_ms"]
            assert s["n"] == 8 and s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]
    rows = format_table(prof)
    assert [r["graph"] for r in rows[:6]] == ["stage0", "stage0", "stage1", "stage1", "stage2", "stage2"]
    assert rows[-1]["graph"] == CHAIN
    # profiles are not checksummed stage files: the bundle still verifies
    assert open_bundle(dst).stages[0].name == "stage0"


def test_deadline_uses_the_matching_profile(profiled) -> None:
    dst = profiled[0]
    with Runner(dst, threads=1) as r:
        assert r.profile.path == profiled[2]
        x = np.zeros((1, 1, 8, 8), np.float32)
        r.warmup((1,))
        assert r.run(x, Deadline(1000.0)).stage.tolist() == [2]
        assert r.run(x, Deadline(1e-6)).stage.tolist() == [0]


def test_no_profile_for_this_setting_says_what_to_run(profiled) -> None:
    with Runner(profiled[0], threads=2) as r:
        with pytest.raises(MissingProfileError) as e:
            r.run(np.zeros((1, 1, 8, 8), np.float32), Deadline(5.0))
    msg = str(e.value)
    assert "kdedge profile" in msg and "--threads 2" in msg and profiled[2].stem in msg


def _edited(profiled, tmp_path: Path, **changes) -> Path:
    data = json.loads(profiled[2].read_text())
    for k, v in changes.items():
        if k == "fingerprint":
            data["bundle"]["fingerprint"] = v
        else:
            data[k] = v
    p = tmp_path / "edited.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("changes, error, needle", [
    ({"fingerprint": "0" * 64}, StaleProfileError, "stale"),
    ({"device": "nvidia-jetson-orin-nano"}, ForeignProfileError, "measured on device 'nvidia-jetson-orin-nano'"),
    ({"setting": "cpu-8t-performance"}, ForeignProfileError, "setting 'cpu-8t-performance'"),
    ({"target": "tensorrt"}, ForeignProfileError, "target 'tensorrt'"),
    ({"options": {"optimization": "disable", "providers": ["CPUExecutionProvider"]}}, ForeignProfileError,
     "graph optimisation 'disable', the runner's sessions use 'all'"),
    ({"version": 7}, ProfileError, "version 7 profile"),
    ({"format": "other"}, ProfileError, "not a kdedge latency profile"),
])
def test_stale_foreign_and_newer_profiles_are_refused(profiled, tmp_path: Path, changes, error, needle) -> None:
    p = _edited(profiled, tmp_path, **changes)
    with Runner(profiled[0], threads=1, profile=p) as r:
        with pytest.raises(error, match=needle):
            r.run(np.zeros((1, 1, 8, 8), np.float32), Deadline(5.0))


def test_a_profile_of_another_optimisation_level_serves_a_runner_of_that_level(profiled, tmp_path: Path) -> None:
    p = _edited(profiled, tmp_path, options={"optimization": "basic", "providers": ["CPUExecutionProvider"]})
    with Runner(profiled[0], threads=1, profile=p, optimization="basic") as r:
        assert r.run(np.zeros((1, 1, 8, 8), np.float32), Deadline(1000.0)).stage.tolist() == [2]
    with Runner(profiled[0], threads=1, profile=p, optimization="extended") as r:
        with pytest.raises(ForeignProfileError, match="run `kdedge profile .* --optimization extended"):
            r.profile  # noqa: B018


def test_a_foreign_profile_under_this_devices_name_is_refused(profiled, tmp_path: Path) -> None:
    dst = tmp_path / "copy.kdedge"
    shutil.copytree(profiled[0], dst)
    data = json.loads(profiled[2].read_text())
    data["device"] = "someone-elses-board"
    (dst / "profiles" / profiled[2].name).write_text(json.dumps(data))
    with Runner(dst, threads=1) as r:
        with pytest.raises(ForeignProfileError, match="another device"):
            r.profile  # noqa: B018


def test_stat_picks_the_batch_and_reports_missing_metrics(profiled) -> None:
    prof = LatencyProfile.load(profiled[2])
    g = prof.data["graphs"]["stage1"]
    assert prof.stat("stage1", 1, "p99") == g["1"]["latency_ms"]["p99"]
    assert prof.stat("stage1", 2, "median") == g["3"]["latency_ms"]["median"]  # next larger measured batch
    assert prof.stat("stage1", 6, "max") == pytest.approx(2 * g["3"]["latency_ms"]["max"])  # scaled beyond
    with pytest.raises(ProfileError, match="no energy_mj measurements"):
        prof.stat("stage1", 1, "mean", metric="energy_mj")
    with pytest.raises(ProfileError, match="no measurements of stage9"):
        prof.stat("stage9", 1)
    with pytest.raises(ProfileError, match="unknown statistic"):
        prof.stat("stage1", 1, "p42")


def test_unreadable_profile_files(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read latency profile"):
        LatencyProfile.load(tmp_path / "p.json")
    with pytest.raises(MissingProfileError, match="does not exist"):
        LatencyProfile.load(tmp_path / "none.json")


def test_a_new_batch_is_merged_into_the_stored_profile(profiled, tmp_path: Path) -> None:
    """``kdedge profile --batch 2`` after ``--batch 1,3``: one profile with 1, 2 and 3, batch 1
    and 3 exactly as they were."""
    dst = tmp_path / "copy.kdedge"
    shutil.copytree(profiled[0], dst)
    path = dst / "profiles" / profiled[2].name
    before = json.loads(path.read_text())
    notes: list[str] = []
    prof, path2, _ = profile_bundle(dst, batches=(2,), runs=2, warmup=0, threads=1, plot=False, report=notes.append)
    after = json.loads(path.read_text())
    assert path2 == path and prof.batches == after["batches"] == [1, 2, 3]
    for g, per in before["graphs"].items():
        assert after["graphs"][g]["1"] == per["1"] and after["graphs"][g]["3"] == per["3"]
        assert after["graphs"][g]["2"]["latency_ms"]["n"] == 2
    assert notes == [f"{path}: added batch 2, kept batch 1, 3"]


def test_profile_files_are_validated_on_load(profiled, tmp_path: Path) -> None:
    data = json.loads(profiled[2].read_text())
    data["graphs"]["stage1"]["3"]["latency_ms"]["p99"] = None
    p = tmp_path / "x.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"x.json: stage1 batch 3 p99 must be a finite number > 0 \(ms\), got null"):
        LatencyProfile.load(p)


def test_idle_ms_sleeps_before_every_timed_call_and_is_recorded(profiled, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``kdedge profile --idle-ms 33``: every timed chain and prefix call comes after that much
    idle time (warm-up calls do not), and the batch's ``measured`` record says so."""
    import kdedge.profile.latency as lat

    dst = tmp_path / "copy.kdedge"
    shutil.copytree(profiled[0], dst)
    slept: list[float] = []
    monkeypatch.setattr(lat.time, "sleep", slept.append)
    prof, path, _ = profile_bundle(dst, batches=(2,), runs=3, warmup=2, threads=1, plot=False, idle_ms=33)
    assert slept == [0.033] * (3 * (1 + 3))  # 3 rounds of the chain and the 3 prefixes
    data = json.loads(path.read_text())
    assert data["measured"]["2"]["idle_ms"] == 33.0
    assert "idle_ms" not in data["measured"]["1"]  # the kept batches were measured back to back
    LatencyProfile(data)  # valid under the schema
    for bad in (-1, 10_001, float("nan"), True, "33"):
        with pytest.raises(ValueError, match="idle time before each measured call"):
            lat.check_idle_ms(bad)


def test_cli_idle_ms_is_checked_before_measuring(profiled, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KDEDGE_DEBUG", None)
    res = subprocess.run([sys.executable, "-m", "kdedge.cli.main", "profile", str(profiled[0]), "--idle-ms", "-5",
                          "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().startswith("error: the idle time before each measured call must be")
