"""Render the committed simulation results as Markdown tables (for benchmarks/README.md).

Figures are read from benchmarks/results/sim_*.json, never typed by hand:

    python benchmarks/tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ("round_robin", "least_load", "cache_aware", "cost", "oracle")


def _capacity_table(docs: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | profile | ideal hit | LRU bound | round_robin | cache_aware | cost | oracle "
        "| cost / rr | cost / ca | cost / oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        cap = {p: c["max_load"] for p, c in doc["capacity"].items()}
        cost = cap.get("cost", 0.0)

        def ratio(other: str, cost: float = cost, cap: dict[str, float] = cap) -> str:
            base = cap.get(other)
            return f"{cost / base:.2f}x" if base else "-"

        cells = [f"{cap[p]:.2f}" if p in cap else "-" for p in ORDER if p != "least_load"]
        lines.append(
            f"| {doc['workload']} | {doc['profile']} | {doc['ideal_hit_ratio']:.3f} "
            f"| {doc['lru_bound_hit_ratio']:.3f} | "
            + " | ".join(cells)
            + f" | {ratio('round_robin')} | {ratio('cache_aware')} | {ratio('oracle')} |"
        )
    return "\n".join(lines)


def _at_rr_table(docs: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | load | policy | TTFT p50 | TTFT p90 | TTFT p99 | TPOT ms | hit | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for doc in docs:
        at = doc["at_round_robin_capacity"]
        for policy in ORDER:
            row = at["results"].get(policy)
            if row is None:
                continue
            lines.append(
                f"| {doc['workload']} | {at['load']:.2f} | {policy} | {row['ttft_p50']:.3f} "
                f"| {row['ttft_p90']:.3f} | {row['ttft_p99']:.2f} | {row['tpot_mean'] * 1000:.1f} "
                f"| {row['hit_ratio']:.3f} | {row['failed']} |"
            )
    return "\n".join(lines)


def main() -> int:
    docs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("sim_*.json"))]
    if not docs:
        print("no sim_*.json yet: run benchmarks/sim_compare.py", file=sys.stderr)
        return 1
    print("Capacity (highest load with p90 TTFT <= 2 s, 5% search precision):\n")
    print(_capacity_table(docs))
    print("\nEvery policy at round_robin's capacity:\n")
    print(_at_rr_table(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
