"""SMG 1.13 (the Shepherd Model Gateway) accepts `prefix-router sim` servers and routes to them.

Started with the command `prefix-router compare` uses (router.replay.launchers.smg_argv), in
front of two simulated backends in a subprocess; a /generate and a chat completion go through,
and the sims' log holds no traceback from SMG's probes (/health, /server_info, /model_info and
its load monitor's /v1/loads). Skipped where the bench extra (smg) is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from reference_routers import routes_generate_and_chat

from router.replay.launchers import smg_argv

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("smg") is None, reason="smg not installed"),
]


@pytest.mark.parametrize("policy", ["cache_aware", "least_load"])
def test_smg_routes_to_sim_servers(sim_process: Any, tmp_path: Path, policy: str) -> None:
    sp = sim_process(count=2)
    port = free_port()
    log_path = tmp_path / "smg.log"
    argv = smg_argv(
        sys.executable, port=port, policy=policy, worker_urls=sp.urls, metrics_port=free_port()
    )
    routes_generate_and_chat(argv, port, log_path, "Hello from SMG")
    assert sp.stop() == 0
    sim_log = sp.log_text()
    assert "Traceback" not in sim_log, sim_log
    assert "Error handling request" not in sim_log, sim_log
