"""The rollout engine: many multi-turn episodes at once, generated turn by turn in batches.

`collect_rollouts` plays `group_size` episodes for each (environment, task) pair. Each
round, every live episode's context goes into ONE batched generation call (not one episode
at a time); each continuation is decoded and handed to its environment session, whose
observation is tokenized and appended. Token-in, token-out: an episode's `tokens` are
exactly the ids the policy was fed and produced; `loss_mask` is 1 on generated ids and 0
elsewhere; `behavior_logprobs` hold the token sampler's log-probs on generated ids, 0 elsewhere.

An episode ends as (finish_reason): `answered` (the environment said done), `max_turns`,
`token_cap` (a turn reached `max_tokens_per_turn` without the stop token),
`context_overflow` (the prompt is longer than `max_prompt_tokens`, or the next turn or
observation would pass `context_window`: no room is left for even one generated token),
`timeout` (checked between turns), `env_error` (an environment call still raising after
`max_retries` retries, or an environment answer the engine cannot use). Environment
exceptions and environment output never escape the batch: they end only their own episode.

The token sampler is never asked for fewer than 1 token: before every generation round each live
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
  after policy turn 2 was not valid Unicode: 1 surrogate code point(s) repaired". The
  `env_error` message itself is made valid the same way (an environment's exception text may
  hold surrogates). An environment whose `name` cannot be read gives an `env_error` episode
  keyed by its class name.
- A step that returns something other than a `StepResult`, a `finish()` that returns
  something other than `(reward, reward_components)`, a `done` or `tool_ok` without a truth
  value, or a `finish_reason` outside `trajectory.FINISH_REASONS` ends the episode as
  `env_error` without a retry.

The token sampler contract (`TokenSampler`, `hf_token_sampler`) lives in model/token_sampler.py,
the live episode record and the checks on environment answers in live_episode.py; this module
is the engine that plays the turns.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.environments.messages import AssistantTurn, ToolResult
from rl_core.groups import make_group_id
from rl_core.live_episode import EnvFault, LiveEpisode, NoSession, identifier, truth_value
from rl_core.model.generation import Generation
from rl_core.model.policy import Policy
from rl_core.model.token_sampler import CUSTOM_BACKEND, HF_BACKEND, TokenSampler, hf_token_sampler
from rl_core.model.tokenizer import repair_unicode
from rl_core.trajectory import FINISH_REASONS, Episode, Sampling, Turn

__all__ = ["RolloutSettings", "collect_rollouts"]

log = logging.getLogger(__name__)


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


def _call_with_retries(live: LiveEpisode, call: Callable[[], object], max_retries: int) -> object | None:
    """Run an environment call, retrying exceptions; on exhaustion end the episode as env_error.

    The caller checks `live.finish_reason`."""
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


def _cut_off(live: LiveEpisode, reason: str, max_retries: int) -> None:
    """End an unanswered episode with the environment's score for it."""
    scored = _call_with_retries(live, live.session.finish, max_retries)
    if live.finish_reason is not None:
        return
    if not (isinstance(scored, (tuple, list)) and len(scored) == 2):
        live.fail(f"environment finish() returned {type(scored).__name__}, not (reward, reward_components)")
        return
    live.end(reason, scored[0], scored[1])


def _apply_turn(policy: Policy, live: LiveEpisode, gen: Generation, limit: int, settings: RolloutSettings) -> None:
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
    try:
        parsed = live.conversation.parse(gen.tokens)
    except Exception as exc:  # a renderer must not raise on model output; if it does, the turn did not parse
        parsed = AssistantTurn(parse_error=f"unparseable turn ({type(exc).__name__}: {str(exc)[:200]})")
    turn.parse_error = getattr(parsed, "parse_error", None)  # a native turn the tool-call parser could not read
    if isinstance(parsed, str):
        result = _call_with_retries(live, lambda: live.session.step(parsed), settings.max_retries)
    else:
        result = _call_with_retries(live, lambda: live.session.respond(parsed), settings.max_retries)
    if live.finish_reason is not None:
        return
    try:
        _apply_result(live, gen.tokens, turn, result, settings)
    except EnvFault as fault:
        live.fail(str(fault))


def _say_rewrites(episodes: list[LiveEpisode]) -> None:
    """Warn once per collection when a chat template did not extend some episodes: the renderer's fallback
    kept the sampled ids (rl_core/model/template_renderer.py, harmony_renderer.py); the reasons, counted
    in policy turns."""
    reasons = Counter(r for live in episodes for r in getattr(live.conversation, "rewrites", None) or [])
    if reasons:
        log.warning(
            "the chat template did not extend %d policy turn(s) of this collection (%s): their sampled token ids "
            "were kept and only the new messages rendered after them, so those episodes differ from the template's "
            "own re-rendering",
            sum(reasons.values()),
            "; ".join(f"{reason}: {n}" for reason, n in reasons.most_common()),
        )


