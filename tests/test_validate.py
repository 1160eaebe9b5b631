"""Validation gate: each GX expectation fails alone; the Prefect task quarantines bad batches."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from rl_core.config import ValidationConfig  # noqa: E402
from rl_core.store import TrajectoryStore  # noqa: E402
from rl_core.trajectory import TRAJECTORY_SCHEMA, Episode, Turn, episodes_to_table  # noqa: E402
from tasks.validate import (  # noqa: E402
    CHECK_ORDER,
    ValidationReport,
    artifact_key,
    validate_batch,
    validate_trajectories,
)

RUN = "run-validate"
CFG = ValidationConfig()
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
GROUPS, GROUP_SIZE = 25, 4  # 100 episodes: one episode is exactly 1% of the batch
CONSTANT_GROUPS = 5  # groups 0-4 get the same reward for every sample


# -- realistic batches -----------------------------------------------------------------


def make_episode(
    group: int,
    sample: int,
    reward: float,
    finish_reason: str = "answered",
    env_error: str | None = None,
    iteration: int = 1,
) -> Episode:
    """A tool-using episode: prompt, assistant call, tool result, assistant answer."""
    rng = np.random.default_rng(group * 100 + sample)
    spans = [("system", 6), ("user", 8), ("assistant", 7), ("tool", 5), ("assistant", 4 + sample)]
    if finish_reason == "env_error":
        spans = spans[:3]  # the tool call never came back
    tokens: list[int] = []
    mask: list[int] = []
    logprobs: list[float] = []
    turns: list[Turn] = []
    for i, (role, n) in enumerate(spans):
        start = len(tokens)
        tokens += [int(t) for t in rng.integers(5, 300, size=n)]
        generated = role == "assistant"
        mask += [int(generated)] * n
        logprobs += [float(x) for x in (-rng.exponential(0.7, size=n)).astype(np.float32)] if generated else [0.0] * n
        last = i == len(spans) - 1
        turns.append(
            Turn(
                role=role,
                text=f"{role} text {i}",
                start=start,
                end=len(tokens),
                tool_name="get_order" if role == "tool" else None,
                tool_ok=True if role == "tool" else None,
                finish_reason=(("length" if finish_reason == "token_cap" and last else "stop") if generated else None),
            )
        )
    return Episode(
        run_id=RUN,
        iteration=iteration,
        policy_version=iteration - 1,
        env_name="sop",
        task_id=f"task-{group:03d}",
        group_id=f"g{group:03d}",
        sample_index=sample,
        tokens=tokens,
        loss_mask=mask,
        behavior_logprobs=logprobs,
        turns=turns,
        reward=reward,
        reward_components={"correct": max(reward, 0.0), "format": min(reward, 0.0)},
        success=reward >= 1.0,
        finish_reason=finish_reason,
        env_error=env_error,
        attempts=3 if finish_reason == "env_error" else 1,
        created_at=T0,
    )


# Episodes (by row) that end other than `answered` in the passing batch: inside every limit.
GOOD_ENDINGS = {
    **{row: "token_cap" for row in (21, 42, 63, 84)},  # 4% <= 5%
    **{row: "max_turns" for row in (22, 33, 44, 55, 66, 77, 88, 99)},  # 8% <= 10%
    50: "env_error",  # 1% <= 1%
}
TIMEOUT_TEXT = "TimeoutError: tool call exceeded 600 s"
CONNECTION_TEXT = "ConnectionError: tool backend unreachable"


def good_episodes(iteration: int = 1) -> list[Episode]:
    """100 episodes that pass every check: mixed rewards, 5 constant-reward groups."""
    episodes = []
    for group in range(GROUPS):
        for sample in range(GROUP_SIZE):
            row = group * GROUP_SIZE + sample
            ending = GOOD_ENDINGS.get(row, "answered")
            if ending != "answered":
                reward = 0.0
            elif group < CONSTANT_GROUPS:
                reward = 1.0
            else:
                reward = (1.0, 0.5, 0.0, -0.1)[(group + sample) % 4]
            episodes.append(
                make_episode(
                    group,
                    sample,
                    reward,
                    ending,
                    env_error=TIMEOUT_TEXT if ending == "env_error" else None,
                    iteration=iteration,
                )
            )
    return episodes


def rows_where(episodes: list[Episode], finish_reason: str) -> list[int]:
    return [i for i, ep in enumerate(episodes) if ep.finish_reason == finish_reason]


def with_endings(count: int, finish_reason: str, env_error: str | None = None) -> pa.Table:
    """The good batch with `count` more answered episodes re-ended as `finish_reason`."""
    episodes = good_episodes()
    answered = rows_where(episodes, "answered")
    for row in answered[:count]:
        ep = episodes[row]
        episodes[row] = make_episode(int(ep.group_id[1:]), ep.sample_index, 0.0, finish_reason, env_error)
    return episodes_to_table(episodes)


def with_episode(row: int, **changes) -> pa.Table:
    """The good batch with one episode's fields changed (still a valid Episode)."""
    episodes = good_episodes()
    for name, value in changes.items():
        setattr(episodes[row], name, value)
    return episodes_to_table(episodes)


