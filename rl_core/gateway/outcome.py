"""How one agent rollout ends: its state while played, and the rules that decide its finish reason and reward.

`LiveRollout` is one rollout of a collection (rl_core/gateway/collection.py) while it is played, guarded by the
gateway's lock. Its methods are the rules of the contract's last step (README, "Bring your own agent"):
`take_reward` (finite numbers, one per call or one for the episode; the same reward again is harmless, another
is refused), `repeat` (a client token's first answer; the token with another request is refused),
`cut_off` (a turn stopped at the run's limits ends the rollout), `settle` (when what decides the outcome is
there: the finish reason and reward) and `answer` (what `/complete` and `/reward` return).
`RecordedRollout` is what a Turnstile-side reward function is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rl_core.environments.base import Environment
from rl_core.environments.messages import AssistantTurn
from rl_core.gateway.protocol import GatewayError, Message
from rl_core.gateway.stitching import RolloutRecord


@dataclass
class RecordedRollout:
    """What a Turnstile-side reward function (`rollout.agent.reward_fn`) is given with the task: the rollout's
    `calls` (rl_core/gateway/stitching.py `CallRecord`: prompt ids, completion ids, log-probs, text, parsed
    turn), `messages` (the last call's messages and the assistant message returned for it), `turns` (each
    call's parsed `AssistantTurn`, in order), its `environment` (the Environment the task came from), the
    agent's `status` ("ready"), and whether the policy calls tools natively (`native_tools`; else its turns
    are Turnstile's text actions, the whole text in `content`)."""

    rollout_id: str
    calls: list
    messages: list[Message]
    turns: list[AssistantTurn]
    environment: Environment
    status: str
    native_tools: bool = True


@dataclass
class LiveRollout:
    """One rollout of a collection while it is played (guarded by the gateway's lock).

    state: queued -> running -> done. deadline: `time.monotonic()` seconds. ended: max_turns, token_cap or
    context_overflow when the gateway stopped taking calls. completion: "ready" / "failed" as the agent said.
    reward, turn_rewards, components: as posted. finish_reason, env_error: set when done. in_flight: calls
    planned and not yet answered (they count toward rollout.max_turns)."""

    record: RolloutRecord
    env: Environment
    order: int
    state: str = "queued"
    deadline: float = math.inf
    ended: str | None = None
    completion: str | None = None
    fail_reason: str | None = None
    reward: float | None = None
    turn_rewards: list[float] | None = None
    components: dict[str, float] = field(default_factory=dict)
    finish_reason: str | None = None
    env_error: str | None = None
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # client token -> first answer
    payloads: dict[str, object] = field(default_factory=dict)  # client token -> the request it came with
    attempts: int = 1  # tries the agent's start took (push mode)
    in_flight: int = 0
    last_messages: list[Message] = field(default_factory=list)

    def done(self, reason: str, note: str | None = None) -> None:
        """End the rollout as `reason` (a finish reason), with `note` as its env_error text."""
        self.state, self.finish_reason = "done", reason
        if note:
            self.env_error = note

    def settle(self, judged: bool, max_turns: int | None, deadline: bool = False) -> None:
        """End the rollout once what decides its outcome is there. `judged`: a Turnstile-side reward function
        scores it (no posted reward needed). `max_turns`: the collection's rollout.max_turns. `deadline`: its
        deadline has passed.

        A rollout the gateway stopped (`ended`) keeps that finish reason even when the agent then reports
        failure (it was refused further calls); without a reward it scores 0. One completed without any model
        call, or (past the deadline) without a reward, is env_error; `max_turns` when its last allowed call
        asked for tools; else `answered`."""
        if self.state == "done":
            return
        if self.completion == "failed" and not self.ended:
            self.done("env_error", f"the agent reported failure: {self.fail_reason or 'no reason given'}")
            return
        if self.completion is None and not (self.ended and deadline):
            return
        calls = self.record.calls
        if not calls:  # nothing the policy did: a reward here would score the agent alone
            self.done("env_error", "the agent completed the rollout without any model call")
            return
        if not judged and self.reward is None:
            if self.ended and (deadline or self.completion == "failed"):  # stopped by the gateway, never scored
                self.reward = 0.0
            elif not deadline:
                return
            else:
                self.done("env_error", "the agent completed the rollout without a reward (POST .../reward)")
                return
        out_of_turns = max_turns is not None and len(calls) >= max_turns and bool(calls[-1].turn.tool_calls)
        self.done(self.ended or ("max_turns" if out_of_turns else "answered"))

    def cut_off(self, cut: str | None, stopped: bool) -> None:
        """A turn that did not stop by itself within the run's limits ends the rollout, as in process: it is
        answered, and later calls are refused (409). `cut`: `token_cap` at `rollout.max_tokens_per_turn`,
        `context_overflow` at the context window, None when the agent's own max_tokens set the limit."""
        if not stopped and cut is not None and self.ended is None:
            self.ended = cut

    def repeat(self, token: str | None, payload: object) -> dict[str, Any] | None:
        """The first answer to a repeated client token (None for a new one, whose `payload` is remembered).
        Raises GatewayError 409 when the token came with another request."""
        if not token or token not in self.answers:
            if token:
                self.payloads[token] = payload
            return None
        if self.payloads.get(token) != payload:
            raise GatewayError(
                409, f"client_token {token!r} was used for another request on this rollout", code="token_reused"
            )
        return self.answers[token]

    def take_reward(self, reward: float | list[float], components: Mapping[str, float] | None) -> None:
        """Record the agent's reward: one value, or one per model call (their sum is the episode's), and named
        components. Raises GatewayError 400 for a non-finite value or a per-call list of the wrong length, 409
        when another reward is already recorded (the same one again is harmless)."""
        values = reward if isinstance(reward, list) else [reward]
        if not all(math.isfinite(v) for v in values) or not all(math.isfinite(v) for v in (components or {}).values()):
            raise GatewayError(400, "reward and reward_components must be finite numbers", param="reward")
        calls = len(self.record.calls)
        if isinstance(reward, list) and len(reward) != calls:
            raise GatewayError(
                400,
                f"a per-turn reward needs one value per model call: got {len(reward)} for {calls} call(s)",
                param="reward",
            )
        total = float(sum(values))
        turns = [float(v) for v in reward] if isinstance(reward, list) else None
        if self.reward is not None:
            if (self.reward, self.turn_rewards, self.components) == (total, turns, dict(components or {})):
                return  # the same reward again: harmless
            raise GatewayError(
                409, f"rollout {self.record.rollout_id} already has a reward ({self.reward})", code="rewarded"
            )
        self.reward, self.turn_rewards, self.components = total, turns, dict(components or {})

    def answer(self, token: str | None, judged: bool, reward_wait_s: float) -> dict[str, Any]:
        """What `/complete` and `/reward` return (remembered under the client `token`): where the rollout
        stands, and `waiting_for` while a ready rollout still needs its reward (within `reward_wait_s`)."""
        answer = {
            "rollout_id": self.record.rollout_id,
            "completion": self.completion,
            "reward": self.reward,
            "state": self.state,
            "finish_reason": self.finish_reason,
        }
        if self.state != "done" and self.completion == "ready" and self.reward is None and not judged:
            answer["waiting_for"] = f"the reward (POST .../reward within {reward_wait_s} s)"
        if token:
            self.answers[token] = answer
        return answer
