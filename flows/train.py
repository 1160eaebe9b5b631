"""The train flow: N iterations of collect -> write -> validate -> train, then gate and promote.

Per iteration: rollouts are collected (retried on faults), written as one Parquet batch,
checked by the Great Expectations suite, and trained on only if the batch passed (a failed
batch is quarantined and the iteration's training is skipped, with the reason logged in one
sentence). Training always reads the batch back from the store, so what trains is exactly
what was validated and what a replay re-trains on. After every step the training doctor
(rl_core/doctor.py) reads the run's history and reports symptoms; on a reward collapse it
warns, stops the run, or rolls back to the last good checkpoint (`doctor.on_collapse`).
The policy is evaluated on held-out tasks at step 0, every `val_every` steps and at the end;
every evaluated checkpoint is registered in the MLflow registry with its lineage. The best
evaluated checkpoint (latest on ties) is gated against the champion and promoted or not.
At the end, reward / pass@1 / truncation curves go to MLflow and Prefect as PNGs.

An iteration whose batch passed validation but leaves nothing to train on (every group
dropped, every episode stale or env_error) or whose step is not finite takes no optimizer
step: it is recorded as skipped with the trainer's reason ("skipped_by": "trainer"), writes no
checkpoint, and the run goes on; the closing summary is derived from these records. Its
counters (`StepMetrics.recorded()`: `train/nonfinite_step`, `train/truncated_masked`, ...) are
logged, and one whose optimizer steps were not finite is examined by the doctor too
(`nonfinite_step`), without a collapse action (it moved no weights).

With `rollout.overlap_collection`, iteration k+1's batch is collected while step k trains: as
soon as batch k is committed, a Prefect task collecting k+1 is submitted to the flow's
thread-pool task runner with a frozen snapshot of the policy of before step k (so batch k+1
is one step off-policy when it is trained on; `algorithm.max_steps_off_policy` drops what is
older, counted in `rollout/stale_dropped`). Batch k+1 is committed (sampling state saved, then
the Parquet write) only when iteration k+1 starts, after step k's checkpoint and record, so a
crash loses at most that uncommitted batch. A doctor rollback discards it (it was sampled by
the policy that was rolled back). Resume with overlap: committed batches are reused as they
were written; the first uncommitted batch is collected again from where sampling stood after
the previous batch (same tasks, same random stream) but by the policy the run resumed with,
which can be one step fresher than in the uninterrupted run; from there the run overlaps again.

Crash-safe and idempotent per (run, iteration): every stage leaves a record in the run folder
(Parquet batch + manifest, validation report, checkpoint, iteration record, evaluation record,
gate decision; see rl_core/runs/records.py), written atomically after its work. Re-running the
flow with the same `run_id` skips what is recorded, reuses a batch already written instead
of collecting again, and continues from the latest checkpoint (and past the iterations
recorded after it without a step).

Runs on Prefect's temporary server by default, or against PREFECT_API_URL when set.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture

from flows.parameters import TrainSettings
from rl_core.config import RunConfig
from rl_core.evaluation import EvalReport
from rl_core.metrics import rollout_metrics
from rl_core.run import TrainingRun, evaluation_due
from rl_core.runs import records as run_records
from rl_core.runs.checkpoint import checkpoint_dir, read_checkpoint_state
from rl_core.store import Manifest
from rl_core.trajectory import Episode
from tasks.collect import collect_rollouts_task
from tasks.curves import publish_curves_task
from tasks.doctor import DoctorVerdict, examine_step_task, examined_untrained, publish_findings_task
from tasks.evaluate import evaluate_checkpoint_task, evaluate_task
from tasks.gate import GateDecision, gate_candidate
from tasks.promote import (
    PromotionResult,
    champion_task,
    download_champion_task,
    promote_task,
    register_checkpoint_task,
    settle_promotion,
)
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
from tasks.validate import report_path, stored_report, validate_trajectories
from tasks.write import write_trajectories_task


@dataclass
class Candidate:
    """An evaluated checkpoint and its registry version."""

    report: EvalReport
    version: str
    step: int


@dataclass
class _Progress:
    manifests: list[Manifest] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    # {"iteration", "by" ("validation" | "trainer"), "reason", "passed"}
    skipped: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    pass_at_1: dict[int, float] = field(default_factory=dict)  # held-out pass@1 of every evaluated step
    records: list[dict[str, Any]] = field(default_factory=list)  # the iterations finished so far, in order
    findings: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None


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


# -- evaluation and registration -----------------------------------------------------------


def _evaluate_once(run: TrainingRun, tracker: Tracker, progress: _Progress, iteration: int) -> EvalReport:
    """Held-out evaluation of the policy's current step: read from its record when it was done
    before; registered in the MLflow registry (steps > 0) before the record gets its version."""
    step = run.policy.version
    recorded = run_records.load_evaluation(run.run_dir, step)
    if recorded is not None and (recorded[1] is not None or step == 0):
        return recorded[0]
    report = recorded[0] if recorded else evaluate_task(run)
    if recorded is None:
        log_metrics_task(tracker, report.metrics, step=iteration)
        run_records.save_evaluation(run.run_dir, step, report)
    progress.pass_at_1[step] = report.pass_at_1
    if step > 0:
        version = _register(run, tracker, progress, report)
        run_records.save_evaluation(run.run_dir, step, report, version)
        progress.candidates.append(Candidate(report, version, step))
    return report


def _starting_evaluation(run: TrainingRun, tracker: Tracker, progress: _Progress) -> EvalReport:
    """The step-0 evaluation: made now for a new run, read back for a continued one."""
    if run.policy.version == 0:
        return _evaluate_once(run, tracker, progress, iteration=0)
    recorded = run_records.load_evaluation(run.run_dir, 0)
    if recorded is None:
        raise FileNotFoundError(
            f"{run_records.evaluation_path(run.run_dir, 0)} is missing: the run's step-0 evaluation was not recorded"
        )
    return recorded[0]


def _register(run: TrainingRun, tracker: Tracker, progress: _Progress, report: EvalReport) -> str:
    lineage = {
        "step": run.policy.version,
        "manifests": list(progress.manifests),
        "validation": list(progress.verdicts),
        "pass_at_1": report.pass_at_1,
        "eval_tasks_hash": task_set_hash(report.task_success),
    }
    return register_checkpoint_task(run.cfg, tracker, checkpoint_dir(run.checkpoints_dir, run.policy.version), lineage)


def _recorded_progress(run: TrainingRun) -> _Progress:
    """What a previous attempt of this run already evaluated: held-out pass@1 per step, and the
    registered candidates."""
    progress = _Progress()
    for step in run_records.evaluated_steps(run.run_dir):
        report, version = run_records.load_evaluation(run.run_dir, step)
        progress.pass_at_1[step] = report.pass_at_1
        if step > 0 and version is not None and step <= run.policy.version:
            progress.candidates.append(Candidate(report, version, step))
    return progress


# -- one iteration ---------------------------------------------------------------------------


class _Batches:
    """Commits each iteration's batch: reused when already written, else collected (now, or ahead in
    the background with `rollout.overlap_collection`), its sampling state saved, then written."""

    def __init__(self, run: TrainingRun, tracker: Tracker):
        self.run, self.tracker = run, tracker
        self.ahead: tuple[int, PrefectFuture] | None = None  # (iteration, its collection running in the background)
        if run.cfg.rollout.overlap_collection and run.last_iteration:
            # the newest checkpoint was saved while the next batch was being sampled: sampling goes on
            # from where it stood after the last finished iteration's batch, not from the checkpoint's copy
            state = run_records.load_sampling_state(run.run_dir, run.last_iteration)
            if state is not None:
                run.restore_sampling_state(state)

    def committed(self, iteration: int) -> bool:
        """Whether `iteration`'s batch is written (or was, and is quarantined with its report)."""
        return (
            self.run.store.exists(self.run.run_id, iteration)
            or report_path(self.run.store, self.run.run_id, iteration).is_file()
        )

    def commit(self, iteration: int) -> None:
        """Make sure the iteration's batch is committed. A reused batch puts sampling back where
        collecting it left it, so the run goes on as if uninterrupted."""
        run = self.run
        if self.committed(iteration):
            state = run_records.load_sampling_state(run.run_dir, iteration)
            if state is None:  # written by something else than this flow: keep the task order at least
                run.work_for(iteration)
            else:
                run.restore_sampling_state(state)
            get_run_logger().info(
                "iteration %d: reusing the batch already written (%s)",
                iteration,
                run.store.path(run.run_id, iteration).name,
            )
            return
        if self.ahead is not None and self.ahead[0] == iteration:
            episodes: list[Episode] = self.ahead[1].result()
            self.ahead = None
        else:
            self.discard()
            episodes = collect_rollouts_task(run, iteration)
        run_records.save_sampling_state(run.run_dir, iteration, run.sampling_state())  # before the batch commits
        log_metrics_task(self.tracker, rollout_metrics(episodes), step=iteration)
        write_trajectories_task(run, iteration, episodes)

    def collect_ahead(self, iteration: int) -> None:
        """With `rollout.overlap_collection`, start collecting `iteration` (when it is within the run and
        not written yet) in the background, sampled by a frozen snapshot of the current policy."""
        run = self.run
        if (
            not run.cfg.rollout.overlap_collection
            or iteration > run.cfg.iterations
            or self.ahead is not None
            or self.committed(iteration)
        ):
            return
        self.ahead = (iteration, collect_rollouts_task.submit(run, iteration, run.sampling_snapshot()))

    def discard(self) -> None:
        """Drop a batch collected ahead that will not be used (never committed): wait for its collection to end."""
        if self.ahead is not None:
            iteration, future = self.ahead
            self.ahead = None
            future.wait()
            get_run_logger().info("iteration %d: the batch collected ahead is dropped (not committed)", iteration)


