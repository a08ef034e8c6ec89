"""What a router adds to each request's latency: prefix-router and sglang-router vs. direct.

How it works. Three kinds of process, all on loopback:

    generator (this process, its own uvloop/asyncio loop)
        |--> direct:        simulated SGLang backend
        |--> prefix-router: `prefix-router serve --backend B --policy cost` --> the same backend
        '--> sglang-router: `python -m sglang_router.launch_router --worker-urls B` --> same

The backend is one subprocess, `prefix-router sim` (the simulated SGLang server), at
`--backend-speedup` X with a 1 ms streaming tick (`--stream-interval`): SGLang streams a chunk
per token, and sim's default 20 ms tick would give a 256-token stream a few chunks to relay.
X = 1 (default) is the real-time H100: a short request takes 10-30 ms at the backend and the
routers sit mostly idle, as in front of a GPU; this is the latency a router adds. X = 40 is
the saturation run: the backend answers in about a millisecond, the closed loop drives the
routers flat out, and the figure that matters is router CPU per request (added latency is then
queueing for the CPU). `--generator-cpus` pins this process (sched_setaffinity) and
`--server-cpus` starts every child under `taskset -c`; `--source DIR` runs the routers and the
backend from another source tree (e.g. a `git archive HEAD` snapshot).

Cells are (mode, concurrency): "short" is a non-streaming chat completion with a one-line
prompt and `max_tokens` 1-8; "stream" is a streaming chat completion of 256 tokens; "long" is
"short" with a ~4k-token prompt (a shared 3k-token system message and a unique user message).
`--targets` picks the targets; "prefix-router+record" is a second prefix-router with
`--record` to a temporary file, so record on/off is measured side by side in the same rounds.
Each cell runs a closed loop (`concurrency` workers, each sending its next request when the
previous one ended) against each target in turn, split into rounds whose target order
rotates, so slow drifts of a shared machine hit every target alike; latencies of a cell's
rounds are pooled. Latency is from just before the request is sent to the last byte read
(for streams also the time to the first byte, TTFT). Every target gets the same generator,
backend and requests; "added" is a router's percentile minus direct's in the same cell.
Each target is warmed first.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL) in a
`finally`, also on errors and Ctrl-C. `--cprofile FILE` runs prefix-router under cProfile for
one extra short c=32 pass (after the measured run, so the profiler cannot skew the figures)
and prints where its time goes.

Run: python benchmarks/overhead.py --generator-cpus 0 --server-cpus 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import platform
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from router.replay.launchers import LAUNCHERS

__all__ = ["CellResult", "Samples", "main", "markdown_table", "percentile", "ratio_table"]

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TARGETS = (
    "direct", "prefix-router", "prefix-router+record", "prefix-router-before", "sglang-router",
    "smg",
)  # fmt: skip
# "long": a ~4k-token chat prompt (a shared 3k-token system message, a unique user message),
# what `serve --record` pays for per block (keyed BLAKE2b per new block, ~65 ids per line)
_SYSTEM = " ".join(f"rule{k % 997}" for k in range(1500))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sample."""
    if not values:
        raise ValueError("percentile of an empty sample")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(slots=True)
class Samples:
    """Latencies (seconds) gathered for one target in one cell, over all its rounds."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    chunks: int = 0
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds used


@dataclass(frozen=True, slots=True, kw_only=True)
class CellResult:
    """One row of the JSON: a target's figures in one (mode, concurrency) cell."""

    router: str
    mode: str
    concurrency: int
    p50_ms: float
    p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    requests: int
    errors: int
    throughput_rps: float
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    chunks_per_request: float | None = None
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "router": self.router,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "added_p50_ms": round(self.added_p50_ms, 3),
            "added_p99_ms": round(self.added_p99_ms, 3),
            "requests": self.requests,
            "errors": self.errors,
            "throughput_rps": round(self.throughput_rps, 1),
        }
        if self.ttft_p50_ms is not None and self.ttft_p99_ms is not None:
            out["ttft_p50_ms"] = round(self.ttft_p50_ms, 3)
            out["ttft_p99_ms"] = round(self.ttft_p99_ms, 3)
        if self.chunks_per_request is not None:
            out["chunks_per_request"] = round(self.chunks_per_request, 1)
        if self.cpu_ms_per_request:
            out["cpu_ms_per_request"] = {
                k: round(v, 3) for k, v in sorted(self.cpu_ms_per_request.items())
            }
        return out


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """Child processes, each in its own session, all stopped by `stop_all` (idempotent)."""

    def __init__(
        self, log_dir: Path, cpus: frozenset[int] | None = None, source: Path | None = None
    ) -> None:
        self.log_dir = log_dir
        self.cpus = cpus  # every child is started under `taskset -c` on these, when set
        self.source = source  # children import `router` / `backends` from here, when set
        self.procs: list[_Proc] = []

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        source: Path | None = None,
        cpus: frozenset[int] | None = None,
    ) -> _Proc:
        """Start `argv`; `source` / `cpus` (else the run's) are its source tree and CPUs."""
        log_path = self.log_dir / f"{name}.log"
        cpus = cpus or self.cpus
        prefix = ["taskset", "-c", _cpu_list(cpus)] if cpus else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        source = source or self.source
        if source is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(source), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [*prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=source,
            )
        proc = _Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every live child's process group, wait, then SIGKILL what is left."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(max(deadline - time.monotonic(), 0.1))
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.procs.clear()


