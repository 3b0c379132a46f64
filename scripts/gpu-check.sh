#!/usr/bin/env bash
# On a lent CUDA machine, after scripts/gpu-pack.sh here: the device tool's
#   run(command="scripts/gpu-check.sh", carry=[".gpu-site"], timeout_s=540)
# The equality tests on CUDA (chain clicks on the device against OpenCV; a job alone, in a batch
# of 16 mixed jobs and one call at a time; rows of several images in one pass), then every GPU
# table of the README in one go (SAM 2.1 large, RANDOM weights: speed only): host reads per click
# on each chain-click path, per-click latency, eager against compiled (the compiled step's tests run
# first, with dynamo's eager backend),
# annotators at once (scheduler vs one at a time, with a pre-labeling queue), instances per task.
# Everything lands in $OUT; budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/.gpu-site/py:$PWD" PYTHONUNBUFFERED=1 SMARTSAM_DATASETS="$PWD/.gpu-site/datasets"
img="$PWD/.gpu-site/datasets/GrabCut/img/106024.jpg"
big=sam2.1_hiera_large-random
{ nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'; } 2>&1 | tee "$OUT/machine.txt"
# their [cpu] twins ran in CI: on 2 cores the three files took 105 s with them (2026-12-07)
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_chain_clicks.py tests/test_batch.py tests/test_compiled.py \
  -k "not cpu" 2>&1 | tee "$OUT/checks.txt"
timeout 35 python3 benchmarks/transfers.py --backbone $big --device cuda --image "$img" 2>&1 | tee "$OUT/transfers.md"
timeout 100 python3 benchmarks/latency.py --backbone $big --device cuda --image "$img" \
  --skip-scaling --skip-compile --repeats 5 2>&1 | tee "$OUT/latency.md"
# eager against compiled (inductor + CUDA graphs) and compiled + the step on the device, A B C A B C:
# where it is faster, smartsam/backbones/compiled.py's COMPILE_MEASURED_FASTER gets "cuda"
timeout 140 python3 benchmarks/latency.py --backbone $big --device cuda --image "$img" \
  --only-compile --repeats 5 2>&1 | tee "$OUT/compiled.md"
timeout 110 python3 benchmarks/load.py --backbone $big --device cuda --annotators 1,4,16 --clicks 8 \
  --serial --prelabel 2>&1 | tee "$OUT/load.md"
timeout 40 python3 benchmarks/instances.py --backbone $big --device cuda --instances 1 20 --round-size 1 16 \
  --repeats 1 2>&1 | tee "$OUT/instances.md"
