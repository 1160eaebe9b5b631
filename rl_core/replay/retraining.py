"""Re-training: replay stored batches through a fresh trainer into a NEW run.

Contracts:
- never writes into an existing run folder: `retrain` refuses one that exists, and writes
  its checkpoints and a `replay.json` lineage record (`REPLAY_RECORD`) into the new one;
- trains only on committed batches whose stored validation report (if any) passed; the rest are
  listed in the report's `skipped`;
- bad input (batches of several runs, nothing usable, a bad override) raises `ReplayError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rl_core.atomic import write_text_atomically
from rl_core.config import RunConfig, apply_overrides, config_differences, config_error_line
from rl_core.replay.revalidation import stored_report
from rl_core.replay.selection import ReplayError, StoredBatch, read_episodes, run_config
from rl_core.run import TrainingRun
from rl_core.runs.checkpoint import checkpoint_dir, checkpoints_dir, read_checkpoint_state
from rl_core.store import TrajectoryStore

REPLAY_RECORD = "replay.json"


@dataclass
class RetrainStep:
    """One replayed training step; `max_abs_diff` compares with the original run's checkpoint of the same step,
    when that checkpoint was also written after this iteration (a change of optimizer steps per batch,
    `optimizer.mini_batches_per_step` / `epochs_per_batch`, puts other iterations at that step).
    `skipped`: the trainer's reason when the batch took no optimizer step (nothing to train on, or not
    finite; `StepMetrics.skipped`): then `step` is the policy's unchanged version and there is no checkpoint."""

    iteration: int
    step: int
    checkpoint: str | None
    metrics: dict[str, float]
    original_checkpoint: str | None = None
    max_abs_diff: float | None = None
    skipped: str | None = None

    @property
    def matches_original(self) -> bool | None:
        return None if self.max_abs_diff is None else self.max_abs_diff == 0.0


@dataclass
class RetrainReport:
    """A re-training run: where it lives, what it changed, what it trained on."""

    run_id: str
    source_run_id: str
    run_folder: str
    overrides: list[str]
    changed_fields: list[str]
    steps: list[RetrainStep] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        steps = [{**asdict(s), "matches_original": s.matches_original} for s in self.steps]
        return {**asdict(self), "steps": steps}


def retrain(
    batches: list[StoredBatch],
    *,
    new_run_id: str | None = None,
    overrides: Iterable[str] = (),
    compare: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> RetrainReport:
    """Train again on stored batches, in iteration order, from the original run's starting policy.

    Uses the original config (plus `overrides`, `section.field=value`) and the stored
    `behavior_logprobs` as pi_old (what `Trainer.step` does), with log-probs taken at each
    episode's stored sampling temperature (its `sampling` record; batches of schema version 1
    have none and are trained at the config's `rollout.temperature`, which the notes say). Only committed batches whose
    stored validation report (if any) passed are trained on; the rest are listed in `skipped`. Writes
    checkpoints into `<run_dir>/<new_run_id>/` (a folder that must not exist yet) beside a
    `replay.json` lineage record. With `compare`, each step's weights are compared with the
    original checkpoint of the same step, when it was kept and written after the same iteration:
    with no overrides, all batches from iteration 1 and a synchronous original, they are equal (on
    the same hardware and backend).
    """
    runs = sorted({b.run_id for b in batches})
    if len(runs) != 1:
        raise ReplayError(f"re-training takes the batches of one run; the selection holds runs {runs}")
    source = batches[0]
    source_cfg = run_config(source)
    usable, skipped = _training_batches(batches)
    root = source.run_folder.parent
    new_run_id = new_run_id or f"{source.run_id}-replay-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if (root / new_run_id).exists():
        raise ReplayError(f"run folder {root / new_run_id} already exists; re-training writes only into a new run")
    overrides = list(overrides)
    cfg = retrain_config(source_cfg, overrides, new_run_id, root)
    report = RetrainReport(
        new_run_id,
        source.run_id,
        str(root / new_run_id),
        overrides,
        [f for f in config_differences(source_cfg, cfg) if not f.startswith("storage.")],
        skipped=skipped,
        notes=_retrain_notes(source_cfg, usable, overrides, cfg.rollout.temperature),
    )
    run = TrainingRun(cfg)
    try:
        _write_lineage(run, report, usable)
        for batch in usable:
            version = run.policy.version
            metrics = run.train(read_episodes(batch))
            checkpoint = run.save_checkpoint(batch.iteration) if run.policy.version != version else None
            step = RetrainStep(
                batch.iteration,
                run.policy.version,
                str(checkpoint) if checkpoint else None,
                metrics.as_dict(),
                skipped=metrics.skipped,
            )
            original = checkpoint_dir(checkpoints_dir(source.run_folder), step.step)
            if (
                compare
                and checkpoint is not None
                and original.is_dir()
                and _checkpoint_iteration(original, batch.iteration) == batch.iteration
            ):
                step.original_checkpoint, step.max_abs_diff = str(original), weights_difference(checkpoint, original)
            report.steps.append(step)
            if step.skipped:
                log(
                    f"iteration {batch.iteration}: no optimizer step ({step.skipped}); "
                    f"the policy stays at step {step.step}"
                )
                continue
            log(
                f"iteration {batch.iteration}: step {step.step}, loss {metrics.loss:.4f}"
                + ("" if step.max_abs_diff is None else f", max |w - original| = {step.max_abs_diff:.3g}")
            )
    finally:
        run.close()  # e.g. the learner's ranks (trainer.num_processes > 1)
    return report


def _checkpoint_iteration(folder: Path, default: int) -> int:
    """The iteration after which a checkpoint was written (`default` for a checkpoint that does not say)."""
    return int(read_checkpoint_state(folder).get("iteration", default))


def retrain_config(source: RunConfig, overrides: list[str], run_id: str, run_dir: Path) -> RunConfig:
    """The original config with `overrides` applied, stored as run `run_id` under `run_dir`."""
    try:
        cfg = RunConfig.model_validate(apply_overrides(source.model_dump(mode="json"), list(overrides)))
    except ValueError as err:
        raise ReplayError(f"bad retrain override(s) {overrides}: {config_error_line(err)}") from err
    return cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"run_id": run_id, "run_dir": str(run_dir)})}
    )