def with_column(table: pa.Table, name: str, transform: Callable[[list], list]) -> pa.Table:
    """Replace a column's Python values (for rows the Episode checks would refuse)."""
    index = table.schema.get_field_index(name)
    field = table.schema.field(name)
    values = transform(table.column(name).to_pylist())
    return table.set_column(index, field, pa.array(values, type=field.type))


def set_row(row: int, value) -> Callable[[list], list]:
    def transform(values: list) -> list:
        values[row] = value(values[row]) if callable(value) else value
        return values

    return transform


@pytest.fixture(scope="module")
def good_table() -> pa.Table:
    return episodes_to_table(good_episodes())


@pytest.fixture(scope="module")
def good_report(good_table) -> ValidationReport:
    return validate_batch(good_table, CFG)


# -- the suite -------------------------------------------------------------------------


def test_good_batch_passes_every_check(good_report):
    assert good_report.passed, good_report.reason
    assert [c.name for c in good_report.checks] == list(CHECK_ORDER)
    assert all(c.passed for c in good_report.checks), good_report.as_rows()
    assert good_report.rows == 100
    assert good_report.reason == f"All {len(CHECK_ORDER)} checks passed on 100 episodes."
    rates = {c.name: c.observed for c in good_report.checks if c.name.endswith("_rate")}
    assert rates == pytest.approx(
        {"token_cap_rate": 0.04, "context_overflow_rate": 0.0, "max_turns_rate": 0.08, "env_error_rate": 0.01}
    )
    # every loss_mask token outside the one env_error episode (row 50) is trainable
    episodes = good_episodes()
    trainable = sum(sum(ep.loss_mask) for ep in episodes if ep.finish_reason != "env_error")
    assert good_report.check("trainable_tokens").observed == trainable > 0


def test_zero_variance_group_share(good_report, good_table):
    # groups 0-4 are constant by construction; which others are? count them independently
    episodes = good_episodes()
    by_group: dict[str, set[float]] = {}
    for ep in episodes:
        by_group.setdefault(ep.group_id, set()).add(ep.reward)
    constant = sum(len(r) == 1 for r in by_group.values())
    assert constant >= CONSTANT_GROUPS
    assert good_report.groups == GROUPS
    assert good_report.zero_variance_group_frac == pytest.approx(constant / GROUPS)

    small = episodes_to_table(
        [
            make_episode(0, 0, 1.0),
            make_episode(0, 1, 1.0),  # constant
            make_episode(1, 0, 0.0),
            make_episode(1, 1, 1.0),  # varied
            make_episode(2, 0, 0.5),  # a single sample is constant
            make_episode(3, 0, -0.1),
            make_episode(3, 1, -0.1),
            make_episode(3, 2, 0.5),
        ]
    )
    report = validate_batch(small, CFG)
    assert report.groups == 4
    assert report.zero_variance_group_frac == pytest.approx(2 / 4)
    assert report.as_rows()[-1]["check"] == "zero_variance_groups"
    assert report.as_rows()[-1]["observed"] == "50.0%"


