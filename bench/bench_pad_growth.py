"""How much zero-padding of grouped channels pays (results in docs/performance.md, they set
``kdedge.export.pad.MAX_GROWTH``). Not a test: it times things.

One fused HNE graph exported without padding, then padded by :mod:`kdedge.export.pad` with
several limits on how much a group may grow (``round_up(c, block) <= (1 + limit) * c``, block 16
unless ``--blocks`` says otherwise), all variants timed in plain onnxruntime sessions (one
thread), in rounds in a new random order each (seeded), at batch 1 and 32; outputs are checked equal first.

Graphs:

- ``mbv2-w0.25``: the MobileNetV2 HNE (``B: 2``) at width 0.25 on 3×32×32, random weights,
  exported here (about 30 s); 24 and 56 channels per member in its grouped layers;
- ``--onnx FILE --shape C,H,W``: any exported graph (e.g. the demo HNE's ``prefix3.onnx``,
  whose members have 8 channels per group in places).

    .venv/bin/python bench/bench_pad_growth.py
    .venv/bin/python bench/bench_pad_growth.py --onnx /tmp/kdedge-bench-serve/hne-w1-e8.kdedge/onnx/prefix3.onnx \\
        --shape 1,28,28
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdedge.device import cpu_model


def tiny_mbv2(work: Path) -> Path:
    """The fused graph of a width-0.25 MobileNetV2 HNE, exported with ``pad_channels=0``."""
    import torch

    from kdedge.export import export
    from kdedge.models import create_model

    torch.manual_seed(0)
    m = create_model("hne", num_classes=10, in_channels=3, input_size=(32, 32), config="mobilenetv2", B=2, width=0.25)
    info = {"num_classes": 10, "in_channels": 3, "input_size": [32, 32], "mean": [0.0] * 3, "std": [1.0] * 3,
            "scale": 255.0, "channel_order": "RGB", "class_names": [str(i) for i in range(10)]}
    x = torch.randn(16, 3, 32, 32)
    b = export(m, work / "mbv2-w0.25.kdedge", info=info, val_data=(x, torch.randint(0, 10, (16,))), pad_channels=0,
               force=True)
    return b / "onnx" / "prefix2.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=None, help="an unpadded graph (default: export mbv2-w0.25)")
    ap.add_argument("--shape", default="3,32,32", help="its input, C,H,W")
    ap.add_argument("--limits", default="0.25,0.5,1,3", help="growth limits to compare")
    ap.add_argument("--blocks", default="16", help="channel blocks to pad to (16: AVX-512's NCHWc block, 8: AVX2's)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort

    import kdedge.export.pad as pad
    from kdedge.targets.ort_session import OrtOptions

    shape = tuple(int(v) for v in args.shape.split(","))
    path = args.onnx or tiny_mbv2(Path(tempfile.mkdtemp(prefix="kdedge-pad-growth-")))
    src = onnx.load(str(path))
    variants: dict[str, Any] = {"unpadded": src}
    saved = pad.MAX_GROWTH
    try:
        blocks = [int(v) for v in args.blocks.split(",")]
        for block in blocks:
            for limit in (float(v) for v in args.limits.split(",")):
                pad.MAX_GROWTH = limit
                m = copy.deepcopy(src)
                n = pad.pad_grouped_channels(m, block)
                tag = f"block {block}, " if len(blocks) > 1 else ""
                variants[f"{tag}limit {limit:g} ({n} convs padded)"] = m
    finally:
        pad.MAX_GROWTH = saved
    so = OrtOptions(threads=1).session_options()
    sess = {k: ort.InferenceSession(v.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for k, v in variants.items()}
    name = sess["unpadded"].get_inputs()[0].name
    cpu = cpu_model()
    print(f"\n{path}, {cpu}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; 1 thread; medians (ms)\n")
    print("| variant | batch 1 | batch 32 |\n|---|---|---|")
    res: dict[str, list[float]] = {k: [] for k in sess}
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
        ref = sess["unpadded"].run(None, {name: x})[0]
        for k, s in sess.items():
            if not np.allclose(s.run(None, {name: x})[0], ref, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{k}: outputs differ from the unpadded graph's")
        times: dict[str, list[float]] = {k: [] for k in sess}
        names = list(sess)
        per = 20 if batch == 1 else 5
        order = random.Random(0)
        for _ in range(args.rounds):  # a new order each round: no graph always follows the same one
            for k in order.sample(names, len(names)):
                s = sess[k]
                s.run(None, {name: x})
                for _ in range(per):
                    t0 = time.perf_counter()
                    s.run(None, {name: x})
                    times[k].append((time.perf_counter() - t0) * 1e3)
        for k, v in times.items():
            res[k].append(float(np.median(v)))
    for k, (b1, b32) in res.items():
        print(f"| {k} | {b1:.3f} | {b32:.3f} |")


if __name__ == "__main__":
    main()
