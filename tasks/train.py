"""Train stage: one optimizer step on a validated batch, then a checkpoint, as a Prefect task.

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
def train_step_task(run: TrainingRun, iteration: int, episodes: list[Episode]) -> tuple[StepMetrics, Path]:
    """Train on iteration `iteration`'s episodes; returns the step's metrics and the checkpoint folder."""
    get_run_logger().info("iteration %d: training step %d on %d episodes", iteration, run.policy.version + 1, len(episodes))
    metrics = run.train(episodes)
    checkpoint = run.save_checkpoint(iteration, metrics.as_dict())
    get_run_logger().info(
        "step %d: loss %.4f, clip %.3f, kl %.4f, entropy %.3f, grad norm %.3f -> %s",
        metrics.step, metrics.loss, metrics.clip_fraction, metrics.approx_kl, metrics.entropy, metrics.grad_norm, checkpoint.name,
    )
    return metrics, checkpoint
