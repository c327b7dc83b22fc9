"""Bundles, fake sessions and a fake clock for the runtime tests.

Bundles are exported once per test process (the legacy exporter: a few seconds) and shared by
the runtime test modules through :func:`toy_bundle`; tests that modify a bundle copy it first.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kdedge.targets.session import AbortHandle, StageAborted

_CACHE: dict[str, Any] = {}

# the input part of two manifests: a grey 8x8 model without a resize, an RGB 12x12 one with one
GREY = {"input": {"name": "input", "shape": [None, 1, 8, 8], "dtype": "float32", "layout": "NCHW"},
        "preprocessing": {"dataset": "digits", "input_size": [8, 8], "resize": None, "scale": 1 / 16,
                          "mean": [0.3], "std": [0.4], "channel_order": "L"}}
RGB = {"input": {"name": "input", "shape": [None, 3, 12, 12], "dtype": "float32", "layout": "NCHW"},
       "preprocessing": {"dataset": "imagefolder", "input_size": [12, 12], "resize": 14, "scale": 1 / 255,
                         "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB"}}


def toy_bundle(tmp_root: Path) -> tuple[Path, Any, dict[str, Any]]:
    """(bundle path, torch model, data dict) of a briefly trained ToyAnytime on digits; cached."""
    if "toy" not in _CACHE:
        import torch

        from helpers_anytime import ToyAnytime, digits_data, train_toy
        from kdedge.export import export

        xtr, ytr, xv, yv, info = digits_data()
        torch.manual_seed(0)
        model = train_toy(ToyAnytime(), xtr, ytr, epochs=6)
        path = export(model, tmp_root / "toy.kdedge", info=info, val_data=(xv[:128], yv[:128]), exporter="legacy")
        _CACHE["toy"] = (path, model, {"x": xv, "y": yv, "info": info})
    return _CACHE["toy"]


def student_bundle(tmp_root: Path) -> tuple[Path, Any]:
    """(bundle path, torch student) of a one-stage ``last`` bundle (AHBF-like deploy()); cached."""
    if "student" not in _CACHE:
        import torch

        from helpers_anytime import ToyOnline, digits_data
        from kdedge.export import export

        _, _, xv, yv, info = digits_data()
        torch.manual_seed(1)
        model = ToyOnline().eval()
        path = export(model, tmp_root / "student.kdedge", info=info, val_data=(xv[:64], yv[:64]), exporter="legacy")
        _CACHE["student"] = (path, model.deploy().eval())
    return _CACHE["student"]


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class FakeClock:
    """A clock that only moves when a fake session runs (seconds)."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance_ms(self, ms: float) -> None:
        self.t += ms / 1e3


class FakeSession:
    """A stage session that takes ``latency_ms`` on the fake clock and returns preset logits.

    ``logits`` is either [classes] (the same per-member logits for every sample) or
    [samples, classes], indexed by the sample id: the value ``x[i, 0, 0, 0]`` of the input, which
    the session copies into element ``[i, 0, ...]`` of every carried tensor so that later stages
    (fed the carried tensors the runner kept, subset when samples leave) know their samples. It
    honours an abort handle's deadline: a call that would end after it stops there and raises
    :class:`StageAborted`, like a target whose watchdog fires.
    """

    can_abort = True
    can_bind = False

    def __init__(self, entry: Any, clock: FakeClock, latency_ms: float, logits: np.ndarray, log: list[str]) -> None:
        self.name = entry.name
        self.entry = entry
        self.inputs = tuple(i.tensor for i in entry.inputs)
        self.outputs = tuple(o.tensor for o in entry.outputs)
        self.clock, self.latency_ms, self.logits, self.log = clock, latency_ms, logits, log
        self.batches: list[int] = []

    def run(self, inputs: Mapping[str, np.ndarray], abort: AbortHandle | None = None) -> dict[str, np.ndarray]:
        first = inputs[self.inputs[0]]
        n = len(first)
        ids = first.reshape(n, -1)[:, 0].astype(np.int64)
        self.batches.append(n)
        self.log.append(self.name)
        end = self.clock.t + self.latency_ms / 1e3
        if abort is not None and abort.deadline is not None and end > abort.deadline:
            self.clock.t = max(self.clock.t, abort.deadline)
            abort.abort()
            raise StageAborted(f"{self.name} aborted")
        self.clock.t = end
        out = {}
        per_member = np.tile(self.logits, (n, 1)) if self.logits.ndim == 1 else self.logits[ids]
        for o in self.entry.outputs:
            if o.tensor == self.entry.logits_tensor:
                out[o.tensor] = (per_member * self.entry.members).astype(np.float32)
            else:
                carried = np.zeros((n, *o.shape[1:]), np.float32)
                carried.reshape(n, -1)[:, 0] = ids
                out[o.tensor] = carried
        return out

    def abort_handle(self) -> AbortHandle:
        return AbortHandle()

    def close(self) -> None:
        pass


def fake_factory(clock: FakeClock, latencies_ms: dict[str, float], logits: dict[str, np.ndarray],
                 log: list[str], made: dict[str, FakeSession] | None = None) -> Any:
    def factory(bundle: Any, entry: Any, options: Any) -> FakeSession:
        s = FakeSession(entry, clock, latencies_ms[entry.name], np.asarray(logits[entry.name], np.float64), log)
        if made is not None:
            made[entry.name] = s
        return s

    return factory


def png16(a: np.ndarray, mode: str) -> bytes:
    """A PNG of 16 bits per channel (RGB or LA; Pillow writes neither), values as given."""
    h, w, c = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, {"RGB": 2, "LA": 4}[mode], 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
