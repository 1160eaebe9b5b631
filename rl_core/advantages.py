"""Advantages from episode rewards: pure functions over tensors.

Every method takes the episodes' rewards and their group ids (a group is the `group_size`
samples of one task; a group's members need not be adjacent) and returns float32 advantages,
computed in float64. Episode-level methods return one advantage per episode, shape [N], which
the trainer applies to every generated token of that episode; `group_based_per_turn` returns
one advantage per policy turn. `compute_advantages` picks a method by name (`ADVANTAGE_METHODS`)
and returns a list of per-episode tensors for every method alike.

Notation: r_i is episode i's reward, g its group, n_g the group's size, mean_g and std_g the
group's mean and sample standard deviation (divisor n - 1), mean_B and std_B the same over the
whole batch of N episodes. A zero-variance group (one whose rewards are all equal, a group of one included)
carries no signal: every method with a group baseline gives its episodes exactly A = 0.0, and
`reinforce_pp`, whose baseline is the batch, gives exactly 0.0 to a batch whose rewards are all
equal. "Exactly": the equality is detected on the rewards themselves (max == min of the group)
and the advantage set to 0, because the arithmetic alone leaves rounding residue (rewards of
2/3 - 0.1 have a float mean that differs from each reward by ~1e-17, which dividing by a std
of the same size plus eps would turn into ~1e-11). No tolerance is applied: rewards that differ
by any amount keep their signal. Dividing by a standard deviation of 0 gives A = 0, not inf.

- `monte_carlo`: A_i = r_i. No baseline (plain REINFORCE, Williams 1992). With a single final
  reward, the Monte Carlo return of every token is the episode's reward.
- `group_based`: GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300)
      A_i = (r_i - mean_g) / (std_g + eps)         with normalize_std
      A_i =  r_i - mean_g                          without
- `group_based_per_turn`: GRPO on each policy turn's return-to-go; see that function.
- `rloo`: REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740)
      A_i = r_i - (sum_{j in g, j != i} r_j) / (n_g - 1)   [= n_g / (n_g - 1) * (r_i - mean_g)]
- `reinforce_pp`: REINFORCE++ (Hu 2025, arXiv:2501.03262), global batch normalisation and no
  group baseline
      A_i = (r_i - mean_B) / (std_B + eps)
- `reinforce_pp_baseline`: REINFORCE++-baseline (same paper): centre on the group mean, then
  normalise over the batch
      c_i = r_i - mean_g,     A_i = (c_i - mean_B(c)) / (std_B(c) + eps)
  Each group's c sums to 0, so mean_B(c) = 0 and A_i = c_i / (std_B(c) + eps).
  The paper's OpenRLHF implementation takes the batch statistics over tokens (a long episode
  weighs more); here every episode counts once, as in the per-episode formula.
- `opo`: On-Policy RL with Optimal reward baseline (Hao et al. 2025, arXiv:2505.23585), with
  L_i the number of tokens episode i generated
      b_g = sum_{j in g} L_j r_j / sum_{j in g} L_j,     A_i = r_i - b_g
- `grpo_passk`: Pass@k Training, analytic advantages (Chen et al. 2025, arXiv:2508.10751);
  see that function.
- `gpg`: Group Policy Gradient (Chu et al. 2025, arXiv:2504.02546), no std division
      A_i = alpha * (r_i - mean_g),     alpha = B / B_valid
  B = N episodes, B_valid = episodes in groups whose rewards are not all equal (alpha = 0 if
  there are none: every advantage is 0 then anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

AdvantageMethod = Literal[
    "monte_carlo",
    "group_based",
    "group_based_per_turn",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "opo",
    "grpo_passk",
    "gpg",
]
ADVANTAGE_METHODS: tuple[AdvantageMethod, ...] = get_args(AdvantageMethod)


def group_index(group_ids: Sequence[str]) -> torch.Tensor:
    """Map group id strings to dense integer indices, in order of first appearance."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(g, len(seen)) for g in group_ids], dtype=torch.long)


def _reward_vector(rewards: torch.Tensor | Sequence[float], group_ids: Sequence[str]) -> torch.Tensor:
    """Rewards as a detached float64 vector [N]; raises ValueError unless there is one group id per reward."""
    values = torch.as_tensor(rewards).detach().to(torch.float64)
    if values.dim() != 1:
        raise ValueError(f"rewards must be a vector [N], got shape {tuple(values.shape)}")
    if len(group_ids) != values.numel():
        raise ValueError(f"got {values.numel()} rewards but {len(group_ids)} group ids")
    return values


def _num_groups(index: torch.Tensor) -> int:
    return int(index.max()) + 1 if len(index) else 0


