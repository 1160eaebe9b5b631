"""The promotion gate's rules (rl_core/gate.py) on constructed score tables: the paired test holds back a
candidate better by one task of 180 and passes a clear margin, an environment regressing beyond the tolerance
is named, truncation and error limits hold, the starting policy is the one to beat without a champion, and the
simple rule is still there. Every number the decision was made on is in it."""

from __future__ import annotations

import pytest

from rl_core.config import GateConfig
from rl_core.evaluation import EvalReport, TaskOutcome
from rl_core.gate import STARTING_POLICY, Candidate, GateDecision, best_candidate, decide

ENVS = ("refunds", "inventory", "access")


def table(
    solved: dict[str, set[int]], per_env: int = 60, finish: dict[tuple[str, int], str] | None = None
) -> EvalReport:
    """A greedy evaluation of `per_env` gate tasks in each environment: task i of env e is solved when i is in
    solved[e]; `finish` sets a task's finish reason (default "answered")."""
    finish = finish or {}
    outcomes = [
        TaskOutcome(
            env,
            f"t{i:03d}",
            i in solved.get(env, set()),
            float(i in solved.get(env, set())),
            finish.get((env, i), "answered"),
        )
        for env in ENVS
        for i in range(per_env)
    ]
    return EvalReport.from_outcomes(outcomes)


CHAMPION = {env: set(range(24)) for env in ENVS}  # 72 of 180 solved: pass@1 0.400


def check(decision: GateDecision, name: str) -> dict:
    return next(c for c in decision.checks if c["name"] == name)


def test_one_more_task_of_180_is_not_an_improvement_at_095():
    candidate = {**CHAMPION, "refunds": set(range(25))}  # 73 of 180
    decision = decide(table(candidate), table(CHAMPION), GateConfig(), baseline_name="champion version 1")
    assert not decision.promote
    assert decision.candidate_pass_at_1 == pytest.approx(73 / 180) and decision.baseline_pass_at_1 == pytest.approx(0.4)
    assert decision.paired == {
        "tasks": 180,
        "candidate_only": 1,
        "champion_only": 0,
        "p_value": 0.5,  # P(X >= 1), X ~ Binomial(1, 1/2)
        "difference": pytest.approx(1 / 180),
        "confidence": 0.95,
        "min_effect": 0.02,
    }
    improvement = check(decision, "confidence")
    assert not improvement["passed"] and improvement["value"] == 0.5
    assert "not shown at confidence 0.95" in improvement["reason"]
    assert all(c["passed"] for c in decision.checks if c["name"] != "confidence")


def test_a_clear_margin_is_promoted_with_every_number_recorded():
    candidate = {env: set(range(30)) for env in ENVS}  # 90 of 180; 18 more, none lost
    decision = decide(
        table(candidate), table(CHAMPION), GateConfig(), baseline_name="champion version 1", champion_version="1"
    )
    assert decision.promote and decision.rule == "paired_test" and decision.gate_tasks == 180
    assert decision.paired["candidate_only"] == 18 and decision.paired["champion_only"] == 0
    assert decision.paired["p_value"] == pytest.approx(0.5**18)
    assert [c["name"] for c in decision.checks] == [
        "min_pass_at_1",
        "max_truncated_frac",
        "max_env_error_frac",
        "env_tolerance",
        "confidence",
    ]
    assert decision.per_env == {env: {"candidate": 0.5, "baseline": 0.4} for env in ENVS}
    markdown = decision.to_markdown("version 2")
    for text in ("version 2 promoted", "`gate.confidence`", "| solved by the champion version 1 only | 0 |", "0.500"):
        assert text in markdown
    assert GateDecision.from_dict(decision.as_dict()) == decision


def test_discordant_tasks_both_ways_need_a_net_gain():
    """12 gained and 10 lost: p = P(X >= 12 | n = 22) = 0.416, not an improvement."""
    candidate = {**CHAMPION, "refunds": (set(range(24)) - set(range(10))) | set(range(24, 36))}
    decision = decide(table(candidate), table(CHAMPION), GateConfig())
    assert decision.paired["candidate_only"] == 12 and decision.paired["champion_only"] == 10
    assert decision.paired["p_value"] == pytest.approx(0.4159, abs=1e-4)
    assert not decision.promote


def test_an_environment_regressing_beyond_the_tolerance_is_named():
    # inventory loses 9 of its 60 (0.400 -> 0.250), the others gain 20 each: overall clearly better
    candidate = {"refunds": set(range(44)), "access": set(range(44)), "inventory": set(range(15))}
    decision = decide(table(candidate), table(CHAMPION), GateConfig(env_tolerance=0.1))
    assert check(decision, "confidence")["passed"]  # the paired test alone would promote it
    assert not decision.promote
    regression = check(decision, "env_tolerance")
    assert not regression["passed"] and regression["value"] == pytest.approx(0.15)
    assert "inventory (pass@1 0.250 vs 0.400, -0.150)" in regression["reason"]
    assert "refunds" not in regression["reason"] and "access" not in regression["reason"]
    assert regression["reason"] in decision.reasons


