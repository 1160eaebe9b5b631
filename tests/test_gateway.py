"""The rollout gateway (rl_core/gateway/) under its contract: error answers, deadlines and start retries,
idempotent rewards and completions, stitching, streaming, and 64 concurrent agents on loopback.

The policy is the reference checkpoint (text actions, `chat_format: turnstile`) on the SOP domain `refunds`;
what it "says" comes from a scripted token sampler (`ScriptedSampler`: fixed ids of the reference tokenizer
chosen from the context, distinct log-probs per call), so every recorded id can be checked against what the
sampler produced. Agents are the openai-client test agent (tests/agents/openai_agent.py) or plain HTTP calls.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import httpx
import pytest
import torch
from openai import OpenAI

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import AgentConfig, load_config
from rl_core.environments.base import Environment, Task
from rl_core.gateway.collection import AgentGateway
from rl_core.metrics import rollout_metrics
from rl_core.model.generation import Generation
from rl_core.model.token_sampler import hf_token_sampler
from rl_core.rollout import RolloutSettings, collect_rollouts
from rl_core.run import load_start_policy
from rl_core.trajectory import FINISH_REASONS, Episode
from tests.agents.openai_agent import AgentServer, OpenAIAgent, pull_worker

pytestmark = pytest.mark.gateway

HEADER = "X-Turnstile-Rollout-Id"
ORDER = re.compile(r"order (\d+)")
CUSTOMER = re.compile(r'"customer_id": "(\d+)"')


# -- the world: policy, environment, tasks ---------------------------------------------------------------


@dataclass
class World:
    """The reference policy, the refunds environment and its train tasks, and the tokenizer's ids."""

    policy: object
    env: Environment
    settings: RolloutSettings
    tasks: list[Task]

    def __post_init__(self) -> None:
        renderer = self.policy.episode_renderer()
        self.tokenizer = self.policy.tokenizer
        self.stop_id = renderer.stop_id
        self.assistant_id = renderer.chat.prefix["assistant"][0]
        self.by_order = {t.inputs["order_id"]: t for t in self.tasks}

    def work(self, n: int, start: int = 0) -> list[tuple[Environment, Task]]:
        return [(self.env, t) for t in self.tasks[start : start + n]]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def first_messages(self, task: Task, system: str | None = None) -> list[dict]:
        """The [system, user] opening an agent sends for `task` (the environment's text-action prompt)."""
        return [
            {"role": "system", "content": self.env.system_prompt() if system is None else system},
            {"role": "user", "content": task.prompt},
        ]


@pytest.fixture(scope="module")
def world() -> World:
    cfg = load_config("data/configs/quickstart.yaml")
    env = next(e for e in load_environments(cfg) if e.name == "refunds")
    return World(load_start_policy(cfg), env, rollout_settings(cfg), env.tasks("train"))


# -- scripted token sampler ------------------------------------------------------------------------------

Script = Callable[[str, int, "Task | None"], str]


def call(tool: str, **arguments: str) -> str:
    return f"CALL {tool} {json.dumps(arguments)}"


def answer(decision: str, amount: str) -> str:
    return "ANSWER " + json.dumps({"decision": decision, "amount": amount})


def solve(text: str, turn: int, task: Task | None) -> str:
    """Three policy turns: get the order, get its customer, answer what the task expects (reward 1)."""
    if task is None:
        return answer("deny", "0")
    if turn == 0:
        return call("get_order", order_id=task.inputs["order_id"])
    customers = CUSTOMER.findall(text)
    if turn == 1 and customers:
        return call("get_customer", customer_id=customers[-1])
    return "ANSWER " + json.dumps(task.expected)


def two_turns(text: str, turn: int, task: Task | None) -> str:
    """Get the order, then answer what the task expects."""
    if task is not None and turn == 0:
        return call("get_order", order_id=task.inputs["order_id"])
    return "ANSWER " + json.dumps(task.expected) if task is not None else answer("deny", "0")


def always_deny(text: str, turn: int, task: Task | None) -> str:
    """Get the order, then deny: right for some tasks, wrong for others."""
    if task is not None and turn == 0:
        return call("get_order", order_id=task.inputs["order_id"])
    return answer("deny", "0")


def answer_at_once(text: str, turn: int, task: Task | None) -> str:
    return answer("deny", "0")


class Recorder:
    """What a token sampler produced: every generation with its cache key and context, and batch sizes."""

    def __init__(self) -> None:
        self.generations: list[tuple[int, list[int], Generation]] = []
        self.batches: list[int] = []

    def by_key(self) -> dict[int, tuple[list[int], list[float]]]:
        """Each cache key's generations concatenated (ids, log-probs), in sampling order."""
        out: dict[int, tuple[list[int], list[float]]] = {}
        for key, _, g in self.generations:
            ids, lps = out.setdefault(key, ([], []))
            ids += g.tokens
            lps += g.logprobs
        return out


class ScriptedSampler(Recorder):
    """A TokenSampler `(keys, contexts, limits, temperature) -> list[Generation]` whose turn is
    `script(context text, policy turn index, the task named by the context's order id)` as reference-tokenizer
    ids plus the stop id (cut at the limit). `canonical=False`: each character's ids instead of the text's
    (the same text, ids no re-tokenization gives back). Call n's token i gets log-prob -(64 n + i) / 65536
    (exact in float32, distinct across calls)."""

    def __init__(self, world: World, script: Script, canonical: bool = True):
        super().__init__()
        self.world, self.script, self.canonical = world, script, canonical

    def ids(self, text: str) -> list[int]:
        if self.canonical:
            return self.world.encode(text)
        return [i for ch in text for i in self.world.encode(ch)]

    def __call__(self, keys, contexts, limits, temperature) -> list[Generation]:
        self.batches.append(len(keys))
        out = []
        for key, context, limit in zip(keys, contexts, limits):
            text = self.world.decode(context)
            found = ORDER.search(text)
            task = self.world.by_order.get(found.group(1)) if found else None
            turn = context.count(self.world.assistant_id) - 1
            full = self.ids(self.script(text, turn, task)) + [self.world.stop_id]
            ids = full[:limit]
            n = len(self.generations) + 1
            generation = Generation(ids, [-(64 * n + i) / 65536 for i in range(len(ids))], len(ids) == len(full))
            self.generations.append((key, list(context), generation))
            out.append(generation)
        return out


