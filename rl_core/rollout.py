"""The rollout engine: many multi-turn episodes at once, generated turn by turn in batches.

`collect_rollouts` plays `group_size` episodes for each (environment, task) pair. Each
round, every live episode's context goes into ONE batched generation call (not one episode
at a time); each continuation is decoded and handed to its environment session, whose
observation is tokenized and appended. Token-in, token-out: an episode's `tokens` are
exactly the ids the policy was fed and produced; `loss_mask` is 1 on generated ids and 0
elsewhere; `behavior_logprobs` hold the sampler's log-probs on generated ids, 0 elsewhere.

An episode ends as (finish_reason): `answered` (the environment said done), `max_turns`,
`token_cap` (a turn reached `max_tokens_per_turn` without the stop token),
`context_overflow` (the next turn or observation would pass `context_window`), `timeout`
(checked between turns), `env_error` (an environment call still raising after
`max_retries` retries). Environment exceptions never escape the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rl_core.environments.base import EnvSession, Environment, StepResult, Task
from rl_core.generation import BatchDecoder, Generation
from rl_core.policy import Policy
from rl_core.trajectory import Episode, Turn

# A sampler continues keyed token contexts: (episode keys, contexts, per-context token limits,
# temperature) -> one Generation per context. A key's context only grows between calls, so a
# sampler may cache per key (the in-process one keeps each episode's KV cache across turns).
Sampler = Callable[[list[int], list[list[int]], list[int], float], list[Generation]]


@dataclass(frozen=True)
class RolloutSettings:
    """Limits of one collection; see RunConfig's rollout section for meanings."""

    max_turns: int
    max_tokens_per_turn: int
    context_window: int
    temperature: float
    timeout_s: float = 600.0
    max_retries: int = 3
    generation_batch_size: int = 256
    success_threshold: float = 1.0


