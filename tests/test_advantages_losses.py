"""Advantages and the PPO loss against hand-computed values."""

import math

import pytest
import torch

from rl_core.advantages import group_based
from rl_core.losses import policy_loss


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0])
    groups = ["a", "a", "b", "b", "c", "c", "c", "c"]
    adv = group_based(rewards, groups, normalize_std=True, eps=0.0)
    # group a: mean 0.5, sample std sqrt(0.5) -> +-0.5/0.7071
    assert adv[0].item() == pytest.approx(0.5 / math.sqrt(0.5), rel=1e-6)
    assert adv[1].item() == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-6)
    # group b: all equal -> 0
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0
    # group c: rewards 1,0,0,0: mean 0.25, sample std sqrt((0.5625+3*0.0625)/3)=0.5
    assert adv[4].item() == pytest.approx(0.75 / 0.5, rel=1e-6)
    assert adv[5].item() == pytest.approx(-0.25 / 0.5, rel=1e-6)


def test_grpo_without_std_is_centered_reward():
    adv = group_based(torch.tensor([1.0, 0.0, -0.1, 0.9]), ["a", "a", "b", "b"], normalize_std=False)
    assert adv.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_single_member_group_gets_zero():
    assert group_based(torch.tensor([1.0]), ["solo"]).tolist() == [0.0]


def test_ppo_loss_by_hand():
    # three generated tokens and one masked one; ratios e^0.1, e^-0.5, e^0.3 ; advantages +1, +1, -1
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.1, -0.5, 0.3, 5.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(
        "ppo", new, old, adv, mask, clip_low=0.8, clip_high=1.2, total_tokens=3, total_sequences=1
    )
    r1, r2, r3 = math.exp(0.1), math.exp(-0.5), math.exp(0.3)
    # token1: min(1.105, 1.105)=1.105 ; token2: min(0.6065, 0.8)=0.6065 ; token3: min(-1.3499, -1.2) = -1.3499
    expected = -(r1 + r2 - r3) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats.clipped_tokens == 0.0  # the pessimistic min never picks the clipped side here
    loss.backward()
    # d/dlogp of -(r*A)/3 = -(r*A)/3 where unclipped is active; masked token gets no gradient
    assert new.grad[0].tolist() == pytest.approx([-r1 / 3, -r2 / 3, r3 / 3, 0.0], rel=1e-6)


def test_ppo_loss_clips_and_zeroes_gradient_outside_bounds():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, -0.5]], requires_grad=True)  # ratios 1.65 (A>0) and 0.61 (A<0)
    adv = torch.tensor([[2.0, -1.0]])
    loss, stats = policy_loss(
        "ppo", new, old, adv, torch.ones(1, 2), clip_low=0.8, clip_high=1.2, total_tokens=2, total_sequences=1
    )
    assert loss.item() == pytest.approx(-(1.2 * 2.0 + 0.8 * -1.0) / 2, rel=1e-6)
    assert stats.clipped_tokens == 2.0
    loss.backward()
    assert new.grad.abs().sum().item() == 0.0


def test_ppo_loss_normalises_by_global_token_count():
    old = torch.zeros(2, 3)
    new = torch.full((2, 3), 0.05)
    adv = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    whole, _ = policy_loss("ppo", new, old, adv, mask, clip_low=0.8, clip_high=1.2, total_tokens=3, total_sequences=2)
    first, _ = policy_loss(
        "ppo", new[:1], old[:1], adv[:1], mask[:1], clip_low=0.8, clip_high=1.2, total_tokens=3, total_sequences=2
    )
    second, _ = policy_loss(
        "ppo", new[1:], old[1:], adv[1:], mask[1:], clip_low=0.8, clip_high=1.2, total_tokens=3, total_sequences=2
    )
    assert (first + second).item() == pytest.approx(whole.item(), rel=1e-6)
