"""Time a model of a profile's shape on a real GPU and set it beside the roofline profile.

The simulator's speeds come from `backends/sim/perf.py`: a roofline with an assumed prefill MFU
and decode bandwidth efficiency. This script checks those assumptions on a lent GPU. Timings of
a transformer do not depend on what its weights say, so the model here has the profile's shape
(layers, hidden size, heads, KV heads, MLP width, vocabulary) and random BF16 weights: no
download, no trained checkpoint.

What one forward pass is made of (per layer, as in Llama): RMSNorm, the fused QKV projection,
rotary embedding, attention (PyTorch's scaled_dot_product_attention for prefill; for decode a
grouped-query attention over the whole cache written as two batched matmuls, which reads each
K/V byte once like a decode kernel does), the output projection, RMSNorm and the SwiGLU MLP.
Prefill computes logits for the last token only (as SGLang does); decode for every sequence.
Decode steps are captured in a CUDA graph, as SGLang's decode runs, and timed with CUDA events.

What it does not have, so figures are kernel times, not engine times: paged KV, FlashInfer's or
FlashAttention 3's kernels (PyTorch's SDPA picks its own), sampling, scheduling, detokenising.
The profile's `step_overhead_s` stands for exactly those, so decode is compared both with and
without it.

Two steps, because the GPU machine has torch and this one does not:

    python3 benchmarks/gpu_profile_check.py measure --out gpu.json     # on the GPU machine
    .venv/bin/python benchmarks/gpu_profile_check.py compare gpu.json \\
        --json benchmarks/results/gpu_profile_check.json               # here: the table

`measure --tiny` runs a toy shape on the CPU, to check the script without a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SHAPES", "Shape"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """A Llama-style decoder: what the timings depend on."""

    name: str
    profile: str  # the perf.py profile this shape stands for
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    note: str = ""

    def params(self) -> int:
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attn += self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.ffn
        return self.layers * (attn + mlp) + 2 * self.vocab * self.hidden


SHAPES = {
    "llama3-8b": Shape(
        name="llama3-8b",
        profile="llama3-8b-h100",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        ffn=14336,
        vocab=128256,
    ),
    # One GPU's share of Llama-3.1-70B under tensor parallel 4: a quarter of the heads, the KV
    # heads, the MLP width and the vocabulary. No all-reduce is timed (one GPU).
    "llama3-70b-tp4-shard": Shape(
        name="llama3-70b-tp4-shard",
        profile="llama3-70b-h100-tp4",
        layers=80,
        hidden=8192,
        heads=16,
        kv_heads=2,
        head_dim=128,
        ffn=7168,
        vocab=32064,
        note="one of four tensor-parallel shards; the all-reduces between them are not timed",
    ),
    "tiny": Shape(
        name="tiny",
        profile="llama3-8b-h100",
        layers=2,
        hidden=128,
        heads=4,
        kv_heads=2,
        head_dim=32,
        ffn=256,
        vocab=512,
    ),
}

# (new tokens, context tokens): uncached prompts, then chunks behind a cached prefix.
PREFILL_CASES = [
    (512, 512),
    (1024, 1024),
    (2048, 2048),
    (4096, 4096),
    (8192, 8192),
    (16384, 16384),
    (2048, 32768),
    (8192, 32768),
]
# (batch, context tokens per sequence) for decode steps.
DECODE_CASES = [(1, 2048), (8, 2048), (32, 2048), (64, 2048), (128, 2048), (16, 8192), (8, 32768)]
TINY_PREFILL = [(16, 16), (32, 64)]
TINY_DECODE = [(1, 32), (4, 64)]


# -- measure (needs torch) ------------------------------------------------------------------


def _measure(shape: Shape, device: str, repeats: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype) * 0.02

    hd, nh, nkv = shape.head_dim, shape.heads, shape.kv_heads
    qkv_out = (nh + 2 * nkv) * hd
    layers = [
        {
            "n1": torch.ones(shape.hidden, device=device, dtype=dtype),
            "wqkv": rand(shape.hidden, qkv_out),
            "wo": rand(nh * hd, shape.hidden),
            "n2": torch.ones(shape.hidden, device=device, dtype=dtype),
            "wgu": rand(shape.hidden, 2 * shape.ffn),
            "wd": rand(shape.ffn, shape.hidden),
        }
        for _ in range(shape.layers)
    ]
    final_norm = torch.ones(shape.hidden, device=device, dtype=dtype)
    lm_head = rand(shape.hidden, shape.vocab)

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def rotary(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        freqs = torch.outer(positions.float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def mlp(layer: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (shape.hidden,), layer["n2"])
        gate, up = (h @ layer["wgu"]).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ layer["wd"]

    def prefill_fn(new: int, ctx: int) -> Any:
        """One sequence: `new` tokens whose context ends at `ctx` (the rest is cached KV)."""
        x0 = rand(1, new, shape.hidden)
        cos, sin = rotary(torch.arange(ctx - new, ctx, device=device))
        # One K/V buffer of the whole context, shared by the layers (values do not matter):
        # the cached part is read once per layer, the new part written, as a paged cache would.
        # KV heads are stored expanded to query heads for SDPA, a small copy next to prefill.
        kbuf, vbuf = rand(1, nh, ctx, hd), rand(1, nh, ctx, hd)
        mask = causal_lower_right(new, ctx) if ctx > new else None

        def run() -> None:
            x = x0
            for layer in layers:
                h = F.rms_norm(x, (shape.hidden,), layer["n1"])
                q, k, v = (h @ layer["wqkv"]).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q = rope(q.view(1, new, nh, hd), cos[:, None], sin[:, None]).transpose(1, 2)
                k = rope(k.view(1, new, nkv, hd), cos[:, None], sin[:, None]).transpose(1, 2)
                v = v.view(1, new, nkv, hd).transpose(1, 2)
                kbuf[:, :, ctx - new :] = k.repeat_interleave(nh // nkv, dim=1)
                vbuf[:, :, ctx - new :] = v.repeat_interleave(nh // nkv, dim=1)
                if mask is None:
                    a = F.scaled_dot_product_attention(q, kbuf, vbuf, is_causal=True)
                else:
                    a = F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=mask)
                x = x + a.transpose(1, 2).reshape(1, new, nh * hd) @ layer["wo"]
                x = mlp(layer, x)
            F.rms_norm(x[:, -1], (shape.hidden,), final_norm) @ lm_head

        return run

    def decode_step_fn(batch: int, ctx: int) -> Any:
        """A closure running one decode step over static tensors (graph-capturable)."""
        x = rand(batch, 1, shape.hidden)
        caches = [(rand(batch, nkv, ctx, hd), rand(batch, nkv, ctx, hd)) for _ in layers]
        cos, sin = rotary(torch.full((1,), ctx - 1, device=device))
        group = nh // nkv
        scale = hd**-0.5

        def step() -> None:
            y = x
            for layer, (kc, vc) in zip(layers, caches, strict=True):
                h = F.rms_norm(y, (shape.hidden,), layer["n1"])
                q, k, v = (h @ layer["wqkv"]).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q = rope(q.view(batch, nh, hd), cos, sin)
                k = rope(k.view(batch, nkv, hd), cos, sin)
                kc[:, :, ctx - 1] = k
                vc[:, :, ctx - 1] = v.view(batch, nkv, hd)
                # Grouped-query attention: each KV head serves `group` query rows.
                qg = q.view(batch, nkv, group, hd)
                scores = torch.matmul(qg, kc.transpose(-1, -2)) * scale
                a = torch.matmul(scores.float().softmax(-1).to(dtype), vc)
                y = y + a.reshape(batch, 1, nh * hd) @ layer["wo"]
                y = mlp(layer, y)
            F.rms_norm(y[:, -1], (shape.hidden,), final_norm) @ lm_head

        return step

    def timed(fn: Any, n: int, warmup: int = 2) -> float:
        """Median seconds of fn() over n runs after warm-up."""
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(n):
            if device == "cuda":
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    tiny = shape.name == "tiny"
    out: dict[str, Any] = {"shape": asdict(shape), "params": shape.params()}
    with torch.inference_mode():
        out["prefill"] = []
        for new, ctx in TINY_PREFILL if tiny else PREFILL_CASES:
            s = timed(prefill_fn(new, ctx), repeats)
            if device == "cuda":
                torch.cuda.empty_cache()
            out["prefill"].append({"new_tokens": new, "context_tokens": ctx, "seconds": s})
            print(f"  prefill new={new:>6} ctx={ctx:>6}: {s * 1e3:8.2f} ms", flush=True)
        out["decode"] = []
        for batch, ctx in TINY_DECODE if tiny else DECODE_CASES:
            step = decode_step_fn(batch, ctx)
            eager = timed(step, repeats)
            graph_s = None
            if device == "cuda":
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    step()
                torch.cuda.current_stream().wait_stream(side)
                cuda_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(cuda_graph):
                    step()
                graph_s = timed(cuda_graph.replay, 5 * repeats)
                del cuda_graph
            out["decode"].append(
                {
                    "batch": batch,
                    "context_tokens": ctx,
                    "eager_seconds": eager,
                    "graph_seconds": graph_s,
                }
            )
            shown = graph_s if graph_s is not None else eager
            print(f"  decode batch={batch:>4} ctx={ctx:>6}: {shown * 1e3:8.3f} ms", flush=True)
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def _gemm_tflops(device: str) -> float:
    """Dense BF16 8192^3 matrix product rate on random data: the chip's practical peak."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    end.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def _copy_tbps(device: str) -> float:
    """Device-to-device copy rate (bytes read + written): the chip's practical bandwidth."""
    import torch

    src = torch.empty(4 * 1024**3, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def measure(args: argparse.Namespace) -> int:
    import torch

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --tiny for a CPU check of the script", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shapes": [],
    }
    if device == "cuda":
        result["gemm_bf16_tflops"] = _gemm_tflops(device)
        result["copy_tb_per_s"] = _copy_tbps(device)
        print(
            f"gemm {result['gemm_bf16_tflops']:.0f} TFLOP/s, "
            f"copy {result['copy_tb_per_s']:.2f} TB/s"
        )
    names = ["tiny"] if args.tiny else args.shapes
    for name in names:
        print(f"{name}:", flush=True)
        result["shapes"].append(_measure(SHAPES[name], device, args.repeats))
        if device == "cuda":
            torch.cuda.empty_cache()  # the shape's weights went with _measure's frame
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


