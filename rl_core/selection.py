"""What a batch trains on: the trainer's step 1 (see trainer.py), and how the rest is cut up.

`select_episodes` drops env_error episodes, episodes with a non-finite reward or reward
component, stale ones, truncated ones listed in `algorithm.mask_truncated`, and, when
configured, zero-variance groups (`drop_zero_variance_groups`; groups whose rewards are all
equal carry no learning signal) and groups too small for grpo_passk; `Selection` counts each.
`split_mini_batches` cuts what is left into mini-batches of whole groups and
`length_sorted_micro_batches` cuts a mini-batch into micro-batches of similar length.
Groups come from `groups.group_episodes`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rl_core.config import AlgorithmConfig
from rl_core.groups import group_episodes
from rl_core.trajectory import Episode


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
    """Which of `episodes` a step at policy `version` trains on (the trainer's step 1), in order.

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
