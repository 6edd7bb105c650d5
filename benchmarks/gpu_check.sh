#!/usr/bin/env bash
# GPU path check: fold on the GPU vs on the CPU, and PyTorch CUDA latency (CUDA events, with and
# without CUDA graphs) of baseline vs folded resnet18-CIFAR and ResNet-56. See gpu_check.py.
#   benchmarks/gpu_check.sh [--out FILE] [more gpu_check.py options]
# Needs: this checkout, the real data (FOLDSHIP_SHARED_DATA, else ../shared/data, else a copy in
# .devdata/), and the pinned packages: $PYTHON, else .venv/bin/python, else python3 with the
# checkout on PYTHONPATH; wheels in .whl/ (e.g. torch-pruning, polygraphy on a bare GPU image)
# are installed into /tmp/foldship-site first, never into the system. Exits 0 with a message
# when no GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${FOLDSHIP_SHARED_DATA:-}" ] && [ ! -d ../shared/data ] && [ -d .devdata/checkpoints ]; then
  export FOLDSHIP_SHARED_DATA="$PWD/.devdata"
fi
needs() { "$PYTHON" -c "import torch, torchvision, torch_pruning, polygraphy, yaml, rich" 2> /dev/null; }
if ! needs && compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/foldship-site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/foldship-site"
fi
if ! needs; then
  echo "gpu_check: $PYTHON cannot import torch, torchvision, torch_pruning, polygraphy, yaml and rich;" \
       "install requirements.lock, or put the missing wheels in .whl/" >&2
  exit 2
fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
