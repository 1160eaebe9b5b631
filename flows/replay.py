"""The replay flow: re-validate, re-score, re-train and read stored batches, with no new rollouts.

`replay_flow(ReplaySettings)` selects batches (a run, an iteration range, or manifest paths,
e.g. into quarantine), checks all its input before any work starts (`check_settings`), then
runs the parts asked for, each as a Prefect task (tasks/replay.py):
- re-validation: the current GX suite on every batch, against its stored validation report (one task per batch);
- re-scoring: a scorer (`environment`, `strict` or `package.module:function`), counting success flips;
- re-training: the stored batches replayed into a new run (never into the original);
- transcripts: the named episodes as markdown artifacts.
It publishes a table artifact per part (keys `replay-<run>-<part>`) and returns a JSON-ready
summary. The logic lives in rl_core/replay/; this module only orchestrates and publishes.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl_core.config import load_config
from rl_core.replay import (
    SCORERS,
    EpisodeRef,
    ReplayError,
    ReportComparison,
    StoredBatch,
    ValidationThresholds,
    batch_of_iteration,
    load_scorer,
    retrain_config,
    run_config,
    select_batches,
)
from tasks.links import flow_run_parameter
from tasks.replay import report_word, rescore_task, retrain_task, revalidate_task, transcript_task
from tasks.validate import artifact_slug

RUN_ID_PATTERN = r"^[A-Za-z0-9_.-]+$"


class ReplaySettings(BaseModel):
    """Parameters of the replay flow: which stored batches, and what to do with them."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(
        None,
        pattern=RUN_ID_PATTERN,
        description="Run whose batches to replay: all its committed iterations, or first_iteration..last_iteration.",
    )
    run_dir: str = Field("runs", description="Folder holding the runs (storage.run_dir of the original run).")
    first_iteration: int | None = Field(None, ge=0, description="First iteration to replay (empty: from the first).")
    last_iteration: int | None = Field(None, ge=0, description="Last iteration to replay (empty: to the last).")
    include_quarantined: bool = Field(
        False, description="With run_id: also the run's quarantined batches in the range."
    )
    manifests: list[str] = Field(
        default_factory=list,
        description="Instead of run_id: manifest paths of the batches, "
        "anywhere (e.g. <run>/quarantine/iteration-000003/iteration-000003.manifest.json).",
    )
    revalidate: bool = Field(
        True,
        description="Run the current validation suite on every batch and compare with its stored validation report.",
    )
    validation: ValidationThresholds = Field(
        "original",
        description="Thresholds for re-validation: the original run's validation section, or the one of config_path.",
    )
    config_path: str | None = Field(
        None,
        description="With validation=current: the YAML config whose validation section is used (empty: the shipped "
        "quickstart).",
    )
    scorer: str | None = Field(
        None,
        description=f"Re-score every episode with: {', '.join(SCORERS)}, or a function 'package.module:function' "
        "taking (episode, task) -> float. Empty: no re-scoring.",
    )
    success_threshold: float | None = Field(
        None,
        description="Reward at or above which an episode is a success, before and after re-scoring (empty: the "
        "run's evaluation.success_threshold).",
    )
    examples: int = Field(10, ge=0, description="Flipped episodes listed in the re-scoring report.")
    retrain: bool = Field(
        False, description="Train again on the committed batches, from the run's starting policy, into a new run."
    )
    retrain_overrides: list[str] = Field(
        default_factory=list,
        description="Config changes to try offline when re-training, as section.field=value (e.g. optimizer.lr=1e-4).",
    )
    retrain_run_id: str | None = Field(
        None,
        pattern=RUN_ID_PATTERN,
        description="Name of the re-training run (empty: <run_id>-replay-<time>); its folder must not exist.",
    )
    compare_weights: bool = Field(
        True, description="Compare each re-trained checkpoint with the original run's checkpoint of the same step."
    )
    transcripts: list[EpisodeRef] = Field(
        default_factory=list, description="Episodes of the selected batches to publish as markdown transcripts."
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> "ReplaySettings":
        if not (self.revalidate or self.scorer or self.retrain or self.transcripts):
            raise ValueError("nothing to do: ask for revalidate, a scorer, retrain or transcripts")
        return self


def check_settings(settings: ReplaySettings) -> list[StoredBatch]:
    """The selected batches, after checking every input (ReplayError naming the bad one)."""
    batches = select_batches(
        settings.run_dir,
        settings.run_id,
        settings.first_iteration,
        settings.last_iteration,
        settings.manifests,
        settings.include_quarantined,
    )
    if settings.scorer and settings.scorer not in SCORERS:
        load_scorer(settings.scorer)
    for ref in settings.transcripts:
        batch_of_iteration(batches, ref.iteration)
    if settings.retrain and len({b.run_id for b in batches}) > 1:
        raise ReplayError(
            f"retrain takes the batches of one run; the selection holds runs {sorted({b.run_id for b in batches})}"
        )
    if settings.retrain:  # the overrides build a config (ReplayError naming the bad field)
        source = batches[0]
        retrain_config(
            run_config(source),
            settings.retrain_overrides,
            settings.retrain_run_id or f"{source.run_id}-replay",
            source.run_folder.parent,
        )
    return batches


# -- the flow ----------------------------------------------------------------------------


def replay_flow_run_name() -> str:
    """`replay-<run id>` (the run whose batches are replayed), or `replay-<n>-manifests` for batches given by
    their manifests."""
    settings = flow_run_parameter("settings")
    if getattr(settings, "run_id", None):
        return f"replay-{settings.run_id}"
    return f"replay-{len(getattr(settings, 'manifests', None) or [])}-manifests"


@flow(name="turnstile-replay", flow_run_name=replay_flow_run_name)
def replay_flow(settings: ReplaySettings = ReplaySettings()) -> dict[str, Any]:
    """Re-validate, re-score, re-train or read stored trajectory batches; no new rollouts."""
    logger = get_run_logger()
    batches = check_settings(settings)
    key = f"replay-{artifact_slug(settings.run_id or batches[0].run_id)}"
    logger.info("replaying %d batches: %s", len(batches), ", ".join(b.label for b in batches))
    summary: dict[str, Any] = {
        "batches": [b.label for b in batches],
        "revalidation": None,
        "rescoring": None,
        "retraining": None,
        "transcripts": [],
    }
    if settings.revalidate:
        current = load_config(settings.config_path).validation if settings.validation == "current" else None
        comparisons = [
            revalidate_task.with_options(task_run_name=f"revalidate-{artifact_slug(b.label)}")(
                b, current or run_config(b).validation
            )
            for b in batches
        ]
        _publish_revalidation(comparisons, key)
        summary["revalidation"] = [c.as_dict() for c in comparisons]
    if settings.scorer:
        rescored = rescore_task(batches, settings.scorer, settings.success_threshold)
        summary["rescoring"] = rescored.as_dict(settings.examples)
        _publish_rescoring(summary["rescoring"], key)
    if settings.retrain:
        retrained = retrain_task(batches, settings.retrain_overrides, settings.retrain_run_id, settings.compare_weights)
        summary["retraining"] = retrained.as_dict()
        _publish_retraining(summary["retraining"], key)
    for ref in settings.transcripts:
        summary["transcripts"].append(transcript_task(batch_of_iteration(batches, ref.iteration), ref, key))
    return summary


# -- artifacts ---------------------------------------------------------------------------


def _publish_revalidation(comparisons: list[ReportComparison], key: str) -> None:
    rows = [
        {
            "batch": f"{c.run_id} iteration {c.iteration}",
            "location": "trajectories" if c.committed else "quarantine",
            "stored": report_word(c.stored_passed),
            "now": report_word(c.new_passed),
            "status": c.status,
            "checks changed": ", ".join(c.checks_changed) or "none",
            "reason now": c.new_reason,
        }
        for c in comparisons
    ]
    changed = sum(c.status == "changed" for c in comparisons)
    create_table_artifact(
        table=rows,
        key=f"{key}-revalidation",
        description=f"Re-validation: {changed} of {len(rows)} validation reports changed",
    )


def _publish_rescoring(summary: dict[str, Any], key: str) -> None:
    rows = [{k: str(v) for k, v in tally.items()} for tally in [*summary["per_environment"], summary["total"]]]
    total = summary["total"]
    create_table_artifact(
        table=rows,
        key=f"{key}-rescoring",
        description=f"Re-scoring with {summary['scorer']}: {total['success_to_failure']} "
        f"success->failure, {total['failure_to_success']} "
        "failure->success",
    )
    lines = [f"## Re-scoring with `{summary['scorer']}`", "", f"Thresholds: {summary['thresholds']}", ""]
    lines += ["| flip | batch | episode | task | stored reward | new reward |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {c['flip']} | {c['run_id']} iteration {c['iteration']} | {c['index']} (group `{c['group_id']}` "
        f"sample {c['sample_index']}) "
        f"| {c['task_id']} | {c['stored_reward']:.3f} | {c['new_reward']:.3f} |"
        for c in summary["examples"]
    ]
    lines += ["", *(f"- error: {e}" for e in summary["errors"])]
    create_markdown_artifact(
        markdown="\n".join(lines) + "\n",
        key=f"{key}-rescoring-changes",
        description="Episodes whose success flipped",
    )


def _publish_retraining(summary: dict[str, Any], key: str) -> None:
    rows = [
        {
            "iteration": str(s["iteration"]),
            "step": str(s["step"]),
            "loss": f"no optimizer step: {s['skipped']}" if s.get("skipped") else f"{s['metrics']['train/loss']:.4f}",
            "checkpoint": s["checkpoint"] or "none (no step taken)",
            "matches original": "n/a" if s["matches_original"] is None else str(s["matches_original"]),
            "max |w - original|": "n/a" if s["max_abs_diff"] is None else f"{s['max_abs_diff']:.3g}",
        }
        for s in summary["steps"]
    ]
    create_table_artifact(
        table=rows,
        key=f"{key}-retraining",
        description=f"Re-training {summary['source_run_id']} into {summary['run_id']}",
    )
