"""Roofline performance profiles: how long one engine step takes on a given model and GPU.

A `Profile` holds a model's shape and a GPU's datasheet figures plus two efficiency factors,
and derives every time the engine needs from them, as pure functions:

* **Prefill** is compute-bound. A chunk of `new` tokens whose context ends at `ctx` tokens costs
  ``2 * params * new`` FLOPs for the dense layers plus ``4 * n_layers * n_heads * head_dim``
  FLOPs per (query, key) pair for attention. A causal chunk attends to the ``ctx - new`` tokens
  before it and to itself (a triangle), so the pairs are
  ``new * (ctx - new) + new * (new + 1) / 2``: attention grows like ``new * ctx``.
  Time = FLOPs / (peak_flops * mfu).
* **Decode** is bandwidth-bound. One step reads every weight once plus the KV cache of every
  sequence in the batch: time = (params * dtype_bytes + batch_kv_tokens * kv_bytes_per_token) /
  (hbm_bytes_per_s * bw_efficiency) + step_overhead_s. It is linear in the batch's KV tokens,
  which is what lets the engine jump over runs of decode steps in closed form.
* **Host tier** (HiCache): a prefix kept in host memory is copied back at h2d_bytes_per_s.

Simplifications (each one errs in a known direction):
* Decode compute is ignored: at very large batches (hundreds of sequences on an H100) a real
  step turns compute-bound and is slower than modelled.
* Prefill and attention share one MFU; FlashAttention's real efficiency differs somewhat.
* A mixed step (prefill chunks plus one decode token for every running request, see
  `engine.py`) costs the sum of its prefill time and its decode time: weights are counted as
  read twice, a small overestimate (a few ms next to a prefill chunk of tens of ms).
* `step_overhead_s` (scheduling, kernel launches, sampling) is paid once per step.

Every profile lists its sources (model shape, datasheet) and assumptions (MFU, efficiencies,
KV pool size); `prefix-router profiles` prints the derived figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["PROFILES", "Profile", "get_profile"]

# Context length used for the "single-stream decode" summary figure.
_SUMMARY_PROMPT_TOKENS = 2048


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """Roofline model of one model on one GPU (or one tensor-parallel group)."""

    name: str
    description: str
    sources: tuple[str, ...]
    assumptions: tuple[str, ...]
    params: float
    n_layers: int
    n_kv_heads: int
    head_dim: int
    dtype_bytes: int
    peak_flops: float
    mfu: float
    hbm_bytes_per_s: float
    bw_efficiency: float
    step_overhead_s: float
    kv_capacity_tokens: int  # device pool (what /get_server_info max_total_num_tokens says)
    host_capacity_tokens: int = 0  # HiCache host pool; 0 = no host tier
    h2d_bytes_per_s: float = 0.0
    n_heads: int = 0  # query heads (attention FLOPs); 0 = same as n_kv_heads
    context_length: int = 131072  # what /get_model_info reports
    # PD disaggregation: each server's link for KV transfer to or from its peers. Default: one
    # 400 Gb/s RDMA NIC per GPU (InfiniBand NDR, ConnectX-7 datasheet) at ~80% of line rate.
    kv_link_bytes_per_s: float = 40e9

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("profile name must be non-empty")
        positive = {
            "params": self.params,
            "n_layers": self.n_layers,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "dtype_bytes": self.dtype_bytes,
            "peak_flops": self.peak_flops,
            "hbm_bytes_per_s": self.hbm_bytes_per_s,
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "context_length": self.context_length,
        }
        for field_name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{field_name} must be positive, got {value}")
        for field_name, frac in (("mfu", self.mfu), ("bw_efficiency", self.bw_efficiency)):
            if not 0 < frac <= 1:
                raise ValueError(f"{field_name} must be in (0, 1], got {frac}")
        if self.step_overhead_s < 0:
            raise ValueError("step_overhead_s must be non-negative")
        if not self.kv_link_bytes_per_s > 0:
            raise ValueError("kv_link_bytes_per_s must be positive")
        if self.host_capacity_tokens < 0 or self.h2d_bytes_per_s < 0 or self.n_heads < 0:
            raise ValueError("host_capacity_tokens, h2d_bytes_per_s, n_heads must be >= 0")
        if self.host_capacity_tokens > 0 and self.h2d_bytes_per_s <= 0:
            raise ValueError("a host tier needs a positive h2d_bytes_per_s")

    # -- derived figures -------------------------------------------------------------------

    @property
    def has_host_tier(self) -> bool:
        return self.host_capacity_tokens > 0

    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes

    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    def prefill_flops(self, new_tokens: int, context_tokens: int) -> float:
        """FLOPs of a prefill chunk of `new_tokens` whose context ends at `context_tokens`."""
        if new_tokens < 0 or context_tokens < new_tokens:
            raise ValueError(
                f"need 0 <= new_tokens <= context_tokens, got {new_tokens}, {context_tokens}"
            )
        pairs = new_tokens * (context_tokens - new_tokens) + new_tokens * (new_tokens + 1) / 2
        q_heads = self.n_heads or self.n_kv_heads
        attention = 4.0 * self.n_layers * q_heads * self.head_dim * pairs
        return 2.0 * self.params * new_tokens + attention

    def prefill_time(self, new_tokens: int, context_tokens: int) -> float:
        """Compute-bound time of one prefill chunk (no step overhead)."""
        return self.prefill_flops(new_tokens, context_tokens) / (self.peak_flops * self.mfu)

    def decode_read_time(self, batch_kv_tokens: int) -> float:
        """Bandwidth-bound part of a decode step: weights plus the batch's KV, read once."""
        byte_count = self.weight_bytes() + batch_kv_tokens * self.kv_bytes_per_token()
        return byte_count / (self.hbm_bytes_per_s * self.bw_efficiency)

    def decode_step_time(self, batch: int, batch_kv_tokens: int) -> float:
        """One decode step for `batch` sequences holding `batch_kv_tokens` KV tokens in all.

        `batch` does not enter the bandwidth roofline (decode compute is ignored); it is
        validated so that a step with no sequences is never priced.
        """
        if batch <= 0:
            raise ValueError("a decode step needs at least one sequence")
        return self.step_overhead_s + self.decode_read_time(batch_kv_tokens)

    def decode_coefficients(self) -> tuple[float, float]:
        """(a, c) with decode_step_time(b, kv) = a + c * kv: the engine's closed form."""
        denom = self.hbm_bytes_per_s * self.bw_efficiency
        a = self.step_overhead_s + self.weight_bytes() / denom
        return (a, self.kv_bytes_per_token() / denom)

    def host_load_time(self, tokens: int) -> float:
        """Copying `tokens` of KV from the host pool back to the GPU."""
        if tokens <= 0:
            return 0.0
        if self.h2d_bytes_per_s <= 0:
            raise ValueError(f"profile {self.name} has no host tier")
        return tokens * self.kv_bytes_per_token() / self.h2d_bytes_per_s

    def lone_prefill_time(self, prompt_tokens: int) -> float:
        """TTFT of a lone uncached prompt that fits one chunk: one step's overhead plus prefill."""
        return self.step_overhead_s + self.prefill_time(prompt_tokens, prompt_tokens)

    def summary(self) -> dict[str, float | int | str]:
        """The figures worth putting beside published measurements."""
        n = _SUMMARY_PROMPT_TOKENS
        single_step = self.decode_step_time(1, n)
        return {
            "name": self.name,
            "description": self.description,
            "prefill_tokens_per_s_2048": n / self.lone_prefill_time(n),
            "ttft_s_2048": self.lone_prefill_time(n),
            "decode_tokens_per_s_single": 1.0 / single_step,
            "decode_step_s_single": single_step,
            "decode_step_s_batch64_ctx2048": self.decode_step_time(64, 64 * n),
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "kv_capacity_tokens": self.kv_capacity_tokens,
            "host_capacity_tokens": self.host_capacity_tokens,
            "host_load_tokens_per_s": (
                self.h2d_bytes_per_s / self.kv_bytes_per_token() if self.has_host_tier else 0.0
            ),
            "context_length": self.context_length,
        }


