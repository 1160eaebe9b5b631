"""Following a run between the Prefect and MLflow UIs (issue 15, items 2 and 6): flow runs named after the
Turnstile run, the addresses each side links to, the closing summary's pages, and a log without Prefect's
"Finished in state Completed()" after every task run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from rl_core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_an_unnamed_train_flow_run_is_named_with_the_run_id_its_body_uses(prefect_harness, tmp_path):
    """`train_flow_run_name` (what Prefect names the flow run before the body starts) and `_run_id` (what the
    body trains) give one string, from the flow run's creation time and id, through a real Prefect server."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    from flows.parameters import TrainSettings
    from flows.train import _run_id, train_flow_run_name

    @flow(flow_run_name=train_flow_run_name)
    def body_of_train_flow(settings):  # the settings object itself (no annotation for Prefect to resolve here)
        run_id = _run_id(settings.load()).storage.run_id
        return run_id, str(FlowRunContext.get().flow_run.id)

    run_id, flow_run_id = body_of_train_flow(TrainSettings(run_dir=str(tmp_path)))
    assert run_id.startswith("run-") and run_id.endswith(flow_run_id[:6])
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).name == run_id

    named, flow_run_id = body_of_train_flow(TrainSettings(run_dir=str(tmp_path), run_id="my-run"))
    with get_client(sync_client=True) as client:
        assert named == "my-run" and client.read_flow_run(flow_run_id).name == "my-run"