def _bad_batches() -> dict[str, tuple[Callable[[pa.Table], pa.Table], str, list[str]]]:
    """case -> (make the failing table from the good one, the check, words the reason needs)."""
    return {
        "missing column": (
            lambda t: t.drop_columns(["attempts"]),
            "columns_present",
            ["columns_present", "attempts"],
        ),
        "wrong column type": (
            lambda t: t.set_column(
                t.schema.get_field_index("attempts"),
                pa.field("attempts", pa.string(), nullable=False),
                t.column("attempts").cast(pa.string()),
            ),
            "column_types",
            ["column_types", "attempts", "string"],
        ),
        "null in a required column": (
            lambda t: with_column(t, "reward", set_row(7, None)),
            "required_not_null",
            ["reward", "1 null"],
        ),
        "null list in a required column": (
            lambda t: with_column(t, "turns", set_row(7, None)),
            "required_not_null",
            ["turns", "1 null"],
        ),
        "unequal lengths": (
            lambda t: with_column(t, "loss_mask", set_row(12, lambda m: m + [0])),
            "lengths_equal",
            ["lengths", "1 episode", "group g003 sample 0"],
        ),
        "non-binary loss mask": (
            lambda t: with_column(t, "loss_mask", set_row(12, lambda m: [2 if v else 0 for v in m])),
            "loss_mask_binary",
            ["loss_mask", "group g003 sample 0"],
        ),
        "positive log-prob on a generated token": (
            lambda t: with_column(t, "behavior_logprobs", set_row(30, lambda lp: _at_generated(t, 30, lp, 0.5))),
            "logprobs_nonpositive",
            ["positive log-probs", "group g007 sample 2"],
        ),
        "NaN log-prob on a generated token": (
            lambda t: with_column(t, "behavior_logprobs", set_row(30, lambda lp: _at_generated(t, 30, lp, math.nan))),
            "logprobs_finite",
            ["non-finite log-probs", "group g007 sample 2"],
        ),
        "reward out of range": (
            lambda t: with_episode(9, reward=2.5),
            "reward_in_range",
            ["reward outside [-0.1, 1.0]", "2.5"],
        ),
        "unknown finish_reason": (
            lambda t: with_column(t, "finish_reason", set_row(3, "crashed")),
            "finish_reason_known",
            ["finish_reason", "'crashed'"],
        ),
        "6% token cap": (
            lambda t: with_endings(2, "token_cap"),
            "token_cap_rate",
            ["token cap", "6.0%", "5.0% limit"],
        ),
        "11% max_turns": (
            lambda t: with_endings(3, "max_turns"),
            "max_turns_rate",
            ["max_turns", "11.0%", "10.0% limit"],
        ),
        "6% context_overflow": (
            lambda t: with_endings(6, "context_overflow"),
            "context_overflow_rate",
            ["context window", "'context_overflow'", "6.0%", "5.0% limit", "policy.context_window"],
        ),
        "no trainable tokens": (
            lambda t: with_column(t, "loss_mask", lambda masks: [[0] * len(m) for m in masks]),
            "trainable_tokens",
            ["no trainable tokens", "loss_mask == 1", "100 episodes", "finish reasons: 87 answered"],
        ),
        "5% env_error": (
            lambda t: with_endings(4, "env_error", CONNECTION_TEXT),
            "env_error_rate",
            [
                "Permanent environment failures in 5.0% of episodes exceed the 1.0% limit",
                "environment bug",
                f"most common error: '{CONNECTION_TEXT}', 4 episodes",
            ],
        ),
    }


