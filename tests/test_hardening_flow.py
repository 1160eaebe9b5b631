"""Train-flow hardening (issue 9): a step with nothing to train on, overlapped collection in the flow,
and a closing summary derived from the run's records."""

from __future__ import annotations

import json

import torch
from mlflow import MlflowClient

from rl_core.config import load_config
from rl_core.loop import evaluation_due
from rl_core.run import TrainingRun
from rl_core.runs import records as run_records
from rl_core.store import TrajectoryStore
from tests.test_train_flow import TINY, run_flow

NOTHING_TO_TRAIN_ON = "nothing to train on"  # the start of the trainer's reason (StepMetrics.skipped)
ZERO_REWARD = [  # every training episode scores 0, and all-equal groups are dropped: no step has anything to train on
    "environment.domains=['tests.fault_envs:CollapsingDomain']",
    "environment.env_kwargs={domain: refunds, healthy_episodes: 0}",
    "algorithm.zero_variance_groups=drop",
    "rollout.group_size=2",
    "rollout.global_batch_size=4",
]


# -- item 4: an iteration with nothing to train on, from Python ---------------------------------


def _set_rewards(episodes, rewards):
    for episode, reward in zip(episodes, rewards):
        episode.reward = reward
    return episodes


def _plain_run(tmp_path, run_id):
    cfg = load_config(
        None,
        [
            "rollout.group_size=2",
            "rollout.global_batch_size=4",
            "algorithm.zero_variance_groups=drop",
            "iterations=3",
            f"storage.run_dir={tmp_path}",
            f"storage.run_id={run_id}",
        ],
    )
    return cfg, TrainingRun(cfg)


def _iterate(run, iteration, rewards):
    episodes = _set_rewards(run.collect(iteration), rewards)
    run.write(iteration, episodes)
    metrics = run.train(episodes)
    return metrics, run.save_checkpoint(iteration, metrics.as_dict())


def test_a_step_with_nothing_to_train_on_is_recorded_and_a_resumed_run_goes_past_it(tmp_path):
    cfg, run = _plain_run(tmp_path, "skips")
    metrics, checkpoint = _iterate(run, 1, [1.0, 0.0, 0.0, 1.0])  # informative groups: step 1
    assert metrics.skipped is None and checkpoint.name == "step-000001"
    metrics, checkpoint = _iterate(run, 2, [0.0] * 4)  # every group all-equal and dropped: no step
    # before: FileExistsError (a checkpoint named like step 1's)
    assert metrics.skipped.startswith(NOTHING_TO_TRAIN_ON) and checkpoint is None
    assert run.policy.version == 1 and run.last_iteration == 2 and run.checkpoint_iteration == 1
    assert sorted(p.name for p in (tmp_path / "skips" / "checkpoints").iterdir()) == ["step-000001"]
    record = run_records.load_iteration(run.run_dir, 2).to_dict()
    assert record == {"iteration": 2, "step": 1, "trained": False, "skipped_by": "trainer", "reason": metrics.skipped}

    resumed = TrainingRun.open(cfg)  # the run goes on after iteration 2, where sampling stood after it
    assert (resumed.policy.version, resumed.checkpoint_iteration, resumed.last_iteration) == (1, 1, 2)
    assert resumed.collector.tasks.state_dict() == run.collector.tasks.state_dict()
    assert torch.equal(resumed.collector.generator.get_state(), run.collector.generator.get_state())
    a, b = run.collect(3), resumed.collect(3)
    assert [e.tokens for e in a] == [e.tokens for e in b]


def test_every_iteration_skipped_leaves_no_checkpoint_and_the_run_continues(tmp_path):
    cfg, run = _plain_run(tmp_path, "none")
    for iteration in (1, 2):  # before: iteration 1 saved step-000000, iteration 2 raised FileExistsError
        metrics, checkpoint = _iterate(run, iteration, [0.0] * 4)
        assert metrics.skipped and checkpoint is None and run.policy.version == 0
    assert not (tmp_path / "none" / "checkpoints").exists()
    resumed = TrainingRun.open(cfg)
    assert (resumed.policy.version, resumed.last_iteration) == (0, 2)
    assert resumed.collector.tasks.state_dict() == run.collector.tasks.state_dict()