class PolicySampler(Recorder):
    """The reference policy's own in-process sampler (seeded), recorded."""

    def __init__(self, world: World, seed: int):
        super().__init__()
        self.sample = hf_token_sampler(world.policy, 64, torch.Generator().manual_seed(seed))

    def __call__(self, keys, contexts, limits, temperature) -> list[Generation]:
        self.batches.append(len(keys))
        generations = self.sample(keys, contexts, limits, temperature)
        for key, context, g in zip(keys, contexts, generations):
            self.generations.append((key, list(context), g))
        return generations


def generated(e: Episode) -> tuple[list[int], list[float]]:
    """The episode's ids and log-probs where loss_mask is 1 (after checking the mask covers exactly the
    assistant turns and log-probs are 0 elsewhere)."""
    mask = [0] * len(e.tokens)
    for t in e.turns:
        if t.role == "assistant":
            mask[t.start : t.end] = [1] * (t.end - t.start)
    assert e.loss_mask == mask
    assert all(lp == 0.0 for lp, m in zip(e.behavior_logprobs, e.loss_mask) if not m)
    return (
        [t for t, m in zip(e.tokens, e.loss_mask) if m],
        [lp for lp, m in zip(e.behavior_logprobs, e.loss_mask) if m],
    )


def assert_recorded_exactly(episodes: list[Episode], sampler: Recorder) -> None:
    """Every row's generated ids and log-probs are one cache key's sampler outputs, each key used once."""
    keys = sampler.by_key()
    rows = sorted((tuple(ids), tuple(lps)) for ids, lps in map(generated, episodes))
    sampled = sorted((tuple(ids), tuple(lps)) for ids, lps in keys.values())
    assert rows == sampled
    assert sum(len(ids) for ids, _ in rows) == sum(len(g.tokens) for _, _, g in sampler.generations)


# -- gateway, collection and HTTP helpers ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gateway(max_retries: int = 3, **fields) -> Iterator[AgentGateway]:
    """A started AgentGateway (pull mode unless `mode` says otherwise), closed afterwards."""
    gw = AgentGateway(AgentConfig(**({"mode": "pull"} | fields)), max_retries)
    gw.start()
    try:
        yield gw
    finally:
        gw.close()


class Collecting:
    """`gw.collect` in a thread while the test plays the agents; `episodes()` waits for it."""

    def __init__(self, gw: AgentGateway, world: World, work, settings, sampler, group_size: int):
        self.out: dict[str, object] = {}
        self.started = time.monotonic()

        def run() -> None:
            try:
                self.out["episodes"] = gw.collect(
                    world.policy,
                    work,
                    settings,
                    group_size=group_size,
                    run_id="gw",
                    iteration=1,
                    token_sampler=sampler,
                    backend="scripted",
                )
            except BaseException as exc:  # re-raised by episodes()
                self.out["error"] = exc
            self.out["elapsed"] = time.monotonic() - self.started

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def episodes(self, timeout_s: float = 60.0) -> list[Episode]:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the collection did not end"
        if "error" in self.out:
            raise self.out["error"]
        return self.out["episodes"]

    @property
    def elapsed(self) -> float:
        return self.out["elapsed"]


def collect(gw: AgentGateway, world: World, work, settings, sampler, group_size: int) -> list[Episode]:
    return Collecting(gw, world, work, settings, sampler, group_size).episodes()


