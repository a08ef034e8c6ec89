"""`prefix-router analyze`: what a trace's traffic offers a prefix cache, before routing it.

Loads a trace (a path, or a bundled name such as `conversation`), prints a table of request
count, rate, token statistics, the ideal hit ratio, reuse gaps and the LRU bound, and writes
the same as JSON with `--json`. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "analyze a trace: rates, token stats, ideal hit ratio, reuse gaps, LRU bound"

DESCRIPTION = """\
Know the workload before routing it. For a trace (Mooncake JSONL, Azure 2023 CSV, chat-log
JSONL, or a bundled name: conversation, azure-conv, azure-code, mtbench-chat) report:

  requests, duration, rate, input/output token mean, p50, p99, max
  ideal hit ratio   one infinite cache that saw the trace in order (token-weighted)
  reuse gaps        per reused block: seconds since last use, tokens inserted in between
  LRU bound         hit ratio of one LRU cache of each size (block granularity): what a
                    perfectly routed pool of that total KV capacity can approach

Default sizes: 102,400 to 26,214,400 tokens (a quarter of one 409,600-token GPU to 64 GPUs,
powers of two; 3,276,800 = 8 GPUs).

example:
  prefix-router analyze --trace conversation --cache-tokens 409600,3276800 --json out.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace path or bundled name")
    parser.add_argument(
        "--format",
        default="auto",
        choices=["auto", "mooncake", "azure", "chat"],
        help="trace format (default: from the file)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per hash id (default: 512 Mooncake/Azure, 64 chat logs)",
    )
    parser.add_argument(
        "--cache-tokens",
        default=None,
        metavar="N[,N...]",
        help="LRU cache sizes in tokens (default: a log-spaced range)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write JSON here")


def _fail(message: str) -> int:
    return usage_error("analyze", message)


def run(args: argparse.Namespace) -> int:
    from router.replay.analyze import analyze, format_report
    from router.replay.traces import BUNDLED, TraceError, bundled, load_trace

    sizes: list[int] | None = None
    if args.cache_tokens is not None:
        try:
            sizes = [int(s.replace("_", "")) for s in args.cache_tokens.split(",") if s.strip()]
        except ValueError:
            return _fail(f"--cache-tokens must be integers, got {args.cache_tokens!r}")
        if not sizes or any(s <= 0 for s in sizes):
            return _fail("--cache-tokens must be positive integers")
    if args.block_size is not None and args.block_size <= 0:
        return _fail("--block-size must be positive")
    path = Path(args.trace)
    if not path.exists() and args.trace not in BUNDLED:
        return _fail(
            f"no trace file or bundled trace {args.trace!r} (bundled: {', '.join(BUNDLED)})"
        )
    try:
        trace = load_trace(
            path if path.exists() else bundled(args.trace), args.format, block_size=args.block_size
        )
    except (OSError, KeyError, TraceError) as exc:
        return _fail(str(exc).strip("'\""))
    report = analyze(trace, sizes)
    print(format_report(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as exc:
            return _fail(f"cannot write {args.json}: {exc}")
    return 0
