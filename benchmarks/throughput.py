"""The highest rate each router sustains: prefix-router (1 and N workers), SMG, sglang-router.

How it works. One simulated SGLang backend (`prefix-router sim`, a subprocess, speedup
`--speedup`, 1 ms streaming tick) and every router in front of it, all started once:

    generator (this process: raw asyncio HTTP/1.1 client, open loop)
        |--> direct                        the backend itself (the baseline)
        |--> prefix-router, 1 worker       serve --workers 1 (default policy, cost)
        |--> prefix-router, N workers      serve --workers N (N = usable CPUs)
        |--> smg 1.13                      smg launch --policy cache_aware (its default)
        '--> sglang-router 0.3.2           launch_router --policy cache_aware (its default)

For each mode ("short": a non-streaming chat completion, one-line prompt, max_tokens 1-8;
"stream": a streaming chat completion of 256 tokens, one SSE chunk per token at the default
speedup 5) the generator climbs a ladder of rates (x sqrt 2 per step with `--quick`, x 2^1/4
otherwise). At each rate it sends an open loop (evenly spaced arrivals, a connection pool that
grows as needed) for `--step-s` seconds to direct and then to every target still in the race.
Latency is from the request's *scheduled* send time to its last byte (so a generator or router
that falls behind is charged for it). A target passes a rate when every request answered 200,
all answered within the step plus 2 s, and its p99 is at most `--slo-ms` (50) above direct's
p99 at the same rate. `max_rps` is the highest rate passed before the first failure; a target
still passing when direct fails is marked `capped_by_direct` (the box, not the router, ran
out: the generator and the backend share its CPUs).

CPU: the router's process tree (the supervisor and its workers) from /proc, user + system,
over each step; `cpu_ms_per_req` is that over the requests of the `max_rps` step. The
backend's and the generator's CPU are measured the same way and reported beside it
(`backend_cpu_ms_per_req`, `generator_cpu_ms_per_req`): nothing is pinned, every process
shares the machine's CPUs, so at the top of the ladder the backend and the generator take a
large share of a small box and `max_rps` is the box's figure as much as the router's. On a
machine with cores to spare, `--router-cpus 0-1 --backend-cpus 2-5 --generator-cpus 6-7`
gives every router the same two cores of its own (`taskset`), and N defaults to their count:
that is the test of whether N workers scale.

JSON (`--json`): {"results": [{"router", "workers", "mode", "max_rps", "chunks_per_s",
"cpu_ms_per_req", ...}], "direct": [...], "steps": [...], "notes": {...}}.

Run: flock /tmp/prefix-router-heavy.lock python benchmarks/throughput.py --quick \
        --json benchmarks/results/throughput.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from overhead import (
    MODEL,
    Processes,
    _cpus,
    _free_port,
    _install_uvloop,
    _proc_cpu_seconds,
    _wait_ready,
)

from router.replay.launchers import LAUNCHERS
from router.server.workers import default_workers

__all__ = ["main"]


# --------------------------------------------------------------------------- raw client


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, response read whole.

    The generator must cost far less than the routers it drives, so it is not aiohttp: it
    writes pre-built request bytes and only finds where a response ends (Content-Length, or
    the chunked terminator), counting `data:` events for streams.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[tuple[int, int]] | None = None
        self.head_end = -1
        self.length = -1
        self.chunked = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            self.done.set_result((0, 0))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, int]]:
        assert self.transport is not None
        self.buf.clear()
        self.head_end = self.length = -1
        self.chunked = False
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.done

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head_end < 0:
            at = self.buf.find(b"\r\n\r\n")
            if at < 0:
                return
            self.head_end = at + 4
            head = bytes(self.buf[:at]).lower()
            self.chunked = b"transfer-encoding: chunked" in head
            if not self.chunked:
                self.length = _content_length(head)
            if b"connection: close" in head:
                self.closed = True
        body_len = len(self.buf) - self.head_end
        finished = self.buf.endswith(b"0\r\n\r\n") if self.chunked else body_len >= self.length
        if finished and self.done is not None and not self.done.done():
            status = int(self.buf[9:12])
            events = self.buf.count(b"data:", self.head_end)
            self.done.set_result((status, events))


def _content_length(head: bytes) -> int:
    """The Content-Length of a lower-cased header block (0 when absent)."""
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at)
    return int(head[at + 15 : end if end > 0 else len(head)])


class _Pool:
    """Idle connections to one address, opened on demand."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Conn] = []
        self.opened = 0

    async def get(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        self.opened += 1
        return conn

    def put(self, conn: _Conn) -> None:
        if not conn.closed:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def _raw_request(port: int, mode: str, i: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Request {i}: say something about routers."}],
    }
    if mode == "stream":
        body.update(max_tokens=256, stream=True)
    else:
        body["max_tokens"] = 1 + i % 8
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@dataclass(slots=True)
class StepResult:
    target: str
    mode: str
    rate: float
    sent: int
    ok: int
    errors: int
    late: int
    p50_ms: float
    p99_ms: float
    chunks: int
    wall_s: float
    cpu_s: float
    backend_cpu_s: float
    generator_cpu_s: float
    passed: bool = False
    added_p99_ms: float | None = None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.inf
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


async def _open_loop(
    pool: _Pool, requests: list[bytes], rate: float, duration_s: float
) -> tuple[list[float], int, int, int]:
    """Send evenly spaced requests for `duration_s`; latencies (ms), errors, late, chunks."""
    loop = asyncio.get_running_loop()
    n = max(1, int(rate * duration_s))
    latencies: list[float] = []
    counters = {"errors": 0, "chunks": 0}
    start = loop.time() + 0.05

    async def one(i: int, due: float) -> None:
        try:
            conn = await pool.get()
            status, events = await conn.request(requests[i % len(requests)])
        except OSError:
            counters["errors"] += 1
            return
        end = loop.time()
        pool.put(conn)
        if status != 200:
            counters["errors"] += 1
            return
        counters["chunks"] += events
        latencies.append((end - due) * 1000)

    tasks: list[asyncio.Task[None]] = []
    for i in range(n):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    grace = 2.0 + max(0.0, start + duration_s - loop.time())
    _done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    late = len(pending)
    return latencies, counters["errors"], late, counters["chunks"]


# --------------------------------------------------------------------------- targets


@dataclass(slots=True)
class Target:
    name: str  # the JSON's router name ("direct" for the baseline)
    workers: int
    port: int
    pid: int | None = None
    pool: _Pool | None = None
    out: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.name}x{self.workers}" if self.name == "prefix-router" else self.name


