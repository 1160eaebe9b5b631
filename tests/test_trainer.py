"""The trainer: micro-batch accumulation invariance, masking, staleness, checkpoints."""

import copy
import math

import pytest
import torch

from rl_core.config import AlgorithmConfig, OptimizerConfig
from rl_core.runs.checkpoint import latest_checkpoint, load_checkpoint, restore_optimizer, save_checkpoint
from rl_core.trainer import Trainer
from rl_core.trajectory import Episode, Turn


def make_episodes(policy, n=6, seed=0):
    """Episodes of random tokens with a prompt, two generated spans and an observation between."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(policy.tokenizer)
    episodes = []
    for i in range(n):
        lens = torch.randint(3, 8, (4,), generator=g).tolist()
        prompt, gen1, obs, gen2 = lens
        tokens = torch.randint(5, vocab, (sum(lens),), generator=g).tolist()
        mask = [0] * prompt + [1] * gen1 + [0] * obs + [1] * gen2
        logprobs = [(-0.5 - 0.1 * (j % 3)) if m else 0.0 for j, m in enumerate(mask)]
        turns = [
            Turn("user", "p", 0, prompt),
            Turn("assistant", "a", prompt, prompt + gen1),
            Turn("tool", "o", prompt + gen1, prompt + gen1 + obs),
            Turn("assistant", "b", prompt + gen1 + obs, len(tokens)),
        ]
        episodes.append(
            Episode(
                "r",
                1,
                0,
                "env",
                f"t{i // 2}",
                f"g{i // 2}",
                i % 2,
                tokens,
                mask,
                logprobs,
                turns,
                reward=float(i % 2),
                reward_components={},
                success=bool(i % 2),
                finish_reason="answered",
            )
        )
    return episodes


def params_after_step(policy, episodes, micro_batch_size):
    policy = copy.deepcopy(policy)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2, micro_batch_size=micro_batch_size))
    metrics = trainer.step(episodes)
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, metrics


def test_gradient_accumulation_gives_the_one_batch_update(tiny_policy):
    episodes = make_episodes(tiny_policy)
    whole, m_whole = params_after_step(tiny_policy, episodes, micro_batch_size=6)
    for size in (1, 4):
        parts, m_parts = params_after_step(tiny_policy, episodes, micro_batch_size=size)
        assert m_parts.loss == pytest.approx(m_whole.loss, abs=1e-6)
        assert m_parts.grad_norm == pytest.approx(m_whole.grad_norm, rel=1e-4)
        for name in whole:
            torch.testing.assert_close(parts[name], whole[name], rtol=1e-5, atol=1e-6)


def test_environment_tokens_get_no_gradient(tiny_policy):
    """Changing prompt/observation log-probs or advantages' masked positions changes nothing."""
    episodes = make_episodes(tiny_policy)
    noisy = copy.deepcopy(episodes)
    for ep in noisy:
        ep.behavior_logprobs = [lp if m else -9.0 for lp, m in zip(ep.behavior_logprobs, ep.loss_mask)]
    a, _ = params_after_step(tiny_policy, episodes, 6)
    b, _ = params_after_step(tiny_policy, noisy, 6)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_step_metrics_and_version(tiny_policy):
    episodes = make_episodes(tiny_policy)
    policy = copy.deepcopy(tiny_policy)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-3))
    m = trainer.step(episodes)
    assert policy.version == 1 and m.step == 1
    assert m.loss_tokens == sum(e.response_tokens for e in episodes)
    assert 0.0 <= m.clip_fraction <= 1.0 and m.approx_kl >= 0.0 and m.entropy > 0.0 and m.grad_norm > 0.0


def test_stale_episodes_are_dropped(tiny_policy):
    policy = copy.deepcopy(tiny_policy)
    policy.version = 5
    episodes = make_episodes(policy)
    for ep in episodes[:2]:
        ep.policy_version = 1  # 4 steps behind, limit 3
    for ep in episodes[2:]:
        ep.policy_version = 2  # 3 steps behind: still fresh
    m = Trainer(policy, AlgorithmConfig(max_steps_off_policy=3), OptimizerConfig()).step(episodes)
    assert m.stale_dropped == 2 and m.episodes == 4