def _at_generated(table: pa.Table, row: int, logprobs: list, value: float) -> list:
    """`logprobs` with `value` on the row's last generated token (loss_mask == 1)."""
    mask = table.column("loss_mask")[row].as_py()
    last = max(i for i, m in enumerate(mask) if m == 1)
    return logprobs[:last] + [value] + logprobs[last + 1 :]


@pytest.mark.parametrize("case", list(_bad_batches()))
def test_each_expectation_fails_alone(case, good_table):
    make, check, words = _bad_batches()[case]
    report = validate_batch(make(good_table), CFG)
    assert not report.passed
    assert report.failed_checks == [check], report.as_rows()
    assert "\n" not in report.reason and report.reason.endswith(".")
    for word in words:
        assert word in report.reason, report.reason
    assert report.check(check).message in report.as_rows()[CHECK_ORDER.index(check)]["message"]


def test_env_error_report_details():
    report = validate_batch(with_endings(4, "env_error", CONNECTION_TEXT), CFG)
    check = report.check("env_error_rate")
    assert check.observed == pytest.approx(0.05)
    assert check.expected == "<= 1.0%"
    assert report.reason == (
        "Permanent environment failures in 5.0% of episodes exceed the 1.0% limit: this is an "
        f"environment bug, not a retry problem (most common error: '{CONNECTION_TEXT}', 4 episodes)."
    )


def overflowed_episode(group: int, sample: int, prompt_tokens: int = 900) -> Episode:
    """An episode whose prompt alone is longer than the context window: it ended as
    context_overflow before the policy generated a single token (loss_mask all 0)."""
    rng = np.random.default_rng(group * 100 + sample)
    tokens = [int(t) for t in rng.integers(5, 300, size=prompt_tokens)]
    return Episode(
        run_id=RUN,
        iteration=1,
        policy_version=0,
        env_name="sop",
        task_id=f"task-{group:03d}",
        group_id=f"g{group:03d}",
        sample_index=sample,
        tokens=tokens,
        loss_mask=[0] * prompt_tokens,
        behavior_logprobs=[0.0] * prompt_tokens,
        turns=[
            Turn(role="system", text="a very long procedure", start=0, end=prompt_tokens - 10),
            Turn(role="user", text="the task", start=prompt_tokens - 10, end=prompt_tokens),
        ],
        reward=0.0,
        reward_components={},
        success=False,
        finish_reason="context_overflow",
        env_error=None,
        attempts=1,
        created_at=T0,
    )


def test_a_batch_in_which_every_episode_overflowed_fails_naming_both_checks():
    # issue 9 item 12: a system prompt longer than policy.context_window; before, "All 13 checks passed"
    table = episodes_to_table([overflowed_episode(g, s) for g in range(4) for s in range(4)])
    report = validate_batch(table, CFG)
    assert not report.passed
    assert report.failed_checks == ["context_overflow_rate", "trainable_tokens"]
    assert report.check("context_overflow_rate").observed == 1.0
    assert report.check("trainable_tokens").observed == 0
    assert report.reason == (
        "Episodes that overflowed the context window (finish_reason 'context_overflow') make up 100.0% "
        "of the batch, above the 5.0% limit: prompts or tool outputs do not fit policy.context_window "
        "(check the system prompt's length, environment.prompt_tokens and environment.expected_tool_output); "
        "also failed: trainable_tokens."
    )
    assert report.check("trainable_tokens").message == (
        "No trainable tokens: no episode outside env_error holds a generated token (loss_mask == 1); "
        "finish reasons: 16 context_overflow."
    )
    rows = {r["check"]: r for r in report.as_rows()}
    assert rows["context_overflow_rate"]["status"] == rows["trainable_tokens"]["status"] == "FAILED"
    assert rows["context_overflow_rate"]["expected"] == "<= 5.0%"


