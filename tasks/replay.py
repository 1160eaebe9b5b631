"""Replay tasks: the Prefect tasks of the replay flow (flows/replay.py), one per part of the work.

Each wraps one rl_core.replay function and logs what it found; the flow publishes the artifacts
(apart from `transcript_task`'s per-episode markdown).
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from rl_core.config import ValidationConfig
from rl_core.replay import (
    EpisodeRef,
    ReportComparison,
    RescoreReport,
    RetrainReport,
    StoredBatch,
    compare_reports,
    pick_episode,
    read_episodes,
    render_transcript,
    rescore,
    retrain,
    stored_report,
)
from rl_core.store import CorruptTrajectoryError, TrajectoryStore
from rl_core.validation_report import unreadable_report
from tasks.validation_suite import validate_batch


def report_word(passed: bool | None) -> str:
    """A stored or fresh validation report's outcome as one word: none (never validated), passed or FAILED."""
    return "none" if passed is None else "passed" if passed else "FAILED"


@task(name="revalidate-batch", cache_policy=NONE)
def revalidate_task(batch: StoredBatch, cfg: ValidationConfig) -> ReportComparison:
    """The current suite's validation report on one stored batch, beside the stored one (an unreadable batch fails)."""
    try:
        report = validate_batch(TrajectoryStore.read_manifest_path(batch.manifest_path), cfg)
    except CorruptTrajectoryError as err:
        report = unreadable_report(err)
    comparison = compare_reports(batch, stored_report(batch), report)
    get_run_logger().info(
        "%s: stored %s, now %s (%s). %s",
        batch.label,
        report_word(comparison.stored_passed),
        report_word(comparison.new_passed),
        comparison.status,
        comparison.new_reason,
    )
    return comparison


@task(name="rescore-episodes", cache_policy=NONE)
def rescore_task(batches: list[StoredBatch], scorer: str, threshold: float | None) -> RescoreReport:
    report = rescore(batches, scorer, threshold)
    total = report.total
    get_run_logger().info(
        "scorer %s: %d episodes re-scored, %d success->failure, %d failure->success, %d rewards changed, %d errors",
        scorer,
        total.rescored,
        total.success_to_failure,
        total.failure_to_success,
        total.reward_changed,
        total.errors,
    )
    return report


@task(name="retrain-from-batches", cache_policy=NONE)
def retrain_task(batches: list[StoredBatch], overrides: list[str], run_id: str | None, compare: bool) -> RetrainReport:
    logger = get_run_logger()
    report = retrain(batches, new_run_id=run_id, overrides=overrides, compare=compare, log=logger.info)
    for note in report.notes:
        logger.warning("retrain: %s", note)
    return report


@task(name="render-transcript", cache_policy=NONE)
def transcript_task(batch: StoredBatch, ref: EpisodeRef, key_prefix: str) -> dict[str, Any]:
    index, episode = pick_episode(read_episodes(batch), ref, batch.label)
    create_markdown_artifact(
        markdown=render_transcript(episode, markdown=True),
        key=f"{key_prefix}-transcript-iteration-{batch.iteration}-episode-{index}",
        description=f"Transcript: {batch.label} episode {index}",
    )
    return {"episode": ref.describe(), "batch": batch.label, "index": index, "text": render_transcript(episode)}
