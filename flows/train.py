"""The train flow: collect -> write -> validate -> train -> examine -> evaluate, N times, then gate.

Each stage is a Prefect task in tasks/ (retries, artifacts, MLflow tracking); the loop that
chains them, decides what is left to do after a crash and applies the training doctor's
decisions is rl_core/loop.py, the same loop `TrainingRun.run()` runs without Prefect. What each
iteration leaves in the run folder: docs/architecture.md. At the end, the best evaluated
checkpoint is gated against the registry champion and promoted or not (tasks/gate.py), and the
reward / pass@1 / truncation curves go to MLflow and Prefect.

Runs on Prefect's temporary server by default, or against PREFECT_API_URL when set.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows.parameters import TrainSettings
from rl_core.config import RunConfig
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
from tasks.promote import Champion, champion_version_task, download_champion_task, register_checkpoint_task
from tasks.tracking import (
    Tracker,
    end_tracking,
    log_metrics_task,
    log_validation_report_task,
    start_tracking,
    task_set_hash,
    tracking_uri,
)
from tasks.train import train_step_task
from tasks.validate import ValidationReport, validate_trajectories
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


class PrefectStages:
    """The loop's stages (rl_core.stages.Stages) as the Prefect tasks of tasks/, tracked in MLflow."""

    def __init__(self, run: TrainingRun, tracker: Tracker):
        self.run, self.tracker = run, tracker

    def collect(self, iteration: int) -> list[Episode]:
        return collect_rollouts_task(self.run, iteration)

    def collect_ahead(self, iteration: int, policy: Policy):
        return collect_rollouts_task.submit(self.run, iteration, policy)

    def write(self, iteration: int, episodes: list[Episode]) -> CommittedBatch:
        return write_trajectories_task(self.run, iteration, episodes)

    def validate(self, iteration: int, batch: CommittedBatch | None) -> ValidationReport:
        run = self.run
        table = None if batch is None else batch.table
        report = validate_trajectories(str(run.store.root), run.run_id, iteration, run.cfg.validation, table)
        log_validation_report_task(self.tracker, report.to_dict(), iteration)
        return report

    def train(self, iteration: int, episodes: list[Episode]):
        return train_step_task(self.run, iteration, episodes)[0]

    def examine(self, records, pass_at_1, reported, rollback_targets) -> DoctorDecision:
        return examine_step_task(records, pass_at_1, reported, rollback_targets, self.run.cfg)

    def evaluate(self, policy: Policy) -> EvalReport:
        return evaluate_task(self.run.evaluator, policy, self.run.run_id)

    def register(self, step: int, report: EvalReport, manifests: list[Manifest], validation: list[dict]) -> str:
        lineage = {
            "step": step,
            "manifests": manifests,
            "validation": validation,
            "pass_at_1": report.pass_at_1,
            "eval_tasks_hash": task_set_hash(report.task_success),
        }
        return register_checkpoint_task(
            self.run.cfg, self.tracker, checkpoint_dir(self.run.checkpoints_dir, step), lineage
        )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        log_metrics_task(self.tracker, metrics, step=step)

    def log(self, message: str, *, warning: bool = False) -> None:
        logger = get_run_logger()
        (logger.warning if warning else logger.info)(message)

    def champion_gate_report(self, champion: Champion) -> EvalReport:
        """The champion's greedy evaluation of this run's gate tasks (downloaded and evaluated now)."""
        with tempfile.TemporaryDirectory(prefix="turnstile-champion-") as scratch:
            folder = download_champion_task(self.run.cfg, scratch)
            return evaluate_checkpoint_task(self.run.evaluator, str(folder), part="gate")

    def starting_gate_report(self, before: EvalReport | None) -> EvalReport:
        """The starting policy's greedy evaluation of the gate tasks: from its step-0 evaluation, or made now when
        that record keeps no per-task outcomes (written by an older Turnstile)."""
        if before is not None and before.outcomes:
            return before.part("gate")
        return evaluate_checkpoint_task(self.run.evaluator, self.run.cfg.resolved_policy_path(), part="gate")


@flow(name="turnstile-train")
def train_flow(settings: TrainSettings = TrainSettings()) -> dict[str, Any]:
    """Train a policy: collect, validate and train for the configured iterations, then gate the best checkpoint.

    Naming an existing run (run_id) continues it from its last completed stage."""
    logger = get_run_logger()
    cfg = _run_id(settings.load())
    run = TrainingRun.open(cfg)
    if run.last_iteration:
        logger.info(
            "continuing run %s after iteration %d (step %d)", run.run_id, run.last_iteration, run.policy.version
        )
    logger.info("%s", run.context_budget.describe())
    try:
        tracker = start_tracking(run.cfg, run.run_id)
    except BaseException:
        run.close()
        raise
    stages = PrefectStages(run, tracker)
    try:
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
        publish_findings_task(run.run_id, result.findings, result.stopped)
        publish_curves_task(run.run_id, run.run_dir, result.records, result.pass_at_1, tracker)
        champion_version = champion_version_task(run.cfg)
    except BaseException:
        end_tracking(tracker, "FAILED")
        raise
    finally:
        run.close()  # e.g. stop the vLLM server the run started
    end_tracking(tracker, "FINISHED")
    return {
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
    }