def test_generated_tokens_only_in_env_error_episodes_are_not_trainable():
    # 15 overflowed episodes plus one env_error episode with generated tokens: the trainer never
    # trains on env_error, so there is still nothing to train on
    episodes = [overflowed_episode(g, s) for g in range(4) for s in range(4)][:-1]
    episodes.append(make_episode(3, 3, 0.0, "env_error", CONNECTION_TEXT))
    report = validate_batch(
        episodes_to_table(episodes), ValidationConfig(max_env_error_frac=1.0, max_context_overflow_frac=1.0)
    )
    assert report.failed_checks == ["trainable_tokens"]
    assert report.reason.startswith("The batch holds no trainable tokens")
    assert "15 context_overflow, 1 env_error" in report.reason
    # one overflowed episode that did generate before the window filled makes the batch trainable
    episodes[0] = make_episode(0, 0, 0.0, "context_overflow")
    report = validate_batch(
        episodes_to_table(episodes), ValidationConfig(max_env_error_frac=1.0, max_context_overflow_frac=1.0)
    )
    assert report.passed and report.check("trainable_tokens").observed == sum(episodes[0].loss_mask)


def test_a_long_system_prompt_fails_the_gate_through_real_rollouts(tiny_policy):
    # the case end to end: the rollout engine ends every episode as context_overflow with
    # 0 generated tokens, and the gate fails naming both checks
    from rl_core.environments import load_environment
    from rl_core.environments.base import Environment
    from rl_core.rollout import RolloutSettings, collect_rollouts

    class LongProcedure(Environment):
        def __init__(self):
            self.inner = load_environment("refunds")
            self.name = self.inner.name

        def system_prompt(self) -> str:
            return self.inner.system_prompt() * 10

        def tasks(self, split: str):
            return self.inner.tasks(split)

        def start(self, task):
            return self.inner.start(task)

    env = LongProcedure()
    work = [(env, task) for task in env.tasks("train")[:2]]
    settings = RolloutSettings(max_turns=2, max_tokens_per_turn=8, context_window=64, temperature=1.0)
    episodes = collect_rollouts(tiny_policy, work, settings, group_size=2, run_id=RUN, iteration=1)
    assert {ep.finish_reason for ep in episodes} == {"context_overflow"}
    assert all(sum(ep.loss_mask) == 0 for ep in episodes)
    report = validate_batch(episodes_to_table(episodes), CFG)
    assert report.failed_checks == ["context_overflow_rate", "trainable_tokens"]


def test_thresholds_come_from_the_config(good_table):
    strict = ValidationConfig(max_turns_unanswered_frac=0.05, reward_min=0.0)
    report = validate_batch(good_table, strict)
    assert report.failed_checks == ["reward_in_range", "max_turns_rate"]
    overflows = with_endings(3, "context_overflow")  # 3% overflowed: inside 5%, outside 2%
    assert validate_batch(overflows, CFG).passed
    assert validate_batch(overflows, ValidationConfig(max_context_overflow_frac=0.02)).failed_checks == [
        "context_overflow_rate"
    ]
    # one sentence: the first failure, then the others by name
    assert report.reason.startswith("Validation check reward_in_range failed")
    assert report.reason.endswith("; also failed: max_turns_rate.")


def test_positive_logprob_on_environment_token_is_ignored(good_table):
    # only generated tokens are checked: environment tokens may hold anything finite
    def poison_prompt(lp: list) -> list:
        return [0.7] + lp[1:]

    report = validate_batch(with_column(good_table, "behavior_logprobs", set_row(5, poison_prompt)), CFG)
    assert report.passed, report.reason


