"""SOP-Bench-format environments: a domain folder laid out like the public SOP-Bench benchmark's.

Point a config at the folder: `environment.domains: ["sopbench:/path/to/domain"]`, or with arguments
`{name: "sopbench:/path/to/domain", kwargs: {heldout_fraction: 0.3, max_observation_chars: 8192}}` (the only
two). A relative path is resolved against the repository root when the folder is there (like `policy.path`),
else against the working directory.

The folder (the file names are the benchmark's own: its registry requires sop.txt, tools.py, toolspecs.json
and a test file, and its loader reads metadata.json):
  sop.txt          the procedure text (UTF-8, not empty); the system prompt opens with it.
  toolspecs.json   the tools in the Bedrock Converse form: a list of
                   {"toolSpec": {"name", "description", "inputSchema": {"json": <JSON schema of the arguments>}}}.
  tools.py         a Python module with a manager class whose methods are the tools. The class is the one
                   metadata.json names (`manager_class`, a Turnstile addition), else the single class defined
                   in tools.py whose public methods include every tool name, else the single `...Manager` class
                   with a `process_tool_call(tool_name, arguments)` router (the benchmark's own convention).
                   The class is made with no arguments (one instance per episode); the load (also run when
                   the config is built) makes one to check that it can be: a constructor that needs arguments
                   or raises is refused then, not at rollout time, where every episode would end as env_error.
  test_set.csv or test_set_with_outputs.csv (the first that exists, the benchmark's order)
                   one task a row, with a header: the input columns and the expected output columns.
  metadata.json    {"output_columns": [...] (required), "input_columns": [...] (default: every other column),
                   "name": the environment name (default: the folder name), "id_column": the column whose
                   values are the task ids (a Turnstile addition; default: the row number from 0, as the
                   benchmark numbers its tasks), "manager_class"}. Other keys (domain, description,
                   complexity, ...) are allowed and ignored; `domain` is the benchmark's category label
                   ("Healthcare"), not a name.
`SOPBenchDomain.load` checks all of it and raises ValueError naming the folder, the file and the problem.

Episodes speak the action protocol of the built-in SOP domains (rl_core/environments/sop.py,
`ProcedureSession`): text `CALL <tool> {...}` / `ANSWER {...}` turns, or native tool calls with
`submit_answer` (its parameters are the output columns, strings). A tool call is checked against the
tool's inputSchema with jsonschema (an argument the schema does not declare is refused too, since the
arguments become keyword arguments), then run as `manager.<tool>(**arguments)` (or through
`process_tool_call` when the class has no such method) on a manager instantiated for that episode alone,
so state a tool keeps (a recorded decision) never leaks into another episode. The result is the
observation: a str as it is, anything else as JSON (`default=str` for what JSON cannot hold). A tool that
raises (any Exception, and SystemExit too: a tool's `sys.exit()` must not end the training run; only
KeyboardInterrupt and the like pass through) is the policy's failed call, not an environment fault: the
observation is {"error": "<tool> failed: <Exception>: <message>"}, tool_ok False, and the episode goes on.
An unknown tool or arguments the schema refuses are error observations the same way.

An observation is at most `max_observation_chars` characters (default MAX_OBSERVATION_CHARS = 16,384,
about 4-5k tokens of English; at least MIN_OBSERVATION_CHARS = 256): a longer one keeps its beginning and
ends with the note "[<n> characters cut: a tool result is at most <limit> characters]" on a line of its own,
the whole still within the limit (an error observation is cut inside its message, so it stays JSON). This
only keeps a runaway tool (a 5 MB string) from being tokenized whole; the context budget is not changed by
it, and an observation that still does not fit the window ends the episode as context_overflow as before.

Tools run synchronously inside `step()`/`respond()` with no time limit of their own: `rollout.timeout_s` is
checked only between turns (a slow tool's episode ends as `timeout` after its call returns), so a call that
never returns stalls the whole collection (no thread-based timeout, as a thread cannot be killed; give the
network or subprocess calls in tools.py timeouts of their own).

The system prompt of the text turn form lists each tool with the JSON type of every argument
(`record_decision(claim_id: string, ..., customer_charge: integer): ...`, from the inputSchema's `type`)
and asks for `CALL <tool> {"<arg>": <value of its type>}`, so an integer argument is not written as a string.

Reward: the share of output fields answered exactly: a field matches when
`str(answer).strip().lower() == str(expected).strip().lower()`, the comparison of the benchmark's metrics
(`MetricsCalculator._is_correct`), without the fuzzy extras of its output parser (treating "_" as " ",
a substring counting as a match, null-like words matching each other), which would pay partial answers.
Success: every field matches (reward 1.0). As in sop.py, an episode that ends without a well-formed answer
gets the 0.1 format penalty (reward -0.1), and the components are "field/<column>" (1/n each when right)
and "format_penalty", summing to the reward.

Tasks: one per CSV row; the prompt lists the row's input columns ("column: value" lines), `Task.inputs`
holds them and `Task.expected` the output columns (as written in the CSV). SOP-Bench has one CSV of test
rows, so the splits are made here: the rows are ranked by the sha256 of "<env name>/<task id>"
(rl_core/heldout_split.py) and the first `round(heldout_fraction * n)` (at least 1, at most n - 1) are
`heldout`, the rest `train`: disjoint, the same in every run and on every machine, and independent of the
row order. Default heldout_fraction 0.5: SOP-Bench domains are evaluation sets of one to a few hundred rows,
and the held-out split is itself divided into a part that picks a run's best checkpoint and a part the
promotion gate tests on (`evaluation.gate_fraction`, rl_core/heldout_split.py), so each of those still gets
a quarter of the rows (13 of the 52 of the shipped domain, data/sopbench/appliance_warranty); RL reuses
its training prompts many times, so half the rows are enough to train on.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError, best_match

from rl_core.environments.actions import ToolCall
from rl_core.environments.base import Environment, StepResult, Task
from rl_core.environments.messages import ToolSchema, error_content
from rl_core.environments.sop import (
    ANSWER_TOOL,
    SPLITS,
    ProcedureSession,
    answer_tool_schema,
    render_system_prompt,
    tool_system_prompt,
)
from rl_core.heldout_split import split_heldout
from rl_core.paths import REPO_ROOT

PREFIX = "sopbench:"
TEST_FILES = ("test_set.csv", "test_set_with_outputs.csv")
DEFAULT_HELDOUT_FRACTION = 0.5
MAX_OBSERVATION_CHARS = 16_384  # default cap on one observation, in characters (module docstring)
MIN_OBSERVATION_CHARS = 256  # the smallest cap accepted: room for the note that says what was cut
KWARGS = ("heldout_fraction", "max_observation_chars")  # what a "sopbench:" entry's kwargs may hold
ROUTER = "process_tool_call"  # the benchmark's manager method that routes a call by tool name
_TOOL_NAME = re.compile(r"[A-Za-z_]\w*\Z")  # a name the text action format (CALL <tool>) and a method can carry


def is_sopbench(name: str) -> bool:
    """Whether an `environment.domains` entry names an SOP-Bench-format folder ("sopbench:<path>")."""
    return name.startswith(PREFIX)


def resolve_folder(name: str) -> Path:
    """The folder of a "sopbench:<path>" entry: `~` expanded; a relative path against the repository root when
    it is a folder there, else as given (the working directory). Raises ValueError for an empty path."""
    text = name[len(PREFIX) :] if is_sopbench(name) else name
    if not text.strip():
        raise ValueError(f"{name!r}: give the domain folder after {PREFIX!r}, e.g. 'sopbench:/path/to/domain'")
    path = Path(text).expanduser()
    if not path.is_absolute() and (REPO_ROOT / path).is_dir():
        return REPO_ROOT / path
    return path


@dataclass(frozen=True)
class BenchTool:
    """One tool of toolspecs.json: its name, description and the JSON schema of its arguments."""

    name: str
    description: str
    schema: dict[str, Any]

    def argument_problem(self, arguments: dict[str, Any]) -> str | None:
        """The first thing wrong with `arguments` for this tool (an argument the schema does not declare, or
        jsonschema's most relevant error), or None."""
        properties = self.schema.get("properties")
        if isinstance(properties, dict):
            for name in arguments:
                if name not in properties:
                    return f"unknown argument {name!r} for {self.name}"
        error = best_match(jsonschema.validators.validator_for(self.schema)(self.schema).iter_errors(arguments))
        if error is None:
            return None
        where = "".join(f"[{part!r}]" for part in error.absolute_path)
        return f"bad arguments for {self.name}{' at ' + where if where else ''}: {error.message}"


@dataclass(frozen=True)
class SOPBenchDomain:
    """An SOP-Bench-format folder, loaded and checked (the module docstring). Build with `SOPBenchDomain.load`.

    rows: (task id, the row as {column: text}) in file order; manager_class: the tools' manager class."""

    folder: Path
    name: str
    procedure_text: str
    tools: dict[str, BenchTool]
    manager_class: type
    input_columns: tuple[str, ...]
    output_columns: tuple[str, ...]
    rows: tuple[tuple[str, dict[str, str]], ...]

    @classmethod
    def load(cls, folder: str | Path) -> SOPBenchDomain:
        """Read and check the folder. Raises ValueError naming the folder and the file that is missing or
        invalid, and what is wrong with it (tools.py is imported: its import errors are reported too)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"SOP-Bench domain folder {folder} does not exist (or is not a folder)")
        procedure = _read_text(folder / "sop.txt")
        if not procedure.strip():
            raise ValueError(f"{folder / 'sop.txt'} is empty: it must hold the procedure text")
        tools = _read_toolspecs(folder / "toolspecs.json")
        metadata = _read_metadata(folder / "metadata.json")
        name = metadata.get("name", folder.name)
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{folder / 'metadata.json'}: name must be a non-empty string, got {name!r}")
        test_file = next((folder / f for f in TEST_FILES if (folder / f).is_file()), None)
        if test_file is None:
            raise ValueError(f"SOP-Bench domain folder {folder} has no test file: expected one of {list(TEST_FILES)}")
        inputs, outputs, rows = _read_rows(test_file, metadata, folder / "metadata.json")
        manager_class = _manager_class(_import_tools(folder / "tools.py"), tools, metadata, folder)
        try:  # made once here so that a constructor that cannot work is refused now, not in every episode
            manager_class()
        except (Exception, SystemExit) as err:
            raise ValueError(
                f"{folder / 'tools.py'}: the manager class {manager_class.__name__} cannot be made with no "
                f"arguments (one instance per episode): {manager_class.__name__}() raised "
                f"{type(err).__name__}: {err}"
            ) from err
        return cls(folder, name.strip(), procedure, tools, manager_class, inputs, outputs, rows)

    def new_manager(self) -> Any:
        """A fresh instance of the manager class (one per episode). A constructor's SystemExit is raised as
        RuntimeError: an environment fault the rollout engine retries, never the end of the process."""
        try:
            return self.manager_class()
        except SystemExit as err:
            raise RuntimeError(f"{self.manager_class.__name__}() raised SystemExit({err.code!r})") from err


class SOPBenchSession(ProcedureSession):
    """One episode: tool calls run on this episode's own manager instance."""

    def __init__(
        self, domain: SOPBenchDomain, task: Task, manager: Any, max_observation_chars: int = MAX_OBSERVATION_CHARS
    ):
        super().__init__(domain.output_columns, task)
        self._domain = domain
        self.manager = manager
        self.max_observation_chars = max_observation_chars

    def _call(self, call: ToolCall) -> StepResult:
        tool = self._domain.tools.get(call.tool)
        if tool is None:
            reason = f"unknown tool {call.tool!r}; the tools are {sorted(self._domain.tools)}"
            return self._failed(reason, call.tool)
        problem = tool.argument_problem(call.arguments)
        if problem is not None:
            return self._failed(problem, tool.name)
        method = getattr(self.manager, tool.name, None)
        try:
            if callable(method):
                result = method(**call.arguments)
            else:
                result = getattr(self.manager, ROUTER)(tool.name, dict(call.arguments))
        except (Exception, SystemExit) as err:  # the policy's call failed: an observation, not an environment fault
            return self._failed(f"{tool.name} failed: {type(err).__name__}: {err}", tool.name)
        observation = cap_observation(_observation(result), self.max_observation_chars)
        return StepResult(observation=observation, tool_name=tool.name, tool_ok=True)

    def _failed(self, reason: str, tool_name: str) -> StepResult:
        observation = capped_error(reason, self.max_observation_chars)
        return StepResult(observation=observation, tool_name=tool_name, tool_ok=False)


class SOPBenchEnvironment(Environment):
    """An Environment over one SOP-Bench-format folder (or a loaded `SOPBenchDomain`).

    heldout_fraction: the share of rows in the `heldout` split, in (0, 1); max_observation_chars: the most
    characters of one observation, an int >= MIN_OBSERVATION_CHARS (module docstring). Raises ValueError for a
    bad folder (`SOPBenchDomain.load`), fraction or cap."""

    def __init__(
        self,
        domain: SOPBenchDomain | str | Path,
        heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
        max_observation_chars: int = MAX_OBSERVATION_CHARS,
    ):
        check_heldout_fraction(heldout_fraction)
        check_max_observation_chars(max_observation_chars)
        self.domain = domain if isinstance(domain, SOPBenchDomain) else SOPBenchDomain.load(resolve_folder(str(domain)))
        self.name = self.domain.name
        self.heldout_fraction = float(heldout_fraction)
        self.max_observation_chars = int(max_observation_chars)
        tools = [ToolSchema(t.name, t.description, t.schema) for t in self.domain.tools.values()]
        self._tool_schemas = [*tools, answer_tool_schema(self.domain.output_columns)]
        # each argument with its JSON type: SOP-Bench tools take integers and numbers, not only strings
        self._system_prompt = render_system_prompt(
            self.domain.procedure_text,
            tools,
            self.domain.output_columns,
            argument=_typed_argument,
            call_line='CALL <tool> {"<arg>": <value of its type>}',
        )
        every = [self._task(task_id, row) for task_id, row in self.domain.rows]
        part = split_heldout(every, self.heldout_fraction)
        self._splits = {
            "train": [_with_split(t, "train") for t in part.selection],
            "heldout": [_with_split(t, "heldout") for t in part.gate],
        }

    def _task(self, task_id: str, row: dict[str, str]) -> Task:
        inputs = {column: row[column] for column in self.domain.input_columns}
        expected = {column: row[column] for column in self.domain.output_columns}
        prompt = "\n".join(
            ["Process this case by the procedure. Its inputs:", *(f"{k}: {v}" for k, v in inputs.items())]
        )
        return Task(task_id, self.name, "", prompt, inputs, expected)

    def system_prompt(self) -> str:
        return self._system_prompt

    def tools(self) -> list[dict[str, Any]]:
        """The toolspecs as OpenAI function schemas (inputSchema.json as `parameters`) and `submit_answer`."""
        return [schema.as_openai() for schema in self._tool_schemas]

    def tool_system_prompt(self) -> str:
        return tool_system_prompt(self.domain.procedure_text)

    def tasks(self, split: str) -> list[Task]:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r} for {self.name}; expected one of {list(SPLITS)}")
        return list(self._splits[split])

    def start(self, task: Task) -> SOPBenchSession:
        """A session with a new manager instance. Raises ValueError for another environment's task; the
        manager's constructor raising is an environment fault (the rollout engine retries it)."""
        if task.env_name != self.name:
            raise ValueError(f"task {task.task_id} belongs to {task.env_name!r}, not {self.name!r}")
        missing = [column for column in self.domain.output_columns if column not in task.expected]
        if missing:
            raise ValueError(f"task {task.task_id} has no expected value for {missing}")
        return SOPBenchSession(self.domain, task, self.domain.new_manager(), self.max_observation_chars)


