"""Trajectory schema version 4: segments of one rollout, stitch breaks and per-turn rewards.

A rollout an external agent played may be several rows (segments 0, 1, ...) that share group_id and
sample_index; it counts once in its group's advantage baseline and in the outcome metrics.
"""

from __future__ import annotations

import copy
import math

import pyarrow as pa
import pytest
import torch

from rl_core.advantages import ADVANTAGE_METHODS, compute_advantages
from rl_core.config import AlgorithmConfig, OptimizerConfig
from rl_core.groups import rollouts
from rl_core.metrics import rollout_metrics
from rl_core.store import CorruptTrajectoryError, TrajectoryStore
from rl_core.token_batch import rollout_turn_rewards, turn_rewards
from rl_core.trainer import Trainer, rollout_advantages
from rl_core.trajectory import (
    SCHEMA_VERSION,
    SCHEMAS_BY_VERSION,
    TRAJECTORY_SCHEMA,
    TRAJECTORY_SCHEMA_V3,
    Episode,
    Turn,
    check_episode,
    episodes_to_table,
    table_to_episodes,
    upgrade_table,
)
from tests.test_schema_v3 import rewrite_as
from tests.test_store import RUN, make_batch

BREAK = "history rewritten: the agent summarised its earlier turns"


def segmented_batch() -> list[Episode]:
    """make_batch with per-turn rewards on episode 0 and episode 1 as segment 1 of episode 0's rollout."""
    episodes = make_batch()
    episodes[0].turns[2].reward = 0.25
    episodes[0].turns[4].reward = -1.0
    episodes[1].sample_index = 0
    episodes[1].segment = 1
    episodes[1].stitch_break = BREAK
    episodes[1].turns[4].reward = 0.5  # the first assistant turn of this segment gave none
    return episodes


def as_version_three(episodes: list[Episode]) -> pa.Table:
    """`episodes` as Turnstile schema version 3 wrote them: no segment, stitch_break or turn reward."""
    table = episodes_to_table(episodes).drop_columns(["segment", "stitch_break"]).cast(TRAJECTORY_SCHEMA_V3)
    position = table.schema.get_field_index("schema_version")
    return table.set_column(position, table.schema.field("schema_version"), pa.array([3] * len(episodes), pa.int32()))


# -- the schema -------------------------------------------------------------------------


def test_version_four_adds_segment_stitch_break_and_a_turn_reward():
    assert SCHEMA_VERSION == 4 and SCHEMAS_BY_VERSION[4] is TRAJECTORY_SCHEMA
    assert SCHEMAS_BY_VERSION[3] is TRAJECTORY_SCHEMA_V3
    names = TRAJECTORY_SCHEMA.names
    assert names[names.index("sample_index") + 1 : names.index("sample_index") + 3] == ["segment", "stitch_break"]
    segment, stitch_break = TRAJECTORY_SCHEMA.field("segment"), TRAJECTORY_SCHEMA.field("stitch_break")
    assert segment.type == pa.int32() and not segment.nullable
    assert stitch_break.type == pa.string() and stitch_break.nullable
    turn_type = TRAJECTORY_SCHEMA.field("turns").type.value_type
    assert turn_type[turn_type.num_fields - 1].name == "reward"
    assert turn_type.field("reward").type == pa.float64() and turn_type.field("reward").nullable
    v3_turn_type = TRAJECTORY_SCHEMA_V3.field("turns").type.value_type
    assert [f.name for f in v3_turn_type] == [f.name for f in turn_type][:-1]
    assert TRAJECTORY_SCHEMA_V3.names == [n for n in names if n not in ("segment", "stitch_break")]
    assert Episode.__dataclass_fields__["segment"].default == 0
    assert Episode.__dataclass_fields__["stitch_break"].default is None
    assert Turn("assistant", "a", 0, 1).reward is None


def test_segments_stitch_breaks_and_turn_rewards_round_trip(tmp_path):
    episodes = segmented_batch()
    assert table_to_episodes(episodes_to_table(episodes)) == episodes
    table = episodes_to_table(episodes)
    assert table.column("segment").to_pylist() == [0, 1, 0, 0]
    assert table.column("stitch_break").to_pylist() == [None, BREAK, None, None]
    assert [t["reward"] for t in table.column("turns")[0].as_py()] == [None, None, 0.25, None, -1.0]
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, episodes)
    assert store.manifest(RUN, 1).schema_version == 4
    read = store.read(RUN, 1)
    assert read == episodes
    assert (read[1].segment, read[1].stitch_break) == (1, BREAK)
    assert [t.reward for t in read[1].turns] == [None, None, None, None, 0.5]
    assert (read[0].segment, read[0].stitch_break) == (0, None)