def test_empty_and_raw_tables_fail_without_crashing(good_table):
    empty = validate_batch(good_table.slice(0, 0), CFG)
    assert not empty.passed and empty.failed_checks[0] == "batch_not_empty"
    assert empty.reason.startswith("Validation check batch_not_empty failed")

    raw = pa.table({"reward": [0.5, 3.0], "finish_reason": ["answered", "answered"]})
    report = validate_batch(raw, CFG)
    assert not report.passed
    assert report.failed_checks[0] == "columns_present"
    assert "reward_in_range" in report.failed_checks
    assert "not evaluated" in report.check("lengths_equal").message.lower()


def test_report_round_trips_through_json(good_report):
    data = json.loads(good_report.to_json())
    assert data["passed"] is True and len(data["checks"]) == len(CHECK_ORDER)
    assert ValidationReport.from_dict(data) == good_report
    assert {"check", "status", "observed", "expected", "message"} == set(good_report.as_rows()[0])


def test_artifact_keys_are_valid():
    assert artifact_key("Run_2025.03-01", 1) == "validation-run-2025-03-01-iter-001"
    assert artifact_key("r", 12, kind="other") == "other-r-iter-012"
    assert sorted(artifact_key("r", i) for i in (10, 2, 1)) == [artifact_key("r", i) for i in (1, 2, 10)]


# -- the Prefect task ------------------------------------------------------------------


def env_failure_batch(iteration: int) -> list[Episode]:
    """A good batch with four more episodes ended by a permanent environment failure: over the 1% limit."""
    bad = good_episodes(iteration=iteration)
    for row in rows_where(bad, "answered")[:4]:
        ep = bad[row]
        bad[row] = make_episode(
            int(ep.group_id[1:]), ep.sample_index, 0.0, "env_error", CONNECTION_TEXT, iteration=iteration
        )
    return bad


def gate(store_root: str, iteration: int, table: pa.Table | None = None) -> ValidationReport:
    """Run the task inside a flow, as the train flow does."""
    from prefect import flow

    @flow(name="validate-test")
    def validate_flow() -> ValidationReport:
        return validate_trajectories(store_root, RUN, iteration, CFG, table=table)

    return validate_flow()


def test_task_declares_no_retries_and_no_cache():
    from prefect.cache_policies import NONE

    assert validate_trajectories.retries == 0
    assert validate_trajectories.cache_policy is NONE


def test_task_quarantines_a_failing_batch_and_keeps_a_passing_one(tmp_path, prefect_harness):
    from prefect.artifacts import Artifact

    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, good_episodes(iteration=1))
    store.write(RUN, 2, env_failure_batch(iteration=2))

    passed = gate(str(tmp_path), 1)
    failed = gate(str(tmp_path), 2)

    assert passed.passed and passed.quarantined_to is None
    assert store.iterations(RUN) == [1]  # the failing batch is no longer training data
    saved = json.loads(store.report_path(RUN, 1).read_text())
    assert saved["passed"] is True and saved["run_id"] == RUN and saved["iteration"] == 1

    assert not failed.passed and failed.failed_checks == ["env_error_rate"]
    assert "5.0%" in failed.reason and CONNECTION_TEXT in failed.reason
    folder = tmp_path / RUN / "quarantine" / "iteration-000002"
    assert failed.quarantined_to == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "iteration-000002.manifest.json",
        "iteration-000002.parquet",
        "iteration-000002.validation.json",
        "reason.txt",
    ]
    assert failed.reason in (folder / "reason.txt").read_text()
    quarantined = json.loads((folder / "iteration-000002.validation.json").read_text())
    assert quarantined["reason"] == failed.reason and quarantined["passed"] is False
    assert TrajectoryStore.read_manifest_path(folder / "iteration-000002.manifest.json").num_rows == 100
    assert not list((tmp_path / RUN / "trajectories").glob(".*.tmp"))

    table = Artifact.get(artifact_key(RUN, 2))
    assert table is not None and table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["check"]: r["status"] for r in rows}["env_error_rate"] == "FAILED"
    assert list(rows[0])[:3] == ["check", "status", "message"]  # the explanation next to the check's name
    assert table.description.startswith("**Iteration 2: validation FAILED.**")
    assert failed.reason in table.description and failed.quarantined_to in table.description


