#!/usr/bin/env bash
# Here, before a device run (the device tool, when a GPU is lent): what the GPU image lacks, put in
# .gpu-site/ (ignored through .git/info/exclude) to travel with carry [".gpu-site"]: the pure-Python
# packages it has no copy of (the SAM and SAM 2.1 libraries and theirs), taken from .venv, and the
# benchmark images the checks use (../shared does not travel). Then, on the device: scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-site/' .git/info/exclude 2>/dev/null || echo /.gpu-site/ >> .git/info/exclude
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .gpu-site && mkdir -p .gpu-site/py .gpu-site/datasets/GrabCut .gpu-site/datasets/COCO_MVal-dev/img
for p in sam2 segment_anything hydra omegaconf antlr4 iopath portalocker; do
  cp -r "$site/$p" .gpu-site/py/
done
find .gpu-site -name __pycache__ -prune -exec rm -rf {} +
data="${SMARTSAM_DATASETS:-../shared/datasets}"
cp -r "$data/GrabCut/img" .gpu-site/datasets/GrabCut/  # the tests' and the load benchmark's images
cp "$data/COCO_MVal-dev/img/airplane00_000000281693.jpg" .gpu-site/datasets/COCO_MVal-dev/img/
du -sh .gpu-site
