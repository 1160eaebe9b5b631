"""The training doctor: symptoms of a failing multi-turn RL run, read from its metric history.

Contract
--------
`diagnose(history, cfg)` runs after every training step. `history` is the run's metric entries
in step order: each trained step's dict has "step" (the policy version after the step),
"iteration", the rollout metrics of `rl_core.metrics.rollout_metrics` for the batch that step
trained on, and the train metrics of `StepMetrics.as_dict`; "val/pass_at_1" appears only on
steps where a held-out evaluation ran, and a first entry {"step": 0, "val/pass_at_1": ...} may
hold the step-0 evaluation. Any key may be missing (and NaN counts as missing): a check without
the data it needs stays quiet. It returns one `Finding` per symptom seen at the latest step
(none when `cfg.doctor.enabled` is false), each naming the metric that triggered it, the value
compared, the threshold it crossed and the first change to try. Nothing here reads files, logs
or acts: the caller reports findings and decides what to do (`cfg.doctor.on_collapse`).

Windowed values are means over the last `doctor.window` entries that hold the metric; a windowed
check waits until it has a full window (the best reward a collapse is measured against may also
come from the partial windows of the first steps, so a collapse within the first window is seen).
Rewards in the entry of step s were earned by policy s-1
(the batch step s trained on).

After a rollback, pass the history without the abandoned steps (those after the step rolled back
to), or the collapsed stretch keeps the collapse in the window.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rl_core.config import RunConfig
from rl_core.doctor.history import (
    best_window,
    fitted_change,
    is_number,
    latest_step,
    mean_of,
    metric_series,
    series_values,
    window_mean,
)

SYMPTOMS = (
    "reward_flat",
    "zero_variance_groups",
    "reward_hacking",
    "reward_collapse",
    "token_cap",
    "grad_norm_pinned",
    "nonfinite_step",
)

REWARD = "rollout/reward/mean"
ZERO_VARIANCE = "analysis/zero_variance_groups"
ZERO_VARIANCE_ALL_CORRECT = "analysis/zero_variance_groups/all_correct"
ZERO_VARIANCE_ALL_WRONG = "analysis/zero_variance_groups/all_wrong"
TOKEN_CAP = "rollout/finish/token_cap"
GRAD_NORM = "train/grad_norm"
VAL_PASS_AT_1 = "val/pass_at_1"
NONFINITE_STEP = "train/nonfinite_step"

# reward_flat: "not moved" = the fitted linear change since the first step is within this many
# standard errors of zero; reward_hacking: the training reward's rise must exceed as many.
FLAT_STANDARD_ERRORS = 2.0
# reward_collapse: the best windowed reward must exceed this before a fall counts as a collapse.
COLLAPSE_MIN_BEST = 0.05
# reward_hacking: held-out pass@1 gaining less than this fraction of the training reward gain is "flat".
HACKING_VAL_GAIN_FRACTION = 0.25
# grad_norm_pinned: a norm within this relative distance below the clip counts as at the clip.
CLIP_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Finding:
    """One symptom seen at `step`: `metric` gave `value`, which crossed `threshold`."""

    symptom: str
    step: int
    metric: str
    value: float
    threshold: float
    message: str
    first_change: str

    def as_dict(self) -> dict:
        """The finding as JSON-ready data (iteration records, the flow's summary)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """The finding `as_dict` wrote. Raises TypeError for missing or unknown fields."""
        return cls(**data)

    def describe(self) -> str:
        """One log line: step, symptom, metric=value (threshold), message, first change."""
        return (
            f"step {self.step} {self.symptom}: {self.metric}={self.value:.4g} (threshold {self.threshold:.4g}). "
            f"{self.message} First change: {self.first_change}"
        )


def diagnose(history: Sequence[Mapping[str, float]], cfg: RunConfig) -> list[Finding]:
    """Every symptom the history shows at its latest step, in SYMPTOMS order."""
    if not cfg.doctor.enabled or not history:
        return []
    step = latest_step(history)
    checks = (
        _reward_flat,
        _zero_variance_groups,
        _reward_hacking,
        _reward_collapse,
        _token_cap,
        _grad_norm_pinned,
        _nonfinite_step,
    )
    return [finding for check in checks if (finding := check(history, cfg, step)) is not None]


# --- the checks -------------------------------------------------------------------------------


def _reward_flat(history, cfg: RunConfig, step: int) -> Finding | None:
    """Training reward whose fitted change since the first step is within its noise."""
    d = cfg.doctor
    rewards = metric_series(history, REWARD)
    if len(rewards) < max(d.flat_reward_steps, 3):
        return None
    change, standard_error = fitted_change(rewards)
    tolerance = FLAT_STANDARD_ERRORS * standard_error
    if abs(change) > tolerance:
        return None
    zero_variance = window_mean(history, ZERO_VARIANCE, d.window)
    share_text = f"; {zero_variance:.0%} of groups have all-equal rewards" if zero_variance is not None else ""
    return Finding(
        symptom="reward_flat",
        step=step,
        metric=REWARD,
        value=abs(change),
        threshold=tolerance,
        message=(
            f"Training reward has not moved in {len(rewards)} steps: the fitted change since step {rewards[0][0]} is "
            f"{change:+.3f}, within {FLAT_STANDARD_ERRORS:g} standard errors ({tolerance:.3f}); "
            f"latest {d.window}-step mean {mean_of(series_values(rewards[-d.window :])):.3f}{share_text}."
        ),
        first_change=_flat_advice(cfg, zero_variance),
    )


def _flat_advice(cfg: RunConfig, zero_variance: float | None) -> str:
    """No signal in the groups: resample them; otherwise a larger or less noisy step."""
    if zero_variance is not None and zero_variance > 0.5:
        return (
            "most groups have all-equal rewards, so there is no signal: check the reward varies (rollout/reward/std) "
            "and set algorithm.zero_variance_groups=resample"
        )
    return (
        f"raise optimizer.lr (now {cfg.optimizer.lr:.2g}, e.g. x3) if the policy barely changes, or raise "
        f"rollout.global_batch_size (now {cfg.rollout.global_batch_size}) if the per-step reward is noisy"
    )


def _zero_variance_groups(history, cfg: RunConfig, step: int) -> Finding | None:
    """Most groups with all-equal rewards (no advantage, no learning signal)."""
    d = cfg.doctor
    share = window_mean(history, ZERO_VARIANCE, d.window)
    if share is None or share <= d.zero_variance_groups_max:
        return None
    correct = window_mean(history, ZERO_VARIANCE_ALL_CORRECT, d.window)
    wrong = window_mean(history, ZERO_VARIANCE_ALL_WRONG, d.window)
    split = f" ({correct:.0%} all correct, {wrong:.0%} all wrong)" if correct is not None and wrong is not None else ""
    return Finding(
        symptom="zero_variance_groups",
        step=step,
        metric=ZERO_VARIANCE,
        value=share,
        threshold=d.zero_variance_groups_max,
        message=f"{share:.0%} of groups over the last {d.window} steps have all-equal rewards{split}, above "
        f"{d.zero_variance_groups_max:.0%}.",
        first_change=_zero_variance_advice(cfg, correct, wrong),
    )


def _zero_variance_advice(cfg: RunConfig, correct: float | None, wrong: float | None) -> str:
    """Which change fits the kind of zero-variance group that dominates."""
    sampling = (
        "raise algorithm.max_resample_rounds"
        if cfg.algorithm.zero_variance_groups == "resample"
        else "set algorithm.zero_variance_groups=resample"
    )
    common = f"{sampling} or raise rollout.group_size (now {cfg.rollout.group_size})"
    if correct is not None and wrong is not None and correct > wrong:
        return (
            "the tasks are too easy for the policy: train "
            "on harder tasks (environment.domains / environment.train_split); "
            f"{common}"
        )
    if correct is not None and wrong is not None and wrong > correct:
        return (
            "the tasks are too hard for the policy: train on easier tasks or start from a stronger (SFT) "
            f"policy.path; {common}"
        )
    return common


def _reward_hacking(history, cfg: RunConfig, step: int) -> Finding | None:
    """Training reward rising over the evaluated span while held-out pass@1 stays flat or falls."""
    d = cfg.doctor
    evals = metric_series(history, VAL_PASS_AT_1)
    if len(evals) < 2:
        return None
    (first_step, first_val), (last_step, last_val) = evals[0], evals[-1]
    # the batches sampled by policies first_step .. last_step - 1
    span = [(s, value) for s, value in metric_series(history, REWARD) if first_step < s <= last_step]
    if len(span) < 3:
        return None
    gain, standard_error = fitted_change(span)
    val_gain = last_val - first_val
    rising = gain >= d.hacking_min_gain and gain > FLAT_STANDARD_ERRORS * standard_error
    if not rising or val_gain >= HACKING_VAL_GAIN_FRACTION * gain:
        return None
    return Finding(
        symptom="reward_hacking",
        step=step,
        metric=REWARD,
        value=gain,
        threshold=d.hacking_min_gain,
        message=(
            f"Training reward rose by {gain:.3f} (fitted, +-{standard_error:.3f}) between steps {first_step} "
            f"and {last_step} "
            f"while held-out {VAL_PASS_AT_1} went {first_val:.3f} -> {last_val:.3f} ({val_gain:+.3f})."
        ),
        first_change=(
            "audit the reward: re-score this run's stored trajectories with `turnstile replay --scorer "
            "...` and read the "
            "high-reward episodes that fail held-out; then tighten the environment's reward (or raise "
            "evaluation.success_threshold) before training on"
        ),
    )


def _reward_collapse(history, cfg: RunConfig, step: int) -> Finding | None:
    """Windowed training reward fallen below collapse_frac x its best windowed value."""
    d = cfg.doctor
    rewards = metric_series(history, REWARD)
    best = best_window(rewards, d.window)
    if len(rewards) < d.window or best is None or best[1] <= COLLAPSE_MIN_BEST:
        return None
    best_step, best_mean = best
    current = mean_of(series_values(rewards[-d.window :]))
    threshold = d.collapse_frac * best_mean
    if current >= threshold:
        return None
    return Finding(
        symptom="reward_collapse",
        step=step,
        metric=REWARD,
        value=current,
        threshold=threshold,
        message=(
            f"Training reward over the last {d.window} steps averages {current:.3f}, below {d.collapse_frac:g} "
            "x its best "
            f"windowed mean {best_mean:.3f} (window ending at step {best_step}); last good step {best_step - 1}."
        ),
        first_change=_collapse_advice(cfg),
    )


def _collapse_advice(cfg: RunConfig) -> str:
    """CISPO on off-policy data: go on-policy first, then PPO's clipping. CISPO with several optimizer
    steps per batch (mini-batches / epochs): the ratio moves within the batch, so PPO's clip acts.
    Otherwise a smaller step: a synchronous run taking one optimizer step per batch it sampled has a
    ratio pi_new/pi_old of about 1, so CISPO's weights and PPO's clip change nothing, and only the
    step size is left."""
    a, o, lr = cfg.algorithm, cfg.optimizer, cfg.optimizer.lr
    lower_lr = f"lower optimizer.lr (now {lr:.2g}, e.g. to {lr / 3:.2g})"
    steps = o.mini_batches_per_step * o.epochs_per_batch
    if a.loss_fn == "cispo" and cfg.rollout.overlap_collection:
        return (
            "set rollout.overlap_collection=false and algorithm.max_steps_off_policy=0; if it still collapses, "
            "switch to algorithm.loss_fn=ppo with clip_low_threshold=0.8, clip_high_threshold=1.2"
        )
    if a.loss_fn == "cispo" and steps > 1:
        return (
            "switch to algorithm.loss_fn=ppo with clip_low_threshold=0.8, clip_high_threshold=1.2: this "
            f"run takes {steps} "
            "optimizer steps per batch (optimizer.mini_batches_per_step x optimizer.epochs_per_batch), "
            "so the ratio moves "
            f"away from 1 within a batch and PPO's clip bounds the later steps; or {lower_lr}"
        )
    if a.loss_fn == "cispo":
        return (
            f"{lower_lr}: this run samples on-policy (rollout.overlap_collection=false) and takes one step per batch, "
            "so CISPO's ratio weights are about 1 and neither "
            "algorithm.max_steps_off_policy=0 nor algorithm.loss_fn=ppo "
            "would change the update"
        )
    return f"{lower_lr} and roll back to the last good step"


def _token_cap(history, cfg: RunConfig, step: int) -> Finding | None:
    """Responses clustering at the per-turn token cap."""
    d = cfg.doctor
    share = window_mean(history, TOKEN_CAP, d.window)
    if share is None or share <= d.token_cap_frac_max:
        return None
    first_step, first_share = metric_series(history, TOKEN_CAP)[0]
    return Finding(
        symptom="token_cap",
        step=step,
        metric=TOKEN_CAP,
        value=share,
        threshold=d.token_cap_frac_max,
        message=(
            f"{share:.0%} of episodes over the last {d.window} steps ended at the per-turn token cap "
            f"({cfg.rollout.max_tokens_per_turn} tokens), above {d.token_cap_frac_max:.0%} ({first_share:.0%} "
            f"at step {first_step})."
        ),
        first_change=_token_cap_advice(cfg, first_share),
    )


def _token_cap_advice(cfg: RunConfig, first_share: float) -> str:
    """At the cap from the start: the cap is too tight. Drifted there while training: the policy
    is degenerating (rambling), which a larger cap would only postpone."""
    r = cfg.rollout
    if first_share > cfg.doctor.token_cap_frac_max:
        return (
            f"raise rollout.max_tokens_per_turn (now {r.max_tokens_per_turn}; the context budget allows up to "
            f"{_largest_turn_cap(cfg)} with policy.context_window {cfg.policy.context_window}) or add "
            "a length penalty to the reward"
        )
    return (
        f"the policy drifted to the cap while training (rambling, often before a collapse): lower optimizer.lr "
        f"(now {cfg.optimizer.lr:.2g}) or add a length penalty to the reward; raising rollout.max_tokens_per_turn "
        "would only postpone it"
    )


def _largest_turn_cap(cfg: RunConfig) -> int:
    """The largest max_tokens_per_turn the context budget allows with the other settings unchanged."""
    r, e = cfg.rollout, cfg.environment
    return (cfg.policy.context_window - e.prompt_tokens) // r.max_turns - e.expected_tool_output


def _grad_norm_pinned(history, cfg: RunConfig, step: int) -> Finding | None:
    """The pre-clip gradient norm at or above optimizer.grad_clip on most recent steps."""
    d, clip = cfg.doctor, cfg.optimizer.grad_clip
    norms = series_values(metric_series(history, GRAD_NORM)[-d.window :])
    if len(norms) < d.window:
        return None
    pinned = sum(norm >= clip * (1 - CLIP_TOLERANCE) for norm in norms) / len(norms)
    if pinned <= d.grad_clip_pinned_frac:
        return None
    return Finding(
        symptom="grad_norm_pinned",
        step=step,
        metric=GRAD_NORM,
        value=pinned,
        threshold=d.grad_clip_pinned_frac,
        message=(
            f"{GRAD_NORM} reached optimizer.grad_clip ({clip:g}) on {pinned:.0%} of the last {d.window} steps "
            f"(mean norm {mean_of(norms):.3g}): every update is clipped, so the step size is set by the "
            "clip, not the gradient."
        ),
        first_change=f"lower optimizer.lr (now {cfg.optimizer.lr:.2g}, e.g. to {cfg.optimizer.lr / 3:.2g})",
    )


def _nonfinite_step(history, cfg: RunConfig, step: int) -> Finding | None:
    """The latest step skipped optimizer steps whose loss or gradient norm was NaN or infinite."""
    skipped = history[-1].get(NONFINITE_STEP)
    if not is_number(skipped) or skipped <= 0:
        return None
    earlier = sum(1 for _, value in metric_series(history[:-1], NONFINITE_STEP) if value > 0)
    return Finding(
        symptom="nonfinite_step",
        step=step,
        metric=NONFINITE_STEP,
        value=float(skipped),
        threshold=0.0,
        message=(
            f"{skipped:g} optimizer step(s) of this iteration had a non-finite loss or gradient norm and were skipped "
            f"(weights and optimizer state unchanged; {earlier} earlier step(s) of the run had the same)."
        ),
        first_change=_nonfinite_advice(cfg),
    )


def _nonfinite_advice(cfg: RunConfig) -> str:
    """A non-finite loss comes from the batch (behaviour log-probs, rewards) or from an overflowing update."""
    o, p = cfg.optimizer, cfg.policy
    precision = f"; train in policy.dtype=float32 or bfloat16 instead of {p.dtype}" if p.dtype == "float16" else ""
    return (
        "read this iteration's validation report and stored trajectories for non-finite behavior_logprobs or rewards "
        "(a token sampler or environment fault); if the batch is clean the update overflowed: lower optimizer.lr "
        f"(now {o.lr:.2g}, e.g. to {o.lr / 3:.2g}) and keep optimizer.grad_clip (now {o.grad_clip:g}) "
        f"at 1 or below{precision}"
    )