def test_replay_retraining_reports_a_batch_with_nothing_to_train_on_as_no_step(tmp_path):
    # the same kind through `turnstile replay --retrain`: before, iteration 2 read "-> step 1: loss 0.0000"
    from flows.replay_cli import format_summary
    from rl_core.replay import retrain, select_batches

    _, run = _plain_run(tmp_path, "orig")
    _iterate(run, 1, [1.0, 0.0, 0.0, 1.0])
    metrics, _ = _iterate(run, 2, [0.0] * 4)
    report = retrain(select_batches(tmp_path, "orig"), new_run_id="again")
    first, second = report.steps
    assert (first.step, first.skipped, first.matches_original) == (1, None, True)
    assert (second.step, second.checkpoint, second.skipped) == (1, None, metrics.skipped)
    assert second.skipped.startswith(NOTHING_TO_TRAIN_ON)
    summary = {
        "batches": ["orig/1", "orig/2"],
        "revalidation": None,
        "rescoring": None,
        "retraining": report.as_dict(),
        "transcripts": [],
    }
    lines = format_summary(summary).splitlines()
    assert lines[-2].startswith("  iteration 1 -> step 1: loss ")
    assert lines[-1] == f"  iteration 2: no optimizer step, the policy stays at step 1 ({metrics.skipped})"


def test_evaluation_is_due_when_the_step_count_passes_a_multiple_of_val_every():
    assert [evaluation_due(s, s + 1, 5) for s in range(0, 10)] == [s + 1 in (5, 10) for s in range(0, 10)]
    assert (
        evaluation_due(3, 7, 5) and evaluation_due(4, 8, 4) and not evaluation_due(5, 8, 5)
    )  # several steps an iteration
    assert not evaluation_due(5, 5, 1)  # no step taken


# -- item 13: the closing summary says what the records say ------------------------------------


def _summary(**changes):
    summary = {
        "run_id": "r",
        "iterations": 2,
        "iterations_run": 2,
        "trained_steps": 0,
        "optimizer_steps": 0,
        "skipped": [],
        "no_candidate": None,
        "stopped": None,
        "findings": [],
        "pass_at_1_before": 0.3,
        "pass_at_1_after": 0.3,
        "candidate_version": None,
        "candidate_step": None,
        "gate": None,
        "trajectories": "runs/r/trajectories",
        "checkpoints": "runs/r/checkpoints",
        "mlflow_uri": "sqlite:///runs/mlflow.db",
        "mlflow_run_id": "abc",
        "registered_model": "m",
    }
    return {**summary, **changes}


def test_the_closing_summary_names_each_kind_of_skipped_iteration():
    from flows.cli import closing_summary

    text = closing_summary(
        _summary(
            iterations=3,
            iterations_run=3,
            trained_steps=1,
            optimizer_steps=1,
            pass_at_1_after=0.4,
            skipped=[
                {"iteration": 1, "by": "validation", "reason": "5.0% of episodes hit env errors."},
                {"iteration": 3, "by": "trainer", "reason": "the loss was not finite"},
            ],
            candidate_version="1",
            candidate_step=1,
            gate={"outcome": "promoted", "reasons": ["no champion yet"]},
        ),
        60,
    ).splitlines()
    assert text[2:7] == [
        "  iterations run:         3 of 3 (1 trained, 2 skipped: 1 failed validation, 1 took no optimizer step)",
        "    iteration 1 failed validation: 5.0% of episodes hit env errors.",
        "    iteration 3 took no optimizer step: the loss was not finite",
        "  held-out pass@1:        0.300 before -> 0.400 after",
        "  gate:                   version 1 (step 1) promoted: no champion yet",
    ]


# -- items 4 and 13 through the flow -------------------------------------------------------------


