"""Packed micro-batches (issue 16, item 3): episodes end to end in one row, position ids restarting per episode.

Packed log-probs, entropies, losses and gradients must equal the padded ones, and an episode must
not attend to the one packed before it, on the tiny Llama policy and a tiny random-init Qwen3.

Tolerances: both layouts run the same float32 weights on the same tokens, but the packed forward
pass attends over a [total_tokens, total_tokens] mask instead of [width, width] ones, so the
attention and matmul reductions run in a different order (and over a different number of masked
keys). Measured on CPU (sdpa and eager): log-probs and entropies (about 5.7 nats) differ by at most
3e-6, i.e. a few float32 ulps (1 ulp = 4.8e-7 at 4-8); LOGPROB_ATOL = 1e-5 leaves room for other
CPUs and BLAS builds, and is four orders of magnitude below what a leak across episodes moves
(0.2 nats and more, `test_without_position_reset_packing_leaks_across_episodes`).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from rl_core.losses import policy_loss
from rl_core.model.packed_attention import episode_bounds, use_packed_attention
from rl_core.token_batch import PACKED_KEYS, batch_logprobs, micro_batch, pad_batch
from rl_core.trajectory import Episode, Sampling, Turn
from tests.test_trainer import make_episodes

LOGPROB_ATOL = 1e-5  # nats, per token (module docstring)
LOSS_RTOL = 1e-5  # the loss is a mean of per-token terms built from log-probs within LOGPROB_ATOL
GRAD_ATOL = 1e-8  # per parameter entry; measured differences are at most 3e-10 on gradients up to 5e-3
CPU = torch.device("cpu")


def episodes_of_lengths(vocab: int, lengths: list[int], seed: int = 0) -> list[Episode]:
    """Episodes of random tokens of the given lengths: a prompt of a third (at least 1 token), then one
    generated turn; a 1-token episode is all prompt (no loss token)."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for i, n in enumerate(lengths):
        tokens = torch.randint(5, vocab, (n,), generator=g).tolist()
        prompt = n if n == 1 else max(1, n // 3)
        mask = [0] * prompt + [1] * (n - prompt)
        logprobs = [-0.4 - 0.05 * (j % 5) if m else 0.0 for j, m in enumerate(mask)]
        turns = [Turn("user", "p", 0, prompt)] + ([Turn("assistant", "a", prompt, n)] if n > prompt else [])
        episodes.append(
            Episode(
                "r", 1, 0, "env", f"t{i}", f"g{i}", 0, tokens, mask, logprobs, turns, float(i % 2), {}, True, "answered"
            )
        )
    return episodes


def with_temperatures(episodes: list[Episode], temperatures: list[float | None]) -> list[Episode]:
    """Copies of the episodes recorded as sampled at the given temperatures (None: not recorded)."""
    return [
        dataclasses.replace(ep, sampling=None if t is None else Sampling(t, 1.0, 40, "torch", 0))
        for ep, t in zip(episodes, temperatures)
    ]


def advantages_for(episodes: list[Episode]) -> list[torch.Tensor]:
    """One advantage per episode, alternating in sign, so the loss has gradient."""
    return [torch.tensor([1.0 if i % 2 else -0.7]) for i in range(len(episodes))]


@pytest.fixture(params=["llama", "qwen3"])
def model(request, tiny_policy):
    """The tiny Llama policy's model, or a tiny random-init Qwen3 (q/k norms, grouped KV heads) on the same vocab."""
    if request.param == "llama":
        return tiny_policy.model
    config = Qwen3Config(
        vocab_size=len(tiny_policy.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config)


LENGTH_MIXES = {
    "one episode": [17],
    "equal lengths": [12, 12, 12, 12],
    "very different lengths": [1, 2, 150, 5, 40],
}


def mixes(vocab: int, policy) -> dict[str, list[Episode]]:
    """Every length mix: the fixed ones above and make_episodes' random lengths (12 to 28 tokens), with
    per-episode temperatures (0 = greedy, trained at 1; None = the trainer's default)."""
    out = {name: episodes_of_lengths(vocab, lengths) for name, lengths in LENGTH_MIXES.items()}
    out["random lengths"] = make_episodes(policy, n=6)
    temps = [0.7, 1.0, 1.3, 0.0, None, 0.9]
    return {name: with_temperatures(eps, temps[: len(eps)]) for name, eps in out.items()}


def both_layouts(episodes, pad_id=0, default_temperature=1.0):
    advantages = advantages_for(episodes)
    padded = micro_batch(episodes, advantages, pad_id, CPU, default_temperature)
    packed = micro_batch(episodes, advantages, pad_id, CPU, default_temperature, packed=True)
    return padded, packed


def test_packed_layout_holds_the_padded_tensors_and_the_episodes_end_to_end(tiny_policy):
    episodes = with_temperatures(make_episodes(tiny_policy, n=5), [0.5, None, 1.0, 0.0, 2.0])
    advantages = advantages_for(episodes)
    reference = pad_batch(episodes, advantages, 3, CPU, 0.8)
    padded, packed = both_layouts(episodes, pad_id=3, default_temperature=0.8)
    assert padded.keys() == reference.keys()
    assert set(packed) == set(reference) | set(PACKED_KEYS)
    for key, value in reference.items():
        assert torch.equal(padded[key], value), key
        assert torch.equal(packed[key], value), key
    lengths = [len(e.tokens) for e in episodes]
    total = sum(lengths)
    assert packed["packed_tokens"].shape == packed["position_ids"].shape == (1, total)
    assert packed["packed_tokens"][0].tolist() == [t for e in episodes for t in e.tokens]
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    rows, columns = packed["packed_rows"], packed["packed_columns"]
    assert rows.tolist() == [r for r, n in enumerate(lengths) for _ in range(n)]
    assert torch.equal(packed["tokens"][rows, columns], packed["packed_tokens"][0])
    assert packed["temperature"].tolist() == pytest.approx([0.5, 0.8, 1.0, 1.0, 2.0])


def set_attention(model, attention: str) -> None:
    """sdpa, eager, or "episodes": sdpa with a packed row's attention computed episode by episode (trainer.packing's
    use_packed_attention)."""
    model.set_attn_implementation("sdpa" if attention == "episodes" else attention)
    if attention == "episodes":
        use_packed_attention(model)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "episodes"])
