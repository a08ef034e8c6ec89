"""Injected faults under steady load: what fails, how fast the router notices, where load goes.

How it works. Each scenario starts its own simulated SGLang backends, one process each
(`prefix-router sim --count 1`, so one can be killed or stopped alone), a router process
(`prefix-router serve --backends ...`, default policy) and sends an open-loop stream of
streaming chat completions (`--rate` per second, short prompts from a few shared prefixes,
32-96 output tokens) for `--seconds`. The fault hits backend b0 at 30% of the run and is
undone at 60%. Meanwhile /stats is polled every 0.1 s. The router runs with probe-friendly
timeouts (PREFIX_ROUTER_* environment): health every 0.5 s (timeout 1.5 s: a 0.5 s timeout
marked every backend of this CPU-starved box unhealthy during the storm, and the router
answered 503), connect 1 s, read (longest silence within a response) 3 s, breaker cool-down
2 s. kill, stop, errors_500 and disconnect_storm route round-robin, so b0 surely gets its
share when the fault hits (the prefix-aware default may happen to send it nothing); slow and
redis_restart run the default policy (learning and sharing are what they test).

Scenarios:

- kill: b0 SIGKILLed, then started again on its port;
- stop: b0 SIGSTOPped (a hang: connects succeed, nothing answers), then SIGCONT;
- slow: b0 runs 10x slower than the others for the whole run (nothing undone): the policy
  must learn it and send it less;
- errors_500: b0 sits behind a fault-injecting front (`backends.sim.faulty`) that answers
  every model request 500 while health checks pass, then heals;
- redis_restart: two router replicas sharing state through a real redis-server; redis is
  SIGKILLed and restarted (same port) 2 s later; load alternates between the replicas;
- disconnect_storm: at 30%, 200 extra streaming requests whose clients hang up after
  20-400 ms; afterwards in-flight must return to 0 in the router and the backends.

Per scenario: requests sent, failed before their first streamed byte (must be 0: those can
always be retried elsewhere), failed while streaming (allowed: a backend died under them),
time to detect (fault -> b0 unhealthy or circuit open in /stats), time to recover (undo ->
b0 healthy in /stats; and, apart, until the policy routes to it again), and where load went
(each backend's share of the requests sent before, during and after the fault). The JSON
(`--json`, default benchmarks/results/faults.json) holds them and `"ok"`; docs/reliability.md
has the table.
Figures come from a shared 2-core box.

Run: flock /tmp/prefix-router-heavy.lock python benchmarks/faults.py   (about 3 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backends.sim.faulty import start_faulty_front  # noqa: E402
from router.replay.compare import ProcessSet, _wait_ready  # noqa: E402
from router.replay.ports import free_port  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ROUTER_ENV = {
    "PREFIX_ROUTER_HEALTH_INTERVAL_S": "0.5",
    "PREFIX_ROUTER_HEALTH_TIMEOUT_S": "1.5",
    "PREFIX_ROUTER_CONNECT_TIMEOUT_S": "1",
    "PREFIX_ROUTER_READ_TIMEOUT_S": "3",
    "PREFIX_ROUTER_BREAKER_COOLDOWN_S": "2",
    "PREFIX_ROUTER_LOG_LEVEL": "WARNING",
}


@dataclass(slots=True)
class Outcome:
    sent: float
    backend: str | None = None
    status: int = 0
    streamed: bool = False  # a data byte reached the client
    error: str | None = None
    ended: float = 0.0


@dataclass(slots=True)
class Run:
    """One scenario's processes, load and observations."""

    procs: ProcessSet
    speedup: float
    sims: dict[str, Any] = field(default_factory=dict)  # name -> child
    ports: dict[str, int] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    polls: list[tuple[float, dict[str, tuple[bool, str]], int]] = field(default_factory=list)
    t0: float = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start_sim(self, name: str, speedup: float, port: int | None = None) -> str:
        port = port or free_port()
        self.sims[name] = self.procs.start(
            f"{name}-{len(self.procs.children)}",
            [sys.executable, "-m", "router", "sim", "--count", "1", "--port", str(port),
             "--speedup", str(speedup)],
        )  # fmt: skip
        self.ports[name] = port
        return f"http://127.0.0.1:{port}"

    def start_router(self, name: str, backends: list[str], extra: list[str]) -> str:
        port = free_port()
        os.environ.update(ROUTER_ENV)
        self.procs.start(
            name,
            [sys.executable, "-m", "router", "serve", "--workers", "1",
             "--backends", ",".join(backends),
             "--port", str(port), *extra],
        )  # fmt: skip
        return f"http://127.0.0.1:{port}"


