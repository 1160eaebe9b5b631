"""Issue 9, trainer half: sampling temperature, non-finite steps, truncation masking, mini-batches,
episodes without loss tokens. Every test uses the tiny policy fixture and takes seconds."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rl_core.config import AlgorithmConfig, OptimizerConfig, RunConfig
from rl_core.doctor import diagnose
from rl_core.model.generation import generate_batch
from rl_core.selection import select_episodes, split_mini_batches
from rl_core.store import TrajectoryStore
from rl_core.token_batch import pad_batch, token_logprobs
from rl_core.trainer import Trainer
from rl_core.trajectory import TRAJECTORY_SCHEMA_V1, Episode, Sampling, Turn, episodes_to_table, table_to_episodes
from tests.test_trainer import make_episodes


def snapshot(policy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def sampled_episodes(
    policy, temperature: float, groups: int = 2, group_size: int = 4, record: bool = True, seed: int = 0
) -> list[Episode]:
    """Episodes whose generated tokens and behaviour log-probs come from the policy's own sampler at `temperature`."""
    prompt = policy.tokenizer.encode("Customer asks for a refund on order 4821.")
    prompts = [list(prompt) for _ in range(groups * group_size)]
    generations = generate_batch(
        policy.model.eval(),
        prompts,
        12,
        temperature=temperature,
        stop_id=policy.chat.stop_id,
        pad_id=policy.chat.pad_id,
        generator=torch.Generator().manual_seed(seed),
    )
    episodes = []
    for i, (context, gen) in enumerate(zip(prompts, generations)):
        tokens = context + gen.tokens
        n = len(context)
        sampling = Sampling(temperature, 1.0, 12, "torch", 0) if record else None
        episodes.append(
            Episode(
                "r",
                1,
                0,
                "env",
                f"t{i // group_size}",
                f"g{i // group_size}",
                i % group_size,
                tokens,
                [0] * n + [1] * len(gen.tokens),
                [0.0] * n + list(gen.logprobs),
                [Turn("user", "p", 0, n), Turn("assistant", "a", n, len(tokens))],
                reward=float(i % 2),
                reward_components={},
                success=bool(i % 2),
                finish_reason="answered",
                sampling=sampling,
            )
        )
    return episodes


def exact_behaviour(policy, episodes: list[Episode]) -> list[Episode]:
    """The episodes with behaviour log-probs equal to the trainer's own at T = 1 (a perfectly on-policy sampler)."""
    out = copy.deepcopy(episodes)
    for ep in out:
        batch = pad_batch([ep], [torch.zeros(1)], policy.chat.pad_id, policy.device)
        with torch.no_grad():
            logp, _ = token_logprobs(policy.model, batch["tokens"], batch["attention"])
        ep.behavior_logprobs = [float(v) if m else 0.0 for v, m in zip(logp[0].tolist(), ep.loss_mask)]
    return out


# --- item 1: the sampling temperature ---------------------------------------------------------------


@pytest.mark.parametrize("recorded", [True, False], ids=["sampling-record", "trainer-default"])
def test_first_step_at_temperature_half_is_on_policy(tiny_policy, recorded):
    """Sampled at T = 0.5, the first (fully on-policy) step sees the sampler's own log-probs:
    no mismatch, no clipping."""
    policy = copy.deepcopy(tiny_policy)
    episodes = sampled_episodes(policy, 0.5, record=recorded)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(), temperature=1.0 if recorded else 0.5)
    m = trainer.step(episodes)
    assert m.skipped is None and m.loss_tokens > 20
    assert m.logprob_mismatch_max < 1e-4 and m.logprob_mismatch_mean < 1e-5
    assert m.clip_fraction == 0.0
    # the same batch read as T = 1 (what the trainer did before) is far off the sampler's log-probs
    plain = copy.deepcopy(episodes)
    for ep in plain:
        ep.sampling = None
    off = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig(), temperature=1.0).step(plain)
    assert off.logprob_mismatch_max > 0.1


def test_greedy_episodes_are_trained_at_temperature_one(tiny_policy):
    """T = 0 records log_softmax(logits) (generation.py); the trainer reads it as T = 1, so nothing is off."""
    policy = copy.deepcopy(tiny_policy)
    episodes = sampled_episodes(policy, 0.0)
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig(), temperature=0.5).step(episodes)
    assert m.logprob_mismatch_max < 1e-4 and m.clip_fraction == 0.0


