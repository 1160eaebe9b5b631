"""The validation report as the commit point of a batch's validation, and the quarantine of a failed batch.

`settle_validation(store, run_id, iteration, check, table)` is what both forms of the loop's
validate stage do (the Prefect task in tasks/validate.py with the Great Expectations suite, and
`LocalStages` with the caller's validator):
- a report already saved beside the batch is kept (a re-run never validates one batch twice),
  unless it belongs to a batch that was quarantined and the iteration has a new batch;
- else the batch is checked (`check(table)`; `table` is the table the caller just committed, or
  the committed batch read and verified from disk); a batch the store cannot read (corrupt) gets a
  failed report (`unreadable_report`) instead of a crash; the report is saved atomically beside
  the batch before anything moves;
- a failed batch is moved to `quarantine/` (finishing a quarantine a crash cut short) with a copy
  of its report, so that it is no longer listed by `TrajectoryStore.iterations`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from rl_core.store.manifest import CorruptTrajectoryError, TrajectoryNotFoundError
from rl_core.store.trajectory_store import TrajectoryStore
from rl_core.validation_report import ValidationReport, unreadable_report


def settle_validation(
    store: TrajectoryStore,
    run_id: str,
    iteration: int,
    check: Callable[[pa.Table], ValidationReport],
    table: pa.Table | None = None,
) -> ValidationReport:
    """The iteration's validation report, reached once and saved, with a failed batch quarantined.

    check: validates a batch table ([rows] in `TRAJECTORY_SCHEMA`) into a report. table: the batch
    as just committed (`CommittedBatch.table`), or None to read it from disk. Raises
    TrajectoryNotFoundError when the batch is not committed (nor left in quarantine by an earlier
    attempt of this validation), TypeError when `check` returns something else than a ValidationReport."""
    report = store.read_report(run_id, iteration)
    if report is not None and report.quarantined_to is not None and store.exists(run_id, iteration):
        report = None  # that report's batch is in quarantine; this is a new batch of the iteration
    if report is None:
        try:
            report = check(_committed_table(store, run_id, iteration, table))
        except CorruptTrajectoryError as err:
            report = unreadable_report(err)
        if not isinstance(report, ValidationReport):
            raise TypeError(f"the batch's check returned {type(report).__name__}, not a ValidationReport")
        report = replace(
            report, run_id=run_id, iteration=iteration, report_path=str(store.report_path(run_id, iteration))
        )
        store.write_report(run_id, iteration, report)
    if not report.passed and report.quarantined_to is None:
        quarantined = _quarantine(store, run_id, iteration, report.reason)
        report = replace(report, quarantined_to=str(quarantined.parent))
        store.write_report_beside(quarantined, report)
        store.write_report(run_id, iteration, report)
    return report


def _committed_table(store: TrajectoryStore, run_id: str, iteration: int, table: pa.Table | None) -> pa.Table:
    """The table the caller committed, or the committed batch read (and verified) from disk."""
    if table is None:
        return store.read_table(run_id, iteration)
    if not store.exists(run_id, iteration):
        store.manifest(run_id, iteration)  # raises TrajectoryNotFoundError, naming what is missing
    return table


def _quarantine(store: TrajectoryStore, run_id: str, iteration: int, reason: str) -> Path:
    """Quarantine the batch (finishing an interrupted quarantine); returns the quarantined manifest. When
    a crash came after the batch was fully moved but before the report said so, the manifest it moved."""
    if store.exists(run_id, iteration) or store.path(run_id, iteration).exists():
        return store.quarantine(run_id, iteration, reason)
    moved = store.quarantined(run_id, iteration)
    if not moved:
        raise TrajectoryNotFoundError(
            f"run {run_id!r} iteration {iteration}: the batch failed validation but is neither in trajectories/ "
            "nor in quarantine/"
        )
    return moved[-1]
