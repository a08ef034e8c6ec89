"""Reading what `serve --record` wrote: merging files, and the live side of `plan --check`.

A recording is Mooncake JSONL with extra fields (router/server/recorder.py). Each process
writes its own file (and rotates it into PATH.1, PATH.2, ...); `merge` puts any number of them
back into one trace: lines ordered by their wall-clock arrival (`unix_ms`), timestamps re-based
to the earliest arrival of all files (x `time_scale` where a file was recorded against sped-up
simulated backends), and the 53-bit salted block ids renumbered 0, 1, 2... in order of first
appearance (equal ids stay equal: files recorded with one `--record-secret` share prefixes).
Lines without `unix_ms` (any other Mooncake file) keep their own timestamps.

`live_view` reads what the router measured, for setting a simulation beside it: the TTFTs of
streamed requests that succeeded, the pool size (distinct backends) and the policy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.replay.textgen import BlockTextGenerator
from router.replay.traces import Trace, TraceError, jsonl_objects

__all__ = ["LiveView", "leaked_prompt_words", "live_view", "merge", "read_lines", "write_lines"]


def read_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of `path` (blank lines skipped; a bad line is a TraceError)."""
    out: list[dict[str, Any]] = []
    for number, obj in jsonl_objects(path):
        if "hash_ids" not in obj:
            raise TraceError(f"{path}:{number}: not a Mooncake line (no 'hash_ids')")
        out.append(obj)
    return out


def merge(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The lines of all `paths` as one trace: by arrival, re-based, ids renumbered compactly."""
    lines = [obj for p in paths for obj in read_lines(p)]
    walls = [obj["unix_ms"] for obj in lines if isinstance(obj.get("unix_ms"), int | float)]
    zero = min(walls) if walls else 0

    def arrival(obj: dict[str, Any]) -> float:
        wall = obj.get("unix_ms")
        if isinstance(wall, int | float):
            return (wall - zero) * float(obj.get("time_scale", 1.0))
        return float(obj["timestamp"])

    lines.sort(key=arrival)
    ids: dict[int, int] = {}
    merged: list[dict[str, Any]] = []
    for obj in lines:
        new = dict(obj)
        new["timestamp"] = round(arrival(obj))
        new["hash_ids"] = [ids.setdefault(i, len(ids)) for i in obj["hash_ids"]]
        merged.append(new)
    return merged


def write_lines(lines: Iterable[dict[str, Any]], path: Path) -> int:
    """Write lines as JSONL; how many."""
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for obj in lines:
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            count += 1
    return count


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveView:
    """What the router measured while recording."""

    ttfts: tuple[float, ...]  # streamed requests that succeeded, in seconds
    backends: int  # the pool's size as recorded (else: distinct backends that served one)
    policy: str | None  # the recorded policy (the most common, if files disagree)
    requests: int
    failed: int  # status other than 200


def live_view(path: Path) -> LiveView:
    lines = read_lines(path)
    ttfts = tuple(
        float(o["ttft"])
        for o in lines
        if o.get("status") == 200 and isinstance(o.get("ttft"), int | float)
    )
    used = {o["backend"] for o in lines if o.get("status") == 200 and o.get("backend")}
    pools = [o["pool"] for o in lines if isinstance(o.get("pool"), int)]
    policies: dict[str, int] = {}
    for o in lines:
        if isinstance(o.get("policy"), str) and o["policy"]:
            policies[o["policy"]] = policies.get(o["policy"], 0) + 1
    return LiveView(
        ttfts=ttfts,
        backends=max(pools) if pools else len(used),
        policy=max(policies, key=lambda k: policies[k]) if policies else None,
        requests=len(lines),
        failed=sum(1 for o in lines if o.get("status") not in (None, 200)),
    )


def leaked_prompt_words(path: Path, trace: Trace) -> list[str]:
    """Words of `trace`'s prompts (as replay generates their text) found in the recording at
    `path` anywhere but in its own field names and string values: [] when no text leaked."""
    text = path.read_text()
    fixed: set[str] = set()
    for line in text.splitlines():
        for key, value in json.loads(line).items():
            fixed.update(
                re.findall(r"[a-z]+", key + " " + (value if isinstance(value, str) else ""))
            )
    gen = BlockTextGenerator(trace.block_size)
    words: set[str] = set()
    for r in trace.requests:
        words.update(gen.prompt_text(r.hash_ids, r.input_length).split())
    return sorted((set(re.findall(r"[a-z]+", text)) - fixed) & words)
