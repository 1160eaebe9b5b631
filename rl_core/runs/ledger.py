"""The run's ledger: its records loaded once, and what is left to do for each iteration.

A run is crash-safe and idempotent per (run, iteration) because every stage leaves a record
(rl_core/runs/records.py) after its work, and the loop (rl_core/loop.py) asks the ledger, not
the disk, what is done. `work_left(k, checkpoint_iteration)` answers for iteration k:

- "nothing": its iteration record exists (re-apply what the doctor decided after it);
- "record": it is the iteration of the newest checkpoint, whose record was not saved (a crash in
  between): rebuild the record from the stored batch, its validation report and the checkpoint,
  train nothing. An earlier iteration without a record cannot be told apart from one never
  run (the run was trained outside the loop, e.g. through TrainingRun's stage methods): ValueError;
- "train": its batch is committed (or was, and is quarantined with its report): reuse it
  (validate, which keeps a report already reached, then train);
- "collect": nothing of it exists: collect, write, validate, train.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from rl_core.evaluation import EvalReport
from rl_core.gate import GateRecord
from rl_core.runs.records import (
    EvaluationRecord,
    IterationRecord,
    load_gate,
    read_evaluations,
    read_history,
    save_evaluation,
    save_gate,
    save_iteration,
)

WorkLeft = Literal["nothing", "record", "train", "collect"]


class RunLedger:
    """The iteration records, evaluations and gate decision of the run in `run_dir`, read once.

    `batch_committed(k)` says whether iteration k's batch is in the store (committed, or
    quarantined with its validation report). Records written through the ledger are saved
    atomically and kept in memory, so nothing the process wrote is read back."""

    def __init__(self, run_dir: Path, batch_committed: Callable[[int], bool]):
        self.run_dir = Path(run_dir)
        self.batch_committed = batch_committed
        self.iterations: dict[int, IterationRecord] = {r.iteration: r for r in read_history(self.run_dir)}
        self.evaluations: dict[int, EvaluationRecord] = read_evaluations(self.run_dir)
        recorded_gate = load_gate(self.run_dir)
        self.gate: GateRecord | None = None if recorded_gate is None else GateRecord.from_dict(recorded_gate)

    def work_left(self, iteration: int, checkpoint_iteration: int) -> WorkLeft:
        """What is left to do for `iteration`, given the iteration of the newest checkpoint. Raises
        ValueError for an iteration before that checkpoint's without a record (see the module docstring)."""
        if iteration in self.iterations:
            return "nothing"
        if iteration == checkpoint_iteration:
            return "record"
        if iteration < checkpoint_iteration:
            raise ValueError(
                f"iteration {iteration} of run {self.run_dir.name!r} has no record in {self.run_dir / 'history'} "
                f"although the run's newest checkpoint is of iteration {checkpoint_iteration}: the record was "
                "deleted, or the run was trained outside the training loop (e.g. TrainingRun's stage methods); "
                "the loop cannot tell what that iteration did, so continue the run the way it was trained, or "
                "start a new run (another storage.run_id)"
            )
        if self.batch_committed(iteration):
            return "train"
        return "collect"

    def recorded_after(self, iteration: int) -> list[IterationRecord]:
        """The records right after `iteration` of iterations that took no optimizer step (they have no
        checkpoint of their own, so a resume goes past them), in order."""
        done: list[IterationRecord] = []
        while (record := self.iterations.get(iteration + len(done) + 1)) is not None and not record.trained:
            done.append(record)
        return done

    def record_iteration(self, record: IterationRecord) -> Path:
        """Save a finished iteration's record (atomically) and keep it."""
        path = save_iteration(self.run_dir, record)
        self.iterations[record.iteration] = record
        return path

    def evaluation(self, step: int) -> EvaluationRecord | None:
        """The recorded evaluation of `step`, or None."""
        return self.evaluations.get(step)

    def record_evaluation(self, step: int, report: EvalReport, version: str | None = None) -> EvaluationRecord:
        """Save the evaluation of `step` (and its registry version) and keep it."""
        record = EvaluationRecord(step, report, version)
        save_evaluation(self.run_dir, record)
        self.evaluations[step] = record
        return record

    def pass_at_1(self) -> dict[int, float]:
        """Held-out pass@1 of every evaluated step."""
        return {step: record.report.pass_at_1 for step, record in sorted(self.evaluations.items())}

    def record_gate(self, record: GateRecord) -> None:
        """Save the gate decision on the run's candidate (gate.json) unless it is the one recorded."""
        if self.gate != record:
            save_gate(self.run_dir, record.to_dict())
            self.gate = record
