"""The engine file (``tensorrt/stageK.plan``): header, metadata, serialized engine; the device facts
an engine is tied to, and the refusal of an engine built elsewhere."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any, Mapping

from kdedge.io import atomic_write_bytes
from kdedge.targets.base import TargetError
from kdedge.targets.tensorrt import cuda

MAGIC = b"KDTRT1\n"
REBUILD = "rebuild the engines on this device: kdedge build BUNDLE --target tensorrt (or kdedge export RUN --target tensorrt here)"


class EngineMismatch(TargetError):
    """An engine built for another GPU, TensorRT, CUDA or JetPack version."""




def jetpack_facts(root: Path = Path("/")) -> dict[str, Any]:
    """L4T release and board of a Jetson (None elsewhere)."""
    rel = root / "etc/nv_tegra_release"
    model = root / "proc/device-tree/model"
    l4t = None
    if rel.is_file():
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", rel.read_text())
        l4t = f"{m.group(1)}.{m.group(2)}" if m else rel.read_text().splitlines()[0].strip()
    return {"l4t": l4t, "board": model.read_text().strip("\x00\n ") if model.is_file() else None}


def device_facts() -> dict[str, Any]:
    """This machine's TensorRT, CUDA runtime, GPU and JetPack facts (needs tensorrt and cuda-python)."""
    import tensorrt as trt

    cudart = cuda._cudart()
    _check = cuda._check
    err, ver = cudart.cudaRuntimeGetVersion()
    _check(err, "cudaRuntimeGetVersion")
    err, dev = cudart.cudaGetDevice()
    _check(err, "cudaGetDevice")
    err, prop = cudart.cudaGetDeviceProperties(dev)
    _check(err, "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"tensorrt": trt.__version__, "cuda": f"{ver // 1000}.{(ver % 1000) // 10}", "gpu": name.strip("\x00 "),
            "compute_capability": f"{prop.major}.{prop.minor}", **{f"jetson_{k}": v for k, v in jetpack_facts().items()}}


def check_engine_meta(meta: Mapping[str, Any], here: Mapping[str, Any], where: str = "engine") -> None:
    """Refuse an engine built with another TensorRT, GPU, CUDA major or L4T release than ``here``."""
    for key, what in (("tensorrt", "TensorRT"), ("compute_capability", "GPU compute capability"), ("gpu", "GPU"),
                      ("jetson_l4t", "JetPack (L4T)")):
        if meta.get(key) != here.get(key):
            raise EngineMismatch(f"{where} was built for {what} {meta.get(key)!r}, this device has {here.get(key)!r}; "
                                 f"{REBUILD}")
    if str(meta.get("cuda", "")).split(".")[0] != str(here.get("cuda", "")).split(".")[0]:
        raise EngineMismatch(f"{where} was built with CUDA {meta.get('cuda')}, this device has {here.get('cuda')}; {REBUILD}")


def write_engine(path: Path, meta: Mapping[str, Any], engine: bytes) -> None:
    """Write an engine file (header, metadata, engine) atomically."""
    head = json.dumps(dict(meta), sort_keys=True).encode()
    atomic_write_bytes(path, MAGIC + struct.pack("<I", len(head)) + head + engine)


def read_engine(path: Path) -> tuple[dict[str, Any], bytes]:
    """The metadata and serialized engine of an engine file."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise TargetError(f"{path} is not a kdedge TensorRT engine file; {REBUILD}")
    (n,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        meta = json.loads(data[start:start + n])
    except ValueError:
        raise TargetError(f"{path}: damaged engine metadata; {REBUILD}") from None
    return meta, data[start + n:]


def timing_cache_path(directory: Path, here: Mapping[str, Any]) -> Path:
    """A timing cache per TensorRT version and GPU (caches are tied to both)."""
    key = re.sub(r"[^A-Za-z0-9_.]", "_", f"trt{here.get('tensorrt')}-sm{here.get('compute_capability')}")
    return Path(directory) / f"timing-{key}.cache"