class Wire:
    """Plain HTTP to the gateway with its bearer token."""

    def __init__(self, gw: AgentGateway):
        self.http = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {gw.token}"}, timeout=60)

    def pull(self) -> dict:
        """The next rollout request (the collection thread may not have opened the collection yet)."""
        for _ in range(400):
            got = self.http.post("/rollouts/next")
            if got.status_code == 200:
                return got.json()
            assert got.status_code == 204
            time.sleep(0.02)
        raise AssertionError("no rollout to pull")

    def chat(self, rollout_id: str, messages: list[dict], **fields) -> httpx.Response:
        return self.http.post(f"/rollouts/{rollout_id}/v1/chat/completions", json={"messages": messages} | fields)

    def reward(self, rollout_id: str, body: dict, **kw) -> httpx.Response:
        return self.http.post(f"/rollouts/{rollout_id}/reward", json=body, **kw)

    def complete(self, rollout_id: str, body: dict | None = None, **kw) -> httpx.Response:
        return self.http.post(f"/rollouts/{rollout_id}/complete", json=body or {"status": "ready"}, **kw)

    def status(self, rollout_id: str) -> dict:
        got = self.http.get(f"/rollouts/{rollout_id}")
        assert got.status_code == 200, got.text
        return got.json()

    def play(self, world: World, rollout_id: str, messages: list[dict], task: Task, turns: int) -> list[dict]:
        """Make `turns` calls as an agent that keeps its history: each reply is appended as returned and the
        environment's observation answers its tool call. Returns the messages (the last reply included)."""
        session = world.env.start(task)
        for _ in range(turns):
            got = self.chat(rollout_id, messages)
            assert got.status_code == 200, got.text
            message = {k: v for k, v in got.json()["choices"][0]["message"].items() if v is not None}
            messages = [*messages, message]
            result = session.step(message["content"])
            if result.done:
                break
            messages.append(
                {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": result.observation}
            )
        return messages


def error_of(got: httpx.Response, status: int) -> dict:
    assert got.status_code == status, (got.status_code, got.text)
    error = got.json()["error"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return error


# -- 1. error answers ------------------------------------------------------------------------------------


def test_every_error_answer_and_calls_stay_in_their_rollout(world):
    sampler = ScriptedSampler(world, answer_at_once)
    with gateway(token="s3cret", max_request_bytes=2048) as gw:
        run = Collecting(gw, world, world.work(1), world.settings, sampler, group_size=2)
        anon = httpx.Client(base_url=gw.url, timeout=30)
        assert anon.get("/health").json() == {"status": "ok"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            for got in (
                anon.post("/rollouts/next", headers=headers),
                anon.post("/rollouts/ro-x/v1/chat/completions", json={"messages": []}, headers=headers),
                anon.get("/v1/models", headers=headers),
            ):
                assert error_of(got, 401)["code"] == "unauthorized"
                assert got.headers["www-authenticate"] == "Bearer"
        wire = Wire(gw)
        a, b = wire.pull()["rollout_id"], wire.pull()["rollout_id"]
        assert wire.http.post("/rollouts/next").status_code == 204  # both rollouts are out
        assert wire.http.get("/v1/models").json()["data"][0]["id"] == "policy"
        opening = world.first_messages(world.tasks[0])

        # 404: an unknown rollout, on every route that names one
        for got in (
            wire.chat("ro-unknown", opening),
            wire.http.post("/v1/chat/completions", json={"messages": opening}, headers={HEADER: "ro-unknown"}),
            wire.http.post("/rollouts/ro-unknown/v1/completions", json={"prompt": "x"}),
            wire.reward("ro-unknown", {"reward": 1.0}),
            wire.complete("ro-unknown"),
            wire.http.get("/rollouts/ro-unknown"),
        ):
            error = error_of(got, 404)
            assert error["code"] == "unknown_rollout" and "ro-unknown" in error["message"]

        # 413: above rollout.agent.max_request_bytes, with a declared length and chunked
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode()
        assert error_of(wire.http.post(f"/rollouts/{a}/v1/chat/completions", content=big), 413)["code"] == "too_large"
        chunked = wire.http.post(f"/rollouts/{a}/v1/chat/completions", content=iter([big[:1500], big[1500:]]))
        assert "larger than 2048 bytes" in error_of(chunked, 413)["message"]

        # 400: malformed JSON (the position named) and bad fields (the field named)
        broken = error_of(wire.http.post(f"/rollouts/{a}/v1/chat/completions", content=b'{"messages": ['), 400)
        assert broken["code"] == "invalid_json" and "line 1 column 15" in broken["message"]
        for body, param in (
            ({}, "messages"),
            ({"messages": []}, "messages"),
            ({"messages": opening, "n": 2}, "n"),
            ({"messages": opening, "temperature": -1}, "temperature"),
            ({"messages": opening, "top_p": 0}, "top_p"),
            ({"messages": opening, "max_tokens": 0}, "max_tokens"),
            ({"messages": opening, "top_logprobs": 3}, "top_logprobs"),
            ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
            ({"messages": opening, "tools": [{"type": "retrieval"}]}, "tools"),
        ):
            error = error_of(wire.http.post(f"/rollouts/{a}/v1/chat/completions", json=body), 400)
            assert error["param"] == param and error["message"].startswith(f"invalid request: {param}:"), error
        echo = error_of(wire.http.post(f"/rollouts/{a}/v1/completions", json={"prompt": "x", "echo": True}), 400)
        assert "echo is not served" in echo["message"]
        assert error_of(wire.reward(a, {"reward": "lots"}), 400)["param"] == "reward"
        assert error_of(wire.complete(a, {"status": "maybe"}), 400)["param"] == "status"

        # 400: the path's rollout and the header's disagree, or no rollout is named
        crossed = wire.http.post(f"/rollouts/{a}/v1/chat/completions", json={"messages": opening}, headers={HEADER: b})
        error = error_of(crossed, 400)
        assert error["param"] == HEADER and a in error["message"] and b in error["message"]
        assert error_of(wire.reward(a, {"reward": 1.0}, headers={HEADER: b}), 400)["param"] == HEADER
        assert error_of(wire.http.post("/v1/chat/completions", json={"messages": opening}), 400)["param"] == HEADER
        assert wire.status(a)["calls"] == 0 and wire.status(b)["calls"] == 0  # nothing refused was recorded

        # the path form and the header form (the same id in both is fine too)
        to_a = [opening[0], {"role": "user", "content": "This is rollout alpha, order 1."}]
        to_b = [opening[0], {"role": "user", "content": "This is rollout beta, order 2."}]
        got_a = wire.http.post(f"/rollouts/{a}/v1/chat/completions", json={"messages": to_a}, headers={HEADER: a})
        got_b = wire.http.post("/v1/chat/completions", json={"messages": to_b}, headers={HEADER: b})
        for got in (got_a, got_b):
            assert got.status_code == 200, got.text
            body = got.json()
            assert body["object"] == "chat.completion" and body["model"] == "policy"
            assert body["choices"][0]["message"]["content"] == answer("deny", "0")
            assert body["choices"][0]["finish_reason"] == "stop"
        assert wire.status(a)["calls"] == 1 and wire.status(b)["calls"] == 1

        # 409: a call on a completed rollout
        assert wire.reward(a, {"reward": 1.0}).status_code == 200
        assert wire.complete(a).json()["finish_reason"] == "answered"
        ended = error_of(wire.chat(a, to_a), 409)
        assert ended["code"] == "ended" and "answered" in ended["message"]
        assert wire.complete(b, {"status": "ready", "reward": 0.0}).status_code == 200
        episodes = run.episodes()

        # 409: calls, rewards and completions on rollouts of a finished collection
        for got in (wire.chat(a, to_a), wire.chat(b, to_b), wire.reward(b, {"reward": 1.0}), wire.complete(a)):
            assert "has ended" in error_of(got, 409)["message"]
        assert wire.status(a) == {"rollout_id": a, "state": "done", "finish_reason": "answered"}

    assert [(e.sample_index, e.finish_reason, e.reward) for e in episodes] == [
        (0, "answered", 1.0),
        (1, "answered", 0.0),
    ]
    for e, mine, other in ((episodes[0], "alpha", "beta"), (episodes[1], "beta", "alpha")):
        text = world.decode(e.tokens)
        assert f"rollout {mine}" in text and f"rollout {other}" not in text
        assert [t.role for t in e.turns] == ["system", "user", "assistant"] and e.segment == 0
    assert_recorded_exactly(episodes, sampler)


# -- 2. deadlines and starts -----------------------------------------------------------------------------


def test_a_rollout_that_never_completes_times_out(world):
    settings = replace(world.settings, timeout_s=2.0)
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), settings, ScriptedSampler(world, two_turns), group_size=3)
        wire = Wire(gw)
        silent, rewarded = wire.pull()["rollout_id"], wire.pull()["rollout_id"]  # the third is never pulled
        opening = world.first_messages(world.tasks[0])
        for rollout_id in (silent, rewarded):
            assert wire.chat(rollout_id, opening).status_code == 200
        assert wire.reward(rewarded, {"reward": 0.5}).json()["state"] == "running"  # no completion: still open
        episodes = run.episodes()
        late = error_of(wire.complete(silent), 409)
        assert "timeout" in late["message"]
    assert 2.0 <= run.elapsed < 20
    assert [e.finish_reason for e in episodes] == ["timeout", "timeout", "env_error"]
    assert [e.reward for e in episodes] == [0.0, 0.5, 0.0]  # a timed-out rollout keeps the reward it posted
    assert "did not complete the rollout within 2.0 s" in episodes[0].env_error
    assert "no agent took the rollout within 2.0 s (pull mode)" in episodes[2].env_error
    assert [e.num_turns for e in episodes] == [1, 1, 0] and episodes[2].tokens == []


def test_push_starts_are_retried_until_the_agent_accepts(world):
    agent = OpenAIAgent(native=False)
    sampler = ScriptedSampler(world, solve)
    with AgentServer(agent, free_port(), fail_starts=2) as server:
        with gateway(max_retries=3, mode="push", url=server.url) as gw:
            episodes = collect(gw, world, world.work(1), world.settings, sampler, group_size=1)
        assert server.starts == 3
    assert agent.errors == []
    [e] = episodes
    assert (e.finish_reason, e.reward, e.attempts, e.env_error) == ("answered", 1.0, 3, None)
    assert e.num_turns == 3 and [t.role for t in e.turns].count("tool") == 2


def test_an_agent_nobody_serves_ends_every_rollout_as_env_error(world):
    port = free_port()
    with gateway(max_retries=2, mode="push", url=f"http://127.0.0.1:{port}", start_timeout_s=2) as gw:
        episodes = collect(gw, world, world.work(2), world.settings, ScriptedSampler(world, solve), group_size=2)
    assert len(episodes) == 4
    for e in episodes:
        assert (e.finish_reason, e.attempts, e.reward, e.success, e.tokens) == ("env_error", 3, 0.0, False, [])
        assert e.env_error.startswith("the agent did not start the rollout (3 attempt(s)): ConnectError")


# -- 3. rewards and completions --------------------------------------------------------------------------


def test_reward_and_complete_are_idempotent_and_per_turn_rewards_land_on_turns(world):
    settings = replace(world.settings, timeout_s=3.0)
    task = world.tasks[0]
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), settings, ScriptedSampler(world, two_turns), group_size=5)
        wire = Wire(gw)
        twice, per_turn, failed, unscored, reward_last = (wire.pull()["rollout_id"] for _ in range(5))
        for rollout_id in (twice, per_turn, reward_last):
            assert len(wire.play(world, rollout_id, world.first_messages(task), task, turns=2)) == 5
        for rollout_id in (failed, unscored):
            assert wire.chat(rollout_id, world.first_messages(task)).status_code == 200

        # the same client token (body or Idempotency-Key) gets the first answer; one reward is kept
        first = wire.reward(twice, {"reward": 1.0, "client_token": "t1"}).json()
        assert first == {
            "rollout_id": twice,
            "completion": None,
            "reward": 1.0,
            "state": "running",
            "finish_reason": None,
        }
        assert wire.reward(twice, {"reward": 1.0, "client_token": "t1"}).json() == first
        # a client token that comes back with another request is refused, and nothing changes
        assert error_of(wire.reward(twice, {"reward": 0.0, "client_token": "t1"}), 409)["code"] == "token_reused"
        assert wire.reward(twice, {"reward": 1.0}, headers={"Idempotency-Key": "t1"}).json() == first
        assert wire.reward(twice, {"reward": 1.0}).json()["reward"] == 1.0  # the same reward again is harmless
        assert error_of(wire.reward(twice, {"reward": 0.0, "client_token": "t2"}), 409)["code"] == "rewarded"
        done = wire.complete(twice, {"status": "ready", "client_token": "c1"}).json()
        assert (done["state"], done["finish_reason"], done["reward"]) == ("done", "answered", 1.0)
        assert wire.complete(twice, {"status": "ready", "client_token": "c1"}).json() == done
        assert wire.complete(twice, {"status": "ready"}).json()["finish_reason"] == "answered"
        assert error_of(wire.complete(twice, {"status": "failed", "reason": "changed my mind"}), 409)["code"] == "ended"
        assert error_of(wire.reward(twice, {"reward": 0.5, "client_token": "t3"}), 409)["code"] == "rewarded"

        # per-turn rewards: one per model call, finite
        wrong = error_of(wire.reward(per_turn, {"reward": [1.0, 2.0, 3.0]}), 400)
        assert wrong["param"] == "reward" and "got 3 for 2 call(s)" in wrong["message"]
        nan = wire.http.post(f"/rollouts/{per_turn}/reward", content=b'{"reward": NaN}')
        assert "finite" in error_of(nan, 400)["message"]
        assert wire.status(per_turn)["reward"] is None  # refused rewards left nothing behind
        ok = wire.complete(per_turn, {"status": "ready", "reward": [0.25, 0.5], "reward_components": {"tools": 0.25}})
        assert ok.json()["reward"] == 0.75

        # completion first, the reward after it (calls are refused once completed)
        assert wire.complete(reward_last, {"status": "ready"}).json()["state"] == "running"
        refused = error_of(wire.chat(reward_last, world.first_messages(task)), 409)
        assert "completed (ready)" in refused["message"]
        late = wire.reward(reward_last, {"reward": 0.5}).json()
        assert (late["state"], late["finish_reason"], late["reward"]) == ("done", "answered", 0.5)

        # failure with a reason; completion without a reward (no reward_fn) waits for the deadline
        assert wire.complete(failed, {"status": "failed", "reason": "the tool server crashed"}).status_code == 200
        waiting = wire.complete(unscored).json()
        assert (waiting["state"], waiting["completion"]) == ("running", "ready")
        episodes = run.episodes()
    assert run.elapsed >= 3.0
    by_reason = [(e.finish_reason, e.reward) for e in episodes]
    assert by_reason == [
        ("answered", 1.0),
        ("answered", 0.75),
        ("env_error", 0.0),
        ("env_error", 0.0),
        ("answered", 0.5),
    ]
    assert [t.reward for t in episodes[1].turns if t.role == "assistant"] == [0.25, 0.5]
    assert all(t.reward is None for t in episodes[1].turns if t.role != "assistant")
    assert episodes[1].reward_components == {"tools": 0.25} and episodes[1].success is False
    assert all(t.reward is None for t in episodes[0].turns) and episodes[0].success is True
    assert episodes[2].env_error == "the agent reported failure: the tool server crashed"
    assert episodes[3].env_error == "the agent completed the rollout without a reward (POST .../reward)"


