#!/usr/bin/env bash
# Build the backend's image from the Dockerfile, start the backend in it, ask /health and click once.
# Not part of CI: it downloads several GB (Debian's packages, torch). On a machine where no registry
# of base images can be reached (this project's), the base is a Debian made locally with debootstrap
# and passed as BASE_IMAGE; `podman run` cannot start containers here (rlimits, cgroups), so the
# backend runs with `buildah run --isolation chroot --network host`.
#
#   scripts/image-check.sh [WORKDIR]        (root; apt-get installs buildah, podman, debootstrap)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/var/tmp/smartsam-image-check}"
base=localhost/smartsam-debian-base:bookworm
image=localhost/smartsam-backend:check
port="${PORT_CHECK:-19090}"
mkdir -p "$work"
step() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

step "tools"
command -v buildah >/dev/null && command -v podman >/dev/null && command -v debootstrap >/dev/null || \
  (apt-get update -qq && apt-get install -y -qq buildah podman debootstrap >/dev/null)
buildah --version

if ! podman image exists "$base"; then
  step "a Debian base made here (debootstrap, Debian's packages)"
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1
  tar -C "$work/rootfs" -c . | podman import - "$base" >/dev/null
fi
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$base"

step "the build context: the committed tree, plus this machine's certificate authority for pip"
rm -rf "$work/context" && mkdir -p "$work/context"
git archive HEAD | tar -x -C "$work/context"
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then cp /etc/ssl/certs/ca-certificates.crt "$work/context/docker/ca/extra.crt"; fi
git log -1 --format='commit %h %s' | cut -c1-100

step "buildah bud (the Dockerfile, BASE_IMAGE=$base)"
t0=$(date +%s)
buildah bud --isolation chroot --network host --layers --build-arg BASE_IMAGE="$base" -t "$image" \
  "$work/context" >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
echo "built $image in $(( $(date +%s) - t0 )) s"
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$image"

step "the backend started in the image as its CMD does (run.sh), SAM 2.1 tiny with random weights"
c=$(buildah from "$image")
trap 'kill "$pid" 2>/dev/null || true; buildah rm "$c" >/dev/null 2>&1 || true' EXIT
buildah run --isolation chroot --network host \
  --env PORT="$port" --env SMARTSAM_BACKBONE=sam2.1_hiera_tiny-random --env SMARTSAM_ALLOW_DATA_URLS=true \
  --env SMARTSAM_DATA_DIR=/data --env SMARTSAM_HOME=/cache --env SMARTSAM_ADMIN_TOKEN=check "$c" ./run.sh \
  >"$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 180); do
  curl -fs "http://127.0.0.1:$port/health" >"$work/health.json" 2>/dev/null && \
    grep -q '"ready": *true' "$work/health.json" && break
  sleep 1
done
curl -fs -H "Authorization: Bearer check" "http://127.0.0.1:$port/admin/health" >"$work/admin-health.json"
python3 - "$work/health.json" "$work/admin-health.json" <<'PY'
import json, sys
print("GET /health:", json.load(open(sys.argv[1])))
h = json.load(open(sys.argv[2]))
print("GET /admin/health:", {k: h[k] for k in ("status", "model", "device", "weights_loaded", "random_weights", "version")})
PY

step "one click (POST /predict, an image in the task, a keypoint at 47 %, 53 %)"
python3 - "$port" <<'PY'
import base64, io, json, sys, urllib.request
from pathlib import Path
img = Path("../shared/datasets/GrabCut/img/106024.jpg")
data = "data:image/jpeg;base64," + base64.b64encode(img.read_bytes()).decode()
kp = {"original_width": 481, "original_height": 321, "image_rotation": 0, "id": "k", "from_name": "tag", "to_name": "image",
      "type": "keypointlabels", "is_positive": True, "value": {"x": 47, "y": 53, "width": 0.6, "keypointlabels": ["Object"]}}
body = {"tasks": [{"id": 1, "data": {"image": data}}], "project": "1.1", "label_config": Path("label_config.xml").read_text(),
        "params": {"context": {"result": [kp]}}}
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/predict", json.dumps(body).encode(), {"Content-Type": "application/json"})
r = json.load(urllib.request.urlopen(req, timeout=120))
pred = r["results"][0]
res = pred["result"][0]
print("POST /predict:", {"mode": pred["mode"], "type": res["type"], "size": (res["original_width"], res["original_height"]),
                         "label": res["value"][res["type"]], "model_version": pred["model_version"]})
PY
step "done"
