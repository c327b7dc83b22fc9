"""Power meters: the integrator against analytic signals, every meter on fake sysfs trees, fake
executables and fake libraries, the ``none`` meter, meter selection and the import contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kdedge.profile.power import (
    METERS,
    CombinedMeter,
    EnergyReading,
    JetsonSysfsMeter,
    JtopMeter,
    NoneMeter,
    NvmlMeter,
    PollingMeter,
    PowerError,
    PowerPermissionError,
    RaplMeter,
    TegrastatsMeter,
    auto_meter,
    counter_delta,
    create_meter,
    integrate,
    meter_report,
)

FIX = Path(__file__).parent / "fixtures" / "power"


def write_tree(root: Path, fixture: str) -> Path:
    """Write a sysfs fixture (relative path -> contents) under ``root``."""
    files = json.loads((FIX / "sysfs" / fixture).read_text())["files"]
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def poke(path: Path, value: int) -> None:
    """Change a fake attribute in place, in one write: a sampling thread may read it at any time,
    and ``write_text`` would let it see the file empty between truncation and write."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, f"{value:>24d}\n".encode(), 0)
    finally:
        os.close(fd)


def fake_tool(tmp_path: Path, name: str) -> str:
    """An executable ``tmp_path/bin/name`` running the fixture script with this interpreter."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable} -S\n" + (FIX / "tools" / f"{name}.py").read_text())
    exe.chmod(0o755)
    return str(exe)


def _wait_until(cond, timeout_s: float = 60.0) -> None:
    """Poll ``cond`` until it holds; the timeout only guards against a hang."""
    give_up = time.perf_counter() + timeout_s
    while not cond():
        assert time.perf_counter() < give_up, "the meter produced no samples"
        time.sleep(0.002)


# -- the integrator ---------------------------------------------------------------------------


def test_integrate_constant_power_is_power_times_time() -> None:
    times = [0.0, 0.013, 0.021, 0.05, 0.051, 0.09]
    assert integrate(times, [4.0] * len(times), 0.005, 0.08) == pytest.approx(4.0 * 0.075, rel=1e-12)


def test_integrate_ramp_is_exact_on_irregular_timestamps_and_partial_edges() -> None:
    # p(t) = 2 + 30 t, sampled late and irregularly, window cut between samples at both ends.
    def p(t: float) -> float:
        return 2.0 + 30.0 * t

    times = [0.0, 0.011, 0.019, 0.042, 0.043, 0.07, 0.1]
    t0, t1 = 0.004, 0.093
    exact = 2.0 * (t1 - t0) + 15.0 * (t1**2 - t0**2)
    got = integrate(times, [p(t) for t in times], t0, t1)
    assert got == pytest.approx(exact, rel=1e-12)
    # Averaging pairs of readings times the nominal period (what this replaces) is off here.
    nominal = 0.01
    pairs = sum((p(a) + p(b)) / 2 * nominal for a, b in zip(times, times[1:]))
    assert abs(pairs - exact) / exact > 0.1


def test_integrate_holds_the_nearest_sample_outside_the_samples() -> None:
    # Samples only inside the window: power is held at the first/last value at the edges.
    got = integrate([1.0, 2.0], [1.0, 3.0], 0.0, 3.0)
    assert got == pytest.approx(1.0 * 1.0 + (1.0 + 3.0) / 2 * 1.0 + 3.0 * 1.0)
    assert integrate([5.0], [2.0], 0.0, 1.0) == pytest.approx(2.0)  # one sample: constant
    assert integrate([0.0, 1.0], [1.0, 1.0], 0.5, 0.5) == 0.0


def test_integrate_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="no samples"):
        integrate([], [], 0.0, 1.0)
    with pytest.raises(ValueError, match="before it starts"):
        integrate([0.0], [1.0], 1.0, 0.0)
    with pytest.raises(ValueError, match="2 times but 1"):
        integrate([0.0, 1.0], [1.0], 0.0, 1.0)


def test_counter_delta_wraps() -> None:
    assert counter_delta(10.0, 25.0, 100.0) == 15.0
    assert counter_delta(90.0, 5.0, 100.0) == 15.0
    with pytest.raises(PowerError, match="went backwards"):
        counter_delta(90.0, 5.0, None)


# -- a polling meter on an analytic signal ------------------------------------------------------


class AnalyticMeter(PollingMeter):
    """Power p(t) = a + b (t - origin): a known signal to integrate."""

    name = "analytic"

    def __init__(self, a: float, b: float, period_s: float) -> None:
        super().__init__(period_s)
        self.a, self.b = a, b
        self.origin = time.perf_counter()
        self.window_start = math.nan

    def _read(self) -> dict[str, float]:
        t = time.perf_counter() - self.origin
        return {"VDD_IN": self.a + self.b * t, "VDD_SOC": 0.25 * (self.a + self.b * t)}

    def _begin_window(self) -> None:
        super()._begin_window()
        self.window_start = self._t0 - self.origin
        self.stamps: list[float] = []

    def _add_sample(self, t: float, rails: Any) -> None:
        super()._add_sample(t, rails)
        if self._t0 is not None:
            self.stamps.append(t - self.origin)

    def exact(self, seconds: float, scale: float = 1.0) -> float:
        t0, t1 = self.window_start, self.window_start + seconds
        return scale * (self.a * (t1 - t0) + self.b / 2 * (t1**2 - t0**2))


@pytest.mark.parametrize("a, b", [(5.0, 0.0), (1.0, 40.0)], ids=["constant", "ramp"])
def test_polling_meter_matches_the_exact_integral(a: float, b: float) -> None:
    meter = AnalyticMeter(a, b, period_s=0.002)
    with meter:
        _wait_until(lambda: len(meter.stamps) >= 12)  # a count of samples, not a time: a busy machine only slows it
    r = meter.reading
    assert r is not None and r.measured
    # Exact up to the sample stamps: a read is stamped at its midpoint, a microsecond or so from
    # when the signal was evaluated, which shifts a 40 W/s ramp by ~1e-5 relative at most.
    assert r.joules == pytest.approx(meter.exact(r.seconds), rel=1e-4)
    assert r.rails["VDD_SOC"] == pytest.approx(meter.exact(r.seconds, 0.25), rel=1e-4)
    assert r.mean_watts == pytest.approx(r.joules / r.seconds)
    assert r.source == "analytic" and "VDD_IN" in r.note
    # The reported period is the measured one (late samples on a busy machine included).
    inside = [t for t in meter.stamps if meter.window_start <= t <= meter.window_start + r.seconds]
    assert r.samples == len(inside) >= 10
    assert r.period_s == pytest.approx((inside[-1] - inside[0]) / (len(inside) - 1))
    assert r.period_s >= 0.002 * 0.9  # never faster than asked (slower when the machine is busy)


def test_polling_meter_start_stop_errors() -> None:
    meter = AnalyticMeter(1.0, 0.0, period_s=0.01)
    with pytest.raises(PowerError, match="not started"):
        meter.stop()
    meter.start()
    with pytest.raises(PowerError, match="already started"):
        meter.start()
    meter.stop()
    with pytest.raises(PowerError, match="period must be > 0"):
        AnalyticMeter(1.0, 0.0, period_s=0.0)


def test_a_failing_sensor_read_surfaces_at_stop() -> None:
    class Flaky(AnalyticMeter):
        calls = 0

        def _read(self) -> dict[str, float]:
            self.calls += 1
            if self.calls == 3:
                raise PowerError("sensor vanished")
            return super()._read()

    meter = Flaky(1.0, 0.0, period_s=0.002)
    meter.start()
    time.sleep(0.05)
    with pytest.raises(PowerError, match="sensor vanished"):
        meter.stop()
    meter.start()  # the meter is usable again
    meter.stop()


# -- Jetson INA3221 rails from sysfs -----------------------------------------------------------


def test_orin_nano_hwmon_layout(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "orin_nano_jp6_hwmon.json")
    meter = JetsonSysfsMeter(root=str(root), period_s=0.005)
    assert meter.rail_names == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]  # "sum of shunt voltages" skipped
    assert "total = input rail VDD_IN" in meter.probe()
    with meter:
        time.sleep(0.05)
    r = meter.reading
    p_in = 5.072 * 1.120
    assert r.joules == pytest.approx(p_in * r.seconds, rel=1e-9)
    assert r.rails["VDD_SOC"] == pytest.approx(5.064 * 0.312 * r.seconds, rel=1e-9)
    assert r.note.startswith("total = input rail VDD_IN")


def test_agx_orin_two_chips_without_input_rail_sums_rails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "agx_orin_hwmon.json")
    meter = JetsonSysfsMeter(root=str(root), period_s=0.005)
    assert meter.rail_names == ["VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]  # NC skipped
    with meter:
        time.sleep(0.03)
    r = meter.reading
    total = 5.008 * 0.554 + 5.008 * 0.079 + 5.016 * 0.543 + 5.0 * 0.060
    assert r.joules == pytest.approx(total * r.seconds, rel=1e-9)
    assert "sum of rails" in r.note


def test_jetpack4_iio_layout_reads_the_power_attribute(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "nano_jp4_iio.json")
    meter = JetsonSysfsMeter(root=str(root), period_s=0.005)
    assert meter.rail_names == ["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"]
    with meter:
        time.sleep(0.02)
    assert meter.reading.joules == pytest.approx(2.301 * meter.reading.seconds, rel=1e-9)


def test_sysfs_meter_follows_a_power_step(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "orin_nano_jp6_hwmon.json")
    curr = root / "1-0040" / "hwmon" / "hwmon1" / "curr1_input"
    meter = JetsonSysfsMeter(root=str(root), period_s=0.002, total_rail="VDD_IN")
    meter.start()
    _wait_until(lambda: len(meter._samples) >= 5)
    poke(curr, 2240)  # input power doubles
    seen = len(meter._samples)
    _wait_until(lambda: len(meter._samples) >= seen + 5)
    r = meter.stop()
    low, high = 5.072 * 1.120, 5.072 * 2.240
    # strictly between: the window saw both levels (how long each lasted depends on scheduling)
    assert low * r.seconds < r.joules < high * r.seconds


def test_total_rail_choice(tmp_path: Path) -> None:
    root = str(write_tree(tmp_path, "orin_nano_jp6_hwmon.json"))
    with JetsonSysfsMeter(root=root, total_rail="sum") as m:
        pass
    assert m.reading.joules == pytest.approx(sum(m.reading.rails.values()), rel=1e-9)
    with pytest.raises(PowerError, match="VDD_CPU_GPU_CV, VDD_IN, VDD_SOC"):
        JetsonSysfsMeter(root=root, total_rail="VDD_GPU").start()


def test_sysfs_meter_without_rails_and_without_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PowerError, match="no INA3221 power rails"):
        JetsonSysfsMeter(root=str(tmp_path))
    root = write_tree(tmp_path, "orin_nano_jp6_hwmon.json")
    real_open = os.open

    def deny(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("_input"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PowerPermissionError, match="permission denied. Run as root"):
        JetsonSysfsMeter(root=str(root))
    status = JetsonSysfsMeter.available(root=str(root))
    assert not status and "permission denied" in status.detail


# -- RAPL and amd_energy counters --------------------------------------------------------------


def test_rapl_wraps_and_totals_package_plus_dram(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "rapl_powercap.json")
    meter = RaplMeter(powercap_root=str(root), hwmon_root=str(tmp_path / "none"))
    assert "total = package-0 + package-0/dram" in meter.probe()
    pkg = root / "intel-rapl:0" / "energy_uj"
    core = root / "intel-rapl:0:0" / "energy_uj"
    dram = root / "intel-rapl:0:2" / "energy_uj"
    meter.start()
    pkg.write_text("2500000\n")  # 1 J to the wrap point, then 2.5 J after it
    core.write_text("6500000\n")
    dram.write_text("389013\n")  # 0.610987 J to its (smaller) wrap point, then 0.389013 J
    r = meter.stop()
    assert r.rails["package-0"] == pytest.approx(3.5)
    assert r.rails["package-0/core"] == pytest.approx(1.5)
    assert r.rails["package-0/dram"] == pytest.approx(1.0)
    assert r.rails["psys"] == 0.0
    assert r.joules == pytest.approx(4.5)  # package + dram; psys and core not added again
    assert r.period_s is None and "energy counter" in r.note


def test_rapl_several_wraps_in_one_window_need_the_guard_reads(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "rapl_powercap.json")
    meter = RaplMeter(powercap_root=str(root), hwmon_root=str(tmp_path), guard_period_s=0.01)
    pkg = root / "intel-rapl:0" / "energy_uj"
    wrap = 262143328850
    meter.start()
    value = wrap - 1_000_000
    for _ in range(3):  # three full wraps, each seen by the guard thread
        value = (value + wrap // 2) % wrap
        poke(pkg, value)
        time.sleep(0.1)
    r = meter.stop()
    assert r.rails["package-0"] == pytest.approx(3 * (wrap // 2) * 1e-6)
    assert r.samples >= 4


def test_rapl_permission_and_absence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PowerError, match="no RAPL energy counters"):
        RaplMeter(powercap_root=str(tmp_path / "a"), hwmon_root=str(tmp_path / "b"))
    root = write_tree(tmp_path / "p", "rapl_powercap.json")
    real_open = os.open

    def deny(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PowerPermissionError, match="energy_uj: permission denied"):
        RaplMeter(powercap_root=str(root))


def test_amd_energy_hwmon(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "amd_energy_hwmon.json")
    meter = RaplMeter(powercap_root=str(tmp_path / "none"), hwmon_root=str(root))
    assert meter.kind == "amd_energy"
    meter.start()
    (root / "hwmon3" / "energy3_input").write_text("52500000\n")
    (root / "hwmon3" / "energy1_input").write_text("1500000\n")
    r = meter.stop()
    assert r.joules == pytest.approx(2.5)  # the socket counter only
    assert r.rails["Ecore000"] == pytest.approx(0.5)


# -- NVML ----------------------------------------------------------------------------------------


class FakeNvml:
    """The four pynvml calls the meter makes; energy counters in mJ that tests advance."""

    def __init__(self, names: list[str], supported: bool = True) -> None:
        self.names = names
        self.mj = [1_000_000 * (i + 1) for i in range(len(names))]
        self.supported = supported

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.names[h].encode()

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if not self.supported:
            raise RuntimeError("Not Supported")
        return self.mj[h]


def test_nvml_differences_the_energy_counter() -> None:
    nvml = FakeNvml(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"])
    meter = NvmlMeter(nvml=nvml)
    assert "gpu1 (NVIDIA H100 80GB HBM3)" in meter.probe()
    meter.start()
    nvml.mj[0] += 1234
    nvml.mj[1] += 766
    r = meter.stop()
    assert r.rails == pytest.approx({"gpu0": 1.234, "gpu1": 0.766})
    assert r.joules == pytest.approx(2.0)
    meter.start()
    r = meter.stop()
    assert r.joules == 0.0 and "did not advance" in r.note


def test_nvml_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PowerError, match="needs a Volta or newer GPU"):
        NvmlMeter(nvml=FakeNvml(["Tesla P4"], supported=False))
    with pytest.raises(PowerError, match="GPU index 3 out of range"):
        NvmlMeter(devices=[3], nvml=FakeNvml(["A"]))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(PowerError, match="pip install nvidia-ml-py"):
        NvmlMeter()


# -- tegrastats subprocess -------------------------------------------------------------------------


@pytest.fixture
def tegrastats_exe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FAKE_TEGRASTATS_LINES", str(FIX / "tegrastats" / "constant_orin_nano.txt"))
    return fake_tool(tmp_path, "tegrastats")


@pytest.mark.parametrize("use_pty", [True, False], ids=["pty", "pipe"])
def test_tegrastats_meter_integrates_its_lines(tegrastats_exe: str, use_pty: bool) -> None:
    meter = TegrastatsMeter(executable=tegrastats_exe, period_s=0.02, use_pty=use_pty)
    with meter.session():
        for _ in range(2):  # the subprocess stays up across windows
            with meter:
                start = len(meter._samples)
                _wait_until(lambda: len(meter._samples) >= start + 5)
            r = meter.reading
            assert r.joules == pytest.approx(5.0 * r.seconds, rel=1e-9)
            assert r.rails["VDD_SOC"] == pytest.approx(1.5 * r.seconds, rel=1e-9)
            assert "held" not in r.note  # both edges bracketed by lines
            assert r.samples >= 4
            assert r.period_s > 0.01  # lines come every 20 ms or later, never faster
    assert meter._proc is None


def test_tegrastats_meter_opened_by_start_is_closed_by_stop(tegrastats_exe: str) -> None:
    meter = TegrastatsMeter(executable=tegrastats_exe, period_s=0.02)
    meter.start()
    proc = meter._proc
    r = meter.stop()
    assert r.measured and proc is not None and proc.poll() is not None and meter._proc is None


def test_tegrastats_meter_quotes_an_unrecognised_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TEGRASTATS_LINES", str(FIX / "tegrastats" / "unrecognised.txt"))
    meter = TegrastatsMeter(executable=fake_tool(tmp_path, "tegrastats"), period_s=0.02)
    with pytest.raises(PowerError, match=r"not recognised.*GR3D_FREQ @\[1000,1000,1000\]"):
        meter.start()
    assert meter._proc is None


def test_tegrastats_meter_reports_an_exited_process(tegrastats_exe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TEGRASTATS_COUNT", "3")
    meter = TegrastatsMeter(executable=tegrastats_exe, period_s=0.01)
    meter.start()
    time.sleep(0.2)
    with pytest.raises(PowerError, match="tegrastats exited"):
        meter.stop()


def test_tegrastats_not_installed() -> None:
    status = TegrastatsMeter.available(executable="/nonexistent/tegrastats")
    assert not status and "ships with JetPack" in status.detail


# -- jtop ------------------------------------------------------------------------------------------


class FakeJtop:
    """jtop's client surface: start/ok/power/close; ok() paces updates at the interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.running = False
        self.power = {
            "rail": {"VDD_CPU_GPU_CV": {"power": 1200, "online": True}, "VDD_SOC": {"power": 1500, "online": True}},
            "tot": {"power": 6000, "name": "VDD_IN"},
        }

    def start(self) -> None:
        self.running = True

    def ok(self) -> bool:
        time.sleep(self.interval)
        return self.running

    def close(self) -> None:
        self.running = False


