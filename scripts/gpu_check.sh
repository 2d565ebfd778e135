#!/usr/bin/env bash
# `make gpu-check`: what whoever holds a GPU runs, in one command (at most 8 minutes on an H100/H200):
# the CUDA tests (real kernels against the CPU reference, the server end to end on CUDA, and the
# fake-CUDA suite), then the GPU figures into benchmarks/results/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
status=0
timeout 270 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/cuda || status=$?
timeout 200 "$PY" -m benchmarks.gpu --arch resnet50 --batches 1,8,32,64 --iters 30 || status=$?
exit $status