def test_token_logprobs_and_entropy_are_those_of_the_tempered_distribution(tiny_policy):
    ep = make_episodes(tiny_policy, n=2)
    batch = pad_batch(ep, [torch.zeros(1)] * 2, tiny_policy.chat.pad_id, tiny_policy.device)
    temperature = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        logp, entropy = token_logprobs(tiny_policy.model, batch["tokens"], batch["attention"], temperature)
        logits = tiny_policy.model(input_ids=batch["tokens"], attention_mask=batch["attention"]).logits[:, :-1].float()
    expected = torch.log_softmax(logits / temperature[:, None, None], dim=-1)
    torch.testing.assert_close(logp[:, 1:], expected.gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1))
    torch.testing.assert_close(entropy[:, 1:], -(expected.exp() * expected).sum(-1))


def test_kl_reference_uses_the_sampling_temperature(tiny_policy):
    """Against a reference that differs from the policy, ref_kl is that of the tempered distributions."""
    policy = copy.deepcopy(tiny_policy)
    reference = copy.deepcopy(tiny_policy.model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    episodes = make_episodes(policy)
    at = {}
    for t in (1.0, 0.25):
        for ep in episodes:
            ep.sampling = Sampling(t, 1.0, 40, "torch", 0)
        at[t] = (
            Trainer(copy.deepcopy(policy), AlgorithmConfig(kl_coef=0.1), OptimizerConfig(), reference=reference)
            .step(episodes)
            .ref_kl
        )
    assert at[0.25] > 2 * at[1.0] > 0  # sharper distributions differ more


def test_sampling_record_round_trips_and_version_one_batches_still_read(tmp_path, tiny_policy):
    episodes = make_episodes(tiny_policy, n=2)
    for ep in episodes:
        ep.run_id = "run"
    episodes[0].sampling = Sampling(0.7, 0.9, 40, "torch", 0)
    assert [e.sampling for e in table_to_episodes(episodes_to_table(episodes))] == [
        Sampling(0.7, 0.9, 40, "torch", 0),
        None,
    ]
    store = TrajectoryStore(tmp_path)
    store.write("run", 1, episodes)
    assert store.read("run", 1)[0].sampling == Sampling(0.7, 0.9, 40, "torch", 0)
    # rewrite it as a schema-version-1 batch (no sampling column), as an older Turnstile wrote it
    table = store.read_table("run", 1).drop_columns(["sampling", "segment", "stitch_break"]).cast(TRAJECTORY_SCHEMA_V1)
    table = table.replace_schema_metadata(None)
    path, manifest_path = store.path("run", 1), store.manifest_path("run", 1)
    pq.write_table(table, path, compression="zstd")
    data = path.read_bytes()
    manifest = json.loads(manifest_path.read_text()) | {
        "schema_version": 1,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))
    read = store.read("run", 1)
    assert [e.sampling for e in read] == [None, None] and read[0].tokens == episodes[0].tokens
    assert store.read_table("run", 1).column("sampling").null_count == 2


def test_a_sampling_record_no_sampler_can_have_used_is_refused(tiny_policy):
    ep = make_episodes(tiny_policy, n=1)[0]
    ep.sampling = Sampling(-1.0, 1.0, 40, "torch", 0)
    with pytest.raises(ValueError, match="sampling.temperature"):
        episodes_to_table([ep])