def test_a_turnstile_side_reward_function_scores_rollouts(world):
    """`rollout.agent.reward_fn`: the agent posts no reward; the environment replay gives what in-process
    play of the same turns gives (deny is right for some tasks, wrong for others)."""
    work = world.work(4)
    agent = OpenAIAgent(native=False, post_reward=False)
    stop = threading.Event()
    with gateway(reward_fn="rl_core.gateway.rewards:environment_reward") as gw:
        worker = threading.Thread(target=pull_worker, args=(agent, gw.url, gw.token, stop), daemon=True)
        worker.start()
        try:
            episodes = collect(gw, world, work, world.settings, ScriptedSampler(world, always_deny), group_size=1)
        finally:
            stop.set()
            worker.join(timeout=30)
    in_process = collect_rollouts(
        world.policy,
        work,
        world.settings,
        group_size=1,
        run_id="gw",
        iteration=1,
        token_sampler=ScriptedSampler(world, always_deny),
    )
    assert agent.errors == [] and len(agent.played) == 4
    assert [(e.finish_reason, e.reward, e.reward_components) for e in episodes] == [
        (e.finish_reason, e.reward, e.reward_components) for e in in_process
    ]
    assert sorted({e.reward for e in episodes}) == [0.0, 1.0]  # both outcomes occur


