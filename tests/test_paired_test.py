"""The exact McNemar test of the promotion gate, against hand-computed values."""

from __future__ import annotations

from math import comb

import pytest

from rl_core.paired_test import mcnemar_exact


def outcomes(both: int, candidate_only: int, champion_only: int, neither: int) -> tuple[dict, dict]:
    """Per-task outcomes with the given 2x2 table (candidate, champion)."""
    rows = [(True, True)] * both + [(True, False)] * candidate_only + [(False, True)] * champion_only
    rows += [(False, False)] * neither
    return ({f"t{i}": a for i, (a, _) in enumerate(rows)}, {f"t{i}": b for i, (_, b) in enumerate(rows)})


def test_the_p_value_is_the_binomial_tail_of_the_discordant_tasks():
    result = mcnemar_exact(*outcomes(both=10, candidate_only=5, champion_only=1, neither=4))
    assert (result.tasks, result.candidate_only, result.champion_only) == (20, 5, 1)
    assert result.p_value == pytest.approx(7 / 64)  # P(X >= 5), X ~ Bin(6, 1/2): (C(6,5) + C(6,6)) / 2^6
    assert result.difference == pytest.approx(4 / 20)


def test_one_task_better_out_of_180_is_not_an_improvement_and_a_clear_margin_is():
    one = mcnemar_exact(*outcomes(both=70, candidate_only=1, champion_only=0, neither=109))
    assert one.p_value == pytest.approx(0.5) and not one.shows_improvement(0.95)
    clear = mcnemar_exact(*outcomes(both=60, candidate_only=20, champion_only=3, neither=97))
    expected = sum(comb(23, k) for k in range(20, 24)) / 2**23
    assert clear.p_value == pytest.approx(expected) and expected < 0.001
    assert clear.shows_improvement(0.95) and clear.shows_improvement(0.95, min_effect=0.05)
    assert not clear.shows_improvement(0.95, min_effect=0.2)  # 17/180 = 0.094 of pass@1


def test_no_discordant_task_shows_nothing_and_mismatched_task_sets_are_refused():
    same = mcnemar_exact(*outcomes(both=3, candidate_only=0, champion_only=0, neither=2))
    assert same.p_value == 1.0 and not same.shows_improvement(0.5)
    worse = mcnemar_exact(*outcomes(both=0, candidate_only=0, champion_only=4, neither=0))
    assert worse.p_value == 1.0 and worse.difference == -1.0
    with pytest.raises(ValueError, match="different tasks"):
        mcnemar_exact({"a": True}, {"b": True})
    with pytest.raises(ValueError, match="no tasks"):
        mcnemar_exact({}, {})
    with pytest.raises(ValueError, match="confidence"):
        same.shows_improvement(1.0)
