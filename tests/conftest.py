"""Shared fixtures: free ports, simulated SGLang servers in-process or as a subprocess.

- `free_port()` and `free_port_block(count)` (plain functions from `router.replay.ports`,
  re-exported: `from conftest import free_port`) and the `unused_port` fixture: a TCP port on
  127.0.0.1 that was free a moment ago.
- `sim_servers` (async): a factory `await sim_servers(count=1, speedup=10.0, **kwargs)`
  starting simulated servers in this test's event loop via
  `backends.sim.server.start_sim_servers` (kwargs are passed on: profile, model, page_size,
  config, engine_factory). Returns `SimServerHandle`s (`.url`, `.engine`, `.server`); all are
  closed at teardown.
- `sim_server` (async): one in-process server at speedup 10.
- `sim_process`: a factory `sim_process(count=1, speedup=10.0, extra_args=())` running
  `python -m router sim` in a subprocess on free ports, waiting until every `/health` answers;
  returns a `SimProcess` (`.urls`, `.proc`, `.log_path`, `.log_text()`). Teardown sends SIGTERM
  and waits (then kills). Use it when the server must live outside the test's event loop
  (sync clients, external routers, kill tests: `.proc.terminate()`).

Everything binds to 127.0.0.1 only. Heavy imports happen inside fixtures, so collecting tests
that do not use them stays fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from router.replay.ports import free_port, free_port_block

REPO_ROOT = Path(__file__).resolve().parent.parent

# tests/e2e need real SGLang servers and the .e2e environment: only `make e2e` (which sets
# PREFIX_ROUTER_E2E) collects them; `make test` and CI never do.
collect_ignore = [] if os.environ.get("PREFIX_ROUTER_E2E") else ["e2e"]
DEFAULT_TEST_SPEEDUP = 10.0


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[int]:
    """An aiohttp `app` on an ephemeral loopback port for the block; yields the port."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def wait_http_ok(url: str, timeout: float = 15.0) -> None:
    """Poll `url` until it answers 200 (raises TimeoutError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # connection refused while starting
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout}s (last error: {last})")


@pytest.fixture
def unused_port() -> int:
    return free_port()


SimServersFactory = Callable[..., Awaitable[list[Any]]]


@pytest_asyncio.fixture
async def sim_servers() -> AsyncIterator[SimServersFactory]:
    from backends.sim.server import SimServerHandle, start_sim_servers

    started: list[SimServerHandle] = []

    async def start(
        count: int = 1, *, speedup: float = DEFAULT_TEST_SPEEDUP, **kwargs: Any
    ) -> list[SimServerHandle]:
        kwargs.setdefault("host", "127.0.0.1")
        handles = await start_sim_servers(count, speedup=speedup, **kwargs)
        started.extend(handles)
        return handles

    yield start
    for h in started:
        await h.close()


@pytest_asyncio.fixture
async def sim_server(sim_servers: SimServersFactory) -> Any:
    (handle,) = await sim_servers(1)
    return handle


@dataclass
class SimProcess:
    """A `prefix-router sim` subprocess."""

    proc: subprocess.Popen[bytes]
    urls: list[str]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, kill if needed; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return int(self.proc.returncode)


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Callable[..., SimProcess]]:
    running: list[SimProcess] = []

    def start(
        count: int = 1,
        speedup: float = DEFAULT_TEST_SPEEDUP,
        extra_args: Sequence[str] = (),
    ) -> SimProcess:
        base = free_port_block(count)
        log_path = tmp_path / f"sim-{base}.log"
        cmd = [
            sys.executable,
            "-m",
            "router",
            "sim",
            "--host",
            "127.0.0.1",
            "--port",
            str(base),
            "--count",
            str(count),
            "--speedup",
            str(speedup),
            *extra_args,
        ]
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
            )
        sp = SimProcess(
            proc=proc,
            urls=[f"http://127.0.0.1:{base + i}" for i in range(count)],
            log_path=log_path,
        )
        running.append(sp)
        try:
            for url in sp.urls:
                wait_http_ok(url + "/health")
        except TimeoutError:
            sp.stop()
            raise RuntimeError(f"sim did not start:\n{sp.log_text()}") from None
        return sp

    yield start
    for sp in running:
        sp.stop()
