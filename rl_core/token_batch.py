"""Episodes as padded token tensors, and the token log-probs the trainer computes over them.

`pad_batch` right-pads a micro-batch of episodes into [batch, width] tensors (tokens,
attention, loss mask, the token sampler's log-probs, per-token advantages) plus each row's
training temperature; `token_logprobs` is the forward pass that gives every token's log-prob
and the entropy of its distribution under softmax(logits / T) (`training_temperature`).
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
    ([batch, width], width = the longest episode) and each row's training temperature ([batch])."""
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


def pad_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """1-D tensors right-padded with 0 into one [len(rows), width] tensor."""
    out = torch.zeros((len(rows), width))
    for row, values in enumerate(rows):
        out[row, : len(values)] = values
    return out
