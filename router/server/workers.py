"""`serve --workers N`: N router processes on one port, routing as one router.

One Python process relays at most one core's worth of requests and SSE chunks
(benchmarks/overhead.md). The supervisor (this module, the process `serve` runs in) starts N
worker processes, each a complete router (`router.server.worker`), and they share:

- **the port**: the supervisor binds it with SO_REUSEPORT and never listens on it (that
  reserves the port, and resolves port 0 to one number); each worker binds the same address
  with SO_REUSEPORT and listens, so the kernel spreads new connections over the workers;
- **the view of the pool**: each worker's `StateSync` publishes its routed / first-token /
  ended events and applies the others', as replicas do (docs/replicas.md). The transport is a
  hub on a Unix socket in the supervisor (`router/state/hub.py`: no external service), or
  Redis when `--state redis://...` is given (then workers of several hosts share one view);
- **/stats, /metrics and the admin API**: each worker also listens on a private control
  socket; the worker that gets one of these requests asks its siblings and answers for all
  (`siblings.py`).

Health checks, backend discovery and calibration run in every worker (each converges on the
same facts: health from the same backends at the same interval, speeds from its own share of
the requests); `/stats` shows a backend healthy only when every worker does. Embedded
simulated backends (`--embedded K`) run once, in the supervisor.

Lifetime: the supervisor writes each worker's configuration (JSON, mode 0600) into a private
runtime folder (`mkdtemp`, mode 0700, which also holds the hub and control sockets), starts
the workers in their own session (so a terminal's Ctrl-C reaches only the supervisor, which
stops them in order) with the parent-death signal set to SIGTERM (so a killed supervisor
leaves no orphan), waits for each to answer /health on its control socket, and restarts one
that dies (1 s backoff, doubling to 30 s). SIGTERM or SIGINT to the supervisor sends SIGTERM
to every worker, waits `shutdown_timeout_s` + 5 s, SIGKILLs what is left, then stops the
hub and the embedded backends and removes the runtime folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from router.server.config import ServerConfig
from router.server.embedded import start_embedded, stop_on_signals, usage_text
from router.state import HubServer

__all__ = ["default_workers", "serve_workers", "supervise"]

log = logging.getLogger("router.server.workers")

_PR_SET_PDEATHSIG = 1
_READY_TIMEOUT_S = 60.0


def default_workers() -> int:
    """One worker per CPU this process may run on (taskset / cgroup cpusets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) with SO_REUSEPORT: the port is ours and port 0 gets a number."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _record_path(path: str | None, index: int) -> str | None:
    """Each worker records to its own file: `{pid}`/`{replica}` already differ, else `.wK`."""
    if path is None or "{pid}" in path or "{replica}" in path:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