def test_a_version_three_table_reads_with_segment_zero_and_nulls(tmp_path):
    episodes = make_batch()
    for ep in episodes:
        ep.schema_version = 3
    episodes[0].turns[2].parse_error = "call 1: invalid JSON"  # version-3 fields survive the upgrade
    table = as_version_three(episodes)
    assert table.schema.equals(TRAJECTORY_SCHEMA_V3)

    upgraded = upgrade_table(table, 3)
    upgraded.validate(full=True)
    assert upgraded.schema.equals(TRAJECTORY_SCHEMA)
    assert upgraded.column("segment").to_pylist() == [0, 0, 0, 0]
    assert upgraded.column("stitch_break").null_count == 4
    assert all(t["reward"] is None for turns in upgraded.column("turns").to_pylist() for t in turns)
    assert upgraded.drop_columns(["segment", "stitch_break", "turns"]).equals(table.drop_columns(["turns"]))
    assert table_to_episodes(upgraded) == episodes
    assert table_to_episodes(table) == episodes  # straight from the old table
    assert table_to_episodes(table)[0].turns[2].parse_error == "call 1: invalid JSON"

    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, make_batch())
    rewrite_as(store, 1, table, 3)
    assert store.read(RUN, 1) == episodes
    assert store.read_table(RUN, 1).schema.equals(TRAJECTORY_SCHEMA)
    # a version-4 table under a version-3 manifest, and the other way round, is corrupt
    store.write(RUN, 2, make_batch(iteration=2))
    rewrite_as(store, 2, episodes_to_table(make_batch(iteration=2)), 3)
    with pytest.raises(CorruptTrajectoryError, match="schema mismatch"):
        store.read(RUN, 2)
    store.write(RUN, 3, make_batch(iteration=3))
    rewrite_as(store, 3, as_version_three(make_batch(iteration=3)), 4)
    with pytest.raises(CorruptTrajectoryError, match="schema mismatch"):
        store.read(RUN, 3)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda ep: setattr(ep, "segment", -1), "segment must be >= 0"),
        (lambda ep: setattr(ep, "stitch_break", "summarised"), "stitch_break must be None on segment 0"),
        (lambda ep: setattr(ep.turns[2], "reward", math.nan), r"turns\[2\]\.reward must be finite"),
        (lambda ep: setattr(ep.turns[4], "reward", -math.inf), r"turns\[4\]\.reward must be finite"),
        (lambda ep: setattr(ep.turns[3], "reward", 1.0), r"turns\[3\]\.reward is set on a 'tool' turn"),
        (lambda ep: setattr(ep.turns[1], "reward", 0.0), r"turns\[1\]\.reward is set on a 'user' turn"),
    ],
)
def test_check_episode_refuses_bad_segments_and_turn_rewards(change, field):
    ep = make_batch()[0]
    check_episode(ep)
    change(ep)
    with pytest.raises(ValueError, match=field):
        check_episode(ep)
    with pytest.raises(ValueError, match=field):
        episodes_to_table([ep])


def test_check_episode_accepts_a_later_segment_with_its_stitch_break():
    ep = make_batch()[0]
    ep.segment, ep.stitch_break = 2, BREAK
    ep.turns[2].reward = 0.0
    check_episode(ep)


# -- rollouts of several rows, and their rewards ----------------------------------------------


def row(
    sample: int,
    reward: float,
    turns: int,
    *,
    segment: int = 0,
    group: str = "g",
    rewards: list[float | None] | None = None,
    finish_reason: str = "answered",
) -> Episode:
    """One row: a 2-token prompt, then `turns` assistant turns of 3 generated tokens with a 1-token
    tool result between them; `rewards` are the assistant turns' own rewards (None: none given)."""
    tokens, mask, episode_turns = [1, 2], [0, 0], [Turn("user", "q", 0, 2)]
    for t in range(turns):
        if t:
            episode_turns.append(Turn("tool", "o", len(tokens), len(tokens) + 1))
            tokens, mask = tokens + [7], mask + [0]
        reward_of_turn = None if rewards is None else rewards[t]
        episode_turns.append(Turn("assistant", "a", len(tokens), len(tokens) + 3, reward=reward_of_turn))
        tokens, mask = tokens + [4, 5, 6], mask + [1, 1, 1]
    return Episode(
        "run",
        1,
        0,
        "env",
        group,
        group,
        sample,
        tokens,
        mask,
        [-0.5 if m else 0.0 for m in mask],
        episode_turns,
        reward=reward,
        reward_components={},
        success=reward >= 1.0,
        finish_reason=finish_reason,
        segment=segment,
        stitch_break=BREAK if segment else None,
    )


