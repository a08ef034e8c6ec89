"""Run the router until Ctrl-C, optionally in front of simulated backends in the same process.

`serve(config)` is what `prefix-router serve` (and `make run`) calls:

1. with `config.embedded = K`, start K simulated SGLang servers (`backends.sim.server`) on
   ephemeral loopback ports and add their URLs to the backends;
2. start the router (`app.start_server`), print how to call it (curl and the OpenAI SDK);
3. wait for SIGINT/SIGTERM, then stop the router first (in-flight requests end, upstreams
   close) and the simulated backends after it.

uvloop is used when installed (`install_uvloop`), else asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

from router.server.app import start_server
from router.server.config import ServerConfig

__all__ = [
    "install_uvloop",
    "serve",
    "serve_async",
    "start_embedded",
    "stop_on_signals",
    "usage_text",
]

log = logging.getLogger("router.server")


def install_uvloop() -> bool:
    """Use uvloop's event loop policy when the package is there; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def usage_text(url: str, model: str, api_key: str | None) -> str:
    auth = f' -H "Authorization: Bearer {api_key}"' if api_key else ""
    key = repr(api_key) if api_key else '"none"'
    return f"""
prefix-router listening on {url}

  curl {url}/v1/chat/completions{auth} -H "Content-Type: application/json" \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key={key})
  print(client.chat.completions.create(model="{model}",
        messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)

  stats: {url}/stats   metrics: {url}/metrics   Ctrl-C stops.
"""


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (where the loop can handle signals)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def start_embedded(
    config: ServerConfig, out: TextIO
) -> tuple[ServerConfig, list[Callable[[], Awaitable[None]]]]:
    """Start `config.embedded` simulated backends; the config with their URLs, and closers."""
    closers: list[Callable[[], Awaitable[None]]] = []
    if config.embedded:
        from backends.sim.server import DEFAULT_PROFILE, start_sim_servers

        handles = await start_sim_servers(
            config.embedded,
            host="127.0.0.1",
            profile=config.profile or DEFAULT_PROFILE,
            speedup=config.speedup,
        )
        closers.extend(h.close for h in handles)
        config = config.model_copy(
            update={"backends": [*config.backends, *(h.url for h in handles)], "embedded": 0}
        )
        print(f"started {len(handles)} simulated backends: {[h.url for h in handles]}", file=out)
    return config, closers


async def serve_async(config: ServerConfig, out: TextIO = sys.stdout) -> None:
    """Start everything, print the usage text, run until SIGINT/SIGTERM, stop cleanly."""
    config, closers = await start_embedded(config, out)
    server = None
    try:
        server = await start_server(config)
        models = server.state.pool.models()
        key = config.api_keys[0] if config.api_keys else None
        print(usage_text(server.url, models[0] if models else "default", key), file=out, flush=True)
        await stop_on_signals().wait()
        print("stopping...", file=out, flush=True)
    finally:
        if server is not None:
            await server.close()
        for close in closers:
            with contextlib.suppress(Exception):
                await close()


def serve(config: ServerConfig) -> int:
    """Blocking entry point for the CLI."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_uvloop()
    asyncio.run(serve_async(config))
    return 0
