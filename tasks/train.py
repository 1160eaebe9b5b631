"""Train stage: one training step on a validated batch, then a checkpoint, as a Prefect task.

A step that the trainer skips (its batch leaves nothing to train on, or its loss or gradient
norm is not finite: `StepMetrics.skipped`) moves no weights, so no checkpoint is written; the
training loop records the iteration as finished without a step instead (its iteration record is the
iteration's one commit point: `TrainingRun.save_checkpoint(..., record_skipped=False)`).

No retries: a step that raised may have touched the optimizer state; re-running it blindly
would not give the same update.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.run import TrainingRun
from rl_core.trainer import StepMetrics
from rl_core.trajectory import Episode


@task(name="train-step", cache_policy=NONE)
def train_step_task(run: TrainingRun, iteration: int, episodes: list[Episode]) -> tuple[StepMetrics, Path | None]:
    """Train on iteration `iteration`'s episodes; returns the step's metrics and the checkpoint folder
    (None when the step was skipped: then the policy keeps its version and no checkpoint is written)."""
    logger = get_run_logger()
    start = run.policy.version
    logger.info("iteration %d: training step %d on %d episodes", iteration, start + 1, len(episodes))
    metrics = run.train(episodes)
    checkpoint = run.save_checkpoint(iteration, metrics.as_dict(), record_skipped=False)
    if metrics.skipped or checkpoint is None:
        logger.warning(
            "iteration %d: no optimizer step taken (%s); the policy stays at step %d and no checkpoint is written",
            iteration,
            metrics.skipped or "no optimizer step was taken",
            run.policy.version,
        )
        return metrics, None
    steps = f"step {metrics.step}" if metrics.step == start + 1 else f"steps {start + 1}-{metrics.step}"
    logger.info(
        "%s: loss %.4f, clip %.3f, kl %.4f, entropy %.3f, grad norm %.3f -> %s",
        steps,
        metrics.loss,
        metrics.clip_fraction,
        metrics.approx_kl,
        metrics.entropy,
        metrics.grad_norm,
        checkpoint.name,
    )
    return metrics, checkpoint
