"""How fast a shed request hears so, live: `serve --scheduler on --slo-ttft S` at overload.

The scheduler's admission answers a request it predicts will miss its TTFT deadline with 429 +
Retry-After before any backend work (router/core/scheduler.py). In virtual time that answer
is instantaneous; this measures it over real HTTP. Two simulated H100 backends
(`prefix-router sim`, real time) and one router process (`serve --workers 1 --scheduler on`)
each run as their own process; an open-loop client sends unique long prompts (no cached
prefix) at many times the pool's capacity, streaming, and times every answer from the moment
its request was sent: a 429's status line, an admitted request's first token.

Run:  flock /tmp/prefix-router-heavy.lock python benchmarks/shed_latency.py   (about a minute)
Writes benchmarks/results/shed_latency.json: counts, the 429 answer time (p50 / p99 / max,
seconds), the admitted requests' TTFT, and `"ok"`: every 429 within 50 ms and every admitted
request answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from router.replay.compare import ProcessSet
from router.replay.metrics import percentile, write_json
from router.replay.ports import free_port, free_port_block
from router.replay.textgen import BlockTextGenerator

RESULTS = Path(__file__).resolve().parent / "results"
SHED_BOUND_S = 0.05


async def _one(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> tuple[int, float, str]:
    """(status, seconds to the answer's first sign: 429 status line or first token, error)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                answered = time.perf_counter() - start
                text = (await resp.read()).decode(errors="replace")
                return resp.status, answered, "" if resp.status == 429 else text[:200]
            async for line in resp.content:
                if line.startswith(b"data:") and b"[DONE]" not in line:
                    first = time.perf_counter() - start
                    async for _ in resp.content:  # drain the stream
                        pass
                    return 200, first, ""
            return 200, time.perf_counter() - start, "no token"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, time.perf_counter() - start, repr(exc)


async def run(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    procs = ProcessSet(log_dir)
    sim_port, port = free_port_block(args.backends), free_port()
    backends = [f"http://127.0.0.1:{sim_port + i}" for i in range(args.backends)]
    url = f"http://127.0.0.1:{port}"
    py = sys.executable
    gen = BlockTextGenerator(64)
    prompts = [
        gen.prompt_text(range(i * 1000, i * 1000 + args.prompt_tokens // 64), args.prompt_tokens)
        for i in range(args.requests)
    ]
    try:
        await procs.start_ready(
            "sim",
            [py, "-m", "router", "sim", "--count", str(args.backends), "--port", str(sim_port),
             "--profile", "llama3-8b-h100", "--log-level", "warning"],
            [b + "/health" for b in backends], time.monotonic() + 60,
        )  # fmt: skip
        await procs.start_ready(
            "router",
            [py, "-m", "router", "serve", "--workers", "1", "--backends", ",".join(backends),
             "--port", str(port), "--profile", "llama3-8b-h100", "--scheduler", "on",
             "--slo-ttft", f"{args.slo:g}", "--log-level", "WARNING"],
            [url + "/readiness"], time.monotonic() + 60,
        )  # fmt: skip
        async with aiohttp.ClientSession() as s, s.get(url + "/v1/models") as resp:
            model = (await resp.json())["data"][0]["id"]
        timeout = aiohttp.ClientTimeout(total=300)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
            tasks = []
            t0 = time.perf_counter()
            for i, prompt in enumerate(prompts):
                delay = t0 + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_one(s, url, model, prompt, args.max_tokens)))
            answers = await asyncio.gather(*tasks)
            async with s.get(url + "/stats") as resp:
                stats = await resp.json()
    finally:
        procs.stop_all()
    shed = sorted(t for status, t, _ in answers if status == 429)
    admitted = sorted(t for status, t, err in answers if status == 200 and not err)
    other = [(status, err) for status, _, err in answers if status not in (200, 429) or err]
    return {
        "setup": f"{args.backends} x prefix-router sim (llama3-8b-h100, real time) and serve "
        f"--workers 1 --scheduler on --slo-ttft {args.slo:g}, each its own process; "
        f"{args.requests} unique {args.prompt_tokens}-token streamed completions at "
        f"{args.rate:g}/s; shared 2-core box",
        "requests": len(answers),
        "shed_429": len(shed),
        "admitted": len(admitted),
        "other": len(other),
        "other_examples": other[:5],
        "shed_answer_s": {
            "p50": percentile(shed, 50),
            "p99": percentile(shed, 99),
            "max": shed[-1] if shed else None,
        },
        "admitted_ttft_s": {
            "p50": percentile(admitted, 50),
            "p90": percentile(admitted, 90),
            "max": admitted[-1] if admitted else None,
        },
        "router_scheduler_stats": stats.get("scheduler"),
        "ok": bool(shed) and shed[-1] <= SHED_BOUND_S and not other,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", type=int, default=2, help="simulated backends")
    p.add_argument("--requests", type=int, default=600, help="requests sent")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second (open loop)")
    p.add_argument("--prompt-tokens", type=int, default=8192, help="tokens per unique prompt")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--slo", type=float, default=1.0, help="serve --slo-ttft (seconds)")
    p.add_argument("--json", type=Path, default=RESULTS / "shed_latency.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="shed-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    result["command"] = "python benchmarks/shed_latency.py " + " ".join(sys.argv[1:])
    write_json(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "router_scheduler_stats"}, indent=1))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