def _cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) of a process; this process's when pid is None."""
    if pid is None:
        return time.process_time()
    try:
        return _proc_cpu_seconds(pid)
    except OSError:
        return 0.0


def _proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid`, all its threads, from /proc (OSError if it cannot be read).

    The sum of its threads' run times in `task/*/schedstat` (nanoseconds), not `stat`'s user +
    system time, which counts whole clock ticks (10 ms): a cell's CPU is a difference of two
    readings, each truncated by up to a tick, so a 3-round cell of 600 streams (~300 ms of a
    router's CPU) moved in steps of 1/60 ms per stream (3% of it) and could not tell 0.50
    from 0.517 ms. A thread that exits between two readings takes its time out of the sum
    (`stat` keeps it): `_stat_cpu_seconds` is that coarse reading, to check against.
    """
    if not _SCHEDSTAT:
        return _stat_cpu_seconds(pid)
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


_SCHEDSTAT = Path("/proc/self/schedstat").exists()  # a kernel with CONFIG_SCHED_INFO


def _stat_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` from `/proc/PID/stat` (clock ticks; see above)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _wait_ready(
    session: aiohttp.ClientSession, proc: _Proc, url: str, timeout_s: float = 60.0
) -> None:
    """Poll `url` until it answers 200; fail with the child's log if it dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout_s} s:\n{proc.log_tail()}")


# --------------------------------------------------------------------------- load


def _body(mode: str, i: int) -> dict[str, Any]:
    prompt = f"Request {i}: say something short about routers."
    messages: list[dict[str, str]] = [{"role": "user", "content": prompt}]
    if mode == "long":
        user = " ".join(f"w{(i * 7919 + k) % 99991}" for k in range(350))
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]
    body: dict[str, Any] = {"model": MODEL, "messages": messages}
    if mode != "stream":
        body["max_tokens"] = 1 + i % 8
    else:
        body["max_tokens"] = 256
        body["stream"] = True
    return body


async def _one(session: aiohttp.ClientSession, url: str, mode: str, i: int, out: Samples) -> None:
    payload = json.dumps(_body(mode, i)).encode()
    headers = {"Content-Type": "application/json"}
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=payload, headers=headers) as r:
            if mode != "stream":
                data = await r.read()
                ok = r.status == 200 and b'"choices"' in data
                ttft = None
                chunks = 0
            else:
                ttft = None
                chunks = 0
                tail = b""
                async for piece in r.content.iter_any():
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    both = tail + piece
                    chunks += both.count(b"data: ") - tail.count(b"data: ")
                    tail = both[-16:]
                ok = r.status == 200 and b"[DONE]" in tail
        t1 = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError):
        out.errors += 1
        return
    if not ok:
        out.errors += 1
        return
    out.latency.append(t1 - t0)
    if ttft is not None:
        out.ttft.append(ttft)
        out.chunks += chunks


async def _closed_loop(
    session: aiohttp.ClientSession, url: str, mode: str, concurrency: int, n: int, out: Samples
) -> None:
    """`concurrency` workers send `n` requests in all, each worker one at a time."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await _one(session, url, mode, i, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    out.wall_s += time.perf_counter() - t0


# --------------------------------------------------------------------------- run


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """Everything one run depends on (recorded in the JSON beside the results)."""

    concurrencies: tuple[int, ...]
    modes: tuple[str, ...]
    short_requests: dict[int, int]
    stream_requests: dict[int, int]
    rounds: int
    speedup: float
    stream_interval_s: float
    profile: str
    policy: str
    warmup: int
    log_level: str
    targets: tuple[str, ...] = ("direct", "prefix-router", "sglang-router")
    record_path: str = ""  # the prefix-router+record target's --record file
    before_source: Path | None = None  # the prefix-router-before target's source tree
    generator_cpus: frozenset[int] | None = None
    server_cpus: frozenset[int] | None = None


def _python() -> str:
    return sys.executable


def _start_backend(procs: Processes, cfg: BenchConfig, port: int) -> _Proc:
    argv = [
        _python(),
        "-m",
        "router.cli",
        "sim",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--speedup",
        str(cfg.speedup),
        "--stream-interval",
        str(cfg.stream_interval_s),
        "--profile",
        cfg.profile,
        "--log-level",
        "warning",
    ]
    return procs.spawn("backend", argv)


def _prefix_router_argv(
    cfg: BenchConfig, backend: str, port: int, *, record: bool = False
) -> list[str]:
    argv = [
        "-m",
        "router.cli",
        "serve",
        "--workers",  # one process: this measures a router process's CPU per request
        "1",
        "--backend",
        backend,
        "--policy",
        cfg.policy,
        "--port",
        str(port),
        "--log-level",
        cfg.log_level.upper(),
    ]
    return [*argv, "--record", cfg.record_path] if record else argv


def _reference_argv(name: str, cfg: BenchConfig, backend: str, port: int) -> list[str]:
    """A reference router (sglang-router 0.3.2 or SMG 1.13) round_robin with its defaults (its
    Prometheus port moved off the shared 29000)."""
    level = {"warning": "warn"}.get(cfg.log_level.lower(), cfg.log_level.lower())
    return LAUNCHERS[name].argv(
        _python(),
        port=port,
        policy="round_robin",
        worker_urls=[backend],
        metrics_port=_free_port(),
        log_level=level,
    )


async def _warm(session: aiohttp.ClientSession, base: str, mode: str, n: int) -> Samples:
    s = Samples()
    await _closed_loop(session, base + "/v1/chat/completions", mode, 8, n, s)
    return s


def _requests_for(cfg: BenchConfig, mode: str, c: int) -> int:
    table = cfg.short_requests if mode != "stream" else cfg.stream_requests
    return table.get(c, max(table.values()))


async def _measure(
    cfg: BenchConfig,
    bases: dict[str, str],
    sessions: dict[str, aiohttp.ClientSession],
    pids: dict[str, int | None],
) -> dict[tuple[str, str, int], Samples]:
    """All cells; `pids` names the processes whose CPU time is charged to each target."""
    samples: dict[tuple[str, str, int], Samples] = {}
    for mode in cfg.modes:
        # a real-time 256-token stream takes ~2 s: two waves of 8 warm a stream path enough
        n_warm = cfg.warmup if mode != "stream" or cfg.speedup >= 10 else min(cfg.warmup, 16)
        for name in bases:
            w = await _warm(sessions[name], bases[name], mode, n_warm)
            if w.errors:
                raise RuntimeError(f"{name}: {w.errors} errors in warm-up ({mode})")
        for c in cfg.concurrencies:
            n = _requests_for(cfg, mode, c)
            per_round = max(n // cfg.rounds, 1)
            names = list(bases)
            for r in range(cfg.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    s = samples.setdefault((name, mode, c), Samples())
                    url = bases[name] + "/v1/chat/completions"
                    watched = {"generator", "backend", name} & pids.keys()
                    before = {k: _cpu_seconds(pids[k]) for k in watched}
                    await _closed_loop(sessions[name], url, mode, c, per_round, s)
                    for k in watched:
                        s.cpu_s[k] = s.cpu_s.get(k, 0.0) + _cpu_seconds(pids[k]) - before[k]
            row = " ".join(
                f"{name}={percentile(samples[(name, mode, c)].latency, 50) * 1e3:.2f}ms"
                for name in names
                if samples[(name, mode, c)].latency
            )
            print(f"  {mode:6s} c={c:<4d} p50: {row}", file=sys.stderr, flush=True)
    return samples


def _results(samples: dict[tuple[str, str, int], Samples]) -> list[CellResult]:
    out: list[CellResult] = []
    for (name, mode, c), s in samples.items():
        if not s.latency:
            raise RuntimeError(f"{name} {mode} c={c}: no successful request ({s.errors} errors)")
        base = samples.get(("direct", mode, c))
        p50 = percentile(s.latency, 50) * 1e3
        p99 = percentile(s.latency, 99) * 1e3
        b50 = percentile(base.latency, 50) * 1e3 if base and base.latency else p50
        b99 = percentile(base.latency, 99) * 1e3 if base and base.latency else p99
        out.append(
            CellResult(
                router=name,
                mode=mode,
                concurrency=c,
                p50_ms=p50,
                p99_ms=p99,
                added_p50_ms=p50 - b50,
                added_p99_ms=p99 - b99,
                requests=len(s.latency),
                errors=s.errors,
                throughput_rps=len(s.latency) / s.wall_s if s.wall_s else 0.0,
                ttft_p50_ms=percentile(s.ttft, 50) * 1e3 if s.ttft else None,
                ttft_p99_ms=percentile(s.ttft, 99) * 1e3 if s.ttft else None,
                chunks_per_request=s.chunks / len(s.ttft) if s.ttft else None,
                cpu_ms_per_request={
                    k: v * 1e3 / (len(s.latency) + s.errors) for k, v in s.cpu_s.items()
                },
            )
        )
    order = {n: i for i, n in enumerate(TARGETS)}
    out.sort(key=lambda r: (r.mode != "short", r.concurrency, order.get(r.router, 9)))
    return out


async def _stats_policy(session: aiohttp.ClientSession, base: str) -> str | None:
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.get(base + "/stats") as r:
            data = await r.json(content_type=None)
            if isinstance(data, dict):
                policy = data.get("policy")
                return str(policy) if policy is not None else None
    return None


async def _run(cfg: BenchConfig, procs: Processes, cprofile: Path | None) -> dict[str, Any]:
    backend_port = _free_port()
    backend = f"http://127.0.0.1:{backend_port}"
    bases = {"direct": backend}
    pids: dict[str, int | None] = {"generator": None}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as probe:
        b = _start_backend(procs, cfg, backend_port)
        await _wait_ready(probe, b, backend + "/health")
        pids["backend"] = b.popen.pid
        for name in cfg.targets:
            if name == "direct":
                continue
            port = _free_port()
            bases[name] = f"http://127.0.0.1:{port}"
            if name in LAUNCHERS:
                proc = procs.spawn(name, _reference_argv(name, cfg, backend, port))
                await _wait_ready(probe, proc, bases[name] + "/health")
            else:
                argv = _prefix_router_argv(cfg, backend, port, record=name.endswith("+record"))
                before = cfg.before_source if name == "prefix-router-before" else None
                proc = procs.spawn(name, [_python(), *argv], source=before)
                await _wait_ready(probe, proc, bases[name] + "/readiness")
            pids[name] = proc.popen.pid
        policy_seen = await _stats_policy(probe, bases["prefix-router"])
    if cfg.generator_cpus:
        os.sched_setaffinity(0, cfg.generator_cpus)
    sessions = {
        name: aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0, force_close=False)
        )
        for name in bases
    }
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        samples = await _measure(cfg, bases, sessions, pids)
    finally:
        for s in sessions.values():
            await s.close()
    elapsed = time.perf_counter() - t0
    load_after = os.getloadavg()
    results = _results(samples)
    profile_text = None
    if cprofile is not None:
        profile_text = await _profile_router(cfg, procs, backend, cprofile)
    return {
        "results": [r.as_json() for r in results],
        "notes": {
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "python": platform.python_version(),
            "shared_cpu": "generator, backend and routers share these CPUs (and other users)",
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "measure_s": round(elapsed, 1),
            "backend": f"simulated SGLang ({cfg.profile}), speedup {cfg.speedup:g}, "
            f"stream tick {cfg.stream_interval_s * 1e3:g} ms",
            "prefix_router": f"prefix-router serve --policy {cfg.policy}"
            + (f" (/stats policy: {policy_seen})" if policy_seen else ""),
            "references": {
                n: f"{n} {LAUNCHERS[n].version} --policy round_robin"
                for n in cfg.targets
                if n in LAUNCHERS
            },
            "targets": list(cfg.targets),
            "log_level": cfg.log_level,
            "rounds": cfg.rounds,
            "warmup_requests": cfg.warmup,
            "generator_cpus": _cpu_list(cfg.generator_cpus) if cfg.generator_cpus else "all",
            "server_cpus": _cpu_list(cfg.server_cpus) if cfg.server_cpus else "all",
            "cprofile_top": profile_text,
        },
    }


async def _profile_router(cfg: BenchConfig, procs: Processes, backend: str, out: Path) -> str:
    """Profile prefix-router over one c=32 pass of the first mode (warm, startup excluded).

    The router runs under `--profiled-router`: SIGUSR1 starts cProfile in its main thread (the
    event loop's), SIGUSR2 stops it and writes `out`.
    """
    port = _free_port()
    argv = [
        _python(),
        str(Path(__file__).resolve()),
        "--profiled-router",
        str(out),
        "--",
        *_prefix_router_argv(cfg, backend, port)[2:],
    ]
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    proc = procs.spawn("prefix-router-cprofile", argv)
    base = f"http://127.0.0.1:{port}"
    mode = cfg.modes[0]
    n = _requests_for(cfg, mode, 32)
    async with aiohttp.ClientSession() as session:
        await _wait_ready(session, proc, base + "/readiness")
        await _warm(session, base, mode, cfg.warmup)
        os.kill(proc.popen.pid, signal.SIGUSR1)
        await asyncio.sleep(0.2)
        s = Samples()
        await _closed_loop(session, base + "/v1/chat/completions", mode, 32, n, s)
        os.kill(proc.popen.pid, signal.SIGUSR2)
    for _ in range(100):
        if out.exists() and out.stat().st_size > 0:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let the dump finish
    buf = io.StringIO()
    stats = pstats.Stats(str(out), stream=buf)
    print(
        f"prefix-router under cProfile, {mode} c=32, {len(s.latency)} requests, "
        f"p50 {percentile(s.latency, 50) * 1e3:.1f} ms (profiler overhead included)\n",
        file=buf,
    )
    print(_by_area(stats), file=buf)
    stats.sort_stats("tottime").print_stats(30)
    return buf.getvalue()


_AREAS = (
    ("router/server/", "router.server"),
    ("router/core/", "router.core"),
    ("router/", "router (other)"),
    ("aiohttp/", "aiohttp"),
    ("multidict", "aiohttp"),
    ("yarl", "aiohttp"),
    ("tiktoken", "tiktoken"),
    ("json/", "json"),
    ("asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
    ("logging/", "logging"),
)


def _by_area(stats: pstats.Stats) -> str:
    """Own time (tottime) summed by package: where the router's CPU goes, coarsely."""
    totals: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        area = "builtins/C" if filename == "~" else "other"
        for needle, name in _AREAS:
            if needle in filename:
                area = name
                break
        if filename == "~" and ("socket" in func or "send" in func or "recv" in func):
            area = "socket I/O"
        totals[area] = totals.get(area, 0.0) + tt
    total = sum(totals.values()) or 1.0
    lines = [f"own time by area (total {total:.2f} s):"]
    for area, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {area:16s} {t:7.3f} s  {100 * t / total:5.1f} %")
    return "\n".join(lines)


def _profiled_router(out: str, router_argv: Sequence[str]) -> int:
    """Run `prefix-router <router_argv>` with cProfile switched by SIGUSR1/SIGUSR2."""
    import cProfile

    from router.cli import main as router_main

    # the thread's CPU clock: time the router spends waiting for a core on a shared box is not
    # charged to whatever function happened to be running
    profiler = cProfile.Profile(time.thread_time)

    def start(signum: int, frame: object) -> None:
        profiler.enable()

    def stop(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return router_main(list(router_argv))


def _install_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


# --------------------------------------------------------------------------- main


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _cpus(text: str) -> frozenset[int]:
    """A taskset-style CPU list ("0", "0,1", "0-1") as a set of CPU numbers."""
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    if not out:
        raise argparse.ArgumentTypeError(f"empty CPU list {text!r}")
    return frozenset(out)


def _cpu_list(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--concurrency", type=_ints, default=(1, 32, 128), help="e.g. 1,32,128")
    p.add_argument("--modes", default="short,stream", help="short,stream,long")
    p.add_argument(
        "--targets",
        default="direct,prefix-router,sglang-router",
        help="of direct, prefix-router, prefix-router+record (serve --record to a temp file), "
        "prefix-router-before (from --before-source), "
        "sglang-router, smg (SMG 1.13)",
    )
    p.add_argument(
        "--short-requests",
        type=_ints,
        default=None,
        help="per target for each concurrency, in --concurrency order "
        "(default 300,1500,1500 at speedup < 10, else 1500)",
    )
    p.add_argument(
        "--stream-requests",
        type=_ints,
        default=None,
        help="per target for each concurrency, in --concurrency order "
        "(default 15,96,256 at speedup < 10, else 300,600,1024)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per cell (target order rotates)")
    p.add_argument(
        "--backend-speedup",
        "--speedup",
        dest="speedup",
        type=float,
        default=1.0,
        help="simulated backend speedup: 1 = real-time H100 (a short request takes 10-30 ms "
        "at the backend); 40 = the saturation run (the router becomes the bottleneck)",
    )
    p.add_argument(
        "--stream-interval", type=float, default=0.001, help="backend streaming tick (s)"
    )
    p.add_argument("--profile", default="llama3-8b-h100", help="backend performance profile")
    p.add_argument("--policy", default="cost", help="prefix-router policy")
    p.add_argument("--warmup", type=int, default=100, help="warm-up requests per target, mode")
    p.add_argument("--log-level", default="warning", help="log level of both routers")
    p.add_argument(
        "--generator-cpus",
        type=_cpus,
        help="pin this load generator to these CPUs (taskset list, e.g. 0); default: unpinned",
    )
    p.add_argument(
        "--server-cpus",
        type=_cpus,
        help="pin backend and routers to these CPUs (e.g. 1 or 0-1); default: as started",
    )
    p.add_argument(
        "--source",
        type=Path,
        help="run prefix-router and the backend from this source tree (e.g. a `git archive "
        "HEAD` snapshot) instead of the working tree",
    )
    p.add_argument(
        "--before-source",
        type=Path,
        help="the prefix-router-before target runs from this tree (e.g. `git archive` of the "
        "commit before a change): an A/B of two router versions in the same rounds",
    )
    p.add_argument("--cprofile", type=Path, help="also profile prefix-router; pstats file here")
    p.add_argument("--quick", action="store_true", help="a few requests per cell (smoke test)")
    p.add_argument("--render", type=Path, help="print a results JSON as a Markdown table")
    p.add_argument(
        "--ratios",
        type=Path,
        nargs="+",
        help="print router CPU per request and its ratios (after / before / smg) of A/B runs",
    )
    p.add_argument("--profiled-router", metavar="OUT", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:  # --profiled-router OUT -- <prefix-router arguments>
        cut = argv.index("--")
        args = _parser().parse_args(argv[:cut])
        if args.profiled_router:
            return _profiled_router(args.profiled_router, argv[cut + 1 :])
    args = _parser().parse_args(argv)
    if args.ratios:
        print(ratio_table([(f.name, json.loads(f.read_text())["results"]) for f in args.ratios]))
        return 0
    if args.render:
        print(markdown_table(json.loads(args.render.read_text())["results"]))
        return 0
    concurrencies = tuple(args.concurrency)
    realtime = args.speedup < 10
    short = _per_concurrency(
        args.short_requests or ((300, 1500, 1500) if realtime else (1500,)), concurrencies
    )
    stream = _per_concurrency(
        args.stream_requests or ((15, 96, 256) if realtime else (300, 600, 1024)), concurrencies
    )
    cfg = BenchConfig(
        concurrencies=concurrencies,
        modes=tuple(m for m in args.modes.split(",") if m),
        short_requests={
            c: (max(c, 30) if args.quick else n) for c, n in zip(concurrencies, short, strict=True)
        },
        stream_requests={
            c: (max(c, 6) if args.quick else n) for c, n in zip(concurrencies, stream, strict=True)
        },
        rounds=args.rounds,
        speedup=args.speedup,
        stream_interval_s=args.stream_interval,
        profile=args.profile,
        policy=args.policy,
        warmup=10 if args.quick else args.warmup,
        log_level=args.log_level,
        targets=tuple(t for t in args.targets.split(",") if t),
        generator_cpus=args.generator_cpus,
        before_source=args.before_source.resolve() if args.before_source else None,
        # children started after the generator pinned itself would inherit its CPUs
        server_cpus=args.server_cpus
        or (frozenset(os.sched_getaffinity(0)) if args.generator_cpus else None),
    )
    for m in cfg.modes:
        if m not in ("short", "stream", "long"):
            raise SystemExit(f"unknown mode {m!r}")
    for t in cfg.targets:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    if "prefix-router-before" in cfg.targets and cfg.before_source is None:
        raise SystemExit("the prefix-router-before target needs --before-source DIR")
    if "direct" not in cfg.targets or "prefix-router" not in cfg.targets:
        raise SystemExit("--targets needs direct and prefix-router (the baselines)")
    _install_uvloop()
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp, _sigterm_as_interrupt():
        source = args.source.resolve() if args.source else None
        procs = Processes(Path(tmp), cfg.server_cpus, source)
        cfg = dataclasses.replace(cfg, record_path=str(Path(tmp) / "record.jsonl"))
        try:
            report = asyncio.run(_run(cfg, procs, args.cprofile))
        except KeyboardInterrupt:
            print("interrupted: all child processes stopped", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    report["notes"]["router_source"] = str(source) if source else "working tree"
    _print_table(report["results"])
    if report["notes"].get("cprofile_top"):
        print(report["notes"]["cprofile_top"][:6000])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _per_concurrency(counts: Sequence[int], concurrencies: Sequence[int]) -> tuple[int, ...]:
    """One count per concurrency: the last given repeats, extra ones are dropped."""
    padded = tuple(counts) + (counts[-1],) * len(concurrencies)
    return padded[: len(concurrencies)]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to this script unwinds like Ctrl-C, so the children are stopped too."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    print(
        f"{'mode':6s} {'conc':>4s} {'router':14s} {'p50 ms':>8s} {'p99 ms':>8s} "
        f"{'+p50 ms':>8s} {'+p99 ms':>8s} {'req/s':>7s} {'err':>4s} {'router CPU ms/req':>17s}"
    )
    for r in rows:
        cpu = r.get("cpu_ms_per_request", {}).get(r["router"])
        cpu_text = f"{cpu:17.3f}" if cpu is not None else f"{'-':>17s}"
        print(
            f"{r['mode']:6s} {r['concurrency']:4d} {r['router']:14s} {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['added_p50_ms']:8.2f} {r['added_p99_ms']:8.2f} "
            f"{r['throughput_rps']:7.0f} {r['errors']:4d} {cpu_text}"
        )


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (what benchmarks/overhead.md shows)."""
    lines = [
        "| mode | conc | router | p50 ms | p99 ms | added p50 | added p99 | req/s "
        "| router CPU ms/req |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = r.get("cpu_ms_per_request", {}).get(r["router"])
        lines.append(
            f"| {r['mode']} | {r['concurrency']} | {r['router']} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['added_p50_ms']:+.2f} | {r['added_p99_ms']:+.2f} "
            f"| {r['throughput_rps']:.0f} | {'-' if cpu is None else f'{cpu:.3f}'} |"
        )
    return "\n".join(lines)


def ratio_table(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> str:
    """Router CPU ms per request of A/B runs (prefix-router = after, prefix-router-before =
    before) and their ratios, one row per run and mode: what an A/B in overhead.md reports."""
    lines = [
        "| run | mode | requests | after | before | smg 1.13 | sglang-router "
        "| after / before | after / smg | before / smg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = ("prefix-router", "prefix-router-before", "smg", "sglang-router")
    for run, rows in runs:
        for mode in dict.fromkeys(r["mode"] for r in rows):
            cpu: dict[str, float] = {}
            requests = 0
            for r in rows:
                value = r.get("cpu_ms_per_request", {}).get(r["router"])
                if r["mode"] == mode and r["router"] in names and value is not None:
                    cpu[r["router"]] = value
                    requests = max(requests, r["requests"])
            if "prefix-router" not in cpu:
                continue

            def ratio(a: str, b: str, cpu: dict[str, float] = cpu) -> str:
                return f"{cpu[a] / cpu[b]:.3f}" if a in cpu and cpu.get(b) else "-"

            cells = [f"{cpu[n]:.3f}" if n in cpu else "-" for n in names]
            lines.append(
                f"| {run} | {mode} | {requests} | " + " | ".join(cells) + " | "
                f"{ratio('prefix-router', 'prefix-router-before')} | "
                f"{ratio('prefix-router', 'smg')} | {ratio('prefix-router-before', 'smg')} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
