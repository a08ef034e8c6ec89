"""`prefix-router replay`: replay a trace window over HTTP against one endpoint, open loop.

Loads the trace (path or bundled name), cuts the window, sends every request at its trace time
(divided by --load) to --url through `router.replay.client.replay`, prints the results table,
and writes the DESIGN section 7 JSON (results keyed by --name) and a TTFT CDF plot. Failed
requests are counted and listed with their status in the JSON; the JSON is written even when
every request failed (exit code 1 then). Argument errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "replay a trace over HTTP against an endpoint (our router, sglang-router, SGLang)"
DESCRIPTION = """\
Sends each request of a trace window at its arrival time (open loop), streams every response
and records TTFT, TPOT, E2E, prompt and cached tokens, and failures with their status.

Traces with hash_ids (Mooncake, generated) get deterministic text per block id, so shared
prefixes are real shared text; chat-log traces send their recorded messages (--api chat).

examples:
  prefix-router replay --trace conversation --url http://127.0.0.1:30000 --api completions \\
      --start 600 --duration 120 --json out.json --plot out.png
  prefix-router replay --trace data/traces/mtbench_chat.jsonl --url http://gw:8000 --api chat \\
      --api-key $KEY --model my-model
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--trace", required=True, help="trace path or bundled name (conversation, mtbench-chat...)")
    a("--url", required=True, help="base URL of the endpoint, e.g. http://127.0.0.1:30000")
    a("--api", choices=["chat", "completions", "generate"], default="completions")
    a("--load", type=float, default=1.0, help="arrival-rate multiplier (timestamps / load)")
    a("--start", type=float, default=0.0, help="window start, seconds of trace")
    a("--duration", type=float, default=None, help="window length, seconds (default: to the end)")
    a("--model", default=None, help="model name to send (default: the first of /v1/models)")
    a("--api-key", default=None, help="bearer token for the endpoint")
    a("--name", default="replay", help="target name the results are keyed by (default replay)")
    a("--speedup", type=float, default=1.0, help="for simulated servers run F times faster")
    a("--max-in-flight", type=int, default=8192, help="concurrency cap (default 8192)")
    a("--timeout", type=float, default=900.0, help="per-request timeout, seconds")
    a("--json", type=Path, default=None, help="write results JSON here")
    a("--plot", type=Path, default=None, help="write a TTFT CDF PNG here")
    a("--quiet", action="store_true", help="no progress bar")


def _fail(message: str) -> int:
    return usage_error("replay", message)


def run(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from router.replay.client import ReplayConfig, check_trace_api, replay, run_summary
    from router.replay.metrics import write_json
    from router.replay.report import format_table, plot_ttft_cdf
    from router.replay.traces import load_window

    if args.start < 0:
        return _fail("--start must be non-negative")
    if args.duration is not None and not args.duration > 0:
        return _fail("--duration must be positive")
    try:
        config = ReplayConfig(
            url=args.url.rstrip("/"),
            api=args.api,
            model=args.model,
            api_key=args.api_key,
            load=args.load,
            speedup=args.speedup,
            max_in_flight=args.max_in_flight,
            request_timeout_s=args.timeout,
        )
    except ValueError as exc:
        return _fail(str(exc))
    try:
        trace = load_window(args.trace, args.start, args.duration)
        check_trace_api(trace, args.api)
    except ValueError as exc:  # TraceError is one
        return _fail(str(exc))

    print(
        f"replaying {len(trace.requests)} requests of {trace.name} "
        f"({trace.duration() / args.load:.0f} s at load {args.load:g}) to {config.url}",
        file=sys.stderr,
    )
    with tqdm(total=len(trace.requests), unit="req", disable=args.quiet, desc=args.name) as bar:
        result = asyncio.run(replay(trace, config, on_done=lambda _o: bar.update()))
    summary = run_summary(result)
    title = f"{trace.name} -> {config.url} ({args.api}, load {args.load:g})"
    print(format_table({args.name: summary}, title=title))
    for failure in summary["failures"][:5]:
        print(f"  failed {failure['rid']}: {failure['error']}", file=sys.stderr)
    if args.json is not None:
        doc = {
            "trace": trace.name,
            "url": config.url,
            "api": args.api,
            "model": result.model,
            "load": args.load,
            "start": args.start,
            "duration": args.duration,
            "speedup": args.speedup,
            "results": {args.name: summary},
        }
        write_json(args.json, doc)
    if args.plot is not None:
        plot_ttft_cdf({args.name: result.outcomes}, args.plot, title=title)
    return 1 if summary["completed"] == 0 else 0  # all failed: the endpoint is not serving