def _tree_cpu(pid: int | None) -> float:
    """CPU seconds of `pid` and every descendant (threads included; `_proc_cpu_seconds`).

    NaN when /proc cannot be read for another reason than a process having gone (e.g. this
    process out of file descriptors after an overload step): that step then has no CPU
    figure. (Reading such a failure as 0 s once put zeros, negative and huge values into a
    committed run.)
    """
    if pid is None:
        return 0.0
    total, todo, seen = 0.0, [pid], set()
    try:
        while todo:
            p = todo.pop()
            if p in seen:
                continue
            seen.add(p)
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += _proc_cpu_seconds(p)
                for task in Path(f"/proc/{p}/task").iterdir():
                    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                        todo += [int(c) for c in (task / "children").read_text().split()]
    except OSError as exc:
        print(f"  cannot read /proc for pid {pid}'s CPU ({exc}); this step has none", flush=True)
        return math.nan
    return total


def _ms_per(seconds: float, requests: int) -> float | None:
    """Milliseconds per request, None when the CPU reading failed (NaN)."""
    return round(seconds * 1000 / requests, 3) if math.isfinite(seconds) else None


def _ladder(start: float, top: float, factor: float) -> list[float]:
    out, rate = [], start
    while rate <= top * 1.0001:
        out.append(round(rate, 1))
        rate *= factor
    return out


async def _start_targets(
    procs: Processes, backend_port: int, args: argparse.Namespace, workers: int
) -> list[Target]:
    backend = f"http://127.0.0.1:{backend_port}"
    targets = [Target("direct", 1, backend_port)]
    async with aiohttp.ClientSession() as probe:
        sim = procs.spawn(
            "backend", cpus=args.backend_cpus, argv=
            [sys.executable, "-m", "router.cli", "sim", "--port", str(backend_port),
             "--model", MODEL, "--speedup", str(args.speedup), "--stream-interval", "0.001",
             "--log-level", "warning"],
        )  # fmt: skip
        await _wait_ready(probe, sim, backend + "/health")
        targets[0].pid = sim.popen.pid
        wanted = [t.strip() for t in args.targets.split(",") if t.strip()]
        for name in wanted:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            if name in LAUNCHERS:
                argv = LAUNCHERS[name].argv(
                    sys.executable, port=port, policy="cache_aware", worker_urls=[backend],
                    metrics_port=_free_port(), log_level="warn",
                )  # fmt: skip
                proc = procs.spawn(name, argv, cpus=args.router_cpus)
                await _wait_ready(probe, proc, url + "/health")
                targets.append(Target(name, 1, port, proc.popen.pid))
                continue
            if not name.startswith("prefix-router"):
                raise SystemExit(f"unknown target {name!r}")
            n = workers if name == "prefix-router-n" else 1
            proc = procs.spawn(
                f"prefix-router-{n}", cpus=args.router_cpus, argv=
                [sys.executable, "-m", "router.cli", "serve", "--workers", str(n),
                 "--backend", backend, "--port", str(port), "--log-level", "WARNING"],
            )  # fmt: skip
            await _wait_ready(probe, proc, url + "/readiness")
            targets.append(Target("prefix-router", n, port, proc.popen.pid))
    return targets


