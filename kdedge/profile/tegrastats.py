"""Parse the power rails out of NVIDIA Jetson ``tegrastats`` lines.

``tegrastats`` prints one line per interval with memory, CPU, engines, temperatures and, at the
end, one token per power rail. Three rail formats exist:

=====================  ==========================================  ========================
layout                 rail token                                  seen on
=====================  ==========================================  ========================
``mw-no-unit``         ``POM_5V_IN 933/933``, ``VDD_IN 1038/1134``   JetPack 4 (Nano, TX2,
                                                                   Xavier: ``GPU 1155/1155``)
``mw-pair``            ``VDD_IN 5704mW/5704mW``                    JetPack 5 and 6 (Orin)
``mw-triple``          ``VDD_GPU_SOC 5139mW/5139mW/5139mW``        JetPack 7
=====================  ==========================================  ========================

In every layout the first value is the instantaneous power and the second the running average
since tegrastats started; the third value that JetPack 7 adds is kept as ``third_w`` but not used
(its meaning is not documented in the material available here). Values without a unit are
milliwatts; ``W`` is accepted too.

Memory tokens look alike (``RAM 2257/30536MB``, ``SWAP 0/15268MB``) but end in a unit other than
watts, so they are never taken for rails.

Example:
    >>> sample = parse_line("RAM 2296/7620MB (lfb 6x4MB) VDD_IN 5704mW/5690mW VDD_SOC 1587mW/1580mW")
    >>> sample.rails["VDD_IN"].instant_w, sample.layout
    (5.704, 'mw-pair')
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kdedge.profile.meters.base import PowerError

__all__ = ["RailPower", "TegrastatsFormatError", "TegrastatsSample", "parse_line"]

_NUM = r"(\d+(?:\.\d+)?)"
_UNIT = r"(mW|W)?"
# A rail: NAME, a space, two or three slash-separated values with an optional watt unit, and
# then whitespace or the end of the line (so "3964MB" never matches).
_RAIL_RE = re.compile(
    rf"(?<![\w@/.])([A-Za-z][A-Za-z0-9_]*) {_NUM}{_UNIT}/{_NUM}{_UNIT}(?:/{_NUM}{_UNIT})?(?=\s|$)"
)
_STAMP_RE = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s")
_SCALE = {None: 1e-3, "mW": 1e-3, "W": 1.0}


class TegrastatsFormatError(PowerError):
    """A tegrastats line that this parser does not recognise."""


@dataclass(frozen=True)
class RailPower:
    """Power of one rail in one tegrastats line, in watts."""

    instant_w: float
    average_w: float
    third_w: float | None = None


@dataclass(frozen=True)
class TegrastatsSample:
    """The rails of one tegrastats line.

    Args:
        rails: rail name -> :class:`RailPower`, in the order printed.
        layout: ``"mw-no-unit"`` (JetPack 4), ``"mw-pair"`` (JetPack 5/6) or ``"mw-triple"``
            (JetPack 7).
        stamp: the ``MM-DD-YYYY HH:MM:SS`` prefix newer tegrastats print, if any.
    """

    rails: dict[str, RailPower]
    layout: str
    stamp: str | None = None

    def watts(self) -> dict[str, float]:
        """Instantaneous watts per rail."""
        return {name: rail.instant_w for name, rail in self.rails.items()}


def parse_line(line: str) -> TegrastatsSample:
    """Parse the power rails of one tegrastats line.

    Args:
        line: one line of ``tegrastats`` output.

    Returns:
        The rails and the layout they were printed in.

    Raises:
        TegrastatsFormatError: the line holds no rail this parser recognises (the message quotes
            the line).
    """
    text = line.strip()
    rails: dict[str, RailPower] = {}
    layouts = set()
    for m in _RAIL_RE.finditer(text):
        name, a, ua, b, ub, c, uc = m.groups()
        if name == "NC":  # a monitor channel that is not connected (AGX Orin prints two)
            continue
        if (ua is None) != (ub is None) or (c is not None and (uc is None) != (ua is None)):
            raise TegrastatsFormatError(f"tegrastats rail {m.group(0)!r} mixes units; line: {text!r}")
        rails[name] = RailPower(
            instant_w=float(a) * _SCALE[ua],
            average_w=float(b) * _SCALE[ub],
            third_w=None if c is None else float(c) * _SCALE[uc],
        )
        layouts.add("mw-triple" if c is not None else "mw-no-unit" if ua is None else "mw-pair")
    if not rails:
        raise TegrastatsFormatError(
            "tegrastats line not recognised: no power rail like 'VDD_IN 5704mW/5704mW', "
            f"'POM_5V_IN 933/933' or 'VDD_IN 1mW/2mW/3mW' in {text[:300]!r}"
            + ("" if text else " (empty line)")
        )
    if len(layouts) > 1:
        raise TegrastatsFormatError(
            f"tegrastats line mixes rail formats ({', '.join(sorted(layouts))}): {text[:300]!r}"
        )
    stamp = _STAMP_RE.match(line)
    return TegrastatsSample(rails=rails, layout=layouts.pop(), stamp=stamp.group(1) if stamp else None)
