"""One optimizer step of policy-gradient training on a batch of episodes.

`Trainer.step(episodes)`:
1. drops env_error episodes, stale ones (sampled more than `max_steps_off_policy` policy
   versions ago) and, when configured, groups whose rewards are all equal;
2. computes advantages (`algorithm.advantage_method`, see advantages.py): one per policy
   turn, applied to that turn's generated tokens (prompt and environment tokens are masked);
3. recomputes the policy's log-probs in micro-batches of whole episodes and accumulates the
   policy loss (`algorithm.loss_fn`, `algorithm.loss_aggregation`, see losses.py) with
   batch-wide denominators, so the update equals the one-big-batch update;
4. clips the gradient norm, takes an AdamW step, and bumps `policy.version`.
Backward, clipping and the step go through a backend (backends.py, `trainer.backend`): plain
torch, or DeepSpeed (ZeRO) taking the same update.
pi_old in the ratio is the sampler's `behavior_logprobs`, or, with `tis_cap`, the trainer's
own log-probs with the sampler gap as a capped per-token weight. The mismatch between the
sampler's and the trainer's log-probs is measured every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_core.advantages import compute_advantages
from rl_core.backends import make_backend
from rl_core.config import AlgorithmConfig, OptimizerConfig, TrainerConfig
from rl_core.losses import LossStats, logprob_mismatch, policy_loss, truncated_is_weights
from rl_core.policy import Policy
from rl_core.trajectory import Episode


@dataclass
class StepMetrics:
    """What one training step did (names follow the tracking conventions)."""

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
        }


def informative(episodes: list[Episode]) -> list[Episode]:
    """The episodes of groups whose rewards are not all equal (the rest carry no learning signal)."""
    rewards: dict[str, set[float]] = {}
    for e in episodes:
        rewards.setdefault(e.group_id, set()).add(e.reward)
    return [e for e in episodes if len(rewards[e.group_id]) > 1]


def groups_of_at_least(episodes: list[Episode], size: int) -> list[Episode]:
    """The episodes of groups with at least `size` members."""
    counts: dict[str, int] = {}
    for e in episodes:
        counts[e.group_id] = counts.get(e.group_id, 0) + 1
    return [e for e in episodes if counts[e.group_id] >= size]


def make_optimizer(policy: Policy, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the configured numbers."""
    params = [p for p in policy.model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def token_logprobs(model: torch.nn.Module, tokens: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token given its prefix, and the entropy there.

    Both have shape [batch, length]; position 0 (no prefix) is 0.
    """
    logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
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
        out[turn.start:turn.end] = float(per_turn[min(index, len(per_turn) - 1)])
    return out


def pad_batch(episodes: list[Episode], advantages: list[torch.Tensor], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad episodes into tensors: tokens, attention, loss mask, old log-probs, token advantages."""
    width = max(len(e.tokens) for e in episodes)
    batch = {
        "tokens": torch.full((len(episodes), width), pad_id, dtype=torch.long),
        "attention": torch.zeros((len(episodes), width), dtype=torch.long),
        "mask": torch.zeros((len(episodes), width)),
        "old_logprobs": torch.zeros((len(episodes), width)),
        "advantages": torch.zeros((len(episodes), width)),
    }
    for row, (ep, adv) in enumerate(zip(episodes, advantages)):
        n = len(ep.tokens)
        batch["tokens"][row, :n] = torch.tensor(ep.tokens)
        batch["attention"][row, :n] = 1
        batch["mask"][row, :n] = torch.tensor(ep.loss_mask, dtype=torch.float)
        batch["old_logprobs"][row, :n] = torch.tensor(ep.behavior_logprobs, dtype=torch.float)
        batch["advantages"][row, :n] = token_advantages(ep, adv)
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    """Owns the optimizer and applies training steps to `policy` in place.

    `reference` (a frozen copy of the starting model) is needed only for the KL penalty.
    `trainer_cfg` picks the backend (default: plain torch). `optimizer` has torch's
    state_dict()/load_state_dict() (AdamW's per-parameter format) for checkpoints, whatever the backend.
    """

    def __init__(self, policy: Policy, algorithm: AlgorithmConfig, optimizer: OptimizerConfig, reference: torch.nn.Module | None = None,
                 trainer_cfg: TrainerConfig | None = None):
        self.policy, self.algorithm, self.optim_cfg = policy, algorithm, optimizer
        if algorithm.kl_coef > 0 and reference is None:
            raise ValueError("algorithm.kl_coef > 0 needs a reference model")
        self.reference = reference
        self.backend = make_backend(trainer_cfg, policy.model, make_optimizer(policy, optimizer), optimizer)
        self.optimizer = self.backend.optimizer

    def fresh(self, episodes: list[Episode]) -> list[Episode]:
        """Episodes no more than `max_steps_off_policy` versions behind the policy."""
        limit = self.algorithm.max_steps_off_policy
        return [e for e in episodes if self.policy.version - e.policy_version <= limit]

    def advantages(self, episodes: list[Episode]) -> list[torch.Tensor]:
        """Per episode, one advantage per policy turn (episode-level methods give one for all turns)."""
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
        return compute_advantages(
            self.algorithm.advantage_method, rewards, [e.group_id for e in episodes],
            token_counts=torch.tensor([e.response_tokens for e in episodes], dtype=torch.float64),
            turn_rewards=[turn_rewards(e) for e in episodes],
            normalize_std=self.algorithm.normalize_advantage_std,
            pass_k=self.algorithm.pass_k,
        )

    def step(self, episodes: list[Episode]) -> StepMetrics:
        """One optimizer step on `episodes` (env_error episodes are skipped: their rewards are not the policy's;
        with zero_variance_groups drop/resample, so are groups whose rewards are all equal)."""
        usable = [e for e in episodes if e.finish_reason != "env_error"]
        fresh = self.fresh(usable)
        stale = len(usable) - len(fresh)
        if self.algorithm.zero_variance_groups != "keep":
            fresh = informative(fresh)
        if self.algorithm.advantage_method == "grpo_passk":  # pass@k of a group needs k samples
            fresh = groups_of_at_least(fresh, self.algorithm.pass_k)
        self.policy.model.train()
        self.backend.zero_grad()
        total_tokens = sum(e.response_tokens for e in fresh)
        totals, sums = LossStats(0.0, 0.0, 0.0, 0.0), {"loss": 0.0, "entropy": 0.0, "mismatch": 0.0, "mismatch_max": 0.0}
        if fresh and total_tokens:
            advantages = self.advantages(fresh)
            size = self.optim_cfg.micro_batch_size
            for start in range(0, len(fresh), size):
                chunk = slice(start, start + size)
                batch = pad_batch(fresh[chunk], advantages[chunk], self.policy.chat.pad_id, self.policy.device)
                totals = totals + self._accumulate(batch, total_tokens, len(fresh), sums)
        grad_norm, skipped = 0.0, None
        if total_tokens:
            grad_norm = self.backend.step()  # clip to grad_clip, optimizer step; the norm before clipping
            self.policy.version += 1
        else:
            skipped = "nothing to train on: no episode with generated tokens is left after dropping env_error, stale and all-equal-reward groups"
        tokens = max(totals.tokens, 1.0)
        return StepMetrics(
            step=self.policy.version,
            loss=sums["loss"],
            clip_fraction=totals.clipped_tokens / tokens,
            approx_kl=totals.approx_kl_sum / tokens,
            entropy=sums["entropy"] / tokens,
            grad_norm=grad_norm,
            loss_tokens=int(total_tokens),
            episodes=len(fresh),
            stale_dropped=stale,
            logprob_mismatch_mean=sums["mismatch"] / tokens,
            logprob_mismatch_max=sums["mismatch_max"],
            ref_kl=totals.ref_kl_sum / tokens,
            is_weight_mean=totals.is_weight_sum / tokens,
            skipped=skipped,
        )

    def _accumulate(self, batch: dict[str, torch.Tensor], total_tokens: int, total_sequences: int, sums: dict[str, float]) -> LossStats:
        """Forward and backward one micro-batch; gradients add up across micro-batches."""
        a = self.algorithm
        logprobs, entropy = token_logprobs(self.backend.model, batch["tokens"], batch["attention"])
        mask, behavior = batch["mask"], batch["old_logprobs"]
        mean_abs, max_abs = logprob_mismatch(logprobs.detach(), behavior, mask)
        sums["mismatch"] += mean_abs * float(mask.sum())
        sums["mismatch_max"] = max(sums["mismatch_max"], max_abs)
        old, is_weights = behavior, None
        if a.tis_cap is not None:  # pi_old = the trainer's own log-probs; the sampler's gap becomes a capped weight
            old = logprobs.detach()
            is_weights = truncated_is_weights(old, behavior, mask, a.tis_cap)
        reference = None
        if a.kl_coef > 0:
            with torch.no_grad():
                reference, _ = token_logprobs(self.reference, batch["tokens"], batch["attention"])
        loss, stats = policy_loss(
            a.loss_fn, logprobs, old, batch["advantages"], mask,
            clip_low=a.clip_low_threshold, clip_high=a.clip_high_threshold, aggregation=a.loss_aggregation,
            total_tokens=total_tokens, total_sequences=total_sequences,
            is_weights=is_weights, ref_logprobs=reference, kl_coef=a.kl_coef,
            clip_ratio_dual=a.clip_ratio_dual,
        )
        self.backend.backward(loss)
        sums["loss"] += float(loss.detach())
        sums["entropy"] += float((entropy * mask).sum())
        return stats