def three_rollouts(a_rewards: tuple[list | None, list | None] = (None, None)) -> list[Episode]:
    """Group g: rollout 0 in two segments (2 + 1 policy turns, reward 1), rollouts 1 (2 turns) and 2
    (1 turn) with reward 0. Rows deliberately out of segment order: segment 1 comes first."""
    return [
        row(0, 1.0, 1, segment=1, rewards=a_rewards[1]),
        row(1, 0.0, 2),
        row(0, 1.0, 2, segment=0, rewards=a_rewards[0]),
        row(2, 0.0, 1),
    ]


def test_rollouts_gather_segments_and_leave_rows_without_segments_alone():
    batch = three_rollouts()
    assert rollouts(batch) == [(2, 0), (1,), (3,)]
    plain = [row(0, 1.0, 1), row(1, 0.0, 1), row(0, 0.0, 1, group="h"), row(0, 1.0, 1, group="h")]
    assert rollouts(plain) == [(0,), (1,), (2,), (3,)]  # a repeated sample_index without segments: rows
    assert rollouts([]) == []


def test_turn_rewards_take_the_agents_per_turn_rewards_when_it_gave_any():
    assert turn_rewards(row(0, 1.0, 3)) == [0.0, 0.0, 1.0]  # final reward on the last turn
    assert turn_rewards(row(0, 1.0, 3, rewards=[0.5, None, -0.25])) == [0.5, 0.0, -0.25]
    assert turn_rewards(row(0, 1.0, 2, rewards=[None, None])) == [0.0, 1.0]  # none given: the final reward
    assert turn_rewards(row(0, 0.75, 0)) == [0.75]  # no policy turn


def test_a_rollouts_outcome_is_credited_once_across_its_segments():
    seg0, seg1 = row(0, 1.0, 2), row(0, 1.0, 1, segment=1)
    assert rollout_turn_rewards([seg0, seg1]) == [[0.0, 0.0], [1.0]]  # not [0, 1] + [1]
    assert rollout_turn_rewards([seg0]) == [turn_rewards(seg0)]
    per_turn = [row(0, 1.0, 2, rewards=[0.5, None]), row(0, 1.0, 1, segment=1, rewards=[0.5])]
    assert rollout_turn_rewards(per_turn) == [[0.5, 0.0], [0.5]]
    partly = [row(0, 1.0, 2, rewards=[0.5, None]), row(0, 1.0, 1, segment=1)]
    assert rollout_turn_rewards(partly) == [[0.5, 0.0], [0.0]]
    assert rollout_turn_rewards([row(0, 1.0, 2), row(0, 1.0, 0, segment=1)]) == [[0.0, 1.0], []]
    with pytest.raises(ValueError, match="at least one segment"):
        rollout_turn_rewards([])


# -- advantages: a rollout counts once ----------------------------------------------------


def assert_advantages(got: list[torch.Tensor], expected: list[list[float]]) -> None:
    """Each row's float32 advantages equal `expected` (one list per row) to float32 precision."""
    assert [len(a) for a in got] == [len(e) for e in expected]
    assert all(a.dtype == torch.float32 for a in got)
    flat = [v for a in got for v in a.tolist()]
    assert flat == pytest.approx([v for e in expected for v in e], rel=1e-6, abs=1e-7)


def test_group_based_counts_a_two_segment_rollout_once():
    batch = three_rollouts()
    # rollout rewards (1, 0, 0): mean 1/3, sample std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    plain = rollout_advantages(batch, AlgorithmConfig(advantage_method="group_based", normalize_advantage_std=False))
    assert_advantages(plain, [[2 / 3], [-1 / 3], [2 / 3], [-1 / 3]])
    scaled = rollout_advantages(batch, AlgorithmConfig(advantage_method="group_based"))
    std = math.sqrt(1 / 3) + 1e-6
    assert_advantages(scaled, [[(2 / 3) / std], [(-1 / 3) / std], [(2 / 3) / std], [(-1 / 3) / std]])
    # counting the two segments as two episodes would give rewards (1, 0, 1, 0): mean 1/2
    rows_alone = compute_advantages("group_based", torch.tensor([1.0, 0.0, 1.0, 0.0]), ["g"] * 4, normalize_std=False)
    assert float(rows_alone[0]) == pytest.approx(0.5) != pytest.approx(float(plain[0]))


def test_group_based_per_turn_gives_each_segment_its_turns_slice():
    algorithm = AlgorithmConfig(advantage_method="group_based_per_turn", normalize_advantage_std=False)
    # final reward only: rollout turn rewards (0, 0, 1), (0, 0), (0) -> returns (1, 1, 1), (0, 0), (0)
    # turn 0: peers 1, 0, 0 (mean 1/3); turn 1: peers 1, 0 (mean 1/2); turn 2: only rollout 0 -> turn 0's mean
    out = rollout_advantages(three_rollouts(), algorithm)
    assert_advantages(out, [[1 - 1 / 3], [-1 / 3, -1 / 2], [1 - 1 / 3, 1 - 1 / 2], [-1 / 3]])
    # per-turn rewards (0.5, None | 0.5): returns (1, 0.5, 0.5); turn 1 peers 0.5, 0 (mean 1/4)
    out = rollout_advantages(three_rollouts(([0.5, None], [0.5])), algorithm)
    assert_advantages(out, [[0.5 - 1 / 3], [-1 / 3, -1 / 4], [1 - 1 / 3, 0.5 - 1 / 4], [-1 / 3]])