async def _warm(target: Target, mode: str) -> None:
    assert target.pool is not None
    reqs = [_raw_request(target.port, mode, i) for i in range(64)]
    await _open_loop(target.pool, reqs, 50.0 if mode == "short" else 10.0, 1.0)


async def _climb(
    targets: list[Target], mode: str, ladder: list[float], args: argparse.Namespace,
    steps: list[StepResult],
) -> None:  # fmt: skip
    direct = targets[0]
    racing = list(targets[1:])
    backend_pid = direct.pid
    for t in targets:
        t.pool = t.pool or _Pool("127.0.0.1", t.port)
        await _warm(t, mode)
    for rate in ladder:
        if not racing:
            break
        base: StepResult | None = None
        for t in [direct, *racing]:
            assert t.pool is not None
            reqs = [_raw_request(t.port, mode, i) for i in range(256)]
            cpu0 = _tree_cpu(t.pid) if t is not direct else 0.0
            bcpu0, gcpu0, w0 = _tree_cpu(backend_pid), time.process_time(), time.perf_counter()
            lat, errors, late, chunks = await _open_loop(t.pool, reqs, rate, args.step_s)
            wall = time.perf_counter() - w0
            cpu = _tree_cpu(t.pid) - cpu0 if t is not direct else 0.0
            step = StepResult(
                target=t.key, mode=mode, rate=rate, sent=max(1, int(rate * args.step_s)),
                ok=len(lat), errors=errors, late=late, p50_ms=_pct(lat, 50), p99_ms=_pct(lat, 99),
                chunks=chunks, wall_s=wall, cpu_s=cpu,
                backend_cpu_s=_tree_cpu(backend_pid) - bcpu0,
                generator_cpu_s=time.process_time() - gcpu0,
            )  # fmt: skip
            healthy = step.errors == 0 and step.late == 0 and step.ok == step.sent
            if t is direct:
                base = step
                step.passed = healthy
            else:
                assert base is not None
                step.added_p99_ms = step.p99_ms - base.p99_ms
                step.passed = healthy and step.added_p99_ms <= args.slo_ms
            steps.append(step)
            print(
                f"  {mode:6} {rate:7.1f}/s {t.key:16} ok {step.ok:5}/{step.sent:<5} "
                f"p99 {step.p99_ms:8.1f} ms"
                + (f" (+{step.added_p99_ms:.1f})" if step.added_p99_ms is not None else "")
                + f" cpu {step.cpu_s * 1000 / max(1, step.ok):.3f} ms/req"
                + ("" if step.passed else "  FAIL"),
                flush=True,
            )
            if t is direct:
                if not step.passed:
                    break
                continue
            if step.passed:
                t.out[mode] = step
            else:
                racing.remove(t)
            await asyncio.sleep(0.3)  # let the backend drain between targets
        assert base is not None
        if base.passed:
            direct.out[mode] = base
        else:
            print(f"  direct failed at {rate}/s: the box is the limit; stopping the climb")
            for t in racing:
                t.out[f"{mode}_capped"] = True
            break


def _row(t: Target, mode: str) -> dict[str, Any]:
    step: StepResult | None = t.out.get(mode)
    if step is None:
        return {
            "router": t.name, "workers": t.workers, "mode": mode, "max_rps": 0.0,
            "chunks_per_s": 0.0, "cpu_ms_per_req": None,
        }  # fmt: skip
    ok = max(1, step.ok)
    return {
        "router": t.name,
        "workers": t.workers,
        "mode": mode,
        "max_rps": step.rate,
        "chunks_per_s": round(step.chunks / step.wall_s, 1) if mode == "stream" else 0.0,
        "cpu_ms_per_req": _ms_per(step.cpu_s, ok),
        "p99_ms_at_max": round(step.p99_ms, 2),
        "added_p99_ms_at_max": round(step.added_p99_ms or 0.0, 2),
        "backend_cpu_ms_per_req": _ms_per(step.backend_cpu_s, ok),
        "generator_cpu_ms_per_req": _ms_per(step.generator_cpu_s, ok),
        "capped_by_direct": bool(t.out.get(f"{mode}_capped", False)),
    }


