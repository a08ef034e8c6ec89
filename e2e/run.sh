#!/usr/bin/env bash
# `make e2e`: build (or reuse) .e2e/venv, then run e2e/run.py under the shared heavy-run lock
# (/tmp/prefix-router-heavy.lock: one CPU-heavy run at a time on this machine). Prints the
# environment's time, the wait for the lock and the total. Extra arguments go to e2e/run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash e2e/setup_env.sh 2>&1 | grep -v "^WARNING: Location '" || true
test -f .e2e/venv/.e2e-ready-sglang-"${SGLANG_VERSION:-0.5.23}" || { echo "e2e env build failed"; exit 1; }
env_done=$(date +%s)
echo "make e2e: environment ready in $(( env_done - start )) s"
rc=0
flock /tmp/prefix-router-heavy.lock bash -c \
  'echo "make e2e: waited $(( $(date +%s) - $0 )) s for the heavy-run lock"; exec .e2e/venv/bin/python e2e/run.py "${@}"' \
  "$env_done" "$@" || rc=$?
echo "make e2e: total $(( $(date +%s) - start )) s, exit $rc"
exit $rc