def check_heldout_fraction(value: Any) -> None:
    """Raise ValueError unless `value` is a real number strictly between 0 and 1."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"heldout_fraction must be a number in (0, 1), got {value!r}")


def check_max_observation_chars(value: Any) -> None:
    """Raise ValueError unless `value` is an int (not a bool) >= MIN_OBSERVATION_CHARS."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= MIN_OBSERVATION_CHARS):
        raise ValueError(
            f"max_observation_chars must be a whole number of characters >= {MIN_OBSERVATION_CHARS}, got {value!r}"
        )


def load_sopbench(name: str, kwargs: Mapping[str, Any] | None = None) -> SOPBenchEnvironment:
    """The environment of a "sopbench:<path>" entry with its keyword arguments (`heldout_fraction`,
    `max_observation_chars`). Raises ValueError naming an unknown argument, a bad value, or the folder's
    missing or invalid file."""
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise ValueError(f"SOP-Bench-format entries take only the keyword arguments {list(KWARGS)}, got {unknown}")
    return SOPBenchEnvironment(resolve_folder(name), **kwargs)


def cut_note(cut: int, limit: int) -> str:
    """The line that ends a cut observation: how many characters were cut and the limit."""
    return f"\n[{cut} characters cut: a tool result is at most {limit} characters]"


