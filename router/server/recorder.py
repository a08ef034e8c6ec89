"""Record routed traffic as a Mooncake-format trace: the prefix structure, never the text.

Every request the proxy routes ends in its `forward`'s `finally`; there the proxy hands its
finished flight to `Recorder.offer`, which only appends the object to a bounded deque: no
serialising, hashing, locking or I/O on the request path. A full queue drops the record and
counts it. One writer thread wakes every `interval_s` (50 ms), turns the queued flights into
JSON lines and appends them to the file in one write; a write that fails (full disk, a vanished
folder) drops those records and counts them too, and the thread carries on. So a slow or
broken disk costs records, never a request's latency or its answer.

One line per request, Mooncake's four fields first (what `load_trace`, `replay`, `simulate`
and `analyze` read) and what the router saw after them (which they ignore)::

    {"timestamp": ms since the recording started, "input_length": prompt tokens (the router's
     tokenizer), "output_length": generated tokens (usage, else max_tokens, else 1),
     "hash_ids": [one id per block], "block_size": tokens per block (the router's, 64 by
     default; the loader honours it), "endpoint", "model", "backend" (salted: "b-" + 8 hex),
     "status", "ttft" (s, streams only), "cached_tokens" (as the backend reported),
     "prompt_tokens" (as the backend reported), "policy", "pool" (backends in the pool),
     "unix_ms" (arrival, wall clock)}

Block ids: the router's chained 64-bit block hash (equal hash at depth k <=> equal prefix up to
block k) is keyed with a secret through BLAKE2b and cut to 53 bits (exact in any JSON reader).
Equal prefixes keep equal ids within a recording; without the secret nobody can test a guessed
prompt against the file. The secret is random per process unless `--record-secret` (or
PREFIX_ROUTER_RECORD_SECRET) gives one: processes that record one fleet (replicas, workers)
share it so that `prefix-router merge-traces` sees their common prefixes. It is never written.

Files: one per process (`{pid}` and `{replica}` in the path are filled in). When the current
file would pass `max_bytes` it is renamed PATH.1 (PATH.1 -> PATH.2 ..., the oldest past `keep`
deleted) and a new PATH begins; timestamps keep counting from the recording's start, so the
rotated files merge back into one trace. With `time_scale` F (simulated backends running F
times faster, `serve --embedded --speedup F`) timestamps and TTFTs are written x F, in the
simulated GPUs' seconds, as `replay --speedup` reports them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from backends.sglang import TokenUsage
from router.core.model import RouteRequest

__all__ = ["Flight", "Recorder", "RecorderConfig", "record_path", "secret_key"]

log = logging.getLogger("router.server.recorder")

_ID_MASK = (1 << 53) - 1
_ID_CACHE = 1 << 20  # salted ids remembered (a conversation re-sends its prefix each turn)


class Flight(Protocol):
    """What the recorder reads of a finished request (the proxy's `_Flight`)."""

    @property
    def started(self) -> float: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def route(self) -> RouteRequest | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def backend(self) -> str | None: ...
    @property
    def status(self) -> int: ...
    @property
    def ttft_s(self) -> float | None: ...
    @property
    def usage(self) -> TokenUsage | None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RecorderConfig:
    """Where and how to record; `key` is the secret the block ids are keyed with."""

    path: Path
    key: bytes
    policy: str = ""
    max_bytes: int = 256 * 1024 * 1024
    keep: int = 10
    queue_size: int = 8192
    time_scale: float = 1.0
    interval_s: float = 0.05  # the writer drains the queue this often

    def __post_init__(self) -> None:
        if self.max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        if self.keep < 0 or self.queue_size < 1:
            raise ValueError("keep must be >= 0 and queue_size >= 1")
        if not (self.interval_s > 0):
            raise ValueError("interval_s must be positive")
        if not (self.time_scale > 0):
            raise ValueError("time_scale must be positive")
        if not 16 <= len(self.key) <= 64:
            raise ValueError("key must be 16-64 bytes")


def secret_key(secret: str | None) -> bytes:
    """The BLAKE2b key: from the given secret (shared by a fleet's processes), else random."""
    if secret is None:
        return os.urandom(32)
    return hashlib.sha256(secret.encode()).digest()


def record_path(template: str, replica: str) -> Path:
    """The file of this process: `{pid}` and `{replica}` filled in."""
    return Path(template.replace("{pid}", str(os.getpid())).replace("{replica}", replica))


Opener = Callable[[Path], IO[bytes]]


def _open_append(path: Path) -> IO[bytes]:
    return path.open("ab")


class Recorder:
    """A bounded queue of finished flights and the thread that writes them as trace lines."""

    def __init__(
        self,
        config: RecorderConfig,
        *,
        clock_start: float,
        opener: Opener = _open_append,
        pool_size: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self._pool_size = pool_size  # backends in the pool, read when a line is written
        self._t0 = clock_start  # the proxy's loop time at the start: timestamp 0
        self._unix0 = time.time()
        self._opener = opener
        self._pending: deque[Flight] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._busy = False  # the writer holds records taken from _pending
        self._ids: dict[int, int] = {}
        self._backends: dict[str, str] = {}
        self.offered = 0
        self.written = 0
        self.dropped_full = 0  # the queue was full: the writer is behind
        self.dropped_write = 0  # the write failed (disk full, folder gone...)
        self.skipped = 0  # no prompt tokens: nothing a trace can hold
        self.files = 1
        self.last_error: str | None = None
        self._file: IO[bytes] | None = None
        self._size = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="router-recorder", daemon=True)
        self._thread.start()

    # ----- the request path: one append ------------------------------------------------

    def offer(self, flight: Flight) -> None:
        """Queue a finished request for writing; a full queue drops it (counted).

        A deque append (atomic under the GIL): no lock, and no wake-up of the writer, which
        drains every `interval_s` in one write; waking it per request cost the event loop more
        than the record itself.
        """
        self.offered += 1
        if len(self._pending) >= self.config.queue_size:
            self.dropped_full += 1
            return
        self._pending.append(flight)

    # ----- control -----------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout` seconds), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was written or dropped (tests, status)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self._pending or self._busy:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def status(self) -> dict[str, Any]:
        return {
            "active": not self._closed,
            "path": str(self.config.path),
            "offered": self.offered,
            "written": self.written,
            "dropped": self.dropped_full + self.dropped_write,
            "dropped_queue_full": self.dropped_full,
            "dropped_write_failed": self.dropped_write,
            "skipped_empty": self.skipped,
            "files": self.files,
            "bytes": self._size,
            "last_error": self.last_error,
        }

    # ----- the writer thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.wait(self.config.interval_s)
                self._wake.clear()
                self._drain()
            self._drain()
        finally:
            self._discard_file()

    def _drain(self) -> None:
        """Encode every queued record and append them to the file in as few writes as fit."""
        pending = self._pending
        if not pending:
            return
        self._busy = True
        try:
            lines: list[bytes] = []
            while pending:
                line = self._encode(pending.popleft())
                if line is not None:
                    lines.append(line)
            self._store(lines)
        finally:
            self._busy = False

    def _encode(self, flight: Flight) -> bytes | None:
        try:
            line = self.line(flight)
        except Exception as exc:  # a record we cannot encode must not stop the writer
            self.dropped_write += 1
            self.last_error = f"encode: {exc!r}"
            return None
        if line is None:
            self.skipped += 1
        return line

    def _store(self, lines: list[bytes]) -> None:
        """Append `lines`, rotating before max_bytes; a failure drops the rest (counted)."""
        i = 0
        while i < len(lines):
            try:
                if self._file is None:
                    self._file = self._opener(self.config.path)
                    self._size = self._file.tell()
                room = self.config.max_bytes - self._size
                j, total = i, 0
                while j < len(lines) and (
                    total + len(lines[j]) <= room or self._size == j - i == 0
                ):
                    total += len(lines[j])
                    j += 1
                if j == i:  # not one more line fits: a new file
                    self._rotate()
                    continue
                self._file.write(b"".join(lines[i:j]))
                self._file.flush()
                self._size += total
                self.written += j - i
                i = j
            except OSError as exc:
                self.dropped_write += len(lines) - i
                if self.last_error is None or self.dropped_write % 1000 == 1:
                    log.warning("recording to %s failed: %s", self.config.path, exc)
                self.last_error = repr(exc)
                self._discard_file()
                return

    def _discard_file(self) -> None:
        """Drop a file that failed (its handle may be broken); the next write reopens it."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        self._file = None

    def _rotate(self) -> None:
        self._discard_file()
        path, keep = self.config.path, self.config.keep
        if keep == 0:
            path.unlink(missing_ok=True)
        else:
            for i in range(keep - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    older.replace(path.with_name(f"{path.name}.{i + 1}"))
            if path.exists():
                path.replace(path.with_name(f"{path.name}.1"))
        self.files += 1

    # ----- one line ------------------------------------------------------------------------

    def salted(self, blocks: tuple[int, ...]) -> list[int]:
        """The recorded ids of block hashes: keyed BLAKE2b cut to 53 bits, cached per recording.

        A conversation re-sends its prefix every turn, so most blocks are cached: one list of
        dict lookups, and BLAKE2b (~1.5 us each here) only for the new ones.
        """
        ids = self._ids
        try:
            return [ids[b] for b in blocks]
        except KeyError:
            pass
        if len(ids) + len(blocks) > _ID_CACHE:
            ids.clear()
        out: list[int] = []
        key, blake2b = self.config.key, hashlib.blake2b
        for b in blocks:
            got = ids.get(b)
            if got is None:
                digest = blake2b(b.to_bytes(8, "little"), key=key, digest_size=8).digest()
                got = ids[b] = int.from_bytes(digest, "little") & _ID_MASK
            out.append(got)
        return out

    def _backend(self, url: str) -> str:
        name = self._backends.get(url)
        if name is None:
            digest = hashlib.blake2b(url.encode(), key=self.config.key, digest_size=4)
            name = self._backends[url] = "b-" + digest.hexdigest()
        return name

    def line(self, flight: Flight) -> bytes | None:
        """The flight as one JSON line, or None when it has no prompt tokens to record."""
        route = flight.route
        if route is None or route.prompt_tokens <= 0:
            return None
        if len(route.blocks) != -(-route.prompt_tokens // route.block_tokens):
            return None  # not one prompt's chain (a batch /generate): no trace line fits
        scale = self.config.time_scale
        usage = flight.usage
        output = usage.completion_tokens if usage is not None else None
        if not output:
            output = route.max_tokens or 1
        since = flight.started - self._t0
        obj: dict[str, Any] = {
            "timestamp": max(0, round(since * scale * 1000)),
            "input_length": route.prompt_tokens,
            "output_length": max(1, output),
            "hash_ids": self.salted(route.blocks),
            "block_size": route.block_tokens,
            "endpoint": flight.endpoint,
            "model": flight.model,
            "backend": self._backend(flight.backend) if flight.backend else None,
            "status": flight.status,
            "ttft": None if flight.ttft_s is None else round(flight.ttft_s * scale, 6),
            "cached_tokens": usage.cached_tokens if usage is not None else None,
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "policy": self.config.policy,
            "pool": self._pool_size() if self._pool_size is not None else None,
            "unix_ms": round((self._unix0 + since) * 1000),
        }
        if scale != 1.0:
            obj["time_scale"] = scale
        return orjson.dumps(obj) + b"\n"
