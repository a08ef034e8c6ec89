"""Synthetic workloads with known prefix structure, written as Mooncake-format traces.

Two kinds, each a pure function of its config and seed (`random.Random(seed)`, nothing else):

- **shared-prefix**, after SGLang's generated-shared-prefix benchmark (`bench_serving
  --dataset-name generated-shared-prefix`): `groups` system prompts of `system_prompt_len`
  tokens, each followed by `prompts_per_group` distinct questions of `question_len` tokens;
  all prompts shuffled together and sent with Poisson arrivals at `request_rate`.
- **multi-turn**: chat sessions start as a Poisson process at `session_rate` per second for
  `duration_s`. All sessions share one system prompt. Turn k's prompt is turn k-1's prompt,
  turn k-1's answer and a new user message, so its blocks extend the previous turn's chain.
  The number of turns is geometric with mean `turns_mean`; user messages and answers are
  uniform in [0.5, 1.5] x their mean length; the gap between a turn's arrival and the next
  one's is lognormal (median `think_median_s`, shape `think_sigma`) and includes the time the
  answer took. Turns that would arrive after `duration_s` are dropped.

Block ids: a prompt is a list of content pieces (content id, length). Block k's id is
interned from (block k-1's id, the exact piece slices it covers), so equal ids mean equal
prefixes, shared system prompts share ids, and a partial last block that a later turn
extends gets a new id there (its content changed)::

    turn 1   | sys | sys | sys+u1 (partial) |
    turn 2   | sys | sys | sys+u1+a1 | a1+u2 (partial) |      same ids, then new ones
             <-- equal ids --> <- new id: content changed ->

The defaults are sized for an 8 x llama3-8b-h100 pool (409,600 KV tokens per GPU, 3.3M in
all): about 10 minutes each. shared-prefix: the group prompts (128 x 8,192 tokens = 1.05M) fit
the pool but not one GPU, so routing decides whether they are reused (one 409,600-token LRU
reaches ~0.35 of the ideal ~0.96). multi-turn: ~7.5 req/s, ~4.4k-token prompts, ideal ~0.79;
one GPU's LRU reaches ~0.54, the pool's ~0.79.

`mtbench_chat_log` builds the example chat-log trace shipped as `data/traces/mtbench_chat.jsonl`
from the MT-bench questions (two turns per question).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.replay.traces import MOONCAKE_BLOCK, Trace, TraceRequest

__all__ = [
    "MultiTurnConfig",
    "SharedPrefixConfig",
    "UnsharedConfig",
    "mtbench_chat_log",
    "multi_turn",
    "shared_prefix",
    "unshared",
    "write_chat_log",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsharedConfig:
    """Requests that share nothing, Poisson arrivals: pure prefill and decode work.

    What calibration needs to see a backend's speed without cache hits in the way.
    """

    requests: int = 240
    request_rate: float = 1.0
    prompt_len: tuple[int, int] = (1000, 12000)  # uniform, inclusive
    output_len: tuple[int, int] = (50, 300)
    block_size: int = MOONCAKE_BLOCK
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, ("requests", "request_rate", "block_size"))
        for lo, hi in (self.prompt_len, self.output_len):
            if not 1 <= lo <= hi:
                raise ValueError("length ranges need 1 <= low <= high")


def unshared(cfg: UnsharedConfig) -> Trace:
    """A trace whose every block id is new: no request can hit another's cache."""
    rng = random.Random(cfg.seed)
    t, next_id, reqs = 0.0, 0, []
    for i in range(cfg.requests):
        t += rng.expovariate(cfg.request_rate)
        length = rng.randint(*cfg.prompt_len)
        blocks = -(-length // cfg.block_size)
        reqs.append(
            TraceRequest(
                index=i,
                timestamp=t,
                input_length=length,
                output_length=rng.randint(*cfg.output_len),
                hash_ids=tuple(range(next_id, next_id + blocks)),
            )
        )
        next_id += blocks
    name = f"unshared-{cfg.requests}req-{cfg.request_rate:g}rps-seed{cfg.seed}"
    return Trace(name=name, block_size=cfg.block_size, requests=tuple(reqs))


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedPrefixConfig:
    """Groups sharing a long system prompt, many questions each (SGLang's gsp benchmark)."""

    groups: int = 128
    prompts_per_group: int = 40
    system_prompt_len: int = 8192
    question_len: int = 128
    output_len: int = 256
    request_rate: float = 8.5  # requests/s, Poisson; defaults give ~600 s
    block_size: int = MOONCAKE_BLOCK
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, ("groups", "prompts_per_group", "output_len", "block_size"))
        _positive(self, ("request_rate",))
        if self.system_prompt_len < 0 or self.question_len < 0:
            raise ValueError("system_prompt_len and question_len must be non-negative")
        if self.system_prompt_len + self.question_len <= 0:
            raise ValueError("prompts must have at least one token")


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiTurnConfig:
    """Chat sessions whose history grows turn by turn, with think times between turns."""

    duration_s: float = 600.0
    session_rate: float = 2.0  # session starts/s, Poisson
    turns_mean: float = 8.0  # geometric, at least 1
    system_prompt_len: int = 2048  # shared by every session
    user_len: int = 500  # mean tokens of a user message
    output_len: int = 300  # mean tokens of an answer
    think_median_s: float = 45.0  # lognormal gap between a session's turns
    think_sigma: float = 1.0
    block_size: int = MOONCAKE_BLOCK
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, ("duration_s", "session_rate", "think_median_s", "block_size"))
        _positive(self, ("user_len", "output_len"))
        if self.turns_mean < 1:
            raise ValueError("turns_mean must be at least 1")
        if self.system_prompt_len < 0 or self.think_sigma < 0:
            raise ValueError("system_prompt_len and think_sigma must be non-negative")


