"""Held-out evaluation: greedy pass@1, sampled pass@k / pass^k, mean reward and its components, turns,
tokens and finish reasons, over all tasks and per environment.

pass@1 is measured at temperature 0, one episode per task. pass@k and pass^k come from
`num_samples` episodes per task at `sample_temperature`, with the unbiased estimators in
`metrics.py` (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1, for
pass@k; Yao et al. 2024, "tau-bench", for pass^k), averaged over tasks.

Every number is kept per task (`TaskOutcome`), so the report of any part of the tasks (one
environment, the selection or the gate part of the held-out split, `rl_core/heldout_split.py`) is
computed from the same episodes: `EvalReport.part`. Metric names: `val/<metric>` over all tasks and
`val/<metric>/<env_name>` per environment; `val/selection/pass_at_1` and `val/gate/pass_at_1` for
the two parts of the split (`evaluation.gate_fraction`).

Episodes to read: the report keeps the greedy episodes of a deterministic sample of the tasks
(`traced`, `tracking.traced_eval_episodes`; `sample_rollouts` spread over the environments, the same
tasks at every evaluation of one config) in `EvalReport.traced_episodes`, for tasks/traces.py to log as
MLflow traces; the other episodes are dropped once their outcome is counted, and records
(`to_dict`) never hold episodes.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import RunConfig
from rl_core.environments.base import Environment, Task
from rl_core.heldout_split import limit_split, split_heldout
from rl_core.metrics import pass_at_k, pass_hat_k
from rl_core.model.policy import Policy
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.trajectory import FINISH_REASONS, Episode

log = logging.getLogger(__name__)

TRUNCATED = ("token_cap", "context_overflow", "max_turns")
"""Finish reasons of an episode cut off before an answer (`truncated_frac`)."""

Part = Literal["all", "selection", "gate"]


def task_key(env_name: str, task_id: str) -> str:
    """The key of a task in `EvalReport.task_success` and `EvalReport.outcomes`: "<env_name>/<task_id>"."""
    return f"{env_name}/{task_id}"


@dataclass(frozen=True)
class TaskOutcome:
    """What one held-out task gave: its greedy episode and, when sampled, its group of `samples` episodes.

    Greedy: `success`, `reward`, `finish_reason` (None in records written before it was kept), `turns`
    (policy turns), `response_tokens` (tokens the policy generated) and `reward_components`. Sampled
    (all 0 without samples): `samples` episodes, `sample_successes` of them successes, and the sums over
    them of reward, turns and response tokens, and the count of each finish reason (`sample_finish`).
    """

    env_name: str
    task_id: str
    success: bool
    reward: float = 0.0
    finish_reason: str | None = None
    turns: int = 0
    response_tokens: int = 0
    reward_components: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    sample_successes: int = 0
    sample_reward_sum: float = 0.0
    sample_turns_sum: int = 0
    sample_response_tokens_sum: int = 0
    sample_finish: dict[str, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return task_key(self.env_name, self.task_id)

    def to_dict(self) -> dict[str, Any]:
        """The outcome as JSON-ready data (evaluation records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskOutcome:
        """What `to_dict` wrote. Raises TypeError for an unknown or missing field."""
        return cls(**data)

    @classmethod
    def of(cls, greedy: Episode, sampled: Sequence[Episode] = ()) -> TaskOutcome:
        """The outcome of one task from its greedy episode and its sampled episodes (may be empty)."""
        return cls(
            env_name=greedy.env_name,
            task_id=greedy.task_id,
            success=bool(greedy.success),
            reward=float(greedy.reward),
            finish_reason=greedy.finish_reason,
            turns=int(greedy.num_turns),
            response_tokens=int(greedy.response_tokens),
            reward_components={k: float(v) for k, v in greedy.reward_components.items()},
            samples=len(sampled),
            sample_successes=sum(bool(e.success) for e in sampled),
            sample_reward_sum=float(sum(e.reward for e in sampled)),
            sample_turns_sum=sum(e.num_turns for e in sampled),
            sample_response_tokens_sum=sum(e.response_tokens for e in sampled),
            sample_finish=dict(Counter(e.finish_reason for e in sampled)),
        )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarize(outcomes: Sequence[TaskOutcome], pass_k: Sequence[int] = ()) -> dict[str, float]:
    """The metrics of a set of task outcomes, unprefixed: pass_at_1, reward_mean, turns_mean,
    response_tokens_mean, truncated_frac, env_error_frac, finish_frac/<reason> (every reason in
    `FINISH_REASONS`), reward_component/<name> (mean over tasks; 0 where a task lacks it) from the
    greedy episodes (fractions of tasks, tokens, turns); and, when every task was sampled,
    pass_at_k/<k>, pass_hat_k/<k> for each k in `pass_k` and sampled/<...> means over the sampled
    episodes. Raises ValueError for no outcomes, or a k above a task's samples."""
    if not outcomes:
        raise ValueError("no task outcomes to summarize")
    known = [o for o in outcomes if o.finish_reason is not None]
    reasons = Counter(o.finish_reason for o in known)
    n_known = max(len(known), 1)
    metrics = {
        "pass_at_1": _mean(float(o.success) for o in outcomes),
        "reward_mean": _mean(o.reward for o in outcomes),
        "turns_mean": _mean(o.turns for o in outcomes),
        "response_tokens_mean": _mean(o.response_tokens for o in outcomes),
        "truncated_frac": sum(reasons[r] for r in TRUNCATED) / n_known,
        "env_error_frac": reasons["env_error"] / n_known,
        **{f"finish_frac/{reason}": reasons[reason] / n_known for reason in FINISH_REASONS},
    }
    components = sorted({name for o in outcomes for name in o.reward_components})
    for name in components:
        metrics[f"reward_component/{name}"] = _mean(o.reward_components.get(name, 0.0) for o in outcomes)
    if all(o.samples for o in outcomes):
        for k in pass_k:
            metrics[f"pass_at_k/{k}"] = _mean(pass_at_k(o.samples, o.sample_successes, k) for o in outcomes)
            metrics[f"pass_hat_k/{k}"] = _mean(pass_hat_k(o.samples, o.sample_successes, k) for o in outcomes)
        episodes = sum(o.samples for o in outcomes)
        finish: Counter[str] = Counter()
        for o in outcomes:
            finish.update(o.sample_finish)
        metrics.update(
            {
                "sampled/reward_mean": sum(o.sample_reward_sum for o in outcomes) / episodes,
                "sampled/turns_mean": sum(o.sample_turns_sum for o in outcomes) / episodes,
                "sampled/response_tokens_mean": sum(o.sample_response_tokens_sum for o in outcomes) / episodes,
                "sampled/truncated_frac": sum(finish[r] for r in TRUNCATED) / episodes,
                "sampled/env_error_frac": finish["env_error"] / episodes,
            }
        )
    return metrics


@dataclass
class EvalReport:
    """Evaluation results of one policy on a set of held-out tasks.

    `metrics`: `val/...` names (module docstring). `per_env`: greedy pass@1 per environment.
    `task_success`: greedy success per task key ("<env_name>/<task_id>"). `outcomes`: every number per
    task key (`TaskOutcome`; empty in records written before they were kept). `pass_k`: the k values
    the sampled metrics were computed for. `gate_tasks`: the task keys of the gate part of the
    held-out split (the rest is the selection part; empty: no split). `traced_episodes`: the greedy
    episodes of a deterministic sample of the tasks, to log as traces (module docstring; in memory
    only: never in `to_dict`, not compared, not kept by `part`).
    """

    metrics: dict[str, float]
    per_env: dict[str, float] = field(default_factory=dict)
    task_success: dict[str, bool] = field(default_factory=dict)
    outcomes: dict[str, TaskOutcome] = field(default_factory=dict)
    pass_k: tuple[int, ...] = ()
    gate_tasks: frozenset[str] = frozenset()
    traced_episodes: list[Episode] = field(default_factory=list, compare=False, repr=False)

    @property
    def pass_at_1(self) -> float:
        """Greedy pass@1 over all the report's tasks (fraction of tasks solved, 0..1)."""
        return self.metrics["val/pass_at_1"]

    @property
    def selection_pass_at_1(self) -> float:
        """Greedy pass@1 on the selection part: what chooses among a run's checkpoints (all tasks without a split)."""
        return self.metrics.get("val/selection/pass_at_1", self.pass_at_1)

    @classmethod
    def from_outcomes(
        cls, outcomes: Iterable[TaskOutcome], pass_k: Sequence[int] = (), gate_tasks: Iterable[str] = ()
    ) -> EvalReport:
        """The report of these task outcomes (metrics over all of them and per environment, and pass@1 of
        the selection and gate parts when `gate_tasks` is given). Raises ValueError for no outcomes or a
        task given twice."""
        outcomes = list(outcomes)
        by_key = {o.key: o for o in outcomes}
        if len(by_key) != len(outcomes):
            raise ValueError("a task outcome is given twice")
        gate = frozenset(gate_tasks) & by_key.keys()
        metrics = {f"val/{name}": value for name, value in summarize(outcomes, pass_k).items()}
        by_env: dict[str, list[TaskOutcome]] = defaultdict(list)
        for o in outcomes:
            by_env[o.env_name].append(o)
        for env, env_outcomes in by_env.items():
            metrics.update({f"val/{name}/{env}": value for name, value in summarize(env_outcomes, pass_k).items()})
        if gate:
            selection = [o for o in outcomes if o.key not in gate]
            metrics["val/gate/pass_at_1"] = _mean(float(by_key[k].success) for k in gate)
            if selection:
                metrics["val/selection/pass_at_1"] = _mean(float(o.success) for o in selection)
        return cls(
            metrics=metrics,
            per_env={env: _mean(float(o.success) for o in group) for env, group in by_env.items()},
            task_success={o.key: o.success for o in outcomes},
            outcomes=by_key,
            pass_k=tuple(pass_k),
            gate_tasks=gate,
        )

    @property
    def environments(self) -> list[str]:
        """The environments evaluated, in the order first seen."""
        return list(self.per_env)

    def env_metrics(self, env_name: str) -> dict[str, float]:
        """The unprefixed metrics of one environment (`summarize` of its task outcomes, e.g. {"pass_at_1": 0.4,
        ...}; only pass_at_1 for a record without outcomes). Raises KeyError for an environment the report does
        not hold."""
        if env_name not in self.per_env:
            raise KeyError(f"environment {env_name!r} was not evaluated (evaluated: {self.environments})")
        outcomes = [o for o in self.outcomes.values() if o.env_name == env_name]
        return summarize(outcomes, self.pass_k) if outcomes else {"pass_at_1": self.per_env[env_name]}

    def part(self, which: Part) -> EvalReport:
        """The report of one part of the held-out split: "gate", "selection" or "all" (this report).

        Raises ValueError when the report has no split (`gate_tasks` empty), or no per-task outcomes to
        compute it from (a record written before they were kept; re-evaluate)."""
        if which == "all":
            return self
        if not self.gate_tasks:
            raise ValueError("this evaluation has no gate/selection split (evaluation.gate_fraction)")
        if not self.outcomes:
            raise ValueError("this evaluation record keeps no per-task outcomes; evaluate the policy again")
        keep = [o for k, o in self.outcomes.items() if (k in self.gate_tasks) == (which == "gate")]
        return EvalReport.from_outcomes(keep, self.pass_k)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (evaluation records)."""
        return {
            "metrics": self.metrics,
            "per_env": self.per_env,
            "task_success": self.task_success,
            "outcomes": [o.to_dict() for o in self.outcomes.values()],
            "pass_k": list(self.pass_k),
            "gate_tasks": sorted(self.gate_tasks),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        """What `to_dict` wrote; records written before outcomes were kept give a report without them."""
        outcomes = [TaskOutcome.from_dict(o) for o in data.get("outcomes", [])]
        return cls(
            metrics=dict(data["metrics"]),
            per_env=dict(data["per_env"]),
            task_success=dict(data["task_success"]),
            outcomes={o.key: o for o in outcomes},
            pass_k=tuple(data.get("pass_k", ())),
            gate_tasks=frozenset(data.get("gate_tasks", ())),
        )


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from `parts` (their `str`s joined by "/"), the same in every process (unlike `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def sample_rollouts(
    episodes: Sequence[Episode], k: int, seed: int, stratum: Callable[[Episode], str] = lambda e: e.group_id
) -> list[Episode]:
    """The rows of `k` rollouts of `episodes`, chosen deterministically and spread over strata.

    A rollout is the rows sharing (`group_id`, `sample_index`): one row for in-process episodes, each
    segment of an external agent's rollout otherwise; all rows of a chosen rollout are returned. Strata
    (`stratum` of a rollout's first row: its group by default, e.g. `env_name` for evaluations) take
    turns in an order shuffled by `seed`, each giving its next rollout in an order shuffled by `seed`,
    so k rollouts come from k different strata while there are that many. The same `episodes`, `k` and
    `seed` give the same rows. Returns them in the order of `episodes`; all of them when `k` is at least
    the number of rollouts; none for k = 0. Raises ValueError for k < 0."""
    if k < 0:
        raise ValueError(f"cannot sample {k} rollouts")
    rows: dict[tuple[str, int], list[int]] = {}
    for position, e in enumerate(episodes):
        rows.setdefault((e.group_id, e.sample_index), []).append(position)
    strata: dict[str, list[tuple[str, int]]] = {}
    for key, positions in rows.items():
        strata.setdefault(stratum(episodes[positions[0]]), []).append(key)
    rng = random.Random(seed)
    order = list(strata)
    rng.shuffle(order)
    for name in order:
        rng.shuffle(strata[name])
    chosen: list[tuple[str, int]] = []
    depth = 0
    while len(chosen) < min(k, len(rows)):
        chosen += [strata[name][depth] for name in order if depth < len(strata[name])][: k - len(chosen)]
        depth += 1
    return [episodes[p] for p in sorted(p for key in chosen for p in rows[key])]


def heldout_work(envs: list[Environment], split: str, max_tasks: int | None) -> list[tuple[Environment, Task]]:
    """(env, task) pairs of a split, the first `max_tasks` per environment. Raises ValueError for an
    environment with no tasks in the split."""
    work = []
    for env in envs:
        tasks = env.tasks(split)
        if not tasks:
            raise ValueError(f"environment {env.name!r} has no tasks in split {split!r}")
        work += [(env, t) for t in tasks[:max_tasks]]
    return work


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
    gate_fraction: float | None = None,
    part: Part = "all",
    traced: int = 0,
) -> EvalReport:
    """Evaluate `policy` on a split (the first `max_tasks` per environment; with `gate_fraction`, that many taken
    from each part of the held-out split so that no task changes part); sampled pass@k is skipped when
    num_samples is 0. `play` collects the
    episodes (`collect_rollouts`, or `AgentGateway.collect` when agents play them); a rollout that gave several
    segments counts once (its last row). `gate_fraction` divides the tasks into selection and gate parts
    (`split_heldout`); `part` plays only one of them ("gate" or "selection"; needs `gate_fraction`).
    The report keeps the greedy episodes of `traced` tasks (`sample_rollouts` over the environments,
    seeded by `seed`) in `traced_episodes`.
    Raises ValueError for a k above num_samples or a part without a gate_fraction."""
    gate_keys: frozenset[str] = frozenset()
    if gate_fraction is None:
        work = heldout_work(envs, split, max_tasks)
    else:  # split all the held-out tasks first, then keep max_tasks: a task never changes part (heldout_split.py)
        work = heldout_work(envs, split, None)
        parts = split_heldout([task for _, task in work], gate_fraction)
        if max_tasks is not None:
            parts = limit_split(parts, max_tasks, gate_fraction)
        gate_keys = frozenset(task_key(t.env_name, t.task_id) for t in parts.gate)
        kept = gate_keys | {task_key(t.env_name, t.task_id) for t in parts.selection}
        work = [(env, t) for env, t in work if task_key(t.env_name, t.task_id) in kept]
    if part != "all":
        if not gate_keys:
            raise ValueError(f"evaluating the {part} part needs evaluation.gate_fraction")
        work = [(env, t) for env, t in work if (task_key(t.env_name, t.task_id) in gate_keys) == (part == "gate")]
    for k in (pass_k or [1]) if num_samples else []:
        if k > num_samples:
            raise ValueError(f"pass@{k} needs at least {k} samples per task, got num_samples={num_samples}")

    greedy_settings = replace(settings, temperature=0.0)
    greedy_rows = play(policy, work, greedy_settings, group_size=1, run_id="eval", iteration=0)
    greedy = _rollouts(greedy_rows)
    keep = sample_rollouts(greedy_rows, traced, stable_seed("traced-evaluation", seed), lambda e: e.env_name)
    del greedy_rows  # the rest of the greedy rows are counted below, not kept
    sampled: dict[str, list[Episode]] = defaultdict(list)
    if num_samples:
        sample_settings = replace(settings, temperature=sample_temperature)
        generator = torch.Generator().manual_seed(seed)
        episodes = play(
            policy, work, sample_settings, group_size=num_samples, run_id="eval", iteration=0, generator=generator
        )
        for e in _rollouts(episodes):
            sampled[task_key(e.env_name, e.task_id)].append(e)
    outcomes = [TaskOutcome.of(e, sampled.get(task_key(e.env_name, e.task_id), ())) for e in greedy]
    report = EvalReport.from_outcomes(outcomes, (pass_k or [1]) if num_samples else (), gate_keys)
    report.traced_episodes = keep
    if report.metrics["val/env_error_frac"] > 0.01:  # an environment or agent fault, not the policy's: say so
        log.warning(
            "held-out evaluation: %.0f%% of the greedy episodes ended as env_error (e.g. %s); pass@1 %.3f does not "
            "measure the policy alone",
            100 * report.metrics["val/env_error_frac"],
            next(e.env_error for e in greedy if e.finish_reason == "env_error"),
            report.pass_at_1,
        )
    return report


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
    task at `evaluation.sample_temperature` for pass@k / pass^k (`evaluation.pass_k`). The tasks are
    divided into selection and gate parts by `evaluation.gate_fraction`. The report keeps the greedy
    episodes of `tracking.traced_eval_episodes` tasks (`EvalReport.traced_episodes`)."""

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

    def evaluate(self, policy: Policy, *, samples: bool = True, part: Part = "all") -> EvalReport:
        """The held-out `EvalReport` of `policy` (greedy only when `samples` is False; only the gate or the
        selection part of the tasks with `part`), keeping the greedy episodes of
        `tracking.traced_eval_episodes` tasks."""
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
            gate_fraction=e.gate_fraction,
            part=part,
            traced=self.cfg.tracking.traced_eval_episodes,
        )
