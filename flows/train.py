"""The train flow: collect -> write -> validate -> train -> examine -> evaluate, N times, then gate.

Each stage is a Prefect task in tasks/ (retries, artifacts, MLflow tracking); the loop that
chains them, decides what is left to do after a crash and applies the training doctor's
decisions is rl_core/loop.py, the same loop `TrainingRun.run()` runs without Prefect. What each
iteration leaves in the run folder: docs/architecture.md. At the end, the best evaluated
checkpoint is gated against the registry champion and promoted or not (tasks/gate.py), and the
reward / pass@1 / truncation curves go to MLflow and Prefect.

Runs on Prefect's temporary server by default, or against PREFECT_API_URL when set.

Following a run between the UIs: the flow run is named after the Turnstile run (its run id, fixed
before the flow's body starts: `train_flow_run_name`), its task runs after their iteration
(`collect-rollouts-iteration-3`, `train-step-iteration-3`, `log-metrics-iteration-3-train`), its log
and a link artifact give the MLflow run's address, and the MLflow run's `prefect.flow_run_id` tag
names the flow run. The flow's last log line is the closing summary `turnstile train` prints
(flows/summary.py), with the addresses of the MLflow runs view, the traces view and the flow run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact
from prefect.context import FlowRunContext

from flows.environment import NOT_ON_CONSOLE
from flows.parameters import TrainSettings
from flows.summary import closing_summary
from rl_core.config import RunConfig, config_error_line
from rl_core.doctor import DoctorDecision
from rl_core.evaluation import EvalReport
from rl_core.gate import no_candidate_reason
from rl_core.loop import TrainingLoop
from rl_core.model.policy import Policy
from rl_core.run import TrainingRun
from rl_core.runs.checkpoint import checkpoint_dir
from rl_core.store import CommittedBatch, Manifest
from rl_core.trajectory import Episode
from tasks.collect import collect_rollouts_task
from tasks.curves import publish_curves_task
from tasks.doctor import examine_step_task, publish_findings_task
from tasks.evaluate import evaluate_checkpoint_task, evaluate_task
from tasks.gate import gate_run
from tasks.links import current_flow_run_url, mlflow_run_url, mlflow_runs_url, mlflow_traces_url
from tasks.promote import Champion, champion_version_task, download_champion_task, register_checkpoint_task
from tasks.traces import trace_batch
from tasks.tracking import (
    Tracker,
    describe_run_task,
    end_tracking,
    log_metrics_task,
    log_validation_report_task,
    start_tracking,
    task_set_hash,
    tracking_uri,
)
from tasks.train import train_step_task
from tasks.validate import ValidationReport, artifact_slug, validate_trajectories
from tasks.write import write_trajectories_task


def _run_id(cfg: RunConfig) -> RunConfig:
    """Give an unnamed run a name derived from its Prefect flow run (its creation time and id, which
    a retry keeps), so that re-running that flow run continues the same Turnstile run."""
    if cfg.storage.run_id is not None:
        return cfg
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    created = (flow_run.created if flow_run else None) or datetime.now(timezone.utc)
    name = f"run-{created:%Y%m%d-%H%M%S}" + (f"-{str(flow_run.id)[:6]}" if flow_run else "")
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": name})})


def train_flow_run_name() -> str:
    """The train flow run's name: the Turnstile run id it trains (`storage.run_id`, or the one `_run_id`
    derives for an unnamed run), so that the Prefect runs list shows it and its search finds it.

    Prefect calls this when the flow run starts, before the flow's body, in the flow run's context; a
    retried flow run gets the same name (its settings, creation time and id are the same). Settings that
    do not load keep the run id they name, else fall back to the derived name (the flow's body then fails
    with the config error), so a run started with a bad value is still found by the id that was typed."""
    context = FlowRunContext.get()
    settings = (context.parameters or {}).get("settings") if context else None
    try:
        if not isinstance(settings, TrainSettings):
            settings = TrainSettings.model_validate(settings or {})
        cfg = settings.load()
    except (ValueError, FileNotFoundError):
        typed = settings.run_id if isinstance(settings, TrainSettings) else None
        if typed:
            return typed
        cfg = RunConfig()
    return str(_run_id(cfg).storage.run_id)


def _metrics_task_run_name(parameters: Mapping[str, Any]) -> str:
    """`log-metrics-iteration-<n>-<what>`: the iteration the metrics belong to (0: the starting policy) and
    their sections (`rollout`, `train`, `val`, `validation`, `doctor`)."""
    sections = sorted({str(name).split("/", 1)[0] for name in parameters["metrics"]})
    return f"log-metrics-iteration-{parameters['step']}-{'-'.join(sections) or 'none'}"


def _examine_task_run_name(parameters: Mapping[str, Any]) -> str:
    return f"training-doctor-iteration-{parameters['records'][-1].iteration}"


def _evaluate_task_run_name(parameters: Mapping[str, Any]) -> str:
    return f"evaluate-step-{parameters['policy'].version}"


def _register_task_run_name(parameters: Mapping[str, Any]) -> str:
    return f"register-checkpoint-step-{parameters['lineage']['step']}"


# the stages' tasks, their runs named after the iteration or step they work on
collect_rollouts = collect_rollouts_task.with_options(task_run_name="collect-rollouts-iteration-{iteration}")
write_trajectories = write_trajectories_task.with_options(task_run_name="write-trajectories-iteration-{iteration}")
validate_batch = validate_trajectories.with_options(task_run_name="validate-trajectories-iteration-{iteration}")
log_validation_report = log_validation_report_task.with_options(
    task_run_name="log-validation-report-iteration-{iteration}"
)
train_step = train_step_task.with_options(task_run_name="train-step-iteration-{iteration}")
examine_step = examine_step_task.with_options(task_run_name=_examine_task_run_name)
evaluate_policy = evaluate_task.with_options(task_run_name=_evaluate_task_run_name)
register_checkpoint = register_checkpoint_task.with_options(task_run_name=_register_task_run_name)
log_metrics = log_metrics_task.with_options(task_run_name=_metrics_task_run_name)


class PrefectStages:
    """The loop's stages (rl_core.stages.Stages) as the Prefect tasks of tasks/, tracked in MLflow."""

    def __init__(self, run: TrainingRun, tracker: Tracker):
        self.run, self.tracker = run, tracker

    def collect(self, iteration: int) -> list[Episode]:
        return collect_rollouts(self.run, iteration)

    def collect_ahead(self, iteration: int, policy: Policy):
        return collect_rollouts.submit(self.run, iteration, policy)

    def write(self, iteration: int, episodes: list[Episode]) -> CommittedBatch:
        committed = write_trajectories(self.run, iteration, episodes)
        trace_batch(self.tracker, self.run.run_id, iteration, episodes, self.run.cfg.tracking.traced_episodes)
        return committed

    def validate(self, iteration: int, batch: CommittedBatch | None) -> ValidationReport:
        run = self.run
        table = None if batch is None else batch.table
        report = validate_batch(str(run.store.root), run.run_id, iteration, run.cfg.validation, table)
        log_validation_report(self.tracker, report.to_dict(), iteration)
        return report

    def train(self, iteration: int, episodes: list[Episode]):
        return train_step(self.run, iteration, episodes)[0]

    def examine(self, records, pass_at_1, reported, rollback_targets) -> DoctorDecision:
        return examine_step(records, pass_at_1, reported, rollback_targets, self.run.cfg)

    def evaluate(self, policy: Policy) -> EvalReport:
        return evaluate_policy(self.run.evaluator, policy, self.run.run_id, tracker=self.tracker)

    def register(self, step: int, report: EvalReport, manifests: list[Manifest], validation: list[dict]) -> str:
        lineage = {
            "step": step,
            "manifests": manifests,
            "validation": validation,
            "pass_at_1": report.pass_at_1,
            "eval_tasks_hash": task_set_hash(report.task_success),
        }
        return register_checkpoint(self.run.cfg, self.tracker, checkpoint_dir(self.run.checkpoints_dir, step), lineage)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.tracker, metrics, step=step)

    def log(self, message: str, *, warning: bool = False) -> None:
        logger = get_run_logger()
        (logger.warning if warning else logger.info)(message)

    def champion_gate_report(self, champion: Champion) -> EvalReport:
        """The champion's greedy evaluation of this run's gate tasks (downloaded and evaluated now)."""
        with tempfile.TemporaryDirectory(prefix="turnstile-champion-") as scratch:
            folder = download_champion_task(self.run.cfg, scratch)
            evaluate = evaluate_checkpoint_task.with_options(task_run_name="evaluate-champion-gate-tasks")
            return evaluate(self.run.evaluator, str(folder), part="gate")

    def starting_gate_report(self, before: EvalReport | None) -> EvalReport:
        """The starting policy's greedy evaluation of the gate tasks: from its step-0 evaluation, or made now when
        that record keeps no per-task outcomes (written by an older Turnstile)."""
        if before is not None and before.outcomes:
            return before.part("gate")
        evaluate = evaluate_checkpoint_task.with_options(task_run_name="evaluate-starting-policy-gate-tasks")
        return evaluate(self.run.evaluator, self.run.cfg.resolved_policy_path(), part="gate")


