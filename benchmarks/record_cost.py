"""CPU a recording costs per request, measured in-process (what /proc's 10 ms ticks blur).

Two costs: `offer` on the request path (a deque append), and the writer thread's work per
record (`Recorder.line`: salting the blocks with keyed BLAKE2b, the JSON line) plus its share of
one batched write. The flights are the "long" requests of benchmarks/overhead.py: 65 blocks of
64 tokens, 47 shared by every request (the system prompt) and 18 new each.

Run: python benchmarks/record_cost.py   (prints us per request; a few seconds)
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from backends.sglang import TokenUsage
from router.core.model import RouteRequest
from router.server.recorder import Recorder, RecorderConfig


@dataclass(slots=True)
class _Flight:
    started: float
    route: RouteRequest
    endpoint: str = "/v1/chat/completions"
    model: str | None = "meta-llama/Llama-3.1-8B-Instruct"
    backend: str | None = "http://127.0.0.1:30001"
    status: int = 200
    ttft_s: float | None = 0.05
    usage: TokenUsage | None = TokenUsage(  # noqa: RUF009 (frozen, shared on purpose)
        prompt_tokens=4100, completion_tokens=5, cached_tokens=3008
    )


def main(n: int = 20000) -> None:
    shared = tuple(range(47))
    flights = [
        _Flight(
            started=i * 0.01,
            route=RouteRequest(
                rid=str(i),
                blocks=shared + tuple(10**6 + i * 18 + k for k in range(18)),
                block_tokens=64,
                prompt_tokens=64 * 65 - 20,
            ),
        )
        for i in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(
            RecorderConfig(path=Path(tmp) / "r.jsonl", key=b"k" * 32, queue_size=n + 1),
            clock_start=0.0,
        )
        rec._stopping = True  # measure the writer's work on this thread, not its own
        rec._wake.set()
        rec._thread.join()
        t0 = time.perf_counter()
        for f in flights:
            rec.offer(f)
        t1 = time.perf_counter()
        rec._drain()
        t2 = time.perf_counter()
        rec._discard_file()
        size = (Path(tmp) / "r.jsonl").stat().st_size
    print(f"offer (request path): {(t1 - t0) / n * 1e6:.2f} us per request")
    print(f"writer (line + write): {(t2 - t1) / n * 1e6:.1f} us per request, {size / n:.0f} B/line")


if __name__ == "__main__":
    main()
