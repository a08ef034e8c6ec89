"""Side by side over real HTTP: one trace window through each router, each on a fresh pool.

For every target, in order::

    start N simulated SGLang servers     `prefix-router sim --count N --port P` (empty caches)
    start the router in front of them    ours: `prefix-router serve --backend ... --policy X`
                                         SMG / sglang-router: `smg launch` / `python -m
                                         sglang_router.launch_router --worker-urls ... --policy
                                         X` (their own defaults; router.replay.launchers)
    wait until both answer               sims: GET /health; router: GET /v1/models (and ours'
                                         /readiness), i.e. until a request would be routed
    replay the window                    `router.replay.client.replay`, open loop
    ours: keep its /stats                in the run's `extra["router_stats"]` (learned speeds)
    split the TTFT                       `extra["ttft_split"]`: the mean TTFT the sims measured
                                         (arrival to first token) and, for ours, the router's
                                         (routing to first upstream chunk), from their /metrics
    stop everything                      SIGTERM to each process group, SIGKILL after a grace

Every child runs in its own session (process group), so stopping it stops whatever it forked,
and a Ctrl-C at the terminal reaches only this process, whose `finally` then stops the children
(`ProcessSet.stop_all`). The command installs a SIGTERM handler that turns into the same path.

Targets are named `<policy>` (ours), `smg:<policy>` (SMG 1.13) or `sglang-router:<policy>`
(0.3.2); router.replay.launchers starts the reference routers. With `speedup` F the sims run
F times faster than the wall clock and the replay sends F times faster and scales measured
times back by F (see `client`); router overheads then weigh F times more, so keep F small.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import aiohttp

from router.core.scheduler import parse_headroom
from router.replay.client import Api, ReplayConfig, ReplayRun, replay
from router.replay.launchers import LAUNCHERS, sglang_router_argv, smg_argv
from router.replay.metrics import RequestOutcome
from router.replay.ports import free_port_block
from router.replay.traces import Trace

__all__ = [
    "SGLANG_ROUTER_POLICIES",
    "CompareConfig",
    "ProcessSet",
    "StartupError",
    "Target",
    "histogram_mean",
    "parse_targets",
    "run_compare",
    "run_target",
    "sglang_router_argv",
    "smg_argv",
]

SGLANG_ROUTER_POLICIES = LAUNCHERS["sglang-router"].policies


class StartupError(RuntimeError):
    """A backend or router did not become ready; the message holds the tail of its log."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One router under test: ours with `policy`, or a reference router (`kind`) with it."""

    name: str
    kind: Literal["ours", "sglang-router", "smg"]
    policy: str
    workers: int = 1  # ours: `serve --workers N` ("cost@2"); one process unless asked
    # "+queue": admission and a queue in the router. Ours: `--scheduler on --slo-ttft S`; SMG:
    # `--max-concurrent-requests`, `--queue-size`, `--queue-timeout-secs S` (CompareConfig).
    queue: bool = False
    # ours with "+queue=H" / "+queue=off": `--scheduler-headroom H|off` (None: its default)
    headroom: str | None = None


def parse_targets(spec: str, our_policies: Sequence[str]) -> list[Target]:
    """Parse "cost,cost@2,smg:cache_aware,sglang-router:cache_aware"; ValueError if bad.

    `POLICY@N` is ours with N worker processes (`serve --workers N`); plain `POLICY` is one.
    A `+queue` suffix (ours or SMG's) turns on the router's own admission and queue;
    ours also takes `+queue=H` or `+queue=off`, its throughput admission's headroom.
    """
    targets: list[Target] = []
    theirs = " or ".join(f"{k}:<{'|'.join(v.policies)}>" for k, v in LAUNCHERS.items())
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        base, plus, option = name.partition("+")
        option, eq, headroom = option.partition("=")
        if plus and option != "queue":
            raise ValueError(f"{name!r}: the only option after + is 'queue'")
        if eq:
            if ":" in base:
                raise ValueError(f"{name!r}: only our router takes a headroom after +queue=")
            try:
                parse_headroom(headroom)
            except ValueError as exc:
                raise ValueError(f"{name!r}: headroom {exc}") from None
        if plus and base.startswith("sglang-router:"):
            raise ValueError(f"{name!r}: sglang-router 0.3.2 has no queue to turn on")
        queue = bool(plus)
        kind, sep, policy = base.partition(":")
        if sep:
            launcher = LAUNCHERS.get(kind)
            if launcher is None:
                raise ValueError(f"unknown router {kind!r} in {name!r}; known: {theirs}")
            if policy not in launcher.policies:
                raise ValueError(
                    f"unknown {kind} policy {policy!r}; known: " + ", ".join(launcher.policies)
                )
            targets.append(Target(name=name, kind=kind, policy=policy, queue=queue))  # type: ignore[arg-type]
        else:
            policy, at, count = base.partition("@")
            if policy not in our_policies or policy == "oracle":
                ours = ", ".join(p for p in our_policies if p != "oracle")
                raise ValueError(f"unknown target {name!r}; ours: {ours}, or {theirs}")
            if at and (not count.isdigit() or int(count) < 1):
                raise ValueError(f"{name!r}: workers after @ must be a positive integer")
            workers = int(count) if at else 1
            targets.append(
                Target(
                    name=name,
                    kind="ours",
                    policy=policy,
                    workers=workers,
                    queue=queue,
                    headroom=headroom if eq else None,
                )
            )
    if not targets:
        raise ValueError("no targets given")
    if len({t.name for t in targets}) != len(targets):
        raise ValueError("a target is named twice")
    return targets


