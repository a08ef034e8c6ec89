"""The scheduler's command-line knobs that `serve` and `simulate` share."""

from __future__ import annotations

import argparse

from router.core.scheduler import parse_headroom

__all__ = ["HEADROOM_HELP", "headroom_arg"]

HEADROOM_HELP = (
    "throughput admission (with --slo-ttft): admit at most H x the pool's full-batch rate, so "
    "at sustained overload the batches turn over instead of filling at once and decoding in "
    "lock-step; 'off' (or 0) admits by the deadline alone, which serves more of a short burst "
    "the running slots absorb but collapses sooner under sustained overload (default 1.5; "
    "benchmarks/README.md has the trade-off measured)"
)


def headroom_arg(text: str) -> float:
    """argparse's type for `--scheduler-headroom`."""
    try:
        return parse_headroom(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
