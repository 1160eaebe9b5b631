"""Batched token generation with a KV cache kept across turns, returning the token sampler's log-probs.

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

from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer


@dataclass
class Generation:
    """One continuation: its token ids, their log-probs, and whether it ended on the stop token."""

    tokens: list[int]
    logprobs: list[float]
    stopped: bool


def _pick(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; return (ids, their log-probs)."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        ids = logp.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class _GrowingLayer(DynamicLayer):
    """A KV-cache layer whose storage grows by doubling, so appending a token copies nothing.

    (The stock dynamic layer concatenates on every step, copying the whole cache each time.)
    `keys` / `values` stay views of the filled part, as the attention code expects.
    """

    active: int | None = None  # when set, only the first `active` rows take part in forward passes

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_store = self._value_store = None
        self._length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_length = self._length + key_states.shape[-2]
        if self._key_store is None or new_length > self._key_store.shape[-2]:
            capacity = max(new_length, 2 * (self._key_store.shape[-2] if self._key_store is not None else 0), 64)
            self._key_store = self._grow(self._key_store, key_states, capacity)
            self._value_store = self._grow(self._value_store, value_states, capacity)
        rows = slice(0, self.active)
        self._key_store[rows, ..., self._length : new_length, :] = key_states
        self._value_store[rows, ..., self._length : new_length, :] = value_states
        self._length = new_length
        self.keys, self.values = self._key_store[..., :new_length, :], self._value_store[..., :new_length, :]
        return self.keys[rows], self.values[rows]

    def _grow(self, store: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch = store.shape[0] if store is not None else like.shape[0]
        shape = (batch, *like.shape[1:-2], capacity, like.shape[-1])
        grown = torch.zeros(shape, dtype=like.dtype, device=like.device)  # masked gaps must hold finite values
        if store is not None:
            grown[..., : self._length, :] = store[..., : self._length, :]
        return grown

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (repeats allowed), copying only the filled columns."""
        if self.get_seq_length() > 0:
            self._key_store, self._value_store = (
                self._select(self._key_store, indices),
                self._select(self._value_store, indices),
            )
            self.keys, self.values = self._key_store[..., : self._length, :], self._value_store[..., : self._length, :]

    def permute_front_rows(self, order: torch.Tensor) -> None:
        """Rows [0, len(order)) become old rows `order` (a permutation of them); the rest stay in place."""
        rows = len(order)
        for store in (self._key_store, self._value_store):
            store[:rows, ..., : self._length, :] = store[order, ..., : self._length, :]

    def _select(self, store: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        out = store.new_zeros((len(indices), *store.shape[1:]))
        out[..., : self._length, :] = store[indices, ..., : self._length, :]
        return out


def _new_cache() -> Cache:
    return Cache(layer_class_to_replicate=_GrowingLayer)


@dataclass
class _Group:
    """Rows sharing one KV cache. `fed[k]` are the tokens of row `keys[k]` already in the cache."""

    keys: list[Hashable]
    fed: list[list[int]]
    cache: Cache = field(default_factory=_new_cache)
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
    """Continues keyed token sequences in batches of at most `batch_size`, caching across calls.

    A generation stops at `stop_id` or any of `stop_ids` (its `stopped` is then True), or at its limit."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        stop_id: int,
        pad_id: int,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        stop_ids: Collection[int] = (),
    ):
        self.model, self.stop_id, self.pad_id = model, stop_id, pad_id
        self.stop_ids = frozenset(stop_ids) | {stop_id}  # any of these ends a turn
        self.batch_size, self.generator = batch_size, generator
        self.device = next(model.parameters()).device
        self.groups: list[_Group] = []

    @torch.no_grad()
    def generate(
        self, keys: list[Hashable], contexts: list[list[int]], limits: list[int], temperature: float
    ) -> list[Generation]:
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
            chunk = fresh[start : start + self.batch_size]
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
        """Append new tokens (left-padded to a common width) for the first len(suffixes) rows; return their last logits.

        Rows past len(suffixes) sit this pass out: their new cache columns are masked gaps.
        """
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(suffixes), width), self.pad_id, dtype=torch.long)
        real = torch.zeros((len(suffixes), width), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            if suffix:
                ids[row, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
                real[row, width - len(suffix) :] = 1
        ids, real = ids.to(self.device), real.to(self.device)
        active = len(suffixes)
        if group.attention is None:
            group.attention, group.next_position = real, real.sum(-1)
            positions = (real.cumsum(-1) - 1).clamp(min=0)
        else:
            positions = (group.next_position[:active, None] + real.cumsum(-1) - 1).clamp(min=0)
            idle = torch.zeros((len(group.keys) - active, width), dtype=torch.long, device=self.device)
            group.attention = torch.cat([group.attention, torch.cat([real, idle])], dim=-1)
            group.next_position[:active] += real.sum(-1)
        for layer in group.cache.layers:
            layer.active = active
        logits = self.model(
            input_ids=ids,
            attention_mask=group.attention[:active],
            position_ids=positions,
            cache=group.cache,
            use_cache=True,
        ).logits
        return logits[:, -1]

    def _prefill_shared(self, group: _Group, prompts: list[list[int]]) -> torch.Tensor:
        """First fill of a fresh group: each distinct prompt is encoded once and its cache shared.

        (A group of `group_size` samples of one task starts from one prompt.)
        """
        distinct: dict[tuple[int, ...], int] = {}
        source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        if len(distinct) == len(prompts):
            return self._feed(group, prompts)
        keys, fed = group.keys, group.fed
        group.keys = [keys[source.index(i)] for i in range(len(distinct))]
        logits = self._feed(group, [list(p) for p in distinct])
        self._reorder(group, source)
        group.keys, group.fed = keys, fed
        return logits[torch.tensor(source, device=logits.device)]

    @staticmethod
    def _permute_front(group: _Group, front: list[int]) -> None:
        """Rows [0, len(front)) become old rows `front` (a permutation of them): cache, mask, positions, keys."""
        n = len(front)
        index = torch.tensor(front, dtype=torch.long, device=group.attention.device)
        for layer in group.cache.layers:
            layer.permute_front_rows(index)
        group.attention[:n], group.next_position[:n] = group.attention[index], group.next_position[index]
        group.keys[:n] = [group.keys[i] for i in front]
        group.fed[:n] = [group.fed[i] for i in front]

    @staticmethod
    def _reorder(group: _Group, order: list[int]) -> None:
        """Re-index the group's rows (cache, mask, positions, keys): row i becomes old row order[i]."""
        index = torch.tensor(order, dtype=torch.long, device=group.attention.device)
        for layer in group.cache.layers:
            layer.batch_select_indices(index)
        group.attention, group.next_position = group.attention[index], group.next_position[index]
        group.keys = [group.keys[i] for i in order]
        group.fed = [group.fed[i] for i in order]

    def _continue(
        self, group: _Group, contexts: list[list[int]], limits: list[int], temperature: float
    ) -> list[Generation]:
        suffixes = [ctx[len(fed) :] for ctx, fed in zip(contexts, group.fed)]
        for fed, suffix in zip(group.fed, suffixes):
            fed.extend(suffix)
        logits = self._prefill_shared(group, suffixes) if group.attention is None else self._feed(group, suffixes)
        results = [Generation([], [], False) for _ in contexts]
        live = [True] * len(contexts)
        active = len(contexts)  # rows [0, active) take part in forward passes
        while True:
            ids, logp = _pick(logits, temperature, self.generator)
            for row, (token, lp) in enumerate(zip(ids.tolist(), logp.tolist())):
                if live[row]:
                    results[row].tokens.append(token)
                    results[row].logprobs.append(lp)
                    results[row].stopped = token in self.stop_ids
                    live[row] = not results[row].stopped and len(results[row].tokens) < limits[row]
            still = sum(live[:active])
            if still == 0:
                return results
            if still <= active // 2:
                # Move the rows still generating to the front and stop computing the finished
                # ones for the rest of this turn.
                front = [r for r in range(active) if live[r]] + [r for r in range(active) if not live[r]]
                self._permute_front(group, front)
                order = front + list(range(active, len(live)))
                results, limits, live = (
                    [results[r] for r in order],
                    [limits[r] for r in order],
                    [live[r] for r in order],
                )
                active = still
            # Active rows still generating feed their new token; finished active rows feed a masked gap.
            step = [[results[row].tokens[-1]] if live[row] else [] for row in range(active)]
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
    stop_ids: Collection[int] = (),
) -> list[Generation]:
    """Continue every prompt once; at most `batch_size` sequences share one forward pass. A generation
    stops at `stop_id` or any of `stop_ids`, or after its `max_new_tokens` (tokens)."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError("max_new_tokens must be given once or once per prompt")
    decoder = BatchDecoder(
        model, stop_id=stop_id, pad_id=pad_id, batch_size=batch_size, generator=generator, stop_ids=stop_ids
    )
    return decoder.generate(list(range(len(prompts))), prompts, limits, temperature)