def _train_iteration(
    run: TrainingRun, tracker: Tracker, progress: _Progress, batches: _Batches, iteration: int
) -> dict[str, Any]:
    """Collect (or reuse), validate and train one iteration; returns its record (not yet saved)."""
    batches.commit(iteration)
    batches.collect_ahead(iteration + 1)  # with overlap_collection: while this batch is validated and trained on
    report = validate_trajectories(str(run.store.root), run.run_id, iteration, run.cfg.validation)
    log_validation_report_task(tracker, report.to_dict(), iteration)
    log_metrics_task(
        tracker,
        {
            "validation/passed": float(report.passed),
            "analysis/zero_var_group_frac": report.zero_variance_group_frac or 0.0,
        },
        step=iteration,
    )
    record: dict[str, Any] = {
        "iteration": iteration,
        "step": run.policy.version,
        "trained": report.passed,
        "reason": report.reason,
    }
    if not report.passed:
        get_run_logger().warning("Iteration %d: training skipped. %s", iteration, report.reason)
        return {**record, "skipped_by": "validation"}
    episodes = run.store.read(run.run_id, iteration)
    metrics, _ = train_step_task(run, iteration, episodes)
    if metrics.skipped:  # nothing to train on, or not finite: recorded, no checkpoint, the run goes on
        step_metrics = metrics.recorded()
        log_metrics_task(tracker, step_metrics, step=iteration)
        return {
            **record,
            "trained": False,
            "skipped_by": "trainer",
            "reason": metrics.skipped,
            **rollout_metrics(episodes),
            **step_metrics,
        }
    log_metrics_task(tracker, metrics.as_dict(), step=iteration)
    return {**record, "step": run.policy.version, **rollout_metrics(episodes), **metrics.as_dict()}


