"""Data-driven procedure (SOP) environments: a procedure text, fixture-backed tools, tasks.

A domain folder holds:
  domain.json          name, description, procedure_text, tools, procedure, answer_fields
  fixtures.json        {table: [row, ...]}; a row is a flat object of strings
  tasks_<split>.jsonl  one task a line: task_id, prompt, inputs, expected (splits: train, heldout)

A tool is {"name", "description", "parameters", "table", "key", "not_found", "returns"?}:
`parameters` is a JSON schema of string arguments; the call reads the row of `table` whose
`key` fields equal the same-named arguments; the observation is that row's `returns`
fields (default: all, in the row's order) as compact JSON. No row -> an error observation
from the `not_found` template (formatted with the arguments). `procedure` is the
machine-readable procedure the expert solver plays (see expert.py); this module only
stores it.

Episodes (SOPSession): a valid CALL answers the row (tool_ok=True); a malformed action,
unknown tool, schema violation or missing row answers {"error": "..."} (tool_ok=False) and
the episode goes on. A well-formed ANSWER ends it (finish_reason "answered"). Reward: each
answer field is worth 1/len(answer_fields) when it equals the expected value (strip +
lowercase); an episode without a well-formed answer gets FORMAT_PENALTY subtracted.
Components: "field/<name>" per field plus "format_penalty", summing to the reward.
Everything is deterministic.

Both turn forms are offered (rl_core/environments/base.py). As text: the CALL / ANSWER actions
above, explained in `system_prompt()`. As native tool calls: `tools()` gives the domain's tools
and `submit_answer` (its parameters are the answer fields, all strings) as OpenAI function
schemas, `tool_system_prompt()` is the procedure without the action syntax, and
`SOPSession.respond` runs each call of a turn in order (a `submit_answer` call is the final
answer: it ends the episode, and calls after it in the turn are not run). A turn with no tool
call, or whose tool-call syntax did not parse, gets an error result and the episode goes on.
The same tool call gives the same observation and the same answer the same reward in both forms.

`ProcedureSession` (both turn forms, the final answer and its scoring), `render_system_prompt`,
`tool_system_prompt` and `answer_tool_schema` are shared with the SOP-Bench-format environments
(rl_core/environments/sopbench.py), which run their tools through a Python manager class instead.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl_core.environments.actions import FinalAnswer, ParseFailure, ToolCall, check_arguments, parse_action
from rl_core.environments.base import Environment, EnvSession, StepResult, Task
from rl_core.environments.messages import AssistantTurn, ToolResult, ToolSchema, error_content

SPLITS = ("train", "heldout")
FORMAT_PENALTY = 0.1
ANSWER_TOOL = "submit_answer"  # the native-tool-call form of ANSWER {...}


@dataclass(frozen=True)
class ToolSpec:
    """One fixture-backed tool; `rows` indexes its table by the `key` argument values."""

    name: str
    description: str
    parameters: dict[str, Any]
    key: tuple[str, ...]
    returns: tuple[str, ...] | None
    not_found: str
    rows: Mapping[tuple[str, ...], dict[str, str]]

    @property
    def argument_names(self) -> list[str]:
        return list(self.parameters.get("properties", {}))

    def run(self, arguments: dict[str, str]) -> tuple[str, bool]:
        """Observation text and success flag for already-checked arguments."""
        row = self.rows.get(tuple(arguments[name] for name in self.key))
        if row is None:
            return error_content(self.not_found.format(**arguments)), False
        shown = row if self.returns is None else {field: row[field] for field in self.returns}
        return json.dumps(shown), True


@dataclass(frozen=True)
class SOPDomain:
    """A domain folder, loaded and checked. Build with `SOPDomain.load(path)`."""

    name: str
    description: str
    procedure_text: str
    tools: dict[str, ToolSpec]
    procedure: list[Any]
    answer_fields: tuple[str, ...]
    splits: dict[str, list[Task]]

    @classmethod
    def load(cls, path: Path) -> SOPDomain:
        """Read a domain folder; raise ValueError naming the file and the problem."""
        path = Path(path)
        spec = _read_json(path / "domain.json")
        tables = _read_json(path / "fixtures.json")
        name = spec["name"]
        tools = {tool["name"]: _build_tool(tool, tables, path) for tool in spec["tools"]}
        answer_fields = tuple(spec["answer_fields"])
        splits = {split: _read_tasks(path / f"tasks_{split}.jsonl", name, split, answer_fields) for split in SPLITS}
        return cls(
            name=name,
            description=spec.get("description", ""),
            procedure_text=spec["procedure_text"],
            tools=tools,
            procedure=spec["procedure"],
            answer_fields=answer_fields,
            splits=splits,
        )


def score_answer(
    answer_fields: tuple[str, ...], expected: dict[str, Any], answer: dict[str, str] | None
) -> tuple[float, dict[str, float]]:
    """Reward and components for a final answer (None = no well-formed answer was given)."""
    weight = 1.0 / len(answer_fields)
    components: dict[str, float] = {}
    correct = 0
    for field in answer_fields:
        right = answer is not None and field in answer and _normalize(answer[field]) == _normalize(expected[field])
        correct += right
        components[f"field/{field}"] = weight if right else 0.0
    penalty = 0.0 if answer is not None else -FORMAT_PENALTY
    components["format_penalty"] = penalty
    return correct / len(answer_fields) + penalty, components


class ProcedureSession(EnvSession):
    """An episode in the action protocol every procedure environment shares: tool calls until a final answer
    whose fields are scored by `score_answer`, in both turn forms (text `CALL`/`ANSWER` through `step`,
    native tool calls with `submit_answer` through `respond`; the module docstring).

    A subclass runs the tool calls (`_call`: an unknown tool, bad arguments or a failed call is an error
    observation with tool_ok False, never an exception). Stepping after the final answer is a caller bug
    (raises RuntimeError)."""

    def __init__(self, answer_fields: tuple[str, ...], task: Task):
        self._answer_fields = answer_fields
        self._task = task
        self._final: tuple[float, dict[str, float]] | None = None

    @abstractmethod
    def _call(self, call: ToolCall) -> StepResult:
        """Run one tool call (not `submit_answer`) and return its observation."""

    def step(self, action_text: str) -> StepResult:
        if self._final is not None:
            raise RuntimeError(f"episode of task {self._task.task_id} already answered")
        action = parse_action(action_text)
        if isinstance(action, ParseFailure):
            return StepResult(observation=error_content(action.reason), tool_ok=False)
        if isinstance(action, ToolCall):
            return self._call(action)
        assert isinstance(action, FinalAnswer)
        self._final = score_answer(self._answer_fields, self._task.expected, action.fields)
        reward, components = self._final
        return StepResult(
            observation=None, done=True, reward=reward, reward_components=dict(components), finish_reason="answered"
        )

    def respond(self, turn: AssistantTurn) -> StepResult:
        """A structured turn: each tool call in order, `submit_answer` as the final answer."""
        if self._final is not None:
            raise RuntimeError(f"episode of task {self._task.task_id} already answered")
        if turn.parse_error is not None:
            return StepResult(observation=error_content(turn.parse_error), tool_ok=False)
        if not turn.tool_calls:
            reason = f"call one of the tools, or {ANSWER_TOOL} with the final answer"
            return StepResult(observation=error_content(reason), tool_ok=False)
        results: list[ToolResult] = []
        for call in turn.tool_calls:
            if call.tool == ANSWER_TOOL:
                answered = self._answer(call)
                if answered.done:
                    return answered
                results.append(ToolResult(call.call_id, ANSWER_TOOL, answered.observation, False))
                continue
            called = self._call(call)
            results.append(
                ToolResult(call.call_id, called.tool_name or call.tool, called.observation, bool(called.tool_ok))
            )
        last = results[-1]
        return StepResult(
            observation=last.content, tool_name=last.tool, tool_ok=all(r.ok for r in results), tool_results=results
        )

    def _answer(self, call: ToolCall) -> StepResult:
        """`submit_answer(...)`: accepted exactly when `ANSWER {...}` with the same object would be
        (every value a string; fields it does not know are ignored by the scoring)."""
        for key, value in call.arguments.items():
            if not isinstance(value, str):
                reason = f"answer value for {key!r} must be a string"
                return StepResult(observation=error_content(reason), tool_name=ANSWER_TOOL, tool_ok=False)
        self._final = score_answer(self._answer_fields, self._task.expected, dict(call.arguments))
        reward, components = self._final
        return StepResult(
            observation=None, done=True, reward=reward, reward_components=dict(components), finish_reason="answered"
        )

    def finish(self) -> tuple[float, dict[str, float]]:
        if self._final is not None:
            return self._final[0], dict(self._final[1])
        return score_answer(self._answer_fields, self._task.expected, None)


class SOPSession(ProcedureSession):
    """One episode of one task of a fixture-backed SOP domain."""

    def __init__(self, domain: SOPDomain, task: Task):
        super().__init__(domain.answer_fields, task)
        self._domain = domain

    def _call(self, call: ToolCall) -> StepResult:
        tool = self._domain.tools.get(call.tool)
        if tool is None:
            return StepResult(
                observation=error_content(f"unknown tool {call.tool!r}"), tool_name=call.tool, tool_ok=False
            )
        problem = check_arguments(tool.name, tool.parameters, call.arguments)
        if problem is not None:
            return StepResult(observation=error_content(problem), tool_name=tool.name, tool_ok=False)
        observation, ok = tool.run(call.arguments)
        return StepResult(observation=observation, tool_name=tool.name, tool_ok=ok)


class SOPEnvironment(Environment):
    """An Environment over one SOP domain (a loaded `SOPDomain` or its folder)."""

    def __init__(self, domain: SOPDomain | str | Path):
        self.domain = domain if isinstance(domain, SOPDomain) else SOPDomain.load(Path(domain))
        self.name = self.domain.name
        tools = [ToolSchema(tool.name, tool.description, tool.parameters) for tool in self.domain.tools.values()]
        self._system_prompt = render_system_prompt(self.domain.procedure_text, tools, self.domain.answer_fields)

    def system_prompt(self) -> str:
        return self._system_prompt

    def tools(self) -> list[dict[str, Any]]:
        """The domain's tools and `submit_answer` (the answer fields, strings), as OpenAI function schemas."""
        schemas = [ToolSchema(tool.name, tool.description, tool.parameters) for tool in self.domain.tools.values()]
        return [schema.as_openai() for schema in [*schemas, answer_tool_schema(self.domain.answer_fields)]]

    def tool_system_prompt(self) -> str:
        """The procedure, for a policy that sees the tools as schemas and answers with `submit_answer`."""
        return tool_system_prompt(self.domain.procedure_text)

    def tasks(self, split: str) -> list[Task]:
        if split not in self.domain.splits:
            raise ValueError(f"unknown split {split!r} for {self.name}; expected one of {list(SPLITS)}")
        return list(self.domain.splits[split])

    def start(self, task: Task) -> SOPSession:
        if task.env_name != self.name:
            raise ValueError(f"task {task.task_id} belongs to {task.env_name!r}, not {self.name!r}")
        missing = [field for field in self.domain.answer_fields if field not in task.expected]
        if missing:
            raise ValueError(f"task {task.task_id} has no expected value for {missing}")
        return SOPSession(self.domain, task)


