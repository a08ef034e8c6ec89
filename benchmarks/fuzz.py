"""Fuzz every endpoint of `prefix-router serve --embedded 2` with property-based requests.

How it works. One router process (`python -m router serve --embedded 2`, simulated SGLang
backends in-process, sped up, client and admin keys set, a 1 MB body limit) is started with
its log in a file. Hypothesis then draws `--cases` requests (generation phase only: nothing is
shrunk, every case counts) and this process sends each over a plain `http.client` connection,
so odd methods, header names and bodies reach the router as drawn:

- method: GET, POST, PUT, DELETE, PATCH, OPTIONS, HEAD;
- path: every route the router serves, and random (percent-encoded) paths and query strings;
- headers: Authorization (client key, admin key, wrong, malformed), x-api-key, X-Request-Id,
  Content-Type, random names and values (a 60 kB value now and then);
- body: none; random bytes; random JSON; a valid chat / completion / generate / admin body
  with fields replaced, removed or added (rid, stream, stream_options, model, max_tokens...);
  deep nesting (100,000 `[`, a 5,000-deep object, a 1,000-deep value beside a `rid`); a body
  over the limit.

Each answer is classified: a 5xx is a failure; a 4xx must be an OpenAI-style error
(`{"error": {"message": str, "type": str, "param", "code"}}`); HEAD answers carry no body. A
request that gets no answer in `--timeout` seconds counts as a timeout. After the run the log
is searched for tracebacks, and the router must still answer /health, /readiness and a chat
completion. The JSON (`--json`, default benchmarks/results/fuzz.json) holds the counts, the
first few offending cases, and `"ok"`: at least `--min-cases` cases, no 5xx, no traceback, no
non-OpenAI 4xx, no timeout, healthy after. Figures come from a shared 2-core box.

Run: flock /tmp/prefix-router-heavy.lock python benchmarks/fuzz.py --cases 10000
(`make test` runs a 200-case sample through tests/test_fuzz_sample.py.)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.replay.compare import ProcessSet  # noqa: E402
from router.replay.ports import free_port  # noqa: E402

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CLIENT_KEY, ADMIN_KEY = "fuzz-client-key", "fuzz-admin-key"
BODY_LIMIT = 1024 * 1024
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/generate",
    "/v1/models",
    "/health",
    "/readiness",
    "/stats",
    "/metrics",
    "/admin/backends",
    "/admin/backends/drain",
]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
AUTH = [
    f"Bearer {CLIENT_KEY}",
    f"Bearer {ADMIN_KEY}",
    "Bearer wrong",
    "Bearer ",
    "Basic Zm9vOmJhcg==",
    "bearer " + CLIENT_KEY,
    CLIENT_KEY,
]

# ----- strategies ---------------------------------------------------------------------------

_ints = st.integers(-5, 64) | st.sampled_from([0, -1, 2**31, 2**63, -(2**63) - 1, 2**70, 10**9])
_floats = st.floats(allow_nan=True, allow_infinity=True)
_texts = st.text(max_size=40)
_leaves = st.none() | st.booleans() | _ints | _floats | _texts
json_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
    max_leaves=12,
)


def _templates() -> dict[str, dict[str, Any]]:
    msgs = [{"role": "user", "content": "hello there"}]
    return {
        "/v1/chat/completions": {"model": MODEL, "messages": msgs, "max_tokens": 3},
        "/v1/completions": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 3},
        "/generate": {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 3}},
        "/admin/backends": {"url": "http://127.0.0.1:1"},
        "/admin/backends/drain": {"url": "http://127.0.0.1:1", "drain": False},
    }


FIELDS = [
    "model", "messages", "prompt", "text", "input_ids", "max_tokens", "stream", "rid",
    "stream_options", "sampling_params", "url", "drain", "profile", "session_id", "user",
]  # fmt: skip

_DEEP = [
    b"[" * 100_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"text": "hi", "rid": "x", "a": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b'{"model": "m", "messages": ' + b"[" * 2000 + b"]" * 2000 + b"}",
]


@st.composite
def mutated_body(draw: st.DrawFn, path: str) -> bytes:
    body = dict(_templates().get(path, _templates()["/v1/chat/completions"]))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        key = draw(st.sampled_from(FIELDS))
        if action == "remove":
            body.pop(key, None)
        else:
            body[key] = draw(json_values | _texts.map(lambda t: t + "\r\n\x00"))
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return json.dumps(body).encode()


@st.composite
def bodies(draw: st.DrawFn, path: str) -> bytes | None:
    kind = draw(
        st.sampled_from(["none", "bytes", "json", "mutated", "mutated", "mutated", "deep", "big"])
    )
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        return draw(st.sampled_from(_DEEP))
    if kind == "big":  # rare on purpose: drawn 1 in 8, and only this size
        return b'{"model": "m", "prompt": "' + b"a" * BODY_LIMIT + b'"}'
    return draw(mutated_body(path))


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
_header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
)


@st.composite
def headers(draw: st.DrawFn) -> dict[str, str]:
    out: dict[str, str] = {}
    if draw(st.booleans()):
        out["Authorization"] = draw(st.sampled_from(AUTH) | _header_text)
    if draw(st.integers(0, 5)) == 0:
        out["x-api-key"] = draw(st.sampled_from([CLIENT_KEY, ADMIN_KEY, "nope"]) | _header_text)
    if draw(st.integers(0, 3)) == 0:
        out["X-Request-Id"] = draw(_header_text | st.just("r" * 60_000))
    if draw(st.integers(0, 3)) == 0:
        out["Content-Type"] = draw(
            st.sampled_from(["application/json", "text/plain", "multipart/form-data"])
            | _header_text
        )
    for name, value in draw(st.dictionaries(_token, _header_text, max_size=3)).items():
        out.setdefault("X-" + name, value)
    return out


@st.composite
def paths(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 4)) == 0:
        raw = draw(st.text(max_size=40))
        path = "/" + urllib.parse.quote(raw, safe="/")
    else:
        path = draw(st.sampled_from(PATHS))
    if draw(st.integers(0, 5)) == 0:
        path += "?" + urllib.parse.urlencode({draw(_token): draw(st.text(max_size=20))})
    return path


@dataclass(frozen=True, slots=True)
class Case:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None


_GETS = {"/v1/models", "/health", "/readiness", "/stats", "/metrics"}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """Mostly the route's own method and key (so cases reach the handlers), else anything."""
    path = draw(paths())
    route = path.split("?")[0]
    usual = "GET" if route in _GETS else "POST"
    method = draw(st.sampled_from([usual] * 5 + METHODS))
    body = draw(bodies(route)) if method not in ("GET", "HEAD") else None
    hdrs = draw(headers())
    if "Authorization" not in hdrs and draw(st.integers(0, 4)) > 0:
        key = ADMIN_KEY if route.startswith("/admin") else CLIENT_KEY
        hdrs["Authorization"] = f"Bearer {key}"
    return Case(method=method, path=path, headers=hdrs, body=body)


