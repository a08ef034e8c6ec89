"""One module per `prefix-router` subcommand: each has `add_parser(subparsers)` and `run(args)`."""

from __future__ import annotations

import sys


def usage_error(command: str, message: str) -> int:
    """Say what was wrong with the arguments or input, argparse-style; exit status 2."""
    print(f"prefix-router {command}: error: {message}", file=sys.stderr)
    return 2
