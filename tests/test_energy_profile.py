"""Energy in latency profiles: per-stage energy from meter windows, recorded source and period,
and the ``none`` meter recording "not measured" (never zero)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from helpers_runtime import toy_bundle
from kdedge.profile.latency import CHAIN, LatencyProfile, ProfileError, profile_bundle
from kdedge.profile.meters import EnergyReading, Meter, NoneMeter


class FakeMeter(Meter):
    """Constant ``watts``: a window's energy is watts × its wall time; every reading is kept."""

    name = "fake"

    def __init__(self, watts: float = 5.0, period_s: float = 0.01) -> None:
        self.watts, self.period_s = watts, period_s
        self.readings: list[EnergyReading] = []
        self._t0: float | None = None

    def probe(self) -> str:
        return "fake"

    def start(self) -> None:
        assert self._t0 is None, "one window at a time"
        self._t0 = time.perf_counter()

    def stop(self) -> EnergyReading:
        seconds = time.perf_counter() - self._t0
        self._t0 = None
        r = EnergyReading(joules=self.watts * seconds, mean_watts=self.watts, seconds=seconds,
                          samples=max(2, int(seconds / self.period_s)), period_s=self.period_s, source=self.name,
                          note="constant power")
        self.readings.append(r)
        return r


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_bundle(tmp_path_factory.mktemp("bundles"))[0]


def _copy(src: Path, tmp: Path) -> Path:
    dst = tmp / "toy.kdedge"
    shutil.copytree(src, dst)
    return dst


def test_energy_per_stage_from_meter_windows(toy: Path, tmp_path: Path) -> None:
    meter = FakeMeter(watts=5.0)
    runs = 6
    prof, path, _ = profile_bundle(_copy(toy, tmp_path), batches=(1,), runs=runs, warmup=1, threads=1, plot=False,
                                   meter=meter)
    k = 3
    # windows: cumulative stages 0..k-1 (k windows), then one per fused prefix (3)
    assert len(meter.readings) == k + 3
    cum = [r.joules * 1e3 / runs for r in meter.readings[:k]]
    data = json.loads(path.read_text())
    assert data["energy"]["measured"] is True and data["energy"]["source"] == "fake"
    assert data["energy"]["period_s"] == pytest.approx(0.01) and data["energy"]["runs_per_window"] == runs
    g = data["graphs"]
    assert g[CHAIN]["1"]["energy_mj"] == {"mean": pytest.approx(cum[-1]), "n": runs}
    assert g["stage0"]["1"]["energy_mj"]["mean"] == pytest.approx(cum[0])
    total = sum(g[f"stage{i}"]["1"]["energy_mj"]["mean"] for i in range(k))
    clamped = data["energy"]["clamped"]
    if not clamped:  # stage energies are differences of the cumulative windows and add up to the chain
        assert total == pytest.approx(cum[-1])
        for i in range(1, k):
            assert g[f"stage{i}"]["1"]["energy_mj"]["mean"] == pytest.approx(cum[i] - cum[i - 1])
    for j in range(3):
        assert g[f"prefix{j}"]["1"]["energy_mj"]["mean"] == pytest.approx(meter.readings[k + j].joules * 1e3 / runs)
    # energy = constant power x the window's time, exactly (the latency statistics come from other
    # calls, so comparing the two would test how busy the machine was)
    window_s = meter.readings[k - 1].seconds
    assert g[CHAIN]["1"]["energy_mj"]["mean"] == pytest.approx(5.0 * window_s * 1e3 / runs)
    loaded = LatencyProfile.load(path)
    assert loaded.has_energy and loaded.stat("stage0", 1, "mean", "energy_mj") == pytest.approx(cum[0])
    with pytest.raises(ProfileError, match="only its mean"):
        loaded.stat("stage0", 1, "p99", "energy_mj")


def test_none_meter_records_not_measured(toy: Path, tmp_path: Path) -> None:
    prof, path, _ = profile_bundle(_copy(toy, tmp_path), batches=(1,), runs=2, warmup=0, threads=1, plot=False,
                                   meter=NoneMeter("no sensor in this test"))
    data = json.loads(path.read_text())
    assert data["energy"]["measured"] is False and data["energy"]["source"] == "none"
    assert "not measured" in data["energy"]["note"] and "no sensor in this test" in data["energy"]["note"]
    assert all("energy_mj" not in e for per in data["graphs"].values() for e in per.values())
    assert not prof.has_energy
    with pytest.raises(ProfileError, match="no energy per stage.*--meter auto"):
        prof.stat("stage0", 1, "mean", "energy_mj")


def test_no_meter_no_energy_section(toy: Path, tmp_path: Path) -> None:
    prof, path, _ = profile_bundle(_copy(toy, tmp_path), batches=(1,), runs=1, warmup=0, threads=1, plot=False)
    assert "energy" not in json.loads(path.read_text()) and prof.energy is None


def test_cli_meter_none_and_unknown(toy: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kdedge.cli.main import app

    cli = CliRunner()
    dst = _copy(toy, tmp_path)
    res = cli.invoke(app, ["profile", str(dst), "--threads", "1", "--runs", "2", "--warmup", "0", "--no-plot",
                           "--meter", "none", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "energy is not measured" in res.output
    data = json.loads(next((dst / "profiles").glob("*.json")).read_text())
    assert data["energy"]["measured"] is False
    res = cli.invoke(app, ["profile", str(dst), "--threads", "1", "--runs", "2", "--meter", "rapel", "--quiet"])
    assert res.exit_code != 0 and "unknown power meter 'rapel'" in res.output and "rapl" in res.output


def test_csv_and_plots_per_mode(toy: Path, tmp_path: Path) -> None:
    import csv

    from kdedge.profile.latency import CSV_COLUMNS, STATS

    dst = _copy(toy, tmp_path)
    prof, path, png = profile_bundle(dst, batches=(1, 2), runs=3, warmup=0, threads=1, meter=FakeMeter(2.0))
    rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 7 * 2
    by = {(r["graph"], int(r["batch"])): r for r in rows}
    for (g, n), r in by.items():
        lat = prof.data["graphs"][g][str(n)]["latency_ms"]
        assert [float(r[f"latency_ms_{k}"]) for k in STATS] == [lat[k] for k in STATS]
        assert float(r["energy_mj_mean"]) == prof.stat(g, n, "mean", "energy_mj")
        assert r["setting"] == prof.setting and r["energy_source"] == "fake" and float(r["energy_period_s"]) == 0.01
    assert png == path.with_suffix(".png") and png.read_bytes()[:4] == b"\x89PNG"
    assert path.with_name(path.stem + "-energy.png").read_bytes()[:4] == b"\x89PNG"
    # without energy: empty energy cells, no energy plot
    dst2 = _copy(toy, tmp_path / "b")
    prof2, path2, _ = profile_bundle(dst2, batches=(1,), runs=1, warmup=0, threads=1, meter=NoneMeter("x"))
    rows = list(csv.DictReader(path2.with_suffix(".csv").open()))
    assert {r["energy_mj_mean"] for r in rows} == {""} and {r["energy_source"] for r in rows} == {"none"}
    assert not path2.with_name(path2.stem + "-energy.png").exists()