# -- 4. stitching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("canonical", [True, False], ids=["canonical-ids", "ids-no-tokenizer-gives"])
def test_a_multi_turn_rollout_is_one_segment_of_exactly_the_sampled_tokens(world, canonical):
    """The agent re-sends its history as text; the gateway extends the segment with the ids the sampler gave
    (never re-tokenized: with `canonical=False` a re-tokenization would differ and break the segment)."""
    work, settings = world.work(2), replace(world.settings, max_tokens_per_turn=96)  # room for per-character ids
    sampler = ScriptedSampler(world, solve, canonical=canonical)
    agent = OpenAIAgent(native=False)
    stop = threading.Event()
    with gateway() as gw:
        workers = [
            threading.Thread(target=pull_worker, args=(agent, gw.url, gw.token, stop), daemon=True) for _ in range(2)
        ]
        for w in workers:
            w.start()
        try:
            episodes = collect(gw, world, work, settings, sampler, group_size=2)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
    assert agent.errors == [] and len(set(agent.played)) == 4
    assert [(e.segment, e.stitch_break, e.finish_reason, e.reward) for e in episodes] == [
        (0, None, "answered", 1.0)
    ] * 4
    assert_recorded_exactly(episodes, sampler)
    assert len(sampler.generations) == 12  # 3 calls per rollout, none repeated or lost
    assert rollout_metrics(episodes)["rollout/stitch_breaks"] == 0.0
    first_turn = next(t for t in episodes[0].turns if t.role == "assistant")
    ids = episodes[0].tokens[first_turn.start : first_turn.end - 1]
    assert (world.encode(world.decode(ids)) == ids) is canonical

    in_process = collect_rollouts(
        world.policy,
        work,
        settings,
        group_size=2,
        run_id="gw",
        iteration=1,
        token_sampler=ScriptedSampler(world, solve, canonical=canonical),
    )
    for e, ip in zip(episodes, in_process, strict=True):
        assert (e.group_id, e.sample_index) == (ip.group_id, ip.sample_index)
        assert e.prompt_tokens == ip.prompt_tokens and e.tokens[: e.prompt_tokens] == ip.tokens[: ip.prompt_tokens]
        assert e.tokens == ip.tokens and e.loss_mask == ip.loss_mask  # the whole episode, token for token
        turns = [(t.role, t.start, t.end, t.text) for t in e.turns]
        assert turns == [(t.role, t.start, t.end, t.text) for t in ip.turns]
        assert [t.tool_name for t in e.turns if t.role == "tool"] == ["get_order", "get_customer"]
        assert [t.tool_name for t in e.turns if t.role == "tool"] == [t.tool_name for t in ip.turns if t.role == "tool"]


def test_the_policy_s_own_samples_are_recorded_exactly(world):
    """The reference policy sampling at temperature 1 (whatever it says, parsed or not): every generated id and
    log-prob in the rows is one the sampler produced, and every first prompt is the in-process engine's."""
    work = world.work(2)
    sampler = PolicySampler(world, seed=0)
    agent = OpenAIAgent(native=False)
    stop = threading.Event()
    with gateway() as gw:
        worker = threading.Thread(target=pull_worker, args=(agent, gw.url, gw.token, stop), daemon=True)
        worker.start()
        try:
            episodes = collect(gw, world, work, world.settings, sampler, group_size=4)
        finally:
            stop.set()
            worker.join(timeout=30)
    assert agent.errors == [] and len(agent.played) == 8
    assert len(episodes) == 8 and all(e.segment == 0 for e in episodes)
    assert all(e.finish_reason in ("answered", "max_turns", "token_cap") for e in episodes)
    assert_recorded_exactly(episodes, sampler)
    assert sum(e.num_turns for e in episodes) == len(sampler.generations)
    in_process = collect_rollouts(
        world.policy,
        work,
        world.settings,
        group_size=1,
        run_id="gw",
        iteration=1,
        token_sampler=PolicySampler(world, 0),
    )
    for e in episodes:
        ip = in_process[0 if e.task_id == work[0][1].task_id else 1]
        assert e.tokens[: e.prompt_tokens] == ip.tokens[: ip.prompt_tokens]