async def wait_ok(url: str, child: Any) -> None:
    async with aiohttp.ClientSession() as s:
        await _wait_ready(s, url, child, time.monotonic() + 60)


RR = ["--policy", "round_robin"]
PREFIXES = [f"System prompt {i}: you are a careful assistant. " * 20 for i in range(6)]


async def one_request(
    session: aiohttp.ClientSession, url: str, run: Run, rng: random.Random, hang_up: float = 0
) -> Outcome:
    out = Outcome(sent=run.now())
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": rng.choice(PREFIXES)},
            {"role": "user", "content": f"question {rng.random()}"},
        ],
        "max_tokens": rng.randint(32, 96) if not hang_up else 2000,
        "stream": True,
    }
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            out.status = r.status
            out.backend = r.headers.get("X-Prefix-Router-Backend")
            done = False
            started = time.monotonic()
            first = b""
            async for line in r.content:
                first = first or line
                if line.startswith(b"data:"):
                    out.streamed = True
                    if b'"error"' in line:
                        out.error = "error event mid-stream"
                    if line.strip() == b"data: [DONE]":
                        done = True
                if hang_up and time.monotonic() - started > hang_up:
                    out.error = "hung up (on purpose)"
                    break
            if r.status != 200:
                out.error = out.error or f"HTTP {r.status}: {first[:120]!r}"
            elif not done and out.error is None:
                out.error = "stream ended without [DONE]"
    except (aiohttp.ClientError, TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"[:200]
    out.ended = run.now()
    return out


async def load(run: Run, urls: list[str], seconds: float, rate: float, seed: int) -> None:
    """Open loop: a request every 1/rate s (round-robin over `urls`), each its own task."""
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks = []
        i = 0
        while run.now() < seconds:
            url = urls[i % len(urls)]
            i += 1
            tasks.append(asyncio.create_task(one_request(session, url, run, rng)))
            await asyncio.sleep(rng.expovariate(rate))
        run.outcomes.extend(await asyncio.gather(*tasks))


async def poll(run: Run, url: str, seconds: float) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while run.now() < seconds + 5:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with s.get(url + "/stats") as r:
                    data = await r.json()
                rows = {b["url"]: (bool(b["healthy"]), str(b["circuit"])) for b in data["backends"]}
                run.polls.append((run.now(), rows, int(data["in_flight"])))
            await asyncio.sleep(0.1)


def down(row: tuple[bool, str] | None) -> bool:
    return row is not None and (not row[0] or row[1] != "closed")


def summarise(
    run: Run, bad: str, fault_at: float, undo_at: float | None, names: dict[str, str]
) -> dict[str, Any]:
    """Failures, detection and recovery times, and load shares, from one scenario's records."""
    outs = run.outcomes
    failed_before = [o for o in outs if o.error and not o.streamed]
    failed_streaming = [o for o in outs if o.error and o.streamed]
    detect = next((t for t, rows, _ in run.polls if t >= fault_at and down(rows.get(bad))), None)
    recovered = routed_again = None
    if undo_at is not None:
        healthy = next(
            (t for t, rows, _ in run.polls if t >= undo_at and not down(rows.get(bad))), None
        )
        routed = next((o.sent for o in outs if o.sent >= undo_at and o.backend == bad), None)
        recovered = healthy - undo_at if healthy is not None else None
        # the policy may have no reason to send it anything yet (others hold the prefixes)
        routed_again = routed - undo_at if routed is not None else None

    def shares(lo: float, hi: float) -> dict[str, float]:
        sent = [o for o in outs if lo <= o.sent < hi and o.backend]
        counts = Counter(names.get(o.backend or "", "?") for o in sent)
        return {k: round(v / len(sent), 3) for k, v in sorted(counts.items())} if sent else {}

    end = max((o.sent for o in outs), default=0.0)
    return {
        "requests": len(outs),
        "failed_before_first_byte": len(failed_before),
        "failed_while_streaming": len(failed_streaming),
        "errors": sorted({o.error or "" for o in failed_before + failed_streaming})[:5],
        "detect_s": round(detect - fault_at, 2) if detect is not None else None,
        "recover_s": round(recovered, 2) if recovered is not None else None,
        "routed_again_s": round(routed_again, 2) if routed_again is not None else None,
        "share_before": shares(0, fault_at),
        "share_during": shares(fault_at, undo_at if undo_at is not None else end + 1),
        "share_after": shares(undo_at, end + 1) if undo_at is not None else {},
    }


Scenario = Callable[[Run, argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]]


async def three_backends(run: Run, args: argparse.Namespace, slow: bool = False) -> list[str]:
    urls = [run.start_sim(f"b{i}", args.speedup / (10 if slow and i == 0 else 1)) for i in range(3)]
    for name, url in zip(("b0", "b1", "b2"), urls, strict=True):
        await wait_ok(url + "/health", run.sims[name])
    return urls


async def with_load(
    run: Run,
    args: argparse.Namespace,
    router: str,
    fault: Callable[[], Awaitable[None]] | None,
    undo: Callable[[], Awaitable[None]] | None,
    urls: list[str] | None = None,
) -> tuple[float, float]:
    fault_at, undo_at = 0.3 * args.seconds, 0.6 * args.seconds
    run.t0 = time.monotonic()

    async def script() -> None:
        await asyncio.sleep(fault_at)
        if fault is not None:
            await fault()
        await asyncio.sleep(max(undo_at - run.now(), 0))
        if undo is not None:
            await undo()

    await asyncio.gather(
        load(run, urls or [router], args.seconds, args.rate, args.seed),
        poll(run, router, args.seconds),
        script(),
    )
    return fault_at, undo_at


def names_of(urls: list[str]) -> dict[str, str]:
    return {u: f"b{i}" for i, u in enumerate(urls)}


async def kill(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args)
    router = run.start_router("router", urls, RR)
    await wait_ok(router + "/readiness", run.procs.children[-1])

    async def fault() -> None:
        os.killpg(run.sims["b0"].proc.pid, signal.SIGKILL)

    async def undo() -> None:
        run.start_sim("b0", args.speedup, run.ports["b0"])

    fault_at, undo_at = await with_load(run, args, router, fault, undo)
    return summarise(run, urls[0], fault_at, undo_at, names_of(urls))


async def stop(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args)
    router = run.start_router("router", urls, RR)
    await wait_ok(router + "/readiness", run.procs.children[-1])

    async def fault() -> None:
        os.killpg(run.sims["b0"].proc.pid, signal.SIGSTOP)

    async def undo() -> None:
        os.killpg(run.sims["b0"].proc.pid, signal.SIGCONT)

    fault_at, undo_at = await with_load(run, args, router, fault, undo)
    return summarise(run, urls[0], fault_at, undo_at, names_of(urls))


async def slow(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args, slow=True)
    router = run.start_router("router", urls, [])
    await wait_ok(router + "/readiness", run.procs.children[-1])
    await with_load(run, args, router, None, None)
    out = summarise(run, urls[0], 0.0, None, names_of(urls))
    names = names_of(urls)
    thirds = [
        [o for o in run.outcomes if k * args.seconds / 3 <= o.sent < (k + 1) * args.seconds / 3]
        for k in range(3)
    ]
    out["b0_share_by_third"] = [
        round(sum(names.get(o.backend or "") == "b0" for o in part) / max(len(part), 1), 3)
        for part in thirds
    ]
    out["detect_s"] = None
    out["share_before"] = out["share_during"] = {}
    out["share_whole_run"] = summarise(run, urls[0], 0.0, None, names)["share_during"]
    return out


async def errors_500(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args)
    async with aiohttp.ClientSession() as relay:
        front = await start_faulty_front(urls[0], relay)
        try:
            routed = [front.url, urls[1], urls[2]]
            router = run.start_router("router", routed, RR)
            await wait_ok(router + "/readiness", run.procs.children[-1])

            async def fault() -> None:
                front.fail_status = 500

            async def undo() -> None:
                front.fail_status = None

            fault_at, undo_at = await with_load(run, args, router, fault, undo)
        finally:
            await front.close()
    out = summarise(run, routed[0], fault_at, undo_at, names_of(routed))
    out["injected_500s"] = front.failed
    return out


async def redis_restart(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args)
    rport = free_port()
    tmp = Path(run.procs.log_dir)
    argv = ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
            "--dir", str(tmp)]  # fmt: skip
    run.sims["redis"] = run.procs.start("redis", argv)
    await asyncio.sleep(0.5)
    state = ["--state", f"redis://127.0.0.1:{rport}/0"]
    r1 = run.start_router("router1", urls, [*state, "--replica-id", "r1"])
    await wait_ok(r1 + "/readiness", run.procs.children[-1])
    r2 = run.start_router("router2", urls, [*state, "--replica-id", "r2"])
    await wait_ok(r2 + "/readiness", run.procs.children[-1])
    restarted: list[float] = []

    async def fault() -> None:
        os.killpg(run.sims["redis"].proc.pid, signal.SIGKILL)
        await asyncio.sleep(2.0)
        run.sims["redis"] = run.procs.start("redis2", argv)
        restarted.append(run.now())

    fault_at, _ = await with_load(run, args, r1, fault, None, urls=[r1, r2])
    async with aiohttp.ClientSession() as s:
        stats = []
        for r in (r1, r2):
            async with s.get(r + "/stats") as resp:
                stats.append((await resp.json())["replicas"])
    out = summarise(run, urls[0], fault_at, None, names_of(urls))
    out["detect_s"] = None
    out["redis_down_s"] = round(restarted[0] - fault_at, 2) if restarted else None
    out["replicas_after"] = stats
    out["reconnected"] = all(bool(st.get("connected")) for st in stats)
    return out


