"""The evaluate flow: held-out evaluation of a checkpoint folder, a registry version or the champion.

Contract of `evaluate_flow(settings)`; it evaluates exactly one policy:
- `settings.checkpoint`: a checkpoint folder on the machine that runs the flow (a relative path
  is resolved against the repository root, then the working directory);
- `settings.version`: a version of the registered model `tracking.registered_model`;
- neither: the version holding the alias `champion` (an error when there is none).

The policy is evaluated on the config's held-out split the way the train flow evaluates
(`evaluation.*`: greedy pass@1, and sampled pass@k / pass^k unless `samples` is off). The
evaluation is a run of its own, `run_id` (default `eval-<what>-<UTC time>`), with its folder under
`storage.run_dir` and an MLflow run in the config's tracking store; the metrics are logged there
at the checkpoint's step, tagged with what was evaluated, and published as a Prefect markdown
artifact. A registry version is downloaded into a temporary folder under the run directory,
removed afterwards. Registry versions are read, never changed.

Returns {run_id, evaluated, version, step, pass_at_1, eval_tasks_hash, metrics, mlflow_uri,
mlflow_run_id}.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from pydantic import Field, model_validator

from flows.parameters import RunSettings
from rl_core.config import RunConfig
from rl_core.evaluation import Evaluator
from rl_core.learner import load_start_policy
from rl_core.runs.checkpoint import STATE_FILE
from tasks.evaluate import evaluate_task, tag_evaluation_task
from tasks.promote import (
    CHAMPION_ALIAS,
    checkpoint_step,
    download_registry_version_task,
    read_registry_version_task,
)
from tasks.tracking import (
    end_tracking,
    log_metrics_task,
    start_tracking,
    task_set_hash,
)

EVALUATED_TAG = "turnstile.evaluated"
EVALUATED_VERSION_TAG = "turnstile.evaluated_version"


class EvaluateSettings(RunSettings):
    """Parameters of the evaluate flow: what to evaluate, on the config's held-out tasks."""

    checkpoint: str | None = Field(
        None,
        description="Checkpoint folder to evaluate, e.g. runs/<run_id>/checkpoints/step-000010, on the machine "
        "that runs the flow. "
        "Empty: the registry version below.",
    )
    version: int | None = Field(
        None,
        ge=1,
        description="Version of the registered model (tracking.registered_model) "
        "to evaluate. Empty, and no checkpoint: "
        "the current champion.",
    )
    samples: bool = Field(
        True,
        description="Also sample evaluation.num_samples episodes per task for pass@k and pass^k (slower); off: "
        "greedy pass@1 only.",
    )
    max_tasks: int | None = Field(
        None, ge=1, description="Held-out tasks per environment (evaluation.max_tasks; empty: the config's)."
    )

    @model_validator(mode="after")
    def _one_target(self) -> "EvaluateSettings":
        if self.checkpoint and self.version is not None:
            raise ValueError("give either a checkpoint folder or a registry version to evaluate, not both")
        return self

    def typed_values(self) -> dict[str, Any]:
        extra = {} if self.max_tasks is None else {"evaluation.max_tasks": self.max_tasks}
        return {**extra, **super().typed_values()}


def _policy_config(cfg: RunConfig, policy_path: str, run_id: str) -> RunConfig:
    """`cfg` evaluating the policy at `policy_path` as run `run_id`."""
    return cfg.model_copy(
        update={
            "policy": cfg.policy.model_copy(update={"path": policy_path}),
            "storage": cfg.storage.model_copy(update={"run_id": run_id}),
        }
    )


def _local_checkpoint(cfg: RunConfig, checkpoint: str) -> Path:
    folder = Path(_policy_config(cfg, checkpoint, "probe").resolved_policy_path())
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {checkpoint!r} does not exist on this machine (working directory {Path.cwd()})"
        )
    return folder.resolve()


def _step_of(folder: Path) -> int:
    """The training step a checkpoint folder holds (0 for a plain model folder)."""
    return checkpoint_step(folder) if (folder / STATE_FILE).is_file() else 0


def _default_run_id(what: str) -> str:
    return f"eval-{what}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def _evaluate_folder(cfg: RunConfig, folder: Path, run_id: str, tags: dict[str, str], samples: bool) -> dict[str, Any]:
    """Evaluate the policy in `folder` as run `run_id`, logging to MLflow; returns the summary."""
    run_cfg = _policy_config(cfg, str(folder), run_id)
    policy = load_start_policy(run_cfg)
    policy.version = _step_of(folder)
    evaluator = Evaluator.from_config(run_cfg)
    tracker = start_tracking(run_cfg, run_id)
    try:
        tag_evaluation_task(tracker, tags)
        report = evaluate_task(evaluator, policy, run_id, samples=samples)
        log_metrics_task(tracker, report.metrics, step=policy.version)
    except BaseException:
        end_tracking(tracker, "FAILED")
        raise
    finally:
        evaluator.close()
    end_tracking(tracker, "FINISHED")
    return {
        "run_id": run_id,
        "evaluated": tags[EVALUATED_TAG],
        "version": tags.get(EVALUATED_VERSION_TAG),
        "step": policy.version,
        "pass_at_1": report.pass_at_1,
        "eval_tasks_hash": task_set_hash(report.task_success),
        "metrics": dict(report.metrics),
        "mlflow_uri": tracker.uri,
        "mlflow_run_id": tracker.mlflow_run_id,
    }


@flow(name="turnstile-evaluate")
def evaluate_flow(settings: EvaluateSettings = EvaluateSettings()) -> dict[str, Any]:
    """Evaluate a checkpoint folder, a registry version or the champion on held-out tasks."""
    cfg = settings.load()
    if settings.checkpoint:
        folder = _local_checkpoint(cfg, settings.checkpoint)
        run_id = settings.run_id or _default_run_id(folder.name)
        return _evaluate_folder(cfg, folder, run_id, {EVALUATED_TAG: f"checkpoint {folder}"}, settings.samples)

    registered = read_registry_version_task(cfg, settings.version)
    role = f"{CHAMPION_ALIAS} " if settings.version is None else ""
    tags = {
        EVALUATED_TAG: f"{registered.name} {role}version {registered.version}",
        EVALUATED_VERSION_TAG: registered.version,
    }
    run_id = settings.run_id or _default_run_id(f"{role.strip() or 'version'}-v{registered.version}")
    run_dir = Path(cfg.storage.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".download-") as scratch:
        folder = download_registry_version_task(cfg, registered, scratch)
        return _evaluate_folder(cfg, folder, run_id, tags, settings.samples)
