"""`prefix-router sim`: run K simulated SGLang servers on ports P..P+K-1 in one process.

Each server owns its own engine (`backends.sim.server`); all share one event loop. The command
logs one line per server with its URL, then runs until Ctrl-C or SIGTERM and closes every
server (in-flight requests are aborted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "run simulated SGLang servers (CPU only) speaking SGLang's HTTP API"
DESCRIPTION = (
    HELP + ".\n\nExample:\n  prefix-router sim --port 31000 --count 4 --profile llama3-8b-h100\n"
    "Each server answers /generate, /v1/chat/completions, /v1/completions, /get_server_info,\n"
    "/v1/loads, /metrics, ... with timings from the profile's roofline model.\n"
    "--speedup X runs simulated time X times faster than the wall clock; --stream-interval S\n"
    "sets how often streams get a chunk (SGLang sends one per token: a small S comes closer)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=31000, help="first port (default 31000)")
    parser.add_argument("--count", type=int, default=1, help="number of servers (default 1)")
    parser.add_argument(
        "--profile", default="llama3-8b-h100", help="performance profile (see `profiles`)"
    )
    parser.add_argument(
        "--model", default="meta-llama/Llama-3.1-8B-Instruct", help="served model name"
    )
    parser.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens")
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="simulated time runs this many times faster"
    )
    parser.add_argument(
        "--schedule-policy", choices=("fcfs", "lpm"), default="fcfs", help="waiting-queue order"
    )
    parser.add_argument(
        "--enable-priority-scheduling",
        action="store_true",
        help="order the waiting queue by the request's `priority` (higher first), then "
        "arrival, as SGLang's flag of that name (fcfs only)",
    )
    parser.add_argument(
        "--context-length", type=int, default=None, help="context length (default: the profile's)"
    )
    parser.add_argument(
        "--stream-interval",
        type=float,
        default=0.02,
        metavar="SECONDS",
        help="wall-clock period of streaming progress updates (default 0.02)",
    )
    parser.add_argument(
        "--mode",
        choices=("mixed", "prefill", "decode"),
        default="mixed",
        help="mixed (default): ordinary servers; prefill / decode: SGLang's PD disaggregation "
        "roles, met through the bootstrap fields a PD router adds (backends/sim/pd_server.py)",
    )
    parser.add_argument(
        "--bootstrap-port",
        type=int,
        default=0,
        help="--mode prefill: first bootstrap port, one per server (default 0: ephemeral)",
    )
    parser.add_argument(
        "--link-gbps",
        type=float,
        default=None,
        help="--mode prefill: KV transfer link, GB/s (default: the profile's, 40)",
    )
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument("--log-level", default="info", help="logging level (default info)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.count < 1:
        raise SystemExit("--count must be >= 1")
    if args.stream_interval <= 0:
        raise SystemExit("--stream-interval must be > 0")
    if args.link_gbps is not None and not args.link_gbps > 0:
        raise SystemExit("--link-gbps must be > 0")
    if not 0 <= args.bootstrap_port < 65536:
        raise SystemExit("--bootstrap-port must be a port number")
    if args.enable_priority_scheduling and args.schedule_policy != "fcfs":
        raise SystemExit("--enable-priority-scheduling needs --schedule-policy fcfs (as SGLang)")
    _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


def _install_uvloop() -> None:
    """uvloop when installed (the `fast` extra), as `serve` does: less CPU per request."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(args: argparse.Namespace) -> None:
    from backends.sim.server import SimServerConfig, start_sim_servers

    log = logging.getLogger("prefix_router.sim")
    config = SimServerConfig(
        model=args.model,
        page_size=args.page_size,
        speedup=args.speedup,
        context_length=args.context_length,
        stream_interval_s=args.stream_interval,
        access_log=args.access_log,
    )
    engine_config = {
        "schedule_policy": args.schedule_policy,
        "enable_priority_scheduling": args.enable_priority_scheduling,
    }
    if args.mode == "mixed":
        handles = await start_sim_servers(
            args.count,
            host=args.host,
            base_port=args.port,
            profile=args.profile,
            config=config,
            engine_config=engine_config,
        )
    else:
        from backends.sim.pd_server import start_pd_servers

        handles = await start_pd_servers(
            args.mode,
            args.count,
            host=args.host,
            base_port=args.port,
            bootstrap_base_port=args.bootstrap_port,
            profile=args.profile,
            config=config,
            engine_config=engine_config,
            link_bytes_per_s=args.link_gbps * 1e9 if args.link_gbps else None,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for h in handles:
            boot = getattr(h.server, "bootstrap_port", None)
            log.info(
                "simulated SGLang server %s (%s%s, profile %s, model %s, speedup %g)",
                h.url,
                args.mode,
                f", bootstrap port {boot}" if boot is not None else "",
                args.profile,
                args.model,
                args.speedup,
            )
        await stop.wait()
        log.info("stopping %d simulated server(s)", len(handles))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for h in handles:
            await h.close()
