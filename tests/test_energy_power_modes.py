"""``kdedge profile --power-mode``: one profile per nvpmodel mode, the user's mode always restored
(fake nvpmodel / jetson_clocks executables over the fixture .conf files)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers_runtime import toy_bundle
from kdedge.cli.main import app
from kdedge.profile.latency import LatencyProfile, current_key, profile_filename, profile_power_modes
from kdedge.profile.meters import NoneMeter
from kdedge.profile.modes import ModeError, Nvpmodel

FIX = Path(__file__).parent / "fixtures" / "power"
CONF = str(FIX / "nvpmodel" / "orin_nano_jp6.conf")


def fake_tool(tmp_path: Path, name: str) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / name
    exe.write_text(f"#!{sys.executable} -S\n" + (FIX / "tools" / f"{name}.py").read_text())
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return toy_bundle(tmp_path_factory.mktemp("bundles"))[0]


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """An Orin Nano whose user runs 25W (id 1, the conf's default)."""
    log, state = tmp_path / "calls.log", tmp_path / "mode"
    monkeypatch.setenv("FAKE_NVPMODEL_CONF", CONF)
    monkeypatch.setenv("FAKE_NVPMODEL_STATE", str(state))
    monkeypatch.setenv("FAKE_TOOL_LOG", str(log))
    return {"nvpmodel": fake_tool(tmp_path, "nvpmodel"), "jetson_clocks": fake_tool(tmp_path, "jetson_clocks"),
            "log": log, "state": state, "status": str(tmp_path / "status")}


def _nv(board: dict) -> Nvpmodel:
    return Nvpmodel(conf=CONF, nvpmodel=board["nvpmodel"], jetson_clocks=board["jetson_clocks"],
                    status=board["status"])


def _switches(board: dict) -> list[str]:
    return [ln for ln in board["log"].read_text().splitlines() if ln.startswith("nvpmodel -m")]


def test_one_profile_per_mode_and_mode_restored(toy: Path, tmp_path: Path, board: dict) -> None:
    dst = tmp_path / "toy.kdedge"
    shutil.copytree(toy, dst)
    nv = _nv(board)
    res = profile_power_modes(dst, ["15W", "MAXN_SUPER"], nvpmodel=nv, batches=(1,), runs=2, warmup=0, threads=1,
                              plot=False, meter=NoneMeter("test"))
    device = current_key(1)[0]
    assert [p.setting for p, _, _ in res] == ["15W", "MAXN_SUPER"]
    for prof, path, _ in res:
        assert path == dst / "profiles" / profile_filename(device, prof.setting) and path.is_file()
        assert path.with_suffix(".csv").read_text().count(f",{prof.setting},") == 7
        data = json.loads(path.read_text())
        assert data["setting_detail"]["kind"] == "nvpmodel" and data["setting_detail"]["mode"]["name"] == prof.setting
        assert data["energy"]["measured"] is False
    assert _switches(board) == ["nvpmodel -m 0", "nvpmodel -m 2", "nvpmodel -m 1"]  # 25W restored last
    assert board["state"].read_text().strip() == "1"
    assert nv.current_mode().name == "25W"


def test_unknown_mode_changes_nothing(toy: Path, tmp_path: Path, board: dict) -> None:
    with pytest.raises(ModeError, match="MAXN_SUPR"):
        profile_power_modes(toy, ["15W", "MAXN_SUPR"], nvpmodel=_nv(board), runs=1, warmup=0, threads=1, plot=False)
    assert not board["log"].exists() or not _switches(board)


def test_mode_restored_after_an_error(toy: Path, tmp_path: Path, board: dict) -> None:
    with pytest.raises(ValueError, match="runs >= 1"):
        profile_power_modes(toy, ["15W"], nvpmodel=_nv(board), runs=0, warmup=0, threads=1, plot=False)
    assert _switches(board) == ["nvpmodel -m 0", "nvpmodel -m 1"]


def test_cli_power_mode(toy: Path, tmp_path: Path, board: dict) -> None:
    dst = tmp_path / "toy.kdedge"
    shutil.copytree(toy, dst)
    res = CliRunner().invoke(app, ["profile", str(dst), "--threads", "1", "--runs", "2", "--warmup", "0", "--no-plot",
                                   "--power-mode", "15W,25W", "--json",
                                   "--nvpmodel-exe", board["nvpmodel"], "--nvpmodel-conf", CONF,
                                   "--jetson-clocks-exe", board["jetson_clocks"]])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [p["setting"] for p in out] == ["15W", "25W"]
    assert sorted(p.name for p in (dst / "profiles").glob("*.json")) == sorted(
        Path(p["path"]).name for p in out)
    assert LatencyProfile.load(out[0]["path"]).setting == "15W"
    assert board["state"].read_text().strip() == "1"
    bad = CliRunner().invoke(app, ["profile", str(dst), "--power-mode", ",", "--quiet"])
    assert bad.exit_code != 0 and "--power-mode takes" in bad.output
