"""Turnstile-side reward functions for agent rollouts (`rollout.agent.reward_fn`).

A reward function is `package.module:function` taking `(rollout, task)`: the `RecordedRollout`
(rl_core/gateway/outcome.py: the calls, the final messages, each call's parsed turn, the environment the
task came from) and the `Task`; it returns the reward, or `(reward, components)` (finite floats). It runs in
the collecting process after the agent completed the rollout, for agents that should not judge themselves.
"""

from __future__ import annotations

from rl_core.environments.base import StepResult, Task
from rl_core.environments.messages import AssistantTurn


def environment_reward(rollout, task: Task) -> tuple[float, dict[str, float]]:
    """Score a rollout by replaying its policy turns through a fresh session of the task's environment: each
    call's parsed turn goes to `EnvSession.respond` (a native tool-calling policy) or its text to
    `EnvSession.step` (Turnstile's text actions), as in process, until the environment says done; a rollout
    that never finishes is scored by `finish()`. Returns the environment's (reward, reward_components).
    Raises what the environment raises."""
    session = rollout.environment.start(task)
    for turn in rollout.turns:
        if rollout.native_tools:
            result = session.respond(turn if isinstance(turn, AssistantTurn) else AssistantTurn(content=str(turn)))
        else:
            result = session.step(turn.content if isinstance(turn, AssistantTurn) else str(turn))
        if isinstance(result, StepResult) and result.done:
            return float(result.reward), dict(result.reward_components)
    reward, components = session.finish()
    return float(reward), dict(components)