def _record_after_crash(run: TrainingRun, iteration: int) -> dict[str, Any]:
    """The record of an iteration whose checkpoint was saved but whose record was not (the process
    died in between), rebuilt from the stored batch, its validation report and the checkpoint."""
    get_run_logger().warning(
        "iteration %d: checkpoint found without its record (a crash after the checkpoint); rebuilding the record",
        iteration,
    )
    episodes = run.store.read(run.run_id, iteration)
    state = read_checkpoint_state(checkpoint_dir(run.checkpoints_dir, run.policy.version))
    reason = stored_report(run.store, run.run_id, iteration).reason
    return {
        "iteration": iteration,
        "step": run.policy.version,
        "trained": True,
        "reason": reason,
        **rollout_metrics(episodes),
        **state.get("metrics", {}),
    }


def _remember(run: TrainingRun, progress: _Progress, record: dict[str, Any]) -> None:
    kind = run_records.skip_kind(record)
    verdict = {"iteration": record["iteration"], "passed": kind != "validation", "reason": record.get("reason", "")}
    if kind is not None:
        progress.skipped.append({**verdict, "by": kind})
        return
    progress.verdicts.append(verdict)
    progress.manifests.append(run.store.manifest(run.run_id, record["iteration"]))


def _examine(run: TrainingRun, tracker: Tracker, progress: _Progress, record: dict[str, Any]) -> dict[str, Any]:
    """Run the training doctor on the history including `record`; act on a collapse."""
    verdict: DoctorVerdict = examine_step_task(run, [*progress.records, record], progress.pass_at_1, progress.findings)
    progress.findings += verdict.new_findings
    if verdict.new_findings:
        log_metrics_task(
            tracker, {f"doctor/{f['symptom']}": 1.0 for f in verdict.new_findings}, step=record["iteration"]
        )
    record = {**record, "findings": verdict.new_findings, "protected_steps": sorted(run.protected_steps)}
    if verdict.action == "rollback":
        run.roll_back_to(verdict.rollback_to)
        record["rollback_to"] = verdict.rollback_to
    elif verdict.action == "stop":
        record["stopped"] = verdict.reason
    return record


