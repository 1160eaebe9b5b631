"""The train flow: N iterations of collect -> write -> validate -> train, then gate and promote.

Per iteration: rollouts are collected (retried on faults), written as one Parquet batch,
checked by the Great Expectations suite, and trained on only if the batch passed (a failed
batch is quarantined and the iteration's training is skipped, with the reason logged in one
sentence). The policy is evaluated on held-out tasks at step 0, every `val_every` steps and
at the end; every evaluated checkpoint is registered in the MLflow registry with its
lineage. The best evaluated checkpoint (latest on ties) is the candidate: the gate compares
it with the registry champion on the same tasks (re-evaluating the champion when its
recorded pass@1 was measured on other tasks) and promotes it, or records why not.

Runs on Prefect's temporary server by default, or against PREFECT_API_URL when set.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.parameters import TrainSettings
from rl_core.evaluation import EvalReport
from rl_core.metrics import rollout_metrics
from rl_core.run import TrainingRun
from rl_core.store import Manifest
from tasks.collect import collect_rollouts_task
from tasks.evaluate import evaluate_checkpoint_task, evaluate_task
from tasks.gate import GateDecision, gate_candidate
from tasks.promote import champion_task, download_champion_task, promote_task, register_checkpoint_task
from tasks.tracking import Tracker, end_tracking, log_metrics_task, log_validation_report_task, start_tracking, task_set_hash, tracking_uri
from tasks.train import train_step_task
from tasks.validate import validate_trajectories
from tasks.write import write_trajectories_task


@dataclass
class Candidate:
    """An evaluated checkpoint and its registry version."""

    checkpoint: Path
    report: EvalReport
    version: str
    step: int


@dataclass
class _Progress:
    manifests: list[Manifest] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    last_checkpoint: Path | None = None


def _register(run: TrainingRun, tracker: Tracker, progress: _Progress, report: EvalReport) -> None:
    """Register the latest checkpoint with its lineage as a candidate."""
    lineage = {
        "step": run.policy.version,
        "manifests": list(progress.manifests),
        "validation": list(progress.verdicts),
        "pass_at_1": report.pass_at_1,
        "eval_tasks_hash": task_set_hash(report.task_success),
    }
    version = register_checkpoint_task(run.cfg, tracker, progress.last_checkpoint, lineage)
    progress.candidates.append(Candidate(progress.last_checkpoint, report, version, run.policy.version))


def _evaluate(run: TrainingRun, tracker: Tracker, progress: _Progress, iteration: int) -> EvalReport:
    report = evaluate_task(run)
    log_metrics_task(tracker, report.metrics, step=iteration)
    if progress.last_checkpoint is not None:
        _register(run, tracker, progress, report)
    return report


def _iteration(run: TrainingRun, tracker: Tracker, progress: _Progress, iteration: int) -> bool:
    """One collect -> write -> validate -> train pass; returns whether a training step was taken."""
    logger = get_run_logger()
    episodes = collect_rollouts_task(run, iteration)
    log_metrics_task(tracker, rollout_metrics(episodes), step=iteration)
    manifest = write_trajectories_task(run, iteration, episodes)
    report = validate_trajectories(str(run.store.root), run.run_id, iteration, run.cfg.validation)
    log_validation_report_task(tracker, report.to_dict(), iteration)
    verdict = {"iteration": iteration, "passed": report.passed, "reason": report.reason}
    log_metrics_task(tracker, {"validation/passed": float(report.passed), "analysis/zero_var_group_frac": report.zero_variance_group_frac or 0.0}, step=iteration)
    if not report.passed:
        progress.skipped.append(verdict)
        logger.warning("Iteration %d: training skipped. %s", iteration, report.reason)
        return False
    progress.verdicts.append(verdict)
    progress.manifests.append(manifest)
    metrics, progress.last_checkpoint = train_step_task(run, iteration, episodes)
    log_metrics_task(tracker, metrics.as_dict(), step=iteration)
    return True


def _champion_pass_at_1(run: TrainingRun, candidate: Candidate) -> float | None:
    """The champion's pass@1 on the candidate's tasks (re-evaluated when measured on other tasks)."""
    champion, champion_tasks = champion_task(run.cfg)
    if champion is None or champion.version == candidate.version:
        return None if champion is None else champion.pass_at_1
    if champion_tasks == task_set_hash(candidate.report.task_success):
        return champion.pass_at_1
    with tempfile.TemporaryDirectory(dir=run.run_dir) as scratch:
        folder = download_champion_task(run.cfg, scratch)
        return evaluate_checkpoint_task(run, str(folder)).pass_at_1


def _gate(run: TrainingRun, progress: _Progress) -> tuple[Candidate | None, GateDecision | None]:
    if not progress.candidates:
        get_run_logger().warning("No candidate to gate: no training step was taken (every batch failed validation).")
        return None, None
    best = max(progress.candidates, key=lambda c: (c.report.pass_at_1, c.step))
    decision = gate_candidate(best.report.pass_at_1, _champion_pass_at_1(run, best), run.cfg.gate, label=f"version {best.version} (step {best.step})")
    promote_task(run.cfg, best.version, decision)
    return best, decision


@flow(name="turnstile-train")
def train_flow(settings: TrainSettings = TrainSettings()) -> dict[str, Any]:
    """Train a policy: collect, validate and train for the configured iterations, then gate the best checkpoint."""
    cfg = settings.load()
    run = TrainingRun(cfg)
    tracker = start_tracking(cfg, run.run_id)
    progress = _Progress()
    try:
        before = _evaluate(run, tracker, progress, iteration=0)
        trained = 0
        for iteration in range(1, cfg.iterations + 1):
            stepped = _iteration(run, tracker, progress, iteration)
            trained += stepped
            due = stepped and run.policy.version % cfg.evaluation.val_every == 0
            if due and iteration < cfg.iterations:
                _evaluate(run, tracker, progress, iteration)
        final_due = progress.last_checkpoint is not None and (not progress.candidates or progress.candidates[-1].step != run.policy.version)
        after = _evaluate(run, tracker, progress, iteration=cfg.iterations) if final_due else (progress.candidates[-1].report if progress.candidates else before)
        best, decision = _gate(run, progress)
    except BaseException:
        end_tracking(tracker, "FAILED")
        raise
    end_tracking(tracker, "FINISHED")
    return {
        "run_id": run.run_id,
        "iterations": cfg.iterations,
        "trained_steps": trained,
        "skipped": progress.skipped,
        "pass_at_1_before": before.pass_at_1,
        "pass_at_1_after": after.pass_at_1,
        "candidate_version": best.version if best else None,
        "candidate_step": best.step if best else None,
        "gate": decision.as_dict() if decision else None,
        "trajectories": str(run.store.root / run.run_id / "trajectories"),
        "checkpoints": str(run.checkpoints_dir),
        "mlflow_uri": tracking_uri(cfg),
        "mlflow_run_id": tracker.mlflow_run_id,
        "registered_model": cfg.tracking.registered_model,
    }