def test_jtop_meter_with_a_fake_client() -> None:
    meter = JtopMeter(period_s=0.01, jtop_factory=FakeJtop)
    with meter:
        time.sleep(0.08)
    r = meter.reading
    assert r.joules == pytest.approx(6.0 * r.seconds, rel=1e-9)  # VDD_IN from jtop's "tot"
    assert set(r.rails) == {"VDD_CPU_GPU_CV", "VDD_SOC", "VDD_IN"}


def test_jtop_service_going_away_is_reported() -> None:
    class Dying(FakeJtop):
        updates = 0

        def ok(self) -> bool:
            self.updates += 1
            return super().ok() and self.updates < 4

    meter = JtopMeter(period_s=0.01, jtop_factory=Dying)
    meter.start()
    time.sleep(0.1)
    with pytest.raises(PowerError, match="jtop service stopped sending data"):
        meter.stop()


def test_jtop_missing_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jtop", None)
    with pytest.raises(PowerError, match="pip3 install -U jetson-stats"):
        JtopMeter()


# -- the none meter, selection, the registry -------------------------------------------------------


def test_none_meter_says_energy_is_not_measured() -> None:
    meter = NoneMeter("no sensor here")
    with meter:
        time.sleep(0.01)
    r = meter.reading
    assert r.joules is None and r.mean_watts is None and r.millijoules is None
    assert not r.measured and r.samples == 0 and r.seconds >= 0.01
    assert r.note == "energy is not measured on this machine: no sensor here"
    assert str(r).startswith("energy not measured")
    assert json.loads(json.dumps(r.to_dict()))["joules"] is None


