"""`prefix-router` command line: one subcommand per module in `router.commands`.

Each module in `router/commands/` defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules import their heavy dependencies inside `run`, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
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


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
