"""Episodes as MLflow traces (tasks/traces.py): the trace of a multi-turn episode with tool calls, which
episodes are traced (rl_core/evaluation.py `sample_rollouts`, `EvalReport.traced_episodes`), and traces
written to a real SQLite store, found by searching the experiment and linked to their run."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone

import pytest
from mlflow import MlflowClient

from rl_core.environments import load_environment
from rl_core.evaluation import EvalReport, evaluate, sample_rollouts, stable_seed
from rl_core.rollout import RolloutSettings
from rl_core.trajectory import Episode, Sampling, Turn
from tasks.traces import TraceContext, build_trace, log_traces, trace_id_of
from tasks.tracking import Tracker

CREATED = datetime(2026, 12, 2, 3, 0, 0, tzinfo=timezone.utc)


def episode(
    group: str = "run-a/1/0/t-1",
    sample: int = 0,
    env: str = "refunds",
    task: str = "t-1",
    segment: int = 0,
    stitch_break: str | None = None,
) -> Episode:
    """A 3-turn refunds episode: a tool call that works, one that fails, an answer (with a per-turn reward)."""
    turns = [
        Turn("system", "You settle refund requests.", 0, 6),
        Turn("user", "Customer asks for a refund on order 4821.", 6, 16),
        Turn("assistant", 'CALL get_order {"order_id": "4821"}', 16, 26, "get_order", True, "stop"),
        Turn("tool", '{"status": "delivered", "days": "12"}', 26, 36, "get_order", True),
        Turn("assistant", 'CALL get_customer {"id": 7}', 36, 44, "get_customer", False, "stop"),
        Turn("tool", "unknown argument 'id' for get_customer", 44, 52, "get_customer", False),
        Turn("assistant", 'ANSWER {"decision": "refund"}', 52, 60, None, None, "stop", reward=0.25),
    ]
    generated = {i for t in turns if t.role == "assistant" for i in range(t.start, t.end)}
    return Episode(
        run_id="run-a",
        iteration=1,
        policy_version=3,
        env_name=env,
        task_id=task,
        group_id=group,
        sample_index=sample,
        tokens=list(range(60)),
        loss_mask=[int(i in generated) for i in range(60)],
        behavior_logprobs=[-0.5 if i in generated else 0.0 for i in range(60)],
        turns=turns,
        reward=1.0,
        reward_components={"decision": 1.0, "format": 0.5, "tone": 1 / 3},
        success=True,
        finish_reason="answered",
        created_at=CREATED,
        sampling=Sampling(1.0, 1.0, 64, "hf", 3),
        segment=segment,
        stitch_break=stitch_break,
    )


def test_the_trace_of_a_multi_turn_episode_shows_its_turns_tool_calls_reward_and_lineage():
    trace = build_trace(episode(), TraceContext("run-a", "train", iteration=1), "7", "mlflow-run-1")
    spans = trace.data.spans
    root, turns = spans[0], spans[1:]
    assert root.parent_id is None and root.span_type == "AGENT" and root.name == "train: refunds/t-1"
    assert root.inputs == {
        "messages": [
            {"role": "system", "content": "You settle refund requests."},
            {"role": "user", "content": "Customer asks for a refund on order 4821."},
        ]
    }
    assert root.outputs == 'ANSWER {"decision": "refund"}'
    assert [(s.name, s.span_type) for s in turns] == [
        ("policy turn 1", "CHAT_MODEL"),
        ("get_order", "TOOL"),
        ("policy turn 2", "CHAT_MODEL"),
        ("get_customer", "TOOL"),
        ("policy turn 3", "CHAT_MODEL"),
    ]
    assert all(s.parent_id == root.span_id and s.trace_id == trace.info.trace_id for s in turns)
    first, order, second, customer, third = turns
    assert first.outputs == 'CALL get_order {"order_id": "4821"}' and first.inputs == {"context_tokens": 16}
    assert first.attributes["mlflow.chat.tokenUsage"] == {"input_tokens": 16, "output_tokens": 10, "total_tokens": 26}
    assert first.attributes["turnstile.mean_logprob"] == -0.5
    assert order.inputs == {"arguments": {"order_id": "4821"}}
    assert order.attributes["turnstile.tool_ok"] is True and order.status.status_code == "OK"
    assert customer.inputs == {"arguments": {"id": 7}} and customer.status.status_code == "ERROR"
    assert customer.outputs == "unknown argument 'id' for get_customer"
    # the time axis counts tokens: 1 µs each, ending when the episode was made
    assert root.end_time_ns == int(CREATED.timestamp()) * 10**9 and root.start_time_ns == root.end_time_ns - 60_000
    assert (order.start_time_ns - root.start_time_ns, order.end_time_ns - root.start_time_ns) == (26_000, 36_000)

    info = trace.info
    feedback = {(a.name, a.span_id): a.value for a in info.assessments}
    assert feedback == {
        ("reward", None): 1.0,
        ("success", None): True,
        ("reward/decision", None): 1.0,
        ("reward/format", None): 0.5,
        ("reward/tone", None): 0.3333,  # shown to 4 places
        ("turn_reward", third.span_id): 0.25,
    }
    assert all(a.source.source_type == "CODE" for a in info.assessments)
    assert info.tags | {"mlflow.traceName": ""} == {
        "mlflow.traceName": "",
        "turnstile.run_id": "run-a",
        "turnstile.phase": "train",
        "turnstile.iteration": "1",
        "turnstile.group_id": "run-a/1/0/t-1",
        "turnstile.sample_index": "0",
        "turnstile.task_id": "t-1",
        "turnstile.env": "refunds",
        "turnstile.finish_reason": "answered",
        "turnstile.success": "true",
        "turnstile.reward": "1",
        "turnstile.policy_version": "3",
    }
    assert info.trace_metadata["mlflow.sourceRun"] == "mlflow-run-1"
    assert json.loads(info.trace_metadata["mlflow.trace.tokenUsage"])["output_tokens"] == 26
    assert info.request_preview == "Customer asks for a refund on order 4821."
    assert info.experiment_id == "7" and info.state == "OK"


def test_trace_ids_are_stable_and_an_evaluation_is_keyed_by_its_step():
    ep, train = episode(), TraceContext("run-a", "train", iteration=1)
    assert trace_id_of(ep, train, "m1") == build_trace(ep, train, "7", "m1").info.trace_id
    assert trace_id_of(ep, train, "m1") != trace_id_of(ep, TraceContext("run-a", "train", iteration=2), "m1")
    assert trace_id_of(ep, train, "m1") != trace_id_of(episode(sample=1), train, "m1")
    evaluation = build_trace(ep, TraceContext("run-a", "eval"), "7", "m1")
    assert evaluation.info.tags["turnstile.step"] == "3" and "turnstile.iteration" not in evaluation.info.tags
    assert evaluation.data.spans[0].name == "eval: refunds/t-1"


def test_native_tool_calls_give_their_arguments_and_unparsed_ones_the_raw_call():
    ep = episode()
    ep.turns[2] = Turn(
        "assistant", '<tool_call>\n{"name": "get_order", "arguments": {"order_id": "4821"}}\n</tool_call>', 16, 26
    )
    ep.turns[4] = Turn("assistant", "get_customer please", 36, 44, parse_error="no JSON")
    spans = build_trace(ep, TraceContext("run-a", "train", iteration=1), "7", "m1").data.spans
    assert spans[2].inputs == {"arguments": {"order_id": "4821"}}
    assert spans[4].inputs == {"call": "get_customer please"}
    assert spans[3].status.status_code == "ERROR" and "no JSON" in spans[3].status.description


def test_an_env_error_episode_is_an_error_trace():
    ep = episode()
    ep.finish_reason, ep.env_error, ep.success = "env_error", "the environment crashed", False
    trace = build_trace(ep, TraceContext("run-a", "train", iteration=1), "7", "m1")
    assert trace.info.state == "ERROR" and trace.data.spans[0].status.description == "the environment crashed"


# --------------------------------------------------------------------------- which episodes


def batch(groups: int = 6, size: int = 4) -> list[Episode]:
    return [episode(group=f"run-a/1/{g}/t-{g}", sample=s, task=f"t-{g}") for g in range(groups) for s in range(size)]


def test_the_sample_is_deterministic_spread_over_groups_and_sized():
    episodes = batch()
    chosen = sample_rollouts(episodes, 4, seed=11)
    assert len(chosen) == 4 and len({e.group_id for e in chosen}) == 4  # 4 different groups
    assert chosen == sample_rollouts(episodes, 4, seed=11)
    assert chosen == [e for e in episodes if e in chosen]  # in the batch's order
    assert len({tuple(id(e) for e in sample_rollouts(episodes, 4, seed)) for seed in range(5)}) > 1  # seeded
    nine = sample_rollouts(episodes, 9, seed=11)
    assert len(nine) == 9 and len({e.group_id for e in nine}) == 6  # every group, then a second round
    assert sample_rollouts(episodes, 0, seed=11) == []
    assert sample_rollouts(episodes, 100, seed=11) == episodes
    assert stable_seed("run-a", 1) == stable_seed("run-a", 1) != stable_seed("run-a", 2)
    with pytest.raises(ValueError):
        sample_rollouts(episodes, -1, seed=11)


def test_the_segments_of_a_chosen_rollout_come_together():
    rows = [episode(group="g0"), episode(group="g1"), episode(group="g1", segment=1, stitch_break="edited")]
    picks = [sample_rollouts(rows, 1, seed) for seed in range(20)]
    assert [rows[0]] in picks and rows[1:] in picks and all(p in ([rows[0]], rows[1:]) for p in picks)


def test_an_evaluation_keeps_the_greedy_episodes_of_a_sample_of_tasks_spread_over_environments():
    envs = [load_environment("refunds"), load_environment("access")]

    def play(policy, work, settings, *, group_size, run_id, iteration, generator=None):
        return [
            episode(group=f"eval/0/{i}/{task.task_id}", sample=s, env=env.name, task=task.task_id)
            for i, (env, task) in enumerate(work)
            for s in range(group_size)
        ]

    settings = RolloutSettings(max_turns=2, max_tokens_per_turn=8, context_window=64, temperature=1.0)
    report = evaluate(None, envs, settings, max_tasks=5, num_samples=2, pass_k=[1], play=play, traced=4)
    kept = report.traced_episodes
    assert len(kept) == 4 and {e.env_name for e in kept} == {"refunds", "access"}
    assert all(e.sampling.temperature == 1.0 for e in kept)  # hand-made; the greedy call is the first one
    again = evaluate(None, envs, settings, max_tasks=5, num_samples=0, play=play, traced=4)
    assert [e.task_id for e in again.traced_episodes] == [e.task_id for e in kept]  # the same tasks every time
    assert "traced_episodes" not in report.to_dict() and report == EvalReport.from_dict(report.to_dict())
    assert evaluate(None, envs, settings, max_tasks=5, play=play).traced_episodes == []


# --------------------------------------------------------------------------- a real store


def test_logged_traces_are_found_in_the_experiment_with_their_tags_and_belong_to_the_run(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("turnstile", artifact_location=(tmp_path / "art").as_uri())
    run, other = (client.create_run(experiment, run_name=name).info.run_id for name in ("run-a", "run-b"))
    tracker = Tracker(uri, run, experiment)
    context = TraceContext("run-a", "train", iteration=1)
    episodes = batch(groups=2, size=1)
    ids = log_traces(tracker, [build_trace(e, context, experiment, run) for e in episodes])
    assert log_traces(tracker, [build_trace(e, context, experiment, run) for e in episodes]) == ids  # replaced
    log_traces(Tracker(uri, other, experiment), [build_trace(episodes[0], context, experiment, other)])

    found = client.search_traces(locations=[experiment])
    assert len(found) == 3
    mine = client.search_traces(locations=[experiment], run_id=run)
    assert sorted(t.info.trace_id for t in mine) == sorted(ids)
    assert {t.info.tags["turnstile.group_id"] for t in mine} == {"run-a/1/0/t-0", "run-a/1/1/t-1"}
    assert all(t.info.tags["turnstile.run_id"] == "run-a" and t.info.tags["turnstile.iteration"] == "1" for t in mine)
    tagged = client.search_traces(locations=[experiment], filter_string="tags.`turnstile.task_id` = 't-1'")
    assert len(tagged) == 1
    trace = client.get_trace(ids[0])
    assert [s.name for s in trace.data.spans][:3] == ["train: refunds/t-0", "policy turn 1", "get_order"]
    assert {a.name for a in trace.info.assessments} >= {"reward", "success", "reward/decision"}
    assert len([a for a in trace.info.assessments if a.name == "reward"]) == 1  # logging again left no copy


def test_the_prefect_task_logs_a_sample_and_a_failure_only_warns(prefect_harness, tmp_path, empty_store, caplog):
    from prefect import flow

    from tasks.traces import trace_batch

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("turnstile", artifact_location=(tmp_path / "art").as_uri())
    tracker = Tracker(uri, client.create_run(experiment).info.run_id, experiment)
    broken = Tracker(uri, tracker.mlflow_run_id, "424242")  # no such experiment: a deterministic refusal

    @flow
    def iteration() -> tuple[list[str], list[str], list[str]]:
        episodes = batch(groups=3, size=2)
        return (
            trace_batch(tracker, "run-a", 1, episodes, 2),
            trace_batch(tracker, "run-a", 2, episodes, 0),
            trace_batch(broken, "run-a", 1, episodes, 2),
        )

    logged, none, failed = iteration()
    assert len(logged) == 2 and none == [] and failed == []
    assert sorted(t.info.trace_id for t in client.search_traces(locations=[experiment])) == sorted(logged)
    assert "were not logged as MLflow traces" in caplog.text
