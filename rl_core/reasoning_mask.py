"""Reasoning tokens in the loss: kept (the default) or masked (`algorithm.reasoning_in_loss: false`).

A policy turn of a reasoning model holds its reasoning (Qwen's `<think>...</think>` block, harmony's
`analysis` channel) before its answer or tool calls. The episode always keeps those tokens: they were
sampled and fed, and the token-in, token-out record stays exact. Whether the loss trains on them is a
setting: with `algorithm.reasoning_in_loss` false, `mask_reasoning` sets the loss mask of every
reasoning token to 0 before the trainer selects and pads the batch, so advantages reinforce only the
answer and tool-call tokens (the reasoning still conditions them). The policy's renderer finds the
reasoning (`Renderer.reasoning_spans`); a text-action renderer has none.

`marker_spans` is the span finder for reasoning delimited by marker token sequences, used by the
`hf_template` renderer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from rl_core.trajectory import Episode

# [start, end) positions within one policy turn's generated ids.
Span = tuple[int, int]


def _find(ids: Sequence[int], marker: Sequence[int], start: int) -> int:
    """Index of the first occurrence of `marker` in `ids` at or after `start`, or -1."""
    n = len(marker)
    for i in range(start, len(ids) - n + 1):
        if list(ids[i : i + n]) == list(marker):
            return i
    return -1


def marker_spans(ids: Sequence[int], open_ids: Sequence[int], close_ids: Sequence[int]) -> list[Span]:
    """The reasoning blocks of one policy turn `ids`: each `open_ids ... close_ids` span, markers included
    ([start, end) positions in `ids`). A close marker with no open marker before it closes a block that
    started before the turn (a generation prompt that opens the block, e.g. Qwen's `<think>\\n`): the span
    starts at 0. An open marker never closed (the turn was cut off) runs to the end of the turn.

    Markers are matched as token sequences, so a marker that is several tokens is found only where the
    model sampled it in the tokenizer's canonical pieces. Raises ValueError for an empty marker."""
    if not open_ids or not close_ids:
        raise ValueError("reasoning markers must be non-empty token sequences")
    spans: list[Span] = []
    at = 0
    first_close, first_open = _find(ids, close_ids, 0), _find(ids, open_ids, 0)
    if first_close >= 0 and (first_open < 0 or first_close < first_open):
        at = first_close + len(close_ids)
        spans.append((0, at))
    while True:
        start = _find(ids, open_ids, at)
        if start < 0:
            return spans
        close = _find(ids, close_ids, start + len(open_ids))
        end = len(ids) if close < 0 else close + len(close_ids)
        spans.append((start, end))
        at = end


def mask_reasoning(
    episodes: list[Episode], reasoning_spans: Callable[[list[int]], list[Span]]
) -> tuple[list[Episode], int]:
    """`episodes` with the loss mask of every reasoning token set to 0, and how many tokens that masked.

    reasoning_spans: a policy turn's generated ids -> its reasoning spans (`Renderer.reasoning_spans`),
    applied to each assistant turn's `tokens[turn.start:turn.end]`. Episodes without reasoning come back
    as the same objects; the others are copies (the stored episodes are never changed)."""
    out, masked = [], 0
    for episode in episodes:
        mask = None
        for turn in episode.turns:
            if turn.role != "assistant":
                continue
            for start, end in reasoning_spans(list(episode.tokens[turn.start : turn.end])):
                for position in range(turn.start + start, turn.start + end):
                    if (mask or episode.loss_mask)[position]:
                        mask = mask if mask is not None else list(episode.loss_mask)
                        mask[position] = 0
                        masked += 1
        out.append(episode if mask is None else dataclasses.replace(episode, loss_mask=mask))
    return out, masked
