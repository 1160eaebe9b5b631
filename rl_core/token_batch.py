"""Episodes as token tensors (padded or packed), and the token log-probs the trainer computes over them.

`micro_batch` lays out a micro-batch of episodes for the forward pass. Both layouts share the
padded [batch, width] tensors the loss works on (`pad_batch`: tokens, attention, loss mask, the
token sampler's log-probs, per-token advantages, width = the longest episode) plus each row's
training temperature ([batch]); the packed layout adds the episodes laid end to end in one row
([1, total_tokens], no padding), `position_ids` restarting at 0 for each episode, and the
(row, column) of every packed token in the padded layout. `batch_logprobs` runs the forward pass
of either layout and returns every token's log-prob and the entropy of its distribution under
softmax(logits / T) (`training_temperature`) in the padded layout, so the loss code is the same
for both; `token_logprobs` is the padded forward pass on its own.

Packing relies on the model building its attention mask from `position_ids` when it gets no
attention mask and no KV cache (transformers' `masking_utils.find_packed_sequence_indices`: a new
sequence starts wherever the position does not grow by 1, and attention stays within a sequence;
sdpa, eager and flex attention use that mask, flash-attention's varlen kernel the same
position_ids). Llama- and Qwen3-style models do; tests/test_packing.py checks that packed
log-probs equal padded ones on both.

`turn_rewards` (one row) and `rollout_turn_rewards` (the segments of one rollout) map rewards to
policy turns, and `token_advantages` maps advantages to tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rl_core.trajectory import Episode


def training_temperature(episode: Episode, default: float) -> float:
    """The temperature T whose distribution softmax(logits / T) the episode's log-probs are trained under.

    The episode's recorded `sampling.temperature`, or `default` when none was recorded (schema
    version 1 batches, hand-built episodes). T = 0 (greedy) is trained as T = 1: greedy decoding
    samples from no distribution (its limit is a point mass, whose log-prob is 0 with no
    gradient), and the token sampler records greedy log-probs as log_softmax(logits), i.e. at T = 1
    (generation.py), so T = 1 keeps the trainer's log-probs equal to the recorded ones.
    """
    temperature = episode.sampling.temperature if episode.sampling is not None else default
    return 1.0 if temperature == 0 else float(temperature)


def token_logprobs(
    model: torch.nn.Module, tokens: torch.Tensor, attention: torch.Tensor, temperature: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token given its prefix under softmax(logits / T), and that distribution's entropy (nats).

    tokens, attention: [batch, length]; temperature: [batch] (T > 0 per row; None = 1 for all).
    Both results have shape [batch, length]; position 0 (no prefix) is 0.
    """
    logits = model(input_ids=tokens, attention_mask=attention).logits[:, :-1].float()
    if temperature is not None and bool((temperature != 1).any()):
        logits = logits / temperature.to(logits)[:, None, None]
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    pad = torch.zeros_like(picked[:, :1])
    return torch.cat([pad, picked], dim=1), torch.cat([pad, entropy], dim=1)


def turn_rewards(episode: Episode) -> list[float]:
    """Reward credited to each policy turn of one episode (row), one per policy turn, in turn order.

    Per-turn rewards: when any assistant turn carries a reward (`Turn.reward`, an external agent
    that rewards each turn), those rewards, None counting as 0.0. Otherwise (environments give only
    a final reward) the episode reward on the last policy turn, 0.0 before. An episode without a
    policy turn gets [reward] (one entry, so every episode has at least one).
    """
    assistant = [t for t in episode.turns if t.role == "assistant"]
    if any(t.reward is not None for t in assistant):
        return [0.0 if t.reward is None else float(t.reward) for t in assistant]
    turns = max(len(assistant), 1)
    return [0.0] * (turns - 1) + [episode.reward]