def test_truncation_and_error_rates_above_their_limits_hold_a_candidate_back():
    candidate = {env: set(range(40)) for env in ENVS}
    cut = {("refunds", i): "token_cap" for i in range(50, 60)} | {("access", 59): "max_turns"}
    errors = {("inventory", 59): "env_error", ("inventory", 58): "env_error"}
    decision = decide(table(candidate, finish=cut | errors), table(CHAMPION), GateConfig())
    truncated, env_errors = check(decision, "max_truncated_frac"), check(decision, "max_env_error_frac")
    assert truncated["passed"] and truncated["value"] == pytest.approx(11 / 180)  # within 0.1
    assert not env_errors["passed"] and env_errors["value"] == pytest.approx(2 / 180)  # above 0.01
    assert not decision.promote and "above the limit 0.010" in env_errors["reason"]
    strict = decide(table(candidate, finish=cut), table(CHAMPION), GateConfig(max_truncated_frac=0.05))
    assert not strict.promote and not check(strict, "max_truncated_frac")["passed"]


def test_without_a_champion_the_starting_policy_is_the_one_to_beat():
    nothing = table({})  # pass@1 0.000
    decision = decide(nothing, table(CHAMPION), GateConfig(), baseline_name=STARTING_POLICY)
    assert not decision.promote and decision.baseline == STARTING_POLICY
    assert decision.candidate_pass_at_1 == 0.0
    assert any("starting policy" in reason for reason in decision.reasons)
    same = decide(table(CHAMPION), table(CHAMPION), GateConfig(), baseline_name=STARTING_POLICY)
    assert not same.promote  # no discordant task: p = 1.0


def test_the_floor_is_a_threshold_of_its_own():
    candidate = {env: set(range(40)) for env in ENVS}
    decision = decide(table(candidate), table(CHAMPION), GateConfig(min_pass_at_1=0.7))
    floor = check(decision, "min_pass_at_1")
    assert not floor["passed"] and floor["threshold"] == 0.7 and not decision.promote


def test_min_effect_holds_back_a_significant_but_small_gain():
    candidate = {**CHAMPION, "refunds": set(range(30))}  # 6 of 180 more: p = 1/64, difference 0.033
    assert decide(table(candidate), table(CHAMPION), GateConfig(min_effect=0.02)).promote
    small = decide(table(candidate), table(CHAMPION), GateConfig(min_effect=0.05))
    assert not small.promote and "below gate.min_effect 0.050" in check(small, "confidence")["reason"]


def test_a_baseline_scored_on_other_tasks_cannot_be_compared():
    other = EvalReport.from_outcomes([TaskOutcome("refunds", "elsewhere", True, 1.0, "answered")])
    decision = decide(table(CHAMPION), other, GateConfig())
    assert not decision.promote
    assert "different tasks" in check(decision, "confidence")["reason"]


def test_the_simple_rule_promotes_on_one_task():
    candidate = {**CHAMPION, "refunds": set(range(25))}
    decision = decide(table(candidate), table(CHAMPION), GateConfig(rule="simple"))
    assert decision.promote and decision.rule == "simple"
    assert "beats the champion's pass@1 0.400 by 0.006" in decision.reasons[1]


def test_an_older_gate_record_reads_with_its_champion_score_as_the_baseline():
    old = {
        "promote": True,
        "reasons": ["r"],
        "candidate_pass_at_1": 0.5,
        "champion_pass_at_1": 0.4,
        "floor": 0.0,
        "champion_version": "1",
        "outcome": "promoted",
    }
    decision = GateDecision.from_dict(old)
    assert decision.baseline_pass_at_1 == 0.4 and decision.baseline == "champion" and decision.rule == "simple"


def test_the_candidate_is_chosen_on_the_selection_part_only():
    """Step 2 is best on the gate part, step 1 on the selection part: step 1 goes to the gate."""

    def report(selection: int, gate: int) -> EvalReport:
        outcomes = [TaskOutcome("refunds", f"s{i}", i < selection) for i in range(10)]
        outcomes += [TaskOutcome("refunds", f"g{i}", i < gate) for i in range(10)]
        return EvalReport.from_outcomes(outcomes, gate_tasks=[f"refunds/g{i}" for i in range(10)])

    one, two = Candidate(report(6, 2), "1", 1), Candidate(report(5, 9), "2", 2)
    assert one.report.metrics["val/selection/pass_at_1"] == 0.6 and two.report.metrics["val/gate/pass_at_1"] == 0.9
    assert best_candidate([one, two]) is one
    assert one.report.part("gate").pass_at_1 == 0.2 and one.report.part("selection").pass_at_1 == 0.6
