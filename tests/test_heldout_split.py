"""The held-out split's selection and gate parts: disjoint, stable, per environment."""

from __future__ import annotations

import random

import pytest

from rl_core.environments import load_environment
from rl_core.environments.base import Task
from rl_core.heldout_split import gate_size, limit_split, split_heldout


def heldout() -> list[Task]:
    return [t for name in ("refunds", "inventory", "access") for t in load_environment(name).tasks("heldout")]


def test_the_parts_are_disjoint_cover_every_task_and_split_each_environment():
    tasks = heldout()
    split = split_heldout(tasks, 0.5)
    selection = {(t.env_name, t.task_id) for t in split.selection}
    gate = {(t.env_name, t.task_id) for t in split.gate}
    assert not selection & gate and len(selection | gate) == len(tasks)
    for env in {t.env_name for t in tasks}:
        n = sum(t.env_name == env for t in tasks)
        assert sum(t.env_name == env for t in split.gate) == round(0.5 * n)
        assert any(t.env_name == env for t in split.selection)


def test_the_split_is_the_same_whatever_the_order_and_in_every_run():
    tasks = heldout()
    shuffled = list(tasks)
    random.Random(7).shuffle(shuffled)
    a, b = split_heldout(tasks, 0.3), split_heldout(shuffled, 0.3)
    assert {t.task_id for t in a.gate} == {t.task_id for t in b.gate}
    # pinned: a change of the rule shows here (a run's gate tasks must not move between versions)
    refunds_gate = sorted(int(t.task_id.rsplit("-", 1)[1]) for t in a.gate if t.env_name == "refunds")
    assert refunds_gate == [10, 12, 13, 22, 24, 25, 29, 33, 34, 37, 38, 39, 44, 48, 49, 54, 55, 58]


def test_small_environments_and_bad_arguments():
    one = [Task("a-0", "a", "heldout", "p")]
    two = [Task("b-0", "b", "heldout", "p"), Task("b-1", "b", "heldout", "p")]
    split = split_heldout(one + two, 0.9)
    assert [t.task_id for t in split.gate if t.env_name == "a"] == ["a-0"]
    assert len([t for t in split.gate if t.env_name == "b"]) == 1  # never the whole environment
    with pytest.raises(ValueError, match="gate_fraction"):
        split_heldout(one, 1.0)
    with pytest.raises(ValueError, match="more than once"):
        split_heldout(one + one, 0.5)


def test_fewer_tasks_never_move_a_task_to_the_other_part():
    """evaluation.max_tasks takes tasks from each part of the full split: a run evaluated on 5 or 40 tasks per
    environment gates only on tasks the full split puts in the gate part."""
    tasks = heldout()
    full = split_heldout(tasks, 0.5)
    full_gate = {(t.env_name, t.task_id) for t in full.gate}
    for max_tasks in (1, 2, 5, 40, 60, 100):
        limited = limit_split(full, max_tasks, 0.5)
        assert {(t.env_name, t.task_id) for t in limited.gate} <= full_gate
        assert not {(t.env_name, t.task_id) for t in limited.selection} & full_gate
        for env in ("refunds", "inventory", "access"):
            gate = sum(t.env_name == env for t in limited.gate)
            selection = sum(t.env_name == env for t in limited.selection)
            assert gate == min(gate_size(max_tasks, 0.5), 30) and gate + selection == min(max_tasks, 60)
    assert [t.task_id for t in limit_split(full, 2, 0.5).gate if t.env_name == "access"] == [
        next(t.task_id for t in full.gate if t.env_name == "access")
    ]
    with pytest.raises(ValueError, match="max_tasks must be >= 1"):
        limit_split(full, 0, 0.5)