def answer_tool_schema(answer_fields: tuple[str, ...]) -> ToolSchema:
    """`submit_answer`: the native form of `ANSWER {...}`; its parameters are the answer fields, all strings and
    all required."""
    properties = {field: {"type": "string"} for field in answer_fields}
    parameters = {"type": "object", "properties": properties, "required": list(answer_fields)}
    return ToolSchema(ANSWER_TOOL, "Give the final answer; this ends the task.", parameters)


def tool_system_prompt(procedure_text: str) -> str:
    """The system prompt for a policy that calls the tools natively: the procedure, then how to answer."""
    return f"{procedure_text}\nWhen you know the answer, call {ANSWER_TOOL} with it."


def render_system_prompt(
    procedure_text: str,
    tools: list[ToolSchema],
    answer_fields: tuple[str, ...],
    *,
    argument: Callable[[str, Any], str] = lambda name, schema: name,
    call_line: str = 'CALL <tool> {"<arg>": "<value>"}',
) -> str:
    """The text-format system prompt: the procedure, one line per tool (`name(arguments): description`, each
    argument of its JSON schema's `properties` written by `argument(name, schema)`: the name by default), and
    the CALL (`call_line`) / ANSWER syntax."""
    lines = [
        f"{t.name}({', '.join(argument(name, schema) for name, schema in t.parameters.get('properties', {}).items())})"
        f": {t.description}"
        for t in tools
    ]
    answer = ", ".join(f'"{field}": "..."' for field in answer_fields)
    return "\n".join(
        [procedure_text, "Tools:", *lines, "Reply with one action per turn:", call_line, f"ANSWER {{{answer}}}"]
    )


