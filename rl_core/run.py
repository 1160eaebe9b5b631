"""A training run assembled from a RunConfig: the whole loop from Python, no orchestrator.

`TrainingRun(cfg)` loads the environments and the starting policy and owns the trainer,
the task sampler and the trajectory store. Its methods are the stages of one iteration
(`collect`, `write`, `train`, `save_checkpoint`, `evaluate`); the Prefect tasks call the
same methods. `run()` chains them for `cfg.iterations` iterations.

An iteration whose batch leaves nothing to train on (every group dropped, every episode stale
or env_error, or a non-finite loss: `StepMetrics.skipped`) takes no optimizer step. Its
`save_checkpoint` then writes no checkpoint (the weights are those of the last one) but
records the iteration as done without a step: the iteration record `history/iteration-N.json`
("trained": false, "skipped_by": "trainer", "reason") and where sampling stands
(`sampling/iteration-N.pt`), see rl_core/runs/records.py. `TrainingRun.open` and `resume` go
past such recorded iterations, so a resumed run neither repeats them nor trips over a
checkpoint name that exists.

Runtime output lives under `<storage.run_dir>/<run_id>/`: `config.yaml` (written before the run's first
batch or checkpoint), `trajectories/`, `checkpoints/`, `history/`, `sampling/`.
"""

from __future__ import annotations

import copy
import random
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from rl_core.atomic import sweep_temp_files, write_text_atomically
from rl_core.config import RunConfig, config_differences, dump_config, load_config
from rl_core.environments import load_environment
from rl_core.environments.base import Environment, Task
from rl_core.evaluation import EvalReport, evaluate
from rl_core.metrics import rollout_metrics
from rl_core.model.policy import Policy, load_policy
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.runs import records as run_records
from rl_core.runs.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_rng_states,
    prune_checkpoints,
    restore_optimizer,
    save_checkpoint,
)
from rl_core.runs.task_sampler import TaskSampler
from rl_core.store import Manifest, TrajectoryStore
from rl_core.trainer import StepMetrics, Trainer, informative
from rl_core.trajectory import Episode

RUN_CONFIG_FILE = "config.yaml"
# Fields a resumed run may change: how long it runs, where it lives, how it is watched and gated.
RESUMABLE_CHANGES = ("iterations", "storage.", "doctor.", "gate.")