def _announce_mlflow_run(run: TrainingRun, tracker: Tracker) -> dict[str, str]:
    """Log the MLflow run's address and put it on the flow run as a link artifact (`mlflow-<run id>`);
    returns the run's MLflow addresses (mlflow_run_url, mlflow_runs_url, mlflow_traces_url)."""
    cfg, experiment = run.cfg, tracker.experiment_id
    links = {
        "mlflow_run_url": mlflow_run_url(cfg, experiment, tracker.mlflow_run_id),
        "mlflow_runs_url": mlflow_runs_url(cfg, experiment),
        "mlflow_traces_url": mlflow_traces_url(cfg, experiment),
    }
    get_run_logger().info("MLflow run of %s: %s", run.run_id, links["mlflow_run_url"])
    create_link_artifact(
        key=f"mlflow-{artifact_slug(run.run_id)}",
        link=links["mlflow_run_url"],
        link_text=f"MLflow run {run.run_id}",
        description=f"Open run {run.run_id} in MLflow (params, metric charts, episodes as traces)",
    )
    return links


@flow(name="turnstile-train", flow_run_name=train_flow_run_name)
def train_flow(settings: TrainSettings = TrainSettings()) -> dict[str, Any]:
    """Train a policy: collect, validate and train for the configured iterations, then gate the best checkpoint.

    Naming an existing run (run_id) continues it from its last completed stage. Ends by logging the
    closing summary (flows/summary.py) the command line prints; returns the dict it is made from."""
    started = time.monotonic()
    logger = get_run_logger()
    try:
        cfg = _run_id(settings.load())
    except (ValueError, FileNotFoundError) as err:  # one line naming the field, as the command line prints it
        raise ValueError(f"bad config: {config_error_line(err)}") from None
    run = TrainingRun.open(cfg)
    if run.last_iteration:
        logger.info(
            "continuing run %s after iteration %d (step %d)", run.run_id, run.last_iteration, run.policy.version
        )
    logger.info("%s", run.context_budget.describe())
    try:
        tracker = start_tracking.with_options(task_run_name="start-tracking")(run.cfg, run.run_id)
    except BaseException:
        run.close()
        raise
    stages = PrefectStages(run, tracker)
    try:
        links = _announce_mlflow_run(run, tracker)
        result = TrainingLoop(run, stages).run_iterations()
        best, decision = None, None
        if result.candidates:
            best, decision = gate_run(
                run.cfg,
                run.ledger,
                result.candidates,
                lambda: stages.starting_gate_report(result.before),
                stages.champion_gate_report,
            )
        else:
            logger.warning("No candidate to gate: %s.", no_candidate_reason(result.records))
        publish_findings_task.with_options(task_run_name="publish-doctor-findings")(
            run.run_id, result.findings, result.stopped
        )
        publish_curves_task.with_options(task_run_name="publish-curves")(
            run.run_id, run.run_dir, result.records, result.pass_at_1, tracker
        )
        champion_version = champion_version_task.with_options(task_run_name="read-champion-version")(run.cfg)
    except BaseException:
        end_tracking.with_options(task_run_name="end-tracking")(tracker, "FAILED")
        raise
    finally:
        run.close()  # e.g. stop the vLLM server the run started
    end_tracking.with_options(task_run_name="end-tracking")(tracker, "FINISHED")
    flow_run = FlowRunContext.get().flow_run
    summary = {
        "run_id": run.run_id,
        "iterations": cfg.iterations,
        **result.summary(),
        "optimizer_steps": run.policy.version,
        "candidate_version": best.version if best else None,
        "candidate_step": best.step if best else None,
        "gate": decision.as_dict() if decision else None,
        "trajectories": str(run.store.root / run.run_id / "trajectories"),
        "checkpoints": str(run.checkpoints_dir),
        "mlflow_uri": tracking_uri(run.cfg),
        "mlflow_run_id": tracker.mlflow_run_id,
        "registered_model": run.cfg.tracking.registered_model,
        "champion_version": champion_version,
        **links,
        "prefect_flow_run_id": str(flow_run.id) if flow_run else None,
        "prefect_flow_run_url": current_flow_run_url(),
    }
    describe_run_task(tracker, summary, run.cfg)  # the MLflow run's description: outcome and links
    logger.info("%s", closing_summary(summary, time.monotonic() - started).strip("\n"), extra=NOT_ON_CONSOLE)
    return summary
