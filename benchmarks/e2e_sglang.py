"""Predicted vs reported cached tokens in front of real SGLang, and SGLang's bench_serving.

Run by `make e2e` (e2e/run.py) with two SGLang 0.5.23 servers up (CPU, tiny model, page size
16); needs the .e2e environment. Two parts:

1. A multi-turn window of the Mooncake conversation trace (bundled `conversation`): of its
   first `WINDOW` requests, those of conversations with at least two turns there (same first
   two hash blocks), prompts of at most `MAX_BLOCKS` blocks, in trace order. Scaled to the
   CPU model: each 512-token hash block becomes 16 words of deterministic text
   (`BlockTextGenerator`, ~3 tokens a word for the tiny model's tokenizer), outputs are
   capped at 8 tokens. The window holds more tokens than the two servers' KV, so both evict.
   The same requests, one at a time in trace order, go through our router
   three times, each after `/flush_cache` on both servers:

   - `tiktoken+model`: today's default (cl100k blocks of 64, modelled cache);
   - `tokenizer+model`: the model's tokenizer at the page size, modelled cache;
   - `tokenizer+events`: the same, with the servers' KV events driving the index.

   Per request: the router's prediction (its access log's `predicted=`) against the
   server's `meta_info.cached_tokens`. `exact_share`: requests whose prediction is within
   one page (16 tokens) of the report. Written to benchmarks/results/e2e_sglang.json.
2. `python -m sglang.bench_serving --backend sglang` with its `random` dataset (prompts from
   a local ShareGPT-format file made from the bundled MT-bench questions, so nothing is
   downloaded) and `generated-shared-prefix`, through the router and straight to one server
   with the same settings. Summaries in benchmarks/results/e2e_bench_serving.json.

Figures were taken on a shared 2-core box: latencies are not comparable to a GPU's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e"))

from servers import PAGE_SIZE, SGLangServer, start_router, stop_router  # noqa: E402

from router.replay.textgen import BlockTextGenerator  # noqa: E402
from router.replay.traces import load_window  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORDS_PER_BLOCK = 16  # one 512-token hash block of the trace -> 16 words
MAX_BLOCKS = 40
WINDOW = 600
OUTPUT_TOKENS = 8
LOG_LINE = re.compile(
    r"endpoint=/generate backend=(\S+) status=200 .* cached=(\S+) predicted=(\d+)"
)


def post(url: str, body: Any = None, timeout: float = 120.0) -> Any:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode("utf-8", "replace")


def window_requests() -> list[dict[str, Any]]:
    """The scaled window: /generate bodies in trace order."""
    trace = load_window("conversation")
    gen = BlockTextGenerator(WORDS_PER_BLOCK, seed=0)
    scale = trace.block_size // WORDS_PER_BLOCK
    window = [r for r in trace.requests[:WINDOW] if 1 < len(r.hash_ids) <= MAX_BLOCKS]
    turns = Counter(r.hash_ids[:2] for r in window)
    bodies = []
    for req in window:
        if turns[req.hash_ids[:2]] < 2:
            continue
        full = (len(req.hash_ids) - 1) * WORDS_PER_BLOCK
        tail = req.input_length - (len(req.hash_ids) - 1) * trace.block_size
        words = full + min(WORDS_PER_BLOCK, max(1, -(-tail // scale)))
        bodies.append(
            {
                "text": gen.prompt_text(req.hash_ids, words),
                "sampling_params": {
                    "max_new_tokens": max(1, min(OUTPUT_TOKENS, req.output_length)),
                    "temperature": 0,
                },
            }
        )
    return bodies


def run_variant(
    name: str, servers: list[SGLangServer], log_dir: Path, bodies: list[dict[str, Any]], *flags: str
) -> dict[str, Any]:
    for s in servers:
        post(s.url + "/flush_cache")
    time.sleep(0.5)
    router = start_router(servers, log_dir, *flags)
    reported: list[int] = []
    try:
        for body in bodies:
            out = post(router.url + "/generate", body)
            reported.append(int(out["meta_info"]["cached_tokens"]))
        time.sleep(1.0)  # the last access-log lines are written
        lines = LOG_LINE.findall(router.log_text())
        kv = router.stats().get("kv_events")
    finally:
        stop_router(router.proc)
    if len(lines) != len(reported):
        raise RuntimeError(f"{name}: {len(lines)} log lines for {len(reported)} requests")
    predicted = [int(p) for _b, _c, p in lines]
    exact = sum(abs(p - r) < PAGE_SIZE for p, r in zip(predicted, reported, strict=True))
    row = {
        "name": name,
        "flags": [f.replace(str(ROOT) + "/", "") for f in flags],  # repository-relative
        "predicted_cached_tokens": sum(predicted),
        "reported_cached_tokens": sum(reported),
        "exact_share": round(exact / len(reported), 4),
        "backends_used": sorted({b for b, _c, _p in lines}),
    }
    if kv is not None:
        row["kv_events"] = {
            url: {k: v for k, v in b.items() if k != "endpoints"}
            for url, b in kv.get("backends", {}).items()
        }
    print(
        f"  {name:18s} predicted {row['predicted_cached_tokens']:7d}  reported "
        f"{row['reported_cached_tokens']:7d}  exact {row['exact_share']:.3f}",
        flush=True,
    )
    return row


def sharegpt_file(path: Path) -> Path:
    """ShareGPT-format prompts from the bundled MT-bench questions (bench_serving's `random`)."""
    rows = []
    for line in (ROOT / "data" / "traces" / "mtbench_question.jsonl").read_text().splitlines():
        turns = json.loads(line)["turns"]
        rows.append({"conversations": [{"from": "human", "value": t} for t in turns]})
    path.write_text(json.dumps(rows))
    return path


def bench_serving(
    base_url: str, model: Path, dataset: str, out: Path, data: Path
) -> dict[str, Any]:
    common = [
        sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang",
        "--base-url", base_url, "--model", str(model), "--tokenizer", str(model),
        "--num-prompts", "32", "--request-rate", "inf", "--max-concurrency", "4",
        "--seed", "1", "--disable-tqdm", "--output-file", str(out),
    ]  # fmt: skip
    if dataset == "random":
        extra = ["--dataset-name", "random", "--dataset-path", str(data),
                 "--random-input-len", "256", "--random-output-len", "16",
                 "--random-range-ratio", "1.0"]  # fmt: skip
    else:
        extra = ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4",
                 "--gsp-prompts-per-group", "8", "--gsp-system-prompt-len", "512",
                 "--gsp-question-len", "64", "--gsp-output-len", "16"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(common + extra, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"bench_serving failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}"
        )
    last = json.loads(out.read_text().strip().splitlines()[-1])
    keep = (
        "completed",
        "total_input_tokens",
        "total_output_tokens",
        "duration",
        "request_throughput",
        "output_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "mean_e2e_latency_ms",
        "cache_hit_rate",
    )
    summary = {k: last[k] for k in keep if k in last}
    errors = last.get("errors") or []
    summary["errors"] = sum(1 for e in errors if e) if isinstance(errors, list) else errors
    summary["num_prompts"] = 32
    return summary


def main() -> int:
    info = json.loads(os.environ["PREFIX_ROUTER_E2E"])
    model = Path(info["model_dir"])
    log_dir = Path(info["log_dir"])
    servers = [
        SGLangServer(
            name=s["name"],
            model_dir=model,
            log_path=Path(s["log"]),
            port=s["port"],
            kv_port=s["kv_port"],
        )
        for s in info["servers"]
    ]
    version = urllib.request.urlopen(servers[0].url + "/server_info", timeout=10)
    sglang_version = json.loads(version.read())["version"]
    tok = str(model / "tokenizer.json")
    bodies = window_requests()
    print(f"e2e bench: {len(bodies)} requests of the conversation window, 3 variants", flush=True)
    variants = [
        run_variant("tiktoken+model", servers, log_dir, bodies, "--kv-events", "off"),
        run_variant(
            "tokenizer+model",
            servers,
            log_dir,
            bodies,
            "--tokenizer",
            tok,
            "--block-tokens",
            str(PAGE_SIZE),
            "--kv-events",
            "off",
        ),
        run_variant(
            "tokenizer+events",
            servers,
            log_dir,
            bodies,
            "--tokenizer",
            tok,
            "--block-tokens",
            str(PAGE_SIZE),
        ),
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "sglang_version": sglang_version,
        "requests": len(bodies),
        "variants": variants,
        "setup": (
            "2 SGLang servers on CPU (tiny random Llama, page size 16, 20k-token KV each); "
            "the multi-turn conversations among the Mooncake conversation trace's first 600 "
            "requests, 512-token blocks scaled to 16 words, sent one at a time in trace order; "
            "taken by `make e2e` on a shared 2-core box"
        ),
    }
    (RESULTS / "e2e_sglang.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("e2e bench: wrote benchmarks/results/e2e_sglang.json", flush=True)

    bench: dict[str, Any] = {"sglang_version": sglang_version, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = sharegpt_file(Path(tmp) / "sharegpt.json")
        router = start_router(
            servers, log_dir, "--tokenizer", tok, "--block-tokens", str(PAGE_SIZE)
        )
        try:
            for dataset in ("random", "generated-shared-prefix"):
                for target, url in (("router", router.url), ("direct", servers[0].url)):
                    for s in servers:
                        post(s.url + "/flush_cache")
                    out = Path(tmp) / f"{dataset}-{target}.jsonl"
                    summary = bench_serving(url, model, dataset, out, data)
                    summary.update(dataset=dataset, target=target)
                    bench["runs"].append(summary)
                    print(
                        f"  bench_serving {dataset:24s} {target:7s} completed "
                        f"{summary.get('completed')} errors {summary['errors']} "
                        f"median TTFT {summary.get('median_ttft_ms', 0):.1f} ms",
                        flush=True,
                    )
        finally:
            stop_router(router.proc)
    bench["setup"] = (
        "bench_serving --backend sglang, 32 prompts, max concurrency 4; router = prefix-router "
        "in front of 2 CPU servers, direct = one server; shared 2-core box"
    )
    (RESULTS / "e2e_bench_serving.json").write_text(json.dumps(bench, indent=2) + "\n")
    failed = [r for r in bench["runs"] if r["errors"] or r.get("completed") != 32]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
