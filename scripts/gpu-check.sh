#!/usr/bin/env bash
# On a lent CUDA machine, after scripts/gpu-pack.sh here: the device tool's
#   run(command="scripts/gpu-check.sh", carry=[".gpu-site"], timeout_s=540)
# Checks the chain clicks' device code against the OpenCV path on CUDA, then prints the GPU rows
# of the README (SAM 2.1 large, RANDOM weights: speed only). Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu-site/py:$PWD" PYTHONUNBUFFERED=1 SMARTSAM_DATASETS="$PWD/.gpu-site/datasets"
img="$PWD/.gpu-site/datasets/GrabCut/img/106024.jpg"
{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'; } 2>&1 | tee "$OUT/machine.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_chain_clicks.py 2>&1 | tee "$OUT/checks.txt"
timeout 300 python3 benchmarks/latency.py --backbone sam2.1_hiera_large-random --device cuda --image "$img" \
  --skip-scaling --repeats 5 2>&1 | tee "$OUT/latency.md"
