"""Human-facing output of runs: a results table for the terminal and a TTFT CDF plot.

Shared by `simulate`, `replay` and `compare`, so every run reads the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from router.replay.metrics import RequestOutcome

__all__ = ["format_table", "plot_ttft_cdf"]

_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("requests", "reqs", "{:d}"),
    ("failed", "failed", "{:d}"),
    ("ttft_mean", "TTFT mean", "{:.3f}"),
    ("ttft_p50", "p50", "{:.3f}"),
    ("ttft_p90", "p90", "{:.3f}"),
    ("ttft_p99", "p99", "{:.3f}"),
    ("tpot_mean", "TPOT ms", "ms"),
    ("e2e_mean", "E2E mean", "{:.2f}"),
    ("hit_ratio", "hit", "{:.3f}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "ms":
        return f"{value * 1000:.1f}"
    return fmt.format(value)


def format_table(results: Mapping[str, Mapping[str, Any]], *, title: str = "") -> str:
    """A fixed-width table: one row per policy/target, TTFT columns in seconds."""
    header = ["policy", *[label for _, label, _ in _COLUMNS]]
    rows = [
        [name, *[_cell(res.get(key), fmt) for key, _, fmt in _COLUMNS]]
        for name, res in results.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [title] if title else []
    lines.append(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for row in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def plot_ttft_cdf(
    runs: Mapping[str, Sequence[RequestOutcome]], path: str | Path, *, title: str
) -> None:
    """Write a PNG of each run's TTFT CDF (log x axis: TTFT spans milliseconds to minutes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, outcomes in runs.items():
        ttfts = sorted(o.ttft for o in outcomes if o.ttft is not None and o.ttft > 0)
        if not ttfts:
            continue
        ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
        failed = sum(1 for o in outcomes if o.failed)
        label = f"{name}" + (f" ({failed} failed)" if failed else "")
        ax.plot(ttfts, ys, label=label, linewidth=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.axhline(0.9, color="grey", linewidth=0.6, linestyle=":")
    ax.grid(True, which="both", alpha=0.25)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
