"""Power modes: nvpmodel.conf of several boards, switching by name through a fake nvpmodel that
records its calls, restoration of the user's mode on every exit path, CPU settings, device id."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from kdedge.device import DeviceSetting, cpu_governors, current_setting, device_id, slug
from kdedge.profile.modes import ModeError, Nvpmodel, PowerMode, read_nvpmodel_conf
from kdedge.profile.power import PowerError, PowerPermissionError

FIX = Path(__file__).parent / "fixtures" / "power"
CONF = FIX / "nvpmodel"


def fake_tool(tmp_path: Path, name: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable} -S\n" + (FIX / "tools" / f"{name}.py").read_text())
    exe.chmod(0o755)
    return str(exe)


class Board:
    """A fake Jetson: fake nvpmodel and jetson_clocks over one .conf, with a call log."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, conf: str, clocks: bool = True) -> None:
        self.conf = str(CONF / conf)
        self.log = tmp_path / "calls.log"
        self.state = tmp_path / "mode"
        monkeypatch.setenv("FAKE_NVPMODEL_CONF", self.conf)
        monkeypatch.setenv("FAKE_NVPMODEL_STATE", str(self.state))
        monkeypatch.setenv("FAKE_TOOL_LOG", str(self.log))
        self.nv = Nvpmodel(
            conf=self.conf,
            nvpmodel=fake_tool(tmp_path, "nvpmodel"),
            jetson_clocks=fake_tool(tmp_path, "jetson_clocks") if clocks else None,
            status=str(tmp_path / "status"),
        )

    def calls(self) -> list[str]:
        if not self.log.exists():
            return []
        return [re.sub(r"\S*kdedge-clocks-\S*", "FILE", ln) for ln in self.log.read_text().splitlines()]

    def changes(self) -> list[str]:
        """Calls other than queries."""
        return [c for c in self.calls() if c != "nvpmodel -q"]

    def switches(self) -> list[str]:
        return [c for c in self.calls() if c.startswith("nvpmodel -m")]


@pytest.fixture
def nano(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Board:
    """An Orin Nano (JetPack 6) whose user runs 25W (the conf's default, id 1)."""
    return Board(tmp_path, monkeypatch, "orin_nano_jp6.conf")


# -- reading configurations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf, modes, default",
    [
        ("orin_nano_jp6.conf", {"15W": 0, "25W": 1, "MAXN_SUPER": 2}, 1),
        ("agx_orin.conf", {"MAXN": 0, "MODE_15W": 1, "MODE_30W": 2, "MODE_50W": 3}, 2),
        ("thor_t5000.conf", {"MAXN": 0, "120W": 1, "90W": 2, "70W": 3}, 1),
    ],
)
def test_conf_of_several_boards(conf: str, modes: dict[str, int], default: int) -> None:
    found, default_id = read_nvpmodel_conf(str(CONF / conf))
    assert {name: m.id for name, m in found.items()} == modes
    assert default_id == default


def test_bad_confs(tmp_path: Path) -> None:
    with pytest.raises(ModeError, match="'MAXN' defined twice"):
        read_nvpmodel_conf(str(CONF / "broken_duplicate.conf"))
    with pytest.raises(ModeError, match="no nvpmodel configuration at .*not a Jetson"):
        read_nvpmodel_conf(str(tmp_path / "missing.conf"))
    (tmp_path / "empty.conf").write_text("# nothing\n< PM_CONFIG DEFAULT=0 >\n")
    with pytest.raises(ModeError, match="defines no POWER_MODEL"):
        read_nvpmodel_conf(str(tmp_path / "empty.conf"))


def test_same_name_different_id_on_different_boards(tmp_path: Path) -> None:
    nano = Nvpmodel(conf=str(CONF / "orin_nano_jp6.conf"))
    agx = Nvpmodel(conf=str(CONF / "agx_orin.conf"))
    assert nano.resolve("15W") == PowerMode(0, "15W")
    assert agx.resolve("15W") == PowerMode(1, "MODE_15W")  # MODE_ prefix optional
    assert agx.resolve("maxn") == PowerMode(0, "MAXN")
    assert agx.resolve(3) == PowerMode(3, "MODE_50W")
    assert agx.default_mode == PowerMode(2, "MODE_30W")


def test_unknown_mode_lists_the_known_ones() -> None:
    nv = Nvpmodel(conf=str(CONF / "orin_nano_jp6.conf"))
    with pytest.raises(ModeError) as err:
        nv.resolve("MAXN")
    assert str(err.value) == (
        "unknown power mode 'MAXN'; known modes on this board: 15W (id 0), 25W (id 1), MAXN_SUPER (id 2)"
    )
    with pytest.raises(ModeError, match="no power mode with id 7"):
        nv.resolve(7)
    assert isinstance(err.value, ValueError)


# -- reading and setting the mode ------------------------------------------------------------------


