"""`prefix-router serve`: the live router in front of SGLang backends (or simulated ones)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router.commands._scheduler_args import HEADROOM_HELP, headroom_arg

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "run the live router (OpenAI- and SGLang-compatible proxy)"
DESCRIPTION = """Run the prompt-cache-aware router.

Backends come from --backend URL (repeatable), --backends URL,URL, the config file, or
PREFIX_ROUTER_BACKENDS; --embedded K starts K simulated SGLang backends in this process.

--profile NAME (see `prefix-router profiles`; default llama3-8b-h100) says what hardware and
model every backend is: the simulated backends run it, and the router's cost model of each
backend (prefill and decode speed) starts from it before calibrating online. A backend on
other hardware gets its own with --backend-profile URL=NAME (repeatable). KV capacity and a
HiCache host pool come from each backend's /get_server_info.

Several router replicas behind one load balancer share their routing state (which prefix went
where, each backend's queued prefill) through Redis: give every replica the same
--state redis://HOST:6379/0 and --cluster NAME (docs/replicas.md). The default, --state memory,
shares nothing. If Redis goes away, each replica routes on its own state until it returns.
--record PATH writes the traffic it routes as a Mooncake trace (sizes, arrival times, salted
prefix block ids; never prompt text) that `simulate`, `analyze` and `plan` read; the admin API
starts and stops it at run time (POST/DELETE /admin/record).
--workers N runs N router processes on the port (default: one per CPU this process may use;
1 runs one process, as before): they share the port (SO_REUSEPORT) and one view of the pool
through a hub in the supervising process (or the --state Redis), and /stats, /metrics and the
admin API answer for all of them (docs/workers.md).
Every option can also be set in a YAML file (--config) or as PREFIX_ROUTER_<NAME>.

examples:
  prefix-router serve --embedded 4
  prefix-router serve --backend http://gpu1:30000 --backend http://gpu2:30000 --policy cost
  prefix-router serve --backends gpu1:30000,gpu2:30000 --profile llama3-8b-a100 \
      --backend-profile gpu2:30000=llama3-8b-h100
  prefix-router serve --backends gpu1:30000,gpu2:30000 --state redis://redis:6379/0 \
      --cluster prod    # run the same on each replica
  prefix-router serve --prefill http://p1:30000 8998 --prefill http://p2:30000 8998 \
      --decode http://d1:30000 --decode http://d2:30000   # SGLang PD disaggregation

PD mode (--prefill/--decode): each request goes to a prefill and a decode server with SGLang's
bootstrap fields; the pair is priced together (prefill TTFT + KV transfer + N x decode TG) unless
--prefill-policy / --decode-policy choose each side on its own.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", metavar="FILE", help="YAML file with any of the options below")
    a("--backend", action="append", metavar="URL", help="a backend URL (repeatable)")
    a("--backends", metavar="URL,URL", help="backend URLs, comma-separated")
    a("--embedded", type=int, metavar="K", help="start K simulated backends in-process")
    a("--profile", help="performance profile of every backend (default llama3-8b-h100)")
    a(
        "--backend-profile",
        action="append",
        dest="backend_profiles",
        metavar="URL=NAME",
        help="performance profile of one backend (repeatable)",
    )
    a("--speedup", type=float, help="simulated backends run this many times faster")
    a("--policy", help='routing policy (default: "cost" if available, else "cache_aware")')
    a(
        "--prefill",
        action="append",
        nargs="+",
        metavar=("URL", "BOOTSTRAP_PORT"),
        help="PD mode: a prefill server and its bootstrap port (default --bootstrap-port); "
        "repeatable, with --decode",
    )
    a("--decode", action="append", metavar="URL", help="PD mode: a decode server (repeatable)")
    a("--bootstrap-port", type=int, help="PD mode: prefill servers' bootstrap port (default 8998)")
    a(
        "--prefill-policy",
        help="PD mode: choose prefill servers by this policy alone (default: the pair is priced "
        "together: TTFT + KV transfer + N x TG)",
    )
    a("--decode-policy", help="PD mode: choose decode servers by this policy alone")
    a(
        "--no-pd-room-hold",
        dest="pd_room_hold",
        action="store_false",
        default=None,
        help="PD mode, pair price: send every request at once instead of holding it in the "
        "router while no decode server has KV room (docs/pd.md)",
    )
    a(
        "--slo-tpot",
        type=float,
        dest="slo_tpot_s",
        metavar="S",
        help="PD mode, pair price: fill no decode server past the KV at which its learned "
        "decode step reaches S seconds; requests wait in the router instead (docs/pd.md)",
    )
    a("--host", help="listen address (default 127.0.0.1)")
    a("--port", type=int, help="listen port (default 30000)")
    a(
        "--workers",
        type=int,
        metavar="N",
        help="router processes on the port, sharing one view (default: one per usable CPU)",
    )
    a("--api-key", action="append", dest="api_keys", metavar="KEY", help="client key (repeatable)")
    a("--admin-key", metavar="KEY", help="key for /admin/ (admin API off without it)")
    a(
        "--protect-status",
        action="store_true",
        default=None,
        help="/stats and /metrics need a client or the admin key (/health, /readiness stay open)",
    )
    a("--max-body-bytes", type=int, help="largest request body accepted (413 above)")
    a("--block-tokens", type=int, help="tokens per routing block (default 64)")
    a(
        "--tokenizer",
        help="cl100k_base (offline) or the model's tokenizer.json (or its folder; the hf extra): "
        "with it and --block-tokens = the backend's page size, KV events give exact cache state",
    )
    a(
        "--kv-events-endpoint",
        action="append",
        dest="kv_event_endpoints",
        metavar="URL=tcp://HOST:PORT",
        help="a backend's KV event publisher, for servers whose /server_info does not say "
        "(repeatable; page size from /server_info, every topic)",
    )
    a(
        "--kv-events",
        choices=("auto", "off"),
        help="auto (default): follow the KV events of backends whose /server_info advertises "
        "a publisher, when the router can read their blocks; off: modelled cache only",
    )
    a("--health-interval", type=float, dest="health_interval_s", metavar="S")
    a("--max-attempts", type=int, help="backends tried per request before 503")
    a(
        "--scheduler",
        choices=["on", "off"],
        help="hold requests in the router and bind them late, with SLO admission, priorities "
        "and tenant fairness (default off; benchmarks/README.md says why)",
    )
    a(
        "--slo-ttft",
        type=float,
        dest="slo_ttft_s",
        metavar="S",
        help="TTFT deadline: with "
        "--scheduler on, a request predicted to miss it gets 429 + Retry-After on arrival",
    )
    a(
        "--scheduler-budget",
        type=float,
        dest="scheduler_budget_s",
        metavar="S",
        help="predicted prefill seconds a backend may have queued before the router holds the "
        "rest (default 0.5)",
    )
    a(
        "--scheduler-headroom",
        type=headroom_arg,
        dest="scheduler_headroom",
        metavar="H|off",
        help=HEADROOM_HELP,
    )
    a(
        "--scheduler-engine-priority",
        action="store_true",
        default=None,
        help="the backends run SGLang's --enable-priority-scheduling: a tenant under its fair "
        "share gets a higher `priority` there, ahead of a flooding tenant's queued prefill",
    )
    a(
        "--scheduler-reserve",
        type=float,
        metavar="F",
        help="with --scheduler-engine-priority: the share of each backend's budget and running "
        "slots kept for under-share tenants (default 0)",
    )
    a(
        "--scheduler-isolation",
        choices=["on", "off"],
        help="while a tenant over its fair share has requests waiting in the router, bind its "
        "requests only to backends with next to no prefill queued, so the other tenants' "
        "requests do not wait behind its prefill in the engines (default on)",
    )
    a("--queue-size", type=int, help="requests the router's queue holds (default 1024; 429 past)")
    a(
        "--queue-timeout",
        type=float,
        dest="queue_timeout_s",
        metavar="S",
        help="longest wait in the router's queue before a 429 (default 60)",
    )
    a("--seed", type=int, help="random seed of the policy")
    a("--log-prompts", action="store_true", default=None, help="log prompt text (off by default)")
    a("--log-level", help="DEBUG, INFO, WARNING...")
    a(
        "--explain",
        action="store_true",
        default=None,
        help="add an x-route-reason header to each response (chosen backend, its predicted "
        "TTFT as queue + prefill + decode share, predicted cached tokens, the runner-up and "
        "its predicted TTFT; cost-model policies), and log it at DEBUG",
    )
    a(
        "--state",
        metavar="URL",
        help="shared routing state: memory (default, one replica) or "
        "redis://host:port/db, rediss://... (TLS), unix:///path (replicas share it)",
    )
    a("--cluster", metavar="NAME", help="fleet name within the shared state (default: default)")
    a("--replica-id", metavar="ID", help="this replica's id in the cluster (default: random)")
    a(
        "--record",
        metavar="PATH",
        help="record the routed traffic as a Mooncake trace (no prompt text; {pid} and "
        "{replica} in PATH are filled in); see `prefix-router plan`",
    )
    a("--record-secret", metavar="S", help="key of the recorded block ids (default: random)")
    a("--record-max-mb", type=float, metavar="MB", help="rotate the file past this size")


def _megabytes(mb: float | None) -> int | None:
    return None if mb is None else int(mb * 2**20)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from router.server.config import load_config
    from router.server.embedded import serve

    backends: list[str] | None = None
    if args.backend or args.backends:
        backends = list(args.backend or [])
        if args.backends:
            backends += [u.strip() for u in args.backends.split(",") if u.strip()]
    try:
        config = load_config(
            args.config,
            backends=backends,
            embedded=args.embedded,
            profile=args.profile,
            backend_profiles=args.backend_profiles,
            speedup=args.speedup,
            policy=args.policy,
            host=args.host,
            port=args.port,
            api_keys=args.api_keys,
            admin_key=args.admin_key,
            protect_status=args.protect_status,
            max_body_bytes=args.max_body_bytes,
            block_tokens=args.block_tokens,
            tokenizer=args.tokenizer,
            kv_events=args.kv_events,
            kv_event_endpoints=args.kv_event_endpoints,
            health_interval_s=args.health_interval_s,
            max_attempts=args.max_attempts,
            scheduler=None if args.scheduler is None else args.scheduler == "on",
            slo_ttft_s=args.slo_ttft_s,
            scheduler_budget_s=args.scheduler_budget_s,
            scheduler_headroom=args.scheduler_headroom,
            scheduler_engine_priority=args.scheduler_engine_priority,
            scheduler_reserve=args.scheduler_reserve,
            scheduler_isolation=(
                None if args.scheduler_isolation is None else args.scheduler_isolation == "on"
            ),
            queue_size=args.queue_size,
            queue_timeout_s=args.queue_timeout_s,
            seed=args.seed,
            log_prompts=args.log_prompts,
            log_level=args.log_level,
            explain=args.explain,
            state=args.state,
            cluster=args.cluster,
            replica_id=args.replica_id,
            record=args.record,
            record_secret=args.record_secret,
            record_max_bytes=_megabytes(args.record_max_mb),
            workers=args.workers,
            prefill=[" ".join(p) for p in args.prefill] if args.prefill else None,
            decode=args.decode,
            bootstrap_port=args.bootstrap_port,
            prefill_policy=args.prefill_policy,
            decode_policy=args.decode_policy,
            pd_room_hold=args.pd_room_hold,
            slo_tpot_s=args.slo_tpot_s,
        )
    except (ValidationError, FileNotFoundError) as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    if not config.backends and not config.embedded and not config.prefill:
        print("no backends: pass --backend URL, --backends URL,URL or --embedded K")
        return 2
    if config.record is not None and not Path(config.record).parent.is_dir():
        print(f"--record: no folder {Path(config.record).parent}", file=sys.stderr)
        return 2
    from router.server.workers import default_workers, serve_workers

    if config.prefill:
        # PD mode's pair price reads both pools' state, and only the prefill side travels
        # between workers: it runs as one process until the decode side is shared too
        if config.workers not in (None, 1):
            print("--workers: PD mode (--prefill/--decode) runs one process", file=sys.stderr)
            return 2
        return serve(config)
    workers = config.workers or default_workers()
    return serve(config) if workers == 1 else serve_workers(config, workers)
