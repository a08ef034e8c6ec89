"""Trace loaders: each format, malformed lines named by file:line, windows, scaling, bundles."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from router.core.blocks import BlockHasher
from router.core.prompt import parse_chat
from router.core.tokens import load_tokenizer
from router.replay.traces import (
    BUNDLED,
    Trace,
    TraceError,
    TraceRequest,
    bundled,
    data_dir,
    load_trace,
    write_mooncake,
)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _mc(ts: int, n: int, m: int, ids: Sequence[object], **extra: object) -> str:
    return json.dumps(
        {"timestamp": ts, "input_length": n, "output_length": m, "hash_ids": ids, **extra}
    )


def test_mooncake_loads_seconds_ids_and_clamps_zero_output(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "t.jsonl",
        [_mc(0, 600, 5, [0, 1]), "", _mc(1500, 512, 0, [0], session="a"), _mc(2250, 1, 3, [7])],
    )
    t = load_trace(p)
    assert t.name == "t" and t.block_size == 512
    assert [r.timestamp for r in t.requests] == [0.0, 1.5, 2.25]
    assert [r.hash_ids for r in t.requests] == [(0, 1), (0,), (7,)]
    assert t.requests[1].output_length == 1  # 0 clamped: an engine always emits one token
    assert t.requests[1].session == "a" and t.requests[0].session is None
    assert [r.index for r in t.requests] == [0, 1, 2]
    assert t.duration() == 2.25


def test_mooncake_sorted_by_time_index_keeps_file_position(tmp_path: Path) -> None:
    p = _write(tmp_path / "t.jsonl", [_mc(2000, 10, 1, [1]), _mc(1000, 10, 1, [2])])
    t = load_trace(p, "mooncake")
    assert [(r.index, r.hash_ids) for r in t.requests] == [(1, (2,)), (0, (1,))]


def test_mooncake_block_size_override(tmp_path: Path) -> None:
    p = _write(tmp_path / "q.jsonl", [_mc(0, 33, 1, [4, 5, 6])])
    assert load_trace(p, block_size=16).requests[0].hash_ids == (4, 5, 6)
    with pytest.raises(TraceError, match=r"q\.jsonl:1: 3 hash_ids for input_length 33"):
        load_trace(p)  # 512-token blocks: needs 1 id


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"timestamp": 0, "input_length": 10', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"timestamp": 0, "output_length": 1, "hash_ids": [0]}', "'input_length' must be"),
        (_mc(0, 1000, 1, [0]), r"1 hash_ids for input_length 1000; expected ceil\(1000/512\) = 2"),
        (_mc(-5, 10, 1, [0]), "'timestamp' must be finite and non-negative"),
        (_mc(0, 10, -1, [0]), "'output_length' must be >= 0"),
        (_mc(0, 10, 1, ["a"]), "'hash_ids' must be a list of integers"),
        ('{"timestamp": "x", "input_length": 1, "output_length": 1, "hash_ids": [0]}', "number"),
    ],
)
def test_mooncake_malformed_line_names_file_and_line(tmp_path: Path, line: str, why: str) -> None:
    p = _write(tmp_path / "bad.jsonl", [_mc(0, 10, 1, [0]), "", line])
    with pytest.raises(TraceError, match=re.escape(f"{p}:3: ") + ".*" + why):
        load_trace(p, "mooncake")


def test_auto_detect_rejects_unknown_jsonl(tmp_path: Path) -> None:
    p = _write(tmp_path / "x.jsonl", ['{"foo": 1}'])
    with pytest.raises(TraceError, match=re.escape(f"{p}:1:")):
        load_trace(p)
    with pytest.raises(TraceError, match="empty"):
        load_trace(_write(tmp_path / "e.jsonl", []))


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def test_azure_relative_times_and_fresh_unique_ids(tmp_path: Path) -> None:
    p = tmp_path / "az.csv"
    p.write_bytes(
        (
            f"{AZURE_HEADER}\r\n"
            "2023-11-16 18:15:46.6805900,374,44\r\n"
            "2023-11-16 18:15:50.9951690,1025,0\r\n"
            "2023-11-16 18:16:46.6805900,512,7\r\n"
        ).encode()
    )
    t = load_trace(p)
    assert t.block_size == 512
    assert [r.timestamp for r in t.requests] == pytest.approx([0.0, 4.314579, 60.0])
    assert [len(r.hash_ids) for r in t.requests] == [1, 3, 1]
    all_ids = [b for r in t.requests for b in r.hash_ids]
    assert len(set(all_ids)) == len(all_ids)  # no prefix sharing in Azure traces
    assert t.requests[1].output_length == 1


@pytest.mark.parametrize(
    ("rows", "lineno", "why"),
    [
        (["TIME,Ctx,Gen"], 1, "expected header"),
        ([AZURE_HEADER, "2023-11-16 18:15:46.68,1,1", "yesterday,1,1"], 3, "Invalid isoformat"),
        ([AZURE_HEADER, "2023-11-16 18:15:46.68,1"], 2, "expected 3 fields"),
        ([AZURE_HEADER, "2023-11-16 18:15:46.68,x,1"], 2, "invalid literal"),
        ([AZURE_HEADER, "2023-11-16 18:15:46.68,-3,1"], 2, "non-negative"),
        ([AZURE_HEADER, "2023-11-16 18:15:46.68,1,1", "2023-11-16 18:15:40.00,1,1"], 3, "before"),
    ],
)
def test_azure_malformed_row(tmp_path: Path, rows: list[str], lineno: int, why: str) -> None:
    p = _write(tmp_path / "az.csv", rows)
    with pytest.raises(TraceError, match=re.escape(f"{p}:{lineno}: ") + ".*" + why):
        load_trace(p)


def _chat(ts: float, messages: Sequence[Mapping[str, object]], **extra: object) -> str:
    return json.dumps({"timestamp": ts, "messages": messages, "max_tokens": 20, **extra})


def test_chat_log_second_turn_extends_first_turn_chain(tmp_path: Path) -> None:
    sys_msg = {"role": "system", "content": "You are terse. " * 30}
    q1 = {"role": "user", "content": "Name three prime numbers and explain why each is prime."}
    a1 = {"role": "assistant", "content": [{"type": "text", "text": "2, 3 and 5."}]}
    q2 = {"role": "user", "content": "And the next three?"}
    p = _write(
        tmp_path / "chat.jsonl",
        [_chat(0.5, [sys_msg, q1], session="s1"), _chat(2.0, [sys_msg, q1, a1, q2])],
    )
    t = load_trace(p)
    assert t.block_size == 64
    r1, r2 = t.requests
    assert r1.session == "s1" and r1.messages is not None and r1.messages[1] == q1
    assert r1.output_length == 20 and r1.timestamp == 0.5
    assert len(r1.hash_ids) == -(-r1.input_length // 64) and r2.input_length > r1.input_length
    full = r1.input_length // 64
    assert full >= 1 and r2.hash_ids[:full] == r1.hash_ids[:full]
    if r1.input_length % 64:  # the partial last block grew: new content, new id
        assert r2.hash_ids[full] != r1.hash_ids[full]
    assert all(0 <= b < 2**64 for b in r2.hash_ids)
    # the same blocks the live proxy computes for the same chat body
    live = BlockHasher(load_tokenizer("cl100k_base"), 64).route_request(
        parse_chat({"messages": [sys_msg, q1, a1, q2], "max_tokens": 20}), "x"
    )
    assert live.blocks == r2.hash_ids and live.prompt_tokens == r2.input_length


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"timestamp": 0, "messages": [], "max_tokens": 5}', "messages must be a non-empty list"),
        (
            '{"timestamp": 0, "messages": [{"content": "hi"}], "max_tokens": 5}',
            "messages\\[0\\].role must be a string",
        ),
        ('{"timestamp": 0, "messages": [{"role": "user", "content": 3}], "max_tokens": 5}', "str"),
        (
            '{"timestamp": 0, "messages": [{"role": "wizard", "content": "x"}], "max_tokens": 5}',
            "one of",
        ),
        ('{"timestamp": 0, "messages": [{"role": "user", "content": "x"}]}', "'max_tokens'"),
        (
            '{"timestamp": -1, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}',
            "ts",
        ),
    ],
)
def test_chat_malformed_line(tmp_path: Path, line: str, why: str) -> None:
    good = _chat(0, [{"role": "user", "content": "hello"}])
    p = _write(tmp_path / "c.jsonl", [good, line])
    why = "'timestamp'" if why == "ts" else why
    with pytest.raises(TraceError, match=re.escape(f"{p}:2: ") + ".*" + why):
        load_trace(p, "chat")


def _trace(times: list[float]) -> Trace:
    reqs = tuple(
        TraceRequest(index=i, timestamp=t, input_length=10, output_length=1, hash_ids=(i,))
        for i, t in enumerate(times)
    )
    return Trace(name="x", block_size=512, requests=reqs)


def test_window_rebases_and_keeps_half_open_interval() -> None:
    t = _trace([0.0, 1.0, 2.0, 3.0, 4.0])
    w = t.window(1.0, 2.0)
    assert [(r.index, r.timestamp) for r in w.requests] == [(1, 0.0), (2, 1.0)]
    assert [r.index for r in t.window(3.0, None).requests] == [3, 4]
    assert t.window(10.0, 5.0).requests == ()
    with pytest.raises(ValueError):
        t.window(0.0, 0.0)


def test_scaled_divides_timestamps() -> None:
    t = _trace([0.0, 1.0, 3.0])
    assert [r.timestamp for r in t.scaled(2.0).requests] == [0.0, 0.5, 1.5]
    assert t.scaled(0.5).duration() == 6.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="load must be positive"):
            t.scaled(bad)


def test_trace_rejects_unordered_requests() -> None:
    with pytest.raises(ValueError, match="ordered"):
        Trace(name="x", block_size=1, requests=_trace([1.0, 2.0]).requests[::-1])


def test_write_mooncake_round_trip(tmp_path: Path) -> None:
    reqs = (
        TraceRequest(index=0, timestamp=0.25, input_length=600, output_length=3, hash_ids=(9, 8)),
        TraceRequest(
            index=1, timestamp=1.5, input_length=5, output_length=1, hash_ids=(9,), session="s"
        ),
    )
    t = Trace(name="rt", block_size=512, requests=reqs)
    p = tmp_path / "rt.jsonl"
    write_mooncake(t, p)
    assert json.loads(p.read_text().splitlines()[0])["timestamp"] == 250
    assert load_trace(p) == t


def test_bundled_traces_resolve_load_and_match_readme_checksums() -> None:
    readme = (data_dir() / "README.md").read_text()
    for name, filename in BUNDLED.items():
        path = bundled(name)
        assert path.name == filename
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest in readme, f"{filename}: sha256 not in data/traces/README.md"
    conv = load_trace(bundled("azure-conv"))
    assert len(conv.requests) == 2867 and conv.duration() < 600
    assert len(load_trace(bundled("azure-code")).requests) == 1482
    chat = load_trace(bundled("mtbench-chat"))
    assert len(chat.requests) == 160 and len({r.session for r in chat.requests}) == 80
    with pytest.raises(KeyError, match="unknown bundled trace"):
        bundled("nope")


def test_bundled_conversation_trace_is_the_mooncake_file() -> None:
    t = load_trace(bundled("conversation"))
    assert len(t.requests) == 12031
    assert t.duration() == pytest.approx(3537, abs=1)
    assert all(r.hash_ids[0] == 0 for r in t.requests)
    assert sum(len(r.hash_ids) for r in t.requests) == 288_500