def _normalize(value: Any) -> str:
    return str(value).strip().lower()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _build_tool(spec: dict[str, Any], tables: dict[str, list[dict[str, str]]], path: Path) -> ToolSpec:
    name = spec["name"]
    parameters = spec["parameters"]
    properties = parameters.get("properties", {})
    for argument, schema in properties.items():
        if schema.get("type") != "string":
            raise ValueError(f"{path}: tool {name} argument {argument!r}: only string arguments are supported")
    key = tuple(spec["key"])
    if not set(key) <= set(properties):
        raise ValueError(f"{path}: tool {name} key {list(key)} must name its arguments")
    if spec["table"] not in tables:
        raise ValueError(f"{path}: tool {name} reads missing table {spec['table']!r}")
    returns = tuple(spec["returns"]) if "returns" in spec else None
    for row in tables[spec["table"]]:
        absent = [field for field in (*key, *(returns or ())) if field not in row]
        if absent:
            raise ValueError(f"{path}: a row of table {spec['table']!r} lacks {absent}, needed by tool {name}")
    rows = {tuple(row[field] for field in key): row for row in tables[spec["table"]]}
    return ToolSpec(name, spec["description"], parameters, key, returns, spec["not_found"], rows)


def _read_tasks(path: Path, env_name: str, split: str, answer_fields: tuple[str, ...]) -> list[Task]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    tasks = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: {err}") from err
        missing = [field for field in answer_fields if field not in record["expected"]]
        if missing:
            raise ValueError(f"{path}:{number}: task {record['task_id']} has no expected value for {missing}")
        tasks.append(Task(record["task_id"], env_name, split, record["prompt"], record["inputs"], record["expected"]))
    return tasks