def cap_observation(text: str, limit: int) -> str:
    """`text` when it has at most `limit` characters, else its beginning and `cut_note`, `limit` characters or
    fewer in all (the note counts the characters of `text` that are not shown)."""
    return _cut(text, limit, limit)


def _cut(text: str, room: int, limit: int) -> str:
    """`text` if it has at most `room` characters, else its beginning and the note (saying `limit`) in `room`
    characters (in the note alone when `room` is shorter than it)."""
    if len(text) <= room:
        return text
    keep = max(0, room - len(cut_note(len(text), limit)))  # the note for the largest possible cut: never too long
    while (more := room - len(cut_note(len(text) - keep, limit))) > keep:  # a shorter count leaves room: use it
        keep = more
    return text[:keep] + cut_note(len(text) - keep, limit)


def capped_error(reason: str, limit: int) -> str:
    """`error_content(reason)` of at most `limit` characters: the reason is cut (`cap_observation`) to the
    longest length whose JSON, which escapes may lengthen, fits (a binary search); always valid JSON."""
    content = error_content(reason)
    if len(content) <= limit:
        return content
    low, high = 0, min(len(reason), limit)  # the reason cut to `low` characters fits; to `high + 1`, not
    while low < high:
        middle = (low + high + 1) // 2
        if len(error_content(_cut(reason, middle, limit))) <= limit:
            low = middle
        else:
            high = middle - 1
    return error_content(_cut(reason, low, limit))