# --- item 3: non-finite rewards, losses and gradients ------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["rloo", "monte_carlo", "opo", "gpg", "group_based", "reinforce_pp"])
def test_a_non_finite_reward_is_never_trained_on(tiny_policy, method, bad):
    episodes = make_episodes(tiny_policy, n=8)  # groups g0..g3, rewards (0, 1)
    for i, ep in enumerate(episodes):
        ep.group_id = f"g{i // 4}"  # two groups of four
        ep.reward = [0.0, 1.0, 0.5, 1.0][i % 4]
    poisoned = copy.deepcopy(episodes)
    poisoned[2].reward = bad
    algorithm = AlgorithmConfig(advantage_method=method)
    policy, clean_policy = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_policy)
    m = Trainer(policy, algorithm, OptimizerConfig(lr=1e-2)).step(poisoned)
    Trainer(clean_policy, algorithm, OptimizerConfig(lr=1e-2)).step(episodes[:2] + episodes[3:])
    assert m.skipped is None and m.nonfinite_reward_dropped == 1 and m.episodes == 7
    weights = snapshot(policy)
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    assert_same_weights(weights, snapshot(clean_policy))  # the others' advantages are what they are without it
    kept = select_episodes(poisoned, algorithm, 0).train
    trainer = Trainer(copy.deepcopy(tiny_policy), algorithm, OptimizerConfig())
    expected = trainer.advantages(episodes[:2] + episodes[3:])
    assert all(torch.equal(a, b) for a, b in zip(trainer.advantages(kept), expected))
    assert all(bool(torch.isfinite(a).all()) for a in expected) and any(float(a.abs().max()) > 0 for a in expected)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_reward_component_is_never_trained_on(tiny_policy, bad):
    """A finite total with a non-finite component (hand-built, or re-scored) is the same environment fault."""
    episodes = make_episodes(tiny_policy, n=8)
    for ep in episodes:
        ep.reward_components = {"answer": ep.reward}
    poisoned = copy.deepcopy(episodes)
    poisoned[2].reward_components["format"] = bad
    selection = select_episodes(poisoned, AlgorithmConfig(), 0)
    assert selection.nonfinite_reward == 1 and [e.sample_index for e in selection.train if e.task_id == "t1"] == [1]
    policy, clean = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_policy)
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2)).step(poisoned)
    Trainer(clean, AlgorithmConfig(), OptimizerConfig(lr=1e-2)).step(episodes[:2] + episodes[3:])
    assert m.nonfinite_reward_dropped == 1 and m.episodes == 7
    assert_same_weights(snapshot(policy), snapshot(clean))


def optimizer_state(trainer) -> dict:
    return copy.deepcopy(trainer.optimizer.state_dict())


def assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        for key, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][key]), (index, key)


def test_a_non_finite_loss_leaves_weights_and_optimizer_state_untouched(tiny_policy, caplog):
    policy = copy.deepcopy(tiny_policy)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2))
    trainer.step(make_episodes(policy))  # AdamW now has exp_avg / exp_avg_sq to protect
    weights, state = snapshot(policy), optimizer_state(trainer)
    bad = make_episodes(policy, seed=1)
    for ep in bad:
        ep.policy_version = 1
    first_generated = bad[3].loss_mask.index(1)
    bad[3].behavior_logprobs[first_generated] = math.nan
    with caplog.at_level(logging.WARNING, logger="rl_core.trainer"):
        m = trainer.step(bad)
    assert m.skipped is not None and "non-finite loss" in m.skipped and m.as_dict()["train/step_skipped"] == 1.0
    assert m.nonfinite_steps == 1 and m.as_dict()["train/nonfinite_step"] == 1.0 and m.optimizer_steps == 0
    assert policy.version == 1 and m.step == 1
    assert_same_weights(snapshot(policy), weights)
    assert_same_optimizer_state(optimizer_state(trainer), state)
    assert any(
        "optimizer step skipped" in r.getMessage() and "non-finite loss" in r.getMessage() for r in caplog.records
    )
    assert all(
        p.grad is None or not p.grad.abs().sum() for p in policy.model.parameters()
    )  # nothing left to leak into the next step


def test_a_non_finite_gradient_norm_is_not_stepped(tiny_policy):
    """A finite loss whose gradient is not finite (here forced by a hook on one weight)."""
    policy = copy.deepcopy(tiny_policy)
    trainer = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2))
    trainer.step(make_episodes(policy))
    weights, state = snapshot(policy), optimizer_state(trainer)
    weight = next(p for p in policy.model.parameters() if p.requires_grad)
    handle = weight.register_hook(lambda grad: grad * math.inf)
    episodes = make_episodes(policy, seed=2)
    for ep in episodes:
        ep.policy_version = 1
    m = trainer.step(episodes)
    handle.remove()
    assert m.skipped is not None and "non-finite gradient norm" in m.skipped and math.isfinite(m.loss)
    assert policy.version == 1
    assert_same_weights(snapshot(policy), weights)
    assert_same_optimizer_state(optimizer_state(trainer), state)
    assert trainer.step(episodes).skipped is None and policy.version == 2  # the next clean step trains normally


