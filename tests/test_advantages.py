"""Every advantage method against values worked out by hand, plus the pass@k brute force."""

import itertools
import math

import pytest
import torch

from rl_core.advantages import (
    ADVANTAGE_METHODS,
    compute_advantages,
    gpg,
    group_based,
    group_based_per_turn,
    grpo_passk,
    monte_carlo,
    opo,
    reinforce_pp,
    reinforce_pp_baseline,
    rloo,
)

# Shared batch, groups interleaved on purpose (members are not adjacent):
#   pair: episodes 0, 3   rewards 1.0, 0.0        (group of two)
#   same: episodes 1, 5   rewards 0.5, 0.5        (all equal)
#   trio: episodes 2, 6, 7 rewards 1.0, 0.0, 0.5
#   solo: episode 4       reward 0.7              (group of one)
REWARDS = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.7, 0.5, 0.0, 0.5])
GROUPS = ["pair", "same", "trio", "pair", "solo", "same", "trio", "trio"]
TOKENS = [10, 5, 30, 30, 7, 9, 10, 20]


def approx(values):
    return pytest.approx(values, abs=1e-6)


def test_monte_carlo_is_the_reward():
    adv = monte_carlo(REWARDS, GROUPS)
    assert adv.dtype == torch.float32
    assert adv.tolist() == approx([1.0, 0.5, 1.0, 0.0, 0.7, 0.5, 0.0, 0.5])


def test_rloo_by_hand():
    # pair: 1 - 0 = 1 ; 0 - 1 = -1
    # trio: 1 - (0 + 0.5)/2 = 0.75 ; 0 - (1 + 0.5)/2 = -0.75 ; 0.5 - (1 + 0)/2 = 0
    # same: 0.5 - 0.5 = 0 ; solo: no other member -> 0
    assert rloo(REWARDS, GROUPS).tolist() == approx([1.0, 0.0, 0.75, -1.0, 0.0, 0.0, -0.75, 0.0])


def test_rloo_is_exactly_zero_for_equal_rewards_that_do_not_round_cleanly():
    # 0.1 + 0.1 + 0.1 != 0.3 in floating point; the leave-one-out mean must still give exactly 0
    assert rloo(torch.tensor([0.1, 0.1, 0.1]), ["g"] * 3).tolist() == [0.0, 0.0, 0.0]


def test_reinforce_pp_by_hand():
    # batch mean = (1 + .5 + 1 + 0 + .7 + .5 + 0 + .5) / 8 = 4.2 / 8 = 0.525
    # sum of squares = sum r^2 - N mean^2 = 3.24 - 8 * 0.275625 = 1.035 ; sample std = sqrt(1.035 / 7)
    std = math.sqrt(1.035 / 7)
    expected = [(r - 0.525) / std for r in [1.0, 0.5, 1.0, 0.0, 0.7, 0.5, 0.0, 0.5]]
    assert reinforce_pp(REWARDS, GROUPS, eps=0.0).tolist() == approx(expected)
    # no group baseline: the all-equal group and the group of one still get a signal
    assert reinforce_pp(REWARDS, GROUPS, eps=0.0)[4].item() == pytest.approx(0.175 / std, abs=1e-6)


def test_reinforce_pp_without_spread_is_zero():
    assert reinforce_pp(torch.tensor([0.3, 0.3]), ["a", "b"]).tolist() == [0.0, 0.0]
    assert reinforce_pp(torch.tensor([0.3]), ["a"]).tolist() == [0.0]


def test_reinforce_pp_baseline_by_hand():
    # centred on group means: pair +-0.5 ; same 0, 0 ; trio +0.5, -0.5, 0 ; solo 0
    # batch mean of the centred values = 0 ; sum of squares = 4 * 0.25 = 1 ; sample std = sqrt(1/7)
    # A = c / sqrt(1/7) = c * sqrt(7)
    s7 = math.sqrt(7)
    expected = [0.5 * s7, 0.0, 0.5 * s7, -0.5 * s7, 0.0, 0.0, -0.5 * s7, 0.0]
    assert reinforce_pp_baseline(REWARDS, GROUPS, eps=0.0).tolist() == approx(expected)


