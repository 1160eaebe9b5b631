"""Re-scoring: give every episode of stored batches a new reward and count success flips per environment.

Scorers (`SCORERS`, or `package.module:function` taking `(episode, task) -> float`) are
described in `load_scorer`; the built-in ones replay the recorded actions through a fresh
session of the episode's environment (`replay_actions`).

Contracts:
- nothing is written: `rescore` returns a `RescoreReport`;
- a bad scorer spec, or a task or environment the run no longer has, raises `ReplayError`
  (a bad scorer before any batch is read);
- a scorer that raises or returns no finite number on an episode is counted in the report's
  `errors`, not fatal; env_error episodes are not re-scored.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rl_core.collector import load_environments
from rl_core.config import RunConfig
from rl_core.environments.base import Environment, Task
from rl_core.imports import import_from_path
from rl_core.model.tokenizer import repair_unicode
from rl_core.replay.selection import ReplayError, StoredBatch, read_episodes, run_config
from rl_core.trajectory import Episode

Scorer = Callable[[Episode, Task], float]
SCORERS = ("environment", "strict")


def stored_text(value: object) -> str:
    """An environment name or task id as an episode row stores it (rl_core.rollout): str() of a
    non-str, made valid Unicode (lone surrogates -> U+FFFD)."""
    return repair_unicode(value if isinstance(value, str) else str(value))[0]


class TaskCatalog:
    """A run's environments and their tasks (training and evaluation splits), looked up by name.

    Names and task ids are matched in the form episodes store them (`stored_text`), so an
    environment whose task ids were repaired to valid Unicode in the rows is still found.
    """

    def __init__(self, cfg: RunConfig):
        self.splits = list(dict.fromkeys([cfg.environment.train_split, cfg.evaluation.split]))
        self.environments = {stored_text(env.name): env for env in load_environments(cfg)}
        self._tasks: dict[str, dict[str, Task]] = {}

    def environment(self, name: str) -> Environment:
        if name not in self.environments:
            raise ReplayError(f"environment {name!r} is not among the run's environments {sorted(self.environments)}")
        return self.environments[name]

    def task(self, episode: Episode) -> Task:
        env = self.environment(episode.env_name)
        if episode.env_name not in self._tasks:
            self._tasks[episode.env_name] = {
                stored_text(t.task_id): t for split in self.splits for t in env.tasks(split)
            }
        task = self._tasks[episode.env_name].get(episode.task_id)
        if task is None:
            raise ReplayError(
                f"environment {episode.env_name!r} has no task {episode.task_id!r} in splits {self.splits}"
            )
        return task


@dataclass
class ActionReplay:
    """What a fresh session made of an episode's recorded actions."""

    reward: float
    components: dict[str, float]
    answered: bool  # the environment said done (a final answer)
    failed_turns: int  # policy turns the environment answered with tool_ok=False


def replay_actions(env: Environment, task: Task, episode: Episode) -> ActionReplay:
    """Feed the episode's assistant turns, in order, to a fresh session of `env`.

    Mirrors the rollout engine: a turn cut at the token cap (finish_reason `length`) is not
    stepped; an episode the environment did not end is scored by `finish()`; a reward or reward
    component that is not a finite number is an environment fault (ValueError, which `rescore`
    counts in its errors), as it is an env_error in a rollout.
    """
    session = env.start(task)
    failed = 0
    for turn in (t for t in episode.turns if t.role == "assistant"):
        if turn.finish_reason == "length":
            break
        result = session.step(turn.text)
        failed += result.tool_ok is False
        if result.done:
            return ActionReplay(*_finite(result.reward, result.reward_components), True, failed)
    reward, components = session.finish()
    return ActionReplay(*_finite(reward, components), False, failed)


def _finite(reward: object, components: object) -> tuple[float, dict[str, float]]:
    """The replayed reward and components as finite floats; ValueError naming a bad one."""

    def number(value: object, what: str) -> float:
        checked = float(value)  # type: ignore[arg-type]
        if not math.isfinite(checked):
            raise ValueError(f"the environment returned a non-finite {what}: {checked}")
        return checked

    return number(reward, "reward"), {
        key: number(value, f"reward component {key!r}") for key, value in dict(components).items()
    }  # type: ignore[call-overload]


def load_scorer(spec: str, catalog: TaskCatalog | None = None) -> Scorer:
    """The scorer `spec` names:

    - `environment`: replay the recorded actions through a fresh session of the episode's
      environment (`replay_actions`); reproduces the stored reward when the environment is
      unchanged, so it audits a changed reward function or domain data;
    - `strict`: the `environment` reward for a clean episode: it ended with a final answer and
      no policy turn failed (no malformed action, unknown tool, bad arguments or missing
      record). Any other episode earns no positive reward: min(reward, 0). It audits successes
      reached by trial and error;
    - `package.module:function`: a function `(episode, task) -> float` of your own.
    `catalog` (the run's environments) is needed by the built-in scorers.
    """
    if spec in SCORERS:
        if catalog is None:
            raise ReplayError(f"scorer {spec!r} needs the run's environments")
        replay = lambda ep, task: replay_actions(catalog.environment(ep.env_name), task, ep)  # noqa: E731
        if spec == "environment":
            return lambda ep, task: replay(ep, task).reward
        return lambda ep, task: _strict_reward(replay(ep, task))
    return _import_function(spec)