def test_a_flow_whose_batches_leave_nothing_to_train_on_finishes_says_so_and_resumes(
    prefect_harness, tmp_path, monkeypatch, capsys
):
    import flows.cli
    from flows.cli import closing_summary

    summary = run_flow(tmp_path, "flat", ZERO_REWARD)  # before: FileExistsError in iteration 2

    assert summary["trained_steps"] == 0 and summary["optimizer_steps"] == 0 and summary["gate"] is None
    assert [(s["iteration"], s["by"], s["passed"]) for s in summary["skipped"]] == [
        (1, "trainer", True),
        (2, "trainer", True),
    ]
    assert all(s["reason"].startswith(NOTHING_TO_TRAIN_ON) for s in summary["skipped"])
    history = [r.to_dict() for r in run_records.read_history(tmp_path / "flat")]
    assert [(r["iteration"], r["step"], r["trained"], r["skipped_by"]) for r in history] == [
        (1, 0, False, "trainer"),
        (2, 0, False, "trainer"),
    ]
    assert all(r["train/step_skipped"] == 1.0 for r in history)
    for iteration in (1, 2):  # validation passed: the batch is committed, not quarantined
        assert json.loads(
            (tmp_path / "flat" / "trajectories" / f"iteration-00000{iteration}.validation.json").read_text()
        )["passed"]
    assert not (tmp_path / "flat" / "checkpoints").exists()

    lines = closing_summary(summary, 60).splitlines()
    reason = summary["skipped"][0]["reason"]
    assert lines[2:7] == [
        "  iterations run:         2 of 2 (0 trained, 2 skipped: 2 took no optimizer step)",
        f"    iteration 1 took no optimizer step: {reason}",
        f"    iteration 2 took no optimizer step: {reason}",
        "  held-out pass@1:        %.3f at step 0 (no optimizer step was taken: the policy is the starting one)"
        % summary["pass_at_1_before"],
        "  gate:                   no candidate: no optimizer step was taken (2 iterations took no optimizer step)",
    ]
    assert "validation" not in "\n".join(lines)

    # the run goes on: resumed for a third iteration, from the command line
    monkeypatch.setattr(flows.cli, "prepare_environment", lambda cfg: None)
    assert flows.cli.main(["resume", "flat", "--run-dir", str(tmp_path), "--set", "iterations=3"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 (0 trained, 3 skipped: 3 took no optimizer step)" in out
    assert TrajectoryStore(tmp_path).iterations("flat") == [1, 2, 3]
    assert [r["iteration"] for r in [r.to_dict() for r in run_records.read_history(tmp_path / "flat")]] == [1, 2, 3]


# -- item 9: overlapped collection in the flow ---------------------------------------------------


def test_the_flow_collects_the_next_batch_while_a_step_trains(prefect_harness, tmp_path):
    extra = ["rollout.overlap_collection=true", "algorithm.max_steps_off_policy=1", "evaluation.val_every=10"]
    summary = run_flow(tmp_path, "overlap", extra)

    assert summary["trained_steps"] == 2 and summary["skipped"] == []
    store = TrajectoryStore(tmp_path)
    # batch 2 was sampled while step 1 trained, by the policy of before step 1 (synchronous: version 1)
    assert [{e.policy_version for e in store.read("overlap", i)} for i in (1, 2)] == [{0}, {0}]
    history = [r.to_dict() for r in run_records.read_history(tmp_path / "overlap")]
    assert [(r["iteration"], r["step"], r["trained"], r["rollout/stale_dropped"]) for r in history] == [
        (1, 1, True, 0.0),
        (2, 2, True, 0.0),
    ]
    client = MlflowClient(summary["mlflow_uri"])
    stale = client.get_metric_history(summary["mlflow_run_id"], "rollout/stale_dropped")
    assert sorted((m.step, m.value) for m in stale) == [(1, 0.0), (2, 0.0)]

    # resumed with overlap: the first batch not committed is collected by the policy the run resumed with
    resumed = run_flow(tmp_path, "overlap", [*extra, "iterations=3"])
    assert resumed["trained_steps"] == 3 and {e.policy_version for e in store.read("overlap", 3)} == {2}
    # ... on the tasks the uninterrupted run draws for it (sampling went on from where batch 2 left it)
    fresh = TrainingRun(load_config(None, [*TINY, *extra, f"storage.run_dir={tmp_path / 'fresh'}"]))
    drawn = [sorted(task.task_id for _, task in fresh.collector.work_for(i)) for i in (1, 2, 3)]
    assert [sorted({e.task_id for e in store.read("overlap", i)}) for i in (1, 2, 3)] == drawn