# -- compare (no torch; the profiles) -------------------------------------------------------


def _gpu_profile(profile_name: str, device: str) -> Any:
    """The profile's model on the GPU that was measured (datasheet figures of that GPU)."""
    import dataclasses

    from backends.sim.perf import get_profile

    base = get_profile(profile_name)
    if "H200" not in device:
        return base
    # H200 SXM: the H100's compute (989 TFLOP/s dense BF16) with 4.8 TB/s of HBM3e.
    per_gpu = base.hbm_bytes_per_s / 3.35e12
    return dataclasses.replace(base, hbm_bytes_per_s=4.8e12 * per_gpu)


def compare(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    measured = json.loads(Path(args.measured).read_text())
    device = measured["device"]
    rows: list[dict[str, Any]] = []
    for shape_result in measured["shapes"]:
        shape = shape_result["shape"]
        profile = _gpu_profile(shape["profile"], device)
        for p in shape_result["prefill"]:
            new, ctx = p["new_tokens"], p["context_tokens"]
            predicted = profile.prefill_time(new, ctx)
            rows.append(
                {
                    "shape": shape["name"],
                    "phase": "prefill",
                    "case": f"{new} new / {ctx} ctx",
                    "measured_s": p["seconds"],
                    "profile_s": predicted,
                    "ratio": p["seconds"] / predicted,
                    # Across the TP group for a shard: its quarter of the FLOPs on a quarter of
                    # the peak, the same fraction.
                    "measured_mfu": profile.prefill_flops(new, ctx)
                    / p["seconds"]
                    / profile.peak_flops,
                    "measured_tokens_per_s": new / p["seconds"],
                }
            )
        for d in shape_result["decode"]:
            batch, ctx = d["batch"], d["context_tokens"]
            kernel = d["graph_seconds"] if d["graph_seconds"] is not None else d["eager_seconds"]
            read = profile.decode_read_time(batch * ctx)
            bytes_read = profile.weight_bytes() + batch * ctx * profile.kv_bytes_per_token()
            rows.append(
                {
                    "shape": shape["name"],
                    "phase": "decode",
                    "case": f"batch {batch} x {ctx} ctx",
                    "measured_s": kernel,
                    "eager_s": d["eager_seconds"],
                    "profile_s": read,
                    "profile_step_s": profile.decode_step_time(batch, batch * ctx),
                    "ratio": kernel / read,
                    "measured_bw_efficiency": bytes_read / kernel / profile.hbm_bytes_per_s,
                }
            )
    report = {
        "device": device,
        "torch": measured["torch"],
        "gemm_bf16_tflops": measured.get("gemm_bf16_tflops"),
        "copy_tb_per_s": measured.get("copy_tb_per_s"),
        "rows": rows,
    }
    print(f"device: {device} (torch {measured['torch']})")
    if report["gemm_bf16_tflops"]:
        print(
            f"8192^3 BF16 GEMM {report['gemm_bf16_tflops']:.0f} TFLOP/s; "
            f"D2D copy {report['copy_tb_per_s']:.2f} TB/s"
        )
    print(
        f"{'shape':<22} {'phase':<8} {'case':<22} {'measured ms':>11} {'profile ms':>10} "
        f"{'meas/prof':>9} {'MFU or BW eff':>13}"
    )
    for r in rows:
        eff = r.get("measured_mfu", r.get("measured_bw_efficiency"))
        print(
            f"{r['shape']:<22} {r['phase']:<8} {r['case']:<22} {r['measured_s'] * 1e3:>11.2f} "
            f"{r['profile_s'] * 1e3:>10.2f} {r['ratio']:>9.2f} {eff:>13.2f}"
        )
    if args.json:
        from router.replay.metrics import write_json

        write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time the shapes on this machine's GPU (needs torch)")
    m.add_argument("--out", required=True, help="where to write the raw timings (JSON)")
    m.add_argument(
        "--shapes",
        nargs="+",
        default=["llama3-8b", "llama3-70b-tp4-shard"],
        choices=[s for s in SHAPES if s != "tiny"],
    )
    m.add_argument("--repeats", type=int, default=10, help="timed runs per case (median taken)")
    m.add_argument("--tiny", action="store_true", help="a toy shape on the CPU: checks the script")
    c = sub.add_parser("compare", help="set raw timings beside the profiles (no torch needed)")
    c.add_argument("measured", help="the JSON that `measure` wrote")
    c.add_argument("--json", help="write the comparison here")
    args = parser.parse_args(argv)
    return measure(args) if args.command == "measure" else compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
