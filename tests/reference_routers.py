"""Running a reference router (SMG, sglang-router) in front of simulated servers, for tests.

The compatibility tests start the real binary as `prefix-router compare` does, wait until it
routes a `/generate`, then send what they check; these are the parts they share.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def post(url: str, body: Any, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, raw body) of a JSON POST; status 0 if no answer came."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc).encode()


def post_json(url: str, body: Any, timeout: float = 10.0) -> tuple[int, Any]:
    """(status, parsed JSON) of a 200; the text of any other answer."""
    status, raw = post(url, body, timeout)
    return (status, json.loads(raw)) if status == 200 else (status, raw.decode(errors="replace"))


@contextmanager
def running(argv: Sequence[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The router started with output to `log_path`, terminated (then killed) on exit."""
    with log_path.open("wb") as log:
        router = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield router
    finally:
        router.terminate()
        try:
            router.wait(10)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait(10)


def first_generate(base: str, body: Any, log_path: Path, timeout_s: float = 40.0) -> bytes:
    """POST `body` to /generate until the router routes it (200); its raw answer."""
    deadline = time.monotonic() + timeout_s
    status, raw = 0, b""
    while time.monotonic() < deadline:
        status, raw = post(base + "/generate", body)
        if status == 200:
            return raw
        time.sleep(0.3)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"{status} {raw[:300]!r}\n{tail}")


def routes_generate_and_chat(argv: Sequence[str], port: int, log_path: Path, hello: str) -> None:
    """Run the router: a /generate of 8 tokens and a chat of 4 come back whole through it."""
    with running(argv, log_path):
        base = f"http://127.0.0.1:{port}"
        body = {"text": hello, "sampling_params": {"max_new_tokens": 8}}
        out = json.loads(first_generate(base, body, log_path))
        assert out["meta_info"]["completion_tokens"] == 8
        status, chat = post_json(
            base + "/v1/chat/completions",
            {"model": "meta-llama/Llama-3.1-8B-Instruct",
             "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )  # fmt: skip
        assert status == 200, chat
        assert chat["usage"]["completion_tokens"] == 4