def test_an_agent_that_rewrites_its_history_starts_a_new_segment(world):
    task = world.tasks[0]
    sampler = ScriptedSampler(world, solve)
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), world.settings, sampler, group_size=2)
        wire = Wire(gw)
        edits, drops = wire.pull()["rollout_id"], wire.pull()["rollout_id"]

        # edits: two stitched calls, then the same history under an edited system prompt
        history = wire.play(world, edits, world.first_messages(task), task, turns=2)
        assert (wire.status(edits)["calls"], wire.status(edits)["segments"]) == (2, 1)
        edited = [{"role": "system", "content": "Be brief. " + history[0]["content"]}, *history[1:]]
        got = wire.chat(edits, edited)
        assert got.status_code == 200 and wire.status(edits)["segments"] == 2
        assert wire.complete(edits, {"status": "ready", "reward": 1.0}).status_code == 200

        # drops: after two calls it leaves out the first tool exchange
        history = wire.play(world, drops, world.first_messages(task), task, turns=2)
        shortened = history[:2] + history[4:]
        assert [m["role"] for m in shortened] == ["system", "user", "assistant", "tool"]
        assert wire.chat(drops, shortened).status_code == 200
        assert wire.complete(drops, {"status": "ready", "reward": [0.0, 0.5, 0.5]}).status_code == 200
        episodes = run.episodes()

    assert [(e.sample_index, e.segment) for e in episodes] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, second = episodes[0], episodes[1]
    assert second.stitch_break == "message 0 (system) differs from the previous call's"
    assert episodes[3].stitch_break == "message 2 (assistant) differs from the previous call's"
    assert first.stitch_break is None and episodes[2].stitch_break is None
    assert world.decode(second.tokens).startswith("<|system|>Be brief. Get the order.")
    assert [t.role for t in second.turns] == ["user", "assistant"]
    assert [e.num_turns for e in episodes] == [2, 1, 2, 1]
    # every row carries the rollout's outcome; per-turn rewards follow the calls across segments
    assert [(e.reward, e.finish_reason, e.group_id) for e in episodes[:2]] == [(1.0, "answered", first.group_id)] * 2
    assert [t.reward for e in episodes[2:] for t in e.turns if t.role == "assistant"] == [0.0, 0.5, 0.5]
    assert_recorded_exactly(episodes, sampler)
    metrics = rollout_metrics(episodes)
    assert metrics["rollout/stitch_breaks"] == 2.0 and metrics["rollout/episodes"] == 4.0
    assert rollout_metrics(episodes[:2])["rollout/stitch_breaks"] == 1.0


def test_raw_completions_stitch_when_the_prompt_extends_the_last_call(world):
    task = world.tasks[0]
    sampler = ScriptedSampler(world, solve)
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), world.settings, sampler, group_size=1)
        wire = Wire(gw)
        rollout_id = wire.pull()["rollout_id"]
        path = f"/rollouts/{rollout_id}/v1/completions"
        session = world.env.start(task)

        # a text prompt (special tokens written out), then ids that extend prompt + completion
        opening = f"<|system|>{world.env.system_prompt()}<|end|><|user|>{task.prompt}<|end|><|assistant|>"
        one = wire.http.post(path, json={"prompt": opening, "return_token_ids": True, "logprobs": 1}).json()
        choice = one["choices"][0]
        assert choice["text"] == call("get_order", order_id=task.inputs["order_id"])
        assert choice["token_ids"][-1] == world.stop_id and choice["finish_reason"] == "stop"
        assert choice["logprobs"]["token_logprobs"] == sampler.generations[0][2].logprobs
        observation = session.step(choice["text"]).observation
        tool_turn = world.encode(f"<|tool|>{observation}<|end|><|assistant|>")
        two = wire.http.post(
            path, json={"prompt": one["prompt_token_ids"] + choice["token_ids"] + tool_turn, "return_token_ids": True}
        ).json()
        assert wire.status(rollout_id)["segments"] == 1

        # the agent's own text of the conversation so far, extended: still the same segment
        observation = session.step(two["choices"][0]["text"]).observation
        so_far = world.decode(two["prompt_token_ids"] + two["choices"][0]["token_ids"])
        three = wire.http.post(path, json={"prompt": f"{so_far}<|tool|>{observation}<|end|><|assistant|>"}).json()
        assert three["choices"][0]["text"] == "ANSWER " + json.dumps(task.expected)
        assert wire.status(rollout_id) | {"rollout_id": None} == {
            "rollout_id": None,
            "state": "running",
            "calls": 3,
            "segments": 1,
            "completion": None,
            "reward": None,
            "finish_reason": None,
        }
        # a prompt that does not extend the last call opens a new segment
        assert wire.http.post(path, json={"prompt": opening}).status_code == 200
        assert wire.complete(rollout_id, {"status": "ready", "reward": 1.0}).status_code == 200
        episodes = run.episodes()

    assert [e.segment for e in episodes] == [0, 1]
    assert episodes[1].stitch_break == "the prompt does not start with the previous call's prompt and completion"
    whole = two["prompt_token_ids"] + two["choices"][0]["token_ids"]
    assert episodes[0].tokens[: len(whole)] == whole
    assert episodes[0].num_turns == 3
    assert world.decode(episodes[1].tokens) == opening + answer_text(sampler, 3)
    assert_recorded_exactly(episodes, sampler)


def answer_text(sampler: ScriptedSampler, index: int) -> str:
    """The text (stop id included) of the sampler's `index`-th generation."""
    return sampler.world.decode(sampler.generations[index][2].tokens)


# -- 5. streaming ----------------------------------------------------------------------------------------


