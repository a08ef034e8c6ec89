"""The real sglang-router 0.3.2 accepts `prefix-router sim` servers as workers and routes to them.

sglang-router probes each worker (HTTP/1.1 `/health`, an HTTP/2 gRPC preface, then
`/server_info` and `/model_info`) before it routes. The sim servers run in a subprocess so
their log can be checked: the HTTP/2 probe must leave no traceback there.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from router.replay.compare import sglang_router_argv

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("sglang_router") is None, reason="sglang-router not installed"
    ),
]


def _post_json(url: str, body: Any, timeout: float = 10.0) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def test_sglang_router_routes_to_sim_servers(sim_process: Any, tmp_path: Path) -> None:
    sp = sim_process(count=2)
    port = free_port()
    router_log = tmp_path / "sglang-router.log"
    with router_log.open("wb") as log:
        router = subprocess.Popen(
            # the command `prefix-router compare` uses; its own metrics port on a free loopback
            # port, since the default 29000 clashes when two routers run at once
            sglang_router_argv(
                sys.executable,
                port=port,
                policy="cache_aware",
                worker_urls=sp.urls,
                metrics_port=free_port(),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        body = {"text": "Hello from sglang-router", "sampling_params": {"max_new_tokens": 8}}
        deadline = time.monotonic() + 40
        status, out = 0, None
        while time.monotonic() < deadline:
            status, out = _post_json(base + "/generate", body)
            if status == 200:
                break
            time.sleep(0.3)
        assert status == 200, f"{status} {out}\n{router_log.read_text(errors='replace')[-3000:]}"
        assert out["meta_info"]["completion_tokens"] == 8
        status, chat = _post_json(
            base + "/v1/chat/completions",
            {"model": "meta-llama/Llama-3.1-8B-Instruct",
             "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )  # fmt: skip
        assert status == 200, chat
        assert chat["usage"]["completion_tokens"] == 4
    finally:
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(10)
    assert sp.stop() == 0
    sim_log = sp.log_text()
    assert "Traceback" not in sim_log, sim_log
    assert "Error handling request" not in sim_log, sim_log
    assert "BadHttpMessage" not in sim_log