def test_task_turns_a_corrupt_batch_into_a_failed_report(tmp_path, prefect_harness):
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 3, good_episodes(iteration=3))
    path = store.path(RUN, 3)
    path.write_bytes(path.read_bytes()[:-10])  # truncated after the commit

    report = gate(str(tmp_path), 3)

    assert not report.passed and report.failed_checks == ["batch_readable"]
    assert "size mismatch" in report.reason and "\n" not in report.reason
    assert store.iterations(RUN) == []
    assert (tmp_path / RUN / "quarantine" / "iteration-000003" / "iteration-000003.validation.json").is_file()


def test_schema_has_the_columns_the_suite_expects():
    # guards the suite against schema drift: every nested column is summarised by length
    from tasks.validation_checks import NESTED_COLUMNS, REQUIRED_COLUMNS

    assert set(NESTED_COLUMNS) == {"tokens", "loss_mask", "behavior_logprobs", "turns", "reward_components", "sampling"}
    assert not {"env_error", "sampling", "stitch_break"} & set(REQUIRED_COLUMNS)
    assert len(REQUIRED_COLUMNS) == len(TRAJECTORY_SCHEMA) - 3


def test_task_keeps_a_report_already_saved_and_finishes_its_quarantine(tmp_path, prefect_harness):
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 4, env_failure_batch(iteration=4))
    # a first attempt validated the batch and wrote the report, then died before quarantining
    first = validate_batch(store.read_table(RUN, 4), ValidationConfig())
    path = store.report_path(RUN, 4)
    path.write_text(first.to_json())
    written = path.stat().st_mtime_ns

    report = gate(str(tmp_path), 4)

    assert not report.passed and report.reason == first.reason
    assert store.iterations(RUN) == []
    assert report.quarantined_to == str(tmp_path / RUN / "quarantine" / "iteration-000004")
    saved = json.loads(path.read_text())
    assert saved["quarantined_to"] == report.quarantined_to
    again = gate(str(tmp_path), 4)  # a third attempt changes nothing
    assert again.quarantined_to == report.quarantined_to
    assert len(store.quarantined(RUN, 4)) == 1
    assert path.stat().st_mtime_ns >= written


def test_task_adopts_a_quarantine_that_finished_before_the_report_said_so(tmp_path, prefect_harness):
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 5, env_failure_batch(iteration=5))
    first = validate_batch(store.read_table(RUN, 5), ValidationConfig())
    store.report_path(RUN, 5).write_text(first.to_json())
    moved = store.quarantine(RUN, 5, first.reason)  # the crash: batch moved, report not yet updated

    report = gate(str(tmp_path), 5)

    assert report.quarantined_to == str(moved.parent)
    assert json.loads(store.report_path(RUN, 5).read_text())["quarantined_to"] == str(moved.parent)
    assert len(store.quarantined(RUN, 5)) == 1


def test_task_validates_the_table_it_was_given_instead_of_reading_the_file(tmp_path, prefect_harness):
    store = TrajectoryStore(tmp_path)
    committed = store.commit(RUN, 6, good_episodes(iteration=6))
    path = store.path(RUN, 6)
    path.write_bytes(path.read_bytes()[:-10])  # a read from disk would now fail the batch

    report = gate(str(tmp_path), 6, table=committed.table)

    assert report.passed and report.rows == committed.manifest.rows
    assert store.read_report(RUN, 6) == report and store.iterations(RUN) == [6]


def test_task_given_a_table_still_needs_a_committed_batch(tmp_path, prefect_harness):
    from rl_core.store import TrajectoryNotFoundError

    table = episodes_to_table(good_episodes(iteration=7))
    with pytest.raises(TrajectoryNotFoundError):
        gate(str(tmp_path), 7, table=table)
