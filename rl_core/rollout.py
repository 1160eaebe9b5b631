"""The rollout engine: many multi-turn episodes at once, generated turn by turn in batches.

`collect_rollouts` plays `group_size` episodes for each (environment, task) pair. Each
round, every live episode's context goes into ONE batched generation call (not one episode
at a time); each continuation is decoded and handed to its environment session, whose
observation is tokenized and appended. Token-in, token-out: an episode's `tokens` are
exactly the ids the policy was fed and produced; `loss_mask` is 1 on generated ids and 0
elsewhere; `behavior_logprobs` hold the sampler's log-probs on generated ids, 0 elsewhere.

An episode ends as (finish_reason): `answered` (the environment said done), `max_turns`,
`token_cap` (a turn reached `max_tokens_per_turn` without the stop token),
`context_overflow` (the prompt is longer than `max_prompt_tokens`, or the next turn or
observation would pass `context_window`: no room is left for even one generated token),
`timeout` (checked between turns), `env_error` (an environment call still raising after
`max_retries` retries, or an environment answer the engine cannot use). Environment
exceptions and environment output never escape the batch: they end only their own episode.

The sampler is never asked for fewer than 1 token: before every generation round each live
episode's limit is `min(max_tokens_per_turn, context_window - len(tokens))`, and an episode
whose limit is below 1 ends as `context_overflow` instead of being sampled, wherever it stands
(after the prompt, after an observation, after a turn).

What the environment hands over is checked, not trusted:
- Rewards: the reward and every reward component must be a finite real number (not NaN,
  +inf or -inf); otherwise the episode ends as `env_error` with reward 0.0, no components,
  and an `env_error` message naming the non-finite value. It is never trained on (the
  trainer drops `env_error` episodes) and its Parquet row stays finite.
- Text (system prompt, task prompt, observation, tool name, reward-component names, and the
  environment name and task id the row is keyed by): must be a `str`, otherwise the episode
  ends as `env_error`. Text that is not valid Unicode (lone UTF-16 surrogates such as the
  JSON-decoded `"\\ud83d"`) is repaired with `tokenizer.repair_unicode` (split surrogate
  pairs joined, lone ones replaced by U+FFFD) and the episode goes on; the repair is
  recorded in the episode's `env_error` column (which holds the last environment fault,
  recovered or not; `finish_reason` says whether the episode failed), e.g. "observation
  after policy turn 2 was not valid Unicode: 1 surrogate code point(s) repaired".
- A step that returns something other than a `StepResult`, a `finish()` that returns
  something other than `(reward, reward_components)`, or a `finish_reason` outside
  `trajectory.FINISH_REASONS` ends the episode as `env_error` without a retry.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rl_core.environments.base import EnvSession, Environment, StepResult, Task
from rl_core.generation import BatchDecoder, Generation
from rl_core.policy import Policy
from rl_core.tokenizer import repair_unicode
from rl_core.trajectory import FINISH_REASONS, Episode, Turn

# A sampler continues keyed token contexts: (episode keys, contexts, per-context token limits,
# temperature) -> one Generation per context, of at most its limit tokens. Every limit is >= 1.
# A key's context only grows between calls, so a sampler may cache per key (the in-process one
# keeps each episode's KV cache across turns).
Sampler = Callable[[list[int], list[list[int]], list[int], float], list[Generation]]


@dataclass(frozen=True)
class RolloutSettings:
    """Limits of one collection; see RunConfig's rollout section for meanings.

    max_prompt_tokens: the longest prompt, in tokens, an episode may start with (system and
        task turns plus the opening of the first policy turn: the trajectory's
        `prompt_tokens`); a longer one ends the episode as `context_overflow` before any
        generation. `environment.prompt_tokens` in a RunConfig; None = only `context_window`
        bounds it.

    Raises ValueError, naming the field, for a limit below 1, a negative retry count, or a
    temperature that is negative or not finite.
    """

    max_turns: int
    max_tokens_per_turn: int
    context_window: int
    temperature: float
    timeout_s: float = 600.0
    max_retries: int = 3
    generation_batch_size: int = 256
    success_threshold: float = 1.0
    max_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens_per_turn", "context_window", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"RolloutSettings.max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}")
        if self.max_retries < 0:
            raise ValueError(f"RolloutSettings.max_retries must be >= 0, got {self.max_retries}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"RolloutSettings.temperature must be finite and >= 0, got {self.temperature}")


class _EnvFault(Exception):
    """An environment answer the engine cannot use (wrong type, non-finite reward): not retried."""


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
    repairs: list[str] = field(default_factory=list)  # environment text made valid Unicode

    def append(self, ids: list[int], generated: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.loss_mask += [1 if generated else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)

    def end(self, reason: str, reward: object, components: object) -> None:
        """End the episode as `reason` with the environment's reward and components.

        A reward or component that is not a finite real number (NaN, +inf, -inf, a string ...)
        ends it as `env_error` instead, with reward 0.0 and no components.
        """
        if reason == "env_error":
            self.env_error = self.env_error or "the environment ended the episode as env_error"
            self.finish_reason, self.reward, self.components = reason, 0.0, {}
            return
        try:
            checked_reward, checked_components = _checked_reward(self, reward, components)
        except _EnvFault as fault:
            self.env_error = str(fault)
            self.finish_reason, self.reward, self.components = "env_error", 0.0, {}
            return
        self.finish_reason, self.reward, self.components = reason, checked_reward, checked_components

    def fail(self, message: str) -> None:
        """End the episode as env_error with `message`."""
        self.env_error = message
        self.end("env_error", 0.0, {})

    def text(self, value: object, what: str) -> str:
        """Environment text as valid Unicode (a repair is noted); raises _EnvFault if it is not a str."""
        if not isinstance(value, str):
            raise _EnvFault(f"{what} must be a str, got {type(value).__name__}")
        text, invalid = repair_unicode(value)
        if invalid:
            self.repairs.append(f"{what} was not valid Unicode: {invalid} surrogate code point(s) repaired (lone ones replaced with U+FFFD)")
        return text

    @property
    def policy_turns(self) -> int:
        return sum(1 for t in self.turns if t.role == "assistant")


def _number(value: object, what: str) -> float:
    """`value` as a float; raises _EnvFault unless it is a finite real number."""
    if value is None or isinstance(value, (str, bytes)):
        raise _EnvFault(f"environment returned a {what} that is not a number: {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _EnvFault(f"environment returned a {what} that is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise _EnvFault(f"environment returned a non-finite {what}: {number}")
    return number


def _checked_reward(live: _LiveEpisode, reward: object, components: object) -> tuple[float, dict[str, float]]:
    """The reward and components as finite floats; raises _EnvFault naming every bad value."""
    if not isinstance(components, Mapping):
        raise _EnvFault(f"environment returned reward_components of type {type(components).__name__}, not a mapping of str to float")
    values = [("reward", None, reward), *((f"reward component {key!r}", key, value) for key, value in components.items())]
    faults: list[str] = []
    checked_reward, checked = 0.0, {}
    for what, key, value in values:
        try:
            number = _number(value, what)
        except _EnvFault as fault:
            faults.append(str(fault))
            continue
        if key is None:
            checked_reward = number
        else:
            checked[live.text(key if isinstance(key, str) else str(key), "reward component name")] = number
    if faults:
        raise _EnvFault("; ".join(faults))
    return checked_reward, checked


def hf_sampler(policy: Policy, batch_size: int, generator: torch.Generator | None = None) -> Sampler:
    """A Sampler running the policy's own model in this process, caching each episode's keys and values."""
    decoder = BatchDecoder(policy.model, stop_id=policy.chat.stop_id, pad_id=policy.chat.pad_id, batch_size=batch_size, generator=generator)
    return decoder.generate


def _call_with_retries(live: _LiveEpisode, call: Callable[[], object], max_retries: int) -> object | None:
    """Run an environment call, retrying exceptions; on exhaustion end the episode as env_error (check `live.finish_reason`)."""
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
    if live.finish_reason is not None:
        return
    if not (isinstance(scored, (tuple, list)) and len(scored) == 2):
        live.fail(f"environment finish() returned {type(scored).__name__}, not (reward, reward_components)")
        return
    live.end(reason, scored[0], scored[1])


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
    if live.finish_reason is not None:
        return
    try:
        _apply_result(policy, live, turn, result, settings)
    except _EnvFault as fault:
        live.fail(str(fault))


def _apply_result(policy: Policy, live: _LiveEpisode, turn: Turn, result: object, settings: RolloutSettings) -> None:
    """Apply the environment's answer to a policy turn. Raises _EnvFault for an answer the engine cannot use."""
    where = f"after policy turn {live.policy_turns}"
    if not isinstance(result, StepResult):
        raise _EnvFault(f"environment step returned {type(result).__name__}, not StepResult")
    turn.tool_name = None if result.tool_name is None else live.text(result.tool_name, f"tool name {where}")
    turn.tool_ok = None if result.tool_ok is None else bool(result.tool_ok)
    if result.done:
        reason = result.finish_reason or "answered"
        if reason not in FINISH_REASONS:
            raise _EnvFault(f"environment ended the episode with finish_reason {reason!r}, not one of {FINISH_REASONS}")
        live.end(reason, result.reward, result.reward_components)
        return
    text = live.text("" if result.observation is None else result.observation, f"observation {where}")
    observation = policy.chat.observation(policy.tokenizer, text)
    if len(live.tokens) + len(observation) > settings.context_window:
        _cut_off(live, "context_overflow", settings.max_retries)
        return
    obs_start = len(live.tokens)
    live.append(observation, generated=False)
    live.turns.append(Turn("tool", text, obs_start, len(live.tokens), tool_name=turn.tool_name, tool_ok=turn.tool_ok))
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
    No environment fault or environment output raises out of here (see the module docstring);
    a sampler that breaks its contract (a different number of generations than contexts, or
    more tokens than a limit) raises ValueError.
    """
    sampler = sampler or hf_sampler(policy, settings.generation_batch_size, generator)
    episodes: list[_LiveEpisode] = []
    for index, (env, task) in enumerate(work):
        group_id = f"{run_id}/{iteration}/{first_group + index}/{task.task_id}"
        for sample in range(group_size):
            episodes.append(_open_episode(policy, env, task, group_id, sample, settings))

    while True:
        keys, limits = [], []
        for key, live in enumerate(episodes):
            if live.finish_reason is not None:
                continue
            limit = min(settings.max_tokens_per_turn, settings.context_window - len(live.tokens))
            if limit < 1:  # the context is full: nothing may be generated
                _cut_off(live, "context_overflow", settings.max_retries)
                continue
            keys.append(key)
            limits.append(limit)
        if not keys:
            break
        active = [episodes[key] for key in keys]
        generations = sampler(keys, [list(e.tokens) for e in active], limits, settings.temperature)
        if len(generations) != len(active):
            raise ValueError(f"sampler returned {len(generations)} generations for {len(active)} contexts")
        for live, gen, limit in zip(active, generations, limits):
            if len(gen.tokens) > limit:
                raise ValueError(f"sampler returned {len(gen.tokens)} tokens for a context limited to {limit}")
            _apply_turn(policy, live, gen, limit, settings)

    return [_to_episode(live, policy.version, run_id, iteration, settings.success_threshold) for live in episodes]


def _open_episode(policy: Policy, env: Environment, task: Task, group_id: str, index: int, settings: RolloutSettings) -> _LiveEpisode:
    """Open an episode: system and task turns, then the opening of the first policy turn.

    An environment whose `system_prompt` or `start` keeps raising, or whose prompts are not
    text, gives an env_error episode; a prompt longer than `settings.max_prompt_tokens` gives
    a context_overflow one.
    """
    live = _LiveEpisode(env, task, _NoSession(), group_id, index, [], [])
    opened = _call_with_retries(live, lambda: (env.system_prompt(), env.start(task)), settings.max_retries)
    if live.finish_reason is not None:
        return live
    system_prompt, live.session = opened  # type: ignore[misc]
    try:
        system = live.text(system_prompt, "system prompt")
        user = live.text(task.prompt, "task prompt")
    except _EnvFault as fault:
        live.fail(str(fault))
        return live
    prompt = policy.chat.prompt(policy.tokenizer, system, user)
    system_end = len(policy.chat.message(policy.tokenizer, "system", system))
    live.turns = [Turn("system", system, 0, system_end), Turn("user", user, system_end, len(prompt))]
    live.append(prompt, generated=False)
    if settings.max_prompt_tokens is not None and len(prompt) > settings.max_prompt_tokens:
        _cut_off(live, "context_overflow", settings.max_retries)
    return live


class _NoSession(EnvSession):
    """Placeholder for an episode whose environment could not be started."""

    def step(self, action_text: str) -> StepResult:
        raise RuntimeError("episode has no environment session")

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


def _identifier(live: _LiveEpisode, value: object, what: str) -> str:
    """An environment-given name or id as valid text (str() of a non-str), a repair noted."""
    return live.text(value if isinstance(value, str) else str(value), what)


def _to_episode(live: _LiveEpisode, policy_version: int, run_id: str, iteration: int, success_threshold: float) -> Episode:
    env_name = _identifier(live, live.env.name, "environment name")
    task_id = _identifier(live, live.task.task_id, "task id")
    group_id = repair_unicode(live.group_id)[0]  # holds the task id, already noted
    notes = [note for note in (live.env_error, *live.repairs) if note]
    return Episode(
        run_id=run_id,
        iteration=iteration,
        policy_version=policy_version,
        env_name=env_name,
        task_id=task_id,
        group_id=group_id,
        sample_index=live.sample_index,
        tokens=live.tokens,
        loss_mask=live.loss_mask,
        behavior_logprobs=live.logprobs,
        turns=live.turns,
        reward=live.reward,
        reward_components=live.components,
        success=live.finish_reason != "env_error" and live.reward >= success_threshold,
        finish_reason=live.finish_reason or "env_error",
        env_error="; ".join(notes) if notes else None,
        attempts=live.attempts,
    )