@dataclass(frozen=True, slots=True, kw_only=True)
class CompareConfig:
    """The pool and replay settings shared by every target."""

    backends: int
    profile: str
    load: float = 1.0
    speedup: float = 1.0
    # "+queue" targets: the TTFT deadline (ours: --slo-ttft; SMG: --queue-timeout-secs) and
    # SMG's in-flight limit per backend (its queue holds SMG's default 100 beyond it)
    queue_deadline_s: float = 2.0
    smg_concurrency_per_backend: int = 32
    # wall-clock seconds between a stream's chunks at the simulated backends (their default):
    # a longer one spends less of a small box's CPU relaying chunks, for every target alike
    stream_interval_s: float = 0.02
    api: Api = "completions"
    startup_timeout_s: float = 90.0
    log_dir: Path | None = None  # child logs go here (default: a temporary directory)
    python: str = field(default_factory=lambda: sys.executable)

    def __post_init__(self) -> None:
        if self.backends < 1:
            raise ValueError("backends must be at least 1")
        if not self.load > 0:
            raise ValueError("load must be positive")
        if not self.speedup > 0:
            raise ValueError("speedup must be positive")
        if not self.stream_interval_s > 0:
            raise ValueError("stream interval must be positive")


@dataclass(slots=True)
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


class ProcessSet:
    """Children started in their own process groups, all stopped by `stop_all` (idempotent)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[_Child] = []
        self.started_pids: list[int] = []  # every child ever started (groups share the pid)

    def start(self, name: str, argv: Sequence[str]) -> _Child:
        """Start `argv` in a new session, output to `<log_dir>/<name>.log`."""
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("wb")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        child = _Child(name=name, proc=proc, log_path=log_path, log=log)
        self.children.append(child)
        self.started_pids.append(proc.pid)
        return child

    async def start_ready(
        self, name: str, argv: Sequence[str], ready_urls: Sequence[str], deadline: float
    ) -> _Child:
        """`start`, then wait until every URL in `ready_urls` answers 200 (`time.monotonic()`
        deadline); StartupError, with the tail of its log, if the child exits or is late."""
        child = self.start(name, argv)
        async with aiohttp.ClientSession() as session:
            for url in ready_urls:
                await _wait_ready(session, url, child, deadline)
        return child

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every group, wait up to `grace_s`, SIGKILL what is left; close the logs."""
        for child in self.children:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(max(deadline - time.monotonic(), 0.01))
            # the group may hold grandchildren even when the leader is gone
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5.0)
            child.log.close()
        self.children.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def _wait_ready(
    session: aiohttp.ClientSession, url: str, child: _Child, deadline: float
) -> None:
    while True:
        if child.proc.poll() is not None:
            raise StartupError(
                f"{child.name} exited with code {child.proc.returncode}:\n{_tail(child.log_path)}"
            )
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        if time.monotonic() > deadline:
            raise StartupError(f"{child.name}: {url} not ready:\n{_tail(child.log_path)}")
        await asyncio.sleep(0.2)


