"""`prefix-router merge-traces`: the per-process files of one recording as one trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "merge recordings (serve --record files, rotated parts, replicas) into one trace"
DESCRIPTION = """\
Each router process records into its own file (serve --record PATH, rotated into PATH.1,
PATH.2...). This puts them back together: lines ordered by wall-clock arrival, timestamps
re-based to the first arrival, block ids renumbered 0, 1, 2... (equal ids stay equal). Give
every process of a fleet the same --record-secret, or their common prefixes get different ids.

examples:
  prefix-router merge-traces --out fleet.jsonl rec-a.jsonl rec-b.jsonl
  prefix-router merge-traces --out day.jsonl rec.jsonl.3 rec.jsonl.2 rec.jsonl.1 rec.jsonl
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", type=Path, help="recorded files (Mooncake JSONL)")
    parser.add_argument("--out", type=Path, required=True, help="write the merged trace here")


def run(args: argparse.Namespace) -> int:
    from router.replay.recording import merge, write_lines
    from router.replay.traces import TraceError

    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        return usage_error("merge-traces", f"no such file: {', '.join(missing)}")
    try:
        lines = merge(args.files)
    except (TraceError, OSError, KeyError, TypeError, ValueError) as exc:
        return usage_error("merge-traces", str(exc))
    count = write_lines(lines, args.out)
    print(f"wrote {count} requests from {len(args.files)} files to {args.out}", file=sys.stderr)
    return 0