def test_checkpoint_round_trip(tiny_policy, tmp_path):
    policy = copy.deepcopy(tiny_policy)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-3))
    trainer.step(make_episodes(policy))
    path = save_checkpoint(tmp_path, policy, trainer.optimizer, {"tasks": {"epoch": 0, "offset": 3}})
    assert path.name == "step-000001" and latest_checkpoint(tmp_path) == path
    assert (path / "model.safetensors").exists() and not list(tmp_path.glob("*.tmp"))
    loaded, state = load_checkpoint(path)
    assert loaded.version == 1 and state["tasks"]["offset"] == 3
    for (name, a), b in zip(policy.model.state_dict().items(), loaded.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    fresh = Trainer(loaded, AlgorithmConfig(), OptimizerConfig(lr=1e-3))
    restore_optimizer(path, fresh.optimizer)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == trainer.optimizer.state_dict()["state"][0]["step"]
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, policy, trainer.optimizer)


def test_prune_keeps_the_newest_checkpoints(tiny_policy, tmp_path):
    from rl_core.runs.checkpoint import prune_checkpoints

    policy = copy.deepcopy(tiny_policy)
    for step in range(1, 5):
        policy.version = step
        save_checkpoint(tmp_path, policy, None)
    deleted = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in deleted] == ["step-000001", "step-000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_zero_variance_groups_split_into_all_correct_and_all_wrong(tiny_policy):
    from rl_core.metrics import rollout_metrics

    episodes = make_episodes(tiny_policy, n=8)  # groups g0..g3 with rewards (0, 1) each
    for ep in episodes[:2]:  # g0: both succeed
        ep.reward, ep.success = 1.0, True
    for ep in episodes[2:4]:  # g1: both fail
        ep.reward, ep.success = 0.0, False
    m = rollout_metrics(episodes)
    assert m["analysis/zero_variance_groups"] == 0.5
    assert (
        m["analysis/zero_variance_groups/all_correct"] == 0.25 and m["analysis/zero_variance_groups/all_wrong"] == 0.25
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo"])
def test_every_loss_and_aggregation_is_accumulation_invariant_in_the_trainer(tiny_policy, loss_fn, aggregation):
    episodes = make_episodes(tiny_policy)
    algorithm = AlgorithmConfig(loss_fn=loss_fn, loss_aggregation=aggregation, advantage_method="rloo")

    def params(micro_batch_size):
        policy = copy.deepcopy(tiny_policy)
        Trainer(policy, algorithm, OptimizerConfig(lr=1e-2, micro_batch_size=micro_batch_size)).step(episodes)
        return policy.model.state_dict()

    whole, parts = params(6), params(2)
    for name in whole:  # Adam's first step moves each weight by ~lr = 1e-2; float32 summation order differs
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-4, atol=1e-5)


def test_per_turn_advantages_land_on_their_turns_tokens(tiny_policy):
    from rl_core.token_batch import token_advantages

    ep = make_episodes(tiny_policy, n=1)[0]
    first, second = [t for t in ep.turns if t.role == "assistant"]
    adv = token_advantages(ep, torch.tensor([0.5, -2.0]))
    assert set(adv[first.start : first.end].tolist()) == {0.5} and set(adv[second.start : second.end].tolist()) == {
        -2.0
    }
    assert adv[: first.start].abs().sum() == 0 and adv[first.end : second.start].abs().sum() == 0
    assert set(token_advantages(ep, torch.tensor([1.5]))[second.start : second.end].tolist()) == {1.5}


def test_mismatch_is_measured_and_tis_weights_are_capped(tiny_policy):
    from rl_core.token_batch import pad_batch, token_logprobs

    policy = copy.deepcopy(tiny_policy)
    episodes = make_episodes(policy)
    # make the sampler's log-probs exactly the trainer's: mismatch 0
    for ep in episodes:
        batch = pad_batch([ep], [torch.zeros(1)], policy.chat.pad_id, policy.device)
        with torch.no_grad():
            logp, _ = token_logprobs(policy.model, batch["tokens"], batch["attention"])
        ep.behavior_logprobs = [float(v) if m else 0.0 for v, m in zip(logp[0].tolist(), ep.loss_mask)]
    m = Trainer(copy.deepcopy(policy), AlgorithmConfig(), OptimizerConfig()).step(episodes)
    assert m.logprob_mismatch_mean < 1e-5 and m.logprob_mismatch_max < 1e-4
    for ep in episodes:  # now the sampler is 0.5 nats more confident on every generated token
        ep.behavior_logprobs = [v + 0.5 if mk else 0.0 for v, mk in zip(ep.behavior_logprobs, ep.loss_mask)]
    m = Trainer(copy.deepcopy(policy), AlgorithmConfig(tis_cap=2.0), OptimizerConfig()).step(episodes)
    assert m.logprob_mismatch_mean == pytest.approx(0.5, abs=1e-4)
    assert m.is_weight_mean == pytest.approx(math.exp(-0.5), rel=1e-3)


def test_kl_penalty_needs_a_reference_and_is_zero_against_itself(tiny_policy):
    with pytest.raises(ValueError, match="reference"):
        Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(kl_coef=0.1), OptimizerConfig())
    policy = copy.deepcopy(tiny_policy)
    m = Trainer(
        policy, AlgorithmConfig(kl_coef=0.1), OptimizerConfig(), reference=copy.deepcopy(tiny_policy.model)
    ).step(make_episodes(policy))
    assert m.ref_kl == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "method",
    [
        "monte_carlo",
        "group_based",
        "group_based_per_turn",
        "rloo",
        "reinforce_pp",
        "reinforce_pp_baseline",
        "opo",
        "grpo_passk",
        "gpg",
    ],
)
def test_every_advantage_method_trains(tiny_policy, method):
    policy = copy.deepcopy(tiny_policy)
    episodes = make_episodes(policy)
    for i, ep in enumerate(episodes):  # two groups of three, rewards (0, 1, 0) and (1, 0, 1)
        ep.group_id = f"g{i // 3}"
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    m = Trainer(policy, AlgorithmConfig(advantage_method=method, pass_k=2), OptimizerConfig(lr=1e-2)).step(episodes)
    assert policy.version == 1 and m.grad_norm > 0
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_reasoning_in_loss_false_trains_as_if_the_reasoning_tokens_were_masked(tiny_policy):
    """algorithm.reasoning_in_loss false: the renderer's reasoning spans get loss mask 0; the update equals
    training on episodes masked by hand, and differs from training on the reasoning."""
    import dataclasses

    policy = copy.deepcopy(tiny_policy)
    text = policy.episode_renderer()

    class FirstTwoTokensReason:  # each policy turn's first two tokens are its "reasoning"
        name, native_tools, stop_id, stop_ids, pad_id = "stub", False, text.stop_id, text.stop_ids, text.pad_id

        def reasoning_spans(self, generated):
            return [(0, 2)]

    policy.renderer = FirstTwoTokensReason()
    episodes = make_episodes(tiny_policy)
    by_hand = []
    for e in episodes:
        mask = list(e.loss_mask)
        for t in e.turns:
            if t.role == "assistant":
                mask[t.start : t.start + 2] = [0, 0]
        by_hand.append(dataclasses.replace(e, loss_mask=mask))

    def trained(p, batch, algorithm):
        p = copy.deepcopy(p)
        metrics = Trainer(p, algorithm, OptimizerConfig(lr=1e-2)).step(batch)
        return {k: v.detach().clone() for k, v in p.model.state_dict().items()}, metrics

    masked, m = trained(policy, episodes, AlgorithmConfig(reasoning_in_loss=False))
    expected, m_hand = trained(tiny_policy, by_hand, AlgorithmConfig())
    unmasked, _ = trained(tiny_policy, episodes, AlgorithmConfig())
    assert m.reasoning_masked_tokens == 2 * 2 * len(episodes) and m.as_dict()["train/reasoning_masked_tokens"] == 24
    assert m.loss_tokens == m_hand.loss_tokens
    assert all(torch.allclose(masked[k], expected[k], atol=1e-6) for k in expected)
    assert any(not torch.allclose(masked[k], unmasked[k], atol=1e-6) for k in expected)
    assert all(e.loss_mask.count(1) > b.loss_mask.count(1) for e, b in zip(episodes, by_hand))  # inputs unchanged
