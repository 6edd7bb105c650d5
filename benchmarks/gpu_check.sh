#!/usr/bin/env bash
# GPU path check in one call: fold on the GPU vs on the CPU, compression time on each, and PyTorch
# CUDA latency (CUDA graphs, and plain CUDA events) of baseline vs folded resnet18-CIFAR and
# ResNet-56 at batch 1 and 128, next to the MAC ratio; one JSON. See gpu_check.py and docs/gpu.md.
#
#   benchmarks/gpu_check.sh --prepare     # here, with PyPI: wheels into .whl/, data into .devdata/
#   benchmarks/gpu_check.sh [--out FILE] [more gpu_check.py options]    # on the GPU machine
#
# The GPU machine needs this checkout and a Python with PyTorch (CUDA; any recent version) and
# numpy, scipy, pyyaml, safetensors; no network. What else foldship's compression imports and such
# an image lacks (torch-pruning) travels as pure-Python wheels in .whl/, installed with --no-index
# --no-deps into /tmp/foldship-site, never into the system. The data: FOLDSHIP_SHARED_DATA, else
# ../shared/data, else the copy in .devdata/. Python: $PYTHON, else .venv/bin/python, else python3.
# Exits 0 with a message when no GPU is visible (nothing run, no JSON).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# Pure-Python wheels a bare PyTorch image may lack, at requirements.lock's pins.
WHEELS=(torch-pruning)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .whl .devdata/checkpoints/cifar10_resnet_akamaster .devdata/cifar10
  for name in "${WHEELS[@]}"; do
    pin=$(grep -i "^${name}==" requirements.lock)
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pin"
  done
  shared="${FOLDSHIP_SHARED_DATA:-../shared/data}"
  cp "$shared/checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th" .devdata/checkpoints/cifar10_resnet_akamaster/
  cp "$shared/cifar10/cifar10_test_first1000_lossless.npz" .devdata/cifar10/
  echo "gpu_check: prepared $(ls .whl) and $(du -sh .devdata | cut -f1) of data; carry .whl and .devdata"
  exit 0
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${FOLDSHIP_SHARED_DATA:-}" ] && [ ! -d ../shared/data ] && [ -d .devdata/checkpoints ]; then
  export FOLDSHIP_SHARED_DATA="$PWD/.devdata"
fi
needs() { "$PYTHON" -c "import torch, torchvision, torch_pruning, numpy, scipy, yaml, safetensors" 2> /dev/null; }
if ! needs; then  # checked once when everything imports: each check costs seconds of imports
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/foldship-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/foldship-site"
  fi
  if ! needs; then
    echo "gpu_check: $PYTHON cannot import torch, torchvision, torch_pruning, numpy, scipy, yaml and safetensors;" \
         "install requirements.lock, or put the missing wheels in .whl/ (benchmarks/gpu_check.sh --prepare)" >&2
    exit 2
  fi
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
