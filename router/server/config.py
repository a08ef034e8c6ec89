"""The router server's configuration: CLI flags over environment over a YAML file.

`ServerConfig` is a pydantic-settings model. Its sources, strongest first:

1. keyword arguments (what `prefix-router serve` got on its command line),
2. environment variables `PREFIX_ROUTER_<FIELD>` (lists as JSON or comma-separated:
   `PREFIX_ROUTER_BACKENDS=http://a:30000,http://b:30000`; maps as JSON or `K=V,K=V`:
   `PREFIX_ROUTER_BACKEND_PROFILES=http://a:30000=llama3-70b-h100-tp4`),
3. a YAML file (`--config FILE`, or `PREFIX_ROUTER_CONFIG`), whose keys are the field names,
4. the defaults below.

`load_config(path, **overrides)` builds one; nothing is read at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["DEFAULT_PROFILE", "ServerConfig", "load_config", "normalise_url"]

DEFAULT_PROFILE = "llama3-8b-h100"

CommaList = Annotated[list[str], NoDecode]
AssignmentMap = Annotated[dict[str, str], NoDecode]


class ServerConfig(BaseSettings):
    """Everything the live proxy needs to know; one object, validated once."""

    model_config = SettingsConfigDict(
        env_prefix="PREFIX_ROUTER_", extra="forbid", frozen=True, yaml_file=None
    )

    host: str = "127.0.0.1"
    port: int = Field(default=30000, ge=0, le=65535)
    backends: CommaList = Field(default_factory=list)
    embedded: int = Field(default=0, ge=0, description="simulated backends to start in-process")
    # Performance profile (`prefix-router profiles`) of every backend: the simulated ones run
    # it, and each backend's routing prior comes from it; None: DEFAULT_PROFILE.
    profile: str | None = None
    # Per-backend profile overrides, URL -> profile name (`--backend-profile URL=NAME`).
    backend_profiles: AssignmentMap = Field(default_factory=dict)
    speedup: float = Field(default=1.0, gt=0)
    policy: str | None = None  # None: "cost" if registered, else "cache_aware"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    api_keys: CommaList = Field(default_factory=list)
    admin_key: str | None = None
    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    block_tokens: int = Field(default=64, gt=0)
    tokenizer: str = "cl100k_base"
    # KV events from backends that advertise a publisher (router/server/kv_events.py)
    kv_events: Literal["auto", "off"] = "auto"
    # a backend's publisher given by hand, URL -> tcp://host:port (`--kv-events-endpoint`)
    kv_event_endpoints: AssignmentMap = Field(default_factory=dict)
    # prompts longer than this (characters) are tokenized in the default executor
    executor_tokenize_chars: int = Field(default=32_768, ge=0)
    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=10.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # longest silence between two chunks of an upstream response before we give up on it
    read_timeout_s: float = Field(default=600.0, gt=0)
    abort_timeout_s: float = Field(default=2.0, gt=0)
    # how long a stopping router waits for in-flight requests before cutting them
    shutdown_timeout_s: float = Field(default=5.0, ge=0)
    retry_after_s: int = Field(default=1, ge=0)
    # The router-side scheduler (router/core/scheduler.py, `--scheduler on`): late binding,
    # SLO admission (429 + Retry-After), priorities and tenant fairness.
    scheduler: bool = False
    slo_ttft_s: float | None = Field(default=None, gt=0)
    scheduler_budget_s: float = Field(default=0.5, gt=0)
    # throughput admission: admit at most this multiple of the pool's full-batch rate (0: off)
    scheduler_headroom: float = Field(default=1.5, ge=0)
    # the backends run SGLang's --enable-priority-scheduling: send under-share tenants first
    scheduler_engine_priority: bool = False
    scheduler_reserve: float = Field(default=0.0, ge=0, lt=1)
    # while a tenant over its share has requests waiting, it binds only to near-empty queues
    scheduler_isolation: bool = True
    queue_size: int = Field(default=1024, ge=1)
    queue_timeout_s: float = Field(default=60.0, gt=0)
    log_prompts: bool = False
    # /stats and /metrics need a client or the admin key (/health and /readiness stay open)
    protect_status: bool = False
    log_level: str = "INFO"
    # x-route-reason response header + DEBUG log line per decision (router.server.explain)
    explain: bool = False
    # Shared routing state between router replicas (docs/replicas.md): "memory" (one replica,
    # nothing shared) or a redis://, rediss:// or unix:// URL; every replica of a fleet the same.
    state: str = "memory"
    # several independent fleets may share one Redis: each is a cluster name
    cluster: str = "default"
    replica_id: str | None = None  # None: random per process
    # Record the routed traffic as a trace (router/server/recorder.py): a path, `{pid}` and
    # `{replica}` filled in; the block ids' secret (None: random per process); rotation.
    record: str | None = None
    record_secret: str | None = None
    record_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    record_keep: int = Field(default=10, ge=0)
    # `serve --workers N` (router/server/workers.py): N router processes on one port; None:
    # one per CPU this process may run on. The supervisor gives each worker its index and
    # every worker's control socket (how /stats, /metrics and /admin reach the siblings).
    workers: int | None = Field(default=None, ge=1)
    worker_index: int | None = Field(default=None, ge=0)
    worker_sockets: list[str] = Field(default_factory=list)
    # PD disaggregation (router/server/pd.py): prefill servers as "URL" or "URL BOOTSTRAP_PORT",
    # decode servers as URLs; both given turns PD mode on. No side policy: the paired price.
    prefill: list[str] = Field(default_factory=list)
    decode: list[str] = Field(default_factory=list)
    bootstrap_port: int = Field(default=8998, gt=0, lt=65536)  # SGLang's default
    prefill_policy: str | None = None
    # PD with the pair price: hold requests in the router while no decode server has KV room
    pd_room_hold: bool = True
    # PD with the pair price and the hold: fill no decode server past the KV at which its
    # learned step reaches this many seconds (`--slo-tpot`)
    slo_tpot_s: float | None = Field(default=None, gt=0)
    decode_policy: str | None = None

    @field_validator("state")
    @classmethod
    def _check_state(cls, value: str) -> str:
        """Fail at startup on a state URL open_state would refuse."""
        value = value.strip()
        schemes = ("redis://", "rediss://", "unix://", "hub+unix://")  # hub: serve --workers
        if value != "memory" and not value.startswith(schemes):
            raise ValueError(
                f"state must be 'memory' or a redis://, rediss:// or unix:// URL, got {value!r}"
            )
        return value

    @field_validator("backends", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        """Accept `a,b` (env, --backends) as well as a YAML/JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cluster", "replica_id")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        """Names go into Redis keys and request ids: 1-64 of [A-Za-z0-9_.:-]."""
        from router.state.events import valid_name

        return None if value is None else valid_name(value, "cluster / replica id")

    @field_validator("backends")
    @classmethod
    def _normalise_urls(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for url in value:
            url = normalise_url(url)
            if url not in out:
                out.append(url)
        return out

    @field_validator("prefill")
    @classmethod
    def _check_prefill(cls, value: list[str]) -> list[str]:
        """Each prefill server: 'URL' or 'URL BOOTSTRAP_PORT' (as SMG's --prefill)."""
        for item in value:
            parts = item.split()
            port_ok = len(parts) < 2 or (parts[1].isdigit() and 0 < int(parts[1]) < 65536)
            if not 1 <= len(parts) <= 2 or not port_ok:
                raise ValueError(f"a prefill server is URL [BOOTSTRAP_PORT], got {item!r}")
        return value

    @field_validator("backend_profiles", "kv_event_endpoints", mode="before")
    @classmethod
    def _parse_backend_profiles(cls, value: Any) -> Any:
        """Accept `URL=NAME,URL=NAME` (env) or a JSON object string, as well as a mapping."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                import json

                return json.loads(text)
            value = [part for part in text.split(",") if part.strip()]
        if isinstance(value, list):
            return dict(_split_assignment(item) for item in value)
        return value

    @field_validator("backend_profiles")
    @classmethod
    def _check_backend_profiles(cls, value: dict[str, str]) -> dict[str, str]:
        out = {normalise_url(url): name for url, name in value.items()}
        for name in out.values():
            _check_profile(name)
        return out

    @field_validator("kv_event_endpoints")
    @classmethod
    def _check_kv_event_endpoints(cls, value: dict[str, str]) -> dict[str, str]:
        out = {normalise_url(url): endpoint for url, endpoint in value.items()}
        for endpoint in out.values():
            if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
                raise ValueError(f"a KV event endpoint is tcp://host:port, got {endpoint!r}")
        return out

    @field_validator("profile")
    @classmethod
    def _check_default_profile(cls, value: str | None) -> str | None:
        if value is not None:
            _check_profile(value)
        return value

    @model_validator(mode="after")
    def _protect_needs_keys(self) -> ServerConfig:
        if self.protect_status and not (self.api_keys or self.admin_key):
            raise ValueError("protect_status needs --api-key or --admin-key (a key to check)")
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("PD mode needs both --prefill and --decode servers")
        if self.prefill and (self.backends or self.embedded or self.scheduler):
            raise ValueError(
                "PD mode (--prefill/--decode) takes no --backend, --embedded or --scheduler"
            )
        if self.slo_tpot_s is not None and (
            not self.prefill or self.prefill_policy or self.decode_policy or not self.pd_room_hold
        ):
            raise ValueError(
                "--slo-tpot applies to PD mode with the pair price and its room hold (no "
                "--prefill-policy, --decode-policy or --no-pd-room-hold)"
            )
        return self

    def profile_for(self, url: str) -> str:
        """The profile of backend `url`: its override, else --profile, else DEFAULT_PROFILE."""
        return self.backend_profiles.get(normalise_url(url)) or self.profile or DEFAULT_PROFILE

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))


def normalise_url(url: str) -> str:
    """`host:port` -> `http://host:port`, no trailing slash: one spelling per backend."""
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    return url.rstrip("/")


def _split_assignment(item: Any) -> tuple[str, str]:
    """`URL=NAME` -> (URL, NAME); the last `=` splits, so a URL may hold one."""
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"expected URL=PROFILE, got {item!r}")
    url, _, name = item.strip().rpartition("=")
    if not url.strip() or not name.strip():
        raise ValueError(f"expected URL=PROFILE, got {item!r}")
    return url.strip(), name.strip()


def _check_profile(name: str) -> None:
    """Unknown profile names fail at startup, listing the known ones."""
    from backends.sim.perf import PROFILES

    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")


def load_config(path: str | Path | None = None, **overrides: Any) -> ServerConfig:
    """Build the config from `overrides` (None values are skipped), env and the YAML `path`."""
    if path is None:
        path = os.environ.get("PREFIX_ROUTER_CONFIG") or None
    given = {k: v for k, v in overrides.items() if v is not None}
    if path is None:
        return ServerConfig(**given)
    yaml_path = Path(path)
    if not yaml_path.is_file():
        raise FileNotFoundError(f"config file not found: {yaml_path}")
    with_yaml = type(
        "ServerConfigFromFile",
        (ServerConfig,),
        {
            "model_config": SettingsConfigDict(
                **{**ServerConfig.model_config, "yaml_file": yaml_path}
            )
        },
    )
    cfg: ServerConfig = with_yaml(**given)
    return cfg
