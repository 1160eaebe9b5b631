"""Advantages from episode rewards: pure functions over tensors.

`group_based` (GRPO, Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300):
    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)        with normalize_std
    A_i =  r_i - mean_g(r)                            without
where g is episode i's group (same task, `group_size` samples) and std_g is the sample
standard deviation (n - 1). Groups whose rewards are all equal get A = 0 (they carry no
signal); a group of one episode has A = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def group_index(group_ids: Sequence[str]) -> torch.Tensor:
    """Map group id strings to dense integer indices, in order of first appearance."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)


def group_based(rewards: torch.Tensor, group_ids: Sequence[str], normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by the group's std."""
    rewards = rewards.double()
    index = group_index(group_ids)
    groups = int(index.max()) + 1 if len(index) else 0
    count = torch.zeros(groups, dtype=torch.double).index_add_(0, index, torch.ones_like(rewards))
    mean = torch.zeros(groups, dtype=torch.double).index_add_(0, index, rewards) / count
    centered = rewards - mean[index]
    if not normalize_std:
        return centered.float()
    sq = torch.zeros(groups, dtype=torch.double).index_add_(0, index, centered**2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    advantages = torch.where(std[index] > 0, centered / (std[index] + eps), torch.zeros_like(centered))
    return advantages.float()


def zero_variance_groups(rewards: torch.Tensor, group_ids: Sequence[str]) -> tuple[int, int]:
    """(number of groups, number whose rewards are all equal)."""
    index = group_index(group_ids)
    groups = int(index.max()) + 1 if len(index) else 0
    equal = 0
    for g in range(groups):
        members = rewards[index == g]
        equal += int(bool((members == members[0]).all()))
    return groups, equal
