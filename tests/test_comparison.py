"""The side-by-side comparison of evaluations (rl_core/comparison.py), on hand-made task outcomes."""

from __future__ import annotations

import pytest

from rl_core.comparison import ALL, check_same_tasks, compare
from rl_core.evaluation import EvalReport, TaskOutcome


def outcome(env, task, success, reward, finish, turns, tokens, components, samples=0, successes=0):
    return TaskOutcome(
        env_name=env,
        task_id=task,
        success=success,
        reward=reward,
        finish_reason=finish,
        turns=turns,
        response_tokens=tokens,
        reward_components=components,
        samples=samples,
        sample_successes=successes,
        sample_finish={"answered": samples} if samples else {},
    )


def start_report() -> EvalReport:
    """Sampled (2 per task, pass_k 1 and 2): refunds r1 solved, r2 cut off at max_turns; inventory i1 solved."""
    return EvalReport.from_outcomes(
        [
            outcome("refunds", "r1", True, 1.0, "answered", 2, 10, {"fields": 1.0}, samples=2, successes=1),
            outcome("refunds", "r2", False, 0.25, "max_turns", 6, 40, {"fields": 0.25}, samples=2, successes=0),
            outcome("inventory", "i1", True, 1.0, "answered", 3, 20, {"fields": 1.0, "format": 0.5}, 2, 2),
        ],
        pass_k=(1, 2),
    )


def candidate_report() -> EvalReport:
    """Greedy only: both refunds tasks solved, inventory i1 an environment failure."""
    return EvalReport.from_outcomes(
        [
            outcome("refunds", "r1", True, 1.0, "answered", 2, 12, {"fields": 1.0}),
            outcome("refunds", "r2", True, 1.0, "answered", 3, 15, {"fields": 1.0}),
            outcome("inventory", "i1", False, 0.0, "env_error", 1, 5, {"fields": 0.0}),
        ]
    )


HEADER = [
    "model",
    "pass@1 (greedy)",
    "pass@1 (sampled)",
    "pass@2 (sampled)",
    "pass^2 (sampled)",
    "reward",
    "reward: fields",
    "reward: format",
    "turns",
    "response tokens",
    "truncated",
    "max_turns",
    "env_error",
    "tasks",
]


def cells(markdown_table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown_table.splitlines()]


def test_the_table_over_all_tasks_shows_each_model_with_hand_computed_cells():
    comparison = compare({"start": start_report(), "candidate": candidate_report()})
    header, separator, *rows = cells(comparison.table(ALL))
    assert header == HEADER and len(separator) == len(HEADER)
    # start: pass@1 2/3; sampled pass@1 (1/2 + 0 + 1)/3 = 0.5; pass@2 (1 + 0 + 1)/3; pass^2 (0 + 0 + 1)/3;
    # reward (1 + 0.25 + 1)/3 = 0.75; format (0 + 0 + 0.5)/3; turns 11/3; tokens 70/3; r2 cut off: 1/3
    assert rows[0] == [
        "start", "0.667", "0.500", "0.667", "0.333", "0.750", "0.750", "0.167",
        "3.7", "23.3", "0.333", "0.333", "0.000", "3",
    ]  # fmt: skip
    # candidate: greedy only (no pass@k), never logged a format component; i1 ended env_error (not truncation)
    assert rows[1] == [
        "candidate", "0.667", "—", "—", "—", "0.667", "0.667", "—",
        "2.0", "10.7", "0.000", "0.000", "0.333", "3",
    ]  # fmt: skip


def test_each_environment_has_its_own_table():
    comparison = compare({"start": start_report(), "candidate": candidate_report()})
    assert comparison.scopes == [ALL, "refunds", "inventory"]
    _, _, start, candidate = cells(comparison.table("refunds"))
    # refunds alone: pass@1 1/2, sampled pass@1 (1/2 + 0)/2, pass@2 1/2, pass^2 0; no task there logged `format`
    assert start == [
        "start", "0.500", "0.250", "0.500", "0.000", "0.625", "0.625", "—",
        "4.0", "25.0", "0.500", "0.500", "0.000", "2",
    ]  # fmt: skip
    assert candidate == [
        "candidate", "1.000", "—", "—", "—", "1.000", "1.000", "—",
        "2.5", "13.5", "0.000", "0.000", "0.000", "2",
    ]  # fmt: skip
    _, _, start, candidate = cells(comparison.table("inventory"))
    assert start[1:3] + start[7:8] + start[-1:] == ["1.000", "1.000", "0.500", "1"]
    assert candidate[1] == "0.000" and candidate[-2:] == ["1.000", "1"]


def test_values_are_the_reports_own_metrics():
    start, candidate = start_report(), candidate_report()
    comparison = compare({"start": start, "candidate": candidate})
    for label, report in (("start", start), ("candidate", candidate)):
        for name, value in comparison.values[ALL][label].items():
            assert value == (len(report.task_success) if name == "tasks" else report.metrics[f"val/{name}"])
        for env in report.environments:
            env_values = dict(comparison.values[env][label])
            assert env_values.pop("tasks") == sum(o.env_name == env for o in report.outcomes.values())
            assert env_values == report.env_metrics(env)


