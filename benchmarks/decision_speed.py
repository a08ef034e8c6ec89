"""How long one routing decision takes: request body in, backend out.

A 20-message chat of about 8k tokens (cl100k_base) is routed by the `cost` policy over 8, 64 and
256 backends whose prefix index already holds about 1M (block, backend) entries. Each timed
decision is a fresh conversation turn: the 19 earlier messages are in the tokenization cache (as
they are in a live router, which saw the previous turn) and the last user message is new. The
timed path is what the live proxy runs per request:

    parse_chat(body) -> BlockHasher.route_request -> RoutingCore.route (index match + cost)

Each row also carries the median of each stage (`stage_median_us`: parse, hash, route) and of
tokenizing the new message alone (`tokenize_new`, timed outside the decision), since that one
tiktoken call is most of the decision at small pool sizes. With `--breakdown`, a second run of
as many decisions (after the timed one, which it leaves untouched) splits the route stage
(`route_breakdown_median_us`): the index match, the rest of the policy's choice (the
per-backend cost loop), the index update after the decision, and the core's bookkeeping.

Run: python benchmarks/decision_speed.py --json benchmarks/results/decision_speed.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from router.core.blocks import BlockHasher
from router.core.model import BackendSpec
from router.core.policies import make_policy
from router.core.prompt import parse_chat
from router.core.routing import RoutingCore
from router.core.tokens import load_tokenizer

WORDS = [
    "prefill",
    "decode",
    "cache",
    "radix",
    "batch",
    "token",
    "latency",
    "router",
    "backend",
    "prompt",
    "stream",
    "queue",
    "throughput",
    "bandwidth",
    "compute",
    "memory",
    "scheduler",
    "chunk",
    "eviction",
    "prefix",
    "conversation",
]


def _text(rng: random.Random, tokens: int) -> str:
    # ~1 token per word with cl100k for these common English words.
    return " ".join(rng.choice(WORDS) for _ in range(tokens))


def _conversation(rng: random.Random, turns: int, tokens_per_message: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": _text(rng, tokens_per_message)}]
    for i in range(turns - 1):
        role = "user" if i % 2 == 0 else "assistant"
        messages.append({"role": role, "content": _text(rng, tokens_per_message)})
    return messages


def _fill_index(core: RoutingCore, blocks: int, backends: list[str], rng: random.Random) -> None:
    """Route synthetic chains until the policy's index holds `blocks` (block, backend) entries."""
    index = getattr(core.policy, "index", None)
    if index is None:
        return
    chain_len = 128
    made = 0
    while made < blocks:
        base = rng.getrandbits(62)
        chain = [base + i for i in range(chain_len)]
        backend = backends[made // chain_len % len(backends)]
        index.insert(backend, chain, 0.0, 64, prompt_tokens=chain_len * 64)
        made += chain_len


def _route_breakdown(
    core: RoutingCore,
    hasher: BlockHasher,
    body: Callable[[str], dict[str, Any]],
    rng: random.Random,
    samples: int,
    first: int,
) -> dict[str, float]:
    """Medians of the route stage's parts, timed by wrapping the policy's and index's calls."""
    policy = core.policy
    index = getattr(policy, "index", None)
    parts: dict[str, int] = {}
    rows: dict[str, list[float]] = {
        "match": [],
        "choose_rest": [],
        "index_insert": [],
        "core_rest": [],
    }

    def timed(obj: Any, name: str) -> None:
        call = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            result = call(*args, **kwargs)
            parts[name] = time.perf_counter_ns() - t0
            return result

        setattr(obj, name, wrapper)

    timed(policy, "choose")
    if index is not None:
        timed(index, "match")
        timed(index, "insert")
    try:
        for i in range(first, first + samples):
            req = hasher.route_request(parse_chat(body(_text(rng, 420))), f"r{i}")
            parts.clear()
            t0 = time.perf_counter_ns()
            core.route(req, float(i))
            total = time.perf_counter_ns() - t0
            core.on_finished(f"r{i}", float(i) + 0.5, 1, None)
            match, insert = parts.get("match", 0), parts.get("insert", 0)
            rows["match"].append(match / 1e3)
            rows["choose_rest"].append((parts["choose"] - match) / 1e3)
            rows["index_insert"].append(insert / 1e3)
            rows["core_rest"].append((total - parts["choose"] - insert) / 1e3)
    finally:
        for obj, name in ((policy, "choose"), (index, "match"), (index, "insert")):
            if obj is not None:
                obj.__dict__.pop(name, None)
    return {k: statistics.median(v) for k, v in rows.items()}


def measure(
    backends: int, index_blocks: int, samples: int, seed: int, breakdown: bool = False
) -> dict[str, Any]:
    rng = random.Random(seed)
    ids = [f"http://10.0.{i // 256}.{i % 256}:30000" for i in range(backends)]
    specs = [BackendSpec(id=b, kv_capacity_tokens=409_600 * 1024) for b in ids]
    core = RoutingCore(make_policy("cost", rng=random.Random(seed)), specs)
    _fill_index(core, index_blocks, ids, rng)
    hasher = BlockHasher(load_tokenizer("cl100k_base"), block_tokens=64)
    history = _conversation(rng, 19, 420)

    def body(last: str) -> dict[str, Any]:
        return {"model": "m", "messages": [*history, {"role": "user", "content": last}]}

    # Warm: the previous turn (19 messages) has been seen, as in a live conversation.
    warm = parse_chat({"model": "m", "messages": history})
    hasher.route_request(warm, "warm")

    times_us: list[float] = []
    stages: dict[str, list[float]] = {"parse": [], "hash": [], "route": [], "tokenize_new": []}
    tokenizer = hasher.tokenizer
    prompt_tokens = 0
    for i in range(samples):
        last = _text(rng, 420)
        request_body = body(last)
        start = time.perf_counter()
        prompt = parse_chat(request_body)
        parsed = time.perf_counter()
        req = hasher.route_request(prompt, f"r{i}")
        hashed = time.perf_counter()
        core.route(req, float(i))
        end = time.perf_counter()
        core.on_finished(f"r{i}", float(i) + 0.5, 1, None)
        times_us.append((end - start) * 1e6)
        stages["parse"].append((parsed - start) * 1e6)
        stages["hash"].append((hashed - parsed) * 1e6)
        stages["route"].append((end - hashed) * 1e6)
        # Outside the timed decision: what tokenizing the one new message costs by itself.
        t0 = time.perf_counter()
        tokenizer.encode(prompt.segments[-1])
        stages["tokenize_new"].append((time.perf_counter() - t0) * 1e6)
        prompt_tokens = req.prompt_tokens
    times_us.sort()
    index = getattr(core.policy, "index", None)
    row = {
        "backends": backends,
        "median_us": statistics.median(times_us),
        "p99_us": times_us[min(len(times_us) - 1, int(len(times_us) * 0.99))],
        "index_blocks": index.entries() if index is not None else 0,
        "index_bytes": index.approx_bytes() if index is not None else 0,
        "prompt_tokens": prompt_tokens,
        "messages": len(history) + 1,
        "samples": samples,
        # medians of the decision's stages (hash includes tokenizing the new message), and of
        # tokenizing that message alone, to show what dominates
        "stage_median_us": {k: statistics.median(v) for k, v in stages.items()},
    }
    if breakdown:  # after the row's figures: this second run adds to the index
        row["route_breakdown_median_us"] = _route_breakdown(
            core, hasher, body, rng, samples, samples
        )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--backends", default="8,64,256", help="pool sizes (comma list)")
    parser.add_argument("--index-blocks", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write results JSON here")
    parser.add_argument(
        "--breakdown", action="store_true", help="also split the route stage (a second run)"
    )
    args = parser.parse_args(argv)
    results = []
    for count in (int(x) for x in args.backends.split(",")):
        row = measure(count, args.index_blocks, args.samples, args.seed, args.breakdown)
        results.append(row)
        detail = row.get("route_breakdown_median_us", {})
        print(
            f"{count:4d} backends: median {row['median_us']:8.1f} us  p99 {row['p99_us']:8.1f} us"
            f"  index {row['index_blocks']:,} entries ~{row['index_bytes'] / 2**20:.0f} MiB"
            f"  ({row['prompt_tokens']} prompt tokens, {row['messages']} messages)"
            f"  stages: {'  '.join(f'{k} {v:.0f}' for k, v in row['stage_median_us'].items())}"
            + (
                f"  route: {'  '.join(f'{k} {v:.0f}' for k, v in detail.items())}" if detail else ""
            ),
            file=sys.stderr,
        )
    doc = {"results": results, "python": sys.version.split()[0]}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    else:
        print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