def record_run_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the run's config to `<run_dir>/config.yaml`, or check it against the one there.

    A run that already exists may only be continued with the same training setup: any
    difference outside RESUMABLE_CHANGES raises ValueError naming the fields."""
    path = run_dir / RUN_CONFIG_FILE
    if path.exists():
        stored = load_config(path)
        changed = [f for f in config_differences(stored, cfg) if not f.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ValueError(
                f"run {run_dir.name!r} already exists with a different config ({', '.join(changed)} differ "
                f"from {path}); "
                "continue it with the same settings or start a new run with another storage.run_id"
            )
    write_text_atomically(path, dump_config(cfg))
    return path


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was started with (its `config.yaml`)."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a Turnstile run folder")
    return load_config(path)


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def load_environments(cfg: RunConfig) -> list[Environment]:
    """The configured environments: one per entry of `environment.domains`, with that entry's
    keyword arguments (`EnvironmentConfig.entries`).

    Raises ValueError naming the entry (`environment.domains[i]`) when one cannot be built
    (its constructor raised), has no non-empty str `name`, or when two entries build
    environments of the same name
    (episodes, metrics and re-scoring are keyed by the environment's name).
    """
    domains_dir = Path(cfg.environment.domains_dir) if cfg.environment.domains_dir else None
    envs: list[Environment] = []
    for index, (name, kwargs) in enumerate(cfg.environment.entries()):
        try:
            env = load_environment(name, domains_dir, **kwargs)
        except Exception as err:
            raise ValueError(
                f"environment.domains[{index}] ({name!r}) could not be built: {type(err).__name__}: {err}"
            ) from err
        env_name = getattr(env, "name", None)
        if not (isinstance(env_name, str) and env_name):
            raise ValueError(
                f"environment.domains[{index}] ({name!r}) built an environment whose `name` is {env_name!r}: "
                "an Environment needs a non-empty str name (set it in the class or its constructor)"
            )
        for earlier, other in enumerate(envs):
            if other.name == env.name:
                raise ValueError(
                    f"environment.domains[{earlier}] and environment.domains[{index}] both build an environment "
                    f"named {env.name!r}; environment names must differ"
                )
        envs.append(env)
    return envs


def rollout_settings(cfg: RunConfig, temperature: float | None = None) -> RolloutSettings:
    r = cfg.rollout
    return RolloutSettings(
        max_turns=r.max_turns,
        max_tokens_per_turn=r.max_tokens_per_turn,
        context_window=cfg.policy.context_window,
        temperature=r.temperature if temperature is None else temperature,
        timeout_s=r.timeout_s,
        max_retries=r.max_retries,
        generation_batch_size=r.generation_batch_size,
        success_threshold=cfg.evaluation.success_threshold,
        max_prompt_tokens=cfg.environment.prompt_tokens,
    )


def load_start_policy(cfg: RunConfig) -> Policy:
    """The policy the run starts from, checked against the configured context window."""
    policy = load_policy(
        cfg.resolved_policy_path(),
        chat=cfg.policy.chat_format,
        dtype=cfg.policy.dtype,
        device=cfg.policy.device,
        lora=cfg.policy.lora,
    )
    if cfg.policy.context_window > policy.max_positions:
        raise ValueError(
            f"policy.context_window ({cfg.policy.context_window}) exceeds the model's max_position_embeddings "
            f"({policy.max_positions})"
        )
    return policy


class TrainingRun:
    """The state of one training run and the stages of its iterations."""

    def __init__(self, cfg: RunConfig, policy: Policy | None = None):
        self.run_id = cfg.storage.run_id or new_run_id()
        self.run_dir = Path(cfg.storage.run_dir) / self.run_id
        self.cfg = cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": self.run_id})})
        self._config_recorded = False  # config.yaml is written (or checked) before the run's first write
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.envs = load_environments(cfg)
        self.policy = policy or load_start_policy(cfg)
        self.trainer = Trainer(
            self.policy,
            cfg.algorithm,
            cfg.optimizer,
            reference=self._reference_model(),
            trainer_cfg=cfg.trainer,
            temperature=cfg.rollout.temperature,
        )  # for episodes without a sampling record
        self.tasks = TaskSampler(self.envs, cfg.environment.train_split, cfg.seed)
        self.store = TrajectoryStore(Path(cfg.storage.run_dir))
        self._work: dict[tuple[int, int], list[tuple[Environment, Task]]] = {}
        self.last_iteration = 0  # the last finished iteration: its step checkpointed, or recorded as taking no step
        self.checkpoint_iteration = 0  # the iteration of the newest checkpoint this run saved or resumed from
        self._checkpointed_version = (
            self.policy.version
        )  # policy version of that checkpoint (the start: no checkpoint needed)
        self.last_step: StepMetrics | None = None  # what the latest `train` call did
        self.protected_steps: set[int] = set()  # checkpoints kept whatever storage.keep_checkpoints says

    @classmethod
    def open(cls, cfg: RunConfig) -> "TrainingRun":
        """The run `storage.run_id` names, continued from its latest checkpoint when it has one, else
        a new run. Leftovers of a killed writer (temp files, unfinished checkpoint folders) are removed
        first: this process is now the run's only writer."""
        run_id = cfg.storage.run_id
        if run_id is None:
            return cls(cfg)
        run_dir = Path(cfg.storage.run_dir) / run_id
        sweep_temp_files(run_dir)
        for unfinished in (run_dir / "checkpoints").glob("step-*.tmp"):
            shutil.rmtree(unfinished, ignore_errors=True)
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            run = cls(cfg)
            run.skip_recorded_iterations()  # e.g. every iteration so far took no step: there is no checkpoint
        else:
            run = cls.resume(cfg, checkpoint)
        run.record_config()  # a continued run with another training setup is refused before any work
        return run

    def record_config(self) -> None:
        """Write the run's config.yaml, or check the existing one (`record_run_config`); once per run."""
        if not self._config_recorded:
            record_run_config(self.cfg, self.run_dir)
            self._config_recorded = True

    @classmethod
    def resume(cls, cfg: RunConfig, checkpoint: str | Path) -> "TrainingRun":
        """Continue a run from one of its checkpoints: the next iteration is `last_iteration + 1`,
        and the run goes on exactly as if it had never stopped. Iterations recorded after the
        checkpoint as finished without a step count as done (`skip_recorded_iterations`).
        Raises ValueError if the checkpoint has no random generator states."""
        p = cfg.policy
        policy, state = load_checkpoint(checkpoint, chat=p.chat_format, dtype=p.dtype, device=p.device)
        cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": state["run_id"]})})
        run = cls(cfg, policy=policy)
        restore_optimizer(checkpoint, run.trainer.optimizer)
        run.tasks.load_state_dict(state["tasks"])
        run.last_iteration = run.checkpoint_iteration = int(state.get("iteration", policy.version))
        rng = load_rng_states(checkpoint)
        if rng is None:
            raise ValueError(f"checkpoint {checkpoint} has no random generator states; it cannot be resumed exactly")
        run.restore_rng_states(rng)
        run.skip_recorded_iterations()
        return run

    def skip_recorded_iterations(self) -> list[int]:
        """Go past the iterations right after `last_iteration` that are recorded as finished without an
        optimizer step (iteration records with "trained": false: their batch failed validation or left
        nothing to train on; they have no checkpoint of their own). Sampling continues where the last
        of them left it (its `sampling/` state; without one, the task sampler at least skips their
        tasks). Returns the iterations gone past."""
        done: list[int] = []
        while (
            record := run_records.load_iteration(self.run_dir, self.last_iteration + len(done) + 1)
        ) is not None and not record["trained"]:
            done.append(int(record["iteration"]))
        if not done:
            return done
        state = run_records.load_sampling_state(self.run_dir, done[-1])
        if state is not None:
            self.restore_sampling_state(state)
        else:  # recorded by something that kept no sampling state: keep the task order at least
            for iteration in done:
                self.work_for(iteration)
        self.last_iteration = done[-1]
        return done

    def _reference_model(self) -> torch.nn.Module | None:
        """A frozen copy of the starting policy, for the KL penalty (None when it is off)."""
        if self.cfg.algorithm.kl_coef == 0:
            return None
        reference = load_start_policy(self.cfg).model.eval()
        reference.requires_grad_(False)
        return reference

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def work_for(self, iteration: int, round_: int = 0, size: int | None = None) -> list[tuple[Environment, Task]]:
        """The training tasks of `iteration` (and of its resampling round), drawn once: a retried
        collection sees the same tasks."""
        key = (iteration, round_)
        if key not in self._work:
            self._work[key] = self.tasks.next_batch(size or self.cfg.tasks_per_batch)
        return self._work[key]

    def sampling_snapshot(self) -> Policy:
        """A frozen copy of the current policy (same version) that can sample while the original trains."""
        model = copy.deepcopy(self.policy.model).eval()
        model.requires_grad_(False)
        return Policy(model=model, tokenizer=self.policy.tokenizer, chat=self.policy.chat, version=self.policy.version)

    def batches(self, first: int, last: int) -> Iterator[tuple[int, list[Episode]]]:
        """(iteration, episodes) for iterations first..last. With `rollout.overlap_collection`, batch
        k+1 is collected in a background thread from a snapshot of the policy while the caller
        trains on batch k (so it arrives one step off-policy); otherwise each is collected in turn."""
        if not self.cfg.rollout.overlap_collection:
            for iteration in range(first, last + 1):
                yield iteration, self.collect(iteration)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect") as pool:
            pending = pool.submit(self.collect, first, self.sampling_snapshot()) if first <= last else None
            for iteration in range(first, last + 1):
                episodes = pending.result()
                if iteration < last:
                    pending = pool.submit(self.collect, iteration + 1, self.sampling_snapshot())
                yield iteration, episodes

    def collect(self, iteration: int, policy: Policy | None = None) -> list[Episode]:
        """Sample `group_size` episodes for each of the iteration's `tasks_per_batch` training tasks
        (with the run's policy, or with `policy`, e.g. a snapshot sampling in the background).

        With `algorithm.zero_variance_groups = resample` (dynamic sampling), groups whose rewards
        are all equal are replaced by groups of further tasks, for up to `max_resample_rounds`
        extra rounds; what is still degenerate after that is left for the trainer to drop.
        """
        policy = policy or self.policy
        work = self.work_for(iteration)
        episodes = self._collect_work(policy, iteration, work, first_group=0)
        if self.cfg.algorithm.zero_variance_groups != "resample":
            return episodes
        groups_played = len(work)
        for round_ in range(1, self.cfg.algorithm.max_resample_rounds + 1):
            kept = informative(episodes, self.cfg.algorithm)  # judged as the trainer will judge them
            missing = self.cfg.tasks_per_batch - len({e.group_id for e in kept})
            if missing <= 0:
                return kept
            extra_work = self.work_for(iteration, round_, missing)
            episodes = kept + self._collect_work(policy, iteration, extra_work, first_group=groups_played)
            groups_played += len(extra_work)
        return episodes

    def _collect_work(
        self, policy: Policy, iteration: int, work: list[tuple[Environment, Task]], first_group: int
    ) -> list[Episode]:
        return collect_rollouts(
            policy,
            work,
            rollout_settings(self.cfg),
            group_size=self.cfg.rollout.group_size,
            run_id=self.run_id,
            iteration=iteration,
            generator=self.generator,
            first_group=first_group,
        )

    def write(self, iteration: int, episodes: list[Episode]) -> Manifest:
        self.record_config()
        return self.store.write(self.run_id, iteration, episodes)

    def train(self, episodes: list[Episode]) -> StepMetrics:
        """One training step on `episodes` (`Trainer.step`); `StepMetrics.skipped` says why when no
        optimizer step was applied (the policy version and weights are then unchanged)."""
        self.last_step = self.trainer.step(episodes)
        return self.last_step

    def rng_states(self) -> dict[str, Any]:
        """Every random generator the run draws from (sampling, torch, Python)."""
        return {"sampler": self.generator.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}

    def restore_rng_states(self, states: dict[str, Any]) -> None:
        self.generator.set_state(states["sampler"])
        torch.set_rng_state(states["torch"])
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))

    def sampling_state(self) -> dict[str, Any]:
        """Where sampling stands: the random generators and the task sampler's position."""
        return {"rng": self.rng_states(), "tasks": self.tasks.state_dict()}

    def restore_sampling_state(self, state: dict[str, Any]) -> None:
        self.restore_rng_states(state["rng"])
        self.tasks.load_state_dict(state["tasks"])

    def save_checkpoint(self, iteration: int | None = None, metrics: dict[str, float] | None = None) -> Path | None:
        """Finish `iteration`: checkpoint everything a resume needs (weights, optimizer, RNG states, step,
        data position, and the step's metrics), then drop the oldest checkpoints beyond
        `storage.keep_checkpoints`; returns the checkpoint folder.

        When no optimizer step was taken since the last checkpoint (the iteration's step was skipped:
        `StepMetrics.skipped`), there is nothing new to checkpoint and a folder of that step may
        exist already: no checkpoint is written and None is returned. With an `iteration`, it is
        recorded as finished without a step instead (`record_skipped_iteration`), so that a resumed
        run goes past it."""
        self.record_config()
        if self.policy.version == self._checkpointed_version:
            if iteration is not None:
                reason = (
                    self.last_step.skipped
                    if self.last_step is not None and self.last_step.skipped
                    else "no optimizer step was taken"
                )
                self.record_skipped_iteration(iteration, reason)
            return None
        if iteration is not None:
            self.last_iteration = self.checkpoint_iteration = iteration
        state = {
            "tasks": self.tasks.state_dict(),
            "run_id": self.run_id,
            "iteration": self.last_iteration,
            "metrics": metrics or {},
        }
        path = save_checkpoint(self.checkpoints_dir, self.policy, self.trainer.optimizer, state, self.rng_states())
        self._checkpointed_version = self.policy.version
        if self.cfg.storage.keep_checkpoints is not None:
            keep = {checkpoint_dir(self.checkpoints_dir, step) for step in self.protected_steps}
            prune_checkpoints(self.checkpoints_dir, self.cfg.storage.keep_checkpoints, protect=keep)
        return path

    def record_skipped_iteration(self, iteration: int, reason: str) -> Path:
        """Record `iteration` as finished without an optimizer step, for `reason` (plain words): where
        sampling stood after collecting it (kept when the train flow saved it before committing the
        batch: a batch collected ahead may be drawing from the sampler by now; else the state now),
        then (the commit) its iteration record ("trained": false, "skipped_by": "trainer").
        Returns the record's path."""
        self.record_config()
        if not run_records.sampling_path(self.run_dir, iteration).is_file():
            run_records.save_sampling_state(self.run_dir, iteration, self.sampling_state())
        record = {
            "iteration": iteration,
            "step": self.policy.version,
            "trained": False,
            "skipped_by": "trainer",
            "reason": reason,
        }
        path = run_records.save_iteration(self.run_dir, record)
        self.last_iteration = iteration
        return path

    def roll_back_to(self, step: int) -> None:
        """Load the weights and optimizer state this run had at `step` (0: the starting policy, with a
        fresh optimizer) into the policy. The step counter keeps counting up (versions stay unique;
        staleness stays measured in steps). Raises FileNotFoundError if that checkpoint is gone."""
        if step == 0:
            earlier = load_start_policy(self.cfg)
        else:
            folder = checkpoint_dir(self.checkpoints_dir, step)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"cannot roll back to step {step}: {folder} is gone (pruned by storage.keep_checkpoints?)"
                )
            p = self.cfg.policy
            earlier, _ = load_checkpoint(folder, chat=p.chat_format, dtype=p.dtype, device=p.device)
        with torch.no_grad():
            trainable = dict(self.policy.model.named_parameters())
            for name, value in earlier.model.named_parameters():
                trainable[name].copy_(value)
        if step == 0:
            self.trainer.optimizer.state.clear()
        else:
            restore_optimizer(folder, self.trainer.optimizer)

    def can_roll_back_to(self, step: int) -> bool:
        return step == 0 or checkpoint_dir(self.checkpoints_dir, step).is_dir()

    def evaluate(self, *, samples: bool = True, policy: Policy | None = None) -> EvalReport:
        """Held-out evaluation of the run's policy (or of `policy`, e.g. a champion to compare with)."""
        e = self.cfg.evaluation
        return evaluate(
            policy or self.policy,
            self.envs,
            rollout_settings(self.cfg),
            split=e.split,
            max_tasks=e.max_tasks,
            pass_k=e.pass_k,
            num_samples=e.num_samples if samples else 0,
            sample_temperature=e.sample_temperature,
            seed=self.cfg.seed,
        )

    def run(self, log: Callable[[str], None] = print) -> dict[str, float]:
        """Evaluate, train up to `cfg.iterations` iterations (evaluating whenever the step count passes a
        multiple of `val_every`), evaluate; return a summary: held-out pass@1 before and after, the
        policy's optimizer steps, and the iterations that took no step ("skipped").

        A resumed run starts at `last_iteration + 1`."""
        before = self.evaluate(samples=False).pass_at_1
        log(f"[{self.run_id}] step 0: held-out pass@1 {before:.3f}")
        skipped = 0
        for iteration, episodes in self.batches(self.last_iteration + 1, self.cfg.iterations):
            self.write(iteration, episodes)
            stats = rollout_metrics(episodes)
            start = self.policy.version
            step = self.train(episodes)
            self.save_checkpoint(iteration, step.as_dict())
            outcome = f"loss {step.loss:.4f} grad_norm {step.grad_norm:.3f} -> step {self.policy.version}"
            if step.skipped:
                skipped += 1
                outcome = f"no optimizer step ({step.skipped}); the policy stays at step {self.policy.version}"
            log(
                f"[{self.run_id}] iteration {iteration}: reward {stats['rollout/reward/mean']:.3f} success "
                f"{stats['rollout/success/mean']:.3f} {outcome}"
            )
            if (
                evaluation_due(start, self.policy.version, self.cfg.evaluation.val_every)
                and iteration != self.cfg.iterations
            ):
                log(
                    f"[{self.run_id}] step {self.policy.version}: held-out "
                    f"pass@1 {self.evaluate(samples=False).pass_at_1:.3f}"
                )
        after = self.evaluate(samples=False).pass_at_1
        log(f"[{self.run_id}] step {self.policy.version}: held-out pass@1 {after:.3f}")
        return {
            "pass_at_1_before": before,
            "pass_at_1_after": after,
            "steps": float(self.policy.version),
            "skipped": float(skipped),
        }


def evaluation_due(step_before: int, step_after: int, val_every: int) -> bool:
    """Whether an iteration that moved the policy from version `step_before` to `step_after` passed a
    multiple of `val_every` (evaluation.val_every counts optimizer steps, and an iteration may take
    several: optimizer.mini_batches_per_step, or none)."""
    return step_after // val_every > step_before // val_every
