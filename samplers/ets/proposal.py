r"""ETS-IS (``specs/ets.md`` §5): what a rollout proposal must satisfy, and the clipping of the
importance log-ratio.

Rollouts may come from a cheaper ``proposal`` policy instead of ``p_ref``; each then carries the
ratio ``ρ = p_ref(z | c) / q(z | c)`` over its rollout tokens (see
:mod:`~tiltsample.samplers.ets.rollout`). The ratio needs one vocabulary and one EOS, and, on a
masked-diffusion policy, the exact path-marginal ``completion_logprob`` of both policies.
``is_log_ratio_clip`` clips the summed log-ratio as the reference code does: biased, off by
default, and reported.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tiltsample.diffusion import is_masked_diffusion
from tiltsample.target import TiltedTarget

__all__ = ["check_proposal", "clip_log_ratio"]


def check_proposal(target: TiltedTarget, proposal: Any) -> None:
    """A rollout proposal must be the same kind of policy with the same vocabulary and EOS."""
    if proposal is None:
        return
    diffusion = is_masked_diffusion(target.policy)
    if diffusion != is_masked_diffusion(proposal):
        kind = "MaskedDiffusionPolicy" if diffusion else "ReferencePolicy"
        raise TypeError(f"proposal must be a {kind} like the target's policy")
    if not diffusion:
        for attr in ("vocab_size", "eos_id", "next_logprobs"):
            if not hasattr(proposal, attr):
                raise TypeError(f"proposal must implement ReferencePolicy; missing {attr!r}")
    if proposal.vocab_size != target.vocab_size:
        raise ValueError(
            f"proposal has vocab_size={proposal.vocab_size} but the target's policy has "
            f"{target.vocab_size}: the importance ratio p_ref/p_proposal needs one vocabulary"
        )
    if proposal.eos_id != target.eos_id:
        raise ValueError(
            f"proposal has eos_id={proposal.eos_id} but the target's policy has {target.eos_id}"
        )
    if diffusion:
        pol = target.policy
        for attr in ("mask_id", "length", "num_steps"):
            if getattr(proposal, attr) != getattr(pol, attr):
                raise ValueError(
                    f"a masked-diffusion proposal must have the same {attr} as the target's "
                    f"policy ({getattr(pol, attr)}), got {getattr(proposal, attr)}"
                )
        for who, obj in (("the target's policy", pol), ("proposal", proposal)):
            if not callable(getattr(obj, "completion_logprob", None)):
                raise ValueError(
                    f"exact ETS-IS on a masked-diffusion policy needs completion_logprob on "
                    f"{who} (the sampler's path-marginal law, specs/ets.md §5); without it "
                    "the importance ratio is intractable"
                )


def clip_log_ratio(log_ratio: Tensor, clip: float | None) -> tuple[Tensor, int]:
    """Clip to ``[-clip, clip]`` (None: unchanged); also return how many entries were clipped."""
    if clip is None:
        return log_ratio, 0
    hit = (log_ratio > clip) | (log_ratio < -clip)
    return log_ratio.clamp(min=-clip, max=clip), int(hit.sum())