def _replay_recorded_action(run: TrainingRun, progress: _Progress, record: dict[str, Any]) -> None:
    """Re-apply what the doctor decided at a recorded iteration, when a crash may have undone it."""
    progress.findings += record.get("findings", [])
    run.protected_steps = {step for step in record.get("protected_steps", []) if run.can_roll_back_to(step)}
    if (
        record.get("rollback_to") is not None
        and record["step"] == run.policy.version
        and run.checkpoint_iteration == record["iteration"]
    ):
        run.roll_back_to(record["rollback_to"])
    if record.get("stopped"):
        progress.stopped = record["stopped"]


def _final_evaluation(run: TrainingRun, tracker: Tracker, progress: _Progress, before: EvalReport) -> EvalReport:
    """The evaluation of the run's last step (made now if it is missing). After a rollback with no step
    since, the weights are an earlier checkpoint's: its evaluation stands for the end of the run."""
    trained = [r for r in progress.records if r["trained"]]
    if not trained:
        return before
    good_step = trained[-1].get("rollback_to")
    if good_step is not None:
        earlier = [c for c in progress.candidates if c.step <= good_step]
        return earlier[-1].report if earlier else before
    return _evaluate_once(run, tracker, progress, iteration=run.cfg.iterations)


# -- gate -------------------------------------------------------------------------------------

