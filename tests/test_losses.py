"""Policy losses (rl_core/losses.py) against hand-computed values, gradients and accumulation invariance."""

import math

import pytest
import torch

from rl_core.losses import (
    AGGREGATIONS,
    LOSS_FUNCTIONS,
    LossStats,
    logprob_mismatch,
    policy_loss,
    truncated_is_weights,
)

LOW, HIGH = 0.8, 1.2  # ratio bounds used throughout unless a test says otherwise
HUGE = 1e4  # a log-prob whose exp overflows: must never reach the loss on a masked token


def hand_batch(dtype=torch.float64):
    """Three sequences of three tokens, written as (ratio, advantage, logprob) per token.

    row 0: mask 1 1 0  ratios 1.5, 0.5, (masked: logprob 1e4, advantage inf)
    row 1: mask 1 1 1  ratios 1.1, 2.0, 0.7
    row 2: mask 0 0 0  (no mask tokens: must contribute 0)
    old_logprobs = logprobs - log(ratio), so exp(logp - old) is the ratio.
    """
    ratios = torch.tensor([[1.5, 0.5, 1.0], [1.1, 2.0, 0.7], [3.0, 3.0, 3.0]], dtype=dtype)
    advantages = torch.tensor([[2.0, -1.0, math.inf], [1.0, -1.0, -2.0], [5.0, 5.0, 5.0]], dtype=dtype)
    logprobs = torch.tensor([[-1.0, -2.0, HUGE], [-0.5, -1.5, -3.0], [-1.0, -1.0, -1.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    old = logprobs - torch.log(ratios)
    old[0, 2] = 0.0  # masked: log ratio 1e4, exp overflows to inf
    return logprobs, old, advantages, mask


# Per-token losses on the hand batch with bounds (0.8, 1.2), unmasked tokens only:
#   importance_sampling  l = -r*A
#     row0: -1.5*2 = -3.0 ; -0.5*(-1) = 0.5                       -> row sum -2.5 (2 tokens)
#     row1: -1.1*1 = -1.1 ; -2.0*(-1) = 2.0 ; -0.7*(-2) = 1.4     -> row sum  2.3 (3 tokens)
#   ppo  l = -min(r*A, clamp(r)*A)
#     row0: min(3.0, 1.2*2=2.4) -> -2.4 ; min(-0.5, 0.8*(-1)=-0.8) -> 0.8      -> row sum -1.6
#     row1: min(1.1, 1.1) -> -1.1 ; min(-2.0, -1.2) -> 2.0 ; min(-1.4, -1.6) -> 1.6  -> row sum 2.5
#   cispo  l = -clamp(r)*A*logp
#     row0: -(1.2*2*(-1)) = 2.4 ; -(0.8*(-1)*(-2)) = -1.6           -> row sum 0.8
#     row1: -(1.1*1*(-0.5)) = 0.55 ; -(1.2*(-1)*(-1.5)) = -1.8 ; -(0.8*(-2)*(-3)) = -4.8  -> row sum -6.05
# total_tokens = 5, total_sequences = 3 (the empty row counts as a sequence, contributing 0):
#   token_mean          = (row0 + row1) / 5
#   seq_mean_token_sum  = (row0 + row1 + 0) / 3
#   seq_mean_token_mean = (row0 / 2 + row1 / 3 + 0) / 3
ROW_SUMS = {"importance_sampling": (-2.5, 2.3), "ppo": (-1.6, 2.5), "cispo": (0.8, -6.05)}
EXPECTED = {
    (fn, agg): value
    for fn, (row0, row1) in ROW_SUMS.items()
    for agg, value in (
        ("token_mean", (row0 + row1) / 5),
        ("seq_mean_token_sum", (row0 + row1) / 3),
        ("seq_mean_token_mean", (row0 / 2 + row1 / 3) / 3),
    )
}
# Clipped tokens: ppo picks the clipped side on 1.5 (A>0), 0.5 (A<0), 0.7 (A<0) but not 2.0 (A<0,
# the unclipped -2.0 is smaller); cispo clamps every ratio outside [0.8, 1.2]: 1.5, 0.5, 2.0, 0.7.
CLIPPED = {"importance_sampling": 0.0, "ppo": 3.0, "cispo": 4.0}


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_fn", LOSS_FUNCTIONS)
def test_loss_by_hand(loss_fn, aggregation):
    logprobs, old, adv, mask = hand_batch()
    logprobs.requires_grad_()
    loss, stats = policy_loss(
        loss_fn,
        logprobs,
        old,
        adv,
        mask,
        clip_low=LOW,
        clip_high=HIGH,
        aggregation=aggregation,
        total_tokens=5,
        total_sequences=3,
    )
    assert loss.item() == pytest.approx(EXPECTED[loss_fn, aggregation], rel=1e-12)
    assert stats.tokens == 5.0
    assert stats.clipped_tokens == CLIPPED[loss_fn]
    assert stats.ratio_sum == pytest.approx(1.5 + 0.5 + 1.1 + 2.0 + 0.7)
    # k3 KL(old || new) = (r - 1) - log r, summed over the five tokens
    assert stats.approx_kl_sum == pytest.approx(sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 2.0, 0.7)))
    assert stats.is_weight_sum == 5.0 and stats.ref_kl_sum == 0.0 and stats.kl_penalty == 0.0
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] == 0.0 and (logprobs.grad[2] == 0.0).all()  # masked and empty rows