# ----- sending and judging ------------------------------------------------------------------


def openai_error(body: bytes) -> bool:
    """Whether `body` is {"error": {"message": str, "type": str, "param": .., "code": ..}}."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    if not isinstance(data, dict) or set(data) != {"error"} or not isinstance(data["error"], dict):
        return False
    err = data["error"]
    return (
        isinstance(err.get("message"), str)
        and isinstance(err.get("type"), str)
        and "param" in err
        and "code" in err
    )


@dataclass(slots=True)
class Tally:
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    non_openai_4xx: int = 0
    timeouts: int = 0
    connection_errors: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def bad(self, case: Case, why: str, status: int | None, body: bytes) -> None:
        if len(self.examples) < 20:
            self.examples.append(
                {
                    "why": why,
                    "method": case.method,
                    "path": case.path[:200],
                    "headers": {k: v[:100] for k, v in case.headers.items()},
                    "body": (case.body or b"")[:300].decode("utf-8", "replace"),
                    "status": status,
                    "answer": body[:300].decode("utf-8", "replace"),
                }
            )


class Sender:
    """One keep-alive connection, reopened whenever the router closes it."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.conn: http.client.HTTPConnection | None = None

    def send(self, case: Case) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout_s
                )
            try:
                self.conn.putrequest(case.method, case.path, skip_accept_encoding=True)
                for name, value in case.headers.items():
                    self.conn.putheader(name, value.encode("latin-1"))
                if case.body is not None:
                    self.conn.putheader("Content-Length", str(len(case.body)))
                # the router may answer early (a refused header) and close: read that answer
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.conn.endheaders(case.body)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.close()
                return resp.status, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def judge(tally: Tally, case: Case, send: Callable[[Case], tuple[int, bytes]]) -> None:
    tally.cases += 1
    try:
        status, body = send(case)
    except TimeoutError:
        tally.timeouts += 1
        tally.bad(case, "timeout", None, b"")
        return
    except (OSError, http.client.HTTPException) as exc:
        tally.connection_errors += 1
        tally.bad(case, f"connection: {exc!r}", None, b"")
        return
    tally.statuses[status] += 1
    if status >= 500:
        tally.server_errors += 1
        tally.bad(case, "5xx", status, body)
    elif 400 <= status < 500 and case.method != "HEAD" and not openai_error(body):
        tally.non_openai_4xx += 1
        tally.bad(case, "4xx not OpenAI-style", status, body)


