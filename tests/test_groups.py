"""The Group type: one function groups episodes, in a stable order, and a group answers what it holds."""

import pytest

from rl_core.groups import Group, episodes_of, group_episodes, make_group_id
from rl_core.metrics import count_zero_variance_groups, rollout_metrics
from rl_core.selection import drop_zero_variance_groups
from rl_core.trajectory import Episode, Turn


def episode(group, sample, reward, *, task=None, env="env", iteration=1, success=None, generated=2):
    """A small episode of `group`: 3 prompt tokens and `generated` generated ones."""
    tokens = list(range(5, 8 + generated))
    mask = [0, 0, 0] + [1] * generated
    return Episode(
        "r",
        iteration,
        0,
        env,
        task or f"task-{group}",
        group,
        sample,
        tokens,
        mask,
        [-0.5 * m for m in mask],
        [Turn("user", "p", 0, 3), Turn("assistant", "a", 3, len(tokens))],
        reward=reward,
        reward_components={},
        success=reward >= 1.0 if success is None else success,
        finish_reason="answered",
    )


def test_group_episodes_keeps_the_order_of_first_appearance_and_gathers_non_adjacent_members():
    batch = [episode("b", 0, 1.0), episode("a", 0, 0.0), episode("b", 1, 0.0), episode("a", 1, 0.0)]
    groups = group_episodes(batch)
    assert [g.group_id for g in groups] == ["b", "a"]
    assert [g.index for g in groups] == [0, 1]
    assert [g.positions for g in groups] == [(0, 2), (1, 3)]
    assert groups[0].episodes == (batch[0], batch[2]) and groups[1].episodes == (batch[1], batch[3])
    assert episodes_of(groups) == [batch[0], batch[2], batch[1], batch[3]]
    assert group_episodes([]) == []


def test_group_carries_what_its_members_share_and_their_rewards():
    [group] = group_episodes([episode("g", 0, 0.25, task="t7", env="math", iteration=4), episode("g", 1, 1.0)])
    assert (group.iteration, group.env_name, group.task_id) == (4, "math", "t7")
    assert group.size == 2 and group.rewards == (0.25, 1.0) and group.response_tokens == 4
    assert not group.zero_variance and not group.all_correct


def test_zero_variance_means_every_reward_is_exactly_equal_and_a_group_of_one_is_one():
    same, close, one = group_episodes(
        [episode("same", 0, 1.0), episode("same", 1, 1.0), episode("close", 0, 0.5), episode("close", 1, 0.5 + 1e-12)]
        + [episode("one", 0, 0.3)]
    )
    assert same.zero_variance and same.all_correct
    assert not close.zero_variance
    assert one.zero_variance


def test_group_refuses_an_empty_group_strangers_and_mismatched_positions():
    a0, b0 = episode("a", 0, 1.0), episode("b", 0, 1.0)
    fields = {"index": 0, "iteration": 1, "env_name": "env", "task_id": "t"}
    with pytest.raises(ValueError, match="no episodes"):
        Group(group_id="a", episodes=(), positions=(), **fields)
    with pytest.raises(ValueError, match="other groups.*'b'"):
        Group(group_id="a", episodes=(a0, b0), positions=(0, 1), **fields)
    with pytest.raises(ValueError, match="1 positions for 2 episodes"):
        Group(group_id="a", episodes=(a0, a0), positions=(0,), **fields)


def test_group_is_frozen():
    [group] = group_episodes([episode("g", 0, 1.0)])
    with pytest.raises(AttributeError):
        group.index = 3


def test_make_group_id_is_the_format_the_rollout_engine_writes():
    assert make_group_id("run-1", 3, 12, "task/with/slashes") == "run-1/3/12/task/with/slashes"


def test_zero_variance_groups_are_counted_dropped_and_reported_alike():
    batch = [
        episode("right", 0, 1.0),
        episode("mixed", 0, 0.0),
        episode("right", 1, 1.0),
        episode("wrong", 0, 0.0),
        episode("mixed", 1, 1.0),
        episode("wrong", 1, 0.0),
    ]
    groups = group_episodes(batch)
    assert count_zero_variance_groups(groups) == (1, 1)
    assert drop_zero_variance_groups(batch) == [batch[1], batch[4]]
    metrics = rollout_metrics(batch)
    assert metrics["analysis/zero_variance_groups"] == pytest.approx(2 / 3)
    assert metrics["analysis/zero_variance_groups/all_correct"] == pytest.approx(1 / 3)
    assert metrics["analysis/zero_variance_groups/all_wrong"] == pytest.approx(1 / 3)
