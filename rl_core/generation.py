"""Batched token generation with a KV cache, returning the sampler's log-probs.

`generate_batch` takes many prompts of different lengths (token ids), left-pads them into
one batch, and samples each continuation until its stop token or its own token limit.
Finished rows are dropped from the batch (and the cache) as they finish, so a long
straggler does not keep paying for the rest. Log-probs are those of the distribution
actually sampled from: `log_softmax(logits / temperature)`; at temperature 0 (greedy)
they are the plain `log_softmax(logits)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Generation:
    """One continuation: its token ids, their log-probs, and whether it ended on the stop token."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; return (ids, their log-probs)."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        ids = logp.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


@torch.no_grad()
def _generate_chunk(
    model: PreTrainedModel,
    prompts: list[list[int]],
    limits: list[int],
    temperature: float,
    stop_id: int,
    pad_id: int,
    generator: torch.Generator | None,
) -> list[Generation]:
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width - len(prompt):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True).logits[:, -1]

    results = [Generation([], [], False) for _ in prompts]
    rows = torch.arange(len(prompts), device=device)  # original index of each live batch row
    limit = torch.tensor(limits, device=device)
    next_position = positions[:, -1] + 1
    while True:
        ids, logp = _pick(logits, temperature, generator)
        for batch_row, (row, token, lp) in enumerate(zip(rows.tolist(), ids.tolist(), logp.tolist())):
            results[row].tokens.append(token)
            results[row].logprobs.append(lp)
            results[row].stopped = token == stop_id
        lengths = torch.tensor([len(results[r].tokens) for r in rows.tolist()], device=device)
        keep = (ids != stop_id) & (lengths < limit[rows])
        if not keep.any():
            return results
        if not keep.all():
            kept = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            rows, ids, attention, next_position = rows[kept], ids[kept], attention[kept], next_position[kept]
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        logits = model(
            input_ids=ids[:, None], attention_mask=attention, position_ids=next_position[:, None], cache=cache, use_cache=True
        ).logits[:, -1]
        next_position = next_position + 1


def generate_batch(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: list[int] | int,
    *,
    temperature: float,
    stop_id: int,
    pad_id: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> list[Generation]:
    """Continue every prompt; at most `batch_size` sequences share one forward pass.

    `max_new_tokens` is one limit for all prompts or one per prompt (each >= 1).
    """
    if not prompts:
        return []
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts) or min(limits) < 1:
        raise ValueError("max_new_tokens must be >= 1 and given once or once per prompt")
    was_training = model.training
    model.eval()
    try:
        out: list[Generation] = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            out += _generate_chunk(model, prompts[chunk], limits[chunk], temperature, stop_id, pad_id, generator)
        return out
    finally:
        model.train(was_training)