def _typed_argument(name: str, schema: Any) -> str:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list) and kind and all(isinstance(k, str) for k in kind):
        kind = " or ".join(kind)
    return f"{name}: {kind}" if isinstance(kind, str) else name


def _with_split(task: Task, split: str) -> Task:
    return Task(task.task_id, task.env_name, split, task.prompt, task.inputs, task.expected)


def _observation(result: Any) -> str:
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, default=str)
    except (TypeError, ValueError):  # e.g. a circular structure
        return str(result)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"SOP-Bench domain folder {path.parent} has no {path.name}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def _read_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _read_toolspecs(path: Path) -> dict[str, BenchTool]:
    specs = _read_json(path)
    if not isinstance(specs, list) or not specs:
        raise ValueError(f'{path} must hold a non-empty JSON list of {{"toolSpec": {{...}}}} entries')
    tools: dict[str, BenchTool] = {}
    for index, entry in enumerate(specs):
        spec = entry.get("toolSpec") if isinstance(entry, dict) else None
        where = f"{path} entry {index}"
        if not isinstance(spec, dict):
            raise ValueError(f'{where}: expected {{"toolSpec": {{"name", "description", "inputSchema"}}}}')
        name = spec.get("name")
        if not (isinstance(name, str) and _TOOL_NAME.match(name)):
            raise ValueError(f"{where}: name must be an identifier (letters, digits, _), got {name!r}")
        where = f"{path} tool {name!r}"
        if name == ANSWER_TOOL:
            raise ValueError(f"{where}: {ANSWER_TOOL} is reserved for the final answer")
        if name in tools:
            raise ValueError(f"{where} is specified twice")
        description = spec.get("description")
        if not isinstance(description, str):
            raise ValueError(f"{where}: description must be a string, got {description!r}")
        input_schema = spec.get("inputSchema")
        schema = input_schema.get("json") if isinstance(input_schema, dict) else None
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ValueError(f'{where}: inputSchema must be {{"json": <a JSON schema with "type": "object">}}')
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except SchemaError as err:
            raise ValueError(f"{where}: inputSchema.json is not a valid JSON schema: {err.message}") from None
        tools[name] = BenchTool(name, description, schema)
    return tools


