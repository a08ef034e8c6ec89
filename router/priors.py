"""The router's starting belief about a backend whose performance profile the operator named.

`serve --profile NAME` (live) and the simulator both build each backend's `PerfPrior` here, from
the same roofline profiles the simulated backends run (`backends.sim.perf`), so a live router
and a simulated one start from the same belief. Calibration (`router.core.cost`) corrects it
from what each backend actually does.
"""

from __future__ import annotations

from backends.sim.perf import Profile, get_profile
from router.core.model import PerfPrior

__all__ = ["prior_from_profile", "prior_named"]


def prior_from_profile(profile: Profile) -> PerfPrior:
    """Read the prior off the profile's own time functions, so it matches the roofline.

    One new token on a context of c computes c attention pairs, so the slope of
    prefill_time(1, c) in c is the cost of one pair; decode is linear in the batch's KV.
    """
    per_token = profile.prefill_time(1, 1)
    per_pair = (profile.prefill_time(1, 100_001) - per_token) / 100_000
    step_s, per_kv_token = profile.decode_coefficients()
    return PerfPrior(
        prefill_tokens_per_s=1.0 / per_token,
        prefill_s_per_token_ctx=max(per_pair, 0.0),
        decode_step_s=step_s,
        decode_s_per_kv_token=per_kv_token,
    )


def prior_named(name: str) -> PerfPrior:
    """The prior of a named profile (KeyError listing the known names if unknown)."""
    return prior_from_profile(get_profile(name))
