#!/usr/bin/env bash
# Serve the SmartSAM Label Studio ML backend on its default model (make run calls this).
# Fetches the default weights first; offline, it stops within seconds with one message saying
# which file is missing, from where, and how to place it by hand.
set -euo pipefail
cd "$(dirname "$0")"
backbone="${SMARTSAM_BACKBONE:-$(python -c 'from smartsam.models import default_backbone; print(default_backbone())')}"
case "$backbone" in
  *-random|disk-test) ;;  # test configurations: nothing to download
  *) python -m smartsam models download "$backbone" ;;
esac
exec python -m backend.server
