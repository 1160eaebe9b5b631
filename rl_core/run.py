"""A training run assembled from a RunConfig: its parts, and the whole loop from Python, no orchestrator.

`TrainingRun(cfg)` builds the run's parts, each with one job:
- the run folder and its records: `run_dir`, `ledger` (rl_core/runs/: folder.py, records.py,
  ledger.py), `store` (rl_core/store);
- `collector` (rl_core/collector.py): the task sampler, the token sampler's random stream and the
  rollouts of each iteration;
- `learner` (rl_core/learner.py): the policy, its trainer and checkpoints, rollback;
- `evaluator` (rl_core/evaluation.py): held-out evaluation, which needs only a policy and the
  environments.

Its methods are the stages of one iteration (`collect`, `write`, `train`, `save_checkpoint`,
`evaluate`); `run()` runs the training loop (rl_core/loop.py) with plain-Python stages, the same
loop the Prefect flow runs with Prefect tasks.

An iteration whose batch leaves nothing to train on (every group dropped, every episode stale
or env_error, or a non-finite loss: `StepMetrics.skipped`) takes no optimizer step. Its
`save_checkpoint` then writes no checkpoint (the weights are those of the last one) but records
the iteration as done without a step (its iteration record, "trained": false, "skipped_by":
"trainer", and where sampling stands). `TrainingRun.open` and `resume` go past such recorded
iterations, so a resumed run neither repeats them nor trips over a checkpoint name that exists.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rl_core.collector import Collector, load_environments
from rl_core.config import RunConfig
from rl_core.context_budget import measure_context_budget
from rl_core.evaluation import EvalReport, Evaluator
from rl_core.learner import Learner, load_run_checkpoint, load_start_policy
from rl_core.model.policy import Policy
from rl_core.runs.checkpoint import checkpoints_dir, latest_checkpoint, load_rng_states, read_checkpoint_state
from rl_core.runs.folder import new_run_id, record_run_config, sweep_leftovers
from rl_core.runs.ledger import RunLedger
from rl_core.runs.records import IterationRecord, load_sampling_state, sampling_path, save_sampling_state
from rl_core.store import CommittedBatch, Manifest, TrajectoryStore
from rl_core.trainer import StepMetrics
from rl_core.trajectory import Episode

if TYPE_CHECKING:
    from rl_core.loop import LoopResult


class TrainingRun:
    """One training run: its folder and records, collector, learner and evaluator (see the module docstring)."""

    def __init__(self, cfg: RunConfig, policy: Policy | None = None):
        self.run_id = cfg.storage.run_id or new_run_id()
        self.run_dir = Path(cfg.storage.run_dir) / self.run_id
        self.cfg = cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": self.run_id})})
        self._config_recorded = False  # config.yaml is written (or checked) before the run's first write
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        envs = load_environments(cfg)
        self.collector = Collector(cfg, envs, self.run_id)
        self.learner = Learner(cfg, policy or load_start_policy(cfg), checkpoints_dir(self.run_dir))
        self.context_budget = measure_context_budget(cfg, self.learner.policy.episode_renderer(), envs)
        self.context_budget.check()  # the config's check could only use environment.prompt_tokens
        if cfg.rollout.backend == "vllm":  # the server starts serving the starting policy (a given one is synced)
            from rl_core.vllm.backend import VLLMBackend

            stop_ids = sorted(self.learner.policy.episode_renderer().stop_ids)
            start_version = 0 if policy is None else -1
            self.collector.backend = VLLMBackend(
                cfg, cfg.resolved_policy_path(), self.run_dir / "vllm", stop_ids, start_version
            )
        self.evaluator = Evaluator(envs, cfg)
        if cfg.rollout.agent is not None:  # external agents play the rollouts through the gateway
            from rl_core.gateway.collection import AgentGateway

            self.collector.agents = AgentGateway(cfg.rollout.agent, cfg.rollout.max_retries)
            self.evaluator.play = self.collector.agents.collect
        self.store = TrajectoryStore(Path(cfg.storage.run_dir))
        self.ledger = RunLedger(self.run_dir, self.batch_committed)
        self.last_iteration = 0  # the last finished iteration: its step checkpointed, or recorded as taking no step
        self.checkpoint_iteration = 0  # the iteration of the newest checkpoint this run saved or resumed from

    def close(self) -> None:
        """Release what the run holds outside this process: the vLLM server it started (rollout.backend vllm)
        and the rollout gateway's server (rollout.agent)."""
        self.learner.close()
        if self.collector.backend is not None:
            self.collector.backend.close()
        if self.collector.agents is not None:
            self.collector.agents.close()

    @property
    def policy(self) -> Policy:
        """The policy being trained (`learner.policy`)."""
        return self.learner.policy

    @property
    def checkpoints_dir(self) -> Path:
        return self.learner.checkpoints_dir

    @classmethod
    def open(cls, cfg: RunConfig) -> TrainingRun:
        """The run `storage.run_id` names, continued from its latest checkpoint when it has one, else
        a new run. Leftovers of a killed writer (temp files, unfinished checkpoint folders) are removed
        first: this process is now the run's only writer. Raises ValueError when the run exists with
        another training setup (`record_run_config`), or when its newest checkpoint belongs to another
        run (a copied or renamed run folder: continuing it would write into the run it came from)."""
        if cfg.storage.run_id is None:
            return cls(cfg)
        run_dir = Path(cfg.storage.run_dir) / cfg.storage.run_id
        sweep_leftovers(run_dir)
        checkpoint = latest_checkpoint(checkpoints_dir(run_dir))
        if checkpoint is None:
            run = cls(cfg)
            run.skip_recorded_iterations()  # e.g. every iteration so far took no step: there is no checkpoint
        else:
            owner = read_checkpoint_state(checkpoint).get("run_id")
            if owner is not None and owner != cfg.storage.run_id:
                raise ValueError(
                    f"checkpoint {checkpoint} belongs to run {owner!r}, not to {cfg.storage.run_id!r}: the run folder "
                    "was copied or renamed, and continuing it would write into run "
                    f"{owner!r}; continue {owner!r} in its own folder, or start a new run"
                )
            run = cls.resume(cfg, checkpoint)
        try:
            run.record_config()  # a continued run with another training setup is refused before any work
        except BaseException:
            run.close()  # e.g. the vLLM server it started
            raise
        return run

    @classmethod
    def resume(cls, cfg: RunConfig, checkpoint: str | Path) -> TrainingRun:
        """Continue a run from one of its checkpoints: the next iteration is `last_iteration + 1`,
        and the run goes on exactly as if it had never stopped. Iterations recorded after the
        checkpoint as finished without a step count as done (`skip_recorded_iterations`).
        Raises ValueError if the checkpoint has no random generator states."""
        policy, state = load_run_checkpoint(cfg, checkpoint)
        cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": state["run_id"]})})
        run = cls(cfg, policy=policy)
        run.learner.restore_optimizer(checkpoint)
        run.collector.tasks.load_state_dict(state["tasks"])
        run.last_iteration = run.checkpoint_iteration = int(state.get("iteration", policy.version))
        rng = load_rng_states(checkpoint)
        if rng is None:
            raise ValueError(f"checkpoint {checkpoint} has no random generator states; it cannot be resumed exactly")
        run.collector.restore_rng_states(rng)
        run.skip_recorded_iterations()
        return run

    def record_config(self) -> None:
        """Write the run's config.yaml, or check the existing one (`record_run_config`); once per run."""
        if not self._config_recorded:
            record_run_config(self.cfg, self.run_dir)
            self._config_recorded = True

    def skip_recorded_iterations(self) -> list[int]:
        """Go past the iterations right after `last_iteration` that are recorded as finished without an
        optimizer step (`RunLedger.recorded_after`: their batch failed validation or left nothing to
        train on; they have no checkpoint of their own). Sampling continues where the last of them
        left it (its `sampling/` state; without one, the task sampler at least skips their tasks).
        Returns the iterations gone past."""
        done = [record.iteration for record in self.ledger.recorded_after(self.last_iteration)]
        if not done:
            return done
        state = load_sampling_state(self.run_dir, done[-1])
        if state is not None:
            self.collector.restore_sampling_state(state)
        else:  # recorded by something that kept no sampling state: keep the task order at least
            for iteration in done:
                self.collector.work_for(iteration)
        self.last_iteration = done[-1]
        return done

    def batch_committed(self, iteration: int) -> bool:
        """Whether `iteration`'s batch is written (or was, and is quarantined with its validation report)."""
        return self.store.exists(self.run_id, iteration) or self.store.report_path(self.run_id, iteration).is_file()

    def stored_batch(self, iteration: int) -> CommittedBatch:
        """The iteration's committed batch, read from the store (verified against its manifest; raises
        TrajectoryNotFoundError / CorruptTrajectoryError like `TrajectoryStore.read_table`)."""
        return CommittedBatch(
            self.store.manifest(self.run_id, iteration), self.store.read_table(self.run_id, iteration)
        )

    # -- the stages ---------------------------------------------------------------------------------

    def collect(self, iteration: int, policy: Policy | None = None) -> list[Episode]:
        """The iteration's episodes (`Collector.collect`), sampled by the run's policy or by `policy`
        (e.g. a snapshot sampling in the background)."""
        return self.collector.collect(policy or self.policy, iteration)

    def commit(self, iteration: int, episodes: list[Episode]) -> CommittedBatch:
        """Write the iteration's batch (Parquet + manifest, atomically); returns what was written."""
        self.record_config()
        return self.store.commit(self.run_id, iteration, episodes)

    def write(self, iteration: int, episodes: list[Episode]) -> Manifest:
        """`commit`, returning only the manifest."""
        return self.commit(iteration, episodes).manifest

    def train(self, episodes: list[Episode]) -> StepMetrics:
        """One training step on `episodes` (`Learner.train`)."""
        return self.learner.train(episodes)

    def save_checkpoint(
        self, iteration: int | None = None, metrics: dict[str, float] | None = None, record_skipped: bool = True
    ) -> Path | None:
        """Finish `iteration`: checkpoint everything a resume needs (weights, optimizer, RNG states, step,
        data position, and the step's metrics), pruning beyond `storage.keep_checkpoints`; returns the
        checkpoint folder.

        When no optimizer step was taken since the last checkpoint (`StepMetrics.skipped`), there is
        nothing new to checkpoint and a folder of that step may exist already: no checkpoint is
        written and None is returned. With an `iteration` (and `record_skipped`), it is recorded as
        finished without a step instead (`record_skipped_iteration`), so that a resumed run goes past it;
        the training loop passes `record_skipped=False`: its own iteration record, with the step's
        metrics, is then the one commit point of the iteration."""
        self.record_config()
        if not self.learner.moved:
            if iteration is not None and record_skipped:
                last = self.learner.last_step
                self.record_skipped_iteration(
                    iteration, last.skipped if last is not None and last.skipped else "no optimizer step was taken"
                )
            return None
        if iteration is not None:
            self.last_iteration = self.checkpoint_iteration = iteration
        state = {
            "tasks": self.collector.tasks.state_dict(),
            "run_id": self.run_id,
            "iteration": self.last_iteration,
            "metrics": metrics or {},
        }
        return self.learner.save_checkpoint(state, self.collector.rng_states())

    def record_skipped_iteration(self, iteration: int, reason: str) -> Path:
        """Record `iteration` as finished without an optimizer step, for `reason` (plain words): where
        sampling stood after collecting it (kept when the loop saved it before committing the batch: a
        batch collected ahead may be drawing from the task and token samplers by now; else the state now), then (the
        commit) its iteration record. Returns the record's path."""
        self.record_config()
        if not sampling_path(self.run_dir, iteration).is_file():
            save_sampling_state(self.run_dir, iteration, self.collector.sampling_state())
        record = IterationRecord(iteration, self.policy.version, trained=False, reason=reason, skipped_by="trainer")
        path = self.ledger.record_iteration(record)
        self.last_iteration = iteration
        return path

    def evaluate(self, *, samples: bool = True, policy: Policy | None = None) -> EvalReport:
        """Held-out evaluation of the run's policy (or of `policy`): `Evaluator.evaluate`."""
        return self.evaluator.evaluate(policy or self.policy, samples=samples)

    # -- the loop -----------------------------------------------------------------------------------

    def batches(self, first: int, last: int) -> Iterator[tuple[int, list[Episode]]]:
        """(iteration, episodes) for iterations first..last, collected (ahead, with
        `rollout.overlap_collection`) but not written: `BatchFeed.batches`."""
        from rl_core.batch_feed import BatchFeed
        from rl_core.stages import LocalStages

        stages = LocalStages(self)
        try:
            yield from BatchFeed(self, stages).batches(first, last)
        finally:
            stages.close()

    def run(self, log: Callable[[str], None] = print, validator=None, samples: bool = False) -> LoopResult:
        """Run the training loop (rl_core/loop.py) from `last_iteration + 1` to `cfg.iterations` with
        plain-Python stages (`LocalStages`: no Prefect, no MLflow, no registry; `validator` and
        `samples` as there).
        Returns the `LoopResult` (records, findings, held-out evaluations before and after). Raises
        ValueError when the run folder has iterations this object does not know of (it was built with
        `TrainingRun(cfg)` over an existing run: use `TrainingRun.open(cfg)`)."""
        from rl_core.loop import TrainingLoop
        from rl_core.stages import LocalStages

        recorded = max(self.ledger.iterations, default=0)
        if recorded > self.last_iteration:
            raise ValueError(
                f"run {self.run_id!r} has recorded iterations up to {recorded}, but this TrainingRun starts after "
                f"iteration {self.last_iteration}: continue an existing run with TrainingRun.open(cfg).run()"
            )
        stages = LocalStages(self, log, validator, samples)
        try:
            result = TrainingLoop(self, stages).run_iterations()
        finally:
            stages.close()
            self.close()
        log(
            f"[{self.run_id}] held-out pass@1 {result.before.pass_at_1:.3f} -> {result.after.pass_at_1:.3f} "
            f"after {self.policy.version} optimizer steps"
        )
        return result
