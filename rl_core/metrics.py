"""Metrics over a batch of episodes and pass@k estimators.

`pass_at_k(n, c, k)` is the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374):
the chance that at least one of k samples drawn without replacement from n samples, c of
them correct, is correct: 1 - C(n-c, k) / C(n, k). `pass_hat_k(n, c, k)` ("pass^k", Yao et
al. 2024, tau-bench) is the chance that all k are correct: C(c, k) / C(n, k).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from math import comb

import torch

from rl_core.groups import Group, group_episodes
from rl_core.trajectory import FINISH_REASONS, Episode


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c successes (needs k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k: probability that k samples (without replacement) are all correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_hat_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return comb(c, k) / comb(n, k)


def count_zero_variance_groups(groups: Iterable[Group]) -> tuple[int, int]:
    """The zero-variance groups among `groups` (rewards all equal), counted as (all successes, the rest).

    "The rest" are the zero-variance groups not every member of which succeeded (all wrong when
    success follows the reward)."""
    zero_variance = [g for g in groups if g.zero_variance]
    all_correct = sum(1 for g in zero_variance if g.all_correct)
    return all_correct, len(zero_variance) - all_correct


def _parse_errors(episode: Episode) -> int:
    """Assistant turns of `episode` whose tool calls could not be parsed."""
    return sum(1 for t in episode.turns if t.role == "assistant" and t.parse_error is not None)


def rollout_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Batch summary with the names managed multi-turn RL services use (rollout/..., analysis/...).

    Means are per episode unless named otherwise. `rollout/tool_parse_errors` is the mean number of
    assistant turns per episode whose tool-call syntax the renderer's parser could not read
    (`Turn.parse_error` set; each was answered with an error observation); 0.0 for text-action
    policies, whose turns never carry one. `rollout/finish/<reason>` is the fraction of episodes
    that ended for that reason. An empty batch gives only `rollout/episodes` = 0.0.
    """
    if not episodes:
        return {"rollout/episodes": 0.0}
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
    response = [e.response_tokens for e in episodes]
    grouped = group_episodes(episodes)
    groups = len(grouped)
    all_correct, all_wrong = count_zero_variance_groups(grouped)
    reasons = Counter(e.finish_reason for e in episodes)
    out = {
        "rollout/episodes": float(len(episodes)),
        "rollout/reward/mean": float(rewards.mean()),
        "rollout/reward/std": float(rewards.std()) if len(episodes) > 1 else 0.0,
        "rollout/reward/zero_frac": float((rewards == 0).double().mean()),
        "rollout/success/mean": sum(e.success for e in episodes) / len(episodes),
        "rollout/turns/mean": sum(e.num_turns for e in episodes) / len(episodes),
        "rollout/tokens/response_mean": sum(response) / len(episodes),
        "rollout/tokens/response_max": float(max(response)),
        "rollout/tokens/total_mean": sum(len(e.tokens) for e in episodes) / len(episodes),
        "rollout/tool_parse_errors": sum(_parse_errors(e) for e in episodes) / len(episodes),
        "analysis/zero_variance_groups": (all_correct + all_wrong) / groups if groups else 0.0,
        "analysis/zero_variance_groups/all_correct": all_correct / groups if groups else 0.0,
        "analysis/zero_variance_groups/all_wrong": all_wrong / groups if groups else 0.0,
    }
    for reason in FINISH_REASONS:
        out[f"rollout/finish/{reason}"] = reasons.get(reason, 0) / len(episodes)
    return out
