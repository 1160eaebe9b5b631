"""Batched token generation with a KV cache kept across turns, returning the sampler's log-probs.

`BatchDecoder` continues many sequences at once, turn after turn. The first call for a
sequence pre-fills its whole context; later calls feed only what was appended since (the
last sampled token and the environment's observation), reusing the cached keys and values,
so a multi-turn episode is never re-encoded from the start. Sequences of different lengths
share one padded batch: padding (left padding at the start, and gaps where a shorter row
waited for a longer one) is masked out of attention, and every row keeps its own positions.

Log-probs are those of the distribution actually sampled from: `log_softmax(logits /
temperature)`; at temperature 0 (greedy) they are the plain `log_softmax(logits)`.
`generate_batch` is the one-shot form (a fresh decoder per call).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

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


@dataclass
class _Group:
    """Rows sharing one KV cache. `fed[k]` are the tokens of row `keys[k]` already in the cache."""

    keys: list[Hashable]
    fed: list[list[int]]
    cache: DynamicCache = field(default_factory=DynamicCache)
    attention: torch.Tensor | None = None  # [rows, cached length], 1 = real token
    next_position: torch.Tensor | None = None  # [rows], position of each row's next token

    def keep(self, wanted: set[Hashable]) -> None:
        """Drop rows not in `wanted` from the batch and the cache."""
        kept = [i for i, key in enumerate(self.keys) if key in wanted]
        if len(kept) == len(self.keys):
            return
        if self.attention is not None:
            index = torch.tensor(kept, dtype=torch.long, device=self.attention.device)
            self.cache.batch_select_indices(index)
            self.attention, self.next_position = self.attention[index], self.next_position[index]
        self.keys = [self.keys[i] for i in kept]
        self.fed = [self.fed[i] for i in kept]


class BatchDecoder:
    """Continues keyed token sequences in batches of at most `batch_size`, caching across calls."""

    def __init__(self, model: PreTrainedModel, *, stop_id: int, pad_id: int, batch_size: int = 256, generator: torch.Generator | None = None):
        self.model, self.stop_id, self.pad_id = model, stop_id, pad_id
        self.batch_size, self.generator = batch_size, generator
        self.device = next(model.parameters()).device
        self.groups: list[_Group] = []

    @torch.no_grad()
    def generate(self, keys: list[Hashable], contexts: list[list[int]], limits: list[int], temperature: float) -> list[Generation]:
        """Continue each context (which must extend what was fed for its key, if anything).

        Keys not named are forgotten. Returns one Generation per key, in order.
        """
        if len(set(keys)) != len(keys) or not (len(keys) == len(contexts) == len(limits)):
            raise ValueError("keys must be unique and match contexts and limits one to one")
        if limits and min(limits) < 1:
            raise ValueError("every token limit must be >= 1")
        wanted = dict(zip(keys, range(len(keys))))
        for group in self.groups:
            group.keep({k for k, i in wanted.items() if self._extends(group, k, contexts[i])})
        self.groups = [g for g in self.groups if g.keys]
        cached = {key for group in self.groups for key in group.keys}
        fresh = [key for key in keys if key not in cached]
        for start in range(0, len(fresh), self.batch_size):
            chunk = fresh[start:start + self.batch_size]
            self.groups.append(_Group(keys=chunk, fed=[[] for _ in chunk]))
        was_training = self.model.training
        self.model.eval()
        results: dict[Hashable, Generation] = {}
        try:
            for group in self.groups:
                rows = [wanted[key] for key in group.keys]
                out = self._continue(group, [contexts[i] for i in rows], [limits[i] for i in rows], temperature)
                results.update(zip(group.keys, out))
        finally:
            self.model.train(was_training)
        return [results[key] for key in keys]

    @staticmethod
    def _extends(group: _Group, key: Hashable, context: list[int]) -> bool:
        if key not in group.keys:
            return False
        fed = group.fed[group.keys.index(key)]
        return len(context) > len(fed) and context[: len(fed)] == fed

    def _feed(self, group: _Group, suffixes: list[list[int]]) -> torch.Tensor:
        """Append each row's new tokens (left-padded to a common width) to the cache; return last logits."""
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(suffixes), width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            if suffix:
                ids[row, width - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
                real[row, width - len(suffix):] = 1
        ids, real = ids.to(self.device), real.to(self.device)
        start = group.next_position if group.next_position is not None else torch.zeros(len(suffixes), dtype=torch.long, device=self.device)
        positions = (start[:, None] + real.cumsum(-1) - 1).clamp(min=0)
        group.attention = real if group.attention is None else torch.cat([group.attention, real], dim=-1)
        group.next_position = start + real.sum(-1)
        logits = self.model(input_ids=ids, attention_mask=group.attention, position_ids=positions, cache=group.cache, use_cache=True).logits
        return logits[:, -1]

    def _continue(self, group: _Group, contexts: list[list[int]], limits: list[int], temperature: float) -> list[Generation]:
        suffixes = [ctx[len(fed):] for ctx, fed in zip(contexts, group.fed)]
        for fed, suffix in zip(group.fed, suffixes):
            fed.extend(suffix)
        logits = self._feed(group, suffixes)
        results = [Generation([], [], False) for _ in contexts]
        live = [True] * len(contexts)
        while True:
            ids, logp = _pick(logits, temperature, self.generator)
            for row, (token, lp) in enumerate(zip(ids.tolist(), logp.tolist())):
                if live[row]:
                    results[row].tokens.append(token)
                    results[row].logprobs.append(lp)
                    results[row].stopped = token == self.stop_id
                    live[row] = not results[row].stopped and len(results[row].tokens) < limits[row]
            if not any(live):
                return results
            # Rows still generating feed their new token; finished rows feed a masked gap.
            step = [[results[row].tokens[-1]] if live[row] else [] for row in range(len(contexts))]
            for row, tokens in enumerate(step):
                group.fed[row].extend(tokens)
            logits = self._feed(group, step)


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
    """Continue every prompt once; at most `batch_size` sequences share one forward pass."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError("max_new_tokens must be given once or once per prompt")
    decoder = BatchDecoder(model, stop_id=stop_id, pad_id=pad_id, batch_size=batch_size, generator=generator)
    return decoder.generate(list(range(len(prompts))), prompts, limits, temperature)