def run_cases(port: int, count: int, rng_seed: int, timeout_s: float) -> Tally:
    tally = Tally()
    sender = Sender(port, timeout_s)
    bar = tqdm(total=count, desc="fuzz", unit="case", mininterval=2.0, file=sys.stderr)

    @seed(rng_seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def one(case: Case) -> None:
        judge(tally, case, sender.send)
        bar.update(1)

    try:
        one()
    finally:
        bar.close()
        sender.close()
    return tally


# ----- the router under test ----------------------------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None, data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


def wait_ready(url: str, proc: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}")
        if _get(url + "/readiness") == 200:
            return
        time.sleep(0.2)
    raise RuntimeError("router not ready in time")


def healthy_after(url: str) -> dict[str, int]:
    chat = json.dumps(_templates()["/v1/chat/completions"]).encode()
    auth = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    return {
        "health": _get(url + "/health"),
        "readiness": _get(url + "/readiness"),
        "chat": _get(url + "/v1/chat/completions", auth, chat),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", type=int, default=10_000, help="requests to draw and send")
    parser.add_argument("--min-cases", type=int, default=10_000, help="fewer cases: ok is false")
    parser.add_argument("--seed", type=int, default=14, help="hypothesis seed (reproducible)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per request")
    parser.add_argument("--speedup", type=float, default=200.0, help="simulated backend speed")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/fuzz.json")
    args = parser.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        procs = ProcessSet(Path(tmp))
        try:
            child = procs.start(
                "router",
                [
                    sys.executable, "-m", "router", "serve", "--workers", "1", "--embedded", "2",
                    "--port", str(port), "--speedup", str(args.speedup),
                    "--api-key", CLIENT_KEY, "--admin-key", ADMIN_KEY,
                    "--max-body-bytes", str(BODY_LIMIT),
                ],
            )  # fmt: skip
            wait_ready(url, child.proc)
            started = time.monotonic()
            tally = run_cases(port, args.cases, args.seed, args.timeout)
            elapsed = time.monotonic() - started
            after = healthy_after(url)
            alive = child.proc.poll() is None
        finally:
            procs.stop_all()
        log_text = child.log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    healthy = alive and after == {"health": 200, "readiness": 200, "chat": 200}
    ok = (
        tally.cases >= args.min_cases
        and tally.server_errors == 0
        and tally.non_openai_4xx == 0
        and tally.timeouts == 0
        and tally.connection_errors == 0
        and tracebacks == 0
        and healthy
    )
    result = {
        "ok": ok,
        "cases": tally.cases,
        "seed": args.seed,
        "server_errors_5xx": tally.server_errors,
        "non_openai_4xx": tally.non_openai_4xx,
        "tracebacks_in_log": tracebacks,
        "timeouts": tally.timeouts,
        "connection_errors": tally.connection_errors,
        "healthy_after": healthy,
        "after": after,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "elapsed_s": round(elapsed, 1),
        "cases_per_s": round(tally.cases / elapsed, 1) if elapsed else None,
        "examples": tally.examples,
        "setup": "python -m router serve --embedded 2 (sim backends at --speedup, client and "
        "admin keys, --max-body-bytes 1 MiB); one http.client connection; shared 2-core box",
        "command": "python benchmarks/fuzz.py " + " ".join(argv or sys.argv[1:]),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    for ex in tally.examples[:5]:
        print("example:", json.dumps(ex)[:400])
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
