"""A pure-torch stand-in for `sgl_kernel`, enough for SGLang 0.5.23's CPU path in `make e2e`.

The registry has no CPU build of sgl_kernel; SGLang's CPU engine calls one function from it,
`assign_req_to_token_pool_cpu`. Every other name resolves to a function that raises
NotImplementedError when called, so a code path we did not expect fails loudly, not silently.
Only on PYTHONPATH of the e2e SGLang servers; never imported by the router.
"""

from __future__ import annotations

from typing import Any

import torch

__version__ = "0.0.0+e2e-stub"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """req_to_token[req, start:end] = the next slice of out_cache_loc, request by request.

    SGLang passes the row width (`req_to_token.shape[1]`) last; the slices say it all here.
    """
    pos = 0
    for i in range(int(req_pool_indices.shape[0])):
        start = int(start_offset[i])
        end = int(end_offset[i])
        length = end - start
        req_to_token[int(req_pool_indices[i]), start:end] = out_cache_loc[pos : pos + length]
        pos += length


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name} has no CPU stand-in (make e2e stub)")

    return missing
