#!/usr/bin/env bash
# What the end-to-end tests need besides the Python environment:
#   - Label Studio 1.23.2 in its own virtualenv (.cache/ls-venv): it pins its own Django stack
#   - Debian's Chromium for the browser test (driven by playwright; never `playwright install`)
#   - Debian's PostgreSQL and nginx: the tests start a throwaway cluster and a balancer themselves
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV=.cache/ls-venv
if [ ! -x "$LS_VENV/bin/label-studio" ]; then
  python3 -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q label-studio==1.23.2
fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
