"""EvalReport from per-task outcomes (rl_core/evaluation.py): the metrics over all tasks and per environment,
the parts of the held-out split, and the records it is saved as, on hand-computed values."""

from __future__ import annotations

import pytest

from rl_core.evaluation import EvalReport, TaskOutcome, summarize


def outcomes() -> list[TaskOutcome]:
    return [
        # refunds: 2 tasks, 4 samples each
        TaskOutcome(
            "refunds", "r1", True, 1.0, "answered", 2, 30, {"field/a": 1.0}, 4, 3, 3.0, 8, 100, {"answered": 4}
        ),
        TaskOutcome(
            "refunds",
            "r2",
            False,
            -0.1,
            "token_cap",
            3,
            40,
            {"format_penalty": -0.1},
            4,
            0,
            0.0,
            12,
            160,
            {"answered": 2, "token_cap": 1, "env_error": 1},
        ),
        # access: 1 task
        TaskOutcome(
            "access", "a1", False, 0.5, "max_turns", 6, 60, {"field/a": 0.5}, 4, 1, 2.0, 20, 200, {"max_turns": 4}
        ),
    ]


def test_metrics_over_all_tasks_and_per_environment():
    report = EvalReport.from_outcomes(outcomes(), pass_k=[1, 2])
    m = report.metrics
    assert m["val/pass_at_1"] == pytest.approx(1 / 3)
    assert m["val/reward_mean"] == pytest.approx((1.0 - 0.1 + 0.5) / 3)
    assert m["val/turns_mean"] == pytest.approx(11 / 3) and m["val/response_tokens_mean"] == pytest.approx(130 / 3)
    assert m["val/truncated_frac"] == pytest.approx(2 / 3) and m["val/env_error_frac"] == 0.0
    assert m["val/finish_frac/token_cap"] == pytest.approx(1 / 3) and m["val/finish_frac/timeout"] == 0.0
    assert m["val/reward_component/field/a"] == pytest.approx(1.5 / 3)
    assert m["val/reward_component/format_penalty"] == pytest.approx(-0.1 / 3)
    # pass@2 per task: 1 - C(n-c,2)/C(n,2): r1 (n4,c3) 1.0, r2 (c0) 0.0, a1 (c1) 1 - 3/6 = 0.5
    assert m["val/pass_at_k/2"] == pytest.approx(1.5 / 3)
    # pass^2 per task: C(c,2)/C(n,2): r1 3/6, r2 0, a1 0
    assert m["val/pass_hat_k/2"] == pytest.approx(0.5 / 3)
    assert m["val/sampled/reward_mean"] == pytest.approx(5.0 / 12)
    assert m["val/sampled/truncated_frac"] == pytest.approx(5 / 12) and m["val/sampled/env_error_frac"] == 1 / 12
    # per environment
    assert m["val/pass_at_1/refunds"] == 0.5 and m["val/pass_at_1/access"] == 0.0
    assert m["val/pass_at_k/2/refunds"] == pytest.approx(0.5) and m["val/pass_at_k/2/access"] == pytest.approx(0.5)
    assert report.per_env == {"refunds": 0.5, "access": 0.0}
    assert report.env_metrics("access")["finish_frac/max_turns"] == 1.0
    assert report.env_metrics("refunds") == summarize(outcomes()[:2], [1, 2])
    with pytest.raises(KeyError, match="'inventory' was not evaluated"):
        report.env_metrics("inventory")


def test_greedy_only_reports_have_no_sampled_metrics():
    greedy = [TaskOutcome(o.env_name, o.task_id, o.success, o.reward, o.finish_reason) for o in outcomes()]
    metrics = EvalReport.from_outcomes(greedy, pass_k=[1, 2]).metrics
    assert not any(name.startswith(("val/pass_at_k", "val/pass_hat_k", "val/sampled")) for name in metrics)


def test_parts_of_the_split_and_the_record_round_trip():
    report = EvalReport.from_outcomes(outcomes(), pass_k=[1, 2], gate_tasks=["refunds/r1", "access/a1"])
    assert report.metrics["val/gate/pass_at_1"] == 0.5 and report.metrics["val/selection/pass_at_1"] == 0.0
    assert report.selection_pass_at_1 == 0.0
    gate = report.part("gate")
    assert sorted(gate.task_success) == ["access/a1", "refunds/r1"] and gate.pass_at_1 == 0.5
    assert report.part("selection").task_success == {"refunds/r2": False}
    assert report.part("all") is report
    assert EvalReport.from_dict(report.to_dict()) == report
    with pytest.raises(ValueError, match="no gate/selection split"):
        EvalReport.from_outcomes(outcomes()).part("gate")


def test_a_record_written_before_outcomes_were_kept_still_reads():
    old = {"metrics": {"val/pass_at_1": 0.5}, "per_env": {"refunds": 0.5}, "task_success": {"refunds/r1": True}}
    report = EvalReport.from_dict(old)
    assert report.pass_at_1 == 0.5 and report.outcomes == {} and report.selection_pass_at_1 == 0.5
    assert report.env_metrics("refunds") == {"pass_at_1": 0.5}


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="no task outcomes"):
        EvalReport.from_outcomes([])
    with pytest.raises(ValueError, match="given twice"):
        EvalReport.from_outcomes([outcomes()[0], outcomes()[0]])
