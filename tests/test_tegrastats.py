"""tegrastats rail parsing on fixture lines of JetPack 4, 5, 6 and 7."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdedge.profile.power import PowerError
from kdedge.profile.tegrastats import TegrastatsFormatError, parse_line

FIX = Path(__file__).parent / "fixtures" / "power" / "tegrastats"


def lines(name: str) -> list[str]:
    return [ln for ln in (FIX / name).read_text().splitlines() if ln.strip()]


def test_jetpack6_orin_nano_pairs() -> None:
    first, second = (parse_line(ln) for ln in lines("jp6_orin_nano.txt"))
    assert first.layout == "mw-pair"
    assert list(first.rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert first.rails["VDD_IN"].instant_w == pytest.approx(5.704)
    assert second.rails["VDD_IN"].instant_w == pytest.approx(9.876)
    assert second.rails["VDD_IN"].average_w == pytest.approx(7.790)
    assert second.rails["VDD_CPU_GPU_CV"].third_w is None
    assert first.stamp == "11-05-2024 14:02:51"
    # temperatures, engines and memory never become rails
    assert set(second.watts()) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}


def test_jetpack5_agx_orin_skips_not_connected_channels() -> None:
    sample = parse_line(lines("jp5_agx_orin.txt")[1])
    assert sample.layout == "mw-pair"
    assert sample.watts() == pytest.approx(
        {"VDD_GPU_SOC": 11.893, "VDD_CPU_CV": 1.584, "VIN_SYS_5V0": 3.528, "VDDQ_VDD2_1V8AO": 1.004}
    )


def test_jetpack7_three_values_per_rail() -> None:
    sample = parse_line(lines("jp7_agx_orin.txt")[0])
    assert sample.layout == "mw-triple"
    gpu = sample.rails["VDD_GPU_SOC"]
    assert (gpu.instant_w, gpu.average_w, gpu.third_w) == pytest.approx((5.012, 4.987, 5.230))
    # "cpu@52.125C/52.125C" temperature pairs are not rails
    assert set(sample.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("jp4_nano.txt", {"POM_5V_IN": 2.301, "POM_5V_GPU": 0.040, "POM_5V_CPU": 0.602}),
        (
            "jp4_tx2.txt",
            {
                "VDD_SYS_GPU": 0.152,
                "VDD_SYS_SOC": 0.381,
                "VDD_4V0_WIFI": 0.0,
                "VDD_IN": 1.981,
                "VDD_SYS_CPU": 0.152,
                "VDD_SYS_DDR": 0.191,
            },
        ),
        ("jp4_xavier.txt", {"GPU": 0.0, "CPU": 0.311, "SOC": 1.244, "CV": 0.0, "VDDRQ": 0.155, "SYS5V": 1.718}),
    ],
)
def test_jetpack4_values_without_unit_are_milliwatts(name: str, expected: dict[str, float]) -> None:
    sample = parse_line(lines(name)[0])
    assert sample.layout == "mw-no-unit"
    # "RAM 1542/3956MB", "SWAP 0/1978MB" and "IRAM 0/252kB" look alike but are not rails
    assert sample.watts() == pytest.approx(expected)
    assert sample.stamp is None


def test_watt_unit_and_decimals() -> None:
    sample = parse_line("RAM 1/2MB VDD_IN 12.5W/11W VDD_SOC 1500.5mW/1400mW")
    assert sample.watts() == pytest.approx({"VDD_IN": 12.5, "VDD_SOC": 1.5005})


@pytest.mark.parametrize("line", lines("unrecognised.txt"))
def test_lines_without_rails_are_refused_quoting_the_line(line: str) -> None:
    with pytest.raises(TegrastatsFormatError) as err:
        parse_line(line)
    msg = str(err.value)
    assert line[:40] in msg
    assert "VDD_IN 5704mW/5704mW" in msg  # says what was expected
    assert isinstance(err.value, PowerError) and isinstance(err.value, ValueError)


def test_empty_line_and_mixed_formats_are_refused() -> None:
    with pytest.raises(TegrastatsFormatError, match="empty line"):
        parse_line("   ")
    with pytest.raises(TegrastatsFormatError, match="mixes rail formats"):
        parse_line("VDD_IN 5704mW/5704mW VDD_SOC 1/1")
    with pytest.raises(TegrastatsFormatError, match="mixes units"):
        parse_line("VDD_IN 5704mW/5704")
