"""Held-out evaluation: greedy pass@1, sampled pass@k / pass^k, mean reward, turns, tokens.

pass@1 is measured at temperature 0, one episode per task. pass@k and pass^k come from
`num_samples` episodes per task at `sample_temperature`, with the unbiased estimators in
`metrics.py`, averaged over tasks.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import RunConfig
from rl_core.environments.base import Environment, Task
from rl_core.groups import group_episodes
from rl_core.metrics import pass_at_k, pass_hat_k
from rl_core.model.policy import Policy
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.trajectory import Episode

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """Evaluation results; `metrics` uses `val/...` names, `per_env` holds greedy pass@1 per environment."""

    metrics: dict[str, float]
    per_env: dict[str, float] = field(default_factory=dict)
    task_success: dict[str, bool] = field(default_factory=dict)

    @property
    def pass_at_1(self) -> float:
        return self.metrics["val/pass_at_1"]


def heldout_work(envs: list[Environment], split: str, max_tasks: int | None) -> list[tuple[Environment, Task]]:
    """(env, task) pairs of a split, the first `max_tasks` per environment."""
    work = []
    for env in envs:
        tasks = env.tasks(split)
        if not tasks:
            raise ValueError(f"environment {env.name!r} has no tasks in split {split!r}")
        work += [(env, t) for t in tasks[:max_tasks]]
    return work


def _summary(episodes: list[Episode], prefix: str) -> dict[str, float]:
    n = max(len(episodes), 1)
    truncated = sum(e.finish_reason in ("token_cap", "context_overflow", "max_turns") for e in episodes)
    return {
        f"{prefix}/reward_mean": sum(e.reward for e in episodes) / n,
        f"{prefix}/turns_mean": sum(e.num_turns for e in episodes) / n,
        f"{prefix}/response_tokens_mean": sum(e.response_tokens for e in episodes) / n,
        f"{prefix}/truncated_frac": truncated / n,
        f"{prefix}/env_error_frac": sum(e.finish_reason == "env_error" for e in episodes) / n,
    }


def evaluate(
    policy: Policy,
    envs: list[Environment],
    settings: RolloutSettings,
    *,
    split: str = "heldout",
    max_tasks: int | None = None,
    pass_k: list[int] | None = None,
    num_samples: int = 0,
    sample_temperature: float = 1.0,
    seed: int = 0,
    play: Callable[..., list[Episode]] = collect_rollouts,
) -> EvalReport:
    """Evaluate `policy` on a split; sampled pass@k is skipped when num_samples is 0. `play` collects the
    episodes (`collect_rollouts`, or `AgentGateway.collect` when agents play them); a rollout that gave several
    segments counts once (its last row)."""
    work = heldout_work(envs, split, max_tasks)
    greedy_settings = replace(settings, temperature=0.0)
    greedy = _rollouts(play(policy, work, greedy_settings, group_size=1, run_id="eval", iteration=0))
    metrics = {"val/pass_at_1": sum(e.success for e in greedy) / len(greedy), **_summary(greedy, "val")}
    if metrics["val/env_error_frac"] > 0.01:  # an environment or agent fault, not the policy's: say so
        log.warning(
            "held-out evaluation: %.0f%% of the greedy episodes ended as env_error (e.g. %s); pass@1 %.3f does not "
            "measure the policy alone",
            100 * metrics["val/env_error_frac"],
            next(e.env_error for e in greedy if e.finish_reason == "env_error"),
            metrics["val/pass_at_1"],
        )
    per_env: dict[str, list[bool]] = defaultdict(list)
    for e in greedy:
        per_env[e.env_name].append(e.success)
    for name, outcomes in per_env.items():
        metrics[f"val/pass_at_1/{name}"] = sum(outcomes) / len(outcomes)

    if num_samples:
        sample_settings = replace(settings, temperature=sample_temperature)
        generator = torch.Generator().manual_seed(seed)
        sampled = _rollouts(
            play(policy, work, sample_settings, group_size=num_samples, run_id="eval", iteration=0, generator=generator)
        )
        successes = {group.group_id: sum(int(e.success) for e in group.episodes) for group in group_episodes(sampled)}
        for k in pass_k or [1]:
            if k > num_samples:
                raise ValueError(f"pass@{k} needs at least {k} samples per task, got num_samples={num_samples}")
            metrics[f"val/pass_at_k/{k}"] = sum(pass_at_k(num_samples, c, k) for c in successes.values()) / len(
                successes
            )
            metrics[f"val/pass_hat_k/{k}"] = sum(pass_hat_k(num_samples, c, k) for c in successes.values()) / len(
                successes
            )
        metrics.update(_summary(sampled, "val/sampled"))
    return EvalReport(
        metrics=metrics,
        per_env={name: sum(o) / len(o) for name, o in per_env.items()},
        task_success={f"{e.env_name}/{e.task_id}": e.success for e in greedy},
    )


def _rollouts(episodes: list[Episode]) -> list[Episode]:
    """One row per rollout: the last segment of each (group_id, sample_index), in order."""
    last: dict[tuple[str, int], Episode] = {}
    for e in episodes:
        last[(e.group_id, e.sample_index)] = e
    return list(last.values())


class Evaluator:
    """Held-out evaluation as a run config describes it: needs only the environments and a policy.

    `evaluate(policy)` plays `evaluation.split` (the first `evaluation.max_tasks` tasks per
    environment) greedily for pass@1 and, with `samples`, `evaluation.num_samples` episodes per
    task at `evaluation.sample_temperature` for pass@k / pass^k (`evaluation.pass_k`)."""

    def __init__(self, envs: list[Environment], cfg: RunConfig, play: Callable[..., list[Episode]] | None = None):
        self.envs, self.cfg = envs, cfg
        self.play = play or collect_rollouts  # AgentGateway.collect when agents play the rollouts

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Evaluator:
        """An evaluator over the config's environments (`load_environments`; raises its ValueError). With
        `rollout.agent`, the agents play the evaluation through a gateway of its own: call `close()` after."""
        evaluator = cls(load_environments(cfg), cfg)
        if cfg.rollout.agent is not None:
            from rl_core.gateway.collection import AgentGateway

            evaluator._gateway = AgentGateway(cfg.rollout.agent, cfg.rollout.max_retries)
            evaluator.play = evaluator._gateway.collect
        return evaluator

    def close(self) -> None:
        """Stop the gateway `from_config` started (nothing otherwise)."""
        gateway = getattr(self, "_gateway", None)
        if gateway is not None:
            gateway.close()

    def evaluate(self, policy: Policy, *, samples: bool = True) -> EvalReport:
        """The held-out `EvalReport` of `policy` (greedy only when `samples` is False)."""
        e = self.cfg.evaluation
        return evaluate(
            policy,
            self.envs,
            rollout_settings(self.cfg),
            split=e.split,
            max_tasks=e.max_tasks,
            pass_k=e.pass_k,
            num_samples=e.num_samples if samples else 0,
            sample_temperature=e.sample_temperature,
            seed=self.cfg.seed,
            play=self.play,
        )