def test_with_mini_batches_only_the_non_finite_step_is_skipped(tiny_policy):
    policy = copy.deepcopy(tiny_policy)
    episodes = make_episodes(policy, n=8)  # four groups: mini-batches g0+g1 and g2+g3
    episodes[6].behavior_logprobs[episodes[6].loss_mask.index(1)] = math.nan
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig(mini_batches_per_step=2)).step(episodes)
    assert m.skipped is None and m.optimizer_steps == 1 and m.nonfinite_steps == 1 and policy.version == 1
    assert all(bool(torch.isfinite(v).all()) for v in snapshot(policy).values())


def test_the_doctor_names_a_non_finite_step():
    cfg = RunConfig.model_validate({"optimizer": {"lr": 3e-4}})
    history = [{"step": s, "train/nonfinite_step": 0.0} for s in range(1, 5)] + [
        {"step": 4, "train/nonfinite_step": 1.0}
    ]
    (finding,) = [f for f in diagnose(history, cfg) if f.symptom == "nonfinite_step"]
    assert (finding.metric, finding.value, finding.threshold, finding.step) == ("train/nonfinite_step", 1.0, 0.0, 4)
    assert "behavior_logprobs" in finding.first_change and "optimizer.lr (now 0.0003" in finding.first_change
    assert not [f for f in diagnose(history[:-1], cfg) if f.symptom == "nonfinite_step"]


# --- item 5: algorithm.mask_truncated ---------------------------------------------------------------


def truncation_group(policy) -> list[Episode]:
    """One refunds-like group of 4: correct (1), wrong (0), two cut at the per-turn token cap (-0.1)."""
    episodes = make_episodes(policy, n=4)
    for ep, reward, reason in zip(episodes, [1.0, 0.0, -0.1, -0.1], ["answered", "answered", "token_cap", "token_cap"]):
        ep.group_id, ep.reward, ep.finish_reason, ep.success = "g0", reward, reason, reward == 1.0
    return episodes


def test_masked_truncated_episodes_leave_the_baseline_and_the_loss(tiny_policy):
    episodes = truncation_group(tiny_policy)
    unmasked = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig())
    before = [float(a) for a in unmasked.advantages(episodes)]
    assert before[2] == pytest.approx(-0.5603, abs=1e-4)  # today: harsher than the wrong answer
    algorithm = AlgorithmConfig(mask_truncated=["token_cap"])
    selection = select_episodes(episodes, algorithm, 0)
    assert [e.sample_index for e in selection.train] == [0, 1] and selection.truncated_masked == 2
    std = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)  # sample std of the judged rewards (1, 0)
    advantages = [float(a) for a in unmasked.advantages(selection.train)]
    assert advantages == pytest.approx([0.5 / (std + 1e-6), -0.5 / (std + 1e-6)], abs=1e-6)
    policy, reference = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_policy)
    m = Trainer(policy, algorithm, OptimizerConfig(lr=1e-2)).step(episodes)
    assert m.truncated_masked == 2 and m.as_dict()["train/truncated_masked"] == 2.0
    assert m.loss_tokens == episodes[0].response_tokens + episodes[1].response_tokens
    # zero gradient contribution: the same update as a batch without the truncated episodes at all
    Trainer(reference, AlgorithmConfig(), OptimizerConfig(lr=1e-2)).step(episodes[:2])
    assert_same_weights(snapshot(policy), snapshot(reference))