async def _run(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    workers = args.workers or (len(args.router_cpus) if args.router_cpus else default_workers())
    targets = await _start_targets(procs, _free_port(), args, workers)
    factor = math.sqrt(2) if args.quick else 2**0.25
    steps: list[StepResult] = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        for mode in args.modes.split(","):
            start, top = (args.short_from, args.short_to) if mode == "short" else (
                args.stream_from, args.stream_to)  # fmt: skip
            await _climb(targets, mode, _ladder(start, top, factor), args, steps)
    finally:
        for t in targets:
            if t.pool is not None:
                t.pool.close()
    modes = args.modes.split(",")
    return {
        "results": [_row(t, m) for m in modes for t in targets[1:]],
        "direct": [_row(targets[0], m) | {"router": "direct"} for m in modes],
        "steps": [
            {
                k: None if isinstance(v, float) and math.isnan(v) else v
                for k, v in dataclasses.asdict(s).items()
            }
            for s in steps
        ],
        "notes": {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared by every process "
            "here and by other engineers' jobs (a shared 2-core box)",
            "pinning": "none: generator, backend and routers share all CPUs"
            if not (args.router_cpus or args.backend_cpus or args.generator_cpus)
            else f"routers {_cpu_text(args.router_cpus)}, backend {_cpu_text(args.backend_cpus)}, "
            f"generator {_cpu_text(args.generator_cpus)}",
            "backend": f"prefix-router sim, llama3-8b-h100, speedup {args.speedup:g}, "
            "1 ms stream tick",
            "slo": f"added p99 <= {args.slo_ms:g} ms over direct at the same rate, 0 errors",
            "step_s": args.step_s,
            "ladder_factor": round(factor, 4),
            "workers_n": workers,
            "policies": "prefix-router: cost (default); smg, sglang-router: cache_aware "
            "(their defaults)",
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.perf_counter() - t0, 1),
            "python": platform.python_version(),
        },
    }


def _cpu_text(cpus: frozenset[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus)) if cpus else "all"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="coarse ladder, short steps (< 5 min)")
    p.add_argument("--modes", default="short,stream", help="short,stream")
    p.add_argument(
        "--targets",
        default="prefix-router,prefix-router-n,smg,sglang-router",
        help="prefix-router (1 worker), prefix-router-n (--workers), smg, sglang-router",
    )
    p.add_argument("--workers", type=int, help="N of prefix-router-n (default: the routers' CPUs)")
    p.add_argument(
        "--router-cpus", type=_cpus, help="run every router on these CPUs (taskset list, e.g. 0-1)"
    )
    p.add_argument("--backend-cpus", type=_cpus, help="run the backend on these CPUs")
    p.add_argument("--generator-cpus", type=_cpus, help="pin this load generator to these CPUs")
    p.add_argument("--speedup", type=float, default=5.0, help="the backend's (default 5)")
    p.add_argument("--slo-ms", type=float, default=50.0, help="added p99 allowed (default 50)")
    p.add_argument("--step-s", type=float, help="seconds per rate step (2 quick, 5 otherwise)")
    p.add_argument("--short-from", type=float, default=200.0, help="first short rate, req/s")
    p.add_argument("--short-to", type=float, default=6400.0, help="last short rate")
    p.add_argument("--stream-from", type=float, default=5.0, help="first stream rate, streams/s")
    p.add_argument("--stream-to", type=float, default=320.0, help="last stream rate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.step_s is None:
        args.step_s = 2.0 if args.quick else 5.0
    _install_uvloop()
    if args.generator_cpus:  # children not given CPUs keep the ones this process had
        everything = frozenset(os.sched_getaffinity(0))
        args.router_cpus = args.router_cpus or everything
        args.backend_cpus = args.backend_cpus or everything
        os.sched_setaffinity(0, args.generator_cpus)
    with tempfile.TemporaryDirectory(prefix="prefix-router-throughput-") as tmp:
        procs = Processes(Path(tmp))
        try:
            out = asyncio.run(_run(args, procs))
        finally:
            procs.stop_all()
    print(f"{'router':16} {'workers':>7} {'mode':6} {'max_rps':>8} {'chunks/s':>9} cpu ms/req")
    for row in out["results"] + out["direct"]:
        cpu = row.get("cpu_ms_per_req")
        print(
            f"{row['router']:16} {row['workers']:7} {row['mode']:6} {row['max_rps']:8.1f} "
            f"{row['chunks_per_s']:9.0f} {cpu if cpu is not None else '-':>10}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
