"""SMG 1.13's PD router routes through `prefix-router sim --mode prefill|decode` servers.

SMG is started as `benchmarks/pd_live.py` starts it (`smg launch --pd-disaggregation --prefill
URL BOOTSTRAP_PORT ... --decode URL ... --prefill-policy cache_aware --decode-policy
power_of_two`), in front of two simulated prefill servers (with bootstrap ports) and two decode
servers in subprocesses: SMG adds the bootstrap fields, sends to both and relays the decode
server's answer, for /generate and a streamed chat completion. Skipped without smg installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from reference_routers import first_generate, post, running

from router.replay.ports import free_port, free_port_block

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("smg") is None, reason="smg not installed"),
]


def test_smg_pd_mode_routes_to_sim_pd_servers(sim_process: Any, tmp_path: Path) -> None:
    boot = free_port_block(2)
    prefill = sim_process(count=2, extra_args=["--mode", "prefill", "--bootstrap-port", str(boot)])
    decode = sim_process(count=2, extra_args=["--mode", "decode"])
    port = free_port()
    argv = [sys.executable, "-m", "smg", "launch", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--pd-disaggregation"]
    for i, url in enumerate(prefill.urls):
        argv += ["--prefill", url, str(boot + i)]
    for url in decode.urls:
        argv += ["--decode", url]
    argv += ["--prefill-policy", "cache_aware", "--decode-policy", "power_of_two"]
    argv += ["--log-level", "warn", "--worker-startup-check-interval", "1"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    log_path = tmp_path / "smg.log"
    with running(argv, log_path):
        base = f"http://127.0.0.1:{port}"
        body = {"text": "Hello from SMG in PD mode", "sampling_params": {"max_new_tokens": 8}}
        raw = first_generate(base, body, log_path)
        assert json.loads(raw)["meta_info"]["completion_tokens"] == 8  # the decode server's
        chat = {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
        status, raw = post(base + "/v1/chat/completions", chat)
        assert status == 200, raw[:300]
        events = [
            line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")
        ]
        assert events[-1] == "[DONE]"
        assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1])
    assert prefill.stop() == 0 and decode.stop() == 0
    assert "Traceback" not in prefill.log_text() + decode.log_text()
