"""Replay from stored Parquet: re-validation, re-scoring, re-training, transcripts, the flow and the CLI.

Two small original runs are made once per module, the way the train flow makes them
(collect -> write -> validate -> train -> checkpoint): `orig`, two synchronous iterations
that pass validation, and `faulty`, whose one batch fails validation (5% environment
errors) and is quarantined.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from rl_core.config import load_config
from rl_core.replay import (
    EpisodeRef,
    ReplayError,
    batch_at,
    pick_episode,
    read_episodes,
    render_transcript,
    rescore,
    retrain,
    select_batches,
)
from rl_core.run import TrainingRun
from rl_core.runs.checkpoint import load_checkpoint
from rl_core.store import TrajectoryStore

TINY = [
    "rollout.group_size=4",
    "rollout.global_batch_size=8",
    "rollout.max_turns=4",
    "validation.max_token_cap_frac=1.0",
    "validation.max_turns_unanswered_frac=1.0",
]
FAULTY = [
    "rollout.global_batch_size=20",
    "environment.domains=['tests.fault_envs:FailingDomain']",
    "environment.env_kwargs={domain: refunds, fail_every: 20}",
]
THRESHOLD = 0.3  # partial answers (1/3, 1/2) count as successes, so the tiny runs have enough of them


def make_run(run_dir, run_id, iterations, extra=(), train=True) -> TrainingRun:
    """An original run made stage by stage, as the train flow does (without tracking or evaluation)."""
    from tasks.validate import validate_trajectories

    run = TrainingRun(
        load_config(
            None, TINY + [*extra, f"iterations={iterations}", f"storage.run_dir={run_dir}", f"storage.run_id={run_id}"]
        )
    )
    for iteration in range(1, iterations + 1):
        episodes = run.collect(iteration)
        run.write(iteration, episodes)
        report = validate_trajectories(str(run_dir), run_id, iteration, run.cfg.validation)
        if report.passed and train:
            run.train(episodes)
            run.save_checkpoint(iteration)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    run_dir = tmp_path_factory.mktemp("replay-runs")
    make_run(run_dir, "orig", iterations=2)
    make_run(run_dir, "faulty", iterations=1, extra=FAULTY, train=False)
    return run_dir


@pytest.fixture(scope="module")
def quarantined_manifest(runs):
    path = runs / "faulty" / "quarantine" / "iteration-000001" / "iteration-000001.manifest.json"
    assert path.is_file() and TrajectoryStore(runs).iterations("faulty") == []
    return path


def stored_episodes(run_dir, run_id="orig"):
    store = TrajectoryStore(run_dir)
    return [(i, index, ep) for i in store.iterations(run_id) for index, ep in enumerate(store.read(run_id, i))]


def full_marks(episode, task):
    """A user scorer: every episode succeeds."""
    return 1.0


def fails_on_refunds(episode, task):
    """A user scorer that breaks on one environment."""
    if episode.env_name == "refunds":
        raise KeyError("no refunds table")
    return episode.reward


# -- selection and bad input -------------------------------------------------------------


def test_selection_by_run_range_and_manifest(runs, quarantined_manifest):
    assert [b.iteration for b in select_batches(runs, "orig")] == [1, 2]
    assert [b.iteration for b in select_batches(runs, "orig", first=2)] == [2]
    [batch] = select_batches(runs, "faulty", include_quarantined=True)
    assert not batch.committed and batch.manifest_path == quarantined_manifest
    by_path = batch_at(quarantined_manifest)
    assert (by_path.run_id, by_path.iteration, by_path.run_folder) == ("faulty", 1, runs / "faulty")


def test_stored_report_is_the_one_the_validate_task_wrote(runs):
    from rl_core.replay import stored_report

    batch = select_batches(runs, "orig")[0]
    assert batch.report_path == TrajectoryStore(runs).report_path("orig", 1)
    assert stored_report(batch).passed is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"run_id": "nope"}, r"unknown run 'nope'.*runs in .*\['faulty', 'orig'\]"),
        (
            {"run_id": "orig", "first": 5, "last": 9},
            r"run 'orig' has no committed iteration in 5\.\.9 \(committed: \[1, 2\]",
        ),
        ({"run_id": "orig", "first": 2, "last": 1}, r"range 2\.\.1 is empty"),
        ({"run_id": "faulty"}, r"run 'faulty' has no committed iteration.*quarantined: \[1\]"),
        (
            {"manifests": ["missing/iteration-000001.manifest.json"]},
            r"manifest missing/iteration-000001.manifest.json does not exist",
        ),
        ({}, r"nothing selected"),
    ],
)
def test_bad_selection_is_named(runs, kwargs, message):
    with pytest.raises(ReplayError, match=message):
        select_batches(runs, **kwargs)


@pytest.mark.parametrize(
    "scorer, message",
    [
        ("bogus", r"scorer 'bogus': expected one of \['environment', 'strict'\] or 'package.module:function'"),
        ("no_such_package.scoring:reward", r"cannot import module 'no_such_package.scoring'"),
        ("tests.test_replay:missing", r"module 'tests.test_replay' has no function 'missing'"),
        ("tests.test_replay:make_run", r"must take \(episode, task\)"),
    ],
)
def test_bad_scorer_is_named(runs, scorer, message):
    with pytest.raises(ReplayError, match=message):
        rescore(select_batches(runs, "orig"), scorer)


# -- re-scoring --------------------------------------------------------------------------


def test_environment_scorer_reproduces_every_stored_reward(runs):
    report = rescore(select_batches(runs, "orig"), "environment", threshold=THRESHOLD)
    total = report.total
    assert total.episodes == total.rescored == 16 and total.errors == 0
    assert total.reward_changed == 0 and report.changes == []
    assert total.successes_before == total.successes_after > 0
    assert set(report.tallies) == {ep.env_name for _, _, ep in stored_episodes(runs)}


def test_strict_scorer_flips_exactly_the_successes_with_a_failed_turn(runs):
    expected = {
        (iteration, index)
        for iteration, index, ep in stored_episodes(runs)
        if ep.reward >= THRESHOLD
        and (ep.finish_reason != "answered" or any(t.role == "assistant" and t.tool_ok is False for t in ep.turns))
    }
    assert expected, "the tiny run must hold successes with a failed turn, or this test proves nothing"
    report = rescore(select_batches(runs, "orig"), "strict", threshold=THRESHOLD)
    assert {(c.iteration, c.index) for c in report.changes} == expected
    assert all(c.flip == "success->failure" and c.new_reward <= 0.0 for c in report.changes)
    assert report.total.success_to_failure == len(expected) and report.total.failure_to_success == 0
    per_env = {name: t.success_to_failure for name, t in report.tallies.items()}
    for name, flips in per_env.items():
        assert flips == sum(1 for i, x, ep in stored_episodes(runs) if (i, x) in expected and ep.env_name == name)


def test_user_scorer_by_module_path(runs):
    episodes = stored_episodes(runs)
    report = rescore(select_batches(runs, "orig"), "tests.test_replay:full_marks")
    assert report.thresholds == {"orig": 1.0}  # the run's own evaluation.success_threshold
    assert report.total.failure_to_success == sum(1 for *_, ep in episodes if not ep.success)
    assert report.total.success_to_failure == 0

    broken = rescore(select_batches(runs, "orig"), "tests.test_replay:fails_on_refunds")
    refunds = sum(1 for *_, ep in episodes if ep.env_name == "refunds")
    assert broken.total.errors == refunds and broken.total.rescored == len(episodes) - refunds
    assert all("KeyError" in e and "no refunds table" in e for e in broken.errors)


def test_env_error_episodes_are_not_rescored(runs, quarantined_manifest):
    report = rescore([batch_at(quarantined_manifest)], "environment")
    assert report.total.skipped_env_error == 1 and report.total.rescored == 19


# -- re-training -------------------------------------------------------------------------


def state_dict(checkpoint):
    policy, _ = load_checkpoint(checkpoint)
    return policy.model.state_dict()


def test_retrain_reproduces_the_original_parameters(runs):
    original = sorted(p.name for p in (runs / "orig" / "checkpoints").iterdir())
    report = retrain(select_batches(runs, "orig"), new_run_id="orig-again")
    assert [(s.iteration, s.step) for s in report.steps] == [(1, 1), (2, 2)]
    assert all(s.matches_original for s in report.steps) and report.changed_fields == [] and report.notes == []
    for step in ("step-000001", "step-000002"):
        replayed, first = (
            state_dict(runs / "orig-again" / "checkpoints" / step),
            state_dict(runs / "orig" / "checkpoints" / step),
        )
        assert replayed.keys() == first.keys()
        for name in first:
            assert torch.equal(replayed[name], first[name]), (step, name)
    assert (
        sorted(p.name for p in (runs / "orig" / "checkpoints").iterdir()) == original
    )  # the original run is untouched
    lineage = json.loads((runs / "orig-again" / "replay.json").read_text())
    assert lineage["replay_of"] == "orig" and [b["iteration"] for b in lineage["batches"]] == [1, 2]
    assert not (runs / "orig-again" / "trajectories").exists()


def test_retrain_with_an_override_differs_and_says_so(runs):
    report = retrain(select_batches(runs, "orig", last=1), new_run_id="orig-lr", overrides=["optimizer.lr=1e-2"])
    assert report.changed_fields == ["optimizer.lr"]
    [step] = report.steps
    assert step.max_abs_diff > 0 and step.matches_original is False


def test_retrain_with_more_steps_per_batch_is_not_compared_with_another_iterations_checkpoint(runs):
    """Two optimizer steps per batch put iteration 1 at step 2, where the original holds its iteration 2
    checkpoint: no comparison is made (it would report the difference of another batch's update)."""
    report = retrain(
        select_batches(runs, "orig"), new_run_id="orig-mb2", overrides=["optimizer.mini_batches_per_step=2"]
    )
    assert [(s.iteration, s.step) for s in report.steps] == [(1, 2), (2, 4)]
    assert [(s.original_checkpoint, s.max_abs_diff, s.matches_original) for s in report.steps] == [
        (None, None, None)
    ] * 2


def test_retrain_never_writes_into_an_existing_run(runs, quarantined_manifest):
    with pytest.raises(ReplayError, match=r"run folder .*orig already exists"):
        retrain(select_batches(runs, "orig"), new_run_id="orig")
    with pytest.raises(ReplayError, match=r"nothing to re-train on"):
        retrain([batch_at(quarantined_manifest)], new_run_id="faulty-again")
    with pytest.raises(ReplayError, match=r"bad retrain override"):
        retrain(select_batches(runs, "orig"), new_run_id="orig-bad", overrides=["rollout.group_size=0"])
    assert not (runs / "orig-bad").exists()


# -- transcripts -------------------------------------------------------------------------


def test_transcript_shows_every_turn(runs):
    iteration, index, episode = next(x for x in stored_episodes(runs) if any(t.role == "tool" for t in x[2].turns))
    text = render_transcript(episode)
    assert (
        episode.group_id in text
        and f"finish reason:  {episode.finish_reason}" in text
        and f"{episode.reward:.3f}" in text
    )
    position = 0
    for turn in episode.turns:
        found = text.index(turn.text, position)  # every turn, in order
        assert text.rindex("--- ", 0, found) >= position
        position = found + len(turn.text)
    tool = next(t for t in episode.turns if t.role == "tool")
    assert f"[{tool.tool_name}: {'ok' if tool.tool_ok else 'FAILED'}]" in text
    assert f"assistant, turn {episode.num_turns}" in text and "system (tokens 0-" in text

    markdown = render_transcript(episode, markdown=True)
    assert markdown.startswith("### Episode") and f"| environment | {episode.env_name} |" in markdown
    assert markdown.count("```") == 2 * len(episode.turns)


def test_episode_refs(runs):
    episodes = read_episodes(select_batches(runs, "orig")[0])
    chosen = episodes[5]
    assert pick_episode(episodes, EpisodeRef(iteration=1, episode=5)) == (5, chosen)
    assert pick_episode(episodes, EpisodeRef(iteration=1, group_id=chosen.group_id, sample=chosen.sample_index)) == (
        5,
        chosen,
    )
    with pytest.raises(ReplayError, match=r"has 8 episodes \(0\.\.7\); episode 8 is out of range"):
        pick_episode(episodes, EpisodeRef(iteration=1, episode=8))
    with pytest.raises(ReplayError, match=r"no group 'g' sample 0"):
        pick_episode(episodes, EpisodeRef(iteration=1, group_id="g", sample=0))
    with pytest.raises(ValueError, match="either by `episode`"):
        EpisodeRef(iteration=1, episode=1, group_id="g", sample=0)


def cli(*argv: str) -> int:
    from flows.replay_cli import add_replay_commands, run_replay_command

    parser = argparse.ArgumentParser(prog="turnstile")
    add_replay_commands(parser.add_subparsers(dest="command", required=True))
    return run_replay_command(parser.parse_args(list(argv)))


def test_transcript_command(runs, capsys):
    chosen = TrajectoryStore(runs).read("orig", 2)[3]
    assert cli("transcript", "orig", "--iteration", "2", "--episode", "3", "--run-dir", str(runs)) == 0
    assert capsys.readouterr().out == render_transcript(chosen)
    assert (
        cli(
            "transcript",
            "orig",
            "--iteration",
            "2",
            "--group",
            chosen.group_id,
            "--sample",
            str(chosen.sample_index),
            "--run-dir",
            str(runs),
            "--markdown",
        )
        == 0
    )
    assert capsys.readouterr().out == render_transcript(chosen, markdown=True)
    assert (
        cli("transcript", "faulty", "--iteration", "1", "--run-dir", str(runs)) == 0
    )  # falls back to the quarantined copy
    assert "faulty iteration 1" in capsys.readouterr().out
    assert cli("transcript", "orig", "--iteration", "7", "--run-dir", str(runs)) == 2
    assert "run 'orig' has no batch for iteration 7 (committed: [1, 2]" in capsys.readouterr().err


def test_a_bad_retrain_override_is_refused_in_one_line_before_the_flow_starts(runs, capsys):
    assert (
        cli(
            "replay",
            "orig",
            "--run-dir",
            str(runs),
            "--no-revalidate",
            "--retrain",
            "--retrain-run-id",
            "orig-bad-set",
            "--retrain-set",
            "algorithm.clip_ratio_dual=0.5",
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        "turnstile replay: bad retrain override(s) ['algorithm.clip_ratio_dual=0.5']: "
        "algorithm.clip_ratio_dual: Input should be greater than 1"
    )
    assert not (runs / "orig-bad-set").exists()


# -- the flow ----------------------------------------------------------------------------


def test_flow_revalidates_a_passing_run_and_a_quarantined_batch(runs, quarantined_manifest):
    from flows.replay import ReplaySettings, replay_flow

    committed = [str(runs / "orig" / "trajectories" / f"iteration-00000{i}.manifest.json") for i in (1, 2)]
    summary = replay_flow(ReplaySettings(manifests=[*committed, str(quarantined_manifest)]))
    verdicts = {(c["run_id"], c["iteration"]): c for c in summary["revalidation"]}
    assert {k: (c["stored_passed"], c["new_passed"], c["status"]) for k, c in verdicts.items()} == {
        ("faulty", 1): (False, False, "same"),
        ("orig", 1): (True, True, "same"),
        ("orig", 2): (True, True, "same"),
    }
    stored = json.loads((quarantined_manifest.parent / "iteration-000001.validation.json").read_text())
    assert verdicts[("faulty", 1)]["new_reason"] == stored["reason"] and "environment" in stored["reason"]
    assert summary["rescoring"] is None and summary["retraining"] is None


def test_flow_reports_a_changed_verdict_under_current_thresholds(runs, tmp_path):
    from flows.replay import ReplaySettings, replay_flow

    strict = tmp_path / "strict.yaml"
    strict.write_text("validation:\n  reward_min: 2.0\n  reward_max: 3.0\n")
    summary = replay_flow(
        ReplaySettings(
            run_id="orig", run_dir=str(runs), last_iteration=1, validation="current", config_path=str(strict)
        )
    )
    [verdict] = summary["revalidation"]
    assert (verdict["stored_passed"], verdict["new_passed"], verdict["status"]) == (True, False, "changed")
    assert verdict["checks_changed"] == ["reward_in_range"] and "reward" in verdict["new_reason"]


def test_flow_runs_every_part_and_publishes_artifacts(runs):
    from prefect.artifacts import Artifact

    from flows.replay import ReplaySettings, replay_flow

    settings = ReplaySettings(
        run_id="orig",
        run_dir=str(runs),
        scorer="strict",
        success_threshold=THRESHOLD,
        retrain=True,
        retrain_run_id="orig-flow",
        transcripts=[EpisodeRef(iteration=2, episode=1)],
    )
    summary = replay_flow(settings)
    assert [c["status"] for c in summary["revalidation"]] == ["same", "same"]
    assert summary["rescoring"]["total"]["success_to_failure"] > 0
    assert [s["matches_original"] for s in summary["retraining"]["steps"]] == [True, True]
    [transcript] = summary["transcripts"]
    assert transcript["text"] == render_transcript(TrajectoryStore(runs).read("orig", 2)[1])
    for key in (
        "replay-orig-revalidation",
        "replay-orig-rescoring",
        "replay-orig-rescoring-changes",
        "replay-orig-retraining",
        "replay-orig-transcript-iteration-2-episode-1",
    ):
        assert Artifact.get(key) is not None, key


def test_flow_names_bad_input_before_doing_anything(runs):
    from pydantic import ValidationError

    from flows.replay import ReplaySettings, check_settings

    with pytest.raises(ReplayError, match="cannot import module 'nope'"):
        check_settings(ReplaySettings(run_id="orig", run_dir=str(runs), scorer="nope:score"))
    with pytest.raises(ReplayError, match=r"iteration 3 is not among the selected batches"):
        check_settings(
            ReplaySettings(run_id="orig", run_dir=str(runs), transcripts=[EpisodeRef(iteration=3, episode=0)])
        )
    with pytest.raises(ReplayError, match="either manifest paths or a run_id"):
        check_settings(ReplaySettings(run_id="orig", run_dir=str(runs), manifests=["x.manifest.json"]))
    with pytest.raises(ValidationError, match="nothing to do"):
        ReplaySettings(run_id="orig", revalidate=False)


def test_replay_command_names_bad_input(runs, capsys, monkeypatch):
    import flows.replay_cli

    prepared = []
    # keep this process's Prefect settings
    monkeypatch.setattr(flows.replay_cli, "prepare_environment", prepared.append)
    assert cli("replay", "nope", "--run-dir", str(runs), "--scorer", "strict") == 2
    assert "unknown run 'nope'" in capsys.readouterr().err and prepared == []  # refused before Prefect is set up
    assert cli("replay", "orig", "--run-dir", str(runs), "--scorer", "bad.module:fn") == 2
    assert "cannot import module 'bad.module'" in capsys.readouterr().err