def _read_metadata(path: Path) -> dict[str, Any]:
    metadata = _read_json(path)
    if not isinstance(metadata, dict):
        raise ValueError(f"{path} must hold a JSON object")
    outputs = metadata.get("output_columns")
    if not _names(outputs) or not outputs:
        raise ValueError(f"{path}: output_columns must be a non-empty list of column names, got {outputs!r}")
    if "input_columns" in metadata and not _names(metadata["input_columns"]):
        raise ValueError(f"{path}: input_columns must be a list of column names, got {metadata['input_columns']!r}")
    for key in ("id_column", "manager_class"):
        if key in metadata and not (isinstance(metadata[key], str) and metadata[key]):
            raise ValueError(f"{path}: {key} must be a non-empty string, got {metadata[key]!r}")
    both = sorted(set(outputs) & set(metadata.get("input_columns", [])))
    if both:
        raise ValueError(f"{path}: columns {both} are both input_columns and output_columns")
    return metadata


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value) and len(set(value)) == len(value)


def _read_rows(
    path: Path, metadata: dict[str, Any], metadata_path: Path
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, dict[str, str]], ...]]:
    """(input columns, output columns, (task id, row) per row) of the test CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            records = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not header:
        raise ValueError(f"{path} has no header row")
    if len(set(header)) != len(header):
        raise ValueError(f"{path}: the header names a column twice: {header}")
    outputs = tuple(metadata["output_columns"])
    inputs = tuple(metadata.get("input_columns") or [c for c in header if c not in outputs])
    id_column = metadata.get("id_column")
    for key, columns in (
        ("output_columns", outputs),
        ("input_columns", inputs),
        ("id_column", [id_column] * bool(id_column)),
    ):
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{metadata_path}: {key} {missing} not in the header of {path.name} ({header})")
    if not records:
        raise ValueError(f"{path} has no rows")
    rows: list[tuple[str, dict[str, str]]] = []
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(records):
        if None in row:
            raise ValueError(f"{path}:{line}: more fields than the header has columns")
        if any(value is None for value in row.values()):
            raise ValueError(f"{path}:{line}: fewer fields than the header has columns")
        task_id = row[id_column].strip() if id_column else str(index)
        if not task_id:
            raise ValueError(f"{path}:{line}: empty {id_column} (the id_column of {metadata_path.name})")
        if task_id in seen:
            raise ValueError(f"{path}:{line}: task id {task_id!r} ({id_column}) repeats line {seen[task_id]}")
        seen[task_id] = line
        rows.append((task_id, dict(row)))
    return inputs, outputs, tuple(rows)


def _import_tools(path: Path) -> ModuleType:
    """Import tools.py by its path, under a module name unique to the file (registered in sys.modules, as
    dataclasses and pickling need)."""
    if not path.is_file():
        raise ValueError(f"SOP-Bench domain folder {path.parent} has no {path.name}")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"turnstile_sopbench_tools_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        sys.modules.pop(module_name, None)
        raise ValueError(f"importing {path} raised {type(err).__name__}: {err}") from err
    return module


def _manager_class(module: ModuleType, tools: dict[str, BenchTool], metadata: dict[str, Any], folder: Path) -> type:
    """The manager class (the module docstring's rule). Raises ValueError saying which classes were found and
    which tools each lacks."""
    path = folder / "tools.py"
    classes = {
        name: value
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and not name.startswith("_")
    }

    def lacking(cls: type) -> list[str]:
        return [tool for tool in tools if not callable(getattr(cls, tool, None))]

    named = metadata.get("manager_class")
    if named is not None:
        cls = classes.get(named)
        if cls is None:
            raise ValueError(
                f"{folder / 'metadata.json'}: manager_class {named!r} is not a class of {path} ({sorted(classes)})"
            )
        if lacking(cls) and not callable(getattr(cls, ROUTER, None)):
            raise ValueError(f"{path}: {named} has no method for the tools {lacking(cls)} and no {ROUTER}")
        return cls
    covering = [cls for cls in classes.values() if not lacking(cls)]
    if len(covering) == 1:
        return covering[0]
    if not covering:
        routers = [c for n, c in classes.items() if n.endswith("Manager") and callable(getattr(c, ROUTER, None))]
        if len(routers) == 1:
            return routers[0]
    found = {name: f"lacks {lacking(cls)}" if lacking(cls) else "has every tool" for name, cls in classes.items()}
    raise ValueError(
        f"{path}: no single manager class for the tools {sorted(tools)} of toolspecs.json: found "
        f"{found or 'no class'}; name the class in metadata.json as manager_class"
    )
