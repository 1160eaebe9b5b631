"""An agent written with the official `openai` Python client: it plays SOP-domain tasks through the gateway.

Its loop is plain OpenAI client code (chat completions with tools, tool messages back, then the reward and the
completion over HTTP). Only its tools' implementation comes from Turnstile: the SOP domain's session
(`toolbox`), as any agent's tools come from somewhere. It is served either way the gateway starts rollouts:
push (`AgentServer`: POST /rollout answers at once, the rollout is played in a thread; GET /health) or pull
(`pull_worker`: asks the gateway for the next rollout until told to stop).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import uvicorn
from openai import ConflictError, OpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rl_core.environments import load_environment
from rl_core.environments.actions import ToolCall
from rl_core.environments.messages import AssistantTurn


@dataclass
class Toolbox:
    """The agent's tools for one task: the SOP domain's session. `run(content, tool_calls)` executes an assistant
    message's tool calls (OpenAI dicts), or for a text-action policy its text, and gives the messages to send
    back and whether the episode is over (its reward in `reward`)."""

    session: object
    native: bool
    reward: float | None = None

    def run(self, content: str | None, tool_calls: list[dict]) -> tuple[list[dict], bool]:
        if not self.native:
            result = self.session.step(content or "")
        else:
            calls = tuple(
                ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"] or "{}"), c["id"])
                for c in tool_calls
            )
            result = self.session.respond(AssistantTurn(content=content or "", tool_calls=calls))
        if result.done:
            self.reward = result.reward
            return [], True
        if result.tool_results:
            return [
                {"role": "tool", "tool_call_id": r.call_id, "content": r.content} for r in result.tool_results
            ], False
        if tool_calls:  # a text-action call: its observation is the tool's answer
            return [{"role": "tool", "tool_call_id": tool_calls[0]["id"], "content": result.observation}], False
        return [{"role": "user", "content": result.observation}], False


_ENVIRONMENTS: dict[str, tuple] = {}


def toolbox(task: dict, native: bool) -> Toolbox:
    """The tools for `task` (the request's task): a fresh session of its SOP domain (domains loaded once)."""
    if task["env_name"] not in _ENVIRONMENTS:
        env = load_environment(task["env_name"])
        _ENVIRONMENTS[task["env_name"]] = (
            env,
            {t.task_id: t for split in ("train", "heldout") for t in env.tasks(split)},
        )
    env, tasks = _ENVIRONMENTS[task["env_name"]]
    return Toolbox(env.start(tasks[task["task_id"]]), native)


_HTTP = httpx.Client(timeout=120)  # one connection pool for every rollout's client (building one costs ~20 ms)


@dataclass
class OpenAIAgent:
    """Plays one rollout request with the openai client. `post_reward`: the agent posts the reward its tools gave
    (else it only completes, and a Turnstile-side reward function decides). `stream`: use streamed calls."""

    native: bool
    post_reward: bool = True
    stream: bool = False
    played: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def play(self, request: dict) -> None:
        try:
            self._play(request)
        except Exception as exc:  # an agent that crashes says so
            self.errors.append(f"{type(exc).__name__}: {exc}")
            _HTTP.post(
                f"{request['gateway_url']}/rollouts/{request['rollout_id']}/complete",
                json={"status": "failed", "reason": f"{type(exc).__name__}: {exc}"},
                headers={"Authorization": f"Bearer {request['api_key']}"},
            )

    def _play(self, request: dict) -> None:
        task = request["task"]
        client = OpenAI(base_url=request["base_url"], api_key=request["api_key"], max_retries=0, http_client=_HTTP)
        tools = toolbox(task, self.native)
        messages: list[dict] = [
            {"role": "system", "content": task["system_prompt"]},
            {"role": "user", "content": task["prompt"]},
        ]
        sampling = request["sampling"]
        for _ in range(request["max_turns"]):
            kwargs = dict(
                model="policy",
                messages=messages,
                temperature=sampling["temperature"],
                max_tokens=sampling["max_tokens"],
            )
            if task["tools"]:
                kwargs["tools"] = task["tools"]
            try:
                if self.stream:
                    message = _streamed_message(client, kwargs)
                else:
                    reply = client.chat.completions.create(**kwargs)
                    message = reply.choices[0].message.model_dump(exclude_none=True)
            except ConflictError:  # the gateway ended the rollout (a turn hit the token cap): score what was done
                break
            messages.append(message)
            answers, done = tools.run(message.get("content"), message.get("tool_calls") or [])
            if done:
                break
            messages += answers
        headers = {"Authorization": f"Bearer {request['api_key']}"}
        base = f"{request['gateway_url']}/rollouts/{request['rollout_id']}"
        if self.post_reward:
            reward = tools.reward if tools.reward is not None else tools.session.finish()[0]
            _HTTP.post(
                f"{base}/reward", json={"reward": reward, "client_token": "r1"}, headers=headers
            ).raise_for_status()
        _HTTP.post(
            f"{base}/complete", json={"status": "ready", "client_token": "c1"}, headers=headers
        ).raise_for_status()
        self.played.append(request["rollout_id"])


def _streamed_message(client: OpenAI, kwargs: dict) -> dict:
    """Assemble a streamed chat completion into a message dict (role, content, tool_calls)."""
    content, calls = "", {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(
                call.index, {"id": call.id, "type": "function", "function": {"name": "", "arguments": ""}}
            )
            entry["function"]["name"] += call.function.name or ""
            entry["function"]["arguments"] += call.function.arguments or ""
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


class AgentServer:
    """Push form: the agent behind HTTP. POST /rollout starts a thread that plays the request; GET /health."""

    def __init__(self, agent: OpenAIAgent, port: int, fail_starts: int = 0):
        self.agent, self.port, self.fail_starts = agent, port, fail_starts
        self.starts = 0
        self.threads: list[threading.Thread] = []

        async def rollout(request: Request) -> JSONResponse:
            self.starts += 1
            if self.starts <= self.fail_starts:
                return JSONResponse({"error": "warming up"}, status_code=503)
            body = await request.json()
            thread = threading.Thread(target=self.agent.play, args=(body,), daemon=True)
            thread.start()
            self.threads.append(thread)
            return JSONResponse({"accepted": True})

        async def health(request: Request) -> JSONResponse:
            return JSONResponse({"status": "ok"})

        app = Starlette(routes=[Route("/rollout", rollout, methods=["POST"]), Route("/health", health)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AgentServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def pull_worker(agent: OpenAIAgent, gateway_url: str, token: str, stop: threading.Event) -> None:
    """Pull form: ask the gateway for the next rollout and play it, until `stop` is set."""
    headers = {"Authorization": f"Bearer {token}"}
    while not stop.is_set():
        answer = httpx.post(f"{gateway_url}/rollouts/next", headers=headers, timeout=30)
        if answer.status_code == 204:
            time.sleep(0.05)
            continue
        answer.raise_for_status()
        agent.play(answer.json())


def main() -> None:
    """Serve the agent in the push form until killed: `python -m tests.agents.openai_agent --port 8090`."""
    import argparse

    parser = argparse.ArgumentParser(description="the openai-client SOP agent, served in the push form")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--native", action="store_true", help="the policy calls tools natively")
    args = parser.parse_args()
    with AgentServer(OpenAIAgent(native=args.native), args.port):
        threading.Event().wait()


if __name__ == "__main__":
    main()