def test_streamed_calls_give_what_unstreamed_calls_give(world):
    task = world.tasks[0]
    sampler = ScriptedSampler(world, solve)
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), world.settings, sampler, group_size=2)
        wire = Wire(gw)
        plain_id, streamed_id = wire.pull(), wire.pull()
        plain = OpenAI(base_url=plain_id["base_url"], api_key=gw.token, max_retries=0)
        streamed = OpenAI(base_url=streamed_id["base_url"], api_key=gw.token, max_retries=0)
        kwargs = dict(model="policy", messages=world.first_messages(task), tools=world.env.tools())
        reply = plain.chat.completions.create(**kwargs)
        chunks = list(streamed.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        message = reply.choices[0].message
        assert content == message.content == call("get_order", order_id=task.inputs["order_id"])
        assert (
            [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls]
            == [(tc.function.name, json.loads(tc.function.arguments)) for tc in message.tool_calls]
            == [("get_order", {"order_id": task.inputs["order_id"]})]
        )
        assert finish == [reply.choices[0].finish_reason] == ["tool_calls"]
        assert chunks[-1].usage.model_dump() == reply.usage.model_dump()
        text = plain.completions.create(model="policy", prompt="<|user|>order 1<|end|><|assistant|>")
        pieces = streamed.completions.create(model="policy", prompt="<|user|>order 1<|end|><|assistant|>", stream=True)
        assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text == answer("deny", "0")
        for rollout_id in (plain_id["rollout_id"], streamed_id["rollout_id"]):
            assert wire.complete(rollout_id, {"status": "ready", "reward": 0.0}).status_code == 200
        run.episodes()

    # whole rollouts played by the agent streamed and unstreamed record the same episodes
    played = {}
    for stream in (False, True):
        agent, stop = OpenAIAgent(native=False, stream=stream), threading.Event()
        with gateway() as gw:
            worker = threading.Thread(target=pull_worker, args=(agent, gw.url, gw.token, stop), daemon=True)
            worker.start()
            try:
                played[stream] = collect(gw, world, world.work(2), world.settings, ScriptedSampler(world, solve), 1)
            finally:
                stop.set()
                worker.join(timeout=30)
        assert agent.errors == []
    assert [(e.tokens, e.loss_mask, e.reward, e.segment) for e in played[True]] == [
        (e.tokens, e.loss_mask, e.reward, e.segment) for e in played[False]
    ]
    assert all(e.reward == 1.0 and e.segment == 0 for e in played[True])


# -- 6. load ---------------------------------------------------------------------------------------------


def test_64_concurrent_agents_lose_and_duplicate_nothing(world):
    work, group_size = world.work(16), 4
    sampler = ScriptedSampler(world, solve)
    agent = OpenAIAgent(native=False)

    with gateway(max_concurrency=64, batch_window_s=0.2) as gw:

        def one_rollout() -> None:
            """Ask for a rollout at most 300 times (50 ms apart), play the first one given, and stop."""
            headers = {"Authorization": f"Bearer {gw.token}"}
            for _ in range(300):
                got = httpx.post(f"{gw.url}/rollouts/next", headers=headers, timeout=60)
                if got.status_code == 200:
                    agent.play(got.json())
                    return
                time.sleep(0.05)

        workers = [threading.Thread(target=one_rollout, daemon=True) for _ in range(64)]
        for w in workers:
            w.start()
        episodes = collect(gw, world, work, world.settings, sampler, group_size)
        for w in workers:
            w.join(timeout=30)
        assert not any(w.is_alive() for w in workers)
        statuses = [Wire(gw).status(rollout_id) for rollout_id in agent.played]

    assert agent.errors == [], agent.errors[:3]
    assert len(agent.played) == 64 and len(set(agent.played)) == 64, Counter(agent.played).most_common(3)
    assert Counter(s["finish_reason"] for s in statuses) == {"answered": 64}, statuses
    assert len(episodes) == 64 and all(e.segment == 0 for e in episodes)
    assert sorted((e.group_id, e.sample_index) for e in episodes) == sorted(
        {(e.group_id, i) for e in episodes for i in range(group_size)}
    )
    assert len({e.group_id for e in episodes}) == 16
    assert all(e.finish_reason in FINISH_REASONS and e.finish_reason != "env_error" for e in episodes)
    assert Counter(e.finish_reason for e in episodes) == {"answered": 64}, [e.env_error for e in episodes]
    assert all(e.reward == 1.0 for e in episodes)
    for e, (_, task) in zip(episodes, [pair for pair in work for _ in range(group_size)], strict=True):
        assert e.task_id == task.task_id and e.turns[1].text == task.prompt
        assert task.inputs["order_id"] in world.decode(e.tokens[e.turns[2].start : e.turns[2].end])
    assert_recorded_exactly(episodes, sampler)
    assert len(sampler.generations) == 3 * 64
    assert max(sampler.batches) >= 16, (
        sampler.batches
    )  # the agents' calls were sampled together (64 a batch when unloaded)
    metrics = rollout_metrics(episodes)
    assert (metrics["rollout/reward/mean"], metrics["rollout/stitch_breaks"], metrics["rollout/episodes"]) == (
        1.0,
        0.0,
        64.0,
    )


# -- 7. what a new user's trial broke ----------------------------------------------------------------------


class Slow:
    """A token sampler that takes `seconds` per batch, so calls stay in flight together."""

    def __init__(self, sampler: ScriptedSampler, seconds: float):
        self.sampler, self.seconds = sampler, seconds

    def __call__(self, keys, contexts, limits, temperature):
        time.sleep(self.seconds)
        return self.sampler(keys, contexts, limits, temperature)


def test_parallel_calls_in_one_rollout_each_keep_their_own_prompt_and_count_toward_max_turns(world):
    task = world.tasks[0]
    sampler = ScriptedSampler(world, two_turns)
    settings = replace(world.settings, max_turns=2)
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), settings, Slow(sampler, 0.4), group_size=1)
        wire = Wire(gw)
        rollout_id = wire.pull()["rollout_id"]
        main = world.first_messages(task)
        side = world.first_messages(task, system="You are a sub-agent. Check the order.")
        answers: dict[str, httpx.Response] = {}

        def ask(name: str, messages: list[dict]) -> None:
            answers[name] = Wire(gw).chat(rollout_id, messages, return_token_ids=True)

        threads = [threading.Thread(target=ask, args=(n, m)) for n, m in (("main", main), ("side", side))]
        for thread in threads:
            thread.start()
            time.sleep(0.1)  # both in flight before the first is sampled
        third = wire.chat(rollout_id, main)  # a third call while two are in flight: past max_turns
        for thread in threads:
            thread.join()
        assert error_of(third, 400)["code"] == "max_turns"
        assert wire.complete(rollout_id, {"status": "ready", "reward": 1.0}).status_code == 200
        episodes = run.episodes()

    assert [e.segment for e in episodes] == [0, 1]
    assert episodes[1].stitch_break == "a call of this rollout was still running (parallel calls)"
    for episode, name in zip(episodes, ("main", "side")):
        body = answers[name].json()
        prompt, generated_ids = body["prompt_token_ids"], body["choices"][0]["token_ids"]
        assert episode.tokens == prompt + generated_ids  # each call's completion follows its own prompt
        assert episode.loss_mask == [0] * len(prompt) + [1] * len(generated_ids)
    assert {e.finish_reason for e in episodes} == {"max_turns"}
    assert_recorded_exactly(episodes, sampler)