async def disconnect_storm(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    urls = await three_backends(run, args)
    router = run.start_router("router", urls, RR)
    await wait_ok(router + "/readiness", run.procs.children[-1])
    storm: list[Outcome] = []

    async def fault() -> None:
        rng = random.Random(args.seed + 1)

        async def late(delay: float, s: aiohttp.ClientSession) -> Outcome:
            await asyncio.sleep(delay)  # 200 clients over one second
            return await one_request(s, router, run, rng, hang_up=rng.uniform(0.02, 0.4))

        async with aiohttp.ClientSession() as s:
            storm.extend(await asyncio.gather(*(late(i / 200, s) for i in range(200))))

    await with_load(run, args, router, fault, None)
    await asyncio.sleep(3.0)
    running = 0
    async with aiohttp.ClientSession() as s:
        for u in urls:
            async with s.get(u + "/get_load") as r:
                data: Any = await r.json()
            rows = data if isinstance(data, list) else [data]
            running += sum(int(row.get("num_reqs", 0)) for row in rows)
        async with s.get(router + "/stats") as r:
            after = await r.json()
    out = summarise(run, urls[0], 0.3 * args.seconds, None, names_of(urls))
    out["detect_s"] = None
    out["storm_requests"] = len(storm)
    out["router_in_flight_after"] = after["in_flight"]
    out["backend_requests_after"] = running
    out["asyncio_tasks_after"] = after["asyncio_tasks"]
    return out


SCENARIOS: dict[str, Scenario] = {
    "kill": kill,
    "stop": stop,
    "slow": slow,
    "errors_500": errors_500,
    "redis_restart": redis_restart,
    "disconnect_storm": disconnect_storm,
}


def scenario_ok(name: str, r: dict[str, Any]) -> bool:
    if r.get("failed_before_first_byte", 1) != 0:
        return False
    if name == "disconnect_storm":
        return bool(r["router_in_flight_after"] == 0 and r["backend_requests_after"] == 0)
    if name == "redis_restart":
        return bool(r["reconnected"]) and r["failed_while_streaming"] == 0
    if name == "slow":
        return bool(r["b0_share_by_third"][-1] < 1 / 3)
    return r["detect_s"] is not None and r["recover_s"] is not None


def table(results: dict[str, Any]) -> str:
    """The markdown table of docs/reliability.md, from the JSON's scenarios."""

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return " ".join(f"{k} {x:.0%}" for k, x in v.items()) or "-"
        return "-" if v is None else str(v)

    rows = [
        "| fault | requests | failed before 1st byte | failed streaming | detect s | recover s "
        "| b0 routed again s | share before | share during | share after | ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        during = r.get("share_whole_run") or r["share_during"]
        rows.append(
            f"| {name} | {r['requests']} | {r['failed_before_first_byte']} | "
            f"{r['failed_while_streaming']} | {fmt(r['detect_s'])} | {fmt(r['recover_s'])} | "
            f"{fmt(r['routed_again_s'])} | {fmt(r['share_before'])} | {fmt(during)} | "
            f"{fmt(r['share_after'])} | {r['ok']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="load per scenario")
    parser.add_argument("--rate", type=float, default=15.0, help="requests per second")
    parser.add_argument("--speedup", type=float, default=10.0, help="simulated backend speed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="repeatable")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/faults.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for name in args.only or list(SCENARIOS):
        print(f"scenario {name} ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as tmp:
            run = Run(procs=ProcessSet(Path(tmp)), speedup=args.speedup)
            try:
                result: dict[str, Any] = asyncio.run(SCENARIOS[name](run, args))
            finally:
                run.procs.stop_all()
        result["ok"] = scenario_ok(name, result)
        results[name] = result
        print(json.dumps({name: result}), file=sys.stderr, flush=True)
    doc = {
        "ok": all(r["ok"] for r in results.values()),
        "scenarios": results,
        "setup": f"3 sim processes (speedup {args.speedup:g}), router process(es), "
        f"{args.rate:g} streaming chats/s for {args.seconds:g} s, fault at 30%, undone at 60%; "
        f"router env {ROUTER_ENV}; shared 2-core box",
        "command": "python benchmarks/faults.py " + " ".join(argv or sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(results))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
