"""Shared helpers for the router-server tests: real simulated SGLang servers and a real router.

Everything listens on 127.0.0.1 with ephemeral ports. Simulated backends run sped up so that
a test takes a fraction of a second, except where a test needs a long stream.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp

from backends.sim.server import SimServerHandle, start_sim_servers
from router.core.policies import POLICIES
from router.server.app import RunningServer, start_server
from router.server.config import ServerConfig

__all__ = [
    "Script",
    "Setup",
    "cache_policy",
    "free_port",
    "read_request",
    "router_for",
    "scripted_server",
    "serving",
    "sims",
]

# A hand-written server's behaviour on one connection: (reader, writer, connection number).
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def free_port() -> int:
    """A loopback port nobody listens on right now (for a backend started later on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cache_policy() -> str:
    """The best prefix-aware policy registered right now (tests stay valid as policies land)."""
    for name in ("cost", "cache_aware", "session"):
        if name in POLICIES:
            return name
    raise RuntimeError("no prefix-aware policy registered")


@asynccontextmanager
async def sims(count: int, *, speedup: float = 20.0) -> AsyncIterator[list[SimServerHandle]]:
    handles = await start_sim_servers(count, speedup=speedup)
    try:
        yield handles
    finally:
        for h in handles:
            await h.close()


@asynccontextmanager
async def router_for(backends: list[str], **overrides: Any) -> AsyncIterator[RunningServer]:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "backends": backends,
        "policy": "round_robin",
        "health_interval_s": 0.2,
        "health_timeout_s": 0.5,
        "breaker_cooldown_s": 0.3,
        "connect_timeout_s": 1.0,
    }
    settings.update(overrides)
    server = await start_server(ServerConfig(**settings))
    try:
        yield server
    finally:
        await server.close()


@dataclass(slots=True)
class Setup:
    handles: list[SimServerHandle]
    router: RunningServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.router.url


@asynccontextmanager
async def serving(count: int, *, speedup: float = 20.0, **overrides: Any) -> AsyncIterator[Setup]:
    """`count` simulated backends, a router in front, and a client session."""
    async with (
        sims(count, speedup=speedup) as handles,
        router_for([h.url for h in handles], **overrides) as router,
        aiohttp.ClientSession() as session,
    ):
        yield Setup(handles=handles, router=router, session=session)


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 request (head and Content-Length body) off a hand-written server's socket."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[str]:
    """A loopback server running `script(reader, writer, connection_number)` per connection:
    exactly the bytes a test chose, split how it chose (framing real servers never produce)."""
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            await script(reader, writer, connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()
