"""Real SGLang servers for `make e2e`: launch on free ports, wait for health, stop for good.

Each server runs `python -m sglang.launch_server` on CPU (SGLang 0.5.23's CPU engine, the
torch-native attention backend, float32) in its own process group, so stopping it ends its
scheduler and detokenizer children too. The pure-torch `sgl_kernel` stand-in beside this file
is put on PYTHONPATH. KV events go to a ZMQ PUB socket on a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.replay.ports import free_port, free_port_block

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PAGE_SIZE = 16
MAX_TOTAL_TOKENS = 20000


@dataclass
class SGLangServer:
    """One launched server and how to reach it."""

    name: str
    model_dir: Path
    log_path: Path
    port: int = 0
    kv_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def kv_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.kv_port}"

    def command(self) -> list[str]:
        kv = {"publisher": "zmq", "endpoint": self.kv_endpoint, "bind": True, "topic": "kv"}
        return [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", str(self.model_dir),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
            "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--page-size", str(PAGE_SIZE),
            "--enable-cache-report", "--enable-metrics", "--sleep-on-idle",
            "--kv-events-config", json.dumps(kv),
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        """Launch on fresh ports (a restart gets new ones for the HTTP server, same KV port)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        if not self.port:
            self.port = free_port_block(8)
        if not self.kv_port:
            self.kv_port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        # the group id, so whoever tears down (e2e/run.py) can end servers the tests restarted
        self.log_path.with_suffix(".pgid").write_text(str(self.proc.pid))

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as resp:
                return int(resp.status) == 200
        except OSError:
            return False

    def wait_healthy(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not healthy after {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (server, scheduler, detokenizer)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL what is left; waits for the leader."""
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.kill(signal.SIGKILL)  # children outlive a leader that exited on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        self.proc = None


def start_servers(
    model_dir: Path, log_dir: Path, count: int = 2, timeout: float = 300.0
) -> list[SGLangServer]:
    """Launch `count` servers at once and wait until every one answers /health."""
    servers = [
        SGLangServer(name=f"sglang-{i}", model_dir=model_dir, log_path=log_dir / f"sglang-{i}.log")
        for i in range(count)
    ]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_healthy(timeout)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def kill_recorded(log_dir: Path) -> None:
    """SIGKILL every process group recorded by `SGLangServer.start` under `log_dir`."""
    for pgid_file in log_dir.glob("*.pgid"):
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.killpg(int(pgid_file.read_text()), signal.SIGKILL)


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode("utf-8", "replace")


@dataclass
class Router:
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def stats(self) -> dict[str, Any]:
        body: dict[str, Any] = get_json(self.url + "/stats")
        return body

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_router(sglang: list[SGLangServer], log_dir: Path, *extra: str) -> Router:
    """`prefix-router serve` in front of `sglang`, ready once it sees every backend healthy."""
    port = free_port()
    log_path = log_dir / f"router-{port}.log"
    cmd = [
        sys.executable, "-m", "router", "serve", "--workers", "1",
        *[a for s in sglang for a in ("--backend", s.url)],
        "--port", str(port), "--log-level", "INFO", "--health-interval", "1",
        *extra,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
    log_path.with_suffix(".pgid").write_text(str(proc.pid))  # for kill_recorded
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/readiness", timeout=2) as resp:
                if resp.status == 200:
                    body = get_json(url + "/stats")
                    if all(b.get("healthy") for b in body["backends"]):
                        return Router(url=url, proc=proc, log_path=log_path)
        except OSError:
            pass
        time.sleep(0.5)
    stop_router(proc)
    raise RuntimeError(f"router not ready:\n{log_path.read_text()[-3000:]}")


def stop_router(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
