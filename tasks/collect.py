"""Collect stage: batched multi-turn rollouts for one iteration, as a retryable Prefect task.

A retry re-plays the same training tasks (`Collector.work_for` memoises them per
iteration). Environment faults inside episodes never reach here (the rollout engine records
them as env_error); what does reach here, e.g. a generation backend that dropped, is retried.
With `rollout.overlap_collection` the train flow submits this task for iteration k+1 with a
frozen snapshot of the policy (`Learner.snapshot`) while step k trains. The batch's metrics are
computed once, by the loop, after it is committed.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.model.policy import Policy
from rl_core.run import TrainingRun
from rl_core.trajectory import Episode


@task(name="collect-rollouts", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def collect_rollouts_task(run: TrainingRun, iteration: int, policy: Policy | None = None) -> list[Episode]:
    """Episodes of `iteration` (group_size per task, batched generation), sampled by the run's policy
    or by `policy` (a snapshot that samples while the run's policy trains)."""
    episodes = run.collect(iteration) if policy is None else run.collect(iteration, policy)
    get_run_logger().info(
        "iteration %d: collected %d episodes%s",
        iteration,
        len(episodes),
        "" if policy is None else f" (sampled in the background by the policy of step {policy.version})",
    )
    return episodes