def test_bad_token_ids_are_refused_and_the_collection_goes_on(world):
    task = world.tasks[0]
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), world.settings, ScriptedSampler(world, two_turns), group_size=2)
        wire = Wire(gw)
        bad, good = wire.pull()["rollout_id"], wire.pull()["rollout_id"]
        vocab = len(world.tokenizer)
        for prompt in ([-1, 5], [5, vocab]):
            refused = error_of(wire.http.post(f"/rollouts/{bad}/v1/completions", json={"prompt": prompt}), 400)
            assert refused["param"] == "prompt" and refused["code"] == "invalid_token_id"
        assert len(wire.play(world, good, world.first_messages(task), task, turns=2)) == 5
        for rollout_id in (bad, good):
            assert wire.complete(rollout_id, {"status": "ready", "reward": 1.0}).status_code == 200
        episodes = run.episodes()
    assert [e.finish_reason for e in episodes] == ["env_error", "answered"]
    assert episodes[0].env_error == "the agent completed the rollout without any model call"


def test_rewards_are_numbers_and_a_changed_reward_is_refused_on_complete_too(world):
    task = world.tasks[0]
    with gateway(reward_wait_s=0.5) as gw:
        run = Collecting(gw, world, world.work(1), world.settings, ScriptedSampler(world, two_turns), group_size=2)
        wire = Wire(gw)
        scored, unscored = wire.pull()["rollout_id"], wire.pull()["rollout_id"]
        for rollout_id in (scored, unscored):
            assert wire.chat(rollout_id, world.first_messages(task)).status_code == 200
        for body in ({"reward": "0.5"}, {"reward": True}, {"reward": 1.0, "reward_components": {"a": "1"}}):
            assert error_of(wire.reward(scored, body), 400)["param"].startswith("reward")
        assert wire.complete(scored, {"status": "ready", "reward": 0.5}).json()["reward"] == 0.5
        assert error_of(wire.complete(scored, {"status": "ready", "reward": 0.9}), 409)["code"] == "rewarded"
        assert wire.complete(scored, {"status": "ready", "reward": 0.5}).status_code == 200  # the same: harmless
        waiting = wire.complete(unscored, {"status": "ready"}).json()
        assert "reward" in waiting["waiting_for"]
        started = time.monotonic()
        episodes = run.episodes()
        waited = time.monotonic() - started
    assert [e.finish_reason for e in episodes] == ["answered", "env_error"]
    assert "without a reward" in episodes[1].env_error
    assert waited < 5  # rollout.agent.reward_wait_s, not rollout.timeout_s


def test_unknown_routes_and_bad_text_get_openai_error_objects(world):
    with gateway() as gw:
        run = Collecting(gw, world, world.work(1), world.settings, ScriptedSampler(world, two_turns), group_size=1)
        wire = Wire(gw)
        rollout_id = wire.pull()["rollout_id"]
        assert error_of(wire.http.post("/v1/responses", json={}), 404)["code"] == "no_route"
        assert error_of(wire.http.get(f"/rollouts/{rollout_id}/v1/chat/completions"), 405)["code"] == "no_route"
        lone = wire.http.post(
            f"/rollouts/{rollout_id}/v1/chat/completions",
            content=b'{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a\\ud800b"}]}',
        )
        assert lone.status_code == 200, lone.text  # repaired (U+FFFD), as environment text is
        assert wire.complete(rollout_id, {"status": "failed", "reason": "x" * 100_000}).status_code == 200
        episodes = run.episodes()
    assert episodes[0].finish_reason == "env_error" and len(episodes[0].env_error) < 3000
    assert "\ufffd" in episodes[0].turns[1].text


# -- 8. native tool calls: GPT-OSS's harmony format through the gateway -------------------------------------


def test_a_harmony_policy_s_agent_episode_is_the_in_process_episode_token_for_token():
    """The tiny GPT-OSS policy (harmony, native tool calls) plays an SOP task's expert moves: once in process,
    once through the gateway by the openai-client agent with native tool calls. Same ids, one segment."""
    from rl_core.environments import load_environment
    from rl_core.environments.expert import solve as expert_solve
    from rl_core.model.gpt_oss import build_tiny_gpt_oss, harmony_encoding, harmony_tokenizer
    from rl_core.model.harmony_renderer import HarmonyRenderer
    from rl_core.model.policy import Policy
    from tests.test_harmony import harmony_call, play

    tok, enc = harmony_tokenizer(), harmony_encoding()
    policy = Policy(build_tiny_gpt_oss(tok), tok, None, renderer=HarmonyRenderer(tok))
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    turns = [enc.encode(harmony_call(a), allowed_special="all") for a in expert_solve(env, task).actions]
    in_process, _ = play(policy, env, task, turns)

    played = iter(turns)

    def sample(keys, contexts, limits, temperature):
        return [Generation(g, [-0.5] * len(g), True) for g in (next(played) for _ in keys)]

    settings = RolloutSettings(max_turns=8, max_tokens_per_turn=400, context_window=4096, temperature=1.0)
    agent, stop = OpenAIAgent(native=True), threading.Event()
    with gateway() as gw:
        worker = threading.Thread(target=pull_worker, args=(agent, gw.url, gw.token, stop), daemon=True)
        worker.start()
        [episode] = gw.collect(
            policy, [(env, task)], settings, group_size=1, run_id="h", iteration=1, token_sampler=sample
        )
        stop.set()
    assert agent.errors == []
    assert (episode.segment, episode.finish_reason, episode.reward) == (0, "answered", in_process.reward)
    assert episode.tokens == in_process.tokens and episode.loss_mask == in_process.loss_mask
    assert [t.role for t in episode.turns] == [t.role for t in in_process.turns]
