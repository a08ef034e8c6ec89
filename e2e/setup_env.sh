#!/usr/bin/env bash
# Builds the isolated SGLang environment for `make e2e` in .e2e/venv (never the project's .venv).
# Reused on the next run: a stamp file names the SGLang version it was built for.
# SGLang 0.5.23 on CPU: sglang with --no-deps, the CUDA torch/torchvision builds (they run without
# a GPU; the +cpu torch breaks torchvision's operators, which SGLang imports unconditionally),
# then SGLang's pure-Python requirements from the wheel's metadata minus the CUDA-only kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
E2E_DIR=".e2e"
VENV="$E2E_DIR/venv"
STAMP="$VENV/.e2e-ready-sglang-$SGLANG_VERSION"
if [[ -f "$STAMP" ]]; then
  echo "e2e env: reusing $VENV (sglang $SGLANG_VERSION)"
  # the router itself: this checkout, with the dependencies its pyproject now names (seconds)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[hf,kv-events]'
  exit 0
fi
echo "e2e env: building $VENV for sglang $SGLANG_VERSION (several minutes, ~7 GB)"
mkdir -p "$E2E_DIR"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1" packaging
# Requirements from the installed wheel's metadata, leaving out CUDA-only kernel packages.
REQS="$E2E_DIR/sglang-requirements.txt"
"$VENV/bin/python" - "$REQS" <<'PY'
import re
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement

SKIP = re.compile(
    r"^(sglang-kernel|flashinfer.*|flash-attn.*|sgl-deep-ep|sgl-deep-gemm|sgl-flash-mla|"
    r"tilelang|quack-kernels|torchaudio|torchcodec|torch|torchvision)$"
)
lines = []
for raw in distribution("sglang").requires or []:
    req = Requirement(raw)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if SKIP.match(req.name.lower().replace("_", "-")):
        continue
    lines.append(str(req))
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print(f"e2e env: {len(lines)} requirements from sglang's metadata")
PY
"${PIP[@]}" -r "$REQS" "torch==2.14.1" "torchvision==0.29.1"
# The project itself (router, backends, tests' helpers) and the test runner, into the same venv.
"${PIP[@]}" -e '.[hf,kv-events]' pytest pytest-asyncio pytest-timeout
touch "$STAMP"
echo "e2e env: ready"