def test_opo_by_hand():
    # pair: L = 10, 30 ; b = (10*1 + 30*0) / 40 = 0.25 -> 0.75, -0.25
    # trio: L = 30, 10, 20 ; b = (30*1 + 10*0 + 20*0.5) / 60 = 2/3 -> 1/3, -2/3, 0.5 - 2/3 = -1/6
    # same and solo: the weighted mean is the common reward -> 0
    expected = [0.75, 0.0, 1 / 3, -0.25, 0.0, 0.0, -2 / 3, -1 / 6]
    assert opo(REWARDS, GROUPS, TOKENS).tolist() == approx(expected)


def test_opo_with_equal_lengths_is_grpo_without_std():
    lengths = [4] * len(REWARDS)
    assert opo(REWARDS, GROUPS, lengths).tolist() == approx(group_based(REWARDS, GROUPS, normalize_std=False).tolist())


def test_opo_rejects_bad_token_counts():
    with pytest.raises(ValueError, match="token_counts"):
        opo(REWARDS, GROUPS, TOKENS[:-1])
    with pytest.raises(ValueError, match="token_counts"):
        opo(torch.tensor([1.0, 0.0]), ["g", "g"], [0, 0])


def test_gpg_by_hand():
    # B = 8 episodes; groups with differing rewards: pair (2) + trio (3) -> B_valid = 5 ; alpha = 8/5 = 1.6
    # pair: 1.6 * +-0.5 = +-0.8 ; trio: 1.6 * (0.5, -0.5, 0) ; same and solo: 0
    expected = [0.8, 0.0, 0.8, -0.8, 0.0, 0.0, -0.8, 0.0]
    assert gpg(REWARDS, GROUPS).tolist() == approx(expected)


def test_gpg_with_no_valid_group_is_zero():
    assert gpg(torch.tensor([1.0, 1.0, 0.0]), ["a", "a", "b"]).tolist() == [0.0, 0.0, 0.0]


# --- grpo_passk --------------------------------------------------------------------------------

PASSK_REWARDS = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
PASSK_GROUPS = [
    "four",
    "four",
    "pair",
    "four",
    "four",
    "five",
    "five",
    "right",
    "right",
    "wrong",
    "wrong",
    "pair",
    "five",
    "five",
    "five",
]
#   four:  1, 0, 0, 0       (n=4, c=1)
#   pair:  1, 0             (n=2, c=1)
#   five:  1, 0, 1, 0, 0    (n=5, c=2)
#   right: 1, 1             (all correct)
#   wrong: 0, 0             (all wrong)


def test_grpo_passk_by_hand():
    adv = grpo_passk(PASSK_REWARDS, PASSK_GROUPS, k=2, eps=0.0).tolist()
    # four, k=2: R = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 ; sigma = sqrt(0.5 * 0.5) = 0.5
    #   correct:   (1 - 0.5) / 0.5 = 1
    #   incorrect: (1 - 0.5 - C(2,1)/C(3,1)) / 0.5 = (0.5 - 2/3) / 0.5 = -1/3
    assert [adv[0], adv[1], adv[3], adv[4]] == approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    # pair, k=2=n: every 2-subset is the whole group, which passes -> R = 1, sigma = 0 -> 0
    assert [adv[2], adv[11]] == [0.0, 0.0]
    # five, k=2: R = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7 ; sigma = sqrt(0.21)
    #   correct:   0.3 / sqrt(0.21) ; incorrect: (0.3 - C(2,1)/C(4,1)) / sqrt(0.21) = -0.2 / sqrt(0.21)
    s = math.sqrt(0.21)
    assert [adv[5], adv[6], adv[12], adv[13], adv[14]] == approx([0.3 / s, -0.2 / s, 0.3 / s, -0.2 / s, -0.2 / s])
    # all correct and all wrong: 0
    assert adv[7:11] == [0.0, 0.0, 0.0, 0.0]


def test_grpo_passk_k3_by_hand():
    five = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    # n=5, c=2, k=3: R = 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9 ; sigma = sqrt(0.09) = 0.3
    #   correct: 0.1 / 0.3 = 1/3 ; incorrect: (0.1 - C(2,2)/C(4,2)) / 0.3 = (0.1 - 1/6) / 0.3 = -2/9
    adv = grpo_passk(five, ["g"] * 5, k=3, eps=0.0).tolist()
    assert adv == approx([1 / 3, -2 / 9, 1 / 3, -2 / 9, -2 / 9])