def test_markdown_has_a_section_per_scope_under_the_title():
    comparison = compare({"start": start_report()})
    lines = comparison.markdown("Evaluation eval-1", notes=["champion: none yet"]).splitlines()
    assert lines[:5] == ["# Evaluation eval-1", "", comparison.caption(), "", "champion: none yet"]
    assert [line for line in lines if line.startswith("## ")] == ["## all environments", "## refunds", "## inventory"]
    assert sum(line.startswith("| start |") for line in lines) == 3


def test_reports_on_different_tasks_are_refused_naming_the_models_that_differ():
    other = EvalReport.from_outcomes(
        [
            outcome("refunds", "r1", True, 1.0, "answered", 2, 12, {}),
            outcome("refunds", "r3", True, 1.0, "answered", 2, 12, {}),
            outcome("inventory", "i1", True, 1.0, "answered", 2, 12, {}),
        ]
    )
    reports = {"start": start_report(), "candidate": candidate_report(), "other": other}
    with pytest.raises(ValueError) as caught:
        compare(reports)
    message = str(caught.value)
    assert "'other': 1 task(s) 'start' was not scored on (e.g. refunds/r3)" in message
    assert "1 of 'start''s task(s) missing (e.g. refunds/r2)" in message
    assert "'candidate'" not in message
    check_same_tasks({"start": start_report(), "candidate": candidate_report()})  # same tasks: no error
    with pytest.raises(ValueError, match="no evaluations"):
        compare({})


def test_component_names_with_a_slash_and_records_without_outcomes():
    report = EvalReport.from_outcomes(
        [
            outcome("refunds", "r1", True, 1.0, "answered", 2, 10, {"field/amount": 1.0, "field/decision": 1.0}),
            outcome("refunds", "r2", False, 0.5, "answered", 2, 10, {"field/amount": 0.0, "field/decision": 1.0}),
        ]
    )
    record = report.to_dict()
    del record["outcomes"]  # an evaluation recorded before per-task outcomes were kept
    old = EvalReport.from_dict(record)
    comparison = compare({"new": report, "old": old})
    header, _, new_row, old_row = cells(comparison.table(ALL))
    assert header[1:4] == ["pass@1 (greedy)", "reward", "reward: field/amount"]
    assert header[4] == "reward: field/decision" and "reward: field" not in header
    assert new_row[1:5] == old_row[1:5] == ["0.500", "0.750", "0.500", "1.000"]
    _, _, new_row, old_row = cells(comparison.table("refunds"))
    assert new_row[1:3] == ["0.500", "0.750"] and old_row[1:3] == ["0.500", "—"]  # the old record: pass@1 only
    assert new_row[-1] == old_row[-1] == "2"


def test_the_caption_says_which_episodes_each_column_is_of():
    sampled = compare({"start": start_report(), "candidate": candidate_report()})
    assert sampled.caption() == (
        "pass@1 (greedy): share of tasks the greedy (temperature 0) episode solved; pass@k / pass^k (sampled): "
        "from the sampled episodes of each task; reward, its components, turns, response tokens, truncated, "
        "max_turns and env_error: means and shares of the greedy episodes (one per task)."
    )
    greedy = compare({"candidate": candidate_report()})
    assert "sampled" not in greedy.caption() and "sampled" not in greedy.table(ALL)
    lines = sampled.markdown("T").splitlines()
    assert lines[2] == sampled.caption()


def test_a_footnote_under_the_table_over_all_environments_names_the_diluted_components():
    # `format` is logged in inventory only (1 of 3 tasks): over all tasks its mean counts refunds' 2 tasks as 0
    comparison = compare({"start": start_report(), "candidate": candidate_report()})
    assert comparison.component_envs == {"fields": ["refunds", "inventory"], "format": ["inventory"]}
    assert comparison.env_tasks == {"refunds": 2, "inventory": 1}
    footnote = (
        "Reward components: a task that does not log a component counts 0 in its mean (as MLflow's "
        "`val/reward_component/<name>`), so over all environments a component some environments lack is diluted "
        "by their tasks: `format` in inventory only (1 of 3 tasks). The environment tables show it undiluted."
    )
    assert comparison.component_footnote() == footnote
    lines = comparison.markdown().splitlines()
    table_end = lines.index("## refunds") - 1
    assert lines[table_end - 1] == footnote and lines[table_end - 3].startswith("| candidate |")
    assert lines.count(footnote) == 1  # under the table over all environments only
    # 0.167 over all tasks is inventory's 0.5 diluted by refunds' 2 tasks: 0.5 * 1/3
    assert comparison.values[ALL]["start"]["reward_component/format"] == pytest.approx(0.5 / 3)
    assert comparison.values["inventory"]["start"]["reward_component/format"] == 0.5


def test_the_component_footnote_also_reads_records_without_outcomes_and_is_short_when_nothing_is_diluted():
    record = start_report().to_dict()
    del record["outcomes"]
    old = compare({"old": EvalReport.from_dict(record)})
    assert old.component_envs == {"fields": ["refunds", "inventory"], "format": ["inventory"]}
    assert old.env_tasks == {"refunds": 2, "inventory": 1}
    everywhere = compare({"candidate": candidate_report()})  # `fields` logged in both environments
    assert everywhere.component_footnote() == (
        "Reward components: a task that does not log a component counts 0 in its mean (as MLflow's "
        "`val/reward_component/<name>`)."
    )
    no_components = EvalReport.from_outcomes([outcome("refunds", "r1", True, 1.0, "answered", 2, 10, {})])
    assert compare({"x": no_components}).component_footnote() is None
