#!/usr/bin/env bash
# A venv for the deprecated onnxruntime-training, the parity baseline of the
# step programs. It cannot share a venv with the maintained `onnxruntime`
# (both install the `onnxruntime` module), and has wheels only for CPython
# <= 3.11 on Linux x86_64.
#
#   benchmarks/make_ort_training_venv.sh               # .venv-ort-training: export + device (benchmarks/backends.py)
#   benchmarks/make_ort_training_venv.sh --device-only # just the device side (tests/device/test_old_bundles.py)
#
# The full venv installs torch first (the CPU build), then edgetailor's server
# and formats dependencies except onnxruntime, then edgetailor itself without
# dependencies, so that pip never pulls `onnxruntime` in beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
device_only=0
if [ "${1:-}" = "--device-only" ]; then device_only=1; shift; fi
venv="${1:-.venv-ort-training}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
"$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
if [ "$device_only" = 0 ]; then
  "$pip" install -q torch==2.13.0
fi
"$pip" install -q "onnxruntime-training>=1.19,<1.20" numpy click jsonschema pillow
if [ "$device_only" = 0 ]; then
  "$pip" install -q "onnx>=1.16" "scikit-learn>=1.3" "matplotlib>=3.7" "torch-pruning>=1.5" \
    "executorch>=1.5,<1.6" "litert-torch>=0.10" "ai-edge-litert>=2.0"
fi
"$pip" install -q --no-deps -e .
if "$venv/bin/python" -c "import importlib.metadata as m; m.version('onnxruntime')" 2>/dev/null; then
  echo "error: $venv has onnxruntime beside onnxruntime-training" >&2
  exit 1
fi
echo "ready: $venv ($("$venv/bin/python" -c 'import importlib.metadata as m; print("onnxruntime-training", m.version("onnxruntime-training"))'))"