async def _get_json(session: aiohttp.ClientSession, url: str) -> object:
    """The JSON body at `url`, or None if it cannot be had (a report extra, never fatal)."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status == 200:
                return await resp.json()
    return None


def histogram_mean(text: str, metric: str) -> tuple[float, int]:
    """(sum, count) of a Prometheus histogram over all its label sets, from exposition text."""
    total, count = 0.0, 0
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if not rest:
            name, _, rest = line.partition(" ")
        value = line.rsplit(" ", 1)[-1]
        try:
            if name == metric + "_sum":
                total += float(value)
            elif name == metric + "_count":
                count += int(float(value))
        except ValueError:
            continue
    return total, count


async def _ttft_split(
    session: aiohttp.ClientSession,
    backend_urls: Sequence[str],
    router_url: str | None,
    speedup: float,
) -> dict[str, float | int]:
    """Mean TTFT as the sims saw it and, for our router, as it saw it (a report extra).

    Against the client's TTFT this says where the live path's time goes: before routing and
    on the way back (client minus router), or between the router and the engines' first token
    (router minus backends), of which the router's own dispatch (arrival to upstream send)
    is measured apart. Both measure wall seconds; scaled by `speedup` into the client's.
    """
    split: dict[str, float | int] = {}
    sources = [("backend", url, "sglang:time_to_first_token_seconds") for url in backend_urls]
    if router_url is not None:
        sources.append(("router", router_url, "prefix_router_ttft_seconds"))
        sources.append(("dispatch", router_url, "prefix_router_dispatch_seconds"))
    sums: dict[str, tuple[float, int]] = {}
    for kind, url, metric in sources:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    continue
                total, count = histogram_mean(await r.text(), metric)
                old_total, old_count = sums.get(kind, (0.0, 0))
                sums[kind] = (old_total + total, old_count + count)
    for kind, (total, count) in sums.items():
        if count:
            split[f"{kind}_mean_s"] = total / count * speedup
            split[f"{kind}_count"] = count
    return split


def _router_argv(
    target: Target, config: CompareConfig, port: int, urls: list[str], metrics_port: int
) -> list[str]:
    if target.kind != "ours":
        argv = LAUNCHERS[target.kind].argv(
            config.python, port=port, policy=target.policy, worker_urls=urls,
            metrics_port=metrics_port,
        )  # fmt: skip
        if target.queue:  # SMG 1.13's concurrency limit, queue and queue timeout
            limit = config.smg_concurrency_per_backend * len(urls)
            wait = max(1, round(config.queue_deadline_s))  # whole seconds
            argv += ["--max-concurrent-requests", str(limit), "--queue-size", "100",
                     "--queue-timeout-secs", str(wait)]  # fmt: skip
        return argv
    # --profile: the router's prior for every backend is the pool's profile, as in `simulate`
    argv = [config.python, "-m", "router", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--policy", target.policy, "--profile", config.profile, "--log-level", "WARNING"]
    argv += ["--workers", str(target.workers)]
    if target.queue:
        argv += ["--scheduler", "on", "--slo-ttft", f"{config.queue_deadline_s:g}"]
        if target.headroom is not None:
            argv += ["--scheduler-headroom", target.headroom]
    for url in urls:
        argv += ["--backend", url]
    return argv


async def run_target(
    trace: Trace,
    target: Target,
    config: CompareConfig,
    procs: ProcessSet,
    *,
    on_done: Callable[[RequestOutcome], None] | None = None,
) -> ReplayRun:
    """Fresh pool + router for `target`, replay `trace`, then stop them (always)."""
    slug = target.name.replace(":", "-")
    try:
        base = free_port_block(config.backends + 2)
        urls = [f"http://127.0.0.1:{base + i}" for i in range(config.backends)]
        router_port = base + config.backends
        deadline = time.monotonic() + config.startup_timeout_s
        await procs.start_ready(
            f"{slug}-sim",
            [
                config.python, "-m", "router", "sim", "--host", "127.0.0.1",
                "--port", str(base), "--count", str(config.backends),
                "--profile", config.profile, "--speedup", f"{config.speedup:g}",
                "--stream-interval", f"{config.stream_interval_s:g}", "--log-level", "warning",
            ],
            [url + "/health" for url in urls],
            deadline,
        )  # fmt: skip
        router_url = f"http://127.0.0.1:{router_port}"
        # ours: /readiness; a reference router: its models and its own health (it routes
        # once its workers passed startup)
        paths = ("/readiness",) if target.kind == "ours" else LAUNCHERS[target.kind].ready_paths
        router = await procs.start_ready(
            slug,
            _router_argv(target, config, router_port, urls, router_port + 1),
            [router_url + path for path in paths],
            deadline,
        )
        replay_config = ReplayConfig(
            url=router_url, api=config.api, load=config.load, speedup=config.speedup
        )
        result = await replay(trace, replay_config, on_done=on_done)
        result.extra["router_log_tail"] = _tail(router.log_path, 1000)
        async with aiohttp.ClientSession() as session:
            if target.kind == "ours":  # what our router learned, before it is stopped
                result.extra["router_stats"] = await _get_json(session, router_url + "/stats")
            ours = router_url if target.kind == "ours" else None
            result.extra["ttft_split"] = await _ttft_split(session, urls, ours, config.speedup)
        return result
    finally:
        procs.stop_all()


async def run_compare(
    trace: Trace,
    targets: Sequence[Target],
    config: CompareConfig,
    procs: ProcessSet,
    *,
    on_target: Callable[[Target], Callable[[RequestOutcome], None] | None] | None = None,
) -> dict[str, ReplayRun]:
    """Each target in turn on its own fresh pool; results keyed by target name."""
    runs: dict[str, ReplayRun] = {}
    for target in targets:
        on_done = on_target(target) if on_target is not None else None
        runs[target.name] = await run_target(trace, target, config, procs, on_done=on_done)
    return runs
