#!/usr/bin/env bash
# What the end-to-end tests need besides the Python environment:
#   - Label Studio 1.23.2 in its own virtualenv (.cache/ls-venv): it pins its own Django stack
#   - Debian's Chromium for the browser test (driven by playwright; never `playwright install`)
#   - Debian's PostgreSQL and nginx: the tests start a throwaway cluster and a balancer themselves
set -euo pipefail
cd "$(dirname "$0")/.."
LS_VENV=.cache/ls-venv
# sentry-sdk: Label Studio 1.23.2 leaves it unpinned and a fresh install now resolves 3.0.0, which
# refuses the options LS's settings pass (TypeError: Unknown option 'send_default_pii'): LS would not
# start. The marker names these pins, so a venv made before them is brought to them.
LS_PINS=(label-studio==1.23.2 "sentry-sdk>=2,<3")
if [ ! -f "$LS_VENV/.pins-sentry2" ]; then
  [ -x "$LS_VENV/bin/python" ] || python3 -m venv "$LS_VENV"
  "$LS_VENV/bin/pip" install -q "${LS_PINS[@]}"
  touch "$LS_VENV/.pins-sentry2"
fi
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