def test_dynamic_sampling_judges_groups_by_their_judged_members(tmp_path, monkeypatch):
    """zero_variance_groups=resample refills the batch with groups the trainer will train on: a group whose
    only reward difference is a masked truncated (or env_error) member has no signal and is resampled."""
    from rl_core.config import load_config
    from rl_core.run import TrainingRun

    cfg = load_config(
        None,
        [
            "rollout.group_size=2",
            "rollout.global_batch_size=4",
            "algorithm.zero_variance_groups=resample",
            "algorithm.mask_truncated=[token_cap]",
            f"storage.run_dir={tmp_path}",
            "storage.run_id=dyn",
        ],
    )
    run = TrainingRun(cfg)
    rounds = iter(
        [
            [("a", 1.0, "answered"), ("a", 0.0, "token_cap"), ("b", 1.0, "answered"), ("b", 0.0, "answered")],
            [("c", 1.0, "answered"), ("c", 0.0, "env_error")],
            [("d", 0.0, "answered"), ("d", 1.0, "answered")],
        ]
    )

    def collected(policy, iteration, work, first_group):
        out = []
        for i, (group, reward, reason) in enumerate(next(rounds)):
            ep = make_episodes(run.policy, n=1, seed=i)[0]
            ep.group_id, ep.reward, ep.finish_reason = group, reward, reason
            out.append(ep)
        return out

    monkeypatch.setattr(run.collector, "_play", collected)
    episodes = run.collect(1)
    assert [(e.group_id, e.reward) for e in episodes] == [("b", 1.0), ("b", 0.0), ("d", 0.0), ("d", 1.0)]
    assert select_episodes(episodes, cfg.algorithm, 0).zero_variance == 0


def test_mask_truncated_off_keeps_todays_training(tiny_policy):
    episodes = truncation_group(tiny_policy)
    m = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig()).step(episodes)
    assert m.truncated_masked == 0 and m.loss_tokens == sum(e.response_tokens for e in episodes)


def test_a_batch_of_only_masked_episodes_is_a_skipped_step(tiny_policy):
    episodes = truncation_group(tiny_policy)
    for ep in episodes:
        ep.finish_reason = "context_overflow"
    policy = copy.deepcopy(tiny_policy)
    m = Trainer(policy, AlgorithmConfig(mask_truncated=["context_overflow"]), OptimizerConfig()).step(episodes)
    assert policy.version == 0 and m.optimizer_steps == 0
    assert (
        m.skipped == "nothing to train on: all 4 episodes were truncated "
        "and masked (algorithm.mask_truncated=['context_overflow'])"
    )


# --- nothing to train on (StepMetrics.skipped) -------------------------------------------------------


def test_skipped_reasons_name_what_removed_the_episodes(tiny_policy):
    episodes = make_episodes(tiny_policy, n=4)
    for ep in episodes:
        ep.reward = 0.0
    policy = copy.deepcopy(tiny_policy)
    m = Trainer(policy, AlgorithmConfig(zero_variance_groups="drop"), OptimizerConfig()).step(episodes)
    assert policy.version == 0 and m.step == 0 and m.as_dict()["train/step_skipped"] == 1.0
    assert m.skipped == (
        "nothing to train on: all 4 episodes were in groups whose rewards were all equal, "
        "dropped (algorithm.zero_variance_groups=drop)"
    )
    for ep in episodes:
        ep.finish_reason = "env_error"
    assert (
        "all 4 episodes were env_error" in Trainer(policy, AlgorithmConfig(), OptimizerConfig()).step(episodes).skipped
    )
    fresh = make_episodes(tiny_policy, n=4)
    policy.version = 9
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig()).step(fresh)
    assert "all 4 episodes were stale" in m.skipped and m.stale_dropped == 4
    assert (
        Trainer(policy, AlgorithmConfig(), OptimizerConfig()).step([]).skipped
        == "nothing to train on: the batch is empty"
    )


# --- item 11: mini-batches and epochs -----------------------------------------------------------------


def test_two_mini_batches_take_two_steps_and_the_clip_acts(tiny_policy):
    episodes = exact_behaviour(tiny_policy, make_episodes(tiny_policy, n=8))
    one = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig(lr=0.05)).step(episodes)
    assert one.clip_fraction == 0.0 and one.optimizer_steps == 1
    policy = copy.deepcopy(tiny_policy)
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=0.05, mini_batches_per_step=2)).step(episodes)
    assert (
        policy.version == 2 and m.step == 2 and m.optimizer_steps == 2 and m.as_dict()["train/optimizer_steps"] == 2.0
    )
    assert m.clip_fraction > 0.0  # the first mini-batch is exactly on-policy (ratio 1), so the clipping is the second's
    assert m.logprob_mismatch_max < 1e-4  # measured with the iteration's starting weights only


def test_epochs_repeat_the_mini_batches_and_staleness_is_judged_once(tiny_policy):
    policy = copy.deepcopy(tiny_policy)
    episodes = make_episodes(policy, n=8)
    m = Trainer(
        policy, AlgorithmConfig(max_steps_off_policy=0), OptimizerConfig(mini_batches_per_step=2, epochs_per_batch=3)
    ).step(episodes)
    assert policy.version == 6 and m.optimizer_steps == 6 and m.stale_dropped == 0 and m.episodes == 8


