#!/usr/bin/env bash
# The GPU check (docs/targets.md, "GPU check"): install kdedge from this working tree into the
# machine's Python without touching its torch, then run `python -m kdedge.gpu_check OUT ...`.
#
#   bash scripts/gpu_check.sh OUT                 # on the GPU machine: every part, within 8 minutes
#   bash scripts/gpu_check.sh OUT --no-gpu        # anywhere: the GPU parts skipped, one line each
#   bash scripts/gpu_check.sh OUT --device cpu    # rehearse every part on the CPU (tiny sizes)
#   bash scripts/gpu_check.sh --fetch-wheels      # here, with network: the wheels the GPU machine lacks
#
# Install, in order: the wheels under build/gpu-wheels/ (if any) into a folder of their own
# ($KDEDGE_GPU_SITE, put first on PYTHONPATH), never over the machine's packages; then kdedge
# itself with `pip install --no-deps --no-build-isolation --no-index -e .` unless the Python
# already imports it from this tree (--no-install skips both). $PYTHON picks the interpreter
# (default python3, the one that holds torch on the GPU machine). Other arguments go to
# kdedge.gpu_check (--parts, --budget-s, --work, --keep-work; see its --help).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
PY=${PYTHON:-python3}
WHEELS=${KDEDGE_GPU_WHEELS:-$ROOT/build/gpu-wheels}
SITE=${KDEDGE_GPU_SITE:-/tmp/kdedge-gpu-site}
# What the GPU machine's image lacks of kdedge's dependencies (KINDS.md lists its packages):
# jsonschema and its three dependencies; rpds-py is compiled, so its wheel is for CPython 3.12.
FETCH=(jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1)

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${FETCH[@]}"
  echo "wheels in $WHEELS (carry build/gpu-wheels with the device run)"
  exit 0
fi

install=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-install" ]; then install=0; else args+=("$a"); fi
done

kdedge_root() {  # the folder holding the kdedge that $PY imports, seen from outside the tree
  (cd / && "$PY" -c 'import kdedge, os; print(os.path.dirname(os.path.dirname(os.path.realpath(kdedge.__file__))))' \
    2>/dev/null) || true
}

if [ "$install" = 1 ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "install: ${#wheels[@]} carried wheel(s) from $WHEELS into $SITE"
  fi
  if [ "$(kdedge_root)" != "$ROOT" ]; then
    if (cd "$ROOT" && "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .); then
      echo "install: kdedge from $ROOT (pip install --no-deps -e .)"
    fi
    if [ "$(kdedge_root)" != "$ROOT" ]; then
      echo "install: pip did not make this tree's kdedge importable; using PYTHONPATH=$ROOT"
      export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    fi
  else
    echo "install: $PY already imports kdedge from $ROOT"
  fi
fi
cd "$ROOT"
exec "$PY" -m kdedge.gpu_check ${args[@]+"${args[@]}"}
