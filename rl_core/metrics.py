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

from rl_core.groups import Group, group_episodes, rollouts
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

    Outcome metrics count each rollout once, whatever number of segments (rows) it has
    (`groups.rollouts`; a batch without segments has one rollout per row): `rollout/reward/*`,
    `rollout/success/mean` and `rollout/finish/<reason>` (the fraction of rollouts that ended for
    that reason) take each rollout's first row (segment 0; every row carries the rollout's outcome),
    `rollout/turns/mean` is the mean number of policy turns per rollout (summed over its segments),
    and the `analysis/zero_variance_groups*` shares are over the groups of those rollouts.
    `rollout/tool_parse_errors` is the mean number of assistant turns per rollout whose tool-call
    syntax the renderer's parser could not read (`Turn.parse_error` set; each was answered with an
    error observation); 0.0 for text-action policies, whose turns never carry one. Token metrics
    (`rollout/tokens/*`) and `rollout/episodes` are per row. `rollout/stitch_breaks` counts the rows
    with segment > 0 (each a point where an external agent's model calls could not be stitched into
    the previous segment's token sequence; 0.0 when none). An empty batch gives only
    `rollout/episodes` = 0.0.
    """
    if not episodes:
        return {"rollout/episodes": 0.0}
    rollout_rows = [[episodes[p] for p in rows] for rows in rollouts(episodes)]
    outcomes = [rows[0] for rows in rollout_rows]
    count = len(outcomes)
    rewards = torch.tensor([e.reward for e in outcomes], dtype=torch.float64)
    response = [e.response_tokens for e in episodes]
    grouped = group_episodes(outcomes)
    groups = len(grouped)
    all_correct, all_wrong = count_zero_variance_groups(grouped)
    reasons = Counter(e.finish_reason for e in outcomes)
    out = {
        "rollout/episodes": float(len(episodes)),
        "rollout/reward/mean": float(rewards.mean()),
        "rollout/reward/std": float(rewards.std()) if count > 1 else 0.0,
        "rollout/reward/zero_frac": float((rewards == 0).double().mean()),
        "rollout/success/mean": sum(e.success for e in outcomes) / count,
        "rollout/turns/mean": sum(e.num_turns for rows in rollout_rows for e in rows) / count,
        "rollout/tokens/response_mean": sum(response) / len(episodes),
        "rollout/tokens/response_max": float(max(response)),
        "rollout/tokens/total_mean": sum(len(e.tokens) for e in episodes) / len(episodes),
        "rollout/tool_parse_errors": sum(_parse_errors(e) for e in episodes) / count,
        "rollout/stitch_breaks": float(sum(1 for e in episodes if e.segment > 0)),
        "analysis/zero_variance_groups": (all_correct + all_wrong) / groups if groups else 0.0,
        "analysis/zero_variance_groups/all_correct": all_correct / groups if groups else 0.0,
        "analysis/zero_variance_groups/all_wrong": all_wrong / groups if groups else 0.0,
    }
    for reason in FINISH_REASONS:
        out[f"rollout/finish/{reason}"] = reasons.get(reason, 0) / count
    return out
