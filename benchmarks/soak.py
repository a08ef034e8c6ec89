"""Soak: an hour of the Mooncake conversation trace through `prefix-router serve`, sped up.

How it works. `--backends` simulated SGLang servers run in one process (`prefix-router sim`,
at `--speedup` X) and the router in another (`prefix-router serve --backends ...`, default
policy), so the router's own memory is what gets sampled. This process replays
data/traces/conversation_trace.jsonl (3,537 s; repeated from its start until `--seconds` of
trace time, 3,600 by default) at X times real time through the router, streaming completions,
and meanwhile samples the router's RSS (/proc/PID/status, every `--sample` seconds).

Before the replay (router idle, health checks running) and again after it (in-flight back to
0, then `--settle` seconds, 35 by default, so idle keep-alive connections to the backends
time out: aiohttp closes them after 15 s idle, checked every 15 s) it reads
the router's open file descriptors (/proc/PID/fd) and its asyncio task count (`/stats`
"asyncio_tasks"). Leaked = after minus before (> 0 is a leak); idle keep-alive connections to
the backends (the connection pool, found with `ss`) are reported apart, not as a leak.

RSS growth over the second half = (mean RSS over the run's last 10%) / (mean RSS over 45-55%
of the run) - 1; the acceptance is < 10%. The JSON (`--json`, default
benchmarks/results/soak.json) holds the figures, errors and `"ok"`; the plot (`--png`) shows
RSS over time. Figures come from a shared 2-core box.

Run: flock /tmp/prefix-router-heavy.lock python benchmarks/soak.py   (about 8 minutes at 8x)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.replay.client import ReplayConfig, replay  # noqa: E402
from router.replay.compare import ProcessSet  # noqa: E402
from router.replay.metrics import RequestOutcome  # noqa: E402
from router.replay.ports import free_port, free_port_block  # noqa: E402
from router.replay.traces import Trace, load_trace  # noqa: E402

TRACE = ROOT / "data" / "traces" / "conversation_trace.jsonl"


def looped(trace: Trace, seconds: float) -> Trace:
    """`trace` repeated from its start until `seconds` of arrivals (rids stay unique)."""
    span = trace.duration() + 1.0
    out = []
    offset = 0.0
    while offset < seconds:
        for r in trace.requests:
            t = r.timestamp + offset
            if t >= seconds:
                break
            out.append(replace(r, timestamp=t))
        offset += span
    return replace(trace, requests=tuple(out))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode, file), and their total."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    kinds["total"] = sum(kinds.values())
    return kinds


class Sampler(threading.Thread):
    """RSS of one process every `period` seconds, until stopped."""

    def __init__(self, pid: int, period: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, rss_bytes(self.pid)))
            except OSError:
                return
            self.stop_event.wait(self.period)


async def router_stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/stats") as r:
        data: dict[str, Any] = await r.json()
        return data


def upstream_keepalive(pid: int, backend_ports: set[int]) -> int | None:
    """The router's open TCP connections to a backend (idle keep-alive when nothing runs)."""
    try:
        out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    count = 0
    for line in out.splitlines():
        cols = line.split()
        if f"pid={pid}," in line and len(cols) >= 5:
            count += int(cols[4].rsplit(":", 1)[1]) in backend_ports
    return count


async def idle_figures(
    url: str, pid: int, settle_s: float, backend_ports: set[int]
) -> dict[str, Any]:
    """In-flight back to 0, then `settle_s` quiet seconds, then fds and tasks.

    aiohttp keeps a few idle connections per backend alive for as long as the health checks
    (every 5 s) reuse them: they are the pool, not a leak, so they are counted apart and
    `fds_other` (every descriptor but those) is what must come back to its value before.
    """
    deadline = time.monotonic() + 120
    while (await router_stats(url))["in_flight"] and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await asyncio.sleep(settle_s)
    stats = await router_stats(url)
    fds = open_fds(pid)
    keepalive = upstream_keepalive(pid, backend_ports)
    return {
        "fds": fds,
        "upstream_keepalive": keepalive,
        "fds_other": fds["total"] - (keepalive or 0),
        "asyncio_tasks": stats["asyncio_tasks"],
    }


def growth(samples: list[tuple[float, int]]) -> float:
    """Mean RSS over the last 10% of the run over the mean over 45-55%, minus 1."""
    end = samples[-1][0]

    def mean(lo: float, hi: float) -> float:
        vals = [rss for t, rss in samples if lo * end <= t <= hi * end]
        if not vals:  # a run shorter than the sampling period's few steps
            vals = [min(samples, key=lambda s: abs(s[0] - (lo + hi) / 2 * end))[1]]
        return sum(vals) / len(vals)

    return mean(0.9, 1.0) / mean(0.45, 0.55) - 1.0


