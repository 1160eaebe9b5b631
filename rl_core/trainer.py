"""Policy-gradient training on a batch of episodes: one `Trainer.step` per iteration.

`Trainer.step(episodes)`:
1. selects what to train on (`select_episodes`): drops env_error episodes, episodes whose
   reward or a reward component is not finite (never trained on, whatever the environment
   layer did), stale ones
   (sampled more than `max_steps_off_policy` policy versions before this iteration started),
   truncated ones listed in `algorithm.mask_truncated`, and, when configured, groups whose
   rewards are all equal (zero-variance groups; and groups too small for grpo_passk);
2. computes advantages over what is left (`algorithm.advantage_method`, see advantages.py):
   one per policy turn, applied to that turn's generated tokens (prompt and environment
   tokens are masked);
3. feeds only the episodes that have loss tokens to the model, split into
   `optimizer.mini_batches_per_step` mini-batches of whole groups, each taking one optimizer
   step, for `optimizer.epochs_per_batch` passes; within a mini-batch the episodes are sorted
   by length and cut into micro-batches of `optimizer.micro_batch_size` (so short episodes are
   not padded to long ones), whose losses (`algorithm.loss_fn`, `algorithm.loss_aggregation`,
   see losses.py) use the mini-batch's denominators, so the accumulated gradient equals the
   one-big-mini-batch gradient;
4. per mini-batch: clips the gradient norm and takes an AdamW step, unless the loss or the
   gradient norm is not finite: then the step is skipped (weights and optimizer state
   untouched, a warning logged, `train/nonfinite_step` counted). `policy.version` counts the
   optimizer steps applied.
Backward, clipping and the step go through a backend (backends.py, `trainer.backend`): plain
torch, or DeepSpeed (ZeRO) taking the same update.

Log-probs and entropies are those of the distribution each episode was sampled from,
softmax(logits / T), with T the episode's recorded `sampling.temperature` (see
`training_temperature`). pi_old in the ratio is the token sampler's `behavior_logprobs`, or, with
`tis_cap`, the trainer's own log-probs under the iteration's starting weights, with the token
sampler's gap as a capped per-token weight. The mismatch between the token sampler's and the trainer's log-probs
is measured on forward passes made with the iteration's starting weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from rl_core.advantages import compute_advantages
from rl_core.config import AlgorithmConfig, OptimizerConfig, TrainerConfig
from rl_core.groups import group_episodes
from rl_core.losses import LossStats, logprob_mismatch, policy_loss, truncated_is_weights
from rl_core.model.backends import make_backend
from rl_core.model.policy import Policy
from rl_core.trajectory import Episode

log = logging.getLogger(__name__)


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

    @property
    def step_skipped(self) -> bool:
        """True when no optimizer step was applied (see `skipped` for why)."""
        return self.skipped is not None

    def as_dict(self) -> dict[str, float]:
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
        }

    def recorded(self) -> dict[str, float]:
        """The metrics that mean something for this step: all of `as_dict()` for an applied step; for a
        skipped one only the counts (`SKIPPED_STEP_METRICS`), since its loss, clip fraction... are no step's."""
        values = self.as_dict()
        return values if self.skipped is None else {k: v for k, v in values.items() if k in SKIPPED_STEP_METRICS}


def drop_zero_variance_groups(episodes: list[Episode], algorithm: AlgorithmConfig | None = None) -> list[Episode]:
    """The episodes of groups that are not zero-variance groups (groups whose rewards are all equal carry no
    learning signal: their group-relative advantages are 0).

    With `algorithm`, a group is judged by the members `select_episodes` judges it by (not
    env_error, a finite reward, not truncated and masked by `algorithm.mask_truncated`), so a group
    kept here is not then dropped by the trainer; every member of a kept group is returned.
    """
    judged = (
        episodes
        if algorithm is None
        else [
            e
            for e in episodes
            if e.finish_reason != "env_error" and finite_reward(e) and e.finish_reason not in algorithm.mask_truncated
        ]
    )
    signal = {g.group_id for g in group_episodes(judged) if not g.zero_variance}
    return [e for e in episodes if e.group_id in signal]


