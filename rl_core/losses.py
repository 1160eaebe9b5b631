"""Policy losses: pure tensor functions over per-token log-probs.

`ppo_clipped_loss` is the PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347)
with the clip given as BOUNDS ON THE RATIO r = pi_new / pi_old (default 0.8 and 1.2), not
as an epsilon:

    loss_t = -min(r_t * A_t, clamp(r_t, low, high) * A_t)
    loss   = sum_t(mask_t * loss_t) / total_loss_tokens

Only tokens with mask 1 (the policy's own generated tokens) count. The sum is divided by
`total_loss_tokens`, the count over the WHOLE batch, so summing the losses of micro-batches
gives exactly the loss (and gradient) of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    """Token sums for metrics; divide by the token count to average (all detached)."""

    clipped_tokens: float
    approx_kl_sum: float
    ratio_sum: float
    tokens: float


def ppo_clipped_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    total_loss_tokens: float,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate summed over masked tokens, divided by the batch-wide token count."""
    mask = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, clip_low, clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    loss = (per_token * mask).sum() / max(float(total_loss_tokens), 1.0)
    with torch.no_grad():
        is_clipped = (clipped < unclipped) & (mask > 0)
        approx_kl = (ratio - 1.0) - log_ratio  # k3 estimator of KL(pi_old || pi_new), >= 0
        stats = LossStats(
            clipped_tokens=float(is_clipped.sum()),
            approx_kl_sum=float((approx_kl * mask).sum()),
            ratio_sum=float((ratio * mask).sum()),
            tokens=float(mask.sum()),
        )
    return loss, stats
