"""The validation report: the data contract between the validation gate and its readers.

The gate (the Great Expectations suite in `tasks/validation_suite.py`) runs one `Check` per
check name and folds them into a `ValidationReport`: passed or failed, with a one-sentence
`reason`. The validate task saves it as JSON beside the batch (`TrajectoryStore.report_path`,
`iteration-NNNNNN.validation.json`) and, for a failed batch, a copy in the quarantine folder;
replay and the training loop read it back through `TrajectoryStore.read_report`. Only the
standard library is needed here, so `rl_core` reads a typed report without the gate's
dependencies (pandas, Great Expectations).

The share of zero-variance groups (groups whose rewards are all equal, so every advantage is
zero and the group carries no learning signal) is reported, not gated.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

# The name of the informational row `ValidationReport.as_rows` adds after the checks.
ZERO_VARIANCE_ROW = "zero_variance_groups"


@dataclass
class Check:
    """One check's outcome: `observed` is JSON-ready (a count, a share, a list of bad values, or
    None when the check could not run), `expected` says in words what passes, `message` is one line."""

    name: str
    passed: bool
    observed: Any
    expected: str
    message: str


@dataclass
class ValidationReport:
    """The validation report on one batch: passed or failed, and why in one sentence (`reason`).

    `rows`: episodes in the batch. `zero_variance_group_frac`: share (0..1) of the batch's
    `groups` whose rewards are all equal, None when not computable (no rows, or no reward or
    group column). `run_id`, `iteration`, `report_path` and `quarantined_to` (the quarantine
    folder of a failed batch) are filled in by the validate task.
    """

    passed: bool
    reason: str
    checks: list[Check]
    rows: int
    zero_variance_group_frac: float | None
    groups: int = 0
    run_id: str | None = None
    iteration: int | None = None
    report_path: str | None = None
    quarantined_to: str | None = None

    @property
    def failed_checks(self) -> list[str]:
        """Names of the failed checks, in report order."""
        return [c.name for c in self.checks if not c.passed]

    def check(self, name: str) -> Check:
        """The check called `name`; raises StopIteration when the report has none."""
        return next(c for c in self.checks if c.name == name)

    def checks_passed(self) -> dict[str, bool]:
        """Check name -> passed."""
        return {c.name: c.passed for c in self.checks}

    def as_rows(self) -> list[dict[str, str]]:
        """One row per check (plus the zero-variance group share), for a Prefect table artifact: check,
        status, message (the plain-English explanation, early so it is on screen), observed, expected."""
        rows = [
            {
                "check": c.name,
                "status": "passed" if c.passed else "FAILED",
                "message": c.message,
                "observed": _display(c.observed),
                "expected": c.expected,
            }
            for c in self.checks
        ]
        frac = self.zero_variance_group_frac
        rows.append(
            {
                "check": ZERO_VARIANCE_ROW,
                "status": "info",
                "message": (
                    "No groups to inspect."
                    if frac is None
                    else f"{frac:.1%} of {self.groups} groups are zero-variance (all rewards equal: no signal)."
                ),
                "observed": "n/a" if frac is None else f"{frac:.1%}",
                "expected": "reported, not gated",
            }
        )
        return rows

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """The report as the JSON text the store saves (indented, one trailing newline)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> ValidationReport:
        """Parse `to_dict`'s output; raises TypeError on unknown or missing fields, KeyError without `checks`."""
        return cls(**{**data, "checks": [Check(**c) for c in data["checks"]]})

    @classmethod
    def from_json(cls, text: str) -> ValidationReport:
        """Parse `to_json`'s output; raises ValueError on bad JSON, TypeError/KeyError like `from_dict`."""
        return cls.from_dict(json.loads(text))


def _display(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    return str(value)


def unreadable_report(error: Exception | str) -> ValidationReport:
    """The failed validation report for a batch the store could not read (e.g. a corrupt file)."""
    text = str(error)
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    check = Check(
        name="batch_readable",
        passed=False,
        observed=text,
        expected="a batch that matches its manifest and the trajectory schema",
        message=first_line,
    )
    return ValidationReport(
        passed=False,
        reason=f"The batch could not be read, so it was not validated: {first_line.rstrip('.')}.",
        checks=[check],
        rows=0,
        zero_variance_group_frac=None,
    )