def test_auto_meter_prefers_jetson_rails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, "orin_nano_jp6_hwmon.json")
    meter = auto_meter(period_s=0.005, options={"jetson-sysfs": {"root": str(root)}})
    assert isinstance(meter, JetsonSysfsMeter) and meter.period_s == 0.005


def test_auto_meter_combines_gpu_and_cpu_counters(tmp_path: Path) -> None:
    rapl = write_tree(tmp_path, "rapl_powercap.json")
    nvml = FakeNvml(["NVIDIA A100"])
    options = {
        "jetson-sysfs": {"root": str(tmp_path / "none")},
        "tegrastats": {"executable": "/nonexistent/tegrastats"},
        "jtop": {"jtop_factory": None},
        "nvml": {"nvml": nvml},
        "rapl": {"powercap_root": str(rapl)},
    }
    meter = auto_meter(order=("jetson-sysfs", "tegrastats", "nvml", "rapl"), options=options)
    assert isinstance(meter, CombinedMeter) and meter.name == "nvml+rapl"
    meter.start()
    nvml.mj[0] += 2000
    (rapl / "intel-rapl:0" / "energy_uj").write_text("0\n")  # +1 J through the wrap
    r = meter.stop()
    assert r.joules == pytest.approx(3.0)
    assert r.rails["nvml:gpu0"] == pytest.approx(2.0) and r.rails["rapl:package-0"] == pytest.approx(1.0)