def test_packed_logprobs_and_entropies_equal_the_padded_ones(model, tiny_policy, attention):
    set_attention(model, attention)
    for name, episodes in mixes(model.config.vocab_size, tiny_policy).items():
        padded, packed = both_layouts(episodes)
        with torch.no_grad():
            logp_pad, ent_pad = batch_logprobs(model, padded)
            logp_pack, ent_pack = batch_logprobs(model, packed)
        assert logp_pack.shape == ent_pack.shape == padded["tokens"].shape, name
        assert logp_pack.dtype == ent_pack.dtype == torch.float32, name
        inside = padded["attention"].bool()
        # padded rows carry the model's values for pad tokens (the loss masks them); packed ones are 0 there
        assert not logp_pack[~inside].any() and not ent_pack[~inside].any(), name
        assert not logp_pack[:, 0].any() and not ent_pack[:, 0].any(), name  # an episode's first token: no prefix
        assert (logp_pack - logp_pad)[inside].abs().max() <= LOGPROB_ATOL, name
        assert (ent_pack - ent_pad)[inside].abs().max() <= LOGPROB_ATOL, name
        if len(episodes) > 1:  # the log-probs do vary, so agreement is not trivial
            assert logp_pad[inside][1:].std() > 0.05, name


def test_without_position_reset_packing_leaks_across_episodes(model, tiny_policy):
    """The equality above can fail: with positions 0..total-1 (no reset) the model sees one sequence."""
    episodes = make_episodes(tiny_policy, n=4)
    padded, packed = both_layouts(episodes)
    packed["position_ids"] = torch.arange(packed["packed_tokens"].shape[1])[None]
    with torch.no_grad():
        logp_pad, _ = batch_logprobs(model, padded)
        logp_leak, _ = batch_logprobs(model, packed)
    later = padded["attention"].bool()
    later[0] = False  # episode 0 has nothing before it
    later[:, 0] = False
    assert (logp_leak - logp_pad)[later].abs().max() > 1000 * LOGPROB_ATOL


