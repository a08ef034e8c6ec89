"""Records a real SGLang server's answers as wire fixtures under tests/fixtures/sglang_<version>/.

What the router and the simulated server must agree with, taken from the real thing:
`server_info`, models, loads (both `/v1/loads` shapes and `/get_load`'s status), `/generate`
(plain, repeated so it reports cached tokens, streamed), chat and completions (plain and
streamed with usage), `/flush_cache`, `/abort_request`, and the raw KV event batches
(multipart frames, payload base64) seen meanwhile. Run by `e2e/run.py --capture` against a
fresh server, so the first event batch is sequence 0.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import zmq

PROMPT = "The router sends each request to the server that already holds its prefix. " * 6


def _http(method: str, url: str, body: Any = None, timeout: float = 60.0) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, ctype, raw = int(resp.status), resp.headers.get("content-type"), resp.read()
    except urllib.error.HTTPError as exc:
        status, ctype, raw = exc.code, exc.headers.get("content-type"), exc.read()
    text = raw.decode("utf-8", "replace")
    out: dict[str, Any] = {"method": method, "path": url.split("/", 3)[-1], "status": status}
    out["content_type"] = ctype
    if body is not None:
        out["request"] = body
    try:
        out["body"] = json.loads(text)
    except json.JSONDecodeError:
        out["text"] = text
    return out


class EventTap:
    """A SUB socket on the server's KV events, keeping every frame as received."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.frames: list[dict[str, Any]] = []

    def drain(self, wait_s: float = 1.0) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                return
            topic, seq, payload = self.sock.recv_multipart()
            self.frames.append(
                {
                    "topic": topic.decode(),
                    "seq": int.from_bytes(seq, "big"),
                    "payload_b64": base64.b64encode(payload).decode(),
                    "decoded": msgpack.unpackb(payload, raw=False),
                }
            )

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def capture(base: str, kv_endpoint: str, out_dir: Path, model: str) -> Path:
    """Ask `base` everything the router relies on; write one JSON file per topic."""
    tap = EventTap(kv_endpoint)
    time.sleep(1.0)  # a SUB socket misses what is sent before it has connected
    files: dict[str, Any] = {}
    files["server_info"] = [_http("GET", base + p) for p in ("/server_info", "/get_server_info")]
    files["models"] = [_http("GET", base + p) for p in ("/v1/models", "/model_info")]
    files["health"] = [_http("GET", base + p) for p in ("/health", "/health_generate")]
    files["loads_idle"] = [
        _http("GET", base + p)
        for p in ("/v1/loads", "/v1/loads?include=core,disagg,queues,memory", "/get_load")
    ]
    gen = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    files["generate"] = [_http("POST", base + "/generate", gen) for _ in range(2)]
    tap.drain()
    stream = dict(gen, stream=True)
    files["generate_stream"] = [_http("POST", base + "/generate", stream)]
    chat = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You route requests."},
            {"role": "user", "content": PROMPT},
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    files["chat"] = [_http("POST", base + "/v1/chat/completions", chat) for _ in range(2)]
    files["chat_stream"] = [
        _http(
            "POST",
            base + "/v1/chat/completions",
            dict(chat, stream=True, stream_options={"include_usage": True}),
        )
    ]
    comp = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    files["completions"] = [_http("POST", base + "/v1/completions", comp)]
    files["completions_stream"] = [
        _http(
            "POST",
            base + "/v1/completions",
            dict(comp, stream=True, stream_options={"include_usage": True}),
        )
    ]
    files["errors"] = [
        _http("POST", base + "/v1/chat/completions", {"model": model, "messages": "nope"}),
        _http("POST", base + "/generate", {"sampling_params": {"max_new_tokens": 2}}),
    ]
    tap.drain()
    # loads while a long request runs, then abort it by rid
    long_gen = {
        "text": PROMPT,
        "rid": "capture-abort-1",
        "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True},
        "stream": True,
    }
    import threading

    holder: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: holder.update(r=_http("POST", base + "/generate", long_gen, 120.0))
    )
    worker.start()
    time.sleep(1.5)
    files["loads_busy"] = [
        _http("GET", base + p) for p in ("/v1/loads", "/v1/loads?include=core,disagg,queues,memory")
    ]
    files["abort_request"] = [_http("POST", base + "/abort_request", {"rid": "capture-abort-1"})]
    worker.join(60)
    aborted = holder.get("r", {})
    if "text" in aborted:  # keep the stream's tail: how an aborted stream ends
        aborted["text"] = aborted["text"][-2000:]
    files["aborted_stream"] = [aborted]
    tap.drain()
    files["flush_cache"] = [_http("POST", base + "/flush_cache")]
    tap.drain(2.0)
    files["kv_events"] = tap.frames
    tap.close()
    version = "unknown"
    for entry in files["server_info"]:
        body = entry.get("body")
        if isinstance(body, dict) and isinstance(body.get("version"), str):
            version = body["version"]
            break
    target = out_dir / f"sglang_{version}"
    target.mkdir(parents=True, exist_ok=True)
    # the model's tokenizer: tests map captured prompts to the captured events' token ids
    for name in ("tokenizer.json", "tokenizer_config.json"):  # with its chat template
        shutil.copyfile(Path(model) / name, target / name)
    root = str(Path(__file__).resolve().parent.parent) + "/"
    for name, value in files.items():
        doc = {"sglang_version": version, "captured_from": "make e2e (tiny CPU model)", name: value}
        text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
        # paths relative to the repository: `.e2e/model`, not this machine's checkout
        (target / f"{name}.json").write_text(text.replace(root, ""))
    return target