def test_one_mini_batch_one_epoch_is_the_single_full_batch_step(tiny_policy):
    """The default takes exactly the old update: one AdamW step on the whole batch's loss."""
    from rl_core.losses import policy_loss

    episodes = make_episodes(tiny_policy)
    policy = copy.deepcopy(tiny_policy)
    m = Trainer(policy, AlgorithmConfig(), OptimizerConfig(lr=1e-2)).step(episodes)
    by_hand = copy.deepcopy(tiny_policy)
    trainer = Trainer(by_hand, AlgorithmConfig(), OptimizerConfig(lr=1e-2))
    batch = pad_batch(episodes, trainer.advantages(episodes), by_hand.chat.pad_id, by_hand.device)
    logp, _ = token_logprobs(by_hand.model, batch["tokens"], batch["attention"])
    loss, _ = policy_loss(
        "ppo",
        logp,
        batch["old_logprobs"],
        batch["advantages"],
        batch["mask"],
        clip_low=0.8,
        clip_high=1.2,
        total_tokens=sum(e.response_tokens for e in episodes),
        total_sequences=len(episodes),
    )
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in by_hand.model.parameters()], 1.0)
    trainer.optimizer.step()
    assert m.loss == pytest.approx(float(loss), abs=1e-6) and m.grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert policy.version == 1
    for name, value in snapshot(by_hand).items():
        torch.testing.assert_close(snapshot(policy)[name], value, rtol=1e-5, atol=1e-6)


