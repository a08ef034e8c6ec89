"""docker-compose.yml, Dockerfile and .dockerignore, checked without a Docker engine.

The compose file is parsed with PyYAML (merge keys resolved) and its `${VAR:-default}`
references replaced by their defaults, as `docker compose` would with an empty environment.
Then: which services each stack starts, GPU reservations, ports, health checks, and every
`prefix-router` command line parsed by the real argparse parser (policy and profile names
checked against the registries). SGLang flags are checked against the list vetted from
SGLang's server_args (docs/advanced_features/server_arguments.md), since sglang itself is not
installed here. Finally the CPU stack's own command lines run as real processes on loopback
(host and ports rewritten) until the router's health check passes and a chat request goes
through. The routers' shared state is checked too: every router points `--state` at the
stack's redis service, the GPU stack's two replicas share one cluster under distinct replica
ids, and the CPU router runs against a real local redis-server (when installed; else an
unreachable one, which it must survive). `docker compose config` runs too where the compose
plugin exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_state_redis import REDIS, RedisServer

from router.cli import build_parser
from router.core.policies import POLICIES
from router.server.config import load_config

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"

GPU_STACK = {"sglang-0", "sglang-1", "router", "router-2", "redis"}
CPU_STACK = {"sim-0", "sim-1", "router-cpu", "redis"}
MONITORING = {"prometheus", "grafana"}  # cpu profile too; tests/test_grafana.py checks them

# Flags of `python -m sglang.launch_server` we use, as SGLang's server_args defines them.
SGLANG_FLAGS_TAKING_VALUE = {"--model-path", "--host", "--port", "--mem-fraction-static"}
SGLANG_SWITCHES = {"--enable-cache-report", "--enable-metrics"}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any) -> Any:
    """`${VAR:-default}` -> default and `${VAR}` -> '' everywhere, like compose with no env."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    result: dict[str, Any] = _interpolate(data)
    return result


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def _closure(services: dict[str, dict[str, Any]], name: str) -> set[str]:
    """The service and everything it depends on, transitively (what `up NAME` starts)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(services[n].get("depends_on", {}))
    return seen


def _flag(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


def _router_services(services: dict[str, dict[str, Any]]) -> list[str]:
    return [n for n, s in services.items() if _command(s)[:1] == ["serve"]]


def test_stacks_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    default = {n for n, s in services.items() if not s.get("profiles")}
    cpu = {n for n, s in services.items() if "cpu" in s.get("profiles", [])}
    assert default == GPU_STACK
    assert cpu == (CPU_STACK - {"redis"}) | MONITORING
    assert _closure(services, "router") == GPU_STACK - {"router-2"}
    assert _closure(services, "router-2") == GPU_STACK - {"router"}
    # `docker compose --profile cpu up router-cpu` starts no GPU service.
    assert _closure(services, "router-cpu") == CPU_STACK
    for name in CPU_STACK:
        assert "deploy" not in services[name], name


def test_images_and_build(services: dict[str, dict[str, Any]]) -> None:
    assert services["redis"]["image"] == "redis:7"
    for name in ("sglang-0", "sglang-1"):
        assert services[name]["image"].startswith("lmsysorg/sglang")
    for name in ("router", "router-2", "router-cpu", "sim-0", "sim-1"):
        assert services[name]["build"]["context"] == "."
        assert services[name]["image"] == "prefix-router:latest"


def test_gpu_reservations(services: dict[str, dict[str, Any]]) -> None:
    gpus: list[str] = []
    for name in ("sglang-0", "sglang-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
    assert sorted(gpus) == ["0", "1"], "one distinct GPU per backend"


def test_sglang_command_lines(services: dict[str, dict[str, Any]]) -> None:
    for name in ("sglang-0", "sglang-1"):
        args = _command(services[name])
        assert args[:3] == ["python3", "-m", "sglang.launch_server"]
        rest = args[3:]
        i = 0
        while i < len(rest):
            flag = rest[i]
            if flag in SGLANG_FLAGS_TAKING_VALUE:
                assert i + 1 < len(rest) and not rest[i + 1].startswith("--"), flag
                i += 2
            else:
                assert flag in SGLANG_SWITCHES, f"{name}: unvetted SGLang flag {flag}"
                i += 1
        assert _flag(rest, "--host") == ["0.0.0.0"]
        assert _flag(rest, "--port") == ["30000"]
        assert _flag(rest, "--model-path") == ["meta-llama/Llama-3.1-8B-Instruct"]
        assert "--enable-cache-report" in rest, "the router needs cached_tokens in usage"


def test_prefix_router_command_lines_parse(services: dict[str, dict[str, Any]]) -> None:
    parser = build_parser()
    seen = set()
    for name, svc in services.items():
        if "build" not in svc:
            continue
        args = parser.parse_args(_command(svc))
        seen.add(args.command)
        assert args.host == "0.0.0.0", name
        assert args.port == 30000, name
        if args.command == "serve":
            assert args.policy in POLICIES
        else:
            from backends.sim.perf import PROFILES

            assert args.command == "sim"
            assert args.profile in PROFILES
    assert seen == {"serve", "sim"}


def test_router_backends_are_services_of_its_stack(services: dict[str, dict[str, Any]]) -> None:
    for name in _router_services(services):
        urls = _flag(_command(services[name]), "--backend")
        assert len(urls) == 2, name
        stack = _closure(services, name)
        for url in urls:
            m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", url)
            assert m, url
            backend = services[m.group(1)]
            assert m.group(1) in stack, f"{name} routes to {url} outside its stack"
            assert m.group(2) in backend["expose"]


def test_ports(services: dict[str, dict[str, Any]]) -> None:
    published = {n: s["ports"] for n, s in services.items() if "ports" in s}
    assert published == {
        "router": ["30000:30000"],
        "router-2": ["30002:30000"],
        "router-cpu": ["30001:30000"],
        "prometheus": ["9090:9090"],
        "grafana": ["3000:3000"],
    }


def test_routers_share_state_through_the_stacks_redis(
    services: dict[str, dict[str, Any]],
) -> None:
    parser = build_parser()
    fleets: dict[str, list[str]] = {}
    for name in _router_services(services):
        args = parser.parse_args(_command(services[name]))
        m = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/0", args.state or "")
        assert m, f"{name}: --state {args.state!r}"
        assert m.group(1) in _closure(services, name), f"{name}: redis outside its stack"
        assert m.group(2) in services[m.group(1)]["expose"]
        assert services[name]["depends_on"][m.group(1)] == {"condition": "service_healthy"}
        assert args.cluster, name
        fleets.setdefault(args.cluster, []).append(name)
        replica = services[name].get("environment", {}).get("PREFIX_ROUTER_REPLICA_ID")
        cfg = load_config(None, state=args.state, cluster=args.cluster, replica_id=replica)
        assert cfg.replica_id == replica  # a valid name (or None: random)
    assert fleets == {"gpu-pool": ["router", "router-2"], "cpu-pool": ["router-cpu"]}
    gpu = [services[n] for n in fleets["gpu-pool"]]
    assert _command(gpu[0]) == _command(gpu[1]), "replicas of a fleet run the same command"
    ids = [svc["environment"]["PREFIX_ROUTER_REPLICA_ID"] for svc in gpu]
    assert ids == ["router", "router-2"]


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name in _router_services(services):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "http://127.0.0.1:30000/readiness" in test, name
    for name in ("sim-0", "sim-1"):
        assert "http://127.0.0.1:30000/health" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("sglang-0", "sglang-1"):
        assert "localhost:30000/health" in " ".join(services[name]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, svc in services.items():
        assert svc.get("healthcheck"), f"{name} has no health check"


def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    instructions = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["prefix-router"]' in instructions
    install = next(ln for ln in instructions if "pip install" in ln)
    assert "pip install ." in install and "sglang" not in install
    cmd = next(ln for ln in instructions if ln.startswith("CMD "))
    args = build_parser().parse_args(json.loads(cmd[4:]))
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for needed in ("!pyproject.toml", "!README.md", "!router/", "!backends/"):
        assert needed in ignore


def _docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=20)
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(), reason="no `docker compose` plugin here")
@pytest.mark.parametrize("profile", [None, "cpu"])
def test_docker_compose_config(profile: str | None) -> None:
    cmd = ["docker", "compose", "-f", str(COMPOSE)]
    if profile:
        cmd += ["--profile", profile]
    done = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---- the CPU stack's command lines, run for real on loopback -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _localize(args: list[str], port: int, urls: dict[str, str]) -> list[str]:
    """The same command with host 127.0.0.1, port `port` and backend (and state) URLs mapped."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--host":
            out[i + 1] = "127.0.0.1"
        elif a == "--port":
            out[i + 1] = str(port)
        elif a in ("--backend", "--state"):
            out[i + 1] = urls[out[i + 1]]
    return out


