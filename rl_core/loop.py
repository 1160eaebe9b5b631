"""The training loop: N iterations of collect -> write -> validate -> train -> examine -> evaluate.

One loop for the Prefect flow (flows/train.py, whose stages are Prefect tasks) and the Python API
(`TrainingRun.run`, with `LocalStages`). Per iteration it asks the run's ledger what is left to
do (rl_core/runs/ledger.py) and does only that:

- collect (or take the batch collected ahead), save where sampling stands, commit the batch;
  with `rollout.overlap_collection`, start collecting iteration k+1 with a frozen snapshot of
  the policy as soon as batch k is committed (batch k+1 is then one step off-policy;
  `algorithm.max_steps_off_policy` drops what is older). Batch k+1 is committed only when
  iteration k+1 starts, after step k's checkpoint and record, so a crash loses at most that
  uncommitted batch;
- validate; a failed batch is quarantined and the iteration takes no step ("skipped_by":
  "validation"); train on exactly the episodes of the committed table (never re-read);
- a step that leaves nothing to train on, or is not finite, takes no optimizer step ("skipped_by":
  "trainer"), writes no checkpoint, and the run goes on;
- the training doctor examines the step (rl_core/doctor) and its decision is applied: protect
  checkpoints, roll back (a batch collected ahead by the rolled-back policy is dropped), or stop;
- the iteration record is saved; the policy is evaluated when its step count passes a multiple
  of `evaluation.val_every`, and each evaluated step > 0 is registered.

Resume: a recorded iteration is not redone (its doctor action is re-applied when a crash may
have undone it); a checkpoint without its record gets the record rebuilt; a committed batch is
reused and sampling is put back where collecting it left it. With overlap, the first
uncommitted batch is collected again from where sampling stood after the previous batch, by the
policy the run resumed with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from rl_core.batch_feed import BatchFeed
from rl_core.doctor import Finding
from rl_core.evaluation import EvalReport
from rl_core.gate import Candidate, no_candidate_reason
from rl_core.learner import load_start_policy
from rl_core.metrics import rollout_metrics
from rl_core.run import TrainingRun
from rl_core.runs.records import IterationRecord, evaluation_path
from rl_core.stages import Stages
from rl_core.store import Manifest


def evaluation_due(step_before: int, step_after: int, val_every: int) -> bool:
    """Whether an iteration that moved the policy from version `step_before` to `step_after` passed a
    multiple of `val_every` (evaluation.val_every counts optimizer steps, and an iteration may take
    several: optimizer.mini_batches_per_step, or none)."""
    return step_after // val_every > step_before // val_every


@dataclass
class LoopResult:
    """What the loop did. records: every iteration's record, in order. manifests: those of the trained
    batches, in order (their lineage). candidates: evaluated steps > 0 with their registry versions.
    pass_at_1: held-out pass@1 by evaluated step (all held-out tasks: the curves, the summary).
    selection_pass_at_1: pass@1 on the selection part of the held-out split by evaluated step: what the
    training doctor reads, since its rollbacks choose a checkpoint and must not see the gate tasks.
    findings: the doctor's findings. stopped: why the doctor stopped the run. before / after: the
    held-out evaluations of the start and of the end."""

    records: list[IterationRecord] = field(default_factory=list)
    manifests: list[Manifest] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    pass_at_1: dict[int, float] = field(default_factory=dict)
    selection_pass_at_1: dict[int, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    stopped: str | None = None
    before: EvalReport | None = None
    after: EvalReport | None = None

    def note_evaluation(self, step: int, report: EvalReport) -> None:
        """Keep the pass@1 of an evaluated step (all tasks, and the selection part)."""
        self.pass_at_1[step] = report.pass_at_1
        self.selection_pass_at_1[step] = report.selection_pass_at_1

    @property
    def skipped(self) -> list[IterationRecord]:
        """The iterations that took no optimizer step, in order."""
        return [record for record in self.records if not record.trained]

    def validation_lineage(self) -> list[dict[str, Any]]:
        """The validation reports of the trained batches, as registered with a checkpoint:
        {"iteration", "passed", "reason"}, in the order of `manifests`."""
        return [{"iteration": r.iteration, "passed": True, "reason": r.reason} for r in self.records if r.trained]

    def summary(self) -> dict[str, Any]:
        """The run's outcome as JSON-ready data: iterations run, trained steps, the skipped iterations
        ({"iteration", "passed", "reason", "by"}), why there is no candidate (None when there is one),
        why the doctor stopped, its findings, held-out pass@1 before and after. Raises ValueError before
        the loop has run."""
        if self.before is None or self.after is None:
            raise ValueError("the loop has not run: there is nothing to summarise")
        return {
            "iterations_run": len(self.records),
            "trained_steps": len(self.manifests),
            "skipped": [
                {"iteration": r.iteration, "passed": r.skip_kind != "validation", "reason": r.reason, "by": r.skip_kind}
                for r in self.skipped
            ],
            "no_candidate": None if self.candidates else no_candidate_reason(self.records),
            "stopped": self.stopped,
            "findings": [finding.as_dict() for finding in self.findings],
            "pass_at_1_before": self.before.pass_at_1,
            "pass_at_1_after": self.after.pass_at_1,
        }


class TrainingLoop:
    """Runs `run`'s iterations through `stages` (see the module docstring)."""

    def __init__(self, run: TrainingRun, stages: Stages):
        self.run, self.stages = run, stages
        self.feed = BatchFeed(run, stages)
        self.result = self._recorded()

    def _recorded(self) -> LoopResult:
        """What a previous attempt of this run already evaluated: pass@1 per step, registered candidates."""
        result = LoopResult()
        for step, record in self.run.ledger.evaluations.items():
            result.note_evaluation(step, record.report)
            if step > 0 and record.version is not None and step <= self.run.policy.version:
                result.candidates.append(Candidate(record.report, record.version, step))
        return result

    def run_iterations(self) -> LoopResult:
        """Evaluate the start, run iterations `1..cfg.iterations` (doing only what is left), evaluate the end."""
        run, result, cfg = self.run, self.result, self.run.cfg
        try:
            result.before = self._starting_evaluation()
            for iteration in range(1, cfg.iterations + 1):
                if result.stopped:
                    break
                step_before = result.records[-1].step if result.records else 0
                record = self._iteration(iteration)
                if record.rollback_to is not None:
                    self.feed.discard()  # sampled by the policy just rolled back
                result.records.append(record)
                due = (
                    record.trained
                    and record.rollback_to is None
                    and evaluation_due(step_before, record.step, cfg.evaluation.val_every)
                )
                if due and iteration < cfg.iterations and record.step == run.policy.version and not result.stopped:
                    self._evaluate_once(iteration)
            self.feed.discard()  # a batch collected ahead of a run that stopped
            result.after = self._final_evaluation()
        except BaseException:
            self.feed.discard()
            raise
        return result

    # -- one iteration ------------------------------------------------------------------------

    def _iteration(self, iteration: int) -> IterationRecord:
        run, result = self.run, self.result
        work = run.ledger.work_left(iteration, run.checkpoint_iteration)
        if work == "nothing":
            record = run.ledger.iterations[iteration]
            self._remember(record, None)
            self._reapply(record)
            return record
        if work == "record":
            record, manifest = self._record_after_crash(iteration)
        else:
            record, manifest = self._train(iteration, reuse=work == "train")
        self._remember(record, manifest)
        if run.cfg.doctor.enabled and (record.trained or record.examined_untrained):
            record = self._examine(record)
            result.stopped = record.stopped
        run.ledger.record_iteration(record)
        return record

    def _train(self, iteration: int, reuse: bool) -> tuple[IterationRecord, Manifest | None]:
        """Commit (or `reuse`) the batch, validate it and train on it; the record is not saved yet."""
        run, stages = self.run, self.stages
        committed = self.feed.commit(iteration, reuse)
        batch, rollout = committed if committed is not None else (None, None)
        self.feed.collect_ahead(iteration + 1)  # with overlap_collection: while this batch is validated and trained
        checked = stages.validate(iteration, batch)
        stages.log_metrics({"validation/passed": float(checked.passed)}, iteration)
        record = IterationRecord(iteration, run.policy.version, trained=checked.passed, reason=checked.reason)
        if not checked.passed:
            stages.log(f"Iteration {iteration}: training skipped. {checked.reason}", warning=True)
            return replace(record, skipped_by="validation"), None
        if batch is None:  # committed by an earlier attempt
            batch = run.stored_batch(iteration)
            rollout = rollout_metrics(batch.episodes)
        metrics = stages.train(iteration, batch.episodes)
        if metrics.skipped:  # nothing to train on, or not finite: recorded, no checkpoint, the run goes on
            step_metrics = metrics.recorded()
            stages.log_metrics(step_metrics, iteration)
            skipped = replace(record, trained=False, skipped_by="trainer", reason=metrics.skipped)
            return replace(skipped, metrics={**rollout, **step_metrics}), None
        stages.log_metrics(metrics.as_dict(), iteration)
        return replace(record, step=run.policy.version, metrics={**rollout, **metrics.as_dict()}), batch.manifest

    def _record_after_crash(self, iteration: int) -> tuple[IterationRecord, Manifest]:
        """The record of an iteration whose checkpoint was saved but whose record was not (the process
        died in between), rebuilt from the stored batch, its validation report and the checkpoint."""
        run = self.run
        self.stages.log(
            f"iteration {iteration}: checkpoint found without its record (a crash after the checkpoint); "
            "rebuilding the record",
            warning=True,
        )
        batch = run.stored_batch(iteration)
        report = run.store.read_report(run.run_id, iteration)
        metrics = {**rollout_metrics(batch.episodes), **run.learner.checkpoint_metrics()}
        record = IterationRecord(iteration, run.policy.version, True, report.reason if report else "", metrics=metrics)
        return record, batch.manifest

    def _remember(self, record: IterationRecord, manifest: Manifest | None) -> None:
        """Add a trained iteration's batch to the lineage (its manifest: held, or read for a recorded one)."""
        if record.trained:
            self.result.manifests.append(manifest or self.run.store.manifest(self.run.run_id, record.iteration))

    def _examine(self, record: IterationRecord) -> IterationRecord:
        """Run the training doctor on the history including `record`; apply its decision."""
        run, result = self.run, self.result
        reported = {f.symptom for f in result.findings}
        decision = self.stages.examine(
            [*result.records, record], result.selection_pass_at_1, reported, run.learner.rollback_targets()
        )
        result.findings += decision.new_findings
        if decision.new_findings:
            symptoms = {f"doctor/{f.symptom}": 1.0 for f in decision.new_findings}
            self.stages.log_metrics(symptoms, record.iteration)
        if record.trained:
            run.learner.protected_steps = set(decision.protected_steps)
        if decision.action == "rollback":
            run.learner.roll_back_to(decision.rollback_to)
        rollback_to = decision.rollback_to if decision.action == "rollback" else None
        protected = sorted(run.learner.protected_steps)
        return record.examined(decision.new_findings, protected, rollback_to, decision.stopped)

    def _reapply(self, record: IterationRecord) -> None:
        """Re-apply what the doctor decided at a recorded iteration, when a crash may have undone it."""
        run = self.run
        self.result.findings += record.findings or []
        targets = run.learner.rollback_targets()
        run.learner.protected_steps = {step for step in record.protected_steps or [] if step in targets}
        if (
            record.rollback_to is not None
            and record.step == run.policy.version
            and run.checkpoint_iteration == record.iteration
        ):
            run.learner.roll_back_to(record.rollback_to)
        if record.stopped:
            self.result.stopped = record.stopped

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate_once(self, iteration: int) -> EvalReport:
        """Held-out evaluation of the policy's current step: read from its record when it was done
        before; registered (steps > 0) before the record gets its version."""
        run, result = self.run, self.result
        step = run.policy.version
        recorded = run.ledger.evaluation(step)
        if recorded is not None and (recorded.version is not None or step == 0):
            return recorded.report
        report = recorded.report if recorded else self.stages.evaluate(run.policy)
        if recorded is None:
            self.stages.log_metrics(report.metrics, iteration)
            run.ledger.record_evaluation(step, report)
        result.note_evaluation(step, report)
        if step > 0:
            version = self.stages.register(step, report, list(result.manifests), result.validation_lineage())
            run.ledger.record_evaluation(step, report, version)
            result.candidates.append(Candidate(report, version, step))
        return report

    def _starting_evaluation(self) -> EvalReport:
        """The step-0 evaluation: made now for a new run, read from its record for a continued one. A
        continued run whose step-0 record is gone evaluates its starting policy again (the same
        weights and seeds give the same report) and records it."""
        run = self.run
        if run.policy.version == 0:
            return self._evaluate_once(iteration=0)
        recorded = run.ledger.evaluation(0)
        if recorded is not None:
            return recorded.report
        self.stages.log(
            f"{evaluation_path(run.run_dir, 0)} is missing: evaluating the starting policy again", warning=True
        )
        report = self.stages.evaluate(load_start_policy(run.cfg))
        self.stages.log_metrics(report.metrics, 0)
        run.ledger.record_evaluation(0, report)
        self.result.note_evaluation(0, report)
        return report

    def _final_evaluation(self) -> EvalReport:
        """The evaluation of the run's last step (made now if it is missing). After a rollback with no step
        since, the weights are an earlier checkpoint's: its evaluation stands for the end of the run."""
        result = self.result
        trained = [r for r in result.records if r.trained]
        if not trained:
            return result.before
        good_step = trained[-1].rollback_to
        if good_step is not None:
            earlier = [c for c in result.candidates if c.step <= good_step]
            return earlier[-1].report if earlier else result.before
        return self._evaluate_once(iteration=self.run.cfg.iterations)
