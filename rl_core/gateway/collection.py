"""`AgentGateway`: rollouts played by external agents through the OpenAI-compatible gateway.

`AgentGateway.collect` has the signature of `rollout.collect_rollouts`: it plays `group_size` rollouts per
(environment, task) pair and returns the episodes grouped the same way, so the collector and the evaluator
use either. For each rollout:

1. Start. Push (`rollout.agent.mode: push`): `POST {url}/rollout` with the rollout request (below), retried
   `rollout.max_retries` times with exponential backoff (tenacity) on a connection error, a timeout or a
   5xx answer; the agent answers at once and works asynchronously. Pull: the rollout waits in a queue until
   an agent asks `POST /rollouts/next`. At most `rollout.agent.max_concurrency` rollouts are open at once.
2. Model calls. The agent calls `{base_url}/chat/completions` (or `/completions`) with any OpenAI client.
   Each call is rendered with the policy's chat format and stitched (rl_core/gateway/stitching.py), waits for
   the other open rollouts' calls (until each has one waiting, or none came for `rollout.agent.batch_window_s`,
   at most `MAX_WINDOWS` windows), and all waiting calls are sampled in
   ONE token-sampler call (the in-process decoder or the vLLM server), run by the thread that called
   `collect`. The gateway samples at the rollout's temperature (a call's own `temperature` / `top_p` are
   ignored: the recorded log-probs must be those of the distribution sampled); a call's `max_tokens` can only
   lower the per-turn cap `rollout.max_tokens_per_turn`.
3. End. `POST /rollouts/{id}/complete` (`ready`, or `failed` with a reason) and `POST /rollouts/{id}/reward`,
   in either order, both idempotent under a client token (`client_token` in the body or an
   `Idempotency-Key` header: a repeat gets the first answer; the same payload repeated is also harmless).
   With `rollout.agent.reward_fn` the reward comes from that function instead.

The rollout request (`POST {url}/rollout`, and the body of a pulled rollout):
`{"rollout_id", "task": {"task_id", "env_name", "split", "prompt", "inputs", "expected", "system_prompt",
"tools"}, "base_url": "{gateway}/rollouts/{id}/v1", "api_key", "gateway_url", "sampling": {"temperature",
"top_p", "max_tokens"}, "timeout_s", "max_turns"}`. `system_prompt` and `tools` are those the environment
gives the policy's chat format (native tool calls or Turnstile's text actions).

Finish reasons (every row of the rollout carries one): `env_error` when the agent could not be started
(its last answer quoted), said `failed` (its reason), or completed without a reward; `timeout` when it did not
complete within `rollout.timeout_s` (the reward it posted, else 0); `max_turns` when it asked for more than
`rollout.max_turns` calls and `context_overflow` when a call's prompt leaves no room in
`policy.context_window` (or a first prompt exceeds `environment.prompt_tokens`): those calls are answered 400
and the rollout takes no more calls, and also `max_turns` when its `rollout.max_turns`-th call asked for tools
(the agent could not go on); `token_cap` (or `context_overflow`) when a turn reached
`rollout.max_tokens_per_turn` (or the context window) without stopping: the turn is answered (finish reason
`length`), the rollout takes no more calls, as in process; else `answered`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from rl_core.config import AgentConfig
from rl_core.environments.base import Environment, Task
from rl_core.environments.messages import AssistantTurn
from rl_core.gateway.conversation import ChatRendering
from rl_core.gateway.outcome import LiveRollout, RecordedRollout
from rl_core.gateway.protocol import (
    ChatRequest,
    CompleteRequest,
    CompletionRequest,
    GatewayError,
    Message,
    RewardRequest,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    new_id,
    tool_call_items,
    validated,
)
from rl_core.gateway.server import ServerThread, build_app
from rl_core.gateway.stitching import Plan, RolloutRecord
from rl_core.groups import make_group_id
from rl_core.imports import import_from_path
from rl_core.model.generation import Generation
from rl_core.model.policy import Policy
from rl_core.model.token_sampler import CUSTOM_BACKEND, HF_BACKEND, TokenSampler, hf_token_sampler
from rl_core.rollout import RolloutSettings
from rl_core.trajectory import Episode, Sampling

log = logging.getLogger(__name__)

# the longest a model call waits for others to batch with, in batch windows (rollout.agent.batch_window_s)
MAX_WINDOWS = 20
MAX_REASON_CHARS = 2000  # a failed completion's reason is kept up to this length
PROGRESS_EVERY_S = 30.0  # how often a collection that waits on agents says where it stands
MODEL_NAME = "policy"  # the model id the gateway serves (any name a client sends is accepted)
RewardFn = Callable[..., object]


@dataclass
class _Call:
    """A model call waiting for the token sampler."""

    rollout: LiveRollout
    plan: Plan
    key: int
    context: list[int]
    limit: int
    future: asyncio.Future
    cut: str | None = None  # how the rollout ends if the turn stops at `limit`: token_cap, context_overflow, or
    # None when the agent's own max_tokens set the limit


@dataclass
class _Collection:
    """The rollouts of one `collect` call and how they are sampled."""

    rollouts: dict[str, LiveRollout]
    settings: RolloutSettings
    sampling: Sampling
    rendering: ChatRendering
    calls: queue.Queue = field(default_factory=queue.Queue)
    waiting: list[LiveRollout] = field(default_factory=list)  # queued for a start (push) or a pull
    created: float = field(default_factory=time.monotonic)


class AgentGateway:
    """The rollout gateway of one run: its HTTP server (started on the first collection, on
    `rollout.agent.host` / `port`) and the collection being played. `close()` stops the server.

    `token`: the bearer token agents must send (`rollout.agent.token`, else a new random one). Raises
    ValueError for a `reward_fn` that does not import, and OSError when the server cannot bind."""

    def __init__(self, agent: AgentConfig, max_retries: int = 3):
        self.agent = agent
        self.max_retries = max_retries
        self.token = agent.token or secrets.token_urlsafe(24)
        self.reward_fn: RewardFn | None = (
            import_from_path(agent.reward_fn, "rollout.agent.reward_fn", form="package.module:function")
            if agent.reward_fn
            else None
        )
        self._lock = threading.RLock()
        self._one_collection = threading.Lock()  # a collection ahead (overlap_collection) and an evaluation take turns
        self._server: ServerThread | None = None
        self._collection: _Collection | None = None
        self._finished: dict[str, str] = {}  # rollouts of earlier collections -> how they ended
        self._keys = 0
        self._renderings: dict[int, ChatRendering] = {}
        self._http: httpx.AsyncClient | None = None
        self._warned_sampling = False

    # -- lifetime ---------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The gateway's URL as agents reach it (`rollout.agent.public_url`, else http://host:port)."""
        if self.agent.public_url:
            return self.agent.public_url.rstrip("/")
        port = self._server.port if self._server else self.agent.port
        return f"http://{self.agent.host}:{port}"

    def start(self) -> None:
        """Start the HTTP server (once). Raises OSError when it cannot bind."""
        if self._server is not None:
            return
        app = build_app(self, self.token, self.agent.max_request_bytes, MODEL_NAME)
        server = ServerThread(app, self.agent.host, self.agent.port)
        server.start()
        self._server = server
        how = f"starting rollouts at {self.agent.url}/rollout" if self.agent.mode == "push" else "agents pull rollouts"
        log.warning("rollout gateway listening on %s (%s)", self.url, how)

    def close(self) -> None:
        """Stop the HTTP server; open rollouts are abandoned."""
        if self._server is not None:
            if self._http is not None and self._server.loop is not None:
                asyncio.run_coroutine_threadsafe(self._http.aclose(), self._server.loop).result(timeout=10)
            self._server.stop()
            self._server, self._http = None, None

    # -- collect ---------------------------------------------------------------------------------------

    def collect(
        self,
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
        """Play `group_size` rollouts per (env, task) pair through agents; the episodes come back grouped in
        work order, one row per segment (rl_core/gateway/stitching.py). Arguments as
        `rollout.collect_rollouts`. Raises whatever the token sampler raises (the open rollouts are closed:
        their later calls get 409), and OSError when the server cannot start. One collection is played at a
        time: a second caller (an evaluation while a batch is collected ahead) waits for the first."""
        self.start()
        if token_sampler is None:
            token_sampler, backend = hf_token_sampler(policy, settings.generation_batch_size, generator), HF_BACKEND
        sampling = Sampling(
            temperature=settings.temperature,
            top_p=1.0,
            max_tokens_per_turn=settings.max_tokens_per_turn,
            backend=backend or CUSTOM_BACKEND,
            policy_version=policy.version,
        )
        rendering = self._rendering(policy)
        rollouts: dict[str, LiveRollout] = {}
        for index, (env, task) in enumerate(work):
            group_id = make_group_id(run_id, iteration, first_group + index, task.task_id)
            for sample in range(group_size):
                rollout_id = new_id("ro-")
                record = RolloutRecord(rollout_id, task, group_id, sample)
                rollouts[rollout_id] = LiveRollout(record, env, order=len(rollouts))
        collection = _Collection(rollouts, settings, sampling, rendering, waiting=list(rollouts.values()))
        with self._one_collection:
            with self._lock:
                self._collection = collection
            try:
                self._play(collection, token_sampler)
            finally:
                with self._lock:
                    for rollout_id, r in collection.rollouts.items():
                        self._finished[rollout_id] = r.finish_reason or "abandoned"
                    self._collection = None
                self._fail_waiting(collection, GatewayError(409, "the collection this rollout belonged to has ended"))
        episodes = []
        for r in sorted(collection.rollouts.values(), key=lambda r: r.order):
            episodes += self._episodes(r, collection, run_id, iteration)
        return episodes

    def _rendering(self, policy: Policy) -> ChatRendering:
        renderer = policy.episode_renderer()
        if id(renderer) not in self._renderings:
            self._renderings = {id(renderer): ChatRendering(renderer)}
        return self._renderings[id(renderer)]

    def _play(self, c: _Collection, token_sampler: TokenSampler) -> None:
        """The collecting thread: start rollouts, sample batched calls, expire deadlines, until all are done;
        every `PROGRESS_EVERY_S` it logs how many rollouts are still waiting for an agent."""
        said = time.monotonic()
        while True:
            if time.monotonic() - said > PROGRESS_EVERY_S:
                said = time.monotonic()
                self._say_progress(c)
            with self._lock:
                self._start_more(c)
                self._expire(c)
                open_ = [r for r in c.rollouts.values() if r.state == "running" and r.completion is None]
                if all(r.state == "done" for r in c.rollouts.values()):
                    return
            batch = self._take(c, len(open_))
            if batch:
                self._sample(c, batch, token_sampler)

    def _say_progress(self, c: _Collection) -> None:
        with self._lock:
            states = [r.state for r in c.rollouts.values()]
            unrewarded = sum(1 for r in c.rollouts.values() if r.state != "done" and r.completion == "ready")
        log.warning(
            "rollout gateway %s: %d of %d rollouts done, %d not yet taken by an agent, %d completed and waiting for "
            "their reward",
            self.url,
            states.count("done"),
            len(states),
            states.count("queued"),
            unrewarded,
        )

    def _take(self, c: _Collection, open_rollouts: int) -> list[_Call]:
        """The calls to sample together: the first one that comes within 0.1 s, then more until every open
        rollout has one waiting, or no further call came for `batch_window_s` (calls arriving one after another
        keep the batch open, for at most `MAX_WINDOWS` windows in all)."""
        try:
            batch = [c.calls.get(timeout=0.1)]
        except queue.Empty:
            return []
        gap, last_call = self.agent.batch_window_s, time.monotonic() + MAX_WINDOWS * self.agent.batch_window_s
        while len(batch) < open_rollouts:
            wait = min(gap, last_call - time.monotonic())
            if wait <= 0:
                break
            try:
                batch.append(c.calls.get(timeout=wait))
            except queue.Empty:
                break
        while True:  # whatever else is already waiting
            try:
                batch.append(c.calls.get_nowait())
            except queue.Empty:
                return batch

    def _sample(self, c: _Collection, batch: list[_Call], token_sampler: TokenSampler) -> None:
        live = [call for call in batch if not call.future.done()]
        if not live:
            return
        try:
            generations = token_sampler(
                [call.key for call in live],
                [call.context for call in live],
                [call.limit for call in live],
                c.settings.temperature,
            )
            if len(generations) != len(live):
                raise ValueError(f"token sampler returned {len(generations)} generations for {len(live)} contexts")
        except Exception as exc:
            for call in live:
                self._resolve(call.future, GatewayError(503, f"the token sampler failed: {exc}", code="sampler_error"))
            raise
        for call, generation in zip(live, generations):
            if len(generation.tokens) > call.limit:
                raise ValueError(f"token sampler returned {len(generation.tokens)} tokens for a limit of {call.limit}")
            self._resolve(call.future, generation)

    def _resolve(self, future: asyncio.Future, value: object) -> None:
        def settle() -> None:
            if future.done():
                return
            if isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.set_result(value)

        if self._server is not None and self._server.loop is not None:
            self._server.loop.call_soon_threadsafe(settle)

    def _fail_waiting(self, c: _Collection, error: GatewayError) -> None:
        while True:
            try:
                call = c.calls.get_nowait()
            except queue.Empty:
                return
            self._resolve(call.future, error)

    # -- starting rollouts ------------------------------------------------------------------------------

    def _start_more(self, c: _Collection) -> None:
        """Push mode: start queued rollouts while fewer than max_concurrency are open (lock held)."""
        if self.agent.mode != "push":
            return
        running = sum(1 for r in c.rollouts.values() if r.state == "running")
        while c.waiting and running < self.agent.max_concurrency:
            r = c.waiting.pop(0)
            self._run(r, c)
            running += 1
            asyncio.run_coroutine_threadsafe(self._push(r, c), self._server.loop)

    def _run(self, r: LiveRollout, c: _Collection) -> None:
        r.state = "running"
        r.deadline = time.monotonic() + c.settings.timeout_s
        r.record.started = time.monotonic()

    def request_for(self, r: LiveRollout, c: _Collection) -> dict[str, Any]:
        """The rollout request sent to the agent (module docstring)."""
        task, native = r.record.task, c.rendering.renderer.native_tools
        try:
            system_prompt = r.env.tool_system_prompt() if native else r.env.system_prompt()
            tools = r.env.tools()
        except Exception as exc:  # the environment's prompt or tools: the agent gets the task without them
            log.warning("environment %s gave no system prompt or tools: %s", task.env_name, exc)
            system_prompt, tools = "", []
        rollout_id = r.record.rollout_id
        return {
            "rollout_id": rollout_id,
            "task": {
                "task_id": task.task_id,
                "env_name": task.env_name,
                "split": task.split,
                "prompt": task.prompt,
                "inputs": task.inputs,
                "expected": task.expected,
                "system_prompt": system_prompt,
                "tools": tools,
            },
            "base_url": f"{self.url}/rollouts/{rollout_id}/v1",
            "api_key": self.token,
            "gateway_url": self.url,
            "sampling": {
                "temperature": c.settings.temperature,
                "top_p": 1.0,
                "max_tokens": c.settings.max_tokens_per_turn,
            },
            "timeout_s": c.settings.timeout_s,
            "max_turns": c.settings.max_turns,
        }

    async def _push(self, r: LiveRollout, c: _Collection) -> None:
        """POST {url}/rollout, retried; on the last failure the rollout ends as env_error."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.agent.start_timeout_s)
        url = f"{self.agent.url.rstrip('/')}/rollout"
        body = self.request_for(r, c)
        attempts = 0

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, httpx.HTTPStatusError):
                return exc.response.status_code >= 500 or exc.response.status_code == 429
            return isinstance(exc, httpx.TransportError)

        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.max_retries + 1),
                wait=wait_exponential(multiplier=0.2, max=5),
                retry=retry_if_exception(transient),
                reraise=True,
            ):
                with attempt:
                    attempts += 1
                    answer = await self._http.post(url, json=body)
                    answer.raise_for_status()
        except Exception as exc:
            reason = _http_reason(exc)
            with self._lock:
                r.attempts = attempts
                if r.state != "done":
                    r.done("env_error", f"the agent did not start the rollout ({attempts} attempt(s)): {reason}")
            return
        with self._lock:
            r.attempts = attempts

    def next_rollout(self) -> dict[str, Any] | None:
        """Pull form: the next queued rollout (now running, its deadline started), or None."""
        with self._lock:
            c = self._collection
            if c is None or self.agent.mode != "pull":
                return None
            running = sum(1 for r in c.rollouts.values() if r.state == "running")
            if not c.waiting or running >= self.agent.max_concurrency:
                return None
            r = c.waiting.pop(0)
            self._run(r, c)
            return self.request_for(r, c)

    # -- ends -------------------------------------------------------------------------------------------

    def _expire(self, c: _Collection) -> None:
        """End rollouts past their deadline, and queued ones nobody took (lock held)."""
        now = time.monotonic()
        for r in c.rollouts.values():
            if r.state == "running" and now > r.deadline:
                if r.completion == "ready" or r.ended:  # completed (or stopped by the gateway), no reward came
                    self._settle(r, deadline=True)
                else:
                    r.done("timeout", f"the agent did not complete the rollout within {c.settings.timeout_s} s")
            elif r.state == "queued" and self.agent.mode == "pull" and now > c.created + c.settings.timeout_s:
                c.waiting.remove(r)
                r.done("env_error", f"no agent took the rollout within {c.settings.timeout_s} s (pull mode)")

    def _settle(self, r: LiveRollout, deadline: bool = False) -> None:
        """`LiveRollout.settle` with this gateway's reward function and the collection's turn limit (lock held)."""
        max_turns = self._collection.settings.max_turns if self._collection is not None else None
        r.settle(self.reward_fn is not None, max_turns, deadline)

    # -- handlers (called on the server's event loop) ---------------------------------------------------

    def _find(self, rollout_id: str) -> LiveRollout:
        c = self._collection
        if c is not None and rollout_id in c.rollouts:
            return c.rollouts[rollout_id]
        if rollout_id in self._finished:
            raise GatewayError(409, f"rollout {rollout_id} has ended ({self._finished[rollout_id]})", code="ended")
        raise GatewayError(404, f"unknown rollout {rollout_id!r}", code="unknown_rollout")

    def check_rollout(self, rollout_id: str) -> None:
        """404 for an unknown rollout, 409 for one that takes no more calls."""
        with self._lock:
            r = self._find(rollout_id)
            if r.state == "done" or r.completion is not None or r.ended:
                why = r.finish_reason or r.ended or f"completed ({r.completion})"
                raise GatewayError(409, f"rollout {rollout_id} takes no more calls: it has ended ({why})", code="ended")
            if r.state == "queued":
                raise GatewayError(409, f"rollout {rollout_id} has not been started", code="not_started")

    def status(self, rollout_id: str) -> dict[str, Any]:
        """Where a rollout stands: state, calls, segments, completion, reward, finish reason."""
        with self._lock:
            try:
                r = self._find(rollout_id)
            except GatewayError as err:
                if err.status == 409:
                    return {"rollout_id": rollout_id, "state": "done", "finish_reason": self._finished[rollout_id]}
                raise
            return {
                "rollout_id": rollout_id,
                "state": r.state,
                "calls": len(r.record.calls),
                "segments": len(r.record.segments),
                "completion": r.completion,
                "reward": r.reward,
                "finish_reason": r.finish_reason,
            }

    async def chat(self, rollout_id: str, body: Any) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """A chat completion for the rollout (module docstring, step 2)."""
        request: ChatRequest = validated(ChatRequest, body)
        tools = list(request.tools or [])
        call, r, c = self._enqueue(rollout_id, request.messages, tools, request)
        generation = await self._sampled(call, r)
        with self._lock:
            self._answerable(call, r)
            turn = c.rendering.reply(generation.tokens, call.plan.conversation)
            text = c.rendering.decode(generation.tokens)
            call_ids = [call_.call_id or new_id("call_") for call_ in turn.tool_calls]
            message: dict[str, Any] = {"role": "assistant", "content": turn.content or None}
            if turn.reasoning:
                message["reasoning_content"] = turn.reasoning
            if turn.tool_calls:
                message["tool_calls"] = tool_call_items(turn, call_ids)
            reply = Message.model_validate(message)
            record = r.record.record(
                call.plan, generation.tokens, generation.logprobs, generation.stopped, text, turn, reply, call_ids
            )
            r.last_messages = [*request.messages, reply]
            r.cut_off(call.cut, generation.stopped)
        finish = "length" if not generation.stopped else ("tool_calls" if turn.tool_calls else "stop")
        logprobs = None
        if request.logprobs:
            logprobs = [
                {"token": c.rendering.decode([t]), "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(record.completion_ids, record.logprobs)
            ]
        response = chat_response(
            request.model or MODEL_NAME,
            message,
            finish,
            record.prompt_ids,
            record.completion_ids,
            logprobs,
            request.return_token_ids,
        )
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return response, chat_chunks(response, include_usage)
        return response, None

    async def completion(self, rollout_id: str, body: Any) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
        """A completion on a raw prompt (text, tokenized without special tokens added, or token ids)."""
        request: CompletionRequest = validated(CompletionRequest, body)
        with self._lock:
            self.check_rollout(rollout_id)
            rendering = self._collection.rendering
        ids = list(request.prompt) if isinstance(request.prompt, list) else rendering.encode(request.prompt)
        bad = next((i for i in ids if not 0 <= i < rendering.vocab_size), None)
        if bad is not None:
            raise GatewayError(
                400,
                f"prompt holds token id {bad}, outside the policy's vocabulary [0, {rendering.vocab_size})",
                param="prompt",
                code="invalid_token_id",
            )
        call, r, c = self._enqueue(rollout_id, None, [], request, prompt_ids=ids)
        generation = await self._sampled(call, r)
        with self._lock:
            self._answerable(call, r)
            text = c.rendering.decode(generation.tokens)
            turn = AssistantTurn(content=text)
            reply = Message(role="assistant", content=text)
            record = r.record.record(
                call.plan, generation.tokens, generation.logprobs, generation.stopped, text, turn, reply, []
            )
            r.cut_off(call.cut, generation.stopped)
        finish = "stop" if generation.stopped else "length"
        tokens = [c.rendering.decode([t]) for t in record.completion_ids] if request.logprobs is not None else None
        logprobs = list(record.logprobs) if request.logprobs is not None else None
        response = completion_response(
            request.model or MODEL_NAME,
            text,
            finish,
            record.prompt_ids,
            record.completion_ids,
            logprobs,
            tokens,
            request.return_token_ids,
        )
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return response, completion_chunks(response, include_usage)
        return response, None

    async def _sampled(self, call: _Call, r: LiveRollout) -> Generation:
        """The call's generation, once sampled. Raises the sampler's error (the call is released)."""
        try:
            return await call.future
        except BaseException:
            with self._lock:
                r.in_flight -= 1
                r.record.release(call.plan)
            raise

    @staticmethod
    def _answerable(call: _Call, r: LiveRollout) -> None:
        """Take the sampled call out of flight (lock held). Raises GatewayError 409 when the rollout ended
        while it was sampled (the call is released, not recorded)."""
        r.in_flight -= 1
        if r.state == "done":
            r.record.release(call.plan)
            raise GatewayError(409, f"rollout {r.record.rollout_id} ended while the call was sampled", code="ended")

    def _enqueue(
        self,
        rollout_id: str,
        messages: list[Message] | None,
        tools: list[dict[str, Any]],
        request: ChatRequest | CompletionRequest,
        prompt_ids: list[int] | None = None,
    ) -> tuple[_Call, LiveRollout, _Collection]:
        """Plan the call, check its limits, and queue it for the token sampler (lock taken here)."""
        with self._lock:
            self.check_rollout(rollout_id)
            c = self._collection
            r = c.rollouts[rollout_id]
            if not self._warned_sampling and (request.temperature not in (None, c.settings.temperature)):
                self._warned_sampling = True
                log.warning(
                    "an agent asked for temperature %s; the gateway samples at the rollout's %s (the recorded "
                    "log-probs must be those of the distribution sampled)",
                    request.temperature,
                    c.settings.temperature,
                )
            if len(r.record.calls) + r.in_flight >= c.settings.max_turns:
                r.ended = "max_turns"
                self._settle(r)
                raise GatewayError(
                    400, f"the rollout has made its {c.settings.max_turns} calls (rollout.max_turns)", code="max_turns"
                )
            self._keys += 1
            if prompt_ids is not None:
                plan = r.record.plan_ids(prompt_ids, self._keys)
                turn_messages: list[Message] = []
            else:
                plan = r.record.plan(c.rendering, messages, tools, self._keys)
                turn_messages = messages
            context = r.record.context(plan)
            room = c.settings.context_window - len(context)
            first = not r.record.segments and plan.new_segment
            too_long = (
                first and c.settings.max_prompt_tokens is not None and len(context) > c.settings.max_prompt_tokens
            )
            if room < 1 or too_long:
                r.ended = "context_overflow"
                self._settle(r)
                raise GatewayError(
                    400,
                    f"the prompt is {len(context)} tokens: no room is left in the context window "
                    f"({c.settings.context_window} tokens)"
                    + (
                        f" or it exceeds environment.prompt_tokens ({c.settings.max_prompt_tokens})" if too_long else ""
                    ),
                    param="messages",
                    code="context_length_exceeded",
                )
            cap = c.settings.max_tokens_per_turn
            limit = min(cap, room, request.token_limit() or room)
            cut = "token_cap" if limit == cap else "context_overflow" if limit == room else None
            seg = r.record.begin(plan, turn_messages, tools, self._keys)
            r.in_flight += 1
            key = seg.key
            future = asyncio.get_running_loop().create_future()
            call = _Call(r, plan, key, context, limit, future, cut)
            c.calls.put(call)
            return call, r, c

    def complete(self, rollout_id: str, body: Any, idempotency_key: str | None) -> dict[str, Any]:
        """`POST /rollouts/{id}/complete` (module docstring, step 3)."""
        request: CompleteRequest = validated(CompleteRequest, body)
        token = request.client_token or idempotency_key
        reason = None if request.reason is None else request.reason[:MAX_REASON_CHARS]
        with self._lock:
            r = self._find(rollout_id)
            repeat = r.repeat(token, ("complete", request.model_dump(exclude={"client_token"})))
            if repeat is not None:
                return repeat
            if r.state == "done" and r.finish_reason == "timeout":
                raise GatewayError(409, f"rollout {rollout_id} timed out", code="ended")
            if r.completion is not None and (r.completion, r.fail_reason) != (request.status, reason):
                if not (r.completion == request.status == "ready"):
                    raise GatewayError(
                        409, f"rollout {rollout_id} was already completed ({r.completion})", code="ended"
                    )
            if request.reward is not None:
                r.take_reward(request.reward, request.reward_components)
            if r.completion is None:
                r.completion, r.fail_reason = request.status, reason
                if request.status == "ready" and r.reward is None and self.reward_fn is None:
                    r.deadline = min(r.deadline, time.monotonic() + self.agent.reward_wait_s)
            self._settle(r)
            return r.answer(token, self.reward_fn is not None, self.agent.reward_wait_s)

    def reward(self, rollout_id: str, body: Any, idempotency_key: str | None) -> dict[str, Any]:
        """`POST /rollouts/{id}/reward` (module docstring, step 3)."""
        request: RewardRequest = validated(RewardRequest, body)
        token = request.client_token or idempotency_key
        with self._lock:
            r = self._find(rollout_id)
            repeat = r.repeat(token, ("reward", request.model_dump(exclude={"client_token"})))
            if repeat is not None:
                return repeat
            if r.state == "done" and r.finish_reason == "timeout":
                raise GatewayError(409, f"rollout {rollout_id} timed out", code="ended")
            r.take_reward(request.reward, request.reward_components)
            self._settle(r)
            return r.answer(token, self.reward_fn is not None, self.agent.reward_wait_s)

    # -- episodes ---------------------------------------------------------------------------------------

    def _episodes(self, r: LiveRollout, c: _Collection, run_id: str, iteration: int) -> list[Episode]:
        reason, note = r.finish_reason or "env_error", r.env_error
        reward, components, turn_rewards = r.reward or 0.0, r.components, r.turn_rewards
        if self.reward_fn is not None and reason not in ("env_error", "timeout"):
            try:
                reward, components = self._judge(r, c)
                turn_rewards = None
            except Exception as exc:  # a reward function that raises ends the rollout as env_error
                reason, note = "env_error", f"rollout.agent.reward_fn failed: {type(exc).__name__}: {exc}"
        if reason == "env_error":
            reward, components, turn_rewards = 0.0, {}, None
        episodes = r.record.to_episodes(
            run_id=run_id,
            iteration=iteration,
            sampling=c.sampling,
            finish_reason=reason,
            reward=reward,
            components=components,
            turn_rewards=turn_rewards,
            success_threshold=c.settings.success_threshold,
            env_error=note,
        )
        for e in episodes:
            e.attempts = r.attempts
        return episodes

    def _judge(self, r: LiveRollout, c: _Collection) -> tuple[float, dict[str, float]]:
        recorded = RecordedRollout(
            rollout_id=r.record.rollout_id,
            calls=list(r.record.calls),
            messages=list(r.last_messages),
            turns=[call.turn for call in r.record.calls],
            environment=r.env,
            status=r.completion or "",
            native_tools=c.rendering.renderer.native_tools,
        )
        scored = self.reward_fn(recorded, r.record.task)
        reward, components = scored if isinstance(scored, tuple) else (scored, {})
        reward = float(reward)
        components = {str(k): float(v) for k, v in dict(components).items()}
        if not (math.isfinite(reward) and all(math.isfinite(v) for v in components.values())):
            raise ValueError(f"it returned a non-finite reward {reward} or components {components}")
        return reward, components


def _http_reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}: {exc.response.text[:300]}"
    return f"{type(exc).__name__}: {exc}"
