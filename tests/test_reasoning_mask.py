"""Reasoning tokens stay in the episode; `algorithm.reasoning_in_loss: false` leaves them out of the loss."""

from __future__ import annotations

import pytest

from rl_core.reasoning_mask import marker_spans, mask_reasoning
from rl_core.trajectory import Episode, Turn

OPEN, CLOSE = [7], [8]


@pytest.mark.parametrize(
    ("ids", "spans"),
    [
        ([1, 2, 3], []),
        ([7, 1, 2, 8, 3, 4], [(0, 4)]),  # a block, markers included
        ([5, 7, 1, 8, 3, 7, 2, 8], [(1, 4), (5, 8)]),  # two blocks
        ([1, 2, 8, 3], [(0, 3)]),  # opened by the generation prompt: from the turn's start
        ([3, 7, 1, 2], [(1, 4)]),  # cut off inside the block: to the turn's end
        ([8, 7, 1], [(0, 1), (1, 3)]),
    ],
)
def test_marker_spans_single_token_markers(ids, spans):
    assert marker_spans(ids, OPEN, CLOSE) == spans


def test_marker_spans_multi_token_markers():
    assert marker_spans([9, 1, 2, 5, 5, 1, 3, 6], [1, 2], [1, 3]) == [(1, 7)]
    with pytest.raises(ValueError, match="non-empty"):
        marker_spans([1], [], [2])


def _episode() -> Episode:
    # prompt [0, 3), assistant [3, 9): <think> r r </think> a a, tool [9, 11), assistant [11, 14): a a stop
    tokens = [1, 1, 1, 7, 4, 4, 8, 5, 5, 2, 2, 5, 5, 6]
    mask = [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1]
    turns = [
        Turn("user", "", 0, 3),
        Turn("assistant", "", 3, 9),
        Turn("tool", "", 9, 11),
        Turn("assistant", "", 11, 14),
    ]
    return Episode(
        run_id="r",
        iteration=1,
        policy_version=0,
        env_name="d",
        task_id="t",
        group_id="g",
        sample_index=0,
        tokens=tokens,
        loss_mask=mask,
        behavior_logprobs=[0.0] * len(tokens),
        turns=turns,
        reward=1.0,
        reward_components={},
        success=True,
        finish_reason="stop",
    )


def test_mask_reasoning_zeroes_only_the_reasoning_of_policy_turns():
    episode = _episode()
    before = list(episode.loss_mask)
    (masked,), count = mask_reasoning([episode], lambda ids: marker_spans(ids, OPEN, CLOSE))
    assert count == 4
    assert masked.loss_mask == [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert masked.tokens == episode.tokens  # the episode keeps its reasoning tokens
    assert episode.loss_mask == before  # the stored episode is not changed
    (same,), none = mask_reasoning([episode], lambda ids: [])
    assert same is episode and none == 0
