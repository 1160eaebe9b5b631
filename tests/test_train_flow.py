"""The train flow end to end through Prefect, on a tiny config and the shipped reference policy."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from rl_core.store import TrajectoryStore
from rl_core.trajectory import TRAJECTORY_SCHEMA
from tasks.tracking import readable_value

TINY = [
    "iterations=2",
    "rollout.group_size=4",
    "rollout.global_batch_size=8",
    "rollout.max_turns=4",
    "evaluation.max_tasks=2",
    "evaluation.num_samples=2",
    "evaluation.pass_k=[1,2]",
    "evaluation.val_every=1",
    # a tiny batch of an imperfect policy: do not let the truncation limits veto it
    "validation.max_token_cap_frac=1.0",
    "validation.max_turns_unanswered_frac=1.0",
]


def run_flow(tmp_path, run_id, extra=()):
    from flows.parameters import TrainSettings
    from flows.train import train_flow

    overrides = TINY + [f"storage.run_dir={tmp_path}", f"storage.run_id={run_id}", *extra]
    return train_flow(TrainSettings(overrides=overrides))


def test_two_iterations_end_to_end(prefect_harness, tmp_path):
    summary = run_flow(tmp_path, "e2e")
    store = TrajectoryStore(tmp_path)
    assert store.iterations("e2e") == [1, 2]
    for iteration in (1, 2):
        assert store.read_table("e2e", iteration).schema.equals(TRAJECTORY_SCHEMA)
        report = json.loads(
            (tmp_path / "e2e" / "trajectories" / f"iteration-{iteration:06d}.validation.json").read_text()
        )
        assert report["passed"] is True and report["rows"] == 8
    assert summary["trained_steps"] == 2 and summary["skipped"] == []

    client = MlflowClient(summary["mlflow_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["rollout.group_size"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rollout/reward/mean")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/pass_at_1")] == [0, 1, 2]
    assert client.get_metric_history(run.info.run_id, "val/pass_at_k/2")
    assert client.get_metric_history(run.info.run_id, "train/grad_norm")
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "validation")]
    assert len(artifacts) == 2

    versions = client.search_model_versions("name='turnstile-policy'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # both evaluated checkpoints registered
    candidate = client.get_model_version("turnstile-policy", summary["candidate_version"])
    assert candidate.tags["gate.decision"] in ("promoted", "rejected")
    assert json.loads(candidate.tags["gate.reasons"])
    trained_on = json.loads(candidate.tags["manifests"])
    assert [m["iteration"] for m in trained_on] == list(range(1, summary["candidate_step"] + 1))
    assert all(len(m["sha256"]) == 64 for m in trained_on)
    # first run: no champion, so the starting policy is the one to beat, on the 3 gate tasks of the 6 held out
    # (evaluation.gate_fraction 0.5 of 2 per environment); 3 tasks can never show an improvement at 0.95
    gate = summary["gate"]
    assert gate["outcome"] == "rejected" and gate["baseline"] == "starting policy" and gate["gate_tasks"] == 3
    assert gate["paired"]["tasks"] == 3 and gate["paired"]["p_value"] >= 0.125
    assert [c["name"] for c in gate["checks"]][-1] == "confidence" and not gate["checks"][-1]["passed"]
    evaluation = json.loads((tmp_path / "e2e" / "evaluations" / "step-000000.json").read_text())
    assert len(evaluation["gate_tasks"]) == 3 and len(evaluation["outcomes"]) == 6
    gate_curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/gate/pass_at_1")}
    assert sorted(gate_curve) == [0, 1, 2] and gate_curve[summary["candidate_step"]] == readable_value(
        gate["candidate_pass_at_1"]
    )
    # the starting policy's step-0 evaluation, gate part
    assert readable_value(gate["baseline_pass_at_1"]) == gate_curve[0]

    pictures = sorted(a.path for a in client.list_artifacts(run.info.run_id, "curves"))
    assert pictures == ["curves/pass_at_1.png", "curves/reward.png", "curves/truncation.png"]
    from prefect.artifacts import Artifact

    curves = Artifact.get("curves-e2e")  # one markdown card showing the three pictures, no printed data URL
    assert curves is not None and curves.type == "markdown"
    assert str(curves.data).count("](data:image/png;base64,") == 3
    doctor = Artifact.get("doctor-e2e")
    assert doctor is not None
    gate_card = Artifact.get("gate-e2e")  # the gate's card carries the run in its key and shows its baseline
    assert gate_card is not None and "| starting policy |" in str(gate_card.data)
    for card in (curves, doctor, gate_card):  # the run's story is on the flow run, not on a task run of it
        assert card.flow_run_id is not None and card.task_run_id is None, card.key
    validation = Artifact.get("validation-e2e-iter-001")
    assert validation is not None and validation.task_run_id is not None
    assert "champion" not in {alias for v in versions for alias in v.aliases} and summary["champion_version"] is None
    from flows.cli import closing_summary

    assert "  champion:               none yet (no version of turnstile-policy holds the alias champion)" in (
        closing_summary(summary, 60).splitlines()
    )
    _assert_followable_between_the_uis(summary, run.info.experiment_id)


def _flow_run_logs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the log records still queued in this process go to the server first
    logs, offset = [], 0
    while True:
        page = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
            limit=200,
            offset=offset,
            sort=LogSort.TIMESTAMP_ASC,
        )
        logs += [log.message for log in page]
        offset += len(page)
        if len(page) < 200:
            return logs


def _assert_followable_between_the_uis(summary, experiment_id):
    """Item 2 of issue 15: the flow run is named after the Turnstile run, its task runs after their iteration,
    its log and a link artifact give the MLflow run's address; the closing summary is in the flow run's log."""
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    mlflow_run = f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{summary['mlflow_run_id']}"
    assert summary["mlflow_run_url"] == mlflow_run
    assert summary["mlflow_traces_url"] == f"http://127.0.0.1:5000/#/experiments/{experiment_id}/traces"
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(summary["prefect_flow_run_id"])
        assert flow_run.name == "e2e"
        assert summary["prefect_flow_run_url"].endswith(f"/runs/flow-run/{flow_run.id}")
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), limit=200
        )
        names = {t.name for t in task_runs}
        assert {"collect-rollouts-iteration-1", "collect-rollouts-iteration-2", "train-step-iteration-2"} <= names
        assert {"log-metrics-iteration-0-val", "log-metrics-iteration-2-rollout-train", "evaluate-step-2"} <= names
        assert not [n for n in names if n.startswith("log-metrics") and "iteration" not in n]
        logs = _flow_run_logs(client, flow_run.id)
    assert f"MLflow run of e2e: {mlflow_run}" in logs
    link = Artifact.get("mlflow-e2e")
    assert link is not None and link.data == f"[MLflow run e2e]({mlflow_run})"  # Prefect keeps links as markdown
    [logged_summary] = [m for m in logs if m.startswith("Run e2e finished in")]
    from flows.summary import closing_summary

    expected = closing_summary(summary, 0).strip("\n").splitlines()
    assert logged_summary.splitlines()[1:] == expected[1:]  # the same summary the command line prints
    assert f"  MLflow traces:    {summary['mlflow_traces_url']}  (the episodes, turn by turn)" in expected
    assert f"  Prefect flow run: {summary['prefect_flow_run_url']}" in expected


def test_permanent_environment_failures_quarantine_the_batch(prefect_harness, tmp_path):
    extra = [
        "iterations=1",
        "rollout.group_size=4",
        "rollout.global_batch_size=20",
        "environment.domains=['tests.fault_envs:FailingDomain']",
        "environment.env_kwargs={domain: refunds, fail_every: 20}",
    ]
    summary = run_flow(tmp_path, "faulty", extra)
    assert summary["trained_steps"] == 0
    [skipped] = summary["skipped"]
    assert (
        "5.0%" in skipped["reason"]
        and "environment" in skipped["reason"]
        and "tool backend unreachable" in skipped["reason"]
    )
    store = TrajectoryStore(tmp_path)
    assert store.iterations("faulty") == []
    quarantined = tmp_path / "faulty" / "quarantine" / "iteration-000001"
    assert (quarantined / "iteration-000001.parquet").exists() and (
        quarantined / "iteration-000001.manifest.json"
    ).exists()
    assert summary["gate"] is None and not (tmp_path / "faulty" / "checkpoints").exists()


def test_a_transient_collection_failure_is_retried(prefect_harness, tmp_path, monkeypatch):
    from rl_core.run import TrainingRun

    original, calls = TrainingRun.collect, []

    def flaky_collect(self, iteration):
        calls.append(iteration)
        if len(calls) == 1:
            raise ConnectionError("generation server dropped the connection")
        return original(self, iteration)

    monkeypatch.setattr(TrainingRun, "collect", flaky_collect)
    summary = run_flow(tmp_path, "retried", ["iterations=1"])
    assert calls == [1, 1]
    assert summary["trained_steps"] == 1 and TrajectoryStore(tmp_path).iterations("retried") == [1]