def test_mini_batches_are_whole_groups_in_batch_order(tiny_policy):
    episodes = make_episodes(tiny_policy, n=8)  # g0 g0 g1 g1 g2 g2 g3 g3
    assert split_mini_batches(episodes, 1) == [list(range(8))]
    assert split_mini_batches(episodes, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_mini_batches(episodes, 3) == [[0, 1], [2, 3, 4, 5], [6, 7]]
    assert split_mini_batches(episodes[:2], 2) == [[0], [1]]  # one group: whole episodes
    assert split_mini_batches(episodes[:1], 4) == [[0]]


def test_overlap_needs_one_iteration_of_optimizer_steps_of_staleness():
    with pytest.raises(ValueError, match="algorithm.max_steps_off_policy >= 4"):
        RunConfig.model_validate(
            {
                "rollout": {"overlap_collection": True},
                "algorithm": {"max_steps_off_policy": 3},
                "optimizer": {"mini_batches_per_step": 2, "epochs_per_batch": 2},
            }
        )


def test_tis_cap_with_mini_batches_keeps_pi_old_at_the_iterations_start(tiny_policy):
    """With tis_cap, pi_old is the trainer before the iteration's first step, so later mini-batches
    see the ratio move."""
    episodes = exact_behaviour(tiny_policy, make_episodes(tiny_policy, n=8))
    m = Trainer(
        copy.deepcopy(tiny_policy), AlgorithmConfig(tis_cap=2.0), OptimizerConfig(lr=0.05, mini_batches_per_step=2)
    ).step(episodes)
    assert m.optimizer_steps == 2 and m.clip_fraction > 0.0
    assert m.logprob_mismatch_max < 1e-4 and m.is_weight_mean == pytest.approx(1.0, abs=1e-4)


# --- item 14: episodes without loss tokens and length-sorted micro-batches -------------------------------


def long_overflowed(policy, n: int, length: int) -> list[Episode]:
    """Episodes of `length` tokens that overflowed their context before generating anything (no loss token)."""
    out = []
    for i in range(n):
        tokens = torch.randint(5, len(policy.tokenizer), (length,), generator=torch.Generator().manual_seed(i)).tolist()
        out.append(
            Episode(
                "r",
                1,
                0,
                "env",
                f"overflow{i}",
                f"overflow{i}",
                0,
                tokens,
                [0] * length,
                [0.0] * length,
                [Turn("user", "p", 0, length)],
                reward=0.0,
                reward_components={},
                success=False,
                finish_reason="context_overflow",
            )
        )
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_episodes_without_loss_tokens_never_reach_the_model(tiny_policy, aggregation):
    episodes = make_episodes(tiny_policy, n=6)
    batch = episodes[:3] + long_overflowed(tiny_policy, 2, 400) + episodes[3:]
    algorithm = AlgorithmConfig(advantage_method="rloo", loss_aggregation=aggregation)
    results = {}
    for name, data in (("with", batch), ("without", episodes)):
        policy = copy.deepcopy(tiny_policy)
        widths: list[int] = []
        policy.model.register_forward_pre_hook(
            lambda module, args, kwargs, widths=widths: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        m = Trainer(policy, algorithm, OptimizerConfig(lr=1e-2, micro_batch_size=4)).step(data)
        results[name] = (m, snapshot(policy), widths)
    (m_with, w_with, widths), (m_without, w_without, _) = results["with"], results["without"]
    assert max(widths) < 400 and len(widths) == 2 and m_with.no_loss_token_episodes == 2
    assert m_with.loss == pytest.approx(m_without.loss, abs=1e-7) and m_with.grad_norm == pytest.approx(
        m_without.grad_norm, rel=1e-6
    )
    for name in w_with:
        torch.testing.assert_close(w_with[name], w_without[name], rtol=0, atol=0)


def test_micro_batches_group_episodes_of_similar_length(tiny_policy):
    episodes = make_episodes(tiny_policy, n=8)
    lengths = [len(e.tokens) for e in episodes]
    policy = copy.deepcopy(tiny_policy)
    widths: list[int] = []
    policy.model.register_forward_pre_hook(
        lambda module, args, kwargs, widths=widths: widths.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    Trainer(policy, AlgorithmConfig(), OptimizerConfig(micro_batch_size=2)).step(episodes)
    ordered = sorted(lengths)
    assert widths == [max(ordered[i : i + 2]) for i in range(0, 8, 2)]
    whole = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig(micro_batch_size=8)).step(episodes)
    parts = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(), OptimizerConfig(micro_batch_size=2)).step(episodes)
    assert parts.loss == pytest.approx(whole.loss, abs=1e-6) and parts.grad_norm == pytest.approx(
        whole.grad_norm, rel=1e-5
    )


def test_the_schema_column_is_the_designs_sampling_struct():
    from rl_core.trajectory import SAMPLING_TYPE, TRAJECTORY_SCHEMA

    assert TRAJECTORY_SCHEMA.field("sampling").type == SAMPLING_TYPE
    assert [f.name for f in SAMPLING_TYPE] == [
        "temperature",
        "top_p",
        "max_tokens_per_turn",
        "backend",
        "policy_version",
    ]
    assert pa.types.is_struct(SAMPLING_TYPE)


# --- the DeepSpeed backend skips non-finite steps too ------------------------------------------------


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_deepspeed_skips_a_non_finite_step_and_then_trains_like_torch(tiny_policy, zero_stage, fault):
    """After a skipped step (its gradients discarded) the next clean step equals the torch backend's."""
    from rl_core.config import TrainerConfig

    algorithm, optimizer = (
        AlgorithmConfig(loss_fn="cispo", advantage_method="rloo"),
        OptimizerConfig(lr=1e-2, micro_batch_size=2),
    )
    clean, bad = make_episodes(tiny_policy), make_episodes(tiny_policy, seed=1)
    if fault == "loss":
        bad[1].behavior_logprobs[bad[1].loss_mask.index(1)] = math.nan
    torch_policy = copy.deepcopy(tiny_policy)
    torch_trainer = Trainer(torch_policy, algorithm, optimizer)
    for _ in range(2):
        torch_trainer.step(clean)
    policy = copy.deepcopy(tiny_policy)
    trainer = Trainer(
        policy, algorithm, optimizer, trainer_cfg=TrainerConfig(backend="deepspeed", zero_stage=zero_stage)
    )
    trainer.step(clean)
    weights, state = snapshot(policy), optimizer_state(trainer)
    handle = None
    if fault == "gradient":
        weight = next(p for p in policy.model.parameters() if p.requires_grad)
        handle = weight.register_hook(lambda grad: grad * math.inf)
    for ep in bad:
        ep.policy_version = 1
    m = trainer.step(bad)
    if handle is not None:
        handle.remove()
    assert m.skipped is not None and m.nonfinite_steps == 1 and policy.version == 1
    assert_same_weights(snapshot(policy), weights)
    assert_same_optimizer_state(optimizer_state(trainer), state)
    for ep in clean:
        ep.policy_version = 1
    assert trainer.step(clean).skipped is None and policy.version == 2
    atol = 2e-5 if zero_stage == 3 else 1e-6
    for name, value in snapshot(torch_policy).items():
        torch.testing.assert_close(
            snapshot(policy)[name], value, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_opo_with_a_group_that_generated_nothing_trains_the_others(tiny_policy):
    episodes = make_episodes(tiny_policy, n=4)
    silent = long_overflowed(tiny_policy, 2, 30)
    for ep in silent:
        ep.group_id, ep.reward = "silent", [0.0, 1.0][silent.index(ep)]
    algorithm = AlgorithmConfig(advantage_method="opo")
    policy, reference = copy.deepcopy(tiny_policy), copy.deepcopy(tiny_policy)
    m = Trainer(policy, algorithm, OptimizerConfig(lr=1e-2)).step(episodes + silent)
    Trainer(reference, algorithm, OptimizerConfig(lr=1e-2)).step(episodes)
    assert m.skipped is None and m.no_loss_token_episodes == 2
    assert_same_weights(snapshot(policy), snapshot(reference))


# --- item 3 in `turnstile train`: a wholly non-finite step is logged and named by the doctor ---------------


def test_the_train_flow_logs_and_names_an_iteration_whose_only_step_was_not_finite(
    prefect_harness, tmp_path, monkeypatch
):
    """With one optimizer step per batch (the default), a non-finite step leaves the iteration without a step:
    it is still logged as train/nonfinite_step and the doctor names it (run history and summary)."""
    from mlflow import MlflowClient

    from rl_core.model.backends import TorchBackend
    from rl_core.runs import records as run_records
    from tests.test_train_flow import run_flow

    clean_step, calls = TorchBackend.step, []

    def first_step_not_finite(self):
        calls.append(1)
        if len(calls) == 1:  # iteration 1's only optimizer step: a NaN gradient norm
            self.zero_grad()
            return math.nan
        return clean_step(self)

    monkeypatch.setattr(TorchBackend, "step", first_step_not_finite)
    summary = run_flow(tmp_path, "nan", ["evaluation.val_every=10"])
    first, second = [r.to_dict() for r in run_records.read_history(tmp_path / "nan")]
    assert (first["trained"], first["skipped_by"], first["step"]) == (False, "trainer", 0)
    assert "non-finite gradient norm" in first["reason"] and first["train/nonfinite_step"] == 1.0
    assert [f["symptom"] for f in first["findings"]] == ["nonfinite_step"]
    assert second["trained"] and second["step"] == 1 and second["train/nonfinite_step"] == 0.0
    assert [f["symptom"] for f in summary["findings"]].count("nonfinite_step") == 1
    client = MlflowClient(summary["mlflow_uri"])
    logged = client.get_metric_history(summary["mlflow_run_id"], "train/nonfinite_step")
    assert [(m.step, m.value) for m in logged] == [(1, 1.0), (2, 0.0)]
    assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], "doctor/nonfinite_step")] == [1]


def test_a_skipped_step_records_only_its_counts():
    """A skipped step's loss, clip fraction... are no step's: only the counts are recorded and logged."""
    from rl_core.trainer import SKIPPED_STEP_METRICS, StepMetrics

    applied = StepMetrics(
        step=1,
        loss=0.5,
        clip_fraction=0.1,
        approx_kl=0.0,
        entropy=1.0,
        grad_norm=0.3,
        loss_tokens=7,
        episodes=2,
        stale_dropped=0,
    )
    assert applied.recorded() == applied.as_dict()
    skipped = StepMetrics(
        step=0,
        loss=0.0,
        clip_fraction=0.0,
        approx_kl=0.0,
        entropy=0.0,
        grad_norm=0.0,
        loss_tokens=0,
        episodes=0,
        stale_dropped=4,
        skipped="nothing to train on: all 4 episodes were stale",
    )
    assert set(skipped.recorded()) == set(SKIPPED_STEP_METRICS)
    assert skipped.recorded()["train/step_skipped"] == 1.0 and skipped.recorded()["rollout/stale_dropped"] == 4.0
