"""Batched generation: same tokens as one-at-a-time, log-probs of the sampled distribution."""

import torch

from rl_core.model.generation import generate_batch
from rl_core.token_batch import token_logprobs


def _prompts(policy):
    t, chat = policy.tokenizer, policy.chat
    return [
        chat.prompt(t, "You handle refunds.", "Customer asks for a refund on order 4821."),
        chat.prompt(t, "x", "y"),
        chat.prompt(t, 'CALL get_order {"order_id": "4821"}', "refund 12"),
    ]


def test_batched_greedy_matches_one_at_a_time(tiny_policy):
    prompts = _prompts(tiny_policy)
    kw = dict(temperature=0.0, stop_id=tiny_policy.chat.stop_id, pad_id=tiny_policy.chat.pad_id)
    batched = generate_batch(tiny_policy.model, prompts, [12, 5, 9], **kw)
    for prompt, limit, got in zip(prompts, [12, 5, 9], batched):
        alone = generate_batch(tiny_policy.model, [prompt], limit, **kw)[0]
        assert got.tokens == alone.tokens
        assert got.logprobs == __import__("pytest").approx(alone.logprobs, abs=1e-4)
        assert len(got.tokens) <= limit


def test_logprobs_match_a_recomputation_at_temperature_one(tiny_policy):
    prompts = _prompts(tiny_policy)
    gens = generate_batch(
        tiny_policy.model,
        prompts,
        10,
        temperature=1.0,
        stop_id=tiny_policy.chat.stop_id,
        pad_id=tiny_policy.chat.pad_id,
        generator=torch.Generator().manual_seed(3),
    )
    for prompt, gen in zip(prompts, gens):
        full = torch.tensor([prompt + gen.tokens])
        logp, _ = token_logprobs(tiny_policy.model, full, torch.ones_like(full))
        recomputed = logp[0, len(prompt) :].tolist()
        assert recomputed == __import__("pytest").approx(gen.logprobs, abs=1e-4)
        assert all(lp <= 0 for lp in gen.logprobs)


def test_sampling_is_reproducible_from_a_seed(tiny_policy):
    prompts = _prompts(tiny_policy)
    kw = dict(temperature=1.0, stop_id=tiny_policy.chat.stop_id, pad_id=tiny_policy.chat.pad_id)
    a = generate_batch(tiny_policy.model, prompts, 8, generator=torch.Generator().manual_seed(7), **kw)
    b = generate_batch(tiny_policy.model, prompts, 8, generator=torch.Generator().manual_seed(7), **kw)
    assert [g.tokens for g in a] == [g.tokens for g in b]


def test_cache_kept_across_turns_gives_the_same_tokens_as_re_encoding(tiny_policy):
    """Turn 2 continued from the cache (with gaps where rows waited) equals a fresh pre-fill of the whole context."""
    from rl_core.model.generation import BatchDecoder

    chat, tok = tiny_policy.chat, tiny_policy.tokenizer
    prompts = _prompts(tiny_policy)
    kw = dict(stop_id=chat.stop_id, pad_id=chat.pad_id)
    decoder = BatchDecoder(tiny_policy.model, **kw)
    first = decoder.generate([0, 1, 2], prompts, [3, 9, 6], 0.0)
    observations = ['{"status": "delivered"}', "x", '{"result": "1", "days": "12"}']
    contexts = [p + g.tokens + chat.observation(tok, o) for p, g, o in zip(prompts, first, observations)]
    # key 1 is dropped (its episode ended): the others continue from the cache
    second = decoder.generate([2, 0], [contexts[2], contexts[0]], [7, 7], 0.0)
    fresh = generate_batch(tiny_policy.model, [contexts[2], contexts[0]], 7, temperature=0.0, **kw)
    for cached, again in zip(second, fresh):
        assert cached.tokens == again.tokens
        assert cached.logprobs == __import__("pytest").approx(again.logprobs, abs=1e-4)
    assert sorted(k for g in decoder.groups for k in g.keys) == [0, 2]


def test_shared_prompts_are_encoded_once_and_give_per_row_results(tiny_policy):
    """A group of samples of one prompt shares its pre-fill; each row still matches a solo run."""
    prompts = _prompts(tiny_policy)
    batch = [prompts[0], prompts[1], prompts[0], prompts[0], prompts[2]]
    kw = dict(temperature=0.0, stop_id=tiny_policy.chat.stop_id, pad_id=tiny_policy.chat.pad_id)
    limits = [7, 3, 11, 5, 9]
    got = generate_batch(tiny_policy.model, batch, limits, **kw)
    for prompt, limit, gen in zip(batch, limits, got):
        alone = generate_batch(tiny_policy.model, [prompt], limit, **kw)[0]
        assert gen.tokens == alone.tokens
        assert gen.logprobs == __import__("pytest").approx(alone.logprobs, abs=1e-4)


def test_any_of_the_stop_ids_ends_a_generation(tiny_policy):
    """A token in `stop_ids` (e.g. harmony's <|call|>) ends the turn like `stop_id`, and is kept as its last token."""
    prompts = _prompts(tiny_policy)
    kw = dict(temperature=0.0, stop_id=tiny_policy.chat.stop_id, pad_id=tiny_policy.chat.pad_id)
    free = generate_batch(tiny_policy.model, prompts, 12, **kw)
    for prompt, gen in zip(prompts, free):
        third = gen.tokens[2]
        cut = generate_batch(tiny_policy.model, [prompt], 12, stop_ids={third}, **kw)[0]
        first = gen.tokens.index(third)
        assert cut.tokens == gen.tokens[: first + 1] and cut.stopped