SKIP_WORDS = {"validation": "failed validation", "trainer": "took no optimizer step"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def no_candidate_reason(records: list[dict[str, Any]]) -> str:
    """Why the run has no checkpoint to gate, in words derived from its iteration records."""
    if not records:
        return "no iteration ran"
    trained = [r for r in records if r["trained"]]
    if not trained:
        kinds = Counter(run_records.skip_kind(r) for r in records)
        return (
            "no optimizer step was taken ("
            + ", ".join(f"{_count(n, 'iteration')} {SKIP_WORDS[k]}" for k, n in kinds.items())
            + ")"
        )
    last = trained[-1]
    if last.get("rollback_to") is not None:
        return (
            "the training doctor rolled the policy back to "
            f"step {last['rollback_to']} at iteration {last['iteration']}, "
            "and no checkpoint up to that step was evaluated"
        )
    return "no checkpoint after step 0 was evaluated"


def _champion_pass_at_1(run: TrainingRun, candidate: Candidate) -> tuple[str | None, float | None]:
    """The champion's registry version and its pass@1 on the candidate's tasks (re-evaluated when
    measured on other tasks); (None, None) without a champion."""
    champion, champion_tasks = champion_task(run.cfg)
    if champion is None:
        return None, None
    if champion.version == candidate.version or champion_tasks == task_set_hash(candidate.report.task_success):
        return champion.version, champion.pass_at_1
    with tempfile.TemporaryDirectory(prefix="turnstile-champion-") as scratch:
        folder = download_champion_task(run.cfg, scratch)
        return champion.version, evaluate_checkpoint_task(run, str(folder)).pass_at_1


def _gate(run: TrainingRun, progress: _Progress) -> tuple[Candidate, GateDecision]:
    """Gate the best candidate once per run, and promote it by compare-and-set on the champion
    (`progress.candidates` is not empty: a run without one is not gated, see `no_candidate_reason`).

    The decision is recorded (gate.json, with the champion version it was made against) before
    it is applied; a re-run re-applies the recorded decision, through the same compare-and-set.
    When the champion changed since the decision (another run promoted, or a rollback), the
    candidate is decided again against the new champion (`settle_promotion`), and that decision
    is recorded and applied instead."""
    best = max(progress.candidates, key=lambda c: (c.report.pass_at_1, c.step))
    label = f"version {best.version} (step {best.step})"

    def decide_now() -> GateDecision:
        champion_version, champion_pass_at_1 = _champion_pass_at_1(run, best)
        return gate_candidate(
            best.report.pass_at_1, champion_pass_at_1, run.cfg.gate, champion_version=champion_version, label=label
        )

    def record_and_promote(decision: GateDecision) -> PromotionResult:
        record = {"version": best.version, "step": best.step, "decision": decision.as_dict()}
        if run_records.load_gate(run.run_dir) != record:
            run_records.save_gate(run.run_dir, record)
        return promote_task(run.cfg, best.version, decision, decision.champion_version)

    recorded = run_records.load_gate(run.run_dir)
    if recorded is not None and recorded["version"] == best.version:
        decision = GateDecision(**{k: v for k, v in recorded["decision"].items() if k != "verdict"})
    else:
        decision = decide_now()
    decision, _ = settle_promotion(record_and_promote, decide_now, decision)
    return best, decision


# -- the flow ---------------------------------------------------------------------------------


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
    tracker = start_tracking(run.cfg, run.run_id)
    progress = _recorded_progress(run)
    batches = _Batches(run, tracker)
    try:
        before = _starting_evaluation(run, tracker, progress)
        for iteration in range(1, cfg.iterations + 1):
            if progress.stopped:
                break
            step_before = progress.records[-1]["step"] if progress.records else 0
            record = run_records.load_iteration(run.run_dir, iteration)
            if record is not None:
                _remember(run, progress, record)
                _replay_recorded_action(run, progress, record)
            else:
                crashed = iteration <= run.checkpoint_iteration  # checkpointed, but not recorded
                record = (
                    _record_after_crash(run, iteration)
                    if crashed
                    else _train_iteration(run, tracker, progress, batches, iteration)
                )
                _remember(run, progress, record)
                if cfg.doctor.enabled and (record["trained"] or examined_untrained(record)):
                    record = _examine(run, tracker, progress, record)
                    progress.stopped = record.get("stopped")
                run_records.save_iteration(run.run_dir, record)
            if record.get("rollback_to") is not None:
                batches.discard()  # sampled by the policy just rolled back
            progress.records.append(record)
            due = (
                record["trained"]
                and record.get("rollback_to") is None
                and evaluation_due(step_before, record["step"], cfg.evaluation.val_every)
            )
            if due and iteration < cfg.iterations and record["step"] == run.policy.version and not progress.stopped:
                _evaluate_once(run, tracker, progress, iteration)
        batches.discard()  # a batch collected ahead of a run that stopped
        after = _final_evaluation(run, tracker, progress, before)
        if progress.candidates:
            best, decision = _gate(run, progress)
        else:
            best, decision = None, None
            logger.warning("No candidate to gate: %s.", no_candidate_reason(progress.records))
        publish_findings_task(run.run_id, progress.findings, progress.stopped)
        publish_curves_task(run, tracker)
    except BaseException:
        try:
            batches.discard()
        finally:
            end_tracking(tracker, "FAILED")
        raise
    end_tracking(tracker, "FINISHED")
    return {
        "run_id": run.run_id,
        "iterations": cfg.iterations,
        "iterations_run": len(progress.records),
        "trained_steps": len(progress.manifests),
        "optimizer_steps": run.policy.version,
        "skipped": progress.skipped,
        "no_candidate": None if best else no_candidate_reason(progress.records),
        "stopped": progress.stopped,
        "findings": progress.findings,
        "pass_at_1_before": before.pass_at_1,
        "pass_at_1_after": after.pass_at_1,
        "candidate_version": best.version if best else None,
        "candidate_step": best.step if best else None,
        "gate": decision.as_dict() if decision else None,
        "trajectories": str(run.store.root / run.run_id / "trajectories"),
        "checkpoints": str(run.checkpoints_dir),
        "mlflow_uri": tracking_uri(run.cfg),
        "mlflow_run_id": tracker.mlflow_run_id,
        "registered_model": run.cfg.tracking.registered_model,
    }