def _healthcheck_passes(test: list[str], port: int) -> bool:
    assert test[0] == "CMD"
    argv = [
        sys.executable if a == "python" else a.replace(":30000/", f":{port}/") for a in test[1:]
    ]
    return subprocess.run(argv, capture_output=True, timeout=10).returncode == 0


def _wait_ok(url: str, timeout: float) -> None:
    """Poll `url` in-process until it answers 200 (cheaper than a python per try)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.2)


@pytest.fixture
def cpu_stack(services: dict[str, dict[str, Any]], tmp_path: Path) -> Iterator[int]:
    """sim-0, sim-1, redis and router-cpu from the compose file, as processes on loopback.

    redis is a real redis-server when installed; without one the router's --state points at
    a closed port, which it must survive (it routes on its own state).
    """
    procs: list[subprocess.Popen[bytes]] = []
    redis_port = _free_port()
    urls: dict[str, str] = {"redis://redis:6379/0": f"redis://127.0.0.1:{redis_port}/0"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    redis = RedisServer(redis_port, tmp_path) if REDIS is not None else None
    try:
        if redis is not None:
            redis.start()
        sims = {name: _free_port() for name in ("sim-0", "sim-1")}
        for name, port in sims.items():
            urls[f"http://{name}:30000"] = f"http://127.0.0.1:{port}"
            argv = _localize(_command(services[name]), port, urls)
            procs.append(subprocess.Popen([sys.executable, "-m", "router", *argv], env=env))
        for name, port in sims.items():
            _wait_ok(f"http://127.0.0.1:{port}/health", 30)
            assert _healthcheck_passes(services[name]["healthcheck"]["test"], port), name
        port = _free_port()
        argv = _localize(_command(services["router-cpu"]), port, urls)
        procs.append(subprocess.Popen([sys.executable, "-m", "router", *argv], env=env))
        yield port
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if redis is not None:
            redis.stop()


def test_cpu_stack_runs(services: dict[str, dict[str, Any]], cpu_stack: int) -> None:
    port = cpu_stack
    _wait_ok(f"http://127.0.0.1:{port}/readiness", 30)
    assert _healthcheck_passes(services["router-cpu"]["healthcheck"]["test"], port)
    body = json.dumps(
        {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 4,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert resp.status == 200
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] >= 1
    assert answer["choices"][0]["message"]["content"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        shared = json.loads(resp.read())["replicas"]
    assert shared["enabled"] is True and shared["cluster"] == "cpu-pool"
    if REDIS is not None:  # a real redis-server: the request's events went out
        deadline = time.monotonic() + 10
        # its own heartbeat is listed (with `serve --workers N`, beside its siblings')
        while shared["published"] < 2 or shared["replica"] not in shared["replicas"]:
            assert time.monotonic() < deadline, shared
            time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
                shared = json.loads(resp.read())["replicas"]
        assert shared["connected"] is True
    else:
        assert shared["connected"] is False
