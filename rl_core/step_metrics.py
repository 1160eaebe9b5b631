"""What one training step did: `StepMetrics` and the bookkeeping that fills it.

`Trainer.step` (trainer.py) runs one iteration's optimizer steps; each forward pass adds its
per-token sums to a `Measures`, each mini-batch's step is an `OptimizerStep`, and
`fill_step_metrics` turns them into the iteration's `StepMetrics` (the `train/...` metrics the
run logs). `SKIPPED_STEP_METRICS` lists what a skipped step still reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rl_core.losses import LossStats, logprob_mismatch

# What a skipped step still reports (`StepMetrics.recorded`): why nothing trained, and how much was left out.
SKIPPED_STEP_METRICS = (
    "train/step_skipped",
    "rollout/stale_dropped",
    "train/episodes",
    "train/loss_tokens",
    "train/nonfinite_step",
    "train/nonfinite_reward_dropped",
    "train/truncated_masked",
    "train/no_loss_token_episodes",
    "train/reasoning_masked_tokens",
)


@dataclass
class StepMetrics:
    """What one training step (one iteration's optimizer steps) did; names follow the tracking conventions.

    `skipped` is None when at least one optimizer step was applied, else the reason in plain
    words (then `policy.version`, the weights and the optimizer state did not change). With
    several optimizer steps, `loss` and `grad_norm` are means over the applied steps and the
    per-token statistics are token-weighted over their forward passes.
    """

    step: int
    loss: float
    clip_fraction: float
    approx_kl: float
    entropy: float
    grad_norm: float
    loss_tokens: int
    episodes: int
    stale_dropped: int
    logprob_mismatch_mean: float = 0.0
    logprob_mismatch_max: float = 0.0
    ref_kl: float = 0.0
    is_weight_mean: float = 1.0
    skipped: str | None = None
    optimizer_steps: int = 0
    nonfinite_steps: int = 0
    nonfinite_reward_dropped: int = 0
    truncated_masked: int = 0
    no_loss_token_episodes: int = 0
    reasoning_masked_tokens: int = 0  # reasoning tokens left out of the loss (algorithm.reasoning_in_loss false)

    @property
    def step_skipped(self) -> bool:
        """True when no optimizer step was applied (see `skipped` for why)."""
        return self.skipped is not None

    def as_dict(self) -> dict[str, float]:
        """Every metric by its tracking name (`train/...`, `rollout/stale_dropped`), counts as floats."""
        return {
            "train/loss": self.loss,
            "train/clip_fraction": self.clip_fraction,
            "train/approx_kl": self.approx_kl,
            "train/entropy": self.entropy,
            "train/grad_norm": self.grad_norm,
            "train/loss_tokens": float(self.loss_tokens),
            "train/episodes": float(self.episodes),
            "rollout/stale_dropped": float(self.stale_dropped),
            "train/logprob_mismatch_mean": self.logprob_mismatch_mean,
            "train/logprob_mismatch_max": self.logprob_mismatch_max,
            "train/ref_kl": self.ref_kl,
            "train/is_weight_mean": self.is_weight_mean,
            "train/step_skipped": 1.0 if self.skipped is not None else 0.0,
            "train/optimizer_steps": float(self.optimizer_steps),
            "train/nonfinite_step": float(self.nonfinite_steps),
            "train/nonfinite_reward_dropped": float(self.nonfinite_reward_dropped),
            "train/truncated_masked": float(self.truncated_masked),
            "train/no_loss_token_episodes": float(self.no_loss_token_episodes),
            "train/reasoning_masked_tokens": float(self.reasoning_masked_tokens),
        }

    def recorded(self) -> dict[str, float]:
        """The metrics that mean something for this step: all of `as_dict()` for an applied step; for a
        skipped one only the counts (`SKIPPED_STEP_METRICS`), since its loss, clip fraction... are no step's."""
        values = self.as_dict()
        return values if self.skipped is None else {k: v for k, v in values.items() if k in SKIPPED_STEP_METRICS}


@dataclass
class Measures:
    """Additive per-token statistics of forward passes (sums; divide by the token counts)."""

    stats: LossStats = field(default_factory=lambda: LossStats(0.0, 0.0, 0.0, 0.0))
    entropy_sum: float = 0.0
    mismatch_sum: float = 0.0
    mismatch_tokens: float = 0.0
    mismatch_max: float = 0.0

    def add(self, other: Measures) -> None:
        """Add `other`'s sums to these (the mismatch maximum is the larger of the two)."""
        self.stats = self.stats + other.stats
        self.entropy_sum += other.entropy_sum
        self.mismatch_sum += other.mismatch_sum
        self.mismatch_tokens += other.mismatch_tokens
        self.mismatch_max = max(self.mismatch_max, other.mismatch_max)


@dataclass
class OptimizerStep:
    """One mini-batch's optimizer step: its loss, pre-clip grad norm, statistics and whether it was applied."""

    loss: float
    grad_norm: float
    measures: Measures
    applied: bool
    problem: str | None = None


def fill_step_metrics(metrics: StepMetrics, steps: list[OptimizerStep], measured: Measures, version: int) -> None:
    """Aggregate one iteration's optimizer `steps` into `metrics` (means over the applied ones; per-token
    statistics token-weighted), with the mismatch `measured` on the starting weights and the policy
    `version` after the steps; sets `metrics.skipped` when no step was applied."""
    applied = [s for s in steps if s.applied]
    totals = Measures()
    for s in applied:
        totals.add(s.measures)
    tokens = max(totals.stats.tokens, 1.0)
    metrics.step = version
    metrics.optimizer_steps = len(applied)
    metrics.nonfinite_steps = len(steps) - len(applied)
    metrics.loss = sum(s.loss for s in applied) / len(applied) if applied else 0.0
    metrics.grad_norm = sum(s.grad_norm for s in applied) / len(applied) if applied else 0.0
    metrics.clip_fraction = totals.stats.clipped_tokens / tokens
    metrics.approx_kl = totals.stats.approx_kl_sum / tokens
    metrics.entropy = totals.entropy_sum / tokens
    metrics.ref_kl = totals.stats.ref_kl_sum / tokens
    metrics.is_weight_mean = totals.stats.is_weight_sum / tokens if applied else 1.0
    metrics.logprob_mismatch_mean = measured.mismatch_sum / max(measured.mismatch_tokens, 1.0)
    metrics.logprob_mismatch_max = measured.mismatch_max
    if not applied:
        problems = "; ".join(dict.fromkeys(s.problem for s in steps if s.problem))
        metrics.skipped = f"every optimizer step had a {problems}" if len(steps) > 1 else problems


def add_mismatch(logprobs: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, measures: Measures) -> None:
    """Add |trainer - token sampler| log-prob gaps on mask tokens ([batch, length] tensors) to `measures`."""
    mean_abs, max_abs = logprob_mismatch(logprobs, behavior, mask)
    tokens = float(mask.sum())
    measures.mismatch_sum += mean_abs * tokens
    measures.mismatch_tokens += tokens
    measures.mismatch_max = max(measures.mismatch_max, max_abs)
