"""How to start each reference router the comparisons measure ours against.

One `Launcher` per router: the prefix its targets take (`sglang-router:<policy>`,
`smg:<policy>`), its policies, the pinned version, the command line that starts it on a loopback
port in front of given workers, and the paths that must answer 200 before it routes. Each
command keeps the router's own routing defaults and sets only what running several routers on
one box needs (the metrics port, which defaults to 29000 in both) and startup polling.

- sglang-router 0.3.2 (January 2026): SGLang's router before it became SMG.
- SMG 1.13.0, the Shepherd Model Gateway (`pip install smg`), what SGLang users run now. Its
  load monitor polls each worker's `/v1/loads?include=core,disagg,queues,memory` every
  `--load-monitor-interval` s (default 10); least_load and power_of_two route on those.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["LAUNCHERS", "SMG_POLICIES", "Launcher", "sglang_router_argv", "smg_argv"]


def sglang_router_argv(
    python: str,
    *,
    port: int,
    policy: str,
    worker_urls: Sequence[str],
    metrics_port: int,
    log_level: str = "warn",
) -> list[str]:
    """The command that starts sglang-router 0.3.2 on 127.0.0.1:`port` with its own defaults.

    Only startup polling (1 s instead of 30 s) and the Prometheus port (default 29000, which
    another router may hold) are set; no routing knob is changed.
    """
    return [
        python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
        "--port", str(port), "--policy", policy, "--worker-urls", *worker_urls,
        "--log-level", log_level, "--worker-startup-check-interval", "1",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
    ]  # fmt: skip


def smg_argv(
    python: str,
    *,
    port: int,
    policy: str,
    worker_urls: Sequence[str],
    metrics_port: int,
    log_level: str = "warn",
) -> list[str]:
    """The command that starts SMG 1.13 (`smg launch`) on 127.0.0.1:`port`, its own defaults.

    As for sglang-router: startup polling 1 s and a free Prometheus port; every routing knob,
    the load monitor's 10 s interval included, stays SMG's default.
    """
    return [
        python, "-m", "smg", "launch", "--host", "127.0.0.1", "--port", str(port),
        "--policy", policy, "--worker-urls", *worker_urls, "--log-level", log_level,
        "--worker-startup-check-interval", "1",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
    ]  # fmt: skip


SMG_POLICIES = (
    "cache_aware", "least_load", "prefix_hash", "power_of_two", "round_robin", "random",
    "consistent_hashing",
)  # fmt: skip


SMG_POLICIES = (
    "cache_aware", "least_load", "prefix_hash", "power_of_two", "round_robin", "random",
    "consistent_hashing",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Launcher:
    """One reference router: targets `<kind>:<policy>`, started by `argv`."""

    kind: str
    package: str  # the module that must be importable (the bench extra installs it)
    version: str
    policies: tuple[str, ...]
    argv: Callable[..., list[str]]  # (python, *, port, policy, worker_urls, metrics_port)
    ready_paths: tuple[str, ...] = ("/v1/models", "/health")


LAUNCHERS: dict[str, Launcher] = {
    "sglang-router": Launcher(
        kind="sglang-router",
        package="sglang_router",
        version="0.3.2",
        policies=("cache_aware", "round_robin", "random", "power_of_two"),
        argv=sglang_router_argv,
    ),
    "smg": Launcher(
        kind="smg",
        package="smg",
        version="1.13.0",
        policies=SMG_POLICIES,
        argv=smg_argv,
    ),
}
