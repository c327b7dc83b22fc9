"""Run a bundle's ONNX stage chain on saved inputs with onnxruntime alone and print JSON: the
top-1 accuracy of each stage's own logits and the logits themselves. Used by
test_int8_emulated_cpu.py under ``qemu-x86_64 -cpu <model>`` to see what an INT8 bundle computes on
a CPU this machine is not (e.g. AVX2 without VNNI). numpy + onnxruntime only, no kdedge import:
it must start fast under emulation.

    python tests/int8_probe.py BUNDLE inputs.npz          # as onnxruntime runs it on this CPU
    python tests/int8_probe.py BUNDLE inputs.npz exact    # no graph optimisation: the QDQ graph as
                                                          # written, float convolutions of the
                                                          # dequantised weights (no integer kernel,
                                                          # so no saturation on any CPU)
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort


def main(bundle: str, data: str, mode: str = "") -> None:
    manifest = json.load(open(f"{bundle}/manifest.json"))
    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if mode == "exact":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif mode:
        raise SystemExit(f"unknown mode {mode!r} (exact, or nothing)")
    feeds = {"input": x}
    acc, logits = [], []
    for st in manifest["stages"]:
        sess = ort.InferenceSession(f"{bundle}/{st['files']['onnx']['path']}", so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        out = dict(zip(names, sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})))
        feeds.update(out)
        lg = out[next(o["tensor"] for o in st["outputs"] if o["name"] == st["logits"])]
        acc.append(float((lg.argmax(1) == y).mean()))
        logits.append(lg.tolist())
    print(json.dumps({"accuracy": acc, "logits": logits}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
