#!/usr/bin/env bash
# What the end-to-end tests need besides the Python environment:
#   - Label Studio 1.23.2 in its own virtualenv (.cache/ls-venv): it pins its own Django stack
#   - Debian's Chromium for the browser test (driven by playwright; never `playwright install`)
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV=.cache/ls-venv
if [ ! -x "$LS_VENV/bin/label-studio" ]; then
  python3 -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q label-studio==1.23.2
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null
  fi
fi