@dataclass
class _LiveEpisode:
    env: Environment
    task: Task
    session: EnvSession
    group_id: str
    sample_index: int
    tokens: list[int]
    turns: list[Turn]
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    attempts: int = 1
    finish_reason: str | None = None
    reward: float = 0.0
    components: dict[str, float] = field(default_factory=dict)
    env_error: str | None = None

    def append(self, ids: list[int], generated: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.loss_mask += [1 if generated else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def end(self, reason: str, reward: float, components: dict[str, float]) -> None:
        self.finish_reason, self.reward, self.components = reason, float(reward), dict(components)

    @property
    def policy_turns(self) -> int:
        return sum(1 for t in self.turns if t.role == "assistant")


def hf_sampler(policy: Policy, batch_size: int, generator: torch.Generator | None = None) -> Sampler:
    """A Sampler running the policy's own model in this process, caching each episode's keys and values."""
    decoder = BatchDecoder(policy.model, stop_id=policy.chat.stop_id, pad_id=policy.chat.pad_id, batch_size=batch_size, generator=generator)
    return decoder.generate


def _start(policy: Policy, env: Environment, task: Task, group_id: str, index: int) -> _LiveEpisode:
    system, user = env.system_prompt(), task.prompt
    prompt = policy.chat.prompt(policy.tokenizer, system, user)
    system_end = len(policy.chat.message(policy.tokenizer, "system", system))
    turns = [Turn("system", system, 0, system_end), Turn("user", user, system_end, len(prompt))]
    live = _LiveEpisode(env, task, env.start(task), group_id, index, [], turns)
    live.append(prompt, generated=False)
    return live


def _call_with_retries(live: _LiveEpisode, call: Callable[[], object], max_retries: int) -> object | None:
    """Run an environment call, retrying exceptions; on exhaustion end the episode as env_error."""
    for attempt in range(1, max_retries + 2):
        try:
            result = call()
            live.attempts = max(live.attempts, attempt)
            return result
        except Exception as exc:  # environment faults must not escape the batch
            live.env_error = f"{type(exc).__name__}: {exc}"
            live.attempts = max(live.attempts, attempt)
    live.end("env_error", 0.0, {})
    return None


def _cut_off(live: _LiveEpisode, reason: str, max_retries: int) -> None:
    """End an unanswered episode with the environment's score for it."""
    scored = _call_with_retries(live, live.session.finish, max_retries)
    if scored is not None:
        reward, components = scored
        live.end(reason, reward, components)


def _apply_turn(policy: Policy, live: _LiveEpisode, gen: Generation, limit: int, settings: RolloutSettings) -> None:
    """Record one generated turn, step the environment, and append its observation."""
    start = len(live.tokens)
    live.append(gen.tokens, generated=True, logprobs=gen.logprobs)
    body = gen.tokens[:-1] if gen.stopped else gen.tokens
    text = policy.tokenizer.decode(body, skip_special_tokens=False)
    turn = Turn("assistant", text, start, len(live.tokens), finish_reason="stop" if gen.stopped else "length")
    live.turns.append(turn)
    if not gen.stopped:
        reason = "token_cap" if limit >= settings.max_tokens_per_turn else "context_overflow"
        _cut_off(live, reason, settings.max_retries)
        return
    result = _call_with_retries(live, lambda: live.session.step(text), settings.max_retries)
    if not isinstance(result, StepResult):
        if result is not None:
            live.env_error = f"environment step returned {type(result).__name__}, not StepResult"
            live.end("env_error", 0.0, {})
        return
    turn.tool_name, turn.tool_ok = result.tool_name, result.tool_ok
    if result.done:
        live.end(result.finish_reason or "answered", result.reward, result.reward_components)
        return
    observation = policy.chat.observation(policy.tokenizer, result.observation or "")
    if len(live.tokens) + len(observation) > settings.context_window:
        _cut_off(live, "context_overflow", settings.max_retries)
        return
    obs_start = len(live.tokens)
    live.append(observation, generated=False)
    live.turns.append(Turn("tool", result.observation or "", obs_start, len(live.tokens), tool_name=result.tool_name, tool_ok=result.tool_ok))
    if live.policy_turns >= settings.max_turns:
        _cut_off(live, "max_turns", settings.max_retries)
    elif time.monotonic() - live.started > settings.timeout_s:
        _cut_off(live, "timeout", settings.max_retries)


def collect_rollouts(
    policy: Policy,
    work: list[tuple[Environment, Task]],
    settings: RolloutSettings,
    *,
    group_size: int,
    run_id: str,
    iteration: int,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    first_group: int = 0,
) -> list[Episode]:
    """Play `group_size` episodes per (env, task) pair, batching generation across all live episodes.

    Episodes come back grouped: all samples of work[0], then work[1], ... Group ids number the
    pairs from `first_group` (so several collections of one iteration never share a group id).
    """
    sampler = sampler or hf_sampler(policy, settings.generation_batch_size, generator)
    episodes: list[_LiveEpisode] = []
    for index, (env, task) in enumerate(work):
        group_id = f"{run_id}/{iteration}/{first_group + index}/{task.task_id}"
        for sample in range(group_size):
            live = _open_episode(policy, env, task, group_id, sample, settings.max_retries)
            episodes.append(live)
    for live in episodes:
        if live.finish_reason is None and len(live.tokens) >= settings.context_window:
            _cut_off(live, "context_overflow", settings.max_retries)

    while True:
        keys = [key for key, e in enumerate(episodes) if e.finish_reason is None]
        if not keys:
            break
        active = [episodes[key] for key in keys]
        limits = [min(settings.max_tokens_per_turn, settings.context_window - len(e.tokens)) for e in active]
        generations = sampler(keys, [list(e.tokens) for e in active], limits, settings.temperature)
        for live, gen, limit in zip(active, generations, limits):
            _apply_turn(policy, live, gen, limit, settings)

    return [_to_episode(live, policy.version, run_id, iteration, settings.success_threshold) for live in episodes]


def _open_episode(policy: Policy, env: Environment, task: Task, group_id: str, index: int, max_retries: int) -> _LiveEpisode:
    """Open an episode; an environment whose `start` keeps raising gives an env_error episode."""
    error: Exception | None = None
    for attempt in range(1, max_retries + 2):
        try:
            live = _start(policy, env, task, group_id, index)
            live.attempts = attempt
            return live
        except Exception as exc:
            error = exc
    live = _LiveEpisode(env, task, _NoSession(), group_id, index, [], [], attempts=max_retries + 1)
    live.env_error = f"{type(error).__name__}: {error}"
    live.end("env_error", 0.0, {})
    return live


class _NoSession(EnvSession):
    """Placeholder for an episode whose environment could not be started."""

    def step(self, action_text: str) -> StepResult:
        raise RuntimeError("episode has no environment session")

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


def _to_episode(live: _LiveEpisode, policy_version: int, run_id: str, iteration: int, success_threshold: float) -> Episode:
    return Episode(
        run_id=run_id,
        iteration=iteration,
        policy_version=policy_version,
        env_name=live.env.name,
        task_id=live.task.task_id,
        group_id=live.group_id,
        sample_index=live.sample_index,
        tokens=live.tokens,
        loss_mask=live.loss_mask,
        behavior_logprobs=live.logprobs,
        turns=live.turns,
        reward=live.reward,
        reward_components=live.components,
        success=live.finish_reason != "env_error" and live.reward >= success_threshold,
        finish_reason=live.finish_reason or "env_error",
        env_error=live.env_error,
        attempts=live.attempts,
    )
