"""Write stage: one Parquet file + manifest per (run, iteration), atomically, as a Prefect task.

No retries: the store refuses to overwrite a committed batch, and a failed write leaves no
file behind, so a failure here is a disk or data problem for a person to look at.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.run import TrainingRun
from rl_core.store import CommittedBatch
from rl_core.trajectory import Episode


@task(name="write-trajectories", cache_policy=NONE)
def write_trajectories_task(run: TrainingRun, iteration: int, episodes: list[Episode]) -> CommittedBatch:
    """Store the batch; returns what was written (its manifest, with rows and sha256, and the Arrow
    table), so that nothing downstream reads it back."""
    batch = run.commit(iteration, episodes)
    manifest = batch.manifest
    get_run_logger().info(
        "iteration %d: wrote %d rows to %s (sha256 %s)",
        iteration,
        manifest.rows,
        run.store.path(run.run_id, iteration),
        manifest.sha256[:12],
    )
    return batch