def rollout_turn_rewards(segments: Sequence[Episode]) -> list[list[float]]:
    """Reward of each policy turn of one rollout, split by segment: entry s holds segment s's turns.

    segments: the rollout's rows in segment order (at least one). Their concatenation is the
    rollout's turn rewards, with the rule of `turn_rewards` applied to the whole rollout, so the
    outcome is credited once whatever the number of segments:
    - one segment: [turn_rewards(segment)], exactly;
    - per-turn rewards (an assistant turn of any segment carries one): each segment's assistant
      turns' rewards, None counting as 0.0 (with every segment rewarded per turn, this is each
      segment's `turn_rewards`);
    - otherwise: 0.0 on every policy turn and the rollout's reward (the last segment's, every row
      carries the outcome) on the rollout's last policy turn.
    A segment without a policy turn gets [] (and the last one [reward] when no segment has a turn).
    Raises ValueError for no segments.
    """
    if not segments:
        raise ValueError("a rollout needs at least one segment")
    if len(segments) == 1:
        return [turn_rewards(segments[0])]
    assistant = [[t for t in seg.turns if t.role == "assistant"] for seg in segments]
    if any(t.reward is not None for turns in assistant for t in turns):
        return [[0.0 if t.reward is None else float(t.reward) for t in turns] for turns in assistant]
    out = [[0.0] * len(turns) for turns in assistant]
    last = max((s for s, turns in enumerate(out) if turns), default=None)
    if last is None:
        out[-1] = [segments[-1].reward]
    else:
        out[last][-1] = segments[-1].reward
    return out


def token_advantages(episode: Episode, per_turn: torch.Tensor) -> torch.Tensor:
    """Advantage of every token: each policy turn's tokens get that turn's advantage (the last one
    repeats for episode-level methods); prompt and environment tokens get 0 (they are masked anyway)."""
    out = torch.zeros(len(episode.tokens))
    assistant = [t for t in episode.turns if t.role == "assistant"]
    for index, turn in enumerate(assistant):
        out[turn.start : turn.end] = float(per_turn[min(index, len(per_turn) - 1)])
    return out


