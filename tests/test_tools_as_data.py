"""Tools as data (issue 11, item 1): OpenAI tool schemas, structured turns, tool results, the text adapter."""

from __future__ import annotations

import json
import random

import pytest

from rl_core.environments import available_domains, load_environment
from rl_core.environments.actions import FinalAnswer, ToolCall, parse_action
from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.environments.expert import solve
from rl_core.environments.messages import AssistantTurn, ToolResult, error_content
from rl_core.environments.sop import ANSWER_TOOL, SOPEnvironment

DOMAINS = available_domains()


def as_turn(action_text: str, call_id: str) -> AssistantTurn:
    """The structured form of a text action: CALL -> a tool call, ANSWER -> a submit_answer call."""
    action = parse_action(action_text)
    if isinstance(action, ToolCall):
        return AssistantTurn(tool_calls=(ToolCall(action.tool, action.arguments, call_id),))
    assert isinstance(action, FinalAnswer)
    return AssistantTurn(tool_calls=(ToolCall(ANSWER_TOOL, dict(action.fields), call_id),))


def test_sop_tools_are_openai_function_schemas_with_the_answer_tool():
    env = load_environment("refunds")
    tools = env.tools()
    assert [t["type"] for t in tools] == ["function"] * len(tools)
    names = [t["function"]["name"] for t in tools]
    assert names == [*env.domain.tools, ANSWER_TOOL]
    for tool in tools[:-1]:
        spec = env.domain.tools[tool["function"]["name"]]
        assert tool["function"]["parameters"] == spec.parameters
        assert tool["function"]["description"] == spec.description
    answer = tools[-1]["function"]["parameters"]
    assert answer["properties"] == {f: {"type": "string"} for f in env.domain.answer_fields}
    assert answer["required"] == list(env.domain.answer_fields)
    json.dumps(tools)  # JSON-ready, as a chat template takes them
    assert "CALL" not in env.tool_system_prompt() and ANSWER_TOOL in env.tool_system_prompt()
    assert env.domain.procedure_text in env.tool_system_prompt()


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_expert_played_through_tool_calls_gets_the_same_observations_and_reward(domain):
    """Both turn forms of every shipped domain: the same calls give the same observations, the same
    answer the same reward (the expert's episodes, with mistakes, on several tasks)."""
    env = load_environment(domain)
    for task in env.tasks("train")[:5]:
        episode = solve(env, task, mistake_rate=0.3, rng=random.Random(task.task_id))
        session = env.start(task)
        for turn_number, (action, observation) in enumerate(episode.turns):
            result = session.respond(as_turn(action, f"call-{turn_number}"))
            if observation is None:  # the answer
                assert result.done and result.finish_reason == "answered"
                assert (result.reward, result.reward_components) == (episode.reward, episode.reward_components)
            else:
                assert not result.done
                [tool_result] = result.tool_results
                assert tool_result.content == observation == result.observation
                assert tool_result.call_id == f"call-{turn_number}"


def test_several_calls_in_one_turn_run_in_order_and_submit_answer_ends_the_episode():
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    expert = solve(env, task)
    calls = [as_turn(action, f"c{i}").tool_calls[0] for i, action in enumerate(expert.actions)]
    session = env.start(task)
    unknown = ToolCall("no_such_tool", {}, "u")
    result = session.respond(AssistantTurn(tool_calls=(calls[0], unknown, calls[1] if len(calls) > 2 else calls[0])))
    assert [r.call_id for r in result.tool_results] == ["c0", "u", "c1" if len(calls) > 2 else "c0"]
    assert result.tool_results[1] == ToolResult(
        "u", "no_such_tool", error_content("unknown tool 'no_such_tool'"), False
    )
    assert result.tool_results[0].ok and not result.tool_ok  # one failed call: the turn is not all ok
    assert result.tool_results[0].content == expert.turns[0][1]
    # the answer, then a call that is never run
    final = session.respond(AssistantTurn(tool_calls=(calls[-1], ToolCall("no_such_tool", {}, "late"))))
    assert final.done and final.reward == expert.reward and final.tool_results == []
    with pytest.raises(RuntimeError, match="already answered"):
        session.respond(AssistantTurn(tool_calls=(calls[0],)))


