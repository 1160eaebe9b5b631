"""An agent written with the OpenAI Agents SDK (`openai-agents`), a widely used agent framework: it plays
SOP-domain tasks through the rollout gateway with a chat-completions model whose `base_url` is the rollout's.

Its tools are `FunctionTool`s built from the task's JSON schemas; their implementation is the SOP domain's
session (as any agent's tools come from somewhere). The run's final output is its answer; the agent scores it
with the same session and posts the reward, then completes the rollout. Served in the push form by
`tests.agents.openai_agent.AgentServer` (anything with a `play(request)` method).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
from agents import Agent, FunctionTool, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from agents.exceptions import MaxTurnsExceeded
from openai import AsyncOpenAI, ConflictError

from rl_core.environments.actions import format_call
from tests.agents.openai_agent import toolbox

set_tracing_disabled(True)  # no trace export: nothing outside this machine is reachable


@dataclass
class AgentsSDKAgent:
    """Plays one rollout request with `agents.Runner` (text-action policy: a tool call is the policy's
    `CALL tool {...}`, its final output `ANSWER {...}`)."""

    played: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def play(self, request: dict) -> None:
        try:
            asyncio.run(self._play(request))
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            httpx.post(
                f"{request['gateway_url']}/rollouts/{request['rollout_id']}/complete",
                json={"status": "failed", "reason": f"{type(exc).__name__}: {exc}"},
                headers={"Authorization": f"Bearer {request['api_key']}"},
            )

    async def _play(self, request: dict) -> None:
        task = request["task"]
        box = toolbox(task, native=False)
        client = AsyncOpenAI(base_url=request["base_url"], api_key=request["api_key"], max_retries=0)
        model = OpenAIChatCompletionsModel(model="policy", openai_client=client)

        def tool(schema: dict) -> FunctionTool:
            function = schema["function"]

            async def invoke(context, arguments: str) -> str:
                result = box.session.step(format_call(function["name"], json.loads(arguments or "{}")))
                if result.done:
                    box.reward = result.reward
                return result.observation or ""

            return FunctionTool(
                name=function["name"],
                description=function.get("description", ""),
                params_json_schema=function.get("parameters", {"type": "object", "properties": {}}),
                on_invoke_tool=invoke,
                strict_json_schema=False,
            )

        sampling = request["sampling"]
        agent = Agent(
            name="sop-agent",
            instructions=task["system_prompt"],
            model=model,
            tools=[tool(schema) for schema in task["tools"]],
            model_settings=ModelSettings(temperature=sampling["temperature"], max_tokens=sampling["max_tokens"]),
        )
        try:
            result = await Runner.run(agent, task["prompt"], max_turns=request["max_turns"])
            final = box.session.step(str(result.final_output))
            box.reward = final.reward if final.done else 0.0
        except (MaxTurnsExceeded, ConflictError):  # out of turns, or the gateway ended the rollout (token cap)
            box.reward = box.reward if box.reward is not None else box.session.finish()[0]
        headers = {"Authorization": f"Bearer {request['api_key']}"}
        base = f"{request['gateway_url']}/rollouts/{request['rollout_id']}"
        async with httpx.AsyncClient() as http:
            (await http.post(f"{base}/reward", json={"reward": box.reward or 0.0}, headers=headers)).raise_for_status()
            (await http.post(f"{base}/complete", json={"status": "ready"}, headers=headers)).raise_for_status()
        self.played.append(request["rollout_id"])
