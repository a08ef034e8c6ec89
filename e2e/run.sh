#!/usr/bin/env bash
# `make e2e`: build (or reuse) .e2e/venv, then run e2e/run.py under the shared heavy-run lock.
# Prints the total time, environment included. Extra arguments go to e2e/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash e2e/setup_env.sh 2>&1 | grep -v "^WARNING: Location '" || true
test -f .e2e/venv/.e2e-ready-sglang-"${SGLANG_VERSION:-0.5.23}" || { echo "e2e env build failed"; exit 1; }
rc=0
flock /tmp/prefix-router-heavy.lock .e2e/venv/bin/python e2e/run.py "$@" || rc=$?
echo "make e2e: total $(( $(date +%s) - start )) s, exit $rc"
exit $rc
