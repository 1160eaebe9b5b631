"""One optimizer step of policy-gradient training on a batch of episodes.

`Trainer.step(episodes)`:
1. drops stale episodes (sampled more than `max_steps_off_policy` policy versions ago);
2. computes advantages from rewards (`advantages.group_based`), one per episode, applied to
   every token the policy generated in it (environment and prompt tokens are masked out);
3. recomputes the policy's log-probs in micro-batches of `micro_batch_size` episodes and
   accumulates the PPO clipped loss, normalised by the global count of loss tokens, so the
   update equals the one-big-batch update;
4. clips the gradient norm, takes an AdamW step, and bumps `policy.version`.
The sampler's `behavior_logprobs` are pi_old in the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl_core.advantages import group_based
from rl_core.config import AlgorithmConfig, OptimizerConfig
from rl_core.losses import LossStats, ppo_clipped_loss
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
        }


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


def pad_batch(episodes: list[Episode], advantages: torch.Tensor, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad episodes into tensors: tokens, attention, loss mask, old log-probs, token advantages."""
    width = max(len(e.tokens) for e in episodes)
    batch = {
        "tokens": torch.full((len(episodes), width), pad_id, dtype=torch.long),
        "attention": torch.zeros((len(episodes), width), dtype=torch.long),
        "mask": torch.zeros((len(episodes), width)),
        "old_logprobs": torch.zeros((len(episodes), width)),
        "advantages": torch.zeros((len(episodes), width)),
    }
    for row, (ep, adv) in enumerate(zip(episodes, advantages.tolist())):
        n = len(ep.tokens)
        batch["tokens"][row, :n] = torch.tensor(ep.tokens)
        batch["attention"][row, :n] = 1
        batch["mask"][row, :n] = torch.tensor(ep.loss_mask, dtype=torch.float)
        batch["old_logprobs"][row, :n] = torch.tensor(ep.behavior_logprobs, dtype=torch.float)
        batch["advantages"][row, :n] = adv
    return {k: v.to(device) for k, v in batch.items()}


class Trainer:
    """Owns the optimizer and applies training steps to `policy` in place."""

    def __init__(self, policy: Policy, algorithm: AlgorithmConfig, optimizer: OptimizerConfig):
        self.policy, self.algorithm, self.optim_cfg = policy, algorithm, optimizer
        self.optimizer = make_optimizer(policy, optimizer)

    def fresh(self, episodes: list[Episode]) -> list[Episode]:
        """Episodes no more than `max_steps_off_policy` versions behind the policy."""
        limit = self.algorithm.max_steps_off_policy
        return [e for e in episodes if self.policy.version - e.policy_version <= limit]

    def advantages(self, episodes: list[Episode]) -> torch.Tensor:
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
        return group_based(rewards, [e.group_id for e in episodes], self.algorithm.normalize_advantage_std)

    def step(self, episodes: list[Episode]) -> StepMetrics:
        """One optimizer step on `episodes` (env_error episodes are skipped: their rewards are not the policy's)."""
        usable = [e for e in episodes if e.finish_reason != "env_error"]
        fresh = self.fresh(usable)
        stale = len(usable) - len(fresh)
        model = self.policy.model
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = sum(e.response_tokens for e in fresh)
        totals = LossStats(0.0, 0.0, 0.0, 0.0)
        loss_sum = entropy_sum = 0.0
        if fresh and total_tokens:
            advantages = self.advantages(fresh)
            size = self.optim_cfg.micro_batch_size
            for start in range(0, len(fresh), size):
                batch = pad_batch(fresh[start:start + size], advantages[start:start + size], self.policy.chat.pad_id, self.policy.device)
                logprobs, entropy = token_logprobs(model, batch["tokens"], batch["attention"])
                loss, stats = ppo_clipped_loss(
                    logprobs, batch["old_logprobs"], batch["advantages"], batch["mask"],
                    clip_low=self.algorithm.clip_low_threshold, clip_high=self.algorithm.clip_high_threshold,
                    total_loss_tokens=total_tokens,
                )
                loss.backward()
                loss_sum += float(loss.detach())
                entropy_sum += float((entropy * batch["mask"]).sum())
                for name in ("clipped_tokens", "approx_kl_sum", "ratio_sum", "tokens"):
                    setattr(totals, name, getattr(totals, name) + getattr(stats, name))
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)) if total_tokens else 0.0
        if total_tokens:
            self.optimizer.step()
            self.policy.version += 1
        tokens = max(totals.tokens, 1.0)
        return StepMetrics(
            step=self.policy.version,
            loss=loss_sum,
            clip_fraction=totals.clipped_tokens / tokens,
            approx_kl=totals.approx_kl_sum / tokens,
            entropy=entropy_sum / tokens,
            grad_norm=grad_norm,
            loss_tokens=int(total_tokens),
            episodes=len(fresh),
            stale_dropped=stale,
        )