@pytest.mark.parametrize("attention", ["sdpa", "episodes"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_packed_loss_and_gradients_equal_the_padded_ones(model, tiny_policy, aggregation, attention):
    set_attention(model, attention)
    episodes = with_temperatures(episodes_of_lengths(model.config.vocab_size, [4, 30, 9, 2, 21], seed=1), [0.8] * 5)
    padded, packed = both_layouts(episodes)
    total_tokens = sum(e.response_tokens for e in episodes)
    results = []
    for batch in (padded, packed):
        trained = copy.deepcopy(model)
        logprobs, _ = batch_logprobs(trained, batch)
        loss, stats = policy_loss(
            "ppo",
            logprobs,
            batch["old_logprobs"],
            batch["advantages"],
            batch["mask"],
            clip_low=0.8,
            clip_high=1.2,
            aggregation=aggregation,
            total_tokens=total_tokens,
            total_sequences=len(episodes),
        )
        loss.backward()
        results.append((loss.detach(), stats, {n: p.grad.clone() for n, p in trained.named_parameters()}))
    (loss_pad, stats_pad, grad_pad), (loss_pack, stats_pack, grad_pack) = results
    assert loss_pack == pytest.approx(float(loss_pad), rel=LOSS_RTOL)
    assert stats_pack.tokens == stats_pad.tokens == total_tokens
    assert stats_pack.ratio_sum == pytest.approx(stats_pad.ratio_sum, rel=LOSS_RTOL)
    assert grad_pad.keys() == grad_pack.keys()
    for name in grad_pad:
        assert grad_pad[name].abs().max() > 0, name  # every parameter gets gradient, so each comparison counts
        torch.testing.assert_close(grad_pack[name], grad_pad[name], rtol=0, atol=GRAD_ATOL, msg=name)


@pytest.mark.parametrize("position_reset", [True, False])
def test_an_episode_does_not_attend_to_the_episode_packed_before_it(model, tiny_policy, position_reset):
    """Changing episode 0's tokens leaves the packed log-probs of episodes 1.. unmoved; without the position
    reset (the control) they move, so the check can fail."""
    episodes = make_episodes(tiny_policy, n=3)
    changed = copy.deepcopy(episodes)
    g = torch.Generator().manual_seed(7)
    changed[0].tokens = torch.randint(5, model.config.vocab_size, (len(episodes[0].tokens),), generator=g).tolist()
    assert changed[0].tokens != episodes[0].tokens
    logprobs = []
    for eps in (episodes, changed):
        _, packed = both_layouts(eps)
        if not position_reset:
            packed["position_ids"] = torch.arange(packed["packed_tokens"].shape[1])[None]
        with torch.no_grad():
            logprobs.append(batch_logprobs(model, packed)[0])
    moved = (logprobs[1][1:] - logprobs[0][1:]).abs().max()
    if position_reset:
        assert moved <= LOGPROB_ATOL
        assert (logprobs[1][0] - logprobs[0][0]).abs().max() > 1000 * LOGPROB_ATOL  # episode 0 itself did change
    else:
        assert moved > 1000 * LOGPROB_ATOL


@pytest.mark.parametrize("packed", [False, True])
def test_bad_micro_batches_are_rejected_with_the_problem_named(tiny_policy, packed):
    episodes = make_episodes(tiny_policy, n=2)
    with pytest.raises(ValueError, match="at least one episode"):
        micro_batch([], [], 0, CPU, packed=packed)
    empty = copy.deepcopy(episodes)
    empty[1].tokens, empty[1].loss_mask, empty[1].behavior_logprobs, empty[1].turns = [], [], [], []
    with pytest.raises(ValueError, match=r"episode 1 .* has no tokens"):
        micro_batch(empty, advantages_for(empty), 0, CPU, packed=packed)
    with pytest.raises(ValueError, match="1 advantages for 2 episodes"):
        micro_batch(episodes, advantages_for(episodes)[:1], 0, CPU, packed=packed)
    short = copy.deepcopy(episodes)
    short[0].loss_mask = short[0].loss_mask[:-1]
    with pytest.raises(ValueError, match=r"episode 0 .* loss_mask"):
        micro_batch(short, advantages_for(short), 0, CPU, packed=packed)


def test_packed_attention_computes_each_episode_alone_and_leaves_other_inputs_to_the_model(
    model, tiny_policy, monkeypatch
):
    """use_packed_attention: every attention call on a packed row covers one episode (its queries and keys), so no
    pair across episodes or of padding is computed; padded batches (and generation) get the model's own
    attention, with the same outputs as before."""
    lengths = [5, 30, 9, 2, 21]
    episodes = episodes_of_lengths(model.config.vocab_size, lengths, seed=2)
    padded, packed = both_layouts(episodes)
    with torch.no_grad():
        before = model(input_ids=padded["tokens"], attention_mask=padded["attention"]).logits
    set_attention(model, "episodes")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        calls.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        batch_logprobs(model, packed)
    layers = model.config.num_hidden_layers
    assert calls == [(n, n) for _ in range(layers) for n in lengths]  # episode by episode, in every layer
    calls.clear()
    with torch.no_grad():
        after = model(input_ids=padded["tokens"], attention_mask=padded["attention"]).logits
    width = padded["tokens"].shape[1]
    assert calls == [(width, width)] * layers  # the padded batch: the model's own sdpa over whole rows
    inside = padded["attention"].bool()
    torch.testing.assert_close(after[inside], before[inside], rtol=0, atol=1e-6)
    assert episode_bounds(packed["position_ids"]) == [(0, 5), (5, 35), (35, 44), (44, 46), (46, 67)]
    assert episode_bounds(torch.arange(12)[None]) is None  # one sequence: nothing to split
