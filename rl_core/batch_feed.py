"""Each iteration's batch, committed once: reused when already written, else collected (now, or
ahead in the background with `rollout.overlap_collection`), its sampling state saved, then written.

Used by the training loop (rl_core/loop.py); `batches` is the same machinery for a caller that
trains on batches itself without writing them (e.g. a benchmark).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from rl_core.metrics import rollout_metrics
from rl_core.runs.records import load_sampling_state, save_sampling_state
from rl_core.stages import Pending, Stages, describe_batch
from rl_core.store import CommittedBatch
from rl_core.trajectory import Episode

if TYPE_CHECKING:
    from rl_core.run import TrainingRun


class BatchFeed:
    """Commits the run's batches through `stages`; holds at most one collection running ahead."""

    def __init__(self, run: TrainingRun, stages: Stages):
        self.run, self.stages = run, stages
        self.ahead: tuple[int, Pending] | None = None  # (iteration, its collection running in the background)
        if run.cfg.rollout.overlap_collection and run.last_iteration:
            # the newest checkpoint was saved while the next batch was being sampled: sampling goes on
            # from where it stood after the last finished iteration's batch, not from the checkpoint's copy
            state = load_sampling_state(run.run_dir, run.last_iteration)
            if state is not None:
                run.collector.restore_sampling_state(state)

    def commit(self, iteration: int, reuse: bool) -> tuple[CommittedBatch, dict[str, float]] | None:
        """Make sure the iteration's batch is committed. `reuse` (the ledger's "train": an earlier attempt
        committed it): put sampling back where collecting it left it, so the run goes on as if
        uninterrupted, and return None. Else collect it (or take the collection running ahead), log its
        rollout metrics (computed once here, `rollout_metrics`), save where sampling stands, write it,
        and return what was written with those metrics."""
        run = self.run
        if reuse:
            state = load_sampling_state(run.run_dir, iteration)
            if state is None:  # written by something else than this loop: keep the task order at least
                run.collector.work_for(iteration)
            else:
                run.collector.restore_sampling_state(state)
            batch_name = run.store.path(run.run_id, iteration).name
            self.stages.log(f"iteration {iteration}: reusing the batch already written ({batch_name})")
            return None
        episodes = self._take(iteration)
        rollout = rollout_metrics(episodes)
        if run.collector.backend is not None:  # the vLLM server: seconds spent pushing weights to it
            rollout |= run.collector.backend.take_metrics()
        self.stages.log_metrics(rollout, iteration)
        self.stages.log(describe_batch(iteration, rollout, len(episodes)))
        save_sampling_state(run.run_dir, iteration, run.collector.sampling_state())  # before the batch commits
        return self.stages.write(iteration, episodes), rollout

    def _take(self, iteration: int) -> list[Episode]:
        """The iteration's episodes: the collection running ahead for it, else collected now."""
        if self.ahead is not None and self.ahead[0] == iteration:
            pending = self.ahead[1]
            self.ahead = None
            return pending.result()
        self.discard()
        return self.stages.collect(iteration)

    def collect_ahead(self, iteration: int, last: int | None = None) -> None:
        """With `rollout.overlap_collection`, start collecting `iteration` (when it is within the run,
        or up to `last`, and not committed yet) in the background, sampled by a frozen snapshot of the
        current policy."""
        run = self.run
        last = run.cfg.iterations if last is None else last
        if (
            not run.cfg.rollout.overlap_collection
            or iteration > last
            or self.ahead is not None
            or run.ledger.batch_committed(iteration)
        ):
            return
        self.ahead = (iteration, self.stages.collect_ahead(iteration, run.learner.snapshot()))

    def discard(self) -> None:
        """Drop a batch collected ahead that will not be used (never committed): wait for its collection to end."""
        if self.ahead is None:
            return
        iteration, pending = self.ahead
        self.ahead = None
        try:
            pending.result()
        except Exception as err:  # noqa: BLE001 - it is dropped either way; say why it failed
            self.stages.log(f"iteration {iteration}: the collection ahead failed ({err})", warning=True)
        self.stages.log(f"iteration {iteration}: the batch collected ahead is dropped (not committed)")

    def batches(self, first: int, last: int) -> Iterator[tuple[int, list[Episode]]]:
        """(iteration, episodes) for iterations first..last, not written. With `rollout.overlap_collection`,
        batch k+1 is collected in the background from a snapshot of the policy while the caller trains
        on batch k (so it arrives one step off-policy); otherwise each is collected in turn."""
        try:
            for iteration in range(first, last + 1):
                episodes = self._take(iteration)
                self.collect_ahead(iteration + 1, last)
                yield iteration, episodes
        finally:
            self.discard()