def test_auto_meter_falls_back_to_none_with_every_reason(tmp_path: Path) -> None:
    options = {
        "jetson-sysfs": {"root": str(tmp_path)},
        "tegrastats": {"executable": "/nonexistent/tegrastats"},
        "rapl": {"powercap_root": str(tmp_path), "hwmon_root": str(tmp_path)},
    }
    meter = auto_meter(order=("jetson-sysfs", "tegrastats", "rapl"), options=options)
    assert isinstance(meter, NoneMeter)
    for name in ("jetson-sysfs", "tegrastats", "rapl"):
        assert name + ":" in meter.reason
    statuses = meter_report(options=options)
    assert [s.name for s in statuses] == ["jetson-sysfs", "tegrastats", "jtop", "nvml", "rapl"]


def test_create_meter_by_name() -> None:
    assert set(METERS) == {"jetson-sysfs", "tegrastats", "jtop", "nvml", "rapl", "none"}
    assert isinstance(create_meter("none"), NoneMeter)
    with pytest.raises(PowerError, match=r"unknown power meter 'rapel' \(did you mean 'rapl'\?\); known: auto"):
        create_meter("rapel")


def test_energy_reading_text() -> None:
    r = EnergyReading(0.0123, 3.0, 0.0041, 5, 0.001, "jetson-sysfs", {"VDD_IN": 0.0123}, "total = input rail VDD_IN")
    assert str(r) == "12.300 mJ over 4.100 ms (3.000 W mean, 5 samples every 1.00 ms, jetson-sysfs)"
    assert r.to_dict()["rails"] == {"VDD_IN": 0.0123}


def test_imports_need_only_the_standard_library() -> None:
    code = (
        "import sys\n"
        "for banned in ('torch', 'numpy', 'pynvml', 'jtop', 'onnxruntime'):\n"
        "    sys.modules[banned] = None\n"
        "import kdedge.profile.power, kdedge.profile.modes, kdedge.profile.tegrastats\n"
        "m = kdedge.profile.power.create_meter('none'); m.start(); print(m.stop().note)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "not measured" in out.stdout