def test_current_and_set_mode(nano: Board) -> None:
    assert nano.nv.current_mode() == PowerMode(1, "25W")
    assert nano.nv.set_mode("MAXN_SUPER") == PowerMode(2, "MAXN_SUPER")
    assert nano.nv.current_mode().name == "MAXN_SUPER"
    assert nano.switches() == ["nvpmodel -m 2"]


def test_current_mode_falls_back_to_the_status_file(tmp_path: Path) -> None:
    (tmp_path / "status").write_text("pmode:0002\n")
    nv = Nvpmodel(conf=str(CONF / "agx_orin.conf"), nvpmodel="/nonexistent/nvpmodel", status=str(tmp_path / "status"))
    assert nv.current_mode() == PowerMode(2, "MODE_30W")
    nv.status = str(tmp_path / "missing")
    with pytest.raises(ModeError, match="nvpmodel not found.*ships with JetPack"):
        nv.current_mode()


def test_not_root_is_refused_before_any_call(nano: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PowerPermissionError, match="needs root: run kdedge with sudo"):
        nano.nv.set_mode("15W")
    with pytest.raises(PowerPermissionError):
        with nano.nv.sweep(["15W"]):
            pass
    assert nano.switches() == []


def test_nvpmodel_permission_failure_is_reported(nano: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVPMODEL_DENY", "1")
    with pytest.raises(PowerPermissionError, match="Permission denied"):
        nano.nv.set_mode("15W")


def test_a_switch_that_needs_a_reboot_is_reported(nano: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVPMODEL_REBOOT", "2")
    with pytest.raises(ModeError, match=r"did not switch to MAXN_SUPER \(id 2\) \(still 25W \(id 1\)\).*reboot"):
        nano.nv.set_mode("MAXN_SUPER")


# -- restoring the user's mode -------------------------------------------------------------------


def test_power_mode_restores_mode_and_clocks(nano: Board) -> None:
    with nano.nv.power_mode("15W") as mode:
        assert mode == PowerMode(0, "15W")
        assert nano.nv.current_mode() == mode
    assert nano.nv.current_mode() == PowerMode(1, "25W")
    assert nano.changes() == [
        "jetson_clocks --store FILE",
        "nvpmodel -m 0",
        "nvpmodel -m 1",
        "jetson_clocks --restore FILE",
    ]
    stored = next(ln.split()[-1] for ln in nano.log.read_text().splitlines() if "--store" in ln)
    assert not os.path.exists(stored)  # the temporary clocks file is removed


def test_sweep_visits_every_mode_then_restores(nano: Board) -> None:
    seen = []
    with nano.nv.sweep(["MAXN_SUPER", "15W", "25W"], lock_clocks=True) as modes:
        for mode in modes:
            seen.append((mode.name, nano.nv.current_mode().name))
    assert seen == [("MAXN_SUPER", "MAXN_SUPER"), ("15W", "15W"), ("25W", "25W")]
    assert nano.switches() == ["nvpmodel -m 2", "nvpmodel -m 0", "nvpmodel -m 1"]  # 25W: already there
    assert nano.calls().count("jetson_clocks") == 3  # clocks pinned in each mode
    assert nano.changes()[-1] == "jetson_clocks --restore FILE"


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_sweep_interrupted_midway_restores_the_mode(nano: Board, error: type[BaseException]) -> None:
    with pytest.raises(error):
        with nano.nv.sweep(["15W", "MAXN_SUPER"]) as modes:
            for mode in modes:
                if mode.name == "MAXN_SUPER":
                    raise error("stop here")
    assert nano.nv.current_mode() == PowerMode(1, "25W")
    assert nano.switches() == ["nvpmodel -m 0", "nvpmodel -m 2", "nvpmodel -m 1"]
    assert nano.changes()[-1] == "jetson_clocks --restore FILE"


def test_leaving_a_sweep_early_restores_the_mode(nano: Board) -> None:
    with nano.nv.sweep(["15W", "MAXN_SUPER"]) as modes:
        for _ in modes:
            break
    assert nano.nv.current_mode().name == "25W"
    assert nano.switches() == ["nvpmodel -m 0", "nvpmodel -m 1"]


def test_names_are_checked_before_anything_changes(nano: Board) -> None:
    with pytest.raises(ModeError, match="unknown power mode 'MAXN'"):
        with nano.nv.sweep(["15W", "MAXN"]):
            pass
    assert nano.calls() == []


def test_restore_failure_says_how_to_restore_by_hand(nano: Board, monkeypatch: pytest.MonkeyPatch) -> None:
    by_hand = r"could not restore your power mode 25W \(id 1\).*Restore it by hand: sudo .*nvpmodel -m 1"
    with pytest.raises(ModeError, match=by_hand):
        with nano.nv.power_mode("15W"):
            monkeypatch.setenv("FAKE_NVPMODEL_DENY", "1")
    monkeypatch.delenv("FAKE_NVPMODEL_DENY")
    assert nano.nv.current_mode().name == "15W"


def test_without_jetson_clocks_only_the_mode_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agx = Board(tmp_path, monkeypatch, "agx_orin.conf", clocks=False)
    with agx.nv.power_mode("MAXN"):
        pass
    assert agx.changes() == ["nvpmodel -m 0", "nvpmodel -m 2"]
    with pytest.raises(ModeError, match="jetson_clocks not found"):
        with agx.nv.sweep(["MAXN"], lock_clocks=True):
            pass


def test_sudo_prefix() -> None:
    nv = Nvpmodel(nvpmodel="/usr/sbin/nvpmodel", sudo=True)
    assert nv._cmd("/usr/sbin/nvpmodel", "-m", "0") == ["sudo", "-n", "/usr/sbin/nvpmodel", "-m", "0"]


# -- settings without modes, and the device id ---------------------------------------------------


def cpu_tree(root: Path, governors: list[str | None]) -> str:
    for i, gov in enumerate(governors):
        d = root / f"cpu{i}"
        d.mkdir(parents=True)
        if gov is not None:
            (d / "cpufreq").mkdir()
            (d / "cpufreq" / "scaling_governor").write_text(gov + "\n")
    (root / "cpufreq").mkdir(exist_ok=True)  # not a cpuN directory: ignored
    return str(root)


def test_cpu_setting_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kdedge.device.NVPMODEL_CONF", str(tmp_path / "no-nvpmodel.conf"))
    root = cpu_tree(tmp_path / "a", ["performance"] * 4)
    assert cpu_governors(root) == {0: "performance", 1: "performance", 2: "performance", 3: "performance"}
    s = current_setting(threads=2, cpu_root=root)
    assert s == DeviceSetting("cpu-2t-performance", "cpu", 2, ("performance",))
    mixed = cpu_tree(tmp_path / "b", ["schedutil", "performance", None])
    assert current_setting(threads=4, cpu_root=mixed).name == "cpu-4t-performance+schedutil"
    bare = current_setting(threads=1, cpu_root=str(tmp_path / "none"))
    assert bare.name == "cpu-1t" and bare.governors == ()
    assert current_setting(cpu_root=str(tmp_path / "none")).threads >= 1
    with pytest.raises(ValueError, match="threads must be >= 1"):
        current_setting(threads=0, cpu_root=root)


def test_jetson_setting_is_the_mode_name(nano: Board, tmp_path: Path) -> None:
    s = current_setting(threads=6, nvpmodel=nano.nv, cpu_root=cpu_tree(tmp_path / "cpu", ["schedutil"] * 6))
    assert (s.name, s.kind, s.mode) == ("25W", "nvpmodel", PowerMode(1, "25W"))
    assert s.to_dict()["mode"] == {"id": 1, "name": "25W"}


class FakeNvml:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def nvmlDeviceGetCount(self) -> int:
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.names[h]


SAFE = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")


def test_device_id_of_a_jetson(tmp_path: Path) -> None:
    (tmp_path / "model").write_bytes(b"NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00")
    ident = device_id(model_path=str(tmp_path / "model"), cpuinfo=str(tmp_path / "none"))
    assert ident == "nvidia-jetson-orin-nano-engineering-reference-developer-kit-super"


def test_device_id_of_a_pc_with_gpus(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n"
        "\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz\n"
    )
    kw = dict(model_path=str(tmp_path / "none"), cpuinfo=str(tmp_path / "cpuinfo"))
    n = os.cpu_count()
    assert device_id(include_gpu=False, **kw) == f"intel-xeon-platinum-8375c-cpu-2.90ghz-{n}c"
    one = device_id(nvml=FakeNvml(["NVIDIA H100 80GB HBM3"]), **kw)
    assert one == f"intel-xeon-platinum-8375c-cpu-2.90ghz-{n}c+nvidia-h100-80gb-hbm3"
    two = device_id(nvml=FakeNvml(["NVIDIA H100 80GB HBM3"] * 2), **kw)
    assert two.endswith("+2x-nvidia-h100-80gb-hbm3")
    assert device_id(nvml=FakeNvml([]), **kw) == device_id(include_gpu=False, **kw)
    for ident in (one, two):
        assert SAFE.match(ident) and len(ident) <= 130


def test_device_id_of_an_arm_board_without_device_tree(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nBogoMIPS\t: 108.00\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    )
    ident = device_id(model_path=str(tmp_path / "none"), cpuinfo=str(tmp_path / "cpuinfo"), include_gpu=False)
    assert ident == f"bcm2835-{os.cpu_count()}c"


def test_device_id_here_is_stable_and_safe() -> None:
    a, b = device_id(), device_id()
    assert a == b and SAFE.match(a)


def test_slug_shortens_long_names_stably() -> None:
    long = "x" * 200
    s = slug(long)
    assert len(s) == 80 and s == slug(long) and s != slug("x" * 199)
    assert slug("  ***  ") == "unknown"
    assert isinstance(ModeError("x"), PowerError)