def pad_batch(
    episodes: list[Episode],
    advantages: list[torch.Tensor],
    pad_id: int,
    device: torch.device,
    default_temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Right-pad episodes into tensors: tokens, attention, loss mask, old log-probs, token advantages
    ([batch, width], width = the longest episode) and each row's training temperature ([batch]).

    Raises ValueError for no episodes, a number of advantages other than the number of episodes, an
    episode without tokens, or an episode whose loss_mask or behavior_logprobs length differs from
    its token count.
    """
    _check_episodes(episodes, advantages)
    width = max(len(e.tokens) for e in episodes)
    batch = {
        "tokens": torch.full((len(episodes), width), pad_id, dtype=torch.long),
        "attention": torch.zeros((len(episodes), width), dtype=torch.long),
        "mask": torch.zeros((len(episodes), width)),
        "old_logprobs": torch.zeros((len(episodes), width)),
        "advantages": torch.zeros((len(episodes), width)),
        "temperature": torch.tensor([training_temperature(e, default_temperature) for e in episodes]),
    }
    for row, (ep, adv) in enumerate(zip(episodes, advantages)):
        n = len(ep.tokens)
        batch["tokens"][row, :n] = torch.tensor(ep.tokens)
        batch["attention"][row, :n] = 1
        batch["mask"][row, :n] = torch.tensor(ep.loss_mask, dtype=torch.float)
        batch["old_logprobs"][row, :n] = torch.tensor(ep.behavior_logprobs, dtype=torch.float)
        batch["advantages"][row, :n] = token_advantages(ep, adv)
    return {k: v.to(device) for k, v in batch.items()}


def _check_episodes(episodes: Sequence[Episode], advantages: Sequence[torch.Tensor]) -> None:
    """Raise ValueError naming what is wrong with a micro-batch's episodes (see `pad_batch`)."""
    if not episodes:
        raise ValueError("a micro-batch needs at least one episode, got none")
    if len(advantages) != len(episodes):
        raise ValueError(f"got {len(advantages)} advantages for {len(episodes)} episodes; need one per episode")
    for index, ep in enumerate(episodes):
        name = f"episode {index} (group {ep.group_id!r}, sample {ep.sample_index})"
        if not ep.tokens:
            raise ValueError(f"{name} has no tokens; every episode of a micro-batch needs at least one")
        if len(ep.loss_mask) != len(ep.tokens) or len(ep.behavior_logprobs) != len(ep.tokens):
            raise ValueError(
                f"{name} has {len(ep.tokens)} tokens but {len(ep.loss_mask)} loss_mask entries and "
                f"{len(ep.behavior_logprobs)} behavior_logprobs; all three need the same length"
            )


PACKED_KEYS = ("packed_tokens", "position_ids", "packed_rows", "packed_columns")
"""The keys `micro_batch(packed=True)` adds to the padded layout (see `micro_batch`)."""


def micro_batch(
    episodes: list[Episode],
    advantages: list[torch.Tensor],
    pad_id: int,
    device: torch.device,
    default_temperature: float = 1.0,
    packed: bool = False,
) -> dict[str, torch.Tensor]:
    """One micro-batch of episodes as the tensors of the forward pass and the loss.

    packed=False: exactly `pad_batch` (right-padded [batch, width] tensors, width = the longest
    episode, and "temperature" [batch]). packed=True: the same tensors plus the packed inputs of
    the forward pass, with total_tokens = the sum of the episodes' lengths (no padding):
    - "packed_tokens" [1, total_tokens] (long): the episodes' tokens end to end, in row order;
    - "position_ids" [1, total_tokens] (long): 0, 1, ... restarting at 0 for each episode;
    - "packed_rows", "packed_columns" [total_tokens] (long): the (row, column) of each packed
      token in the padded layout, so packed_tokens[0, k] == tokens[packed_rows[k], packed_columns[k]].
    `batch_logprobs` runs the forward pass of either layout. Raises ValueError as `pad_batch` does.
    """
    batch = pad_batch(episodes, advantages, pad_id, device, default_temperature)
    if not packed:
        return batch
    lengths = torch.tensor([len(e.tokens) for e in episodes])
    rows = torch.repeat_interleave(torch.arange(len(episodes)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths  # packed index of each episode's first token
    columns = torch.arange(int(lengths.sum())) - starts[rows]
    packed_tokens = torch.tensor([t for e in episodes for t in e.tokens], dtype=torch.long)
    batch["packed_tokens"] = packed_tokens[None].to(device)
    batch["position_ids"] = columns[None].to(device)
    batch["packed_rows"] = rows.to(device)
    batch["packed_columns"] = columns.to(device)
    return batch


def batch_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each token of a `micro_batch` given its prefix within its episode, and the entropy (nats)
    of the distribution softmax(logits / T) it was drawn from, T = the episode's "temperature".

    Both results are float32 [batch, width] in the padded layout whatever the batch's layout;
    position 0 of each episode (no prefix) and the padding are 0. A padded batch is
    `token_logprobs(model, tokens, attention, temperature)`. A packed batch ("packed_tokens" present)
    takes ONE forward pass over the packed row with attention_mask=None, its `position_ids` and
    use_cache=False, which the model turns into a causal mask kept within each episode (module
    docstring); the results are scattered back to the padded layout. The two agree to float
    tolerance (the attention sums run over a different number of masked keys), and the gradient
    flows to the model's parameters through the log-probs in both (entropy is detached).
    """
    if "packed_tokens" not in batch:
        return token_logprobs(model, batch["tokens"], batch["attention"], batch["temperature"])
    tokens, positions = batch["packed_tokens"], batch["position_ids"]
    rows, columns = batch["packed_rows"], batch["packed_columns"]
    logits = model(input_ids=tokens, position_ids=positions, attention_mask=None, use_cache=False).logits
    logits = logits[0, :-1].float()  # [total_tokens - 1, vocab]: row k predicts packed token k + 1
    temperature = batch["temperature"]
    if bool((temperature != 1).any()):
        logits = logits / temperature.to(logits)[rows[1:], None]
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, tokens[0, 1:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    # a token at position 0 starts an episode: its "prediction" came from the previous episode's last token
    starts = positions[0, 1:] == 0
    picked = torch.where(starts, torch.zeros_like(picked), picked)
    entropy = torch.where(starts, torch.zeros_like(entropy), entropy)
    shape = batch["tokens"].shape
    index = (rows[1:], columns[1:])
    out_logprobs = torch.zeros(shape, dtype=picked.dtype, device=picked.device).index_put(index, picked)
    out_entropy = torch.zeros(shape, dtype=entropy.dtype, device=entropy.device).index_put(index, entropy)
    return out_logprobs, out_entropy


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """1-D tensors right-padded with 0 into one [len(rows), width] tensor."""
    out = torch.zeros((len(rows), width))
    for row, values in enumerate(rows):
        out[row, : len(values)] = values
    return out