def _apply_result(
    live: LiveEpisode, generated: list[int], turn: Turn, result: object, settings: RolloutSettings
) -> None:
    """Apply the environment's answer to a policy turn. Raises EnvFault for an answer the engine cannot use."""
    where = f"after policy turn {live.policy_turns}"
    if not isinstance(result, StepResult):
        raise EnvFault(f"environment step returned {type(result).__name__}, not StepResult")
    turn.tool_name = None if result.tool_name is None else live.text(result.tool_name, f"tool name {where}")
    turn.tool_ok = None if result.tool_ok is None else truth_value(result.tool_ok, "tool_ok")
    if truth_value(result.done, "done"):
        reason = "answered" if result.finish_reason is None else result.finish_reason
        if not (isinstance(reason, str) and reason in FINISH_REASONS):
            raise EnvFault(f"environment ended the episode with finish_reason {reason!r}, not one of {FINISH_REASONS}")
        live.end(reason, result.reward, result.reward_components)
        return
    text = live.text("" if result.observation is None else result.observation, f"observation {where}")
    if result.tool_results:  # environment text the renderer will tokenize: made valid Unicode like the observation
        if not all(isinstance(r, ToolResult) for r in result.tool_results):
            raise EnvFault(f"tool_results {where} must be ToolResult objects")
        results = [replace(r, content=live.text(r.content, f"tool result {where}")) for r in result.tool_results]
        result = replace(result, tool_results=results)
    try:
        observation = live.conversation.extend(generated, replace(result, observation=text))
    except Exception as exc:
        raise EnvFault(f"the renderer could not render the environment's answer {where}: {exc}") from exc
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
    token_sampler: TokenSampler | None = None,
    generator: torch.Generator | None = None,
    first_group: int = 0,
    backend: str | None = None,
) -> list[Episode]:
    """Play `group_size` episodes per (env, task) pair, batching generation across all live episodes.

    Episodes come back grouped: all samples of work[0], then work[1], ... Group ids number the
    pairs from `first_group` (so several collections of one iteration never share a group id).
    Each episode's `sampling` records what the token sampler was asked: `settings.temperature`, top_p
    1.0 (token samplers take no top_p), `settings.max_tokens_per_turn`, the policy version, and the
    backend: "hf" when `token_sampler` is None (the in-process decoder), else `backend` (default
    "custom").
    No environment fault or environment output raises out of here (see the module docstring);
    a token sampler that breaks its contract (a different number of generations than contexts, or
    more tokens than a limit) raises ValueError.
    """
    if token_sampler is None:
        token_sampler, backend = hf_token_sampler(policy, settings.generation_batch_size, generator), HF_BACKEND
    sampling = Sampling(
        temperature=settings.temperature,
        top_p=1.0,
        max_tokens_per_turn=settings.max_tokens_per_turn,
        backend=backend or CUSTOM_BACKEND,
        policy_version=policy.version,
    )
    episodes: list[LiveEpisode] = []
    for index, (env, task) in enumerate(work):
        group_id = make_group_id(run_id, iteration, first_group + index, task.task_id)
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
        generations = token_sampler(keys, [list(e.tokens) for e in active], limits, settings.temperature)
        if len(generations) != len(active):
            raise ValueError(f"token sampler returned {len(generations)} generations for {len(active)} contexts")
        for live, gen, limit in zip(active, generations, limits):
            if len(gen.tokens) > limit:
                raise ValueError(f"token sampler returned {len(gen.tokens)} tokens for a context limited to {limit}")
            _apply_turn(policy, live, gen, limit, settings)

    _say_rewrites(episodes)
    return [_to_episode(live, sampling, run_id, iteration, settings.success_threshold) for live in episodes]


def _open_episode(
    policy: Policy, env: Environment, task: Task, group_id: str, index: int, settings: RolloutSettings
) -> LiveEpisode:
    """Open an episode: system and task turns, then the opening of the first policy turn.

    An environment whose `system_prompt` or `start` keeps raising, or whose prompts are not
    text, gives an env_error episode; a prompt longer than `settings.max_prompt_tokens` gives
    a context_overflow one.
    """
    live = LiveEpisode(env, task, NoSession(), group_id, index, [], [])
    try:
        live.env_name = identifier(live, env.name, "environment name")
    except Exception as exc:  # no readable name: the row is keyed by the class name instead
        live.env_name = repair_unicode(type(env).__name__)[0]
        live.fail(f"environment name could not be read: {type(exc).__name__}: {exc}")
        return live
    renderer = policy.episode_renderer()
    native = renderer.native_tools  # tools as schemas and a system prompt without the text action syntax

    def open_session() -> tuple[object, list, EnvSession]:
        system_prompt = env.tool_system_prompt() if native else env.system_prompt()
        return system_prompt, env.tools() if native else [], env.start(task)

    opened = _call_with_retries(live, open_session, settings.max_retries)
    if live.finish_reason is not None:
        return live
    system_prompt, tools, live.session = opened  # type: ignore[misc]
    try:
        system = live.text(system_prompt, "system prompt")
        user = live.text(task.prompt, "task prompt")
    except EnvFault as fault:
        live.fail(str(fault))
        return live
    live.conversation = renderer.start(system, tools, user)
    prompt = live.conversation.prompt_ids
    system_end = live.conversation.system_length
    live.turns = [Turn("system", system, 0, system_end), Turn("user", user, system_end, len(prompt))]
    live.append(prompt, generated=False)
    if settings.max_prompt_tokens is not None and len(prompt) > settings.max_prompt_tokens:
        _cut_off(live, "context_overflow", settings.max_retries)
    return live


def _to_episode(
    live: LiveEpisode, sampling: Sampling, run_id: str, iteration: int, success_threshold: float
) -> Episode:
    task_id = identifier(live, live.task.task_id, "task id")
    group_id = repair_unicode(live.group_id)[0]  # holds the task id, already noted
    notes = [note for note in (live.env_error, *live.repairs) if note]  # messages may quote environment text
    env_error = repair_unicode("; ".join(notes))[0] if notes else None
    return Episode(
        run_id=run_id,
        iteration=iteration,
        policy_version=sampling.policy_version,
        env_name=live.env_name,
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
        env_error=env_error,
        attempts=live.attempts,
        sampling=sampling,
    )
