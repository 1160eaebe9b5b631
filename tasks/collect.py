"""Collect stage: batched multi-turn rollouts for one iteration, as a retryable Prefect task.

A retry re-plays the same training tasks (TrainingRun.work_for memoises them per
iteration). Environment faults inside episodes never reach here (the rollout engine records
them as env_error); what does reach here, e.g. a generation backend that dropped, is retried.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.metrics import rollout_metrics
from rl_core.run import TrainingRun
from rl_core.trajectory import Episode


@task(name="collect-rollouts", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def collect_rollouts_task(run: TrainingRun, iteration: int) -> list[Episode]:
    """Episodes of `iteration` (group_size per task, batched generation)."""
    logger = get_run_logger()
    episodes = run.collect(iteration)
    stats = rollout_metrics(episodes)
    logger.info(
        "iteration %d: %d episodes, reward %.3f, success %.3f, turns %.2f",
        iteration, len(episodes), stats["rollout/reward/mean"], stats["rollout/success/mean"], stats["rollout/turns/mean"],
    )
    return episodes