def _strict_reward(outcome: ActionReplay) -> float:
    clean = outcome.answered and outcome.failed_turns == 0
    return outcome.reward if clean else min(outcome.reward, 0.0)


def _import_function(spec: str) -> Scorer:
    if ":" not in spec:
        raise ReplayError(f"scorer {spec!r}: expected one of {list(SCORERS)} or 'package.module:function'")
    try:
        function = import_from_path(spec, "scorer", form="package.module:function", kind="function")
    except ValueError as err:
        raise ReplayError(str(err)) from err
    if not callable(function):
        raise ReplayError(f"scorer {spec!r}: {spec.partition(':')[2]!r} is not a function")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError as err:
        raise ReplayError(f"scorer {spec!r} must take (episode, task): {err}") from err
    except ValueError:  # builtins without a signature: trust them
        pass
    return function


@dataclass
class ScoreChange:
    """An episode whose success flipped (success: reward at or above the threshold)."""

    run_id: str
    iteration: int
    index: int
    env_name: str
    task_id: str
    group_id: str
    sample_index: int
    stored_reward: float
    new_reward: float
    stored_success: bool
    new_success: bool

    @property
    def flip(self) -> str:
        return "success->failure" if self.stored_success else "failure->success"


@dataclass
class EnvironmentTally:
    """Counts for one environment (or all: `RescoreReport.total`)."""

    env_name: str
    episodes: int = 0
    rescored: int = 0
    skipped_env_error: int = 0
    errors: int = 0
    reward_changed: int = 0
    successes_before: int = 0
    successes_after: int = 0
    success_to_failure: int = 0
    failure_to_success: int = 0


@dataclass
class RescoreReport:
    """Successes before (stored reward) and after (new reward), at the same threshold per run."""

    scorer: str
    thresholds: dict[str, float]
    tallies: dict[str, EnvironmentTally] = field(default_factory=dict)
    changes: list[ScoreChange] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> EnvironmentTally:
        total = EnvironmentTally("all")
        for tally in self.tallies.values():
            for name in asdict(total):
                if name != "env_name":
                    setattr(total, name, getattr(total, name) + getattr(tally, name))
        return total

    def as_dict(self, examples: int = 10) -> dict[str, Any]:
        """JSON-ready summary listing the first `examples` flipped episodes and errors."""
        return {
            "scorer": self.scorer,
            "thresholds": self.thresholds,
            "total": asdict(self.total),
            "per_environment": [asdict(t) for t in self.tallies.values()],
            "examples": [{**asdict(c), "flip": c.flip} for c in self.changes[:examples]],
            "errors": self.errors[:examples],
        }


def rescore(
    batches: list[StoredBatch], scorer: str, threshold: float | None = None, reward_tolerance: float = 1e-9
) -> RescoreReport:
    """Score every episode of `batches` again and count success flips per environment.

    success = reward >= threshold (default: each run's evaluation.success_threshold), applied
    to the stored reward (before) and the new one (after). env_error episodes are not
    re-scored (their reward says nothing about the policy). A scorer that raises or returns no
    finite number on an episode is counted in `errors`; a task or environment the run no
    longer has raises ReplayError.
    """
    if scorer not in SCORERS:
        _import_function(scorer)  # fail before reading anything
    report = RescoreReport(scorer=scorer, thresholds={})
    scorers: dict[Path | None, tuple[Scorer, TaskCatalog, float]] = {}
    for batch in batches:
        if batch.run_folder not in scorers:
            cfg = run_config(batch)
            catalog = TaskCatalog(cfg)
            run_threshold = cfg.evaluation.success_threshold if threshold is None else threshold
            scorers[batch.run_folder] = (load_scorer(scorer, catalog), catalog, run_threshold)
            report.thresholds[batch.run_id] = run_threshold
        score, catalog, run_threshold = scorers[batch.run_folder]
        for index, episode in enumerate(read_episodes(batch)):
            _rescore_one(report, batch, index, episode, score, catalog.task(episode), run_threshold, reward_tolerance)
    return report


def _rescore_one(
    report: RescoreReport,
    batch: StoredBatch,
    index: int,
    episode: Episode,
    score: Scorer,
    task: Task,
    threshold: float,
    tolerance: float,
) -> None:
    tally = report.tallies.setdefault(episode.env_name, EnvironmentTally(episode.env_name))
    tally.episodes += 1
    if episode.finish_reason == "env_error":
        tally.skipped_env_error += 1
        return
    where = f"{batch.label} episode {index} (group {episode.group_id} sample {episode.sample_index})"
    try:
        value = score(episode, task)
        new = float(value)
        if not math.isfinite(new):
            raise ValueError(f"returned {value!r}, not a finite number")
    except Exception as err:  # a scorer fault is reported per episode, not fatal
        tally.errors += 1
        report.errors.append(f"{where}: {type(err).__name__}: {err}")
        return
    before, after = episode.reward >= threshold, new >= threshold
    tally.rescored += 1
    tally.reward_changed += abs(new - episode.reward) > tolerance
    tally.successes_before += before
    tally.successes_after += after
    tally.success_to_failure += before and not after
    tally.failure_to_success += after and not before
    if before != after:
        report.changes.append(
            ScoreChange(
                batch.run_id,
                batch.iteration,
                index,
                episode.env_name,
                episode.task_id,
                episode.group_id,
                episode.sample_index,
                episode.reward,
                new,
                before,
                after,
            )
        )