@dataclass(slots=True)
class _Chains:
    """Interns blocks by (parent id, content slices): equal id <=> equal prefix."""

    block_size: int
    ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = field(default_factory=dict)

    def chain(self, pieces: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """Block ids of a prompt made of (content id, length) pieces, in order."""
        out: list[int] = []
        parent = -1
        block: list[tuple[int, int, int]] = []
        fill = 0
        for content, length in pieces:
            offset = 0
            while offset < length:
                take = min(length - offset, self.block_size - fill)
                block.append((content, offset, take))
                fill += take
                offset += take
                if fill == self.block_size:
                    parent = self._intern(parent, block)
                    out.append(parent)
                    block, fill = [], 0
        if block:
            out.append(self._intern(parent, block))
        return tuple(out)

    def _intern(self, parent: int, block: list[tuple[int, int, int]]) -> int:
        key = (parent, tuple(block))
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.ids)
        return found


def shared_prefix(cfg: SharedPrefixConfig) -> Trace:
    """A generated-shared-prefix trace: shuffled group prompts, Poisson arrivals."""
    rng = random.Random(cfg.seed)
    chains = _Chains(cfg.block_size)
    prompts = [(g, q) for g in range(cfg.groups) for q in range(cfg.prompts_per_group)]
    rng.shuffle(prompts)
    n = cfg.system_prompt_len + cfg.question_len
    reqs: list[TraceRequest] = []
    t = 0.0
    for i, (g, q) in enumerate(prompts):
        if i:
            t += rng.expovariate(cfg.request_rate)
        question = cfg.groups + g * cfg.prompts_per_group + q  # content ids after the systems
        ids = chains.chain([(g, cfg.system_prompt_len), (question, cfg.question_len)])
        reqs.append(
            TraceRequest(
                index=i,
                timestamp=_ms(t),
                input_length=n,
                output_length=cfg.output_len,
                hash_ids=ids,
            )
        )
    return Trace(name="shared-prefix", block_size=cfg.block_size, requests=tuple(reqs))


def multi_turn(cfg: MultiTurnConfig) -> Trace:
    """A multi-turn chat trace: Poisson session starts, growing histories, think times."""
    rng = random.Random(cfg.seed)
    chains = _Chains(cfg.block_size)
    next_content = 1  # content id 0 is the shared system prompt
    stop = 1.0 / cfg.turns_mean  # geometric: P(no further turn) after each turn
    mu = math.log(cfg.think_median_s)
    pending: list[tuple[float, int, int, tuple[int, ...], str]] = []
    start = rng.expovariate(cfg.session_rate)
    session = 0
    while start < cfg.duration_s:
        pieces: list[tuple[int, int]] = [(0, cfg.system_prompt_len)]
        t = start
        while True:
            user = _around(rng, cfg.user_len)
            answer = _around(rng, cfg.output_len)
            pieces.append((next_content, user))
            ids = chains.chain(pieces)
            n = sum(length for _, length in pieces)
            pending.append((_ms(t), n, answer, ids, f"s{session}"))
            pieces.append((next_content + 1, answer))
            next_content += 2
            if rng.random() < stop:
                break
            t += rng.lognormvariate(mu, cfg.think_sigma)
            if t >= cfg.duration_s:
                break
        session += 1
        start += rng.expovariate(cfg.session_rate)
    pending.sort(key=lambda p: p[0])  # stable: equal times keep generation order
    reqs = tuple(
        TraceRequest(
            index=i, timestamp=ts, input_length=n, output_length=m, hash_ids=ids, session=s
        )
        for i, (ts, n, m, ids, s) in enumerate(pending)
    )
    return Trace(name="multi-turn", block_size=cfg.block_size, requests=reqs)


def mtbench_chat_log(
    questions: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    session_rate: float = 0.2,
    think_median_s: float = 45.0,
    max_tokens: int = 512,
) -> list[dict[str, Any]]:
    """Chat-log records: each MT-bench question is a two-turn session (Poisson starts).

    MT-bench has no answers, so the assistant turn between the two questions is a short
    placeholder saying so; the second turn's prompt repeats the first turn's messages exactly,
    so its blocks extend the first turn's chain.
    """
    rng = random.Random(seed)
    system = {"role": "system", "content": "You are a helpful assistant."}
    out: list[dict[str, Any]] = []
    t = 0.0
    for q in questions:
        qid = q["question_id"]
        turns = q["turns"]
        t += rng.expovariate(session_rate)
        history: list[dict[str, Any]] = [system]
        at = t
        for k, text in enumerate(turns):
            if k:
                history.append(
                    {
                        "role": "assistant",
                        "content": f"[The model's answer to turn {k} of MT-bench question "
                        f"{qid} is not part of this example trace.]",
                    }
                )
                at += rng.lognormvariate(math.log(think_median_s), 1.0)
            history.append({"role": "user", "content": text})
            out.append(
                {
                    "timestamp": _ms(at),
                    "messages": [dict(m) for m in history],
                    "max_tokens": max_tokens,
                    "session": f"mtbench-{qid}",
                }
            )
    out.sort(key=lambda r: float(r["timestamp"]))
    return out


def write_chat_log(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write chat-log JSONL, one record a line."""
    with Path(path).open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _around(rng: random.Random, mean: int) -> int:
    """Uniform integer in [0.5, 1.5] x mean, at least 1."""
    return max(1, round(mean * rng.uniform(0.5, 1.5)))


def _ms(t: float) -> float:
    """Round to whole milliseconds, as Mooncake stores them, so a written trace reads back."""
    return round(t * 1000) / 1000


def _positive(cfg: object, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive, got {value}")
