"""Validate stage: the Great Expectations gate between writing a batch and training on it.

Contract of `validate_trajectories(store_root, run_id, iteration, cfg, table=None)`:
- runs `validate_batch` (the GX suite in `tasks/validation_suite.py`) on the committed batch:
  on `table` when the caller passes the Arrow table it just committed
  (`TrajectoryStore.commit(...).table`, the table whose bytes the manifest hashes), else on the
  batch read from disk with `TrajectoryStore` (a re-run, another process). A batch the store
  cannot read (corrupt) gets a failed validation report whose reason is the store's error, not
  a crash. A missing batch (`TrajectoryNotFoundError`) is a fault and raises.
- (the commit point and quarantine are `rl_core.store.validation.settle_validation`) always saves
  the validation report atomically beside the batch, before moving anything
  (`TrajectoryStore.write_report`, path `TrajectoryStore.report_path`); a re-run that finds it
  keeps that report (so re-running a flow never validates one batch twice);
- on a failed report moves the batch into quarantine (`TrajectoryStore.quarantine`) and saves a
  copy of the report beside the quarantined manifest, so the batch is no longer listed by
  `store.iterations` and training skips it;
- publishes one Prefect table artifact, `validation-<run>-iter-NNN` (`artifact_key`): one row per
  check with its plain-English message next to its name, under a description that gives the
  outcome, the one-sentence reason and, for a failed batch, where it was quarantined; and logs
  whether the batch passed through Prefect's run logger;
- has no retries: a failed validation is a result, not a fault. Returns the `ValidationReport`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from rl_core.config import ValidationConfig
from rl_core.store import TrajectoryStore
from rl_core.store.validation import settle_validation
from rl_core.validation_report import Check, ValidationReport
from tasks.validation_checks import CHECK_ORDER
from tasks.validation_suite import validate_batch

__all__ = [
    "CHECK_ORDER",
    "Check",
    "ValidationReport",
    "artifact_key",
    "report_path",
    "stored_report",
    "validate_batch",
    "validate_trajectories",
    "validation_description",
]


def report_path(store: TrajectoryStore, run_id: str, iteration: int) -> Path:
    """Where the batch's validation report lives (kept for callers: use `store.report_path`)."""
    return store.report_path(run_id, iteration)


def stored_report(store: TrajectoryStore, run_id: str, iteration: int) -> ValidationReport | None:
    """The validation report saved on the iteration's batch, or None (kept for callers: use `store.read_report`)."""
    return store.read_report(run_id, iteration)


def artifact_key(run_id: str, iteration: int, kind: str = "validation") -> str:
    """The Prefect artifact key of `kind` for one iteration of a run: `<kind>-<run>-iter-NNN` (lowercase
    letters, digits and dashes; the iteration zero-padded to 3 digits, so keys sort by iteration)."""
    return f"{kind}-{artifact_slug(run_id)}-iter-{iteration:03d}"


def artifact_slug(text: str) -> str:
    """`text` as a piece of a Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


@task(name="validate-trajectories", retries=0, cache_policy=NONE)
def validate_trajectories(
    store_root: str, run_id: str, iteration: int, cfg: ValidationConfig, table: pa.Table | None = None
) -> ValidationReport:
    """Validate one iteration's batch; quarantine it when the validation report says it failed.

    `table`: the batch's Arrow table as just committed (`CommittedBatch.table`, N rows in
    `TRAJECTORY_SCHEMA`), validated instead of reading the file again; None reads the committed
    batch from disk (verified against its manifest). Raises TrajectoryNotFoundError when the
    batch is not committed (nor left in quarantine by an earlier attempt of this validation).

    Idempotent: the saved report, written before anything moves, is the validation's commit
    point. A re-run finds it, validates nothing again and finishes a quarantine a crash cut short."""
    logger = _logger()
    report = settle_validation(
        TrajectoryStore(store_root), run_id, iteration, lambda batch: validate_batch(batch, cfg), table
    )
    _publish(report, run_id, iteration)
    if report.passed:
        logger.info("Validation passed for %s iteration %d: %s", run_id, iteration, report.reason)
    else:
        logger.warning(
            "Validation FAILED for %s iteration %d (%s); batch quarantined to %s. %s",
            run_id,
            iteration,
            ", ".join(report.failed_checks),
            report.quarantined_to,
            report.reason,
        )
    return report


def validation_description(report: ValidationReport, iteration: int) -> str:
    """The validation card's description (markdown, shown above its table): the outcome, the reason and,
    for a quarantined batch, where it went."""
    outcome = "passed" if report.passed else "FAILED"
    text = f"**Iteration {iteration}: validation {outcome}.** {report.reason}"
    if report.quarantined_to:
        text += f" Quarantined to `{report.quarantined_to}`; training skips this batch."
    return text


def _publish(report: ValidationReport, run_id: str, iteration: int) -> None:
    create_table_artifact(
        table=report.as_rows(),
        key=artifact_key(run_id, iteration),
        description=validation_description(report, iteration),
    )


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn() outside a flow or task run
        return logging.getLogger(__name__)