def test_a_train_run_with_a_bad_value_keeps_its_typed_name_and_fails_in_one_line(prefect_harness, tmp_path):
    """A run started (e.g. from the Custom run form) with a value the config refuses is still found by the run id
    that was typed, and its error names the field in one line (no pydantic dump)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from flows.parameters import TrainSettings
    from flows.train import train_flow

    settings = TrainSettings(run_dir=str(tmp_path), run_id="typed_id", group_size=7)  # 128 is not a multiple of 7
    with pytest.raises(ValueError) as caught:
        train_flow(settings)
    message = str(caught.value)
    assert message.startswith("bad config: ") and "multiple of rollout.group_size (7)" in message
    assert "\n" not in message and "pydantic" not in message
    with get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["typed_id"])))
    assert flow_run.state.is_failed()


def test_registry_and_replay_flow_runs_say_what_they_act_on(prefect_harness):
    from prefect import flow
    from prefect.context import FlowRunContext

    from flows.promote import PromoteSettings, promote_flow_run_name
    from flows.replay import ReplaySettings, replay_flow_run_name

    @flow(flow_run_name=promote_flow_run_name)
    def promoting(settings):
        return FlowRunContext.get().flow_run.name

    @flow(flow_run_name=replay_flow_run_name)
    def replaying(settings):
        return FlowRunContext.get().flow_run.name

    assert promoting(PromoteSettings(version=3, gate=True)) == "promote-turnstile-policy-v3-gated"
    assert replaying(ReplaySettings(run_id="nightly-7")) == "replay-nightly-7"


def test_an_evaluate_flow_run_is_named_with_the_evaluation_id_its_body_uses(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.context import FlowRunContext

    from flows.evaluate import EvaluateSettings, _default_run_id, evaluate_flow_run_name

    @flow(flow_run_name=evaluate_flow_run_name)
    def evaluating(settings):
        flow_run = FlowRunContext.get().flow_run
        return flow_run.name, settings.load().storage.run_id or _default_run_id(), flow_run.id.hex

    name, run_id, flow_run_hex = evaluating(EvaluateSettings(run_dir=str(tmp_path)))
    assert name == run_id and run_id.startswith("eval-") and run_id.endswith(flow_run_hex[:6])
    assert evaluating(EvaluateSettings(run_dir=str(tmp_path), run_id="compare-7"))[:2] == ("compare-7", "compare-7")


def test_ui_addresses():
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    from tasks.links import mlflow_run_url, mlflow_runs_url, mlflow_traces_url, prefect_flow_run_url

    cfg = RunConfig()
    assert mlflow_run_url(cfg, "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert mlflow_runs_url(cfg, "1") == "http://127.0.0.1:5000/#/experiments/1/runs"
    assert mlflow_traces_url(cfg, "1") == "http://127.0.0.1:5000/#/experiments/1/traces"
    flow_run_id = str(uuid.uuid4())
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}, restore_defaults={PREFECT_UI_URL}):
        # the flow run page of Prefect 3.9's UI, the address its own "View at" log line gives
        assert prefect_flow_run_url(flow_run_id) == f"http://127.0.0.1:4200/runs/flow-run/{flow_run_id}"
        assert prefect_flow_run_url(None) is None
    with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
        assert prefect_flow_run_url(flow_run_id) is None  # the temporary server: no page a person can open


def _summary(**changes):
    summary = {
        "run_id": "r",
        "iterations": 2,
        "trained_steps": 2,
        "optimizer_steps": 2,
        "skipped": [],
        "findings": [],
        "stopped": None,
        "pass_at_1_before": 0.3,
        "pass_at_1_after": 0.4,
        "candidate_version": None,
        "candidate_step": None,
        "gate": None,
        "trajectories": "runs/r/trajectories",
        "checkpoints": "runs/r/checkpoints",
        "mlflow_uri": "sqlite:///runs/mlflow.db",
        "mlflow_run_id": "abc",
        "registered_model": "m",
        "mlflow_run_url": "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "mlflow_runs_url": "http://127.0.0.1:5000/#/experiments/1/runs",
        "mlflow_traces_url": "http://127.0.0.1:5000/#/experiments/1/traces",
        "prefect_flow_run_id": "0f1e",
        "prefect_flow_run_url": None,
    }
    return {**summary, **changes}


def test_the_closing_summary_gives_the_pages_to_open():
    from flows.summary import closing_summary

    lines = closing_summary(_summary(), 60).splitlines()
    look = lines[lines.index("Look at it:") + 1 :]
    assert look == [
        "  MLflow UI:        .venv/bin/mlflow ui --backend-store-uri sqlite:///runs/mlflow.db --workers 1 --port 5000",
        "  MLflow runs:      http://127.0.0.1:5000/#/experiments/1/runs  (metric charts: val/pass_at_1, "
        "rollout/reward/mean)",
        "  MLflow run:       http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "  MLflow traces:    http://127.0.0.1:5000/#/experiments/1/traces  (the episodes, turn by turn)",
        "  Prefect UI:       .venv/bin/turnstile serve --run-dir runs",
        "                    (then open http://127.0.0.1:4200/runs/flow-run/0f1e: this run's flow run, the "
        "deployments, and runs started from the UI)",
    ]
    served = closing_summary(
        _summary(mlflow_uri="http://mlflow:5000", prefect_flow_run_url="http://prefect:4200/runs/flow-run/0f1e"), 60
    ).splitlines()
    assert served[-1] == "  Prefect flow run: http://prefect:4200/runs/flow-run/0f1e"
    assert not [line for line in served if "mlflow ui" in line]  # an MLflow server needs no `mlflow ui`


FLOW_WITH_A_RETRY = textwrap.dedent(
    """
    from prefect import flow, task

    attempts = []

    @task
    def fine():
        return 1

    @task(retries=1, retry_delay_seconds=0)
    def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("dropped")
        return 2

    @task
    def broken():
        raise ValueError("bad input")

    @flow(name="logging-check")
    def logging_check():
        fine()
        flaky()
        broken(return_state=True)
        print("FLOW_RUN_ID", __import__("prefect").runtime.flow_run.id)

    logging_check()
    """
)


def test_the_shipped_logging_config_drops_completed_task_runs_and_keeps_failures_and_retries(prefect_harness):
    """A flow run in a process whose Prefect logging is Turnstile's (PREFECT_LOGGING_SETTINGS_PATH, as
    `prepare_environment` sets it) logs no "Finished in state Completed()" for its task runs, and still logs
    the retry, the failed task run and the flow run's own end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL

    from flows.environment import LOGGING_CONFIG

    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_LOGGING_SETTINGS_PATH": str(LOGGING_CONFIG),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", FLOW_WITH_A_RETRY], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    [flow_run_id] = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FLOW_RUN_ID")]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    messages = [(log.level, log.message) for log in logs]
    finished = [(level, m) for level, m in messages if m.startswith("Finished in state")]
    # the flow run's own end (it completed: the failed task's state was returned, not raised) and the failed task
    assert sorted(level for level, _ in finished) == [20, 40]
    assert any("Failed(" in m for _, m in finished)
    assert any("Retry 1/1 will start" in m for _, m in messages)
