"""Fixtures for tests against real SGLang servers, started by `make e2e` (e2e/run.py).

`PREFIX_ROUTER_E2E` (JSON from e2e/run.py) names the model folder, the log folder and each
server's ports. `sglang` gives those servers as `SGLangServer`s (a test may SIGKILL one and
start it again on the same ports; e2e/run.py ends whatever is left). `router` is our router
in front of both, with the model's tokenizer at the servers' page size, so it follows their
KV events.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "e2e"))

from servers import PAGE_SIZE, Router, SGLangServer, get_json, start_router, stop_router  # noqa: E402,F401


def e2e_info() -> dict[str, Any]:
    info: dict[str, Any] = json.loads(os.environ["PREFIX_ROUTER_E2E"])
    return info


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return Path(e2e_info()["model_dir"])


@pytest.fixture(scope="session")
def model_name(model_dir: Path) -> str:
    return str(model_dir)  # SGLang serves the model under its path


@pytest.fixture(scope="session")
def sglang(model_dir: Path) -> list[SGLangServer]:
    info = e2e_info()
    out = []
    for s in info["servers"]:
        server = SGLangServer(
            name=s["name"], model_dir=model_dir, log_path=Path(s["log"]),
            port=s["port"], kv_port=s["kv_port"],
        )  # fmt: skip
        assert server.healthy(), f"{server.name} is not up"
        out.append(server)
    return out


@pytest.fixture(scope="session")
def router(sglang: list[SGLangServer], model_dir: Path) -> Iterator[Router]:
    """Our router in front of both servers, following their KV events."""
    r = start_router(
        sglang, Path(e2e_info()["log_dir"]),
        "--tokenizer", str(model_dir / "tokenizer.json"), "--block-tokens", str(PAGE_SIZE),
    )  # fmt: skip
    try:
        yield r
    finally:
        stop_router(r.proc)
