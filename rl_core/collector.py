"""The collector: which training tasks each iteration plays, and the batched rollouts that play them.

`Collector` owns the task sampler (`rl_core.runs.task_sampler.TaskSampler`), the token sampler's
random generator and the memo of each iteration's tasks (a retried collection sees the same
tasks). `sampling_state` / `restore_sampling_state` are where sampling stands (every random
generator the run draws from, and the task sampler's position): saved after each batch is
collected (rl_core/runs/records.py) and in each checkpoint, so that a resumed run draws exactly
what an uninterrupted one would.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rl_core.config import RunConfig
from rl_core.environments import load_environment
from rl_core.environments.base import Environment, Task
from rl_core.groups import group_episodes
from rl_core.model.policy import Policy
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.runs.task_sampler import TaskSampler
from rl_core.selection import drop_zero_variance_groups
from rl_core.trajectory import Episode

if TYPE_CHECKING:
    from rl_core.gateway.collection import AgentGateway
    from rl_core.vllm.backend import VLLMBackend

Work = list[tuple[Environment, Task]]


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
    """The rollout engine's settings from the run config (`temperature` overrides `rollout.temperature`)."""
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


class Collector:
    """Plays each iteration's training tasks: `group_size` episodes per task, `tasks_per_batch` tasks."""

    def __init__(self, cfg: RunConfig, envs: list[Environment], run_id: str):
        self.cfg, self.run_id = cfg, run_id
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the token sampler's random stream
        self.tasks = TaskSampler(envs, cfg.environment.train_split, cfg.seed)
        self._work: dict[tuple[int, int], Work] = {}
        self.backend: VLLMBackend | None = None  # rollout.backend vllm: the server that samples (set by the run)
        self.agents: AgentGateway | None = None  # rollout.agent: external agents play the rollouts (set by the run)

    def work_for(self, iteration: int, round_: int = 0, size: int | None = None) -> Work:
        """The training tasks of `iteration` (and of its resampling round), drawn once: a retried
        collection sees the same tasks."""
        key = (iteration, round_)
        if key not in self._work:
            self._work[key] = self.tasks.next_batch(size or self.cfg.tasks_per_batch)
        return self._work[key]

    def collect(self, policy: Policy, iteration: int) -> list[Episode]:
        """Sample `group_size` episodes for each of the iteration's `tasks_per_batch` training tasks
        with `policy` (the run's, or a frozen snapshot sampling in the background).

        With `algorithm.zero_variance_groups = resample` (dynamic sampling), zero-variance groups
        (all rewards equal) are replaced by groups of further tasks, for up to `max_resample_rounds`
        extra rounds; what is still zero-variance after that is left for the trainer to drop.
        """
        work = self.work_for(iteration)
        episodes = self._play(policy, iteration, work, first_group=0)
        if self.cfg.algorithm.zero_variance_groups != "resample":
            return episodes
        groups_played = len(work)
        for round_ in range(1, self.cfg.algorithm.max_resample_rounds + 1):
            kept = drop_zero_variance_groups(episodes, self.cfg.algorithm)  # judged as the trainer will judge them
            missing = self.cfg.tasks_per_batch - len(group_episodes(kept))
            if missing <= 0:
                return kept
            extra_work = self.work_for(iteration, round_, missing)
            episodes = kept + self._play(policy, iteration, extra_work, first_group=groups_played)
            groups_played += len(extra_work)
        return episodes

    def _play(self, policy: Policy, iteration: int, work: Work, first_group: int) -> list[Episode]:
        play = collect_rollouts if self.agents is None else self.agents.collect
        return play(
            policy,
            work,
            rollout_settings(self.cfg),
            group_size=self.cfg.rollout.group_size,
            run_id=self.run_id,
            iteration=iteration,
            generator=self.generator,
            first_group=first_group,
            **self._sampler(policy),
        )

    def _sampler(self, policy: Policy) -> dict[str, Any]:
        """The token sampler arguments of `collect_rollouts`: none (the in-process decoder), or the vLLM
        server's, serving `policy`'s weights."""
        if self.backend is None:
            return {}
        from rl_core.vllm.backend import VLLM_BACKEND

        return {"token_sampler": self.backend.token_sampler(policy, self.generator), "backend": VLLM_BACKEND}

    def rng_states(self) -> dict[str, Any]:
        """Every random generator the run draws from: the token sampler's, torch's and Python's."""
        return {
            "token_sampler": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
        }

    def restore_rng_states(self, states: dict[str, Any]) -> None:
        """Put back what `rng_states` returned (checkpoints before the rename hold "sampler")."""
        self.generator.set_state(states["token_sampler"] if "token_sampler" in states else states["sampler"])
        torch.set_rng_state(states["torch"])
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))

    def sampling_state(self) -> dict[str, Any]:
        """Where sampling stands: the random generators and the task sampler's position."""
        return {"rng": self.rng_states(), "tasks": self.tasks.state_dict()}

    def restore_sampling_state(self, state: dict[str, Any]) -> None:
        self.restore_rng_states(state["rng"])
        self.tasks.load_state_dict(state["tasks"])