# -- the profiles ---------------------------------------------------------------------------

_LLAMA31_8B_SOURCES = (
    "Llama-3.1-8B config.json (meta-llama/Llama-3.1-8B-Instruct on Hugging Face): 32 layers, "
    "hidden 4096, 32 query heads, 8 KV heads, head_dim 128, 8.03e9 parameters",
    "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, 80 GB",
    "SGLang server_args: mem_fraction_static ~0.88 on an 80 GB GPU; the KV pool is what is "
    "left after weights (reported as max_total_num_tokens)",
)
_H100_8B_ASSUMPTIONS = (
    "prefill MFU 0.5 (large-chunk BF16 GEMMs on H100 reach about half of peak)",
    "decode bandwidth efficiency 0.85 of the datasheet HBM bandwidth",
    "1 ms fixed overhead per step (scheduling, launches, sampling; CUDA graphs on)",
    "KV pool 409,600 tokens: 0.88 x 80 GB - 16 GB of weights ~ 54 GB at 128 KiB/token, "
    "rounded to 50 GiB (the project's 8-GPU analysis assumes 8 x 409,600 tokens)",
)
_H100_KV_TOKENS = 409_600


def _llama31_8b_h100() -> Profile:
    return Profile(
        name="llama3-8b-h100",
        description="Llama-3.1-8B BF16 on one H100 SXM 80GB",
        sources=_LLAMA31_8B_SOURCES,
        assumptions=_H100_8B_ASSUMPTIONS,
        params=8.03e9,
        n_layers=32,
        n_kv_heads=8,
        n_heads=32,
        head_dim=128,
        dtype_bytes=2,
        peak_flops=989e12,
        mfu=0.5,
        hbm_bytes_per_s=3.35e12,
        bw_efficiency=0.85,
        step_overhead_s=1e-3,
        kv_capacity_tokens=_H100_KV_TOKENS,
    )


