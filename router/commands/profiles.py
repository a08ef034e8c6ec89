"""`prefix-router profiles`: the simulated backends' performance profiles and derived figures.

Reads `backends.sim.perf.PROFILES` and prints, per profile, what its roofline model implies:
prefill tokens/s for an uncached 2,048-token prompt, single-stream decode tokens/s, KV pool
sizes (device and host tier). `--json` prints the same as one JSON object, with each profile's
sources and assumptions; `--profile NAME` picks one (unknown names: one line, exit code 2).
"""

from __future__ import annotations

import argparse
import json

from router.commands import usage_error

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "list the simulated backends' performance profiles and their derived figures"

DESCRIPTION = """\
Each profile is a roofline model of one model on one GPU (or TP group): prefill is
compute-bound (params x 2 FLOPs per token plus attention, at peak x MFU), decode is
bandwidth-bound (weights plus the batch's KV read once per step, at HBM bandwidth x
efficiency, plus a fixed step overhead). Figures shown:

  prefill tok/s     an uncached 2,048-token prompt alone (step overhead included)
  decode tok/s      one stream at 2,048 tokens of context
  KV device / host  token pools (device = SGLang max_total_num_tokens; host = HiCache tier)

examples:
  prefix-router profiles
  prefix-router profiles --json
  prefix-router profiles --profile llama3-8b-h100 --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--profile", metavar="NAME", help="show only this profile")


def run(args: argparse.Namespace) -> int:
    from backends.sim.perf import PROFILES, get_profile

    if args.profile is not None:
        try:
            profiles = [get_profile(args.profile)]
        except KeyError as exc:
            return usage_error("profiles", exc.args[0])
    else:
        profiles = list(PROFILES.values())

    if args.json:
        out = []
        for p in profiles:
            entry: dict[str, object] = dict(p.summary())
            entry["sources"] = list(p.sources)
            entry["assumptions"] = list(p.assumptions)
            out.append(entry)
        print(json.dumps({"profiles": out}, indent=2))
        return 0

    header = (
        f"{'profile':<24} {'prefill tok/s':>13} {'TTFT 2k ms':>10} {'decode tok/s':>12} "
        f"{'KV device':>10} {'KV host':>10}"
    )
    print(header)
    print("-" * len(header))
    for p in profiles:
        s = p.summary()
        print(
            f"{p.name:<24} {s['prefill_tokens_per_s_2048']:>13,.0f} "
            f"{float(s['ttft_s_2048']) * 1000:>10.1f} {s['decode_tokens_per_s_single']:>12,.1f} "
            f"{p.kv_capacity_tokens:>10,} {p.host_capacity_tokens:>10,}"
        )
    print()
    for p in profiles:
        print(f"{p.name}: {p.description}")
        for src in p.sources:
            print(f"  source:     {src}")
        for assumption in p.assumptions:
            print(f"  assumption: {assumption}")
    return 0
