"""The energy policy (``Energy``, ``kdedge run --energy-mj``) and the runner that follows the
power mode (one profile per mode, switched between requests). Profiles are synthetic: a
measured profile of the toy bundle with its numbers replaced."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers_runtime import toy_bundle
from kdedge.cli.main import app
from kdedge.profile.latency import LatencyProfile, ProfileError, current_key, profile_bundle, profile_filename
from kdedge.runtime import AllOf, Confidence, Deadline, Runner
from kdedge.runtime.policies import Energy, make_policy


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, np.ndarray]:
    """A copy of the toy bundle, a measured 1-thread profile of it (batch 1) and inputs."""
    src, _, data = toy_bundle(tmp_path_factory.mktemp("bundles"))
    dst = tmp_path_factory.mktemp("energy") / "toy.kdedge"
    shutil.copytree(src, dst)
    prof, path, _ = profile_bundle(dst, batches=(1,), runs=2, warmup=0, threads=1, plot=False)
    return dst, prof.data, np.asarray(data["x"][:3], dtype=np.float32)


def synthetic(data: dict, setting: str | None = None, latency: list[float] | None = None,
              energy: list[float] | None = None) -> dict:
    d = copy.deepcopy(data)
    if setting is not None:
        d["setting"] = setting
    for k in range(3):
        e = d["graphs"][f"stage{k}"]["1"]
        if latency is not None:
            e["latency_ms"] = {s: latency[k] for s in ("min", "mean", "median", "p90", "p95", "p99", "max")} | {"n": 2}
        if energy is not None:
            e["energy_mj"] = {"mean": energy[k], "n": 2}
    if energy is not None:
        d["energy"] = {"measured": True, "source": "fake", "period_s": 0.01, "note": "", "runs_per_window": 2,
                       "clamped": []}
    return d


@pytest.mark.parametrize("budget, stage", [(0.5, 0), (2.9, 0), (3.0, 1), (5.9, 1), (6.0, 2), (100, 2)])
def test_energy_policy_stops_within_the_budget(base, budget: float, stage: int) -> None:
    bundle, data, x = base
    prof = LatencyProfile(synthetic(data, energy=[1.0, 2.0, 3.0]))
    with Runner(bundle, threads=1, profile=prof) as r:
        res = r.run(x[:1], Energy(budget))
    assert res[0].stage == stage


def test_energy_policy_margin_and_explicit_energies(base) -> None:
    bundle, data, x = base
    with Runner(bundle, threads=1, profile=None) as r:
        assert r.run(x[:1], Energy(6.0, energies_mj=[1, 2, 3]))[0].stage == 2
        assert r.run(x[:1], Energy(6.0, margin_mj=0.5, energies_mj=[1, 2, 3]))[0].stage == 1
        with pytest.raises(ValueError, match="2 energies given for 3 stages"):
            r.run(x[:1], Energy(6.0, energies_mj=[1, 2]))
    for bad in (0, -1, float("nan"), "3"):
        with pytest.raises(ValueError, match="energy budget"):
            Energy(bad)  # type: ignore[arg-type]


def test_energy_with_deadline_and_confidence(base) -> None:
    bundle, data, x = base
    prof = LatencyProfile(synthetic(data, latency=[0.001, 0.001, 0.001], energy=[1.0, 2.0, 3.0]))
    pol = make_policy(deadline_ms=1000, energy_mj=3.5)
    assert isinstance(pol, AllOf) and pol.name == "deadline-1000ms+energy-3.5mJ"
    with Runner(bundle, threads=1, profile=prof) as r:
        assert r.run(x[:1], pol)[0].stage == 1
        assert r.run(x[:1], AllOf(Energy(100), Confidence(0.0)))[0].stage == 0
    with pytest.raises(ValueError, match="--stages"):
        make_policy(stages=2, energy_mj=3)
    with pytest.raises(ValueError, match="--fused"):
        make_policy(deadline_ms=1, fused=True, energy_mj=3)


def test_profile_without_energy_is_refused(base) -> None:
    bundle, data, x = base
    with Runner(bundle, threads=1, profile=LatencyProfile(copy.deepcopy(data))) as r:
        with pytest.raises(ProfileError, match="no energy per stage.*--meter auto"):
            r.run(x[:1], Energy(5.0))
    unmeasured = copy.deepcopy(data)
    unmeasured["energy"] = {"measured": False, "source": "none", "note": "energy is not measured on this machine: x"}
    with Runner(bundle, threads=1, profile=LatencyProfile(unmeasured)) as r:
        with pytest.raises(ProfileError, match="meter measured nothing"):
            r.run(x[:1], Energy(5.0))


def test_cli_energy_budget(base, tmp_path: Path) -> None:
    bundle, data, x = base
    np.save(tmp_path / "x.npy", x)
    p = tmp_path / "energy.json"
    p.write_text(json.dumps(synthetic(data, energy=[1.0, 2.0, 3.0])))
    cli = CliRunner()
    res = cli.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--threads", "1", "--json",
                           "--energy-mj", "3.5", "--profile", str(p)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["policy"] == "energy-3.5mJ" and {r["stage"] for r in out["results"]} == {1}
    res = cli.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--threads", "1",
                           "--energy-mj", "3.5"])  # the bundle's own profile has no energy
    assert res.exit_code != 0 and "no energy per stage" in res.output and "Traceback" not in res.output
    res = cli.invoke(app, ["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--energy-mj", "-1"])
    assert res.exit_code != 0 and "energy budget must be a positive" in res.output


def test_runner_follows_the_power_mode(base, tmp_path: Path) -> None:
    bundle0, data, x = base
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(bundle0, bundle)
    device = current_key(1)[0]
    # 15W: slow stages (only stage 0 fits 10 ms); MAXN: fast ones (all fit)
    for mode, lat in (("15W", [4.0, 12.0, 12.0]), ("MAXN", [0.001, 0.001, 0.001])):
        (bundle / "profiles" / profile_filename(device, mode)).write_text(
            json.dumps(synthetic(data, setting=mode, latency=lat)))
    modes = iter(["15W", "15W", "MAXN", "15W"])
    seen: list[str] = []

    def mode() -> str:
        seen.append(next(modes))
        return seen[-1]

    pol = Deadline(10.0, margin_ms=0.0, watchdog=False)
    ticks = itertools.count(0.0, 1e-6)  # 1 µs per clock read: the elapsed time is not the machine's load
    with Runner(bundle, threads=1, mode=mode, clock=lambda: next(ticks)) as r:
        stages = [r.run(x[:1], pol)[0].stage for _ in range(4)]
        assert r.mode == "15W" and r.profile.setting == "15W"
    assert stages == [0, 0, 2, 0] and seen == ["15W", "15W", "MAXN", "15W"]
    with Runner(bundle, threads=1, mode=lambda: "7W") as r:
        with pytest.raises(ProfileError, match="no latency profile.*7W"):
            r.run(x[:1], pol)


def test_cli_follow_power_mode(base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_energy_power_modes import CONF, fake_tool

    bundle0, data, x = base
    bundle = tmp_path / "toy.kdedge"
    shutil.copytree(bundle0, bundle)
    np.save(tmp_path / "x.npy", x)
    device = current_key(1)[0]
    (bundle / "profiles" / profile_filename(device, "25W")).write_text(
        json.dumps(synthetic(data, setting="25W", latency=[4.0, 12.0, 12.0])))
    monkeypatch.setenv("FAKE_NVPMODEL_CONF", CONF)
    monkeypatch.setenv("FAKE_NVPMODEL_STATE", str(tmp_path / "mode"))  # the conf's default: 25W
    monkeypatch.setenv("FAKE_TOOL_LOG", str(tmp_path / "log"))
    args = ["run", str(bundle), "--input", str(tmp_path / "x.npy"), "--threads", "1", "--json", "--deadline-ms", "10",
            "--margin-ms", "0", "--follow-power-mode", "--nvpmodel-exe", fake_tool(tmp_path, "nvpmodel"),
            "--nvpmodel-conf", CONF]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert {r["stage"] for r in json.loads(res.stdout)["results"]} == {0}  # the 25W profile, not this CPU's
    assert (tmp_path / "log").read_text().splitlines().count("nvpmodel -q") == 1  # read once, not per request
    (tmp_path / "mode").write_text("0")  # 15W: no profile for it
    res = CliRunner().invoke(app, args)
    assert res.exit_code != 0 and "15W" in res.output
    res = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "nope.conf")])
    assert res.exit_code != 0 and "needs a Jetson's nvpmodel configuration" in res.output
