"""What a run has completed, as small JSON records in its folder: the memory a resumed run reads.

Layout under `<storage.run_dir>/<run_id>/` (one writer: the run's process):
- `history/iteration-000003.json`: one `IterationRecord` per finished iteration: "iteration",
  "step" (policy version after it), "trained" (False when the iteration took no optimizer step),
  "skipped_by" (why not: "validation" when its batch failed validation, "trainer" when the batch
  left nothing to train on or the step was not finite; absent in records of runs older than this
  field, which only validation skipped), "reason" (the validation report's sentence, or the
  trainer's reason for skipping), the rollout and train metrics (flat, by metric name), and, once
  the training doctor examined it, "findings", "protected_steps", and "rollback_to" / "stopped"
  when it rolled the policy back or stopped the run. An iteration that took no step has no
  checkpoint: its record and sampling state are what a resume reads;
- `evaluations/step-000010.json`: one `EvaluationRecord` per evaluated step, with the registry
  version once the step's checkpoint is registered;
- `gate.json`: the gate record of the run's candidate ("version", "step", "decision"), with the
  champion version the decision was made against (`decision.champion_version`), so that a
  re-run re-applying it promotes only by compare-and-set on that champion (tasks/promote.py);
- `sampling/iteration-000003.pt`: where sampling stood (random generators, task sampler) right
  after the iteration's batch was collected, saved before the batch is committed, so that a
  re-run reusing the batch continues exactly as if it had collected it, and a resumed run goes
  on after an iteration that took no optimizer step (which has no checkpoint) from there.

Every record is written atomically (rl_core/atomic.py), after the work it records: a record
that exists describes work that is done; a crash leaves the record missing, never half-written.
`rl_core.runs.ledger.RunLedger` loads them once per process and answers what is left to do.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from rl_core.atomic import write_bytes_atomically, write_text_atomically
from rl_core.evaluation import EvalReport

if TYPE_CHECKING:  # rl_core.doctor reads these records: imported where needed, not at import time
    from rl_core.doctor import Finding

HISTORY_DIR = "history"
EVALUATIONS_DIR = "evaluations"
GATE_FILE = "gate.json"
SAMPLING_DIR = "sampling"

SkipKind = Literal["validation", "trainer"]
# Metrics renamed since records were written (issue 10: zero-variance groups): read under the new names.
RENAMED_METRICS = {
    "analysis/zero_adv_groups": "analysis/zero_variance_groups",
    "analysis/zero_adv_groups/all_correct": "analysis/zero_variance_groups/all_correct",
    "analysis/zero_adv_groups/all_wrong": "analysis/zero_variance_groups/all_wrong",
}


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    return write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _is_metric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- iteration records --------------------------------------------------------------------------


@dataclass(frozen=True)
class IterationRecord:
    """One finished iteration (`history/iteration-NNNNNN.json`).

    iteration: 1-based. step: the policy version (optimizer steps taken) after it. trained:
    whether it took an optimizer step; when not, `skipped_by` says which stage skipped it and
    `reason` why (for a trained iteration, `reason` is the validation report's sentence).
    metrics: rollout metrics (`rl_core.metrics.rollout_metrics`) and train metrics
    (`StepMetrics.as_dict` / `recorded()`), by metric name. findings: the training doctor's new
    findings, None when the doctor did not examine it; protected_steps:
    checkpoints kept from pruning after it; rollback_to / stopped: what the doctor did after it.
    """

    iteration: int
    step: int
    trained: bool
    reason: str = ""
    skipped_by: SkipKind | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    findings: list[Finding] | None = None
    protected_steps: list[int] | None = None
    rollback_to: int | None = None
    stopped: str | None = None

    @property
    def skip_kind(self) -> SkipKind | None:
        """Why no optimizer step was taken: "validation" or "trainer"; None when it trained (records
        older than `skipped_by` were only ever skipped by validation)."""
        if self.trained:
            return None
        return self.skipped_by or "validation"

    @property
    def examined_untrained(self) -> bool:
        """Whether an iteration without an optimizer step is still one the doctor examines: its steps
        were skipped as not finite (`train/nonfinite_step` > 0), a fault it names (`nonfinite_step`)."""
        return not self.trained and self.metrics.get("train/nonfinite_step", 0) > 0

    def examined(
        self, findings: list[Finding], protected_steps: list[int], rollback_to: int | None, stopped: str | None
    ) -> IterationRecord:
        """This record with what the training doctor found and did after it."""
        return replace(
            self, findings=findings, protected_steps=protected_steps, rollback_to=rollback_to, stopped=stopped
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of `history/iteration-NNNNNN.json` (metrics flat, by name)."""
        data: dict[str, Any] = {
            "iteration": self.iteration,
            "step": self.step,
            "trained": self.trained,
            "reason": self.reason,
        }
        if self.skipped_by is not None:
            data["skipped_by"] = self.skipped_by
        data.update(self.metrics)
        if self.findings is not None:
            data["findings"] = [finding.as_dict() for finding in self.findings]
        if self.protected_steps is not None:
            data["protected_steps"] = self.protected_steps
        if self.rollback_to is not None:
            data["rollback_to"] = self.rollback_to
        if self.stopped:
            data["stopped"] = self.stopped
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IterationRecord:
        """Read what `to_dict` wrote (or an older record). Raises KeyError without "iteration",
        "step" or "trained"."""
        from rl_core.doctor import Finding

        known = {"iteration", "step", "trained", "reason", "skipped_by", "findings", "protected_steps"}
        known |= {"rollback_to", "stopped"}
        findings = data.get("findings")
        metrics = {RENAMED_METRICS.get(k, k): v for k, v in data.items() if k not in known and _is_metric(v)}
        return cls(
            iteration=int(data["iteration"]),
            step=int(data["step"]),
            trained=bool(data["trained"]),
            reason=data.get("reason") or "",
            skipped_by=data.get("skipped_by"),
            metrics=metrics,
            findings=None if findings is None else [Finding.from_dict(f) for f in findings],
            protected_steps=data.get("protected_steps"),
            rollback_to=data.get("rollback_to"),
            stopped=data.get("stopped") or None,
        )


def history_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / HISTORY_DIR / f"iteration-{iteration:06d}.json"


def save_iteration(run_dir: Path, record: IterationRecord) -> Path:
    """Record a finished iteration (atomically); returns the file."""
    return _write_json(history_path(run_dir, record.iteration), record.to_dict())


def load_iteration(run_dir: Path, iteration: int) -> IterationRecord | None:
    """The record of `iteration`, or None if it has not finished."""
    data = _read_json(history_path(run_dir, iteration))
    return None if data is None else IterationRecord.from_dict(data)


def read_history(run_dir: Path) -> list[IterationRecord]:
    """Every finished iteration's record, in iteration order."""
    folder = Path(run_dir) / HISTORY_DIR
    if not folder.is_dir():
        return []
    return [IterationRecord.from_dict(json.loads(p.read_text())) for p in sorted(folder.glob("iteration-[0-9]*.json"))]


# -- evaluations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationRecord:
    """The held-out evaluation of one step (`evaluations/step-NNNNNN.json`) and the registry version
    of that step's checkpoint (None until it is registered; step 0 is never registered)."""

    step: int
    report: EvalReport
    version: str | None = None


def evaluation_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVALUATIONS_DIR / f"step-{step:06d}.json"


def save_evaluation(run_dir: Path, record: EvaluationRecord) -> Path:
    """Record the held-out evaluation of a step (and its registry version, once registered)."""
    data = {"step": record.step, **record.report.to_dict(), "version": record.version}
    return _write_json(evaluation_path(run_dir, record.step), data)


def load_evaluation(run_dir: Path, step: int) -> EvaluationRecord | None:
    """The recorded evaluation of `step`, or None if it never finished."""
    data = _read_json(evaluation_path(run_dir, step))
    if data is None:
        return None
    return EvaluationRecord(step, EvalReport.from_dict(data), data["version"])


def read_evaluations(run_dir: Path) -> dict[int, EvaluationRecord]:
    """Every recorded evaluation, by step."""
    folder = Path(run_dir) / EVALUATIONS_DIR
    if not folder.is_dir():
        return {}
    steps = sorted(int(p.stem.removeprefix("step-")) for p in folder.glob("step-[0-9]*.json"))
    return {step: record for step in steps if (record := load_evaluation(run_dir, step)) is not None}


# -- gate ---------------------------------------------------------------------------------------


def save_gate(run_dir: Path, data: dict[str, Any]) -> Path:
    """Record the gate decision for the run's candidate: {"version", "step", "decision"}."""
    return _write_json(Path(run_dir) / GATE_FILE, data)


def load_gate(run_dir: Path) -> dict[str, Any] | None:
    return _read_json(Path(run_dir) / GATE_FILE)


# -- sampling state -----------------------------------------------------------------------------


def sampling_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / SAMPLING_DIR / f"iteration-{iteration:06d}.pt"


def save_sampling_state(run_dir: Path, iteration: int, state: dict[str, Any]) -> Path:
    """Record where sampling stood after collecting `iteration` (`Collector.sampling_state`)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes_atomically(sampling_path(run_dir, iteration), buffer.getvalue())


def load_sampling_state(run_dir: Path, iteration: int) -> dict[str, Any] | None:
    path = sampling_path(run_dir, iteration)
    return torch.load(path, weights_only=True) if path.is_file() else None
