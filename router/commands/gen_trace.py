"""`prefix-router gen-trace`: write a synthetic Mooncake-format trace with known prefix sharing.

Builds a `SharedPrefixConfig` or `MultiTurnConfig` from the flags (defaults come from the
dataclasses, so `--help` and the library agree), generates with `router.replay.gentrace`, and
writes Mooncake JSONL. `--kind mtbench-chat` instead writes the chat-log JSONL example built
from MT-bench questions. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "generate a synthetic trace (shared-prefix groups or multi-turn sessions)"

DESCRIPTION = """\
Write a seeded, deterministic synthetic trace in Mooncake JSONL (timestamp ms, input_length,
output_length, hash_ids of 512-token blocks; multi-turn adds "session").

--kind shared-prefix  like SGLang's generated-shared-prefix benchmark: --groups system prompts
    of --system-prompt-len tokens, each followed by --prompts-per-group distinct questions of
    --question-len tokens; all prompts shuffled, Poisson arrivals at --request-rate req/s;
    every answer --output-len tokens.
    defaults: 128 groups x 40 prompts, 8192 + 128 tokens, 256 out, 8.5 req/s (~600 s)
--kind multi-turn  chat sessions start as a Poisson process (--session-rate per s) for
    --duration s; one shared system prompt (--system-prompt-len); each turn's prompt is the
    previous prompt + its answer + a new user message, so hash_ids extend the previous chain
    (a partial last block that grows gets a new id). Turns per session: geometric, mean
    --turns. User message and answer lengths: uniform in [0.5, 1.5] x --user-len and
    --output-len. Gap between turns: lognormal, median --think-median s, shape --think-sigma
    (it includes the answer's own time); turns past --duration are dropped.
    defaults: 600 s, 2 sessions/s, 8 turns, 2048-token system prompt, 500 user, 300 out,
    45 s median think time, sigma 1 (~7.5 req/s)
--kind mtbench-chat  the example chat-log JSONL (OpenAI messages, max_tokens, session) from
    MT-bench's 80 two-turn questions (--questions, default the bundled copy).

Defaults fit an 8 x llama3-8b-h100 pool (409,600 KV tokens per GPU): reuse is possible
within the pool's capacity, but not on one GPU, so routing matters.

example:
  prefix-router gen-trace --kind shared-prefix --seed 1 --out gsp.jsonl
  prefix-router analyze --trace gsp.jsonl
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from router.replay.gentrace import MultiTurnConfig, SharedPrefixConfig

    sp, mt = SharedPrefixConfig(), MultiTurnConfig()
    parser.add_argument(
        "--kind", required=True, choices=["shared-prefix", "multi-turn", "mtbench-chat"]
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, metavar="PATH", help="output file")
    parser.add_argument("--block-size", type=int, default=sp.block_size, help="tokens per id")
    g = parser.add_argument_group("shared-prefix")
    g.add_argument("--groups", type=int, default=sp.groups)
    g.add_argument("--prompts-per-group", type=int, default=sp.prompts_per_group)
    g.add_argument("--question-len", type=int, default=sp.question_len)
    g.add_argument("--request-rate", type=float, default=sp.request_rate, help="req/s")
    g = parser.add_argument_group("shared-prefix and multi-turn")
    g.add_argument(
        "--system-prompt-len",
        type=int,
        default=None,
        help=f"tokens (default {sp.system_prompt_len} shared-prefix, {mt.system_prompt_len} "
        "multi-turn)",
    )
    g.add_argument(
        "--output-len",
        type=int,
        default=None,
        help=f"tokens (default {sp.output_len} shared-prefix, mean {mt.output_len} multi-turn)",
    )
    g = parser.add_argument_group("multi-turn")
    g.add_argument("--duration", type=float, default=mt.duration_s, help="seconds")
    g.add_argument("--session-rate", type=float, default=mt.session_rate, help="sessions/s")
    g.add_argument("--turns", type=float, default=mt.turns_mean, help="mean turns")
    g.add_argument("--user-len", type=int, default=mt.user_len, help="mean tokens")
    g.add_argument("--think-median", type=float, default=mt.think_median_s, help="seconds")
    g.add_argument("--think-sigma", type=float, default=mt.think_sigma)
    g = parser.add_argument_group("mtbench-chat")
    g.add_argument("--questions", default=None, metavar="PATH", help="MT-bench question.jsonl")


def _fail(message: str) -> int:
    return usage_error("gen-trace", message)


def run(args: argparse.Namespace) -> int:
    from router.replay import gentrace
    from router.replay.analyze import ideal_hit_ratio
    from router.replay.traces import Trace, data_dir, write_mooncake

    trace: Trace
    try:
        if args.kind == "mtbench-chat":
            qpath = Path(args.questions or data_dir() / "mtbench_question.jsonl")
            with qpath.open(encoding="utf-8") as f:
                questions = [json.loads(line) for line in f if line.strip()]
            records = gentrace.mtbench_chat_log(questions, seed=args.seed)
            gentrace.write_chat_log(records, args.out)
            print(f"wrote {len(records)} chat-log requests to {args.out}")
            return 0
        if args.kind == "shared-prefix":
            sp = gentrace.SharedPrefixConfig()
            trace = gentrace.shared_prefix(
                gentrace.SharedPrefixConfig(
                    groups=args.groups,
                    prompts_per_group=args.prompts_per_group,
                    system_prompt_len=_or(args.system_prompt_len, sp.system_prompt_len),
                    question_len=args.question_len,
                    output_len=_or(args.output_len, sp.output_len),
                    request_rate=args.request_rate,
                    block_size=args.block_size,
                    seed=args.seed,
                )
            )
        else:
            mt = gentrace.MultiTurnConfig()
            trace = gentrace.multi_turn(
                gentrace.MultiTurnConfig(
                    duration_s=args.duration,
                    session_rate=args.session_rate,
                    turns_mean=args.turns,
                    system_prompt_len=_or(args.system_prompt_len, mt.system_prompt_len),
                    user_len=args.user_len,
                    output_len=_or(args.output_len, mt.output_len),
                    think_median_s=args.think_median,
                    think_sigma=args.think_sigma,
                    block_size=args.block_size,
                    seed=args.seed,
                )
            )
        write_mooncake(trace, args.out)
    except (ValueError, KeyError, OSError) as exc:
        return _fail(str(exc).strip("'\""))
    print(
        f"wrote {len(trace.requests)} requests over {trace.duration():.0f} s to {args.out} "
        f"(ideal hit ratio {ideal_hit_ratio(trace):.3f})"
    )
    return 0


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
