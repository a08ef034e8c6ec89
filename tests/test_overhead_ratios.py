"""`benchmarks/overhead.py --ratios`: the A/B table of router CPU per request, from results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _row(router: str, mode: str, cpu: float | None, requests: int = 600) -> dict[str, object]:
    return {
        "router": router,
        "mode": mode,
        "requests": requests,
        "cpu_ms_per_request": {} if cpu is None else {router: cpu, "backend": 9.9},
    }


def test_ratios_are_read_from_each_runs_results(tmp_path: Path) -> None:
    rows = [
        _row("direct", "stream", None),
        _row("prefix-router", "stream", 0.5),
        _row("prefix-router-before", "stream", 0.52),
        _row("smg", "stream", 0.4),
        _row("prefix-router", "short", 0.15, 1500),
        _row("smg", "short", 0.12, 1500),
    ]
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"results": rows}))
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--ratios", str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    assert out[2] == (
        "| ab.json | stream | 600 | 0.500 | 0.520 | 0.400 | - | 0.962 | 1.250 | 1.300 |"
    )
    assert out[3] == "| ab.json | short | 1500 | 0.150 | - | 0.120 | - | - | 1.250 | - |"
    assert len(out) == 4