@dataclass(slots=True)
class _Worker:
    index: int
    config_path: Path
    control: str
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    monitor: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    """Starts, watches and stops the workers (module docstring)."""

    def __init__(self, config: ServerConfig, workers: int, runtime: Path) -> None:
        if workers < 2:
            raise ValueError("a supervisor runs at least 2 workers (1: run the router directly)")
        self.config = config
        self.runtime = runtime
        self.stopping = False
        self.workers = [
            _Worker(k, runtime / f"w{k}.json", str(runtime / f"w{k}.sock")) for k in range(workers)
        ]

    def write_configs(self, port: int, state: str) -> None:
        sockets = [w.control for w in self.workers]
        for w in self.workers:
            replica = self.config.replica_id
            cfg = self.config.model_copy(
                update={
                    "port": port,
                    "state": state,
                    "workers": 1,
                    "embedded": 0,
                    "worker_index": w.index,
                    "worker_sockets": sockets,
                    "replica_id": f"{replica}-w{w.index}" if replica else None,
                    "record": _record_path(self.config.record, w.index),
                }
            )
            fd = os.open(w.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:  # holds keys: readable by this user only
                f.write(cfg.model_dump_json())

    async def start(self, w: _Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(w.control)
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "router.server.worker",
            str(w.config_path),
            str(os.getpid()),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    async def wait_ready(self, w: _Worker, timeout_s: float = _READY_TIMEOUT_S) -> None:
        """Until the worker answers /health on its control socket; RuntimeError if it died."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            if w.proc is None or w.proc.returncode is not None:
                code = None if w.proc is None else w.proc.returncode
                raise RuntimeError(f"worker {w.index} exited with code {code} while starting")
            if os.path.exists(w.control):
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with (
                        aiohttp.ClientSession(
                            connector=aiohttp.UnixConnector(path=w.control),
                            timeout=aiohttp.ClientTimeout(total=2.0),
                        ) as session,
                        session.get("http://worker/health") as resp,
                    ):
                        if resp.status == 200:
                            return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"worker {w.index} not ready after {timeout_s:.0f} s")

    async def watch(self, w: _Worker) -> None:
        """Restart `w` whenever it exits while the supervisor is not stopping."""
        backoff = 1.0
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self.stopping:
                return
            log.error(
                "worker %d (pid %d) exited with code %s; restarting", w.index, w.proc.pid, code
            )
            await asyncio.sleep(backoff)
            if self.stopping:
                return
            backoff = min(backoff * 2, 30.0)
            w.restarts += 1
            await self.start(w)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for them, SIGKILL the ones that outstay their time."""
        self.stopping = True
        for w in self.workers:
            if w.monitor is not None:
                w.monitor.cancel()
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        grace = self.config.shutdown_timeout_s + 5.0
        waits = [asyncio.create_task(p.wait()) for p in procs]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=grace)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("worker pid %d did not stop in %.0f s: killed", proc.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)


async def _first_model(control: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError, KeyError):
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=control),
                timeout=aiohttp.ClientTimeout(total=2.0),
            ) as session,
            session.get("http://worker/v1/models", headers=headers) as resp,
        ):
            data = (await resp.json()).get("data") or []
            if data:
                return str(data[0]["id"])
    return "default"


async def supervise(config: ServerConfig, workers: int, out: TextIO = sys.stdout) -> int:
    """Run `workers` router processes until SIGINT/SIGTERM (module docstring); exit code."""
    runtime = Path(tempfile.mkdtemp(prefix="prefix-router-"))
    hub: HubServer | None = None
    reserved: socket.socket | None = None
    sup: Supervisor | None = None
    config, closers = await start_embedded(config, out)
    stop = stop_on_signals()
    try:
        state = config.state
        if state == "memory":
            hub = HubServer(runtime / "hub.sock")
            await hub.start()
            state = hub.url
        reserved = _reserve_port(config.host, config.port)
        port = int(reserved.getsockname()[1])
        sup = Supervisor(config, workers, runtime)
        sup.write_configs(port, state)
        for w in sup.workers:
            await sup.start(w)
        for w in sup.workers:
            await sup.wait_ready(w)
            w.monitor = asyncio.create_task(sup.watch(w))
        key = config.api_keys[0] if config.api_keys else None
        model = await _first_model(sup.workers[0].control, key)
        url = f"http://{config.host}:{port}"
        print(usage_text(url, model, key), file=out, flush=True)
        print(
            f"{workers} workers (pids {[w.proc.pid for w in sup.workers if w.proc]}), shared "
            f"state {'hub' if hub else config.state}",
            file=out,
            flush=True,
        )
        await stop.wait()
        print("stopping...", file=out, flush=True)
        return 0
    except (RuntimeError, OSError) as err:
        print(f"prefix-router: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if sup is not None:
            await sup.stop()
        if hub is not None:
            await hub.close()
        if reserved is not None:
            reserved.close()
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
        shutil.rmtree(runtime, ignore_errors=True)


def serve_workers(config: ServerConfig, workers: int) -> int:
    """Blocking entry point for `serve --workers N` with N >= 2."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s supervisor %(name)s: %(message)s",
    )
    return asyncio.run(supervise(config, workers))
