"""A 200-case sample of benchmarks/fuzz.py: hostile requests against a real `serve --embedded`.

The full run (10,000 cases, benchmarks/results/fuzz.json) is a benchmark; this sample keeps
`make test` honest about the same properties: no 5xx, no traceback in the router's log, every
4xx an OpenAI-style error, the router healthy after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fuzz_sample_finds_nothing(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--cases", "200",
         "--min-cases", "200", "--seed", "7", "--json", str(out)],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    assert out.exists(), proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["cases"] == 200
    assert result["server_errors_5xx"] == 0, result["examples"]
    assert result["tracebacks_in_log"] == 0
    assert result["non_openai_4xx"] == 0, result["examples"]
    assert result["healthy_after"] is True
    assert result["ok"] is True and proc.returncode == 0