def test_bad_turns_are_error_observations_and_the_episode_goes_on():
    env = load_environment("refunds")
    task = env.tasks("train")[0]
    session = env.start(task)
    parse = session.respond(AssistantTurn(content="<tool_call>{oops", parse_error="bad JSON in the tool call"))
    assert (parse.observation, parse.tool_ok, parse.done) == (error_content("bad JSON in the tool call"), False, False)
    plain = session.respond(AssistantTurn(content="I think the refund is fine."))
    assert not plain.done and json.loads(plain.observation)["error"].startswith("call one of the tools")
    number = session.respond(AssistantTurn(tool_calls=(ToolCall(ANSWER_TOOL, {"decision": 1}, "a"),)))
    assert not number.done and number.tool_results == [
        ToolResult("a", ANSWER_TOOL, error_content("answer value for 'decision' must be a string"), False)
    ]
    bad_args = session.respond(AssistantTurn(tool_calls=(ToolCall(next(iter(env.domain.tools)), {"x": "1"}, "b"),)))
    assert not bad_args.tool_results[0].ok and "unknown argument 'x'" in bad_args.tool_results[0].content
    reward, _ = session.finish()
    assert reward == env.start(task).finish()[0]  # nothing was answered: the no-answer reward


class _TextOnlySession(EnvSession):
    """A text-format environment's session: records what it was sent."""

    def __init__(self):
        self.sent: list[str] = []

    def step(self, action_text: str) -> StepResult:
        self.sent.append(action_text)
        if action_text.startswith("ANSWER"):
            return StepResult(observation=None, done=True, reward=1.0, finish_reason="answered")
        return StepResult(observation='{"row": 1}', tool_name="lookup", tool_ok=True)

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


class _TextOnly(Environment):
    name = "text-only"

    def system_prompt(self) -> str:
        return "CALL lookup {...} or ANSWER {...}"

    def tasks(self, split: str) -> list[Task]:
        return [Task("t1", self.name, split, "look it up")]

    def start(self, task: Task) -> EnvSession:
        return _TextOnlySession()


def test_a_text_format_environment_answers_structured_turns_through_the_adapter():
    env = _TextOnly()
    assert env.tools() == [] and env.tool_system_prompt() == env.system_prompt()
    session = env.start(env.tasks("train")[0])
    first, extra = ToolCall("lookup", {"id": "7"}, "c1"), ToolCall("lookup", {"id": "8"}, "c2")
    result = session.respond(AssistantTurn(tool_calls=(first, extra)))
    assert session.sent == ['CALL lookup {"id": "7"}']  # one tool call per turn in the text format
    assert result.tool_results == [
        ToolResult("c1", "lookup", '{"row": 1}', True),
        ToolResult("c2", "lookup", error_content("one tool call per turn"), False),
    ]
    broken = session.respond(AssistantTurn(parse_error="no closing tag"))
    assert broken.observation == error_content("no closing tag") and session.sent == ['CALL lookup {"id": "7"}']
    done = session.respond(AssistantTurn(content='ANSWER {"x": "1"}'))
    assert done.done and done.reward == 1.0 and session.sent[-1] == 'ANSWER {"x": "1"}'


def test_the_sop_environment_offers_both_forms():
    assert isinstance(load_environment("refunds"), SOPEnvironment)
    env = load_environment("refunds")
    task = env.tasks("heldout")[0]
    text_session, tool_session = env.start(task), env.start(task)
    action = solve(env, task).actions[0]
    assert text_session.step(action).observation == tool_session.respond(as_turn(action, "x")).observation
