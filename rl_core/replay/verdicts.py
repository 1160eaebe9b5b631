"""Verdicts: a batch's stored validation verdict beside a fresh one.

The GX suite itself lives in tasks/, so the caller runs it and passes its ValidationReport dict.

Contracts:
- read-only: `stored_verdict` reads the verdict file beside the batch's manifest, None when
  the batch was never validated;
- `compare_verdicts` compares two ValidationReport dicts: `status` is same, changed, or
  unvalidated (no stored verdict); `checks_changed` names the checks whose pass/fail differs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from rl_core.replay.selection import StoredBatch

# Thresholds a re-validation uses: the original run's validation section, or a current config's.
ValidationThresholds = Literal["original", "current"]


def stored_verdict(batch: StoredBatch) -> dict[str, Any] | None:
    """The validation report stored beside the batch's manifest (a ValidationReport dict), or None."""
    path = batch.verdict_path
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class VerdictComparison:
    """A batch's stored verdict beside a fresh one. `status`: same, changed, or unvalidated (no stored verdict)."""

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


def compare_verdicts(batch: StoredBatch, stored: dict[str, Any] | None, new: dict[str, Any]) -> VerdictComparison:
    """Compare two ValidationReport dicts; `checks_changed` names the checks whose pass/fail differs."""
    before = {c["name"]: c["passed"] for c in stored["checks"]} if stored else {}
    after = {c["name"]: c["passed"] for c in new["checks"]}
    changed = [name for name in before.keys() | after.keys() if before.get(name) != after.get(name)] if stored else []
    return VerdictComparison(
        run_id=batch.run_id,
        iteration=batch.iteration,
        manifest=str(batch.manifest_path),
        committed=batch.committed,
        stored_passed=None if stored is None else bool(stored["passed"]),
        new_passed=bool(new["passed"]),
        stored_reason=None if stored is None else stored["reason"],
        new_reason=new["reason"],
        checks_changed=sorted(set(changed)),
    )
