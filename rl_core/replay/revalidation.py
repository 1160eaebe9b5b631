"""Re-validation: a batch's stored validation report beside a fresh one.

The GX suite itself lives in tasks/, so the caller runs it and passes the fresh `ValidationReport`.

Contracts:
- read-only: `stored_report` asks the store for the validation report saved beside the batch's
  manifest (in `trajectories/`, or the copy in quarantine), None when the batch was never validated;
- `compare_reports` puts two validation reports side by side in a `ReportComparison`: `status`
  is same, changed, or unvalidated (no stored report); `checks_changed` names the checks whose
  pass/fail differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from rl_core.replay.selection import StoredBatch
from rl_core.store import TrajectoryStore
from rl_core.validation_report import ValidationReport

# Thresholds a re-validation uses: the original run's validation section, or a current config's.
ValidationThresholds = Literal["original", "current"]


def stored_report(batch: StoredBatch) -> ValidationReport | None:
    """The validation report saved beside the batch's manifest, or None if it was never validated."""
    return TrajectoryStore.read_report_beside(batch.manifest_path)


@dataclass
class ReportComparison:
    """A batch's stored validation report beside a fresh one.

    `stored_passed` / `stored_reason`: None when the batch was never validated. `status`: same,
    changed, or unvalidated. `checks_changed`: sorted names of the checks whose pass/fail differs
    (a check present in only one report counts as changed; empty when unvalidated)."""

    run_id: str
    iteration: int
    manifest: str
    committed: bool
    stored_passed: bool | None
    new_passed: bool
    stored_reason: str | None
    new_reason: str
    checks_changed: list[str]

    @property
    def status(self) -> str:
        if self.stored_passed is None:
            return "unvalidated"
        return "same" if self.stored_passed == self.new_passed else "changed"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def compare_reports(batch: StoredBatch, stored: ValidationReport | None, new: ValidationReport) -> ReportComparison:
    """Compare the stored validation report (None: never validated) with a fresh one on the same batch."""
    before = stored.checks_passed() if stored else {}
    after = new.checks_passed()
    changed = [name for name in before.keys() | after.keys() if before.get(name) != after.get(name)] if stored else []
    return ReportComparison(
        run_id=batch.run_id,
        iteration=batch.iteration,
        manifest=str(batch.manifest_path),
        committed=batch.committed,
        stored_passed=None if stored is None else bool(stored.passed),
        new_passed=bool(new.passed),
        stored_reason=None if stored is None else stored.reason,
        new_reason=new.reason,
        checks_changed=sorted(set(changed)),
    )