def plot(samples: list[tuple[float, int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([t for t, _ in samples], [rss / 2**20 for _, rss in samples], lw=1)
    ax.set_xlabel("wall seconds since the replay started")
    ax.set_ylabel("router RSS (MiB)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def soak(args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    trace = looped(load_trace(TRACE), args.seconds)
    procs = ProcessSet(log_dir)
    sim_port = free_port_block(args.backends)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backends = [f"http://127.0.0.1:{sim_port + i}" for i in range(args.backends)]
    py = sys.executable
    try:
        await procs.start_ready(
            "sim",
            [py, "-m", "router", "sim", "--count", str(args.backends), "--port", str(sim_port),
             "--speedup", str(args.speedup), "--profile", "llama3-8b-h100-hicache",
             "--stream-interval", str(args.stream_interval)],
            [b + "/health" for b in backends], time.monotonic() + 60,
        )  # fmt: skip
        router = await procs.start_ready(
            "router",
            [py, "-m", "router", "serve", "--workers", "1",
             "--backends", ",".join(backends), "--port", str(port),
             "--log-level", "WARNING"],
            [url + "/readiness"], time.monotonic() + 60,
        )  # fmt: skip
        pid = router.proc.pid
        ports = {sim_port + i for i in range(args.backends)}
        before = await idle_figures(url, pid, 1.0, ports)
        sampler = Sampler(pid, args.sample)
        sampler.start()
        bar = tqdm(total=len(trace.requests), desc="soak", unit="req", mininterval=5.0)
        errors: list[str] = []

        def done(outcome: RequestOutcome) -> None:
            bar.update(1)
            if outcome.error is not None and len(errors) < 20:
                errors.append(f"{outcome.rid}: {outcome.error[:200]}")

        config = ReplayConfig(url=url, api="chat", speedup=args.speedup, request_timeout_s=600)
        run = await replay(trace, config, on_done=done)
        bar.close()
        sampler.stop_event.set()
        sampler.join()
        after = await idle_figures(url, pid, args.settle, ports)
        alive = router.proc.poll() is None
    finally:
        procs.stop_all()
    failed = sum(1 for o in run.outcomes if o.error is not None)
    samples = sampler.samples
    g = growth(samples)
    leaked_fds = after["fds_other"] - before["fds_other"]
    leaked_tasks = after["asyncio_tasks"] - before["asyncio_tasks"]
    plot(
        samples,
        args.png,
        f"prefix-router RSS, conversation trace {args.seconds:.0f} s at {args.speedup:g}x "
        f"({len(trace.requests)} requests), second-half growth {g:+.1%}",
    )
    return {
        "ok": alive and failed == 0 and g < 0.10 and leaked_fds <= 0 and leaked_tasks <= 0,
        "requests": len(trace.requests),
        "failed": failed,
        "errors": errors,
        "trace_seconds": args.seconds,
        "speedup": args.speedup,
        "wall_s": round(run.wall_s, 1),
        "late_s_max": round(run.late_s_max, 2),
        "rss_mib_start": round(samples[0][1] / 2**20, 1),
        "rss_mib_mid": round(samples[len(samples) // 2][1] / 2**20, 1),
        "rss_mib_end": round(samples[-1][1] / 2**20, 1),
        "rss_mib_max": round(max(r for _, r in samples) / 2**20, 1),
        "rss_growth_second_half": round(g, 4),
        "before": before,
        "after": after,
        "leaked_fds": leaked_fds,
        "leaked_tasks": leaked_tasks,
        "router_alive": alive,
        "samples": [[round(t, 1), rss] for t, rss in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3600.0, help="trace seconds replayed")
    parser.add_argument("--speedup", type=float, default=8.0, help="trace and sim speed")
    parser.add_argument(
        "--stream-interval",
        type=float,
        default=0.1,
        help="wall-clock seconds between a stream's chunks at the sims (default 0.1; theirs 0.02); "
        "a longer one relays fewer chunks, so a 2-core box keeps up at a higher --speedup "
        "(what the soak measures is memory and leaks per request, not relay speed)",
    )
    parser.add_argument("--backends", type=int, default=4, help="simulated backends")
    parser.add_argument("--sample", type=float, default=1.0, help="RSS sampling period (s)")
    parser.add_argument("--settle", type=float, default=35.0, help="quiet seconds before end")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/soak.json")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks/results/soak.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        result = asyncio.run(soak(args, Path(tmp)))
    result["setup"] = (
        f"prefix-router sim --count {args.backends} (llama3-8b-h100-hicache, --stream-interval "
        f"{args.stream_interval:g}) and prefix-router "
        "serve (default policy) as separate processes; streaming chat; shared 2-core box"
    )
    result["command"] = "python benchmarks/soak.py " + " ".join(argv or sys.argv[1:])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