def test_denominators_are_the_given_totals():
    # Same hand batch, but as a micro-batch of a larger batch: 10 tokens and 6 sequences overall.
    logprobs, old, adv, mask = hand_batch()
    for aggregation, factor in (("token_mean", 5 / 10), ("seq_mean_token_sum", 3 / 6), ("seq_mean_token_mean", 3 / 6)):
        loss, _ = policy_loss(
            "ppo",
            logprobs,
            old,
            adv,
            mask,
            clip_low=LOW,
            clip_high=HIGH,
            aggregation=aggregation,
            total_tokens=10,
            total_sequences=6,
        )
        assert loss.item() == pytest.approx(EXPECTED["ppo", aggregation] * factor, rel=1e-12)


def test_cispo_usual_bounds_lift_small_ratios_to_one():
    # Ratio-bound convention: with (1.0, 6.0) the weight of r=0.5 becomes 1.0, of r=8 becomes 6.0.
    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    old = logprobs - torch.log(torch.tensor([[0.5, 8.0]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    loss, stats = policy_loss(
        "cispo", logprobs, old, adv, torch.ones(1, 2), clip_low=1.0, clip_high=6.0, total_tokens=2, total_sequences=1
    )
    # -(1.0*1*(-1) + 6.0*1*(-2)) / 2 = 13 / 2
    assert loss.item() == pytest.approx(6.5)
    assert stats.clipped_tokens == 2.0


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_fn", LOSS_FUNCTIONS)
def test_gradcheck(loss_fn, aggregation):
    # The hand batch's ratios are all >= 0.1 away from the bounds 0.8 / 1.2, where min/clamp kink.
    logprobs, old, adv, mask = hand_batch()
    ref = logprobs.detach() + torch.tensor([[0.3, -0.2, 0.0], [0.1, 0.4, -0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    is_weights = torch.tensor([[0.5, 1.0, 1.0], [2.0, 0.9, 1.3], [1.0, 1.0, 1.0]], dtype=torch.float64)

    def loss_of(lp):
        # CISPO's weight sg(clamp(r)) is by design not differentiated, so the derivative of its
        # VALUE in logp is not its gradient; finite differences match the gradient when the
        # perturbation leaves the ratio (hence the weight) unchanged: move old_logprobs with lp.
        old_here = old + (lp.detach() - logprobs) if loss_fn == "cispo" else old
        return policy_loss(
            loss_fn,
            lp,
            old_here,
            adv,
            mask,
            clip_low=LOW,
            clip_high=HIGH,
            aggregation=aggregation,
            total_tokens=5,
            total_sequences=3,
            is_weights=is_weights,
            ref_logprobs=ref,
            kl_coef=0.1,
        )[0]

    assert torch.autograd.gradcheck(loss_of, (logprobs.clone().requires_grad_(),))


def test_cispo_gradient_is_detached_clamped_weight_times_advantage():
    logprobs, old, adv, mask = hand_batch()
    logprobs.requires_grad_()
    loss, _ = policy_loss(
        "cispo", logprobs, old, adv, mask, clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=3
    )
    loss.backward()
    # d/dlogp of -sg(clamp(r))*A*logp / 5 = -clamp(r)*A/5 (no term from the ratio: it is detached);
    # clipped tokens (1.5 -> 1.2, 0.5 -> 0.8, 2.0 -> 1.2, 0.7 -> 0.8) still get gradient.
    expected = (
        torch.tensor(
            [[-1.2 * 2.0, -0.8 * -1.0, 0.0], [-1.1 * 1.0, -1.2 * -1.0, -0.8 * -2.0], [0.0, 0.0, 0.0]],
            dtype=torch.float64,
        )
        / 5
    )
    assert torch.allclose(logprobs.grad, expected, rtol=1e-12)


def test_ppo_gradient_is_zero_on_clipped_tokens():
    logprobs, old, adv, mask = hand_batch()
    logprobs.requires_grad_()
    loss, _ = policy_loss(
        "ppo", logprobs, old, adv, mask, clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=3
    )
    loss.backward()
    # unclipped side active: d(-r*A)/dlogp = -r*A (dr/dlogp = r); clipped side: constant in logp -> 0.
    # row0: 1.5 clipped, 0.5 clipped; row1: 1.1 unclipped -> -1.1, 2.0 unclipped -> -2.0*(-1) = 2.0, 0.7 clipped
    expected = torch.tensor([[0.0, 0.0, 0.0], [-1.1, 2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(logprobs.grad, expected, rtol=1e-12)


def test_importance_sampling_gradient_is_ratio_times_advantage():
    logprobs, old, adv, mask = hand_batch()
    logprobs.requires_grad_()
    policy_loss(
        "importance_sampling", logprobs, old, adv, mask, clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=3
    )[0].backward()
    expected = torch.tensor([[-3.0, 0.5, 0.0], [-1.1, 2.0, 1.4], [0.0, 0.0, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(logprobs.grad, expected, rtol=1e-12)


# ---------------------------------------------------------------- gradient accumulation


def random_batch(seed=0, rows=5, length=7):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 3
    old = logprobs + (torch.rand(rows, length, generator=gen, dtype=torch.float64) - 0.5)  # ratios in (0.61, 1.65)
    adv = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 0, 5, 1])  # unequal lengths and one sequence with no mask tokens
    mask = (torch.arange(length) < lengths[:, None]).long()
    ref = logprobs + 0.2 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    return logprobs, old, adv, mask, ref


def loss_and_grad(loss_fn, aggregation, pieces, logprobs, old, adv, mask, ref, *, totals=None):
    """Sum of the losses of `pieces` (row slices, or (rows, columns) slices) and d(sum)/d logprobs.

    `totals(piece_mask)` gives (total_tokens, total_sequences); by default the whole batch's counts.
    """
    leaf = logprobs.clone().requires_grad_()
    total = 0.0
    for piece in pieces:
        piece_mask = mask[piece]
        tokens, sequences = totals(piece_mask) if totals else (int(mask.sum()), mask.shape[0])
        loss, _ = policy_loss(
            loss_fn,
            leaf[piece],
            old[piece],
            adv[piece],
            piece_mask,
            clip_low=LOW,
            clip_high=HIGH,
            aggregation=aggregation,
            total_tokens=tokens,
            total_sequences=sequences,
            ref_logprobs=ref[piece],
            kl_coef=0.05,
        )
        loss.backward()
        total += loss.item()
    return total, leaf.grad


WHOLE = [slice(None)]
BY_SEQUENCES = [slice(0, 2), slice(2, 3), slice(3, 5)]  # micro-batches of whole sequences, sizes 2, 1, 2


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("loss_fn", LOSS_FUNCTIONS)
def test_accumulation_over_whole_sequences_is_invariant(loss_fn, aggregation):
    batch = random_batch()
    whole_loss, whole_grad = loss_and_grad(loss_fn, aggregation, WHOLE, *batch)
    split_loss, split_grad = loss_and_grad(loss_fn, aggregation, BY_SEQUENCES, *batch)
    assert split_loss == pytest.approx(whole_loss, rel=1e-12)
    assert torch.allclose(split_grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_token_mean_over_each_micro_batchs_own_tokens_is_not_invariant():
    # The common bug: normalising each micro-batch by its OWN token count (and averaging the
    # micro-batch losses). Micro-batches hold 9, 0 and 6 tokens, so per-micro-batch means weight a
    # token of a short micro-batch more than one of a long micro-batch; the global count (15) weights
    # every token equally. The sum (or mean) of local means is not the batch's token mean.
    batch = random_batch()
    whole_loss, whole_grad = loss_and_grad("ppo", "token_mean", WHOLE, *batch)
    local = loss_and_grad("ppo", "token_mean", BY_SEQUENCES, *batch, totals=lambda m: (int(m.sum()), m.shape[0]))
    local_mean_of_means = local[0] / len(BY_SEQUENCES)
    assert local[0] != pytest.approx(whole_loss, rel=1e-3)
    assert local_mean_of_means != pytest.approx(whole_loss, rel=1e-3)
    assert not torch.allclose(local[1] / len(BY_SEQUENCES), whole_grad, rtol=1e-3)


def test_seq_mean_token_mean_is_not_invariant_when_a_sequence_is_split():
    # Splitting along the length (part of a sequence in each micro-batch): each part is averaged
    # over its own token count, so a sequence (a, b, c, ...) contributes mean(first part) + mean(rest)
    # instead of mean(all). The two other modes are sums over tokens, which do not care where a
    # sequence is cut, so they stay invariant.
    batch = random_batch()
    by_columns = [(slice(None), slice(0, 3)), (slice(None), slice(3, None))]  # row 0 (7 tokens) -> 3 + 4
    for aggregation in AGGREGATIONS:
        whole_loss, whole_grad = loss_and_grad("cispo", aggregation, WHOLE, *batch)
        split_loss, split_grad = loss_and_grad("cispo", aggregation, by_columns, *batch)
        if aggregation == "seq_mean_token_mean":
            assert split_loss != pytest.approx(whole_loss, rel=1e-3)
            assert not torch.allclose(split_grad, whole_grad, rtol=1e-3)
        else:
            assert split_loss == pytest.approx(whole_loss, rel=1e-12)
            assert torch.allclose(split_grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_loss_stats_add_up_over_micro_batches():
    logprobs, old, adv, mask, _ = random_batch()
    kwargs = dict(clip_low=LOW, clip_high=HIGH, total_tokens=int(mask.sum()), total_sequences=5)
    whole = policy_loss("ppo", logprobs, old, adv, mask, **kwargs)[1]
    parts = [policy_loss("ppo", logprobs[s], old[s], adv[s], mask[s], **kwargs)[1] for s in BY_SEQUENCES]
    summed = parts[0] + parts[1] + parts[2]
    assert summed.tokens == whole.tokens == 15.0
    assert summed.clipped_tokens == whole.clipped_tokens
    assert summed.ratio_sum == pytest.approx(whole.ratio_sum)
    assert LossStats(0.0, 0.0, 0.0, 0.0) + whole == whole


# ---------------------------------------------------------------- mismatch, IS weights, KL


def test_truncated_is_weights_cap_and_mask():
    trainer = torch.tensor([[-1.0, -1.0, -1.0, 7.0]])
    behavior = torch.tensor([[-1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weights = truncated_is_weights(trainer, behavior, mask, cap=1.5)
    # exp(0.5) = 1.6487 -> capped at 1.5 ; exp(-0.5) = 0.6065 ; exp(0) = 1 ; masked -> neutral 1
    assert weights.tolist()[0] == pytest.approx([1.5, math.exp(-0.5), 1.0, 1.0], rel=1e-6)
    assert not weights.requires_grad
    # a cap below 1 leaves masked tokens at 1 (they do not count anyway)
    assert truncated_is_weights(trainer, behavior, mask, cap=0.5).tolist()[0] == pytest.approx([0.5, 0.5, 0.5, 1.0])


def test_logprob_mismatch_mean_and_max():
    trainer = torch.tensor([[-1.0, -1.0, -1.0, 7.0]])
    behavior = torch.tensor([[-1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # |diff| = 0.5, 0.5, 0 on mask tokens (the masked 7.0 is ignored): mean 1/3, max 0.5
    assert logprob_mismatch(trainer, behavior, mask) == pytest.approx((1 / 3, 0.5))
    assert logprob_mismatch(trainer, behavior, torch.zeros(1, 4)) == (0.0, 0.0)


def test_is_weights_multiply_the_policy_term():
    logprobs, old, adv, mask = hand_batch()
    logprobs.requires_grad_()
    weights = torch.tensor([[0.5, 2.0, math.nan], [1.0, 0.25, 1.0], [9.0, 9.0, 9.0]], dtype=torch.float64)
    loss, stats = policy_loss(
        "importance_sampling",
        logprobs,
        old,
        adv,
        mask,
        clip_low=LOW,
        clip_high=HIGH,
        total_tokens=5,
        total_sequences=3,
        is_weights=weights,
    )
    # per-token -r*A*w: -3.0*0.5 = -1.5 ; 0.5*2 = 1.0 ; -1.1*1 ; 2.0*0.25 = 0.5 ; 1.4*1  -> sum 0.3, / 5
    assert loss.item() == pytest.approx(0.3 / 5, rel=1e-12)
    assert stats.is_weight_sum == pytest.approx(0.5 + 2.0 + 1.0 + 0.25 + 1.0)  # mask tokens only (nan masked)
    loss.backward()
    assert logprobs.grad[0, 0].item() == pytest.approx(-1.5 / 5)  # weights are constants in the gradient


def test_kl_penalty_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -4.0], [-0.5, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 50.0], [-0.5, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    zero_adv = torch.zeros(2, 3, dtype=torch.float64)  # isolates the KL term: the policy term is 0
    # d = ref - logp on mask tokens: -0.5, 1.0, 0.0 ; k3 = e^d - d - 1
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 2, 0.0]  # 0.10653, 0.71828, 0
    kwargs = dict(clip_low=LOW, clip_high=HIGH, total_tokens=3, total_sequences=2, ref_logprobs=ref, kl_coef=0.1)
    expected = {
        "token_mean": 0.1 * sum(k3) / 3,
        "seq_mean_token_sum": 0.1 * (k3[0] + k3[1] + k3[2]) / 2,
        "seq_mean_token_mean": 0.1 * ((k3[0] + k3[1]) / 2 + k3[2] / 1) / 2,
    }
    for aggregation, value in expected.items():
        loss, stats = policy_loss("ppo", logprobs, logprobs.detach(), zero_adv, mask, aggregation=aggregation, **kwargs)
        assert loss.item() == pytest.approx(value, rel=1e-12)
        assert stats.kl_penalty == pytest.approx(value, rel=1e-12)
        assert stats.ref_kl_sum == pytest.approx(sum(k3), rel=1e-12)
    loss, _ = policy_loss("ppo", logprobs, logprobs.detach(), zero_adv, mask, aggregation="token_mean", **kwargs)
    loss.backward()
    # d k3 / d logp = 1 - e^d: 1 - e^-0.5 and 1 - e ; times 0.1 / 3 ; masked (ref 50) gets nothing
    expected_grad = [[0.1 * (1 - math.exp(-0.5)) / 3, 0.1 * (1 - math.e) / 3, 0.0], [0.0, 0.0, 0.0]]
    assert logprobs.grad.tolist() == [pytest.approx(row, rel=1e-12, abs=1e-15) for row in expected_grad]


def test_ref_kl_is_reported_but_not_added_when_kl_coef_is_zero():
    logprobs, old, adv, mask = hand_batch()
    ref = logprobs - 0.5
    with_ref, stats = policy_loss(
        "ppo",
        logprobs,
        old,
        adv,
        mask,
        clip_low=LOW,
        clip_high=HIGH,
        total_tokens=5,
        total_sequences=3,
        ref_logprobs=ref,
    )
    assert with_ref.item() == pytest.approx(EXPECTED["ppo", "token_mean"], rel=1e-12)
    assert stats.ref_kl_sum == pytest.approx(5 * (math.exp(-0.5) + 0.5 - 1)) and stats.kl_penalty == 0.0


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"loss_fn": "grpo"}, "loss_fn"),
        ({"aggregation": "seq_mean"}, "aggregation"),
        ({"clip_low": 1.3}, "clip_low"),
        ({"kl_coef": -0.1}, "kl_coef"),
        ({"clip_ratio_dual": 1.0}, "clip_ratio_dual"),
        ({"clip_ratio_dual": 0.5}, "clip_ratio_dual"),
        ({"kl_coef": 0.1}, "ref_logprobs"),
        ({"advantages": torch.zeros(3, 2)}, "advantages"),
    ],
)
def test_bad_arguments_are_rejected_by_name(overrides, named):
    logprobs, old, adv, mask = hand_batch()
    args = (
        dict(
            loss_fn="ppo",
            logprobs=logprobs,
            old_logprobs=old,
            advantages=adv,
            mask=mask,
            clip_low=LOW,
            clip_high=HIGH,
            total_tokens=5,
            total_sequences=3,
        )
        | overrides
    )
    with pytest.raises(ValueError, match=named):
        policy_loss(**args)


def test_is_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="behavior_logprobs"):
        logprob_mismatch(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


# ---------------------------------------------------------------- dual clip and the log-ratio bound

# Five ppo tokens (ratio r, advantage A), bounds (0.8, 1.2), dual-clip bound c = 3, token_mean over 5:
#   t1  r 4.0   A -1.0   min(-4.0, 1.2*-1 = -1.2) = -4.0 ; max(-4.0, 3*-1 = -3.0) = -3.0  -> l  3.0, dual clip
#   t2  r 2.0   A -1.0   min(-2.0, -1.2) = -2.0           ; max(-2.0, -3.0) = -2.0        -> l  2.0
#   t3  r 0.5   A -1.0   min(-0.5, 0.8*-1 = -0.8) = -0.8  ; max(-0.8, -3.0) = -0.8        -> l  0.8, clipped low
#   t4  r 4.0   A +1.0   min(4.0, 1.2) = 1.2 (A > 0: no dual clip)                        -> l -1.2, clipped high
#   t5  r 10.0  A -0.5   min(-5.0, -0.6) = -5.0           ; max(-5.0, 3*-0.5 = -1.5) = -1.5 -> l 1.5, dual clip
#   loss = (3.0 + 2.0 + 0.8 - 1.2 + 1.5) / 5 = 6.1 / 5 = 1.22
# Without the dual clip t1 gives 4.0 and t5 5.0: loss = (4.0 + 2.0 + 0.8 - 1.2 + 5.0) / 5 = 10.6 / 5 = 2.12.
# Gradient d l / d logp = -A * r on an unclipped token (dr/dlogp = r), 0 on a clipped one, / 5:
#   with the dual clip:    [0, 2.0, 0, 0, 0] / 5
#   without:               [4.0, 2.0, 0, 0, 5.0] / 5
DUAL_RATIOS = [4.0, 2.0, 0.5, 4.0, 10.0]
DUAL_ADVANTAGES = [-1.0, -1.0, -1.0, 1.0, -0.5]


def dual_batch():
    logprobs = torch.log(torch.tensor([DUAL_RATIOS], dtype=torch.float64)).requires_grad_()
    return (
        logprobs,
        torch.zeros(1, 5, dtype=torch.float64),
        torch.tensor([DUAL_ADVANTAGES], dtype=torch.float64),
        torch.ones(1, 5),
    )


@pytest.mark.parametrize(
    ("dual", "expected_loss", "expected_grad", "clipped", "dual_clipped"),
    [
        (3.0, 1.22, [0.0, 0.4, 0.0, 0.0, 0.0], 4.0, 2.0),
        (None, 2.12, [0.8, 0.4, 0.0, 0.0, 1.0], 2.0, 0.0),
    ],
)
def test_ppo_dual_clip_by_hand(dual, expected_loss, expected_grad, clipped, dual_clipped):
    logprobs, old, adv, mask = dual_batch()
    loss, stats = policy_loss(
        "ppo",
        logprobs,
        old,
        adv,
        mask,
        clip_low=LOW,
        clip_high=HIGH,
        total_tokens=5,
        total_sequences=1,
        clip_ratio_dual=dual,
    )
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert (stats.clipped_tokens, stats.dual_clipped_tokens) == (clipped, dual_clipped)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx(expected_grad, abs=1e-12)


def test_dual_clip_is_the_default_and_only_touches_ppo():
    logprobs, old, adv, mask = dual_batch()
    default, _ = policy_loss(
        "ppo", logprobs, old, adv, mask, clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=1
    )
    assert default.item() == pytest.approx(1.22, rel=1e-12)
    for loss_fn in ("importance_sampling", "cispo"):
        args = dict(clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=1)
        on, _ = policy_loss(loss_fn, logprobs, old, adv, mask, clip_ratio_dual=3.0, **args)
        off, _ = policy_loss(loss_fn, logprobs, old, adv, mask, clip_ratio_dual=None, **args)
        assert on.item() == off.item()
    # importance_sampling by hand: -sum(r * A) / 5 = -(-4 - 2 - 0.5 + 4 - 5) / 5 = 7.5 / 5
    is_loss, _ = policy_loss(
        "importance_sampling", logprobs, old, adv, mask, clip_low=LOW, clip_high=HIGH, total_tokens=5, total_sequences=1
    )
    assert is_loss.item() == pytest.approx(1.5, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stale_token_cannot_overflow_the_ratio(dtype):
    # log-ratios +-200 (a token whose log-prob moved by 200 nats since sampling): exp(200) is inf in
    # float32, so unbounded the loss was inf and exp's backward gave NaN (0 * inf). Bounded to
    # [-20, 20]: r = e^20 = 4.85e8 (or e^-20), constant beyond the bound, so those tokens get no gradient.
    logprobs = torch.tensor([[-0.5, -0.5, -0.5, -300.0]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[-200.5, -200.5, -200.5, -100.0]], dtype=dtype)  # log-ratios 200, 200, 200, -200
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=dtype)
    mask = torch.tensor([[1, 1, 0, 1]])
    e20 = math.exp(20.0)
    cases = {
        # ppo, dual clip on: A>0 clipped high -> -1.2 ; A<0 dual bound -> 3.0 ; r=e^-20, A>0 -> -e^-20
        ("ppo", 3.0): (-1.2 + 3.0 - math.exp(-20.0)) / 3,
        # ppo, dual clip off: the A<0 token's loss is r = e^20, large but finite
        ("ppo", None): (-1.2 + e20 - math.exp(-20.0)) / 3,
        # importance sampling: -r*A = -e^20, +e^20, -e^-20
        ("importance_sampling", None): (-e20 + e20 - math.exp(-20.0)) / 3,
    }
    for (loss_fn, dual), expected in cases.items():
        logprobs.grad = None
        loss, stats = policy_loss(
            loss_fn,
            logprobs,
            old,
            adv,
            mask,
            clip_low=LOW,
            clip_high=HIGH,
            total_tokens=3,
            total_sequences=1,
            clip_ratio_dual=dual,
        )
        assert math.isfinite(loss.item()), (loss_fn, dual)
        assert loss.item() == pytest.approx(expected, rel=2e-2, abs=1e-6), (loss_fn, dual)
        assert math.isfinite(stats.ratio_sum) and math.isfinite(stats.approx_kl_sum)
        loss.backward()
        assert logprobs.grad.tolist() == [[0.0, 0.0, 0.0, 0.0]], (loss_fn, dual)


def test_kl_term_log_ratio_is_bounded_too():
    logprobs = torch.tensor([[-300.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0]])  # ref - logp = 299.5: k3 = exp(299.5) - ... overflows unbounded
    loss, stats = policy_loss(
        "ppo",
        logprobs,
        logprobs.detach(),
        torch.zeros(1, 2),
        torch.ones(1, 2),
        clip_low=LOW,
        clip_high=HIGH,
        total_tokens=2,
        total_sequences=1,
        ref_logprobs=ref,
        kl_coef=0.1,
    )
    expected_k3 = math.exp(20.0) - 20.0 - 1.0  # the bounded log-ratio 20, then k3 = e^x - x - 1
    assert stats.ref_kl_sum == pytest.approx(expected_k3, rel=1e-6)
    assert loss.item() == pytest.approx(0.1 * expected_k3 / 2, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