def weights_difference(a: str | Path, b: str | Path) -> float:
    """Largest absolute difference between the weights saved in two checkpoint folders.

    inf if their tensors differ in name or shape."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, Any]:
        return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(f).items()}

    left, right = tensors(Path(a)), tensors(Path(b))
    if left.keys() != right.keys() or any(left[k].shape != right[k].shape for k in left):
        return math.inf
    return max(
        (float((left[k].double() - right[k].double()).abs().max()) for k in left if left[k].numel()), default=0.0
    )


def _training_batches(batches: list[StoredBatch]) -> tuple[list[StoredBatch], list[dict[str, Any]]]:
    usable, skipped = [], []
    for batch in sorted(batches, key=lambda b: b.iteration):
        report = stored_report(batch)
        if not batch.committed:
            skipped.append({"iteration": batch.iteration, "reason": f"quarantined ({batch.manifest_path.parent})"})
        elif report is not None and not report.passed:
            skipped.append(
                {"iteration": batch.iteration, "reason": f"stored validation report failed: {report.reason}"}
            )
        else:
            usable.append(batch)
    if not usable:
        raise ReplayError(
            f"nothing to re-train on: no committed batch that passed validation among {[b.label for b in batches]}"
        )
    return usable, skipped


def _retrain_notes(cfg: RunConfig, usable: list[StoredBatch], overrides: list[str], temperature: float) -> list[str]:
    notes = []
    if usable[0].iteration != 1:
        notes.append(
            f"starts at iteration {usable[0].iteration}: comparable with the original only if it trained "
            "on no earlier batch"
        )
    if cfg.rollout.overlap_collection:
        notes.append("the original collected with rollout.overlap_collection (one step off-policy)")
    if cfg.doctor.enabled and cfg.doctor.on_collapse == "rollback":
        notes.append(
            "the original may have rolled back after a collapse (doctor.on_collapse=rollback); re-training "
            "never rolls back"
        )
    if overrides:
        notes.append(f"config changed by {overrides}: weights are expected to differ from the original")
    unrecorded = [b.iteration for b in usable if TrajectoryStore.manifest_at(b.manifest_path).schema_version < 2]
    if unrecorded:
        notes.append(
            f"iterations {unrecorded} were stored without the token sampler's settings (trajectory schema version 1): "
            f"they are trained at rollout.temperature={temperature}, the others at their stored temperature"
        )
    return notes


def _write_lineage(run: TrainingRun, report: RetrainReport, usable: list[StoredBatch]) -> None:
    sources = []
    for batch in usable:
        manifest = TrajectoryStore.manifest_at(batch.manifest_path)
        sources.append(
            {
                "iteration": batch.iteration,
                "manifest": str(batch.manifest_path),
                "sha256": manifest.sha256,
                "rows": manifest.rows,
            }
        )
    record = {
        "replay_of": report.source_run_id,
        "overrides": report.overrides,
        "changed_fields": report.changed_fields,
        "batches": sources,
    }
    write_text_atomically(run.run_dir / REPLAY_RECORD, json.dumps(record, indent=2) + "\n")
