"""Environments with injected faults, loaded by class path from test configs."""

from __future__ import annotations

from rl_core.environments import load_environment
from rl_core.environments.base import EnvSession, Environment, StepResult, Task


class _BrokenSession(EnvSession):
    def step(self, action_text: str) -> StepResult:
        raise ConnectionError("tool backend unreachable")

    def finish(self) -> tuple[float, dict[str, float]]:
        raise ConnectionError("tool backend unreachable")


class FailingDomain(Environment):
    """A built-in SOP domain whose every `fail_every`-th episode fails permanently."""

    def __init__(self, domain: str = "refunds", fail_every: int = 20):
        self.inner = load_environment(domain)
        self.name = self.inner.name
        self.fail_every = fail_every
        self.started = 0

    def system_prompt(self) -> str:
        return self.inner.system_prompt()

    def tasks(self, split: str) -> list[Task]:
        return self.inner.tasks(split)

    def start(self, task: Task) -> EnvSession:
        self.started += 1
        return _BrokenSession() if self.started % self.fail_every == 0 else self.inner.start(task)