def _llama31_8b_h100_hicache() -> Profile:
    base = _llama31_8b_h100()
    return dataclasses.replace(
        base,
        name="llama3-8b-h100-hicache",
        description="Llama-3.1-8B BF16 on one H100 SXM 80GB, with a HiCache host pool 4x the GPU's",
        sources=(
            *base.sources,
            "PCIe Gen5 x16: ~64 GB/s per direction theoretical (PCI-SIG); H100 SXM hosts use it",
            "SGLang HiCache (hierarchical cache): --enable-hierarchical-cache, host pool sized "
            "as a ratio of the device pool (--hicache-ratio)",
        ),
        assumptions=(
            *base.assumptions,
            "host pool 4 x 409,600 = 1,638,400 tokens (~200 GiB of pinned host memory)",
            "host-to-device copies reach ~25 GB/s effective (~40% of PCIe Gen5 x16 theoretical: "
            "page-granular copies, pinned memory, sharing the link)",
            "a host hit is copied back before the request's first prefill chunk and stalls that "
            "step (real HiCache overlaps the copy with compute layer by layer: pessimistic)",
        ),
        host_capacity_tokens=4 * base.kv_capacity_tokens,
        h2d_bytes_per_s=25e9,
    )


def _llama31_8b_a100() -> Profile:
    return dataclasses.replace(
        _llama31_8b_h100(),
        name="llama3-8b-a100",
        description="Llama-3.1-8B BF16 on one A100 SXM 80GB",
        sources=(
            _LLAMA31_8B_SOURCES[0],
            "NVIDIA A100 SXM4 80GB datasheet: 312 TFLOP/s dense BF16, 2.039 TB/s HBM2e",
            _LLAMA31_8B_SOURCES[2],
        ),
        assumptions=(
            "prefill MFU 0.55 (A100 GEMMs run closer to peak than H100's)",
            "decode bandwidth efficiency 0.85",
            "1.5 ms fixed overhead per step",
            "KV pool 409,600 tokens, as for the H100 (same 80 GB)",
        ),
        peak_flops=312e12,
        mfu=0.55,
        hbm_bytes_per_s=2.039e12,
        bw_efficiency=0.85,
        step_overhead_s=1.5e-3,
    )


def _llama31_70b_h100_tp4() -> Profile:
    return Profile(
        name="llama3-70b-h100-tp4",
        description="Llama-3.1-70B BF16 on four H100 SXM 80GB, tensor parallel 4",
        sources=(
            "Llama-3.1-70B config.json (meta-llama/Llama-3.1-70B-Instruct): 80 layers, hidden "
            "8192, 64 query heads, 8 KV heads, head_dim 128, 70.6e9 parameters",
            "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 and 3.35 TB/s per GPU, x4",
        ),
        assumptions=(
            "prefill MFU 0.4 across the TP group (all-reduce cost)",
            "decode bandwidth efficiency 0.75 (all-reduce latency per layer)",
            "3 ms fixed overhead per step",
            "KV pool 420,000 tokens: 4 x 0.88 x 80 GB - 141 GB of weights ~ 140 GB at "
            "320 KiB/token ~ 428k, rounded down for activations",
        ),
        params=70.6e9,
        n_layers=80,
        n_kv_heads=8,
        n_heads=64,
        head_dim=128,
        dtype_bytes=2,
        peak_flops=4 * 989e12,
        mfu=0.4,
        hbm_bytes_per_s=4 * 3.35e12,
        bw_efficiency=0.75,
        step_overhead_s=3e-3,
        kv_capacity_tokens=420_000,
    )


def _build() -> Mapping[str, Profile]:
    profiles = [
        _llama31_8b_h100(),
        _llama31_8b_h100_hicache(),
        _llama31_8b_a100(),
        _llama31_70b_h100_tp4(),
    ]
    return MappingProxyType({p.name: p for p in profiles})


PROFILES: Mapping[str, Profile] = _build()


def get_profile(name: str) -> Profile:
    """The named profile; unknown names raise KeyError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise KeyError(f"unknown profile {name!r}; known profiles: {known}") from None
