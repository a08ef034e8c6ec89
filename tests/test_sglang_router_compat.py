"""The real sglang-router 0.3.2 accepts `prefix-router sim` servers as workers and routes to them.

sglang-router probes each worker (HTTP/1.1 `/health`, an HTTP/2 gRPC preface, then
`/server_info` and `/model_info`) before it routes. The sim servers run in a subprocess so
their log can be checked: the HTTP/2 probe must leave no traceback there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from reference_routers import routes_generate_and_chat

from router.replay.compare import sglang_router_argv

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("sglang_router") is None, reason="sglang-router not installed"
    ),
]


def test_sglang_router_routes_to_sim_servers(sim_process: Any, tmp_path: Path) -> None:
    sp = sim_process(count=2)
    port = free_port()
    router_log = tmp_path / "sglang-router.log"
    # the command `prefix-router compare` uses; its own metrics port on a free loopback port,
    # since the default 29000 clashes when two routers run at once
    argv = sglang_router_argv(
        sys.executable, port=port, policy="cache_aware", worker_urls=sp.urls,
        metrics_port=free_port(),
    )  # fmt: skip
    routes_generate_and_chat(argv, port, router_log, "Hello from sglang-router")
    assert sp.stop() == 0
    sim_log = sp.log_text()
    assert "Traceback" not in sim_log, sim_log
    assert "Error handling request" not in sim_log, sim_log
    assert "BadHttpMessage" not in sim_log
