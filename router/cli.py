"""`prefix-router` command line: one subcommand per module in `router.commands`.

Each module in `router/commands/` defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules import their heavy dependencies inside `run`, so `--help` is fast.

Output piped into a reader that stops early (`prefix-router profiles --json | head`) ends the
command quietly: the BrokenPipeError is caught, stdout is pointed at /dev/null so the
interpreter's final flush cannot fail again, and the exit code is 1 (as the Python docs advise
for SIGPIPE-less Python), with no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence

from router import __version__
from router import commands as commands_pkg

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefix-router",
        description=(
            "Prompt-cache-aware router for pools of SGLang servers: serve it live, run a "
            "simulated SGLang backend, replay traces, or simulate a whole pool in virtual time."
        ),
    )
    parser.add_argument("--version", action="version", version=f"prefix-router {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        name = info.name.replace("_", "-")
        cmd = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def _dispatch(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's exit-time flush of stdout cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a reader that closed our stdout early ends it quietly (exit 1)."""
    try:
        try:
            return _dispatch(argv)
        finally:  # flush here, inside the handler, not at interpreter exit (also on --help)
            sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
        return 1


if __name__ == "__main__":
    sys.exit(main())