def _group_sum(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-group sums [G] of `values` [N] under dense group `index` [N]."""
    return torch.zeros(_num_groups(index), dtype=values.dtype).index_add_(0, index, values)


def _group_stats(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group (count, mean, sample std) [G]; the std of a one-member group is 0."""
    count = _group_sum(torch.ones_like(values), index)
    mean = _group_sum(values, index) / count
    squares = _group_sum((values - mean[index]) ** 2, index)
    return count, mean, torch.sqrt(squares / (count - 1).clamp(min=1))


def _group_range(values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (max, min) [G] of `values` [N] under dense group `index` [N]."""
    groups = _num_groups(index)
    high = torch.full((groups,), -math.inf, dtype=values.dtype).scatter_reduce_(0, index, values, "amax")
    low = torch.full((groups,), math.inf, dtype=values.dtype).scatter_reduce_(0, index, values, "amin")
    return high, low


def _zero_variance_mask(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-episode bool [N]: True where every reward of the episode's group is the same."""
    high, low = _group_range(values, index)
    return (high == low)[index]


def _zero_where_zero_variance(advantages: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`advantages` [N] with exactly 0.0 for episodes whose group (under `index` [N]) has all-equal `values`."""
    return torch.where(_zero_variance_mask(values, index), torch.zeros_like(advantages), advantages)


def _group_centered(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """r_i - mean_g, exactly 0 in groups whose rewards are all equal (no rounding residue)."""
    _, mean, _ = _group_stats(values, index)
    return _zero_where_zero_variance(values - mean[index], values, index)


def _standardise(
    values: torch.Tensor, baseline: torch.Tensor, scale: torch.Tensor, normalize_std: bool, eps: float
) -> torch.Tensor:
    """(values - baseline) / (scale + eps) where scale > 0, else 0; without normalize_std just values - baseline."""
    centered = values - baseline
    if not normalize_std:
        return centered
    return torch.where(scale > 0, centered / (scale + eps), torch.zeros_like(centered))


def _batch_whiten(values: torch.Tensor, eps: float) -> torch.Tensor:
    """(v - mean_B) / (std_B + eps) over the whole batch (sample std); exactly 0 if all values are equal."""
    everything = torch.zeros(len(values), dtype=torch.long)
    _, mean, std = _group_stats(values, everything)
    whitened = _standardise(values, mean[everything], std[everything], True, eps)
    return _zero_where_zero_variance(whitened, values, everything)


def monte_carlo(rewards: torch.Tensor, group_ids: Sequence[str]) -> torch.Tensor:
    """A_i = r_i: the episode's return, no baseline. float32 [N]."""
    return _reward_vector(rewards, group_ids).float()


def group_based(
    rewards: torch.Tensor, group_ids: Sequence[str], normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by the group's std. float32 [N]."""
    values = _reward_vector(rewards, group_ids)
    index = group_index(group_ids)
    _, mean, std = _group_stats(values, index)
    return _zero_where_zero_variance(
        _standardise(values, mean[index], std[index], normalize_std, eps), values, index
    ).float()


def rloo(rewards: torch.Tensor, group_ids: Sequence[str]) -> torch.Tensor:
    """Leave-one-out baseline: A_i = r_i - mean of the other rewards in i's group; 0 for a group of one. float32 [N]."""
    values = _reward_vector(rewards, group_ids)
    index = group_index(group_ids)
    others = (_group_sum(values, index)[index] - values) / (
        _group_sum(torch.ones_like(values), index)[index] - 1
    ).clamp(min=1)
    return _zero_where_zero_variance(values - others, values, index).float()


def reinforce_pp(rewards: torch.Tensor, group_ids: Sequence[str], eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: rewards normalised over the whole batch, (r - mean_B) / (std_B + eps).

    Groups are unused. Returns float32 [N]."""
    return _batch_whiten(_reward_vector(rewards, group_ids), eps).float()


def reinforce_pp_baseline(rewards: torch.Tensor, group_ids: Sequence[str], eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++-baseline: c = r - mean_g, then c normalised by its mean and std over the batch. float32 [N].

    Episodes of all-equal groups get exactly 0 (c = 0, but mean_B(c) carries rounding residue).
    """
    values = _reward_vector(rewards, group_ids)
    index = group_index(group_ids)
    return _zero_where_zero_variance(_batch_whiten(_group_centered(values, index), eps), values, index).float()


def opo(rewards: torch.Tensor, group_ids: Sequence[str], token_counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """OPO: A_i = r_i - b_g with the length-weighted baseline b_g = sum L_j r_j / sum L_j. float32 [N].

    `token_counts` [N] holds each episode's generated (loss-masked) token count L_i; counts must be
    >= 0 and each group's total > 0 (ValueError naming token_counts otherwise).
    """
    values = _reward_vector(rewards, group_ids)
    lengths = torch.as_tensor(token_counts).detach().to(torch.float64)
    if lengths.shape != values.shape:
        raise ValueError(
            f"token_counts must have one count per episode ({values.numel()}), got shape {tuple(lengths.shape)}"
        )
    if bool((lengths < 0).any()):
        raise ValueError("token_counts must be >= 0")
    index = group_index(group_ids)
    total_length = _group_sum(lengths, index)
    if bool((total_length <= 0).any()):
        raise ValueError("token_counts: every group needs at least one generated token")
    baseline = _group_sum(lengths * values, index) / total_length
    return _zero_where_zero_variance(values - baseline[index], values, index).float()


def grpo_passk(
    rewards: torch.Tensor, group_ids: Sequence[str], k: int, success_threshold: float = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Advantages that optimise pass@k: the analytic form of Pass@k Training (Chen et al. 2025, arXiv:2508.10751).

    An episode is correct when r >= success_threshold. In a group of n episodes with c correct,
    the k-subsets S of the group each get the reward max_{j in S} correct_j; over all C(n, k)
    subsets that reward has mean R (the unbiased pass@k) and population std sigma:
        R = 1 - C(n - c, k) / C(n, k),        sigma = sqrt(R (1 - R))
    Episode i's advantage is the mean, over the C(n-1, k-1) subsets that contain i, of the
    GRPO-style subset advantage (max(S) - R) / (sigma + eps):
        correct i:    A = (1 - R) / (sigma + eps)
        incorrect i:  A = (1 - R - C(n - c - 1, k - 1) / C(n - 1, k - 1)) / (sigma + eps)
    (an incorrect episode's subset fails only if its other k - 1 members are all incorrect).
    All-correct, all-wrong and sigma = 0 groups (e.g. n - c < k: every subset passes) get 0.
    With k = 1 this is GRPO with the population std. Needs 1 <= k <= n for every group
    (ValueError naming k otherwise). float32 [N].
    """
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    values = _reward_vector(rewards, group_ids)
    correct = values >= success_threshold
    index = group_index(group_ids)
    sizes = _group_sum(torch.ones_like(values), index).long().tolist()
    successes = _group_sum(correct.double(), index).long().tolist()
    per_group = []  # (advantage if correct, advantage if incorrect)
    for group, (n, c) in enumerate(zip(sizes, successes)):
        if n < k:
            name = group_ids[int((index == group).nonzero()[0])]
            raise ValueError(f"pass@k with k={k} needs at least k episodes per group; group {name!r} has {n}")
        pass_at_k = 1 - math.comb(n - c, k) / math.comb(n, k)
        sigma = math.sqrt(pass_at_k * (1 - pass_at_k))
        if c in (0, n) or sigma == 0:
            per_group.append((0.0, 0.0))
            continue
        fail_with_incorrect = math.comb(n - c - 1, k - 1) / math.comb(n - 1, k - 1)
        per_group.append(((1 - pass_at_k) / (sigma + eps), (1 - pass_at_k - fail_with_incorrect) / (sigma + eps)))
    table = torch.tensor(per_group, dtype=torch.float64).reshape(-1, 2)
    return torch.where(correct, table[index, 0], table[index, 1]).float()


def gpg(rewards: torch.Tensor, group_ids: Sequence[str], eps: float = 1e-6) -> torch.Tensor:
    """GPG: A_i = (B / B_valid) * (r_i - mean_g), no std division. float32 [N].

    B_valid counts the episodes in groups whose rewards are not all equal. `eps` is accepted for
    a signature like the other batch methods; GPG divides by no standard deviation.
    """
    values = _reward_vector(rewards, group_ids)
    index = group_index(group_ids)
    valid_episodes = int((~_zero_variance_mask(values, index)).sum())
    alpha = len(values) / valid_episodes if valid_episodes else 0.0
    return (alpha * _group_centered(values, index)).float()


def group_based_per_turn(
    turn_rewards: Sequence[Sequence[float]], group_ids: Sequence[str], normalize_std: bool = True, eps: float = 1e-6
) -> list[torch.Tensor]:
    """GRPO over per-turn returns-to-go: one float32 advantage per policy turn of each episode.

    `turn_rewards[i]` holds episode i's rewards, one per policy turn (at least one turn).
    1. Return-to-go of turn t: G_it = sum_{s >= t} r_is (undiscounted).
    2. Peers of turn t of episode i: the episodes of i's group that have a turn t. Baseline and
       scale are the mean and sample std of the peers' G_jt:
           A_it = (G_it - mean_peers) / (std_peers + eps)    (G_it - mean_peers without normalize_std)
    3. If turn index t exists in only that one episode of the group, its statistics are those
       of turn 0, i.e. of the group's episode returns G_j0; a group of one episode gets 0.
    4. A turn whose return equals every return it is compared with (all peers' G_jt equal, and
       G_it among them) gets exactly 0.0, with no rounding residue; so does every turn of a
       group whose turn rewards are all equal.
    With one turn per episode this is exactly `group_based` on the episode rewards. With only a
    final reward, G_it is the episode reward at every turn and turn t is compared with the
    episodes that lasted at least t + 1 turns.
    """
    if len(turn_rewards) != len(group_ids):
        raise ValueError(f"got turn rewards for {len(turn_rewards)} episodes but {len(group_ids)} group ids")
    returns, cells, turn_counts = [], [], []
    cell_of: dict[tuple[int, int], int] = {}  # (group, turn index) -> dense cell id
    for episode, (rewards_of_turns, group) in enumerate(zip(turn_rewards, group_index(group_ids).tolist())):
        if len(rewards_of_turns) == 0:
            raise ValueError(f"turn_rewards[{episode}] is empty: every episode needs at least one policy turn")
        returns.append(torch.tensor(rewards_of_turns, dtype=torch.float64).flip(0).cumsum(0).flip(0))
        cells.extend(cell_of.setdefault((group, turn), len(cell_of)) for turn in range(len(rewards_of_turns)))
        turn_counts.append(len(rewards_of_turns))
    if not returns:
        return []
    values, cell = torch.cat(returns), torch.tensor(cells, dtype=torch.long)
    count, mean, std = _group_stats(values, cell)
    statistics_from = torch.tensor(
        [c if count[c] >= 2 else cell_of[(group, 0)] for (group, _), c in cell_of.items()], dtype=torch.long
    )[cell]
    advantages = _standardise(values, mean[statistics_from], std[statistics_from], normalize_std, eps)
    advantages = torch.where(count[statistics_from] >= 2, advantages, torch.zeros_like(advantages))
    high, low = _group_range(values, cell)
    no_signal = (high == low)[statistics_from] & (values == high[statistics_from])
    advantages = torch.where(no_signal, torch.zeros_like(advantages), advantages)
    return list(advantages.float().split(turn_counts))


def compute_advantages(
    method: AdvantageMethod,
    rewards: torch.Tensor,
    group_ids: Sequence[str],
    *,
    token_counts: torch.Tensor | Sequence[int] | None = None,
    turn_rewards: Sequence[Sequence[float]] | None = None,
    normalize_std: bool = True,
    pass_k: int | None = None,
    success_threshold: float = 1.0,
    eps: float = 1e-6,
) -> list[torch.Tensor]:
    """Advantages by method name (one of ADVANTAGE_METHODS), as one float32 tensor per episode.

    Episode-level methods give a one-element tensor per episode; `group_based_per_turn` gives
    one value per policy turn. Either way, turn t of episode i gets out[i][min(t, len(out[i]) - 1)].
    `normalize_std` applies to group_based and group_based_per_turn; `eps` to every method that
    divides by a std; `opo` needs token_counts, `grpo_passk` pass_k (and success_threshold),
    `group_based_per_turn` turn_rewards. Raises ValueError naming the method for an unknown name
    or a missing input.
    """
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"unknown advantage method {method!r}; expected one of {', '.join(ADVANTAGE_METHODS)}")
    needed = {
        "opo": ("token_counts", token_counts),
        "grpo_passk": ("pass_k", pass_k),
        "group_based_per_turn": ("turn_rewards", turn_rewards),
    }
    if method in needed and needed[method][1] is None:
        raise ValueError(f"advantage method {method!r} needs {needed[method][0]}")
    if method == "group_based_per_turn":
        if len(turn_rewards) != len(rewards):
            raise ValueError(
                f"advantage method {method!r}: turn_rewards covers {len(turn_rewards)} episodes, rewards {len(rewards)}"
            )
        return group_based_per_turn(turn_rewards, group_ids, normalize_std, eps)
    if method == "monte_carlo":
        advantages = monte_carlo(rewards, group_ids)
    elif method == "group_based":
        advantages = group_based(rewards, group_ids, normalize_std, eps)
    elif method == "rloo":
        advantages = rloo(rewards, group_ids)
    elif method == "reinforce_pp":
        advantages = reinforce_pp(rewards, group_ids, eps)
    elif method == "reinforce_pp_baseline":
        advantages = reinforce_pp_baseline(rewards, group_ids, eps)
    elif method == "opo":
        advantages = opo(rewards, group_ids, token_counts)
    elif method == "grpo_passk":
        advantages = grpo_passk(rewards, group_ids, pass_k, success_threshold, eps)
    else:
        advantages = gpg(rewards, group_ids, eps)
    return list(advantages.split(1))