def brute_force_passk(correct: list[int], k: int) -> list[float]:
    """Mean over the k-subsets containing i of (max of the subset - pass@k), divided by the std of
    the subset maxima over all k-subsets (population std, as in the paper)."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    maxima = {s: max(correct[j] for j in s) for s in subsets}
    pass_at_k = sum(maxima.values()) / len(subsets)
    sigma = math.sqrt(sum((m - pass_at_k) ** 2 for m in maxima.values()) / len(subsets))
    if sigma == 0:
        return [0.0] * len(correct)
    return [
        sum(maxima[s] - pass_at_k for s in subsets if i in s) / sum(1 for s in subsets if i in s) / sigma
        for i in range(len(correct))
    ]


@pytest.mark.parametrize(
    "correct", [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0]]
)
def test_grpo_passk_matches_brute_force_over_subsets(correct):
    for k in range(1, len(correct) + 1):
        adv = grpo_passk(torch.tensor(correct, dtype=torch.float32), ["g"] * len(correct), k=k, eps=0.0)
        assert adv.tolist() == approx(brute_force_passk(correct, k)), f"k={k}"


def test_grpo_passk_with_k1_is_grpo_with_population_std():
    # rewards 1, 0, 0, 0: mean 0.25, population std sqrt(0.25 * 0.75)
    sigma = math.sqrt(0.1875)
    adv = grpo_passk(torch.tensor([1.0, 0.0, 0.0, 0.0]), ["g"] * 4, k=1, eps=0.0)
    assert adv.tolist() == approx([0.75 / sigma, -0.25 / sigma, -0.25 / sigma, -0.25 / sigma])


def test_grpo_passk_thresholds_rewards():
    # 0.9 >= 0.8 counts as correct, 0.2 and 0.5 do not -> same as binary 1, 0, 0, 0
    graded = grpo_passk(torch.tensor([0.9, 0.2, 0.5, 0.0]), ["g"] * 4, k=2, success_threshold=0.8, eps=0.0)
    assert graded.tolist() == approx([1.0, -1 / 3, -1 / 3, -1 / 3])


def test_grpo_passk_group_of_one():
    # k=1: a group of one is all correct or all wrong -> 0 ; k=2: the group is too small
    assert grpo_passk(torch.tensor([1.0]), ["solo"], k=1).tolist() == [0.0]
    with pytest.raises(ValueError, match="k=2.*'solo'"):
        grpo_passk(torch.tensor([1.0, 0.0, 1.0]), ["g", "g", "solo"], k=2)


# --- group_based_per_turn ----------------------------------------------------------------------


def test_per_turn_with_one_turn_equals_group_based():
    turns = [[r] for r in REWARDS.tolist()]
    for normalize_std in (True, False):
        per_turn = group_based_per_turn(turns, GROUPS, normalize_std=normalize_std)
        assert all(len(a) == 1 for a in per_turn)
        assert torch.equal(torch.cat(per_turn), group_based(REWARDS, GROUPS, normalize_std=normalize_std))


# Episodes (turn rewards -> returns-to-go), groups interleaved:
#   0 x: [0.1, 0.0, 1.0] -> [1.1, 1.0, 1.0]
#   1 y: [0.5, 0.5]      -> [1.0, 0.5]
#   2 x: [0.1, 0.0]      -> [0.1, 0.0]
#   3 z: [0.2, 0.3]      -> [0.5, 0.3]      (group of one)
#   4 x: [0.0]           -> [0.0]
#   5 y: [1.0]           -> [1.0]
TURNS = [[0.1, 0.0, 1.0], [0.5, 0.5], [0.1, 0.0], [0.2, 0.3], [0.0], [1.0]]
TURN_GROUPS = ["x", "y", "x", "z", "x", "y"]


def test_per_turn_by_hand_without_std():
    adv = [a.tolist() for a in group_based_per_turn(TURNS, TURN_GROUPS, normalize_std=False)]
    # x turn 0: returns 1.1, 0.1, 0.0 -> mean 0.4 -> 0.7, -0.3, -0.4
    # x turn 1: returns 1.0, 0.0 -> mean 0.5 -> 0.5, -0.5
    # x turn 2: only episode 0 -> turn-0 statistics (mean 0.4) -> 1.0 - 0.4 = 0.6
    assert adv[0] == approx([0.7, 0.5, 0.6])
    assert adv[2] == approx([-0.3, -0.5])
    assert adv[4] == approx([-0.4])
    # y turn 0: 1.0, 1.0 -> 0, 0 ; y turn 1: only episode 1 -> turn-0 mean 1.0 -> 0.5 - 1.0 = -0.5
    assert adv[1] == approx([0.0, -0.5])
    assert adv[5] == approx([0.0])
    # z is a group of one: no peer at any turn -> 0
    assert adv[3] == [0.0, 0.0]


def test_per_turn_by_hand_with_std():
    adv = [a.tolist() for a in group_based_per_turn(TURNS, TURN_GROUPS, normalize_std=True, eps=0.0)]
    # x turn 0: deviations 0.7, -0.3, -0.4 ; squares 0.49 + 0.09 + 0.16 = 0.74 ; std = sqrt(0.74 / 2)
    s0 = math.sqrt(0.37)
    # x turn 1: deviations +-0.5 ; std = sqrt(0.5 / 1)
    s1 = math.sqrt(0.5)
    assert adv[0] == approx([0.7 / s0, 0.5 / s1, 0.6 / s0])
    assert adv[2] == approx([-0.3 / s0, -0.5 / s1])
    assert adv[4] == approx([-0.4 / s0])
    # y: turn-0 returns are equal (std 0) and turn 1 falls back to them -> 0
    assert adv[1] == [0.0, 0.0] and adv[5] == [0.0]
    assert adv[3] == [0.0, 0.0]


def test_per_turn_rejects_an_episode_without_turns():
    with pytest.raises(ValueError, match="turn_rewards\\[1\\]"):
        group_based_per_turn([[1.0], []], ["g", "g"])


# --- dispatcher --------------------------------------------------------------------------------


def test_methods_menu():
    assert ADVANTAGE_METHODS == (
        "monte_carlo",
        "group_based",
        "group_based_per_turn",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "opo",
        "grpo_passk",
        "gpg",
    )


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_dispatcher_gives_one_tensor_per_episode(method):
    binary = (REWARDS >= 1.0).float()  # pass@1 needs n >= k = 1 only, so the group of one is fine
    out = compute_advantages(
        method, binary, GROUPS, token_counts=TOKENS, turn_rewards=[[r] for r in binary.tolist()], pass_k=1, eps=0.0
    )
    assert len(out) == len(GROUPS)
    assert all(a.dtype == torch.float32 and a.shape == (1,) for a in out)


def test_dispatcher_matches_the_functions():
    def via(method, **kwargs):
        return torch.cat(compute_advantages(method, REWARDS, GROUPS, **kwargs))

    assert torch.equal(via("monte_carlo"), monte_carlo(REWARDS, GROUPS))
    assert torch.equal(via("group_based", normalize_std=False), group_based(REWARDS, GROUPS, normalize_std=False))
    assert torch.equal(via("rloo"), rloo(REWARDS, GROUPS))
    assert torch.equal(via("reinforce_pp", eps=0.0), reinforce_pp(REWARDS, GROUPS, eps=0.0))
    assert torch.equal(via("reinforce_pp_baseline"), reinforce_pp_baseline(REWARDS, GROUPS))
    assert torch.equal(via("opo", token_counts=TOKENS), opo(REWARDS, GROUPS, TOKENS))
    assert torch.equal(via("gpg"), gpg(REWARDS, GROUPS))
    assert torch.equal(
        via("grpo_passk", pass_k=1, success_threshold=0.7), grpo_passk(REWARDS, GROUPS, k=1, success_threshold=0.7)
    )
    per_turn = compute_advantages("group_based_per_turn", torch.zeros(len(TURNS)), TURN_GROUPS, turn_rewards=TURNS)
    assert [a.tolist() for a in per_turn] == [a.tolist() for a in group_based_per_turn(TURNS, TURN_GROUPS)]


def test_dispatcher_errors_name_the_method():
    with pytest.raises(ValueError, match="'grpo'"):
        compute_advantages("grpo", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="'opo'.*token_counts"):
        compute_advantages("opo", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="'grpo_passk'.*pass_k"):
        compute_advantages("grpo_passk", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="'group_based_per_turn'.*turn_rewards"):
        compute_advantages("group_based_per_turn", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="k=4"):
        compute_advantages("grpo_passk", REWARDS, GROUPS, pass_k=4)


@pytest.mark.parametrize("method", [m for m in ADVANTAGE_METHODS if m != "group_based_per_turn"])
def test_episode_order_does_not_matter(method):
    # groups are found by id, not by position: permuting the episodes permutes the advantages
    order = [6, 4, 0, 7, 2, 5, 1, 3]
    kwargs = {"token_counts": TOKENS, "pass_k": 1, "success_threshold": 0.7}
    base = torch.cat(compute_advantages(method, REWARDS, GROUPS, **kwargs))
    permuted = torch.cat(
        compute_advantages(
            method, REWARDS[order], [GROUPS[i] for i in order], **{**kwargs, "token_counts": [TOKENS[i] for i in order]}
        )
    )
    assert permuted.tolist() == approx(base[order].tolist())


# --- all-equal groups give exactly 0 -------------------------------------------------------------

# Rewards that round: 2/3 - 0.1 (a success weight minus a format penalty) and 0.1, 0.7, whose
# float mean differs from the reward by ~1e-17; before the fix group_based, group_based_per_turn
# and reinforce_pp returned ~1e-10 here (e.g. eight episodes of 2/3 - 0.1: 1.1e-10).
ROUNDING_REWARDS = [(2 / 3 - 0.1, n) for n in (4, 6, 7, 8)] + [(0.1, 3), (0.7, 3)]


def _all_methods(rewards: torch.Tensor, groups: list[str], **extra) -> dict[str, list[float]]:
    out = {}
    for method in ADVANTAGE_METHODS:
        kwargs = {
            "token_counts": list(range(1, len(groups) + 1)),
            "turn_rewards": [[float(r)] for r in rewards],
            "pass_k": 2,
            **extra,
        }
        out[method] = [float(a[0]) for a in compute_advantages(method, rewards, groups, **kwargs)]
    return out


@pytest.mark.parametrize("value, size", ROUNDING_REWARDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_all_equal_group_is_exactly_zero_for_every_method(value, size, dtype, normalize_std):
    rewards = torch.tensor([value] * size, dtype=dtype)
    out = _all_methods(rewards, ["g"] * size, normalize_std=normalize_std)
    for method, advantages in out.items():
        if method == "monte_carlo":  # no baseline: A = r by definition
            continue
        assert advantages == [0.0] * size, method  # exactly, not approximately


def test_all_equal_group_is_exactly_zero_beside_a_group_with_signal():
    # group "same" holds eight rewards 2/3 - 0.1; group "mixed" carries signal that must survive
    same = [2 / 3 - 0.1] * 8
    mixed = [1.0, 0.0, 0.5, -0.1]
    rewards = torch.tensor(same + mixed, dtype=torch.float64)
    groups = ["same"] * 8 + ["mixed"] * 4
    out = _all_methods(rewards, groups)
    for method in ("group_based", "group_based_per_turn", "rloo", "reinforce_pp_baseline", "opo", "grpo_passk", "gpg"):
        assert out[method][:8] == [0.0] * 8, method
        assert any(a != 0.0 for a in out[method][8:]), method
    # reinforce_pp's baseline is the batch: the equal group is not special there
    assert all(a != 0.0 for a in out["reinforce_pp"][:8])


def test_a_tiny_real_difference_keeps_its_signal():
    # no tolerance hides signal: rewards 1e-9 apart are two different rewards, A = -+1/sqrt(2)
    # (centred +-0.5e-9, sample std 1e-9 / sqrt(2))
    rewards = torch.tensor([0.5, 0.5 + 1e-9], dtype=torch.float64)
    adv = group_based(rewards, ["g", "g"], eps=0.0)
    assert adv.tolist() == approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_per_turn_returns_that_round_are_exactly_zero():
    # three episodes with the same two turn rewards: turn 0 returns 0.1 + 0.4666.. = 0.5666..,
    # turn 1 returns 0.4666..; every turn equals its peers, so every advantage is exactly 0
    turns = [[0.1, 2 / 3 - 0.1 - 0.1]] * 3
    for normalize_std in (True, False):
        out = group_based_per_turn(turns, ["g"] * 3, normalize_std=normalize_std)
        assert [a.tolist() for a in out] == [[0.0, 0.0]] * 3
    # a lonely turn compared with the group's equal episode returns gets 0 only if it equals them
    # (turn 1 of the third episode: return 0.25 against the episode returns 0.5, 0.5, 0.5)
    lonely = group_based_per_turn([[0.5], [0.5], [0.25, 0.25]], ["g"] * 3, normalize_std=False)
    assert [a.tolist() for a in lonely] == [[0.0], [0.0], [0.0, -0.25]]
