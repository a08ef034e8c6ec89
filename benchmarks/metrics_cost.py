"""What prometheus_client costs the router per request, against the hand-written exposition.

Issue 15 asked for `prometheus_client` unless it costs more than 5% of router CPU per request.
The per-request part of /metrics is the proxy's metric updates; everything else a request
does is the same under either library. So this times exactly those updates, one request's
worth at a time, under each implementation of `router.server.metrics`:

    in_flight +1, routing decision, TTFT, regret, predicted TTFT, prompt / reported /
    predicted cached tokens, cached-token error, in_flight -1, requests by endpoint+status

over 4 backends, as process CPU (time.process_time) per request, best of `--repeats`, and
the scrape (`render()`, once per scrape interval: amortised it is nothing). The baseline is
the hand-written module as of `--baseline-rev` (read with `git show`, loaded from a temp file);
the new one is the working tree's. The share is the difference over the router's CPU per
short request at saturation from benchmarks/overhead.md (0.67 ms, its cheapest cell: the
share is then largest). The old module has no predicted-TTFT counter; its sequence skips it.

Run: flock /tmp/prefix-router-heavy.lock python benchmarks/metrics_cost.py \
         --json benchmarks/results/metrics_cost.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROUTER_CPU_MS_PER_REQUEST = 0.67  # benchmarks/overhead.md, saturation, short c=32
BACKENDS = [f"http://10.0.0.{i}:30000" for i in range(4)]


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _per_request_us(module: ModuleType, requests: int, repeats: int) -> tuple[float, float]:
    """(CPU us per request of the updates, CPU ms per render) of one implementation."""
    m = module.RouterMetrics()
    predicted = getattr(m, "predicted_ttft", None)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for i in range(requests):
            b = BACKENDS[i & 3]
            m.in_flight.inc(amount=1)
            m.routed.inc(b)
            m.ttft.observe(b, value=0.05)
            m.regret.observe(b, value=0.01)
            if predicted is not None:
                predicted.inc(b, amount=0.04)
            m.prompt_tokens.inc(b, amount=2000)
            m.reported_cached.inc(b, amount=1024)
            m.predicted_cached.inc(b, amount=960)
            m.cached_error.observe(b, value=64)
            m.in_flight.inc(amount=-1)
            m.requests.inc("/v1/chat/completions", "200")
        best = min(best, (time.process_time() - start) / requests * 1e6)
    start = time.process_time()
    renders = 50
    for _ in range(renders):
        m.render()
    return best, (time.process_time() - start) / renders * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-rev", default="36c80fe", help="git rev of the hand-written module")
    p.add_argument("--requests", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{args.baseline_rev}:router/server/metrics.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "metrics_handwritten.py"
        old_path.write_text(source)
        old = _load(old_path, "metrics_handwritten")
        new = _load(ROOT / "router/server/metrics.py", "metrics_prometheus_client")
        old_us, old_render = _per_request_us(old, args.requests, args.repeats)
        new_us, new_render = _per_request_us(new, args.requests, args.repeats)
    delta = new_us - old_us
    share = delta / (ROUTER_CPU_MS_PER_REQUEST * 1e3)
    out: dict[str, Any] = {
        "what": "router CPU per request spent on metric updates, hand-written vs prometheus_client",
        "machine": f"shared 2-core box ({platform.processor() or platform.machine()}), "
        "other engineers' jobs running",
        "python": platform.python_version(),
        "baseline_rev": args.baseline_rev,
        "requests": args.requests,
        "repeats": args.repeats,
        "handwritten_us_per_request": round(old_us, 2),
        "prometheus_client_us_per_request": round(new_us, 2),
        "delta_us_per_request": round(delta, 2),
        "router_cpu_ms_per_request": ROUTER_CPU_MS_PER_REQUEST,
        "share_of_router_cpu": round(share, 4),
        "threshold": 0.05,
        "handwritten_render_ms": round(old_render, 3),
        "prometheus_client_render_ms": round(new_render, 3),
        "verdict": "prometheus_client" if share <= 0.05 else "hand-written",
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