def groups_of_at_least(episodes: list[Episode], size: int) -> list[Episode]:
    """The episodes of groups with at least `size` members, in the order given."""
    kept = sorted(p for g in group_episodes(episodes) if g.size >= size for p in g.positions)
    return [episodes[p] for p in kept]


def make_optimizer(policy: Policy, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the configured numbers."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def training_temperature(episode: Episode, default: float) -> float:
    """The temperature T whose distribution softmax(logits / T) the episode's log-probs are trained under.

    The episode's recorded `sampling.temperature`, or `default` when none was recorded (schema
    version 1 batches, hand-built episodes). T = 0 (greedy) is trained as T = 1: greedy decoding
    samples from no distribution (its limit is a point mass, whose log-prob is 0 with no
    gradient), and the token sampler records greedy log-probs as log_softmax(logits), i.e. at T = 1
    (generation.py), so T = 1 keeps the trainer's log-probs equal to the recorded ones.
    """
    temperature = episode.sampling.temperature if episode.sampling is not None else default
    return 1.0 if temperature == 0 else float(temperature)


def token_logprobs(
    model: torch.nn.Module, tokens: torch.Tensor, attention: torch.Tensor, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token given its prefix under softmax(logits / T), and that distribution's entropy (nats).

    tokens, attention: [batch, length]; temperature: [batch] (T > 0 per row; None = 1 for all).
    Both results have shape [batch, length]; position 0 (no prefix) is 0.
    """
    logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
    if temperature is not None and bool((temperature != 1).any()):
        logits = logits / temperature.to(logits)[:, None, None]
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros_like(picked[:, :1])
    return torch.cat([pad, picked], dim=1), torch.cat([pad, entropy], dim=1)


def turn_rewards(episode: Episode) -> list[float]:
    """Reward credited to each policy turn: the episode reward on its last turn, 0 before.

    (Environments give only a final reward today; per-turn environment rewards slot in here.)
    """
    turns = max(episode.num_turns, 1)
    return [0.0] * (turns - 1) + [episode.reward]


def token_advantages(episode: Episode, per_turn: torch.Tensor) -> torch.Tensor:
    """Advantage of every token: each policy turn's tokens get that turn's advantage (the last one
    repeats for episode-level methods); prompt and environment tokens get 0 (they are masked anyway)."""
    out = torch.zeros(len(episode.tokens))
    assistant = [t for t in episode.turns if t.role == "assistant"]
    for index, turn in enumerate(assistant):
        out[turn.start : turn.end] = float(per_turn[min(index, len(per_turn) - 1)])
    return out


def pad_batch(
    episodes: list[Episode],
    advantages: list[torch.Tensor],
    pad_id: int,
    device: torch.device,
    default_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Right-pad episodes into tensors: tokens, attention, loss mask, old log-probs, token advantages
    ([batch, width], width = the longest episode) and each row's training temperature ([batch])."""
    width = max(len(e.tokens) for e in episodes)
    batch = {
        "tokens": torch.full((len(episodes), width), pad_id, dtype=torch.long),
        "attention": torch.zeros((len(episodes), width), dtype=torch.long),
        "mask": torch.zeros((len(episodes), width)),
        "old_logprobs": torch.zeros((len(episodes), width)),
        "advantages": torch.zeros((len(episodes), width)),
        "temperature": torch.tensor([training_temperature(e, default_temperature) for e in episodes]),
    }
    for row, (ep, adv) in enumerate(zip(episodes, advantages)):
        n = len(ep.tokens)
        batch["tokens"][row, :n] = torch.tensor(ep.tokens)
        batch["attention"][row, :n] = 1
        batch["mask"][row, :n] = torch.tensor(ep.loss_mask, dtype=torch.float)
        batch["old_logprobs"][row, :n] = torch.tensor(ep.behavior_logprobs, dtype=torch.float)
        batch["advantages"][row, :n] = token_advantages(ep, adv)
    return {k: v.to(device) for k, v in batch.items()}


# --- what a batch trains on ---------------------------------------------------------------------


@dataclass
class Selection:
    """The episodes a batch trains on (`train`, the set advantages are computed over) and counts of the rest."""

    train: list[Episode]
    received: int
    env_error: int = 0
    nonfinite_reward: int = 0
    stale: int = 0
    truncated_masked: int = 0
    zero_variance: int = 0
    small_groups: int = 0

    def nothing_left_reason(self, algorithm: AlgorithmConfig) -> str:
        """Why nothing is left to train on, in plain words (one clause per cause that removed episodes)."""
        if self.received == 0:
            return "nothing to train on: the batch is empty"
        causes = [
            (self.env_error, "env_error (environment failures)"),
            (self.nonfinite_reward, "given a non-finite reward (or reward component)"),
            (
                self.stale,
                f"stale (sampled more than algorithm.max_steps_off_policy={algorithm.max_steps_off_policy} "
                "policy versions ago)",
            ),
            (
                self.truncated_masked,
                f"truncated and masked (algorithm.mask_truncated={list(algorithm.mask_truncated)})",
            ),
            (
                self.zero_variance,
                "in groups whose rewards were all equal, dropped "
                f"(algorithm.zero_variance_groups={algorithm.zero_variance_groups})",
            ),
            (self.small_groups, f"in groups smaller than algorithm.pass_k={algorithm.pass_k}"),
        ]
        seen = [(count, what) for count, what in causes if count]
        if len(seen) == 1 and seen[0][0] == self.received:
            return f"nothing to train on: all {self.received} episodes were {seen[0][1]}"
        return f"nothing to train on: of {self.received} episodes, " + ", ".join(
            f"{count} {what}" for count, what in seen
        )


def finite_reward(episode: Episode) -> bool:
    """Whether the episode's reward and every reward component are finite (else an environment fault)."""
    return math.isfinite(episode.reward) and all(math.isfinite(v) for v in episode.reward_components.values())


def select_episodes(episodes: list[Episode], algorithm: AlgorithmConfig, version: int) -> Selection:
    """Which of `episodes` a step at policy `version` trains on (the module docstring's step 1), in order.

    Truncated episodes (`algorithm.mask_truncated`) leave before the zero-variance rule, so a group
    is judged by its judged members only; staleness is judged against `version`, once per batch.
    """
    out = Selection(train=[], received=len(episodes))
    kept = [e for e in episodes if e.finish_reason != "env_error"]
    out.env_error = len(episodes) - len(kept)
    finite = [e for e in kept if finite_reward(e)]
    out.nonfinite_reward = len(kept) - len(finite)
    fresh = [e for e in finite if version - e.policy_version <= algorithm.max_steps_off_policy]
    out.stale = len(finite) - len(fresh)
    judged = [e for e in fresh if e.finish_reason not in algorithm.mask_truncated]
    out.truncated_masked = len(fresh) - len(judged)
    kept = drop_zero_variance_groups(judged) if algorithm.zero_variance_groups != "keep" else judged
    out.zero_variance = len(judged) - len(kept)
    if algorithm.advantage_method == "grpo_passk":  # pass@k of a group needs k samples
        out.train = groups_of_at_least(kept, algorithm.pass_k)
    else:
        out.train = kept
    out.small_groups = len(kept) - len(out.train)
    return out


def split_mini_batches(episodes: list[Episode], count: int) -> list[list[int]]:
    """Indices of `episodes` cut into at most `count` mini-batches, deterministically.

    Whole groups in order of first appearance, in contiguous runs whose group counts differ by at
    most one; with fewer groups than `count`, whole episodes in batch order instead (and fewer
    mini-batches than `count` only when there are fewer episodes).
    """
    groups = group_episodes(episodes)
    units = [list(g.positions) for g in groups] if len(groups) >= count else [[i] for i in range(len(episodes))]
    parts = min(count, len(units))
    bounds = [round(k * len(units) / parts) for k in range(parts + 1)] if parts else [0]
    return [[i for unit in units[bounds[k] : bounds[k + 1]] for i in unit] for k in range(parts)]


def length_sorted_micro_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Positions 0..len(lengths)-1 sorted by length (ties by position) and cut into runs of `size`,
    so each micro-batch pads its episodes to a similar width."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start : start + size] for start in range(0, len(order), size)]


# --- one optimizer step ----------------------------------------------------------------------------


@dataclass
class Measures:
    """Additive per-token statistics of forward passes (sums; divide by the token counts)."""

    stats: LossStats = field(default_factory=lambda: LossStats(0.0, 0.0, 0.0, 0.0))
    entropy_sum: float = 0.0
    mismatch_sum: float = 0.0
    mismatch_tokens: float = 0.0
    mismatch_max: float = 0.0

    def add(self, other: Measures) -> None:
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


class Trainer:
    """Owns the optimizer and applies training steps to `policy` in place.

    `reference` (a frozen copy of the starting model) is needed only for the KL penalty.
    `trainer_cfg` picks the backend (default: plain torch). `optimizer` has torch's
    state_dict()/load_state_dict() (AdamW's per-parameter format) for checkpoints, whatever the backend.
    `temperature` is the sampling temperature assumed for episodes that carry no `sampling`
    record (schema version 1 batches, hand-built episodes); episodes that carry one are trained
    at their own (`training_temperature`; 0 = greedy is trained as 1). Raises ValueError for a
    KL penalty without a reference or a negative / non-finite temperature.
    """

    def __init__(
        self,
        policy: Policy,
        algorithm: AlgorithmConfig,
        optimizer: OptimizerConfig,
        reference: torch.nn.Module | None = None,
        trainer_cfg: TrainerConfig | None = None,
        temperature: float = 1.0,
    ):
        self.policy, self.algorithm, self.optim_cfg = policy, algorithm, optimizer
        if algorithm.kl_coef > 0 and reference is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        self.reference = reference
        self.temperature = temperature
        self.backend = make_backend(trainer_cfg, policy.model, make_optimizer(policy, optimizer), optimizer)
        self.optimizer = self.backend.optimizer

    def advantages(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """Per episode, one advantage per policy turn (episode-level methods give one for all turns).

        opo weights its baseline by generated tokens, which a group whose episodes generated none
        (e.g. all overflowed their context) does not have: such a group gets advantage 0 (it has no
        loss token to apply one to) and the other groups' advantages are unchanged.
        """
        if self.algorithm.advantage_method == "opo":
            silent = {p for g in group_episodes(episodes) if g.response_tokens == 0 for p in g.positions}
            if silent:
                kept = iter(self._advantages([e for p, e in enumerate(episodes) if p not in silent]))
                return [torch.zeros(1) if p in silent else next(kept) for p in range(len(episodes))]
        return self._advantages(episodes)

    def _advantages(self, episodes: list[Episode]) -> list[torch.Tensor]:
        if not episodes:
            return []
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
        return compute_advantages(
            self.algorithm.advantage_method,
            rewards,
            [e.group_id for e in episodes],
            token_counts=torch.tensor([e.response_tokens for e in episodes], dtype=torch.float64),
            turn_rewards=[turn_rewards(e) for e in episodes],
            normalize_std=self.algorithm.normalize_advantage_std,
            pass_k=self.algorithm.pass_k,
        )

    def step(self, episodes: list[Episode]) -> StepMetrics:
        """Train on one iteration's `episodes`: `optimizer.mini_batches_per_step` x `optimizer.epochs_per_batch`
        optimizer steps (see the module docstring). Never raises for what the batch holds: a batch with
        nothing to train on, or whose every step is non-finite, returns metrics with `skipped` set."""
        selection = select_episodes(episodes, self.algorithm, self.policy.version)
        train = selection.train
        fed = [i for i, e in enumerate(train) if e.response_tokens > 0]
        metrics = StepMetrics(
            step=self.policy.version,
            loss=0.0,
            clip_fraction=0.0,
            approx_kl=0.0,
            entropy=0.0,
            grad_norm=0.0,
            loss_tokens=sum(train[i].response_tokens for i in fed),
            episodes=len(train),
            stale_dropped=selection.stale,
            nonfinite_reward_dropped=selection.nonfinite_reward,
            truncated_masked=selection.truncated_masked,
            no_loss_token_episodes=len(train) - len(fed),
        )
        if not fed:
            reason = (
                selection.nothing_left_reason(self.algorithm)
                if not train
                else (f"nothing to train on: none of the {len(train)} episodes left has a generated (loss) token")
            )
            log.info("training step skipped: %s", reason)
            metrics.skipped = reason
            return metrics
        advantages = self.advantages(train)
        fed_episodes, fed_advantages = [train[i] for i in fed], [advantages[i] for i in fed]
        self._train_on(fed_episodes, fed_advantages, metrics)
        return metrics

    def _train_on(self, episodes: list[Episode], advantages: list[torch.Tensor], metrics: StepMetrics) -> None:
        """The optimizer steps of one iteration on `episodes` (all with loss tokens); fills `metrics`."""
        self.policy.model.train()
        plan = split_mini_batches(episodes, self.optim_cfg.mini_batches_per_step)
        planned = len(plan) * self.optim_cfg.epochs_per_batch
        start_logprobs, measured = None, Measures()
        if self.algorithm.tis_cap is not None and planned > 1:  # pi_old = the trainer at the iteration's start
            start_logprobs = self._start_logprobs(episodes, measured)
        steps: list[OptimizerStep] = []
        for _ in range(self.optim_cfg.epochs_per_batch):
            for indices in plan:
                measure_mismatch = start_logprobs is None and not any(s.applied for s in steps)
                step = self._optimizer_step(
                    [episodes[i] for i in indices],
                    [advantages[i] for i in indices],
                    None if start_logprobs is None else [start_logprobs[i] for i in indices],
                    measure_mismatch,
                )
                steps.append(step)
                if measure_mismatch:
                    measured.mismatch_sum += step.measures.mismatch_sum
                    measured.mismatch_tokens += step.measures.mismatch_tokens
                    measured.mismatch_max = max(measured.mismatch_max, step.measures.mismatch_max)
        self._fill_metrics(metrics, steps, measured)

    def _optimizer_step(
        self,
        episodes: list[Episode],
        advantages: list[torch.Tensor],
        start_logprobs: list[torch.Tensor] | None,
        measure_mismatch: bool,
    ) -> OptimizerStep:
        """Forward/backward one mini-batch in length-sorted micro-batches, then one optimizer step unless
        its loss or gradient norm is not finite (then nothing changes but the logged warning)."""
        self.backend.zero_grad()
        total_tokens = sum(e.response_tokens for e in episodes)
        measures, loss = Measures(), 0.0
        for chunk in length_sorted_micro_batches([len(e.tokens) for e in episodes], self.optim_cfg.micro_batch_size):
            batch = pad_batch(
                [episodes[i] for i in chunk],
                [advantages[i] for i in chunk],
                self.policy.chat.pad_id,
                self.policy.device,
                self.temperature,
            )
            if start_logprobs is not None:
                batch["start_logprobs"] = _pad_rows([start_logprobs[i] for i in chunk], batch["tokens"].shape[1]).to(
                    self.policy.device
                )
            loss += self._accumulate(batch, total_tokens, len(episodes), measures, measure_mismatch)
        if not math.isfinite(loss):
            self.backend.discard()
            return self._skip(loss, math.nan, measures, f"non-finite loss ({loss})")
        grad_norm = self.backend.step()  # clip to grad_clip, optimizer step; the norm before clipping
        if not math.isfinite(grad_norm):
            return self._skip(loss, grad_norm, measures, f"non-finite gradient norm ({grad_norm})")
        self.policy.version += 1
        return OptimizerStep(loss, grad_norm, measures, applied=True)

    def _skip(self, loss: float, grad_norm: float, measures: Measures, problem: str) -> OptimizerStep:
        log.warning(
            "optimizer step skipped at policy version %d: %s; weights and optimizer state left unchanged",
            self.policy.version,
            problem,
        )
        return OptimizerStep(loss, grad_norm, measures, applied=False, problem=problem)

    def _accumulate(
        self,
        batch: dict[str, torch.Tensor],
        total_tokens: int,
        total_sequences: int,
        measures: Measures,
        measure_mismatch: bool,
    ) -> float:
        """Forward and backward one micro-batch (gradients add up across micro-batches); returns its loss."""
        a = self.algorithm
        logprobs, entropy = token_logprobs(
            self.backend.model, batch["tokens"], batch["attention"], batch["temperature"]
        )
        mask, behavior = batch["mask"], batch["old_logprobs"]
        if measure_mismatch:
            _measure_mismatch(logprobs.detach(), behavior, mask, measures)
        old, is_weights = behavior, None
        if (
            a.tis_cap is not None
        ):  # pi_old = the trainer's own log-probs; the token sampler's gap becomes a capped weight
            old = batch.get("start_logprobs", logprobs.detach())
            is_weights = truncated_is_weights(old, behavior, mask, a.tis_cap)
        reference = None
        if a.kl_coef > 0:
            with torch.no_grad():
                reference, _ = token_logprobs(self.reference, batch["tokens"], batch["attention"], batch["temperature"])
        loss, stats = policy_loss(
            a.loss_fn,
            logprobs,
            old,
            batch["advantages"],
            mask,
            clip_low=a.clip_low_threshold,
            clip_high=a.clip_high_threshold,
            aggregation=a.loss_aggregation,
            total_tokens=total_tokens,
            total_sequences=total_sequences,
            is_weights=is_weights,
            ref_logprobs=reference,
            kl_coef=a.kl_coef,
            clip_ratio_dual=a.clip_ratio_dual,
        )
        self.backend.backward(loss)
        measures.stats = measures.stats + stats
        measures.entropy_sum += float((entropy * mask).sum())
        return float(loss.detach())

    def _start_logprobs(self, episodes: list[Episode], measured: Measures) -> list[torch.Tensor]:
        """Every episode's log-probs [len(tokens)] under the iteration's starting weights (no gradient), for
        tis_cap's pi_old across several optimizer steps; measures the token-sampler mismatch on the way."""
        out: list[torch.Tensor | None] = [None] * len(episodes)
        zeros = [torch.zeros(1)] * len(episodes)
        for chunk in length_sorted_micro_batches([len(e.tokens) for e in episodes], self.optim_cfg.micro_batch_size):
            batch = pad_batch(
                [episodes[i] for i in chunk],
                [zeros[i] for i in chunk],
                self.policy.chat.pad_id,
                self.policy.device,
                self.temperature,
            )
            with torch.no_grad():
                logprobs, _ = token_logprobs(
                    self.backend.model, batch["tokens"], batch["attention"], batch["temperature"]
                )
            _measure_mismatch(logprobs, batch["old_logprobs"], batch["mask"], measured)
            for row, i in enumerate(chunk):
                out[i] = logprobs[row, : len(episodes[i].tokens)].cpu()
        return out

    def _fill_metrics(self, metrics: StepMetrics, steps: list[OptimizerStep], measured: Measures) -> None:
        """Aggregate the iteration's optimizer steps into `metrics` (means over the applied ones)."""
        applied = [s for s in steps if s.applied]
        totals = Measures()
        for s in applied:
            totals.add(s.measures)
        tokens = max(totals.stats.tokens, 1.0)
        metrics.step = self.policy.version
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


def _measure_mismatch(logprobs: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor, measures: Measures) -> None:
    """Add |trainer - token sampler| log-prob gaps on mask tokens ([batch, length] tensors) to `measures`."""
    mean_abs, max_abs = logprob_mismatch(logprobs, behavior, mask)
    tokens = float(mask.sum())
    measures.mismatch_sum += mean_abs * tokens
    measures.mismatch_tokens += tokens
    measures.mismatch_max = max(measures.mismatch_max, max_abs)


def _pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """1-D tensors right-padded with 0 into one [len(rows), width] tensor."""
    out = torch.zeros((len(rows), width))
    for row, values in enumerate(rows):
        out[row, : len(values)] = values
    return out
