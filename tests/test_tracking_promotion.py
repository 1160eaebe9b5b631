"""Tracking (MLflow run, params, metrics, artifacts), the gate's rules, and registry promotion.

Every test gets its own SQLite MLflow store under tmp_path (a copy of one migrated empty store,
so the schema migrations run once). The glue functions are tested directly; one test runs
the Prefect tasks themselves inside a temporary Prefect server.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rl_core.config import GateConfig, RunConfig, apply_overrides
from rl_core.evaluation import EvalReport, TaskOutcome
from rl_core.gate import GateDecision, decide_simple
from rl_core.store import Manifest
from tasks.promote import promote, rollback
from tasks.registry import (
    CHAMPION_ALIAS,
    PREVIOUS_ALIAS,
    Champion,
    PromotionError,
    champion,
    champion_eval_tasks_hash,
    json_list_within,
    lineage_tags,
    register_checkpoint,
)
from tasks.tracking import (
    FLOW_RUN_TAG,
    Tracker,
    artifact_location,
    charts_view_state,
    charts_view_url,
    config_hash,
    flatten_config,
    is_transient,
    metric_key,
    retry_if_transient,
    run_description,
    task_set_hash,
    tracking_uri,
)

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

MODEL = "policy-under-test"
EVAL_TASKS = ["refunds/r-001", "refunds/r-002", "inventory/i-001"]


@pytest.fixture()
def cfg(tmp_path, empty_store) -> RunConfig:
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    shutil.copy(empty_store, run_dir / "mlflow.db")
    return RunConfig(storage={"run_dir": str(run_dir), "run_id": "run-test"}, tracking={"registered_model": MODEL})


@pytest.fixture()
def tracker(cfg) -> Tracker:
    return Tracker.start(cfg, "run-test")


@pytest.fixture()
def client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


def make_checkpoint(root: Path, step: int) -> Path:
    """A small stand-in for a checkpoint folder: trainer state plus a config file."""
    folder = root / "checkpoints" / f"step-{step:06d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "step": step}))
    return folder


def manifest(iteration: int) -> Manifest:
    return Manifest(
        run_id="run-test",
        iteration=iteration,
        file=f"iteration-{iteration:06d}.parquet",
        rows=32,
        sha256=f"{iteration:064x}",
        bytes=1000,
        schema_version=1,
        created_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
    )


def register(client, cfg, tracker, tmp_path, step: int, pass_at_1: float, tasks=EVAL_TASKS) -> str:
    lineage = {
        "manifests": [manifest(i) for i in range(1, step + 1)],
        "validation": {f"iteration-{i}": "passed" for i in range(1, step + 1)},
        "pass_at_1": pass_at_1,
        "eval_tasks_hash": task_set_hash(tasks),
    }
    return register_checkpoint(client, cfg, make_checkpoint(tmp_path, step), tracker.mlflow_run_id, lineage)


def gate_and_promote(client, version: str, candidate: float, floor: float = 0.0) -> GateDecision:
    current = champion(client, MODEL)
    decision = decide_simple(
        candidate,
        current.pass_at_1 if current else None,
        GateConfig(min_pass_at_1=floor),
        champion_version=current.version if current else None,
    )
    assert promote(client, MODEL, version, decision, decision.champion_version).applied
    return decision


def aliases(client) -> dict[str, str]:
    """alias -> version, as strings (the SQLite store returns alias versions as ints)."""
    return {alias: str(version) for alias, version in client.get_registered_model(MODEL).aliases.items()}


# --------------------------------------------------------------------------- tracking


def test_tracking_uri_is_sqlite_under_the_run_dir_unless_configured(cfg):
    run_dir = Path(cfg.storage.run_dir).resolve()
    assert tracking_uri(cfg) == f"sqlite:///{run_dir}/mlflow.db"
    assert artifact_location(cfg) == (run_dir / "mlartifacts").as_uri()
    server = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"mlflow_uri": "http://mlflow:5000"})})
    assert tracking_uri(server) == "http://mlflow:5000"
    assert artifact_location(server) is None


def test_config_hash_is_stable_and_changes_with_any_value(cfg):
    assert config_hash(cfg) == config_hash(cfg.model_copy(deep=True))
    assert len(config_hash(cfg)) == 12 and int(config_hash(cfg), 16) >= 0
    changed = RunConfig.model_validate(apply_overrides(cfg.model_dump(mode="json"), ["rollout.group_size=4"]))
    assert config_hash(changed) != config_hash(cfg)


def test_start_creates_one_run_with_tags_and_the_flattened_config(cfg, client, monkeypatch):
    tracker = Tracker.start(cfg, "run-test")
    run = client.get_run(tracker.mlflow_run_id)
    assert run.info.run_name == "run-test"
    assert run.info.status == "RUNNING"
    assert run.data.tags["turnstile.run_id"] == "run-test"
    assert run.data.tags["turnstile.config_hash"] == config_hash(cfg)

    params = run.data.params
    assert params["rollout.group_size"] == "8"
    assert params["optimizer.lr"] == "0.0001"
    assert params["optimizer.betas"] == "[0.9, 0.95]"
    assert json.loads(params["environment.domains"]) == ["refunds", "inventory", "access"]
    assert params["environment.env_kwargs"] == "{}"
    assert params["tracking.mlflow_uri"] == "null"
    assert params["policy.device"] == "cpu"
    assert params["gate.require_improvement"] == "true"
    assert params == flatten_config(cfg)
    # the logged params rebuild the same config
    rebuilt = RunConfig.model_validate(apply_overrides({}, [f"{key}={value}" for key, value in params.items()]))
    assert rebuilt == cfg

    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.name == "turnstile"
    assert experiment.artifact_location == artifact_location(cfg)
    assert run.info.artifact_uri.startswith(artifact_location(cfg))

    # outside Prefect there is no flow run to link; the description says what the run is
    assert run.data.tags["mlflow.note.content"].startswith("Turnstile training run `run-test`: running.")
    assert "none (run outside Prefect)" in run.data.tags["mlflow.note.content"]
    # the experiment carries Turnstile's saved view of the runs page (what its Share button writes)
    view = json.loads(experiment.tags["mlflow.sharedViewState.turnstile"])
    assert view["name"] == "Turnstile: held-out pass@1 first" and isinstance(view["createdAt"], int)
    assert json.loads(view["state"]) == charts_view_state(cfg)

    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "0f1e2d3c-0000-4000-8000-000000000001")  # a resume's flow run
    again = Tracker.start(cfg, "run-test")
    assert again.mlflow_run_id == tracker.mlflow_run_id
    assert len(client.search_runs([tracker.experiment_id])) == 1
    # the tag names the flow run now working on it (the one the run description links), not the first
    assert client.get_run(again.mlflow_run_id).data.tags[FLOW_RUN_TAG] == "0f1e2d3c-0000-4000-8000-000000000001"
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID")
    other = Tracker.start(cfg, "run-other")
    assert other.mlflow_run_id != tracker.mlflow_run_id


def test_long_param_values_are_cut_to_mlflow_limit(cfg):
    long = cfg.model_copy(
        update={"environment": cfg.environment.model_copy(update={"env_kwargs": {"blob": "x" * 7000}})}
    )
    value = flatten_config(long)["environment.env_kwargs"]
    assert len(value) == 6000 and value.endswith("chars]")


def test_the_saved_view_puts_held_out_pass_at_1_first_and_names_each_sampled_k(cfg):
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"pass_k": [4, 1, 2]})})
    view = charts_view_state(cfg)
    sections = [s["name"] for s in view["compareRunSections"]]
    assert sections[0].startswith("Held-out evaluation") and sections[1].startswith("Training batch")
    assert view["isAccordionReordered"] is True  # MLflow keeps this order instead of sorting by name
    first = view["compareRunSections"][0]["uuid"]
    held_out = [c["metricKey"] for c in view["compareRunCharts"] if c["metricSectionId"] == first]
    assert held_out[0] == "val/pass_at_1"
    assert [k for k in held_out if k.startswith("val/pass_at_k/")] == [f"val/pass_at_k/{k}" for k in (1, 2, 4)]
    charts, section_ids = view["compareRunCharts"], {s["uuid"] for s in view["compareRunSections"]}
    assert len({c["uuid"] for c in charts}) == len(charts) and {c["metricSectionId"] for c in charts} == section_ids
    assert view["selectedColumns"][0] == "metrics.`val/pass_at_1`"
    assert charts_view_url("http://ui:5000/", "7") == (
        "http://ui:5000/#/experiments/7/runs?compareRunsMode=CHART&viewStateShareKey=turnstile"
    )


def test_the_run_description_states_the_outcome_and_where_to_look():
    summary = {
        "run_id": "run-x",
        "pass_at_1_before": 0.3389,
        "pass_at_1_after": 0.36111,
        "optimizer_steps": 2,
        "candidate_version": "1",
        "candidate_step": 2,
        "gate": {
            "outcome": "rejected",
            "baseline": "starting policy",
            "baseline_pass_at_1": 0.38889,
            "candidate_pass_at_1": 0.4,
            "reasons": ["gate pass@1 0.400 reaches the floor 0.000", "improvement is not shown"],
        },
        "registered_model": "turnstile-policy",
        "champion_version": None,
        "prefect_flow_run_id": None,
    }
    text = run_description(summary, "http://ui/#/experiments/1/runs?x")
    assert text.startswith("Turnstile training run `run-x`: finished. [Charts, held-out pass@1 first](http://ui/#")
    assert "**Held-out pass@1 (greedy):** 0.339 at step 0 → 0.361 at step 2" in text
    assert "**Gate:** version 1 (step 2) **rejected**: gate pass@1 0.400 against starting policy 0.389" in text
    assert "**Champion:** none yet (turnstile-policy)" in text
    assert "- improvement is not shown" in text
    no_candidate = run_description({**summary, "gate": None, "no_candidate": "no step was evaluated"})
    assert "**Gate:** no candidate (no step was evaluated)" in no_candidate and "reasons" not in no_candidate


def test_metrics_are_retrievable_by_name_and_step(tracker, client):
    tracker.log_metrics({"rollout/reward/mean": 0.25, "analysis/zero_variance_groups": 0.5, "train/loss": 1.5}, step=1)
    tracker.log_metrics(
        {"rollout/reward/mean": 0.75, "val/pass_at_1": 0.4, "val/pass_at_k/4": 0.9, "val/pass@1": 0.4}, step=2
    )
    readable = {"val/reward_mean": 1 / 3, "train/kl": 1.23456e-05, "perf/tokens": 123456.0, "train/loss": -43.7333333}
    tracker.log_metrics({**readable, "train/grad_norm": float("nan")}, step=3)

    reward = client.get_metric_history(tracker.mlflow_run_id, "rollout/reward/mean")
    assert sorted((m.step, m.value) for m in reward) == [(1, 0.25), (2, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.mlflow_run_id, "val/pass_at_k/4")] == [
        (2, 0.9)
    ]
    assert [
        (m.step, m.value) for m in client.get_metric_history(tracker.mlflow_run_id, "analysis/zero_variance_groups")
    ] == [(1, 0.5)]
    latest = client.get_run(tracker.mlflow_run_id).data.metrics
    assert latest["val/pass_at_1"] == 0.4 and "val/pass@1" not in latest
    # values as a person reads them in MLflow's UI (which prints what is stored): 4 significant digits below 1,
    # 4 decimal places from 1 on, counts whole, NaN kept
    assert {name: latest[name] for name in readable} == {
        "val/reward_mean": 0.3333,
        "train/kl": 1.235e-05,
        "perf/tokens": 123456.0,
        "train/loss": -43.7333,
    }
    assert math.isnan(latest["train/grad_norm"])


def test_metric_names_are_kept_unless_mlflow_rejects_them():
    assert metric_key("rollout/tokens/response_max") == "rollout/tokens/response_max"
    assert metric_key("val/pass_at_k/4") == "val/pass_at_k/4"
    assert metric_key("val/pass@4") == "val/pass_at_4"
    assert metric_key("rollout/finish/env_error?") == "rollout/finish/env_error_"


def test_validation_reports_are_artifacts_under_validation(tracker, client, tmp_path):
    report = {"passed": False, "summary": "permanent environment failures 5.0% > 1.0%"}
    assert tracker.log_validation_report(report, iteration=1) == "validation/iteration-000001.json"
    markdown = tmp_path / "iteration-000002.md"
    markdown.write_text("# all expectations met\n")
    assert tracker.log_validation_report(markdown, iteration=2) == "validation/iteration-000002.md"

    listed = {f.path for f in client.list_artifacts(tracker.mlflow_run_id, "validation")}
    assert listed == {"validation/iteration-000001.json", "validation/iteration-000002.md"}
    local = Path(client.download_artifacts(tracker.mlflow_run_id, "validation/iteration-000001.json", str(tmp_path)))
    assert json.loads(local.read_text()) == report


def test_end_records_the_run_status(cfg, tracker, client):
    tracker.end("FAILED")
    assert client.get_run(tracker.mlflow_run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracker.end("DONE")  # type: ignore[arg-type]
    assert Tracker.start(cfg, "run-test").status() == "RUNNING"  # a resumed run is running again


def test_only_transient_failures_are_retried():
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
    from prefect.states import Failed

    assert is_transient(MlflowException("database is locked", error_code=INTERNAL_ERROR))
    assert is_transient(MlflowException("503", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient(ConnectionError("reset by peer"))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(PromotionError("no previous"))
    assert retry_if_transient(None, None, Failed(data=ConnectionError("reset")))
    assert not retry_if_transient(None, None, Failed(data=PromotionError("no previous")))


# --------------------------------------------------------------------------- gate


@pytest.mark.parametrize(
    ("candidate", "champion_score", "gate", "promoted", "says"),
    [
        (0.2, None, GateConfig(min_pass_at_1=0.3), False, "below the floor 0.300"),
        (0.6, 0.1, GateConfig(min_pass_at_1=0.7), False, "below the floor 0.700"),
        (0.3, None, GateConfig(min_pass_at_1=0.3), True, "nothing to compare with"),
        (0.5, 0.4, GateConfig(), True, "beats the champion's pass@1 0.400 by 0.100"),
        (0.4, 0.4, GateConfig(require_improvement=True), False, "only ties the champion"),
        (0.1 + 0.2, 0.3, GateConfig(), False, "only ties the champion"),
        (0.4, 0.4, GateConfig(require_improvement=False), True, "not required"),
        (0.3, 0.4, GateConfig(), False, "worse than the champion's pass@1 0.400 by 0.100"),
        (float("nan"), None, GateConfig(), False, "not a number"),
    ],
)
def test_simple_gate_rule(candidate, champion_score, gate, promoted, says):
    decision = decide_simple(candidate, champion_score, gate)
    assert decision.promote is promoted
    assert any(says in reason for reason in decision.reasons), decision.reasons
    assert decision.baseline_pass_at_1 == champion_score and decision.floor == gate.min_pass_at_1
    assert decision.outcome == ("promoted" if promoted else "rejected")
    assert decision.outcome in decision.to_markdown()


# --------------------------------------------------------------------------- registry


def test_registration_logs_the_checkpoint_and_tags_its_lineage(cfg, tracker, client, tmp_path):
    version = register(client, cfg, tracker, tmp_path, step=3, pass_at_1=0.5)
    assert version == "1"
    mv = client.get_model_version(MODEL, version)
    assert mv.run_id == tracker.mlflow_run_id
    assert mv.source == f"{tracker.artifact_uri}/checkpoints/step-000003"
    assert {f.path for f in client.list_artifacts(tracker.mlflow_run_id, "checkpoints/step-000003")} == {
        "checkpoints/step-000003/config.json",
        "checkpoints/step-000003/trainer_state.json",
    }
    assert mv.tags["config_hash"] == config_hash(cfg)
    assert mv.tags["step"] == "3"
    assert json.loads(mv.tags["manifests"]) == [
        {"run_id": "run-test", "iteration": i, "sha256": f"{i:064x}"} for i in (1, 2, 3)
    ]
    assert json.loads(mv.tags["validation"]) == {
        "iteration-1": "passed",
        "iteration-2": "passed",
        "iteration-3": "passed",
    }
    assert mv.tags["pass_at_1"] == "0.5"
    assert mv.tags["eval_tasks_hash"] == task_set_hash(reversed(EVAL_TASKS))
    # for a person: the lineage in words, the run named with a link to its page (no run_link: the UI names the run)
    assert mv.description.startswith(
        f"Checkpoint at step 3 of Turnstile run [run-test](http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}"
        f"/runs/{tracker.mlflow_run_id})."
    )
    assert "**Trained on:** 3 batches, iterations 1-3" in mv.description
    assert "**Validation:** all 3 batches passed" in mv.description
    assert "**Held-out pass@1 (greedy):** 0.500 on task set" in mv.description
    assert not mv.run_link
    lineage = json.loads(
        Path(client.download_artifacts(tracker.mlflow_run_id, "lineage/step-000003.json", str(tmp_path))).read_text()
    )
    assert lineage["step"] == 3 and len(lineage["manifests"]) == 3

    again = register_checkpoint(
        client, cfg, tmp_path / "checkpoints" / "step-000003", tracker.mlflow_run_id, {"pass_at_1": 0.5}
    )
    assert again == "1"
    assert register(client, cfg, tracker, tmp_path, step=4, pass_at_1=0.6) == "2"


def test_long_manifest_lists_are_cut_with_a_count(cfg):
    tags = lineage_tags(cfg, {"manifests": [manifest(i) for i in range(1, 501)]})
    assert len(tags["manifests"]) <= 8000
    kept = json.loads(tags["manifests"])
    assert kept[0] == {"run_id": "run-test", "iteration": 1, "sha256": f"{1:064x}"}
    assert len(kept) - 1 + kept[-1]["omitted"] == 500
    assert json.loads(json_list_within([1, 2, 3], limit=100)) == [1, 2, 3]


def test_first_candidate_becomes_champion_and_the_next_better_one_moves_it_to_previous(cfg, tracker, client, tmp_path):
    assert champion(client, MODEL) is None
    first = register(client, cfg, tracker, tmp_path, step=1, pass_at_1=0.4)
    assert gate_and_promote(client, first, 0.4).promote
    assert champion(client, MODEL) == Champion(first, 0.4)
    assert aliases(client) == {CHAMPION_ALIAS: first}

    second = register(client, cfg, tracker, tmp_path, step=2, pass_at_1=0.6)
    assert gate_and_promote(client, second, 0.6).promote
    assert champion(client, MODEL) == Champion(second, 0.6)
    assert aliases(client) == {CHAMPION_ALIAS: second, PREVIOUS_ALIAS: first}
    tags = client.get_model_version(MODEL, second).tags
    assert tags["gate.decision"] == "promoted"
    assert any("beats the champion" in reason for reason in json.loads(tags["gate.reasons"]))

    repeated = promote(client, MODEL, second, decide_simple(0.6, 0.4, GateConfig(), champion_version=first), first)
    assert repeated.applied and repeated.champion == second  # already applied: previous must not become itself
    assert aliases(client) == {CHAMPION_ALIAS: second, PREVIOUS_ALIAS: first}
    assert client.get_model_version(MODEL, second).tags["gate.champion_version"] == first


def test_rejected_candidate_keeps_the_aliases_and_carries_the_decision(cfg, tracker, client, tmp_path):
    first = register(client, cfg, tracker, tmp_path, step=1, pass_at_1=0.5)
    gate_and_promote(client, first, 0.5)
    worse = register(client, cfg, tracker, tmp_path, step=2, pass_at_1=0.3)
    below_floor = register(client, cfg, tracker, tmp_path, step=3, pass_at_1=0.9)

    assert not gate_and_promote(client, worse, 0.3).promote
    assert not gate_and_promote(client, below_floor, 0.9, floor=0.95).promote

    assert aliases(client) == {CHAMPION_ALIAS: first}
    assert champion(client, MODEL) == Champion(first, 0.5)
    for version, reason in ((worse, "worse than the champion"), (below_floor, "below the floor 0.950")):
        mv = client.get_model_version(MODEL, version)
        assert mv.aliases == []
        assert mv.tags["gate.decision"] == "rejected"
        assert any(reason in r for r in json.loads(mv.tags["gate.reasons"]))
        assert f"**Gate:** **rejected**, decided against champion version {first}" in mv.description
        assert reason in mv.description and mv.description.startswith("Checkpoint at step")
    # deciding again replaces the gate section instead of adding a second one
    gate_and_promote(client, worse, 0.3)
    assert client.get_model_version(MODEL, worse).description.count("**Gate:**") == 1


def test_rollback_swaps_champion_and_previous(cfg, tracker, client, tmp_path):
    first = register(client, cfg, tracker, tmp_path, step=1, pass_at_1=0.4)
    second = register(client, cfg, tracker, tmp_path, step=2, pass_at_1=0.6)
    gate_and_promote(client, first, 0.4)
    gate_and_promote(client, second, 0.6)

    assert rollback(client, MODEL) == first
    assert aliases(client) == {CHAMPION_ALIAS: first, PREVIOUS_ALIAS: second}
    assert champion(client, MODEL) == Champion(first, 0.4)
    assert rollback(client, MODEL) == second
    assert aliases(client) == {CHAMPION_ALIAS: second, PREVIOUS_ALIAS: first}


def test_rollback_without_previous_is_refused(cfg, tracker, client, tmp_path):
    with pytest.raises(PromotionError, match="no version holds the alias 'previous'"):
        rollback(client, MODEL)  # no registered model at all
    first = register(client, cfg, tracker, tmp_path, step=1, pass_at_1=0.4)
    gate_and_promote(client, first, 0.4)
    with pytest.raises(PromotionError, match="no version holds the alias 'previous'"):
        rollback(client, MODEL)
    assert aliases(client) == {CHAMPION_ALIAS: first}


def test_champion_task_set_hash_tells_whether_scores_are_comparable(cfg, tracker, client, tmp_path):
    assert champion_eval_tasks_hash(client, MODEL) is None
    first = register(client, cfg, tracker, tmp_path, step=1, pass_at_1=0.4, tasks=EVAL_TASKS)
    gate_and_promote(client, first, 0.4)
    assert champion_eval_tasks_hash(client, MODEL) == task_set_hash(EVAL_TASKS)

    assert champion_eval_tasks_hash(client, MODEL) != task_set_hash(EVAL_TASKS[:2])


# --------------------------------------------------------------------------- Prefect tasks


def test_prefect_tasks_retry_transient_failures_and_publish_the_gate(prefect_harness, cfg, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.artifacts import Artifact

    from tasks.gate import gate_artifact_key, gate_candidate
    from tasks.promote import champion_task, promote_task, register_checkpoint_task, rollback_task
    from tasks.tracking import end_tracking, log_metrics_task, start_tracking

    calls = {"log_metrics": 0}
    real_log_metrics = Tracker.log_metrics

    def flaky_log_metrics(self, metrics, step):
        calls["log_metrics"] += 1
        if calls["log_metrics"] == 1:
            raise ConnectionError("connection reset by peer")
        real_log_metrics(self, metrics, step)

    monkeypatch.setattr(Tracker, "log_metrics", flaky_log_metrics)

    @flow
    def pipeline() -> tuple[str, GateDecision, Exception | None]:
        tracker = start_tracking(cfg, "run-test")
        log_metrics_task.with_options(retry_delay_seconds=0)(tracker, {"val/pass_at_1": 0.5}, 0)
        version = register_checkpoint_task(cfg, tracker, make_checkpoint(tmp_path, 1), {"pass_at_1": 0.5})
        current, _ = champion_task(cfg)
        report = EvalReport.from_outcomes([TaskOutcome("refunds", "t1", True, 1.0, "answered")])
        start = EvalReport.from_outcomes([TaskOutcome("refunds", "t1", False, 0.0, "answered")])
        gate = cfg.gate.model_copy(update={"confidence": 0.5})  # one task solved that the start did not: p = 0.5
        decision = gate_candidate(
            report,
            start,
            gate,
            baseline_name="starting policy",
            champion_version=None,
            key=gate_artifact_key("run-test"),
        )
        assert promote_task(cfg, version, decision, decision.champion_version).applied
        refused = rollback_task(cfg, return_state=True)
        end_tracking(tracker)
        return version, decision, refused.result(raise_on_failure=False)

    version, decision, refused = pipeline()
    assert calls["log_metrics"] == 2  # failed once, retried once
    client = MlflowClient(tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name("turnstile").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"]  # the MLflow run points back at its flow run
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/pass_at_1")] == [(0, 0.5)]
    assert decision.promote and champion(client, MODEL) == Champion(version, 0.5)
    assert isinstance(refused, PromotionError)  # a permanent refusal: failed at once, not after 7 s of retries
    artifact = Artifact.get("gate-run-test")
    assert artifact is not None and "candidate promoted" in artifact.data