def test_segments_that_disagree_on_the_reward_take_the_last_segments():
    batch = three_rollouts()
    batch[2].reward = 0.0  # segment 0 says 0, segment 1 (the last) says 1
    algorithm = AlgorithmConfig(advantage_method="group_based", normalize_advantage_std=False)
    assert_advantages(rollout_advantages(batch, algorithm), [[2 / 3], [-1 / 3], [2 / 3], [-1 / 3]])


def test_opo_sums_a_rollouts_generated_tokens_in_the_trainer(tiny_policy):
    batch = three_rollouts()
    trainer = Trainer(copy.deepcopy(tiny_policy), AlgorithmConfig(advantage_method="opo"), OptimizerConfig())
    # L = 6 + 3 for rollout 0, 6 and 3 for the others: b = (9 * 1) / 18 = 1/2
    assert_advantages(trainer.advantages(batch), [[0.5], [-0.5], [0.5], [-0.5]])


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_without_segments_advantages_are_bit_identical_to_rows_taken_one_by_one(method):
    batch = [
        row(0, 1.0, 2),
        row(1, 0.0, 1),
        row(1, 0.5, 3),  # a repeated sample_index without segments stays two rollouts
        row(0, 0.0, 2, group="h"),
        row(1, 0.25, 1, group="h"),
        row(2, 1.0, 2, group="h", rewards=[0.5, 0.25]),
    ]
    algorithm = AlgorithmConfig(advantage_method=method, pass_k=2)
    expected = compute_advantages(
        method,
        torch.tensor([e.reward for e in batch], dtype=torch.float64),
        [e.group_id for e in batch],
        token_counts=torch.tensor([e.response_tokens for e in batch], dtype=torch.float64),
        turn_rewards=[turn_rewards(e) for e in batch],
        normalize_std=algorithm.normalize_advantage_std,
        pass_k=algorithm.pass_k,
    )
    got = rollout_advantages(batch, algorithm)
    assert len(got) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# -- rollout metrics ------------------------------------------------------------------


def test_rollout_metrics_count_a_two_segment_rollout_once():
    batch = three_rollouts()
    batch[1].finish_reason = "max_turns"
    batch += [row(0, 1.0, 1, group="h"), row(0, 1.0, 2, group="h", segment=1), row(1, 1.0, 1, group="h")]
    m = rollout_metrics(batch)
    # rollouts: g0 (1.0, 3 turns), g1 (0.0, 2, max_turns), g2 (0.0, 1), h0 (1.0, 3 turns), h1 (1.0, 1)
    assert m["rollout/stitch_breaks"] == 2.0
    assert m["rollout/episodes"] == 7.0
    assert m["rollout/reward/mean"] == pytest.approx(3 / 5)
    assert m["rollout/reward/std"] == pytest.approx(math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 4))
    assert m["rollout/reward/zero_frac"] == pytest.approx(2 / 5)
    assert m["rollout/success/mean"] == pytest.approx(3 / 5)
    assert m["rollout/turns/mean"] == pytest.approx((3 + 2 + 1 + 3 + 1) / 5)
    assert m["rollout/finish/answered"] == pytest.approx(4 / 5)
    assert m["rollout/finish/max_turns"] == pytest.approx(1 / 5)
    # per row: generated tokens 3, 6, 6, 3, 3, 6, 3
    assert m["rollout/tokens/response_mean"] == pytest.approx(30 / 7)
    assert m["rollout/tokens/response_max"] == 6.0
    assert m["rollout/tokens/total_mean"] == pytest.approx(sum(len(e.tokens) for e in batch) / 7)
    # group h: rewards (1, 1) over its two rollouts -> zero variance, all correct; g has signal
    assert m["analysis/zero_variance_groups"] == pytest.approx(1 / 2)
    assert m["analysis/zero_variance_groups/all_correct"] == pytest.approx(1 / 2)


def test_rollout_metrics_without_segments_count_rows():
    batch = [row(0, 1.0, 2), row(0, 0.0, 1), row(1, 0.0, 1)]  # a repeated sample_index is still two rows
    m = rollout_metrics(batch)
    assert m["rollout/stitch_breaks"] == 0.0
    assert m["rollout/reward/mean"] == pytest.approx(1 / 3)
    assert m["rollout/turns/mean"] == pytest.approx(4 / 3)
    assert m["rollout/episodes"] == 3.0
