"""One worker process of `serve --workers N` (started by `router/server/workers.py`).

Usage (the supervisor's, not a user's): ``python -m router.server.worker CONFIG.json PPID``.
It reads its `ServerConfig` (written by the supervisor: port, worker index, control sockets,
the hub or Redis state URL), runs the router until SIGTERM/SIGINT and stops it cleanly. If
its supervisor is already gone when it starts (the parent-death signal is set only for the
life of the parent that set it), it exits at once rather than serve as an orphan.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from router.server.app import start_server
from router.server.config import ServerConfig
from router.server.embedded import install_uvloop, stop_on_signals

__all__ = ["main", "run_worker"]


async def run_worker(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then close the router (in-flight requests end first)."""
    server = await start_server(config)
    stop = stop_on_signals()
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m router.server.worker CONFIG.json SUPERVISOR_PID", file=sys.stderr)
        return 2
    if os.getppid() != int(argv[2]):
        return 1  # the supervisor died before we could follow it
    config = ServerConfig.model_validate_json(Path(argv[1]).read_text())
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s w{config.worker_index} %(name)s: %(message)s",
    )
    install_uvloop()
    asyncio.run(run_worker(config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
