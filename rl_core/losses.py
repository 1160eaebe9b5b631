"""Policy losses: pure tensor functions over per-token log-probs.

Every tensor is [batch, length] with one row per sequence (episode); `mask` is 1 on the tokens
the policy generated and 0 on prompt, environment and padding tokens (any value > 0 counts as 1).
Masked tokens never reach the loss, its gradient or the statistics, whatever values they hold.

Ratio r_t = pi_new / pi_old = exp(logp_t - old_logp_t). The clip arguments are BOUNDS ON THE
RATIO (PPO 0.8 / 1.2), not epsilons. Per-token losses, selected by `loss_fn`:

- `importance_sampling`: ratio-weighted policy gradient, no clipping
      l_t = -r_t * A_t
- `ppo`: clipped surrogate (Schulman et al. 2017, arXiv:1707.06347)
      l_t = -min(r_t * A_t, clamp(r_t, low, high) * A_t)
  with the dual-clip bound c = `clip_ratio_dual` (Ye et al. 2020, "Mastering Complex Control
  in MOBA Games with Deep Reinforcement Learning", arXiv:1912.09729) on tokens with A_t < 0:
      l_t = -max(min(r_t * A_t, clamp(r_t, low, high) * A_t), c * A_t)
  For A_t < 0 the plain surrogate is -A_t * max(r_t, clamp(r_t)), unbounded as r_t grows (a
  token the policy now likes far more than the token sampler did); the dual clip caps it at -c * A_t
  and gives such a token no gradient. c > 1 (None = off); tokens with A_t >= 0 are unchanged.
- `cispo`: clipped IS-weight policy optimisation (MiniMax-M1, arXiv:2506.13585)
      l_t = -sg(clamp(r_t, low, high)) * A_t * logp_t
  sg = stop-gradient: the gradient flows through logp_t only, so a clipped token still gets
  gradient (unlike PPO). The paper clips only from above (no lower bound); with our ratio-bound
  convention that is `clip_low=0`. The usual (1.0, 6.0) also lifts weights below 1 up to 1.

The log-ratio logp_t - old_logp_t is clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND] = [-20, 20]
before `exp` (as verl's `compute_policy_loss` does "for stability"), so r_t lies in
[2e-9, 4.9e8]: one stale token whose log-probs moved by hundreds of nats cannot turn the loss
into inf, nor its gradient into NaN (exp's backward would multiply 0 by inf). Outside the bound
the ratio is constant, so such a token gets no gradient through r_t. Every in-range token is
unaffected (a ratio beyond e^20 is far outside any clip bound anyway). The KL term's log-ratio
ref_t - logp_t is bounded the same way.

Aggregation over the masked per-token values v_t, selected by `aggregation`:

- `token_mean`:          sum_{i,t} v_it / total_tokens
- `seq_mean_token_sum`:  sum_i (sum_t v_it) / total_sequences
- `seq_mean_token_mean`: sum_i (sum_t v_it / n_i) / total_sequences,  n_i = mask tokens of row i

`total_tokens` and `total_sequences` are counts over the WHOLE batch (all micro-batches), so
summing the losses of micro-batches split by whole sequences gives exactly the loss and gradient
of the one big batch, in every mode. (`seq_mean_token_mean` breaks if one sequence is split
across micro-batches: each part would be averaged over its own token count.) A row without mask
tokens contributes 0 (it still counts in `total_sequences` if the caller counts it there). Totals
below 1 are treated as 1.

Optional terms:

- `is_weights`: detached per-token multipliers on the policy term (truncated importance sampling
  for the token-sampler/trainer mismatch, see `truncated_is_weights`); the KL term is not reweighted.
- KL penalty against a reference policy: kl_coef * k3_t aggregated like the policy term, with
  Schulman's k3 estimator of KL(pi || pi_ref) (http://joschu.net/blog/kl-approx.html)
      k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (>= 0)
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, get_args

import torch

LossFn = Literal["importance_sampling", "ppo", "cispo"]
LossAggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
LOSS_FUNCTIONS: tuple[LossFn, ...] = get_args(LossFn)
AGGREGATIONS: tuple[LossAggregation, ...] = get_args(LossAggregation)
LOG_RATIO_BOUND = 20.0  # |log r| is clamped to this before exp (module docstring)


@dataclass
class LossStats:
    """Sums over mask tokens for metrics (all detached); divide by `tokens` to average.

    Every field is additive, so `a + b` accumulates micro-batches.
    """

    clipped_tokens: (
        float  # tokens whose policy term was changed by the clip, dual clip included (0 for importance_sampling)
    )
    approx_kl_sum: float  # sum of k3 KL(pi_old || pi_new) = (r - 1) - log r
    ratio_sum: float  # sum of r = pi_new / pi_old
    tokens: float  # mask tokens
    is_weight_sum: float = 0.0  # sum of is_weights (= tokens when no correction is applied)
    ref_kl_sum: float = 0.0  # sum of k3 KL(pi || pi_ref), before kl_coef (0 without ref_logprobs)
    kl_penalty: float = 0.0  # the KL term's share of the returned loss (kl_coef * aggregated k3)
    dual_clipped_tokens: float = (
        0.0  # ppo tokens with A < 0 whose term the dual-clip bound replaced (also in clipped_tokens)
    )

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


def policy_loss(
    loss_fn: LossFn,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: LossAggregation = "token_mean",
    total_tokens: float,
    total_sequences: float,
    is_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_ratio_dual: float | None = 3.0,
) -> tuple[torch.Tensor, LossStats]:
    """The scalar loss of `loss_fn` aggregated by `aggregation` (see the module docstring), and its stats.

    Tensors are [batch, length]. `clip_ratio_dual` is ppo's dual-clip bound c on tokens with a
    negative advantage (None = off; ignored by the other losses). Differentiable in `logprobs`
    only. Raises ValueError naming the argument on an unknown name, bad clip bounds, a
    clip_ratio_dual <= 1, a negative kl_coef, kl_coef > 0 without ref_logprobs, or mismatched shapes.
    """
    if loss_fn not in LOSS_FUNCTIONS:
        raise ValueError(f"loss_fn must be one of {LOSS_FUNCTIONS}, got {loss_fn!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if not 0.0 <= clip_low <= clip_high:
        raise ValueError(f"clip_low and clip_high must satisfy 0 <= clip_low <= clip_high, got {clip_low}, {clip_high}")
    if clip_ratio_dual is not None and not clip_ratio_dual > 1.0:
        raise ValueError(f"clip_ratio_dual must be > 1 (or None = off), got {clip_ratio_dual}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef > 0")
    _check_shapes(
        logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        is_weights=is_weights,
        ref_logprobs=ref_logprobs,
    )

    active = mask > 0
    # Neutral values on masked tokens first, so that inf/huge values there cannot leak into the
    # loss or (through 0 * inf) into the gradient.
    log_ratio = torch.where(active, logprobs - old_logprobs, 0.0).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    adv = torch.where(active, advantages, 0.0)
    bounded_ratio = torch.clamp(ratio, clip_low, clip_high)

    dual_clipped = torch.zeros_like(active)
    if loss_fn == "importance_sampling":
        per_token = -ratio * adv
        clipped = torch.zeros_like(active)
    elif loss_fn == "ppo":
        unclipped_objective = ratio * adv
        clipped_objective = bounded_ratio * adv
        objective = torch.minimum(unclipped_objective, clipped_objective)
        clipped = clipped_objective < unclipped_objective
        if clip_ratio_dual is not None:
            dual_bound = clip_ratio_dual * adv
            dual_clipped = (adv < 0) & (objective < dual_bound)
            objective = torch.where(dual_clipped, dual_bound, objective)
            clipped = clipped | dual_clipped
        per_token = -objective
    else:  # cispo
        per_token = -bounded_ratio.detach() * adv * torch.where(active, logprobs, 0.0)
        clipped = bounded_ratio != ratio

    if is_weights is not None:
        per_token = per_token * torch.where(active, is_weights.detach(), 1.0)
    loss = _aggregate(per_token, active, aggregation, total_tokens, total_sequences)

    ref_kl = None
    if ref_logprobs is not None:
        ref_log_ratio = torch.where(active, ref_logprobs - logprobs, 0.0).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        ref_kl = torch.exp(ref_log_ratio) - ref_log_ratio - 1.0
    kl_term = None
    if ref_kl is not None and kl_coef > 0:
        kl_term = kl_coef * _aggregate(ref_kl, active, aggregation, total_tokens, total_sequences)
        loss = loss + kl_term

    with torch.no_grad():
        weight = active.to(ratio.dtype)
        tokens = float(weight.sum())
        stats = LossStats(
            clipped_tokens=float((clipped & active).sum()),
            approx_kl_sum=float((((ratio - 1.0) - log_ratio) * weight).sum()),
            ratio_sum=float((ratio * weight).sum()),
            tokens=tokens,
            is_weight_sum=tokens if is_weights is None else float(torch.where(active, is_weights, 0.0).sum()),
            ref_kl_sum=0.0 if ref_kl is None else float((ref_kl * weight).sum()),
            kl_penalty=0.0 if kl_term is None else float(kl_term),
            dual_clipped_tokens=float((dual_clipped & active).sum()),
        )
    return loss, stats


def truncated_is_weights(
    trainer_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Detached per-token weights min(exp(trainer_logp - behavior_logp), cap); 1 where mask is 0.

    Truncated importance sampling for the token-sampler/trainer mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"): pass the trainer's
    log-probs under the policy that sampled (the old log-probs), not the ones being optimised.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    _check_shapes(trainer_logprobs, behavior_logprobs=behavior_logprobs, mask=mask)
    with torch.no_grad():
        active = mask > 0
        log_weight = torch.where(active, trainer_logprobs - behavior_logprobs, 0.0)
        return torch.where(active, torch.exp(log_weight).clamp(max=cap), 1.0)


def logprob_mismatch(
    trainer_logprobs: torch.Tensor, behavior_logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """(mean, max) of |trainer_logp - behavior_logp| over mask tokens; (0.0, 0.0) without any."""
    _check_shapes(trainer_logprobs, behavior_logprobs=behavior_logprobs, mask=mask)
    with torch.no_grad():
        diff = (trainer_logprobs - behavior_logprobs).abs()[mask > 0]
        if diff.numel() == 0:
            return 0.0, 0.0
        return float(diff.mean()), float(diff.max())


def _aggregate(
    per_token: torch.Tensor,
    active: torch.Tensor,
    aggregation: LossAggregation,
    total_tokens: float,
    total_sequences: float,
) -> torch.Tensor:
    """Reduce masked per-token values to a scalar with global denominators (module docstring)."""
    masked = torch.where(active, per_token, 0.0)
    if aggregation == "token_mean":
        return masked.sum() / max(float(total_tokens), 1.0)
    sequence_sums = masked.sum(dim=-1)
    if aggregation == "seq_mean_token_mean":
        sequence_sums = sequence_sums / active.sum(dim=-1).clamp(min=1)
    return sequence_sums.sum() / max(float(total_sequences), 1.0)


def _check_shapes(reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}")
