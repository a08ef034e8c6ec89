"""Request traces: load Mooncake, Azure 2023 and chat-log files into one `Trace` shape.

Every format becomes a `Trace`: requests ordered by arrival, each with its prompt length,
its output length and `hash_ids`, the chained ids of its prompt's blocks (`block_size`
tokens each, the last one maybe partial). Equal id at depth k means equal prompt prefix up
to the end of block k, which is all the simulator and the routing core need to know.

    Mooncake JSONL  {"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}
                    ids are used as they are; len(hash_ids) must be ceil(n / block_size).
                    A "block_size" key (ours: `serve --record` writes the router's 64) gives
                    the tokens per id instead of 512; every line of a file must agree.
                    An optional "session" key (ours; `gentrace` writes it) is kept.
    Azure 2023 CSV  TIMESTAMP,ContextTokens,GeneratedTokens with wall-clock times
                    ("2023-11-16 18:17:03.9799600"); no prefix information, so each request
                    gets fresh ids that no other request shares (no cache hits possible).
    chat-log JSONL  {"timestamp": s, "messages": [...], "max_tokens": m, "session": optional,
                    "model": optional, "tools": optional}: our format for real chat logs. The
                    body goes through the core's `parse_chat` and `BlockHasher` (offline cl100k
                    tokenizer, 64-token blocks, chained 64-bit hashes), so its hash ids are the
                    blocks the live proxy computes for the same request.

Timestamps become seconds since the trace's first arrival (Mooncake and chat logs are taken
as already relative: their own zero is kept). Requests are sorted by timestamp (stable), and
`index` keeps each request's 0-based position in the file. An output length of 0 is clamped
to 1: every engine generates at least one token. A malformed line raises `TraceError`
naming the file and the 1-based line number.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BUNDLED",
    "CHAT_BLOCK",
    "MOONCAKE_BLOCK",
    "Trace",
    "TraceError",
    "TraceRequest",
    "bundled",
    "data_dir",
    "jsonl_objects",
    "load_trace",
    "load_window",
    "write_mooncake",
]

MOONCAKE_BLOCK = 512
CHAT_BLOCK = 64

# bundled name -> file under <repo>/data/traces/
BUNDLED: Mapping[str, str] = {
    "conversation": "conversation_trace.jsonl",
    "azure-conv": "azure_conv_10min.csv",
    "azure-code": "azure_code_10min.csv",
    "mtbench-chat": "mtbench_chat.jsonl",
}

TraceFormat = Literal["auto", "mooncake", "azure", "chat"]


class TraceError(ValueError):
    """A trace file that cannot be read as its format says; the message names file and line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceRequest:
    """One request of a trace: when it arrives, how long it is, which prefix blocks it has."""

    index: int
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    messages: tuple[Mapping[str, Any], ...] | None = None
    session: str | None = None

    def __post_init__(self) -> None:
        if self.index < 0:
            raise ValueError("index must be non-negative")
        if not (self.timestamp >= 0 and math.isfinite(self.timestamp)):
            raise ValueError(f"timestamp must be finite and non-negative, got {self.timestamp}")
        if self.input_length < 0:
            raise ValueError("input_length must be non-negative")
        if self.output_length < 1:
            raise ValueError("output_length must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Trace:
    """A whole trace: requests in arrival order and the token size of one hash id."""

    name: str
    block_size: int
    requests: tuple[TraceRequest, ...]

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError("block_size must be positive")
        for prev, cur in zip(self.requests, self.requests[1:], strict=False):
            if cur.timestamp < prev.timestamp:
                raise ValueError("trace requests must be ordered by timestamp")

    def duration(self) -> float:
        """Seconds from the trace's zero to its last arrival (0 for an empty trace)."""
        return self.requests[-1].timestamp if self.requests else 0.0

    def window(self, start: float, duration: float | None) -> Trace:
        """Requests with start <= t < start + duration (to the end if None), re-based to 0."""
        if start < 0:
            raise ValueError("window start must be non-negative")
        if duration is not None and duration <= 0:
            raise ValueError("window duration must be positive")
        end = math.inf if duration is None else start + duration
        kept = tuple(
            replace(r, timestamp=r.timestamp - start)
            for r in self.requests
            if start <= r.timestamp < end
        )
        return replace(self, requests=kept)

    def scaled(self, load: float) -> Trace:
        """The same requests arriving `load` times as fast (timestamps divided by load)."""
        if not (load > 0 and math.isfinite(load)):
            raise ValueError(f"load must be positive, got {load}")
        return replace(
            self, requests=tuple(replace(r, timestamp=r.timestamp / load) for r in self.requests)
        )


def data_dir() -> Path:
    """The source tree's `data/traces/` (not package data, so found relative to this file)."""
    return Path(__file__).resolve().parents[2] / "data" / "traces"


def bundled(name: str) -> Path:
    """Path of a trace shipped in the repo's `data/traces/`; KeyError for an unknown name."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled trace {name!r}; known: {', '.join(BUNDLED)}")
    path = data_dir() / BUNDLED[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"bundled trace {name!r} not found at {path}: it ships in the source tree's "
            "data/traces/, which an installed wheel does not include; pass a path instead"
        )
    return path


def load_trace(
    path: str | Path,
    fmt: TraceFormat = "auto",
    *,
    block_size: int | None = None,
) -> Trace:
    """Load a trace file; `block_size` overrides the format's default tokens per hash id."""
    p = Path(path)
    if block_size is not None and block_size <= 0:
        raise ValueError("block_size must be positive")
    kind = _detect(p) if fmt == "auto" else fmt
    if kind == "mooncake":
        rows = list(jsonl_objects(p))
        bs = block_size or _declared_block_size(rows, p) or MOONCAKE_BLOCK
        reqs = [_mooncake_request(obj, i, bs, p, line) for i, (line, obj) in enumerate(rows)]
    elif kind == "azure":
        bs = block_size or MOONCAKE_BLOCK
        reqs = _azure(p, bs)
    elif kind == "chat":
        bs = block_size or CHAT_BLOCK
        reqs = _chat(p, bs)
    else:
        raise ValueError(f"unknown trace format {fmt!r}")
    reqs.sort(key=lambda r: r.timestamp)
    return Trace(name=p.stem, block_size=bs, requests=tuple(reqs))


def load_window(spec: str, start: float = 0.0, duration: float | None = None) -> Trace:
    """The requests of a trace (a path or a bundled name) from `start` for `duration` seconds.

    Every command that takes `--trace --start --duration` loads through here, so each gives
    the same one-line `TraceError` for a missing file, an unknown bundled name, an unreadable
    file, a bad window, and a window that holds no request.
    """
    path = Path(spec)
    looks_like_path = path.suffix != "" or len(path.parts) > 1
    if not path.exists() and looks_like_path:
        raise TraceError(f"trace file not found: {spec}")
    try:
        trace = load_trace(path if path.exists() else bundled(spec))
    except KeyError as exc:  # unknown bundled name: its message is the first argument
        raise TraceError(str(exc.args[0]) if exc.args else str(exc)) from None
    except TraceError:
        raise
    except (OSError, ValueError) as exc:
        raise TraceError(f"cannot read trace {spec}: {exc}") from None
    span = trace.duration()
    if start or duration is not None:
        try:
            trace = trace.window(start, duration)
        except ValueError as exc:
            raise TraceError(str(exc)) from None
    if not trace.requests:
        raise TraceError(f"the trace window holds no requests (the trace spans 0-{span:.0f} s)")
    return trace


def write_mooncake(trace: Trace, path: str | Path) -> None:
    """Write Mooncake JSONL: integer ms timestamps, plus "session" where a request has one."""
    with Path(path).open("w", encoding="utf-8") as f:
        for r in trace.requests:
            obj: dict[str, Any] = {
                "timestamp": round(r.timestamp * 1000),
                "input_length": r.input_length,
                "output_length": r.output_length,
                "hash_ids": list(r.hash_ids),
            }
            if r.session is not None:
                obj["session"] = r.session
            if trace.block_size != MOONCAKE_BLOCK:
                obj["block_size"] = trace.block_size
            f.write(json.dumps(obj, separators=(", ", ": ")) + "\n")


# --- internals -------------------------------------------------------------------------


def _detect(p: Path) -> Literal["mooncake", "azure", "chat"]:
    if p.suffix.lower() == ".csv":
        return "azure"
    for line, obj in jsonl_objects(p):
        if "hash_ids" in obj:
            return "mooncake"
        if "messages" in obj:
            return "chat"
        raise TraceError(f"{p}:{line}: neither 'hash_ids' (Mooncake) nor 'messages' (chat log)")
    raise TraceError(f"{p}: empty trace file")


def jsonl_objects(p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line."""
    with p.open(encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{p}:{number}: invalid JSON: {exc.msg}") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{p}:{number}: expected a JSON object")
            yield number, obj


def _declared_block_size(rows: list[tuple[int, dict[str, Any]]], p: Path) -> int | None:
    """The file's own "block_size" (a recording's), the same on every line, else None."""
    declared: int | None = None
    for line, obj in rows:
        if "block_size" not in obj:
            value = None
        else:
            value = _int_field(obj, "block_size", f"{p}:{line}", minimum=1)
        if line == rows[0][0]:
            declared = value
        elif value != declared:
            raise TraceError(f"{p}:{line}: block_size {value} differs from the first line's")
    return declared


def _int_field(obj: Mapping[str, Any], key: str, where: str, *, minimum: int = 0) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TraceError(f"{where}: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise TraceError(f"{where}: {key!r} must be >= {minimum}, got {value}")
    return value


def _time_field(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"{where}: {key!r} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise TraceError(f"{where}: {key!r} must be finite and non-negative, got {value}")
    return float(value)


def _session(obj: Mapping[str, Any], where: str) -> str | None:
    value = obj.get("session")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TraceError(f"{where}: 'session' must be a string or integer, got {value!r}")
    return str(value)


def _mooncake_request(
    obj: Mapping[str, Any], index: int, block_size: int, p: Path, line: int
) -> TraceRequest:
    where = f"{p}:{line}"
    ts = _time_field(obj, "timestamp", where) / 1000.0
    n = _int_field(obj, "input_length", where)
    m = _int_field(obj, "output_length", where)
    ids = obj.get("hash_ids")
    if not isinstance(ids, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in ids
    ):
        raise TraceError(f"{where}: 'hash_ids' must be a list of integers")
    if len(ids) != -(-n // block_size):
        raise TraceError(
            f"{where}: {len(ids)} hash_ids for input_length {n}; expected "
            f"ceil({n}/{block_size}) = {-(-n // block_size)}"
        )
    return TraceRequest(
        index=index,
        timestamp=ts,
        input_length=n,
        output_length=max(m, 1),
        hash_ids=tuple(ids),
        session=_session(obj, where),
    )


def _azure(p: Path, block_size: int) -> list[TraceRequest]:
    reqs: list[TraceRequest] = []
    t0: datetime | None = None
    next_id = 0
    with p.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise TraceError(f"{p}: empty trace file")
        want = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if [h.strip() for h in header] != want:
            raise TraceError(f"{p}:1: expected header {','.join(want)}, got {','.join(header)}")
        for row in rows:
            line = rows.line_num
            if not row or not "".join(row).strip():
                continue
            where = f"{p}:{line}"
            if len(row) != 3:
                raise TraceError(f"{where}: expected 3 fields, got {len(row)}")
            try:
                when = datetime.fromisoformat(row[0].strip())
                n, m = int(row[1]), int(row[2])
            except ValueError as exc:
                raise TraceError(f"{where}: {exc}") from None
            if n < 0 or m < 0:
                raise TraceError(f"{where}: token counts must be non-negative")
            if t0 is None:
                t0 = when
            ts = (when - t0).total_seconds()
            if ts < 0:
                raise TraceError(f"{where}: timestamp before the first row's")
            count = -(-n // block_size)
            reqs.append(
                TraceRequest(
                    index=len(reqs),
                    timestamp=ts,
                    input_length=n,
                    output_length=max(m, 1),
                    hash_ids=tuple(range(next_id, next_id + count)),
                )
            )
            next_id += count
    return reqs


def _chat(p: Path, block_size: int) -> list[TraceRequest]:
    # imported here: the tokenizer costs a second to build, and other formats never need it
    from router.core.blocks import BlockHasher
    from router.core.prompt import PromptError, parse_chat
    from router.core.tokens import load_tokenizer

    hasher = BlockHasher(load_tokenizer("cl100k_base"), block_size)
    reqs: list[TraceRequest] = []
    for index, (line, obj) in enumerate(jsonl_objects(p)):
        where = f"{p}:{line}"
        ts = _time_field(obj, "timestamp", where)
        m = _int_field(obj, "max_tokens", where)
        # only what the proxy would route on: the same body gives the same blocks live
        body: dict[str, Any] = {
            k: obj[k] for k in ("model", "messages", "tools", "max_tokens") if k in obj
        }
        try:
            route = hasher.route_request(parse_chat(body), f"t{index}")
        except PromptError as exc:
            raise TraceError(f"{where}: {exc}") from None
        reqs.append(
            TraceRequest(
                index=index,
                timestamp=ts,
                input_length=route.prompt_tokens,
                output_length=max(m, 1),
                hash_ids=route.blocks,
                messages=tuple(body["messages"]),
                session=_session(obj, where),
            )
        )
    return reqs
