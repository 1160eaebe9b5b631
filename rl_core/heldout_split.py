"""The held-out split divided into a selection part and a gate part, so the gate never sees a chosen score.

Choosing the best of several checkpoints on a set of tasks and then gating it on the same set lets the noise
that won the selection also pass the gate (a winner's-curse bias). `split_heldout` divides the held-out tasks,
deterministically and per environment, into `selection` (which checkpoint is best) and `gate` (is it better
than the champion): within each environment the tasks are ranked by the sha256 of "<env_name>/<task_id>" and
the first `round(gate_fraction * n)` (at least one, and at most n - 1 when n >= 2) go to the gate. The parts
never share a task, do not depend on the order the tasks are listed in, and are the same in every run.

`limit_split` keeps at most `max_tasks` per environment (`evaluation.max_tasks`) without moving a task to the
other part: the split is always made on all the held-out tasks first, so a run evaluated on fewer tasks never
gates on a task that another run used to choose.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from rl_core.environments.base import Task


@dataclass(frozen=True)
class HeldoutSplit:
    """The two parts of a held-out split (tasks in their given order within each part)."""

    selection: tuple[Task, ...]
    gate: tuple[Task, ...]


def _rank(task: Task) -> str:
    return hashlib.sha256(f"{task.env_name}/{task.task_id}".encode()).hexdigest()


def gate_size(n: int, gate_fraction: float) -> int:
    """How many of an environment's `n` tasks go to the gate: round(gate_fraction * n), at least 1, and at most
    n - 1 when n >= 2 (so both parts have a task)."""
    return min(max(round(gate_fraction * n), 1), n - 1) if n >= 2 else n


def split_heldout(tasks: Sequence[Task], gate_fraction: float) -> HeldoutSplit:
    """Divide `tasks` into selection and gate parts (module docstring). An environment with a single task puts
    it in the gate part. Raises ValueError for a `gate_fraction` outside (0, 1) or a task listed twice."""
    if not 0.0 < gate_fraction < 1.0:
        raise ValueError(f"gate_fraction must be in (0, 1), got {gate_fraction}")
    keys = [(t.env_name, t.task_id) for t in tasks]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"tasks listed more than once: {twice[:3]}")
    by_env: dict[str, list[Task]] = defaultdict(list)
    for task in tasks:
        by_env[task.env_name].append(task)
    gate_keys = set()
    for env_tasks in by_env.values():
        size = gate_size(len(env_tasks), gate_fraction)
        gate_keys |= {(t.env_name, t.task_id) for t in sorted(env_tasks, key=_rank)[:size]}
    return HeldoutSplit(
        selection=tuple(t for t in tasks if (t.env_name, t.task_id) not in gate_keys),
        gate=tuple(t for t in tasks if (t.env_name, t.task_id) in gate_keys),
    )


def limit_split(split: HeldoutSplit, max_tasks: int, gate_fraction: float) -> HeldoutSplit:
    """At most `max_tasks` tasks of each environment, each in the part `split` put it: per environment, the first
    `gate_size(max_tasks, gate_fraction)` of its gate tasks and the first `max_tasks` minus that of its selection
    tasks (in their listed order; fewer where a part has fewer). Raises ValueError for `max_tasks` < 1."""
    if max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    gate_quota = gate_size(max_tasks, gate_fraction)

    def first(tasks: tuple[Task, ...], quota: int) -> tuple[Task, ...]:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for task in tasks:
            if taken[task.env_name] < quota:
                taken[task.env_name] += 1
                kept.append(task)
        return tuple(kept)

    return HeldoutSplit(selection=first(split.selection, max_tasks - gate_quota), gate=first(split.gate, gate_quota))
