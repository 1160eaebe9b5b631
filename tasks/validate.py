"""Validate stage: the Great Expectations gate between writing a batch and training on it.

Contract of `validate_trajectories(store_root, run_id, iteration, cfg)`:
- reads the committed batch with `TrajectoryStore` and runs `validate_batch` (the GX suite in
  `tasks/validation_suite.py`); a batch the store cannot read (corrupt) is a failed verdict
  whose reason is the store's error, not a crash. A missing batch (`TrajectoryNotFoundError`)
  is a fault and raises.
- always writes the report atomically next to the batch, before moving anything:
  `<store_root>/<run_id>/trajectories/iteration-NNNNNN.validation.json`; a re-run that finds
  it keeps that verdict (so re-running a flow never validates one batch twice);
- on a failed verdict moves the batch to `<store_root>/<run_id>/quarantine/iteration-NNNNNN[-N]/`
  (`TrajectoryStore.quarantine`) and puts a copy of the report there too, so the batch is no
  longer listed by `store.iterations` and training skips it;
- publishes a Prefect table artifact (one row per check) and a markdown artifact with the
  one-sentence reason, and logs the verdict through Prefect's run logger;
- has no retries: a failed validation is a verdict, not a fault. Returns the `ValidationReport`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from rl_core.atomic import write_text_atomically
from rl_core.config import ValidationConfig
from rl_core.store import CorruptTrajectoryError, TrajectoryNotFoundError, TrajectoryStore
from tasks.validation_report import CHECK_ORDER, Check, ValidationReport
from tasks.validation_suite import unreadable_report, validate_batch

__all__ = [
    "CHECK_ORDER",
    "Check",
    "ValidationReport",
    "artifact_key",
    "report_path",
    "validate_batch",
    "validate_trajectories",
]

REPORT_SUFFIX = ".validation.json"


def report_path(store: TrajectoryStore, run_id: str, iteration: int) -> Path:
    """Where the batch's validation report lives: beside its Parquet file."""
    data_path = store.path(run_id, iteration)
    return data_path.with_name(data_path.name.removesuffix(".parquet") + REPORT_SUFFIX)


def artifact_key(run_id: str, iteration: int, kind: str = "validation") -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only)."""
    return f"{kind}-{artifact_slug(run_id)}-iteration-{iteration}"


def artifact_slug(text: str) -> str:
    """`text` as a piece of a Prefect artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "run"


@task(name="validate-trajectories", retries=0, cache_policy=NONE)
def validate_trajectories(store_root: str, run_id: str, iteration: int, cfg: ValidationConfig) -> ValidationReport:
    """Gate one iteration's batch; quarantine it when the verdict is a failure.

    Idempotent: the report, written before anything moves, is the verdict's commit point. A
    re-run finds it, reaches no new verdict and finishes a quarantine a crash cut short."""
    logger = _logger()
    store = TrajectoryStore(store_root)
    path = report_path(store, run_id, iteration)
    report = stored_report(store, run_id, iteration)
    if report is not None and report.quarantined_to is not None and store.exists(run_id, iteration):
        report = None  # that verdict's batch is in quarantine; this is a new batch of the iteration
    if report is None:
        try:
            report = validate_batch(store.read_table(run_id, iteration), cfg)
        except CorruptTrajectoryError as err:
            report = unreadable_report(err)
        report = replace(report, run_id=run_id, iteration=iteration, report_path=str(path))
        write_text_atomically(path, report.to_json())
    if not report.passed and report.quarantined_to is None:
        quarantined = _quarantine(store, run_id, iteration, report.reason)
        report = replace(report, quarantined_to=str(quarantined))
        write_text_atomically(quarantined / path.name, report.to_json())
        write_text_atomically(path, report.to_json())
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


def _quarantine(store: TrajectoryStore, run_id: str, iteration: int, reason: str) -> Path:
    """Quarantine the batch (finishing an interrupted quarantine); when a crash came after the
    batch was fully moved but before the report said so, the folder it went to."""
    if store.exists(run_id, iteration) or store.path(run_id, iteration).exists():
        return store.quarantine(run_id, iteration, reason).parent
    moved = store.quarantined(run_id, iteration)
    if not moved:
        raise TrajectoryNotFoundError(
            f"run {run_id!r} iteration {iteration}: the batch failed validation but is neither in trajectories/ "
            "nor in quarantine/"
        )
    return moved[-1].parent


def stored_report(store: TrajectoryStore, run_id: str, iteration: int) -> ValidationReport | None:
    """The verdict already reached on the iteration's batch, or None if it was never validated."""
    path = report_path(store, run_id, iteration)
    return ValidationReport.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _publish(report: ValidationReport, run_id: str, iteration: int) -> None:
    verdict = "passed" if report.passed else "FAILED"
    create_table_artifact(
        table=report.as_rows(),
        key=artifact_key(run_id, iteration),
        description=f"Trajectory validation {verdict}: {run_id} iteration {iteration}",
    )
    lines = [
        f"## Trajectory validation {verdict}: `{run_id}` iteration {iteration}",
        "",
        report.reason,
        "",
        f"- episodes: {report.rows}",
        f"- failed checks: {', '.join(report.failed_checks) or 'none'}",
        f"- report: `{report.report_path}`",
    ]
    if report.zero_variance_group_frac is not None:
        lines.append(f"- groups with all-equal rewards: {report.zero_variance_group_frac:.1%}")
    if report.quarantined_to:
        lines.append(f"- quarantined to: `{report.quarantined_to}` (training skips this batch)")
    create_markdown_artifact(
        markdown="\n".join(lines) + "\n",
        key=artifact_key(run_id, iteration, kind="validation-summary"),
        description=report.reason,
    )


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called via .fn() outside a flow or task run
        return logging.getLogger(__name__)
