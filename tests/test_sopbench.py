"""SOP-Bench-format environments (issue 14, part 4): rl_core/environments/sopbench.py on the shipped domain
data/sopbench/appliance_warranty (our own data in the benchmark's layout).

The expert is the domain generator's own solver (scripts/make_sopbench_domain.py), which follows sop.txt
through the manager's tools: played through the environment it must score 1.0 on every row.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from rl_core.config import load_config
from rl_core.environments import load_environment
from rl_core.environments.actions import ToolCall, format_answer, format_call
from rl_core.environments.messages import AssistantTurn
from rl_core.environments.sop import ANSWER_TOOL
from rl_core.environments.sopbench import MAX_OBSERVATION_CHARS, SOPBenchEnvironment, resolve_folder
from rl_core.paths import REPO_ROOT

DOMAIN = REPO_ROOT / "data" / "sopbench" / "appliance_warranty"
ENTRY = "sopbench:data/sopbench/appliance_warranty"
CONFIG = REPO_ROOT / "data" / "configs" / "sopbench.yaml"
OUTPUTS = ("decision", "coverage", "customer_charge")


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_sopbench_domain", REPO_ROOT / "scripts/make_sopbench_domain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _load_generator()


@pytest.fixture(scope="module")
def env() -> SOPBenchEnvironment:
    return load_environment(ENTRY)


def csv_rows() -> list[dict[str, str]]:
    with open(DOMAIN / "test_set_with_outputs.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def task_of(env, claim_id: str):
    return next(t for split in ("train", "heldout") for t in env.tasks(split) if t.task_id == claim_id)


def play_expert(env, task):
    """The solver's calls as text actions, then its answer; returns the last StepResult and the session."""
    calls, answer = GENERATOR.solve(env.domain.new_manager(), task.inputs)
    session = env.start(task)
    for tool, arguments in calls:
        result = session.step(format_call(tool, arguments))
        assert not result.done
    return session.step(format_answer(answer)), session


# -- loading ------------------------------------------------------------------------------------------------


def test_the_shipped_folder_loads_with_its_metadata(env):
    rows = csv_rows()
    assert (env.name, len(rows)) == ("appliance_warranty", 52)
    assert env.domain.output_columns == OUTPUTS
    assert env.domain.input_columns == ("claim_id", "serial_number", "issue_code", "claim_date")
    assert list(env.domain.tools) == [
        "get_registration",
        "get_claim_history",
        "get_model_terms",
        "diagnose_issue",
        "record_decision",
    ]
    assert env.domain.manager_class.__name__ == "ApplianceWarrantyManager"
    row = rows[0]
    task = task_of(env, row["claim_id"])  # metadata's id_column names the task ids
    assert task.inputs == {k: row[k] for k in env.domain.input_columns}
    assert task.expected == {k: row[k] for k in OUTPUTS}
    assert task.prompt == (
        f"Process this case by the procedure. Its inputs:\nclaim_id: {row['claim_id']}\n"
        f"serial_number: {row['serial_number']}\nissue_code: {row['issue_code']}\nclaim_date: {row['claim_date']}"
    )
    procedure = (DOMAIN / "sop.txt").read_text()
    assert len(procedure.encode()) > 6000  # several KB: the context budget has something to measure
    system = env.system_prompt()
    assert system.startswith(procedure) and "\nget_registration(serial_number: string): Look up" in system
    # each argument's JSON type: customer_charge is an integer, and the CALL line does not ask for strings
    assert (
        "\nrecord_decision(claim_id: string, decision: string, coverage: string, customer_charge: integer): "
        "Record the decision" in system
    )
    assert system.endswith(
        'CALL <tool> {"<arg>": <value of its type>}\n'
        'ANSWER {"decision": "...", "coverage": "...", "customer_charge": "..."}'
    )
    assert env.tool_system_prompt() == f"{procedure}\nWhen you know the answer, call {ANSWER_TOOL} with it."
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in env.tools()}
    assert list(schemas) == [*env.domain.tools, ANSWER_TOOL]
    specs = json.loads((DOMAIN / "toolspecs.json").read_text())
    assert schemas["diagnose_issue"] == specs[3]["toolSpec"]["inputSchema"]["json"]
    assert schemas[ANSWER_TOOL]["required"] == list(OUTPUTS)


def test_a_relative_folder_resolves_against_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_folder(ENTRY) == DOMAIN
    assert resolve_folder("sopbench:elsewhere/domain") == Path("elsewhere/domain")
    with pytest.raises(ValueError, match="give the domain folder after 'sopbench:'"):
        load_environment("sopbench:")


def copy_domain(tmp_path: Path) -> Path:
    folder = tmp_path / "claims"
    shutil.copytree(DOMAIN, folder)
    return folder


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BROKEN = {
    "no sop.txt": (lambda f: (f / "sop.txt").unlink(), r"claims has no sop\.txt"),
    "empty sop.txt": (lambda f: (f / "sop.txt").write_text("  \n"), r"claims/sop\.txt is empty"),
    "toolspecs.json not JSON": (
        lambda f: (f / "toolspecs.json").write_text("[{"),
        r"claims/toolspecs\.json is not valid JSON",
    ),
    "a toolspec without toolSpec": (
        lambda f: (f / "toolspecs.json").write_text('[{"name": "x"}]'),
        r"claims/toolspecs\.json entry 0: expected \{\"toolSpec\"",
    ),
    "an invalid input schema": (
        lambda f: edit(f / "toolspecs.json", '"type": "integer"', '"type": "whole"'),
        r"toolspecs\.json tool 'record_decision': inputSchema\.json is not a valid JSON schema",
    ),
    "no metadata.json": (lambda f: (f / "metadata.json").unlink(), r"claims has no metadata\.json"),
    "no output_columns": (
        lambda f: (f / "metadata.json").write_text('{"name": "claims"}'),
        r"claims/metadata\.json: output_columns must be a non-empty list",
    ),
    "an output column the CSV lacks": (
        lambda f: edit(f / "metadata.json", '"coverage",', '"cover",'),
        r"metadata\.json: output_columns \['cover'\] not in the header of test_set_with_outputs\.csv",
    ),
    "no test file": (
        lambda f: (f / "test_set_with_outputs.csv").unlink(),
        r"claims has no test file: expected one of \['test_set\.csv', 'test_set_with_outputs\.csv'\]",
    ),
    "a repeated task id": (
        lambda f: edit(f / "test_set_with_outputs.csv", "WC-1004,", "WC-1010,"),
        r"test_set_with_outputs\.csv:3: task id 'WC-1010' \(claim_id\) repeats line 2",
    ),
    "a short row": (
        lambda f: edit(f / "test_set_with_outputs.csv", ",repair,base,0\n", ",repair,base\n"),
        r"test_set_with_outputs\.csv:12: fewer fields than the header",
    ),
    "no tools.py": (lambda f: (f / "tools.py").unlink(), r"claims has no tools\.py"),
    "tools.py that does not import": (
        lambda f: (f / "tools.py").write_text("import not_a_module_anywhere\n"),
        r"importing .*claims/tools\.py raised ModuleNotFoundError",
    ),
    "no manager class": (
        lambda f: (f / "tools.py").write_text("class Other:\n    def get_registration(self, serial_number): ...\n"),
        r"claims/tools\.py: no single manager class .* found \{'Other': \"lacks \['get_claim_history'",
    ),
    "a manager_class that is not there": (
        lambda f: edit(f / "metadata.json", '"id_column"', '"manager_class": "Nope",\n  "id_column"'),
        r"metadata\.json: manager_class 'Nope' is not a class of .*tools\.py \(\['ApplianceWarrantyManager'\]\)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_broken_folder_is_refused_naming_the_file(tmp_path, kind):
    folder = copy_domain(tmp_path)
    breaks, message = BROKEN[kind]
    breaks(folder)
    with pytest.raises(ValueError, match=message):
        load_environment(f"sopbench:{folder}")


def test_a_missing_folder_is_refused_naming_it(tmp_path):
    with pytest.raises(ValueError, match=f"SOP-Bench domain folder {tmp_path / 'none'} does not exist"):
        load_environment(f"sopbench:{tmp_path / 'none'}")


def test_config_entries_take_heldout_fraction_and_nothing_else(tmp_path):
    cfg = load_config(None, values={"environment.domains": [{"name": ENTRY, "kwargs": {"heldout_fraction": 0.25}}]})
    assert cfg.environment.entries() == [(ENTRY, {"heldout_fraction": 0.25})]
    # a plain string entry gets no env_kwargs (they are for class paths)
    cfg = load_config(None, values={"environment.domains": [ENTRY], "environment.env_kwargs": {"level": 3}})
    assert cfg.environment.entries() == [(ENTRY, {})]
    with pytest.raises(
        ValueError,
        match=r"environment\.domains\[0\].*only the keyword arguments \['heldout_fraction', 'max_observation_chars'\]",
    ):
        load_config(None, values={"environment.domains": [{"name": ENTRY, "kwargs": {"heldout": 0.25}}]})
    with pytest.raises(ValueError, match=r"environment\.domains\[0\].*heldout_fraction must be a number in \(0, 1\)"):
        load_config(None, values={"environment.domains": [{"name": ENTRY, "kwargs": {"heldout_fraction": 1.0}}]})
    folder = copy_domain(tmp_path)
    (folder / "sop.txt").unlink()
    with pytest.raises(ValueError, match=r"environment\.domains\[1\] \('sopbench:.*claims'\): .*has no sop\.txt"):
        load_config(None, values={"environment.domains": ["refunds", f"sopbench:{folder}"]})


# -- tool calls ---------------------------------------------------------------------------------------------


def test_a_tool_call_runs_the_managers_method_and_a_raising_tool_is_an_error_observation(env):
    task = task_of(env, "WC-1043")  # SN-48989: a registered unit
    session = env.start(task)
    result = session.step('CALL get_registration {"serial_number": "SN-48989"}')
    expected = env.domain.new_manager().get_registration("SN-48989")
    assert (result.tool_name, result.tool_ok, result.done) == ("get_registration", True, False)
    assert json.loads(result.observation) == expected and expected["model_code"] == "AW-DSH-450"
    failed = session.step('CALL get_registration {"serial_number": "SN-00000"}')
    assert (failed.tool_name, failed.tool_ok, failed.done) == ("get_registration", False, False)
    assert json.loads(failed.observation) == {
        "error": "get_registration failed: ValueError: serial number SN-00000 is not registered"
    }
    # the episode goes on: the procedure finishes and is scored
    calls, answer = GENERATOR.solve(env.domain.new_manager(), task.inputs)
    for tool, arguments in calls:
        assert session.step(format_call(tool, arguments)).tool_ok
    final = session.step(format_answer(answer))
    assert (final.done, final.finish_reason, final.reward) == (True, "answered", 1.0)


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (
            'CALL record_decision {"claim_id": "WC-1043", "decision": "repair", "coverage": "base", '
            '"customer_charge": "0"}',
            "bad arguments for record_decision at ['customer_charge']: '0' is not of type 'integer'",
        ),
        (
            'CALL record_decision {"claim_id": "WC-1043", "decision": "repair", "coverage": "base"}',
            "bad arguments for record_decision: 'customer_charge' is a required property",
        ),
        ('CALL get_registration {"serial_number": "SN-48989", "x": "1"}', "unknown argument 'x' for get_registration"),
        ('CALL get_order {"order_id": "1"}', "unknown tool 'get_order'; the tools are ['diagnose_issue', "),
        ("CALL get_registration [1]", "expected a JSON object"),
    ],
)
def test_a_call_the_schema_refuses_never_reaches_the_manager(env, action, error):
    session = env.start(task_of(env, "WC-1043"))
    result = session.step(action)
    assert (result.tool_ok, result.done) == (False, False)
    assert json.loads(result.observation)["error"].startswith(error)
    assert session.manager.recorded == {}  # record_decision never ran


# -- reward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reward"),
    [
        ({"decision": "repair", "coverage": "base", "customer_charge": "0"}, 1.0),
        ({"decision": " Repair ", "coverage": "BASE", "customer_charge": "0 "}, 1.0),  # str, strip, lower
        ({"decision": "repair", "coverage": "base", "customer_charge": "0.0"}, 2 / 3),  # exact, not numeric
        ({"decision": "replace", "coverage": "base"}, 1 / 3),
        ({"decision": "repair_", "coverage": "none", "customer_charge": "50"}, 0.0),
    ],
)
def test_reward_is_the_share_of_output_fields_that_match_exactly(env, answer, reward):
    task = task_of(env, "WC-1043")
    assert task.expected == {"decision": "repair", "coverage": "base", "customer_charge": "0"}
    result = env.start(task).step(format_answer(answer))
    assert result.done and result.reward == pytest.approx(reward)
    right = {f for f in OUTPUTS if f in answer and answer[f].strip().lower() == task.expected[f]}
    assert result.reward_components == {
        **{f"field/{f}": pytest.approx(1 / 3 if f in right else 0.0) for f in OUTPUTS},
        "format_penalty": 0.0,
    }
    assert (result.reward >= env.success_threshold()) == (right == set(OUTPUTS))


def test_an_episode_without_an_answer_gets_the_format_penalty(env):
    session = env.start(task_of(env, "WC-1043"))
    session.step('CALL get_registration {"serial_number": "SN-48989"}')
    reward, components = session.finish()
    assert reward == pytest.approx(-0.1) and components["format_penalty"] == pytest.approx(-0.1)


def test_the_expert_scores_every_row_so_the_csv_agrees_with_the_tools(env):
    decisions = Counter()
    for split in ("train", "heldout"):
        for task in env.tasks(split):
            result, _ = play_expert(env, task)
            assert (result.finish_reason, result.reward) == ("answered", 1.0), task.task_id
            decisions[task.expected["decision"]] += 1
    assert decisions == {
        "repair": 15,
        "paid_repair": 16,
        "escalate": 7,
        "replace": 7,
        "reject_unregistered": 4,
        "inspect": 3,
    }


def test_native_tool_calls_give_the_same_observations_and_reward(env):
    task = task_of(env, "WC-1043")
    calls, answer = GENERATOR.solve(env.domain.new_manager(), task.inputs)
    text_session, native = env.start(task), env.start(task)
    turn = AssistantTurn(tool_calls=tuple(ToolCall(tool, args, f"call-{i}") for i, (tool, args) in enumerate(calls)))
    result = native.respond(turn)
    assert [(r.call_id, r.tool, r.ok) for r in result.tool_results] == [
        (f"call-{i}", tool, True) for i, (tool, _) in enumerate(calls)
    ]
    for (tool, arguments), tool_result in zip(calls, result.tool_results):
        assert text_session.step(format_call(tool, arguments)).observation == tool_result.content
    failing = native.respond(
        AssistantTurn(tool_calls=(ToolCall("record_decision", dict(calls[-1][1]), "again"),))
    )  # the claim is recorded in this episode already: the tool raises
    assert failing.tool_results[0].ok is False and "is already recorded" in failing.tool_results[0].content
    answered = native.respond(AssistantTurn(tool_calls=(ToolCall(ANSWER_TOOL, answer, "end"),)))
    text_answer = text_session.step(format_answer(answer))
    assert (answered.done, answered.reward, answered.reward_components) == (
        True,
        text_answer.reward,
        text_answer.reward_components,
    )
    assert answered.reward == 1.0


# -- splits and episodes ------------------------------------------------------------------------------------


def test_the_splits_are_disjoint_stable_and_independent_of_the_row_order(env, tmp_path):
    train, heldout = [t.task_id for t in env.tasks("train")], [t.task_id for t in env.tasks("heldout")]
    assert (len(train), len(heldout)) == (26, 26)  # the default heldout_fraction 0.5
    assert not set(train) & set(heldout) and set(train) | set(heldout) == {r["claim_id"] for r in csv_rows()}
    assert {t.split for t in env.tasks("heldout")} == {"heldout"}
    again = load_environment(ENTRY)
    assert [t.task_id for t in again.tasks("heldout")] == heldout
    assert heldout[:4] == ["WC-1004", "WC-1022", "WC-1025", "WC-1039"]  # pinned: the same on every machine
    folder = copy_domain(tmp_path)  # the rows reversed: the same split
    lines = (folder / "test_set_with_outputs.csv").read_text().splitlines()
    (folder / "test_set_with_outputs.csv").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    reversed_env = load_environment(f"sopbench:{folder}")
    assert {t.task_id for t in reversed_env.tasks("heldout")} == set(heldout)
    quarter = load_environment(ENTRY, heldout_fraction=0.25)
    assert len(quarter.tasks("heldout")) == 13 and len(quarter.tasks("train")) == 39
    with pytest.raises(ValueError, match="unknown split 'test'"):
        env.tasks("test")


def test_without_an_id_column_the_task_ids_are_row_numbers(tmp_path):
    folder = copy_domain(tmp_path)
    edit(folder / "metadata.json", ',\n  "id_column": "claim_id"', "")
    numbered = load_environment(f"sopbench:{folder}")
    ids = sorted(int(t.task_id) for split in ("train", "heldout") for t in numbered.tasks(split))
    assert ids == list(range(52)) and numbered.name == "appliance_warranty"
    first = next(t for t in numbered.tasks("train") + numbered.tasks("heldout") if t.task_id == "0")
    assert first.inputs["claim_id"] == csv_rows()[0]["claim_id"]


def test_tool_state_does_not_leak_between_episodes(env):
    task = task_of(env, "WC-1043")
    record = (
        'CALL record_decision {"claim_id": "WC-1043", "decision": "repair", "coverage": "base", "customer_charge": 0}'
    )
    first = env.start(task)
    assert first.step(record).tool_ok
    again = first.step(record)
    assert again.tool_ok is False and "claim WC-1043 is already recorded (REC-WC-1043-1)" in again.observation
    second = env.start(task)  # a new episode: a new manager, nothing recorded
    assert second.manager is not first.manager and second.manager.recorded == {}
    assert json.loads(second.step(record).observation)["reference"] == "REC-WC-1043-1"


# -- tools that misbehave: huge results, SystemExit, constructors, slow calls ------------------------------

TOY_TOOLS = """
import sys
import time


class ToyManager:
    def __init__(self):
        self.calls = 0

    def big(self, size):
        return "x" * size

    def big_json(self, size):
        return {"rows": ["y"] * size}

    def fail_long(self, size):
        raise ValueError("\\n" * size)

    def leave(self, code):
        sys.exit(code)

    def interrupt(self):
        raise KeyboardInterrupt

    def nap(self, seconds):
        time.sleep(seconds)
        return "rested"

    def note(self, text=None, extra=None):
        return "noted"
"""


def toy_domain(tmp_path: Path, tools_py: str = TOY_TOOLS) -> Path:
    """A small SOP-Bench-format folder whose tools misbehave on request (size, code, seconds are numbers)."""
    folder = tmp_path / "toy"
    folder.mkdir(parents=True)
    (folder / "sop.txt").write_text("Answer the question.\n")
    base = {"type": "object", "properties": {}, "required": []}
    specs = []
    for name, arguments in [
        ("big", {"size": "integer"}),
        ("big_json", {"size": "integer"}),
        ("fail_long", {"size": "integer"}),
        ("leave", {"code": "integer"}),
        ("interrupt", {}),
        ("nap", {"seconds": "number"}),
    ]:
        schema = {**base, "properties": {a: {"type": t} for a, t in arguments.items()}, "required": list(arguments)}
        specs.append({"toolSpec": {"name": name, "description": f"{name} tool", "inputSchema": {"json": schema}}})
    note = {"type": "object", "properties": {"text": {"type": ["string", "null"]}, "extra": {}}}
    specs.append({"toolSpec": {"name": "note", "description": "note tool", "inputSchema": {"json": note}}})
    (folder / "toolspecs.json").write_text(json.dumps(specs))
    (folder / "tools.py").write_text(tools_py)
    (folder / "test_set.csv").write_text("id,question,answer\nq1,one?,1\nq2,two?,2\n")
    (folder / "metadata.json").write_text('{"output_columns": ["answer"], "id_column": "id"}')
    return folder


def toy_session(folder: Path, **kwargs):
    toy = load_environment(f"sopbench:{folder}", **kwargs)
    return toy, toy.start(task_of(toy, "q1"))


def test_a_huge_tool_result_is_cut_to_the_cap_with_a_note_saying_how_much(tmp_path):
    assert MAX_OBSERVATION_CHARS == 16_384
    folder = toy_domain(tmp_path)
    _, session = toy_session(folder)
    result = session.step('CALL big {"size": 5000000}')
    note = "\n[4983684 characters cut: a tool result is at most 16384 characters]"
    assert (result.tool_ok, len(result.observation)) == (True, 16_384)
    assert result.observation == "x" * (16_384 - len(note)) + note and 16_384 - len(note) + 4_983_684 == 5_000_000
    assert session.step('CALL big {"size": 16384}').observation == "x" * 16_384  # at the cap: untouched
    rows = session.step('CALL big_json {"size": 1000000}').observation  # a non-str result: its JSON is cut
    assert (
        len(rows) == 16_384
        and rows.startswith('{"rows": ["y", "y"')
        and rows.endswith(" characters cut: a tool result is at most 16384 characters]")
    )
    failed = session.step('CALL fail_long {"size": 5000000}')  # "\n" is 2 characters in JSON: cut inside
    message = json.loads(failed.observation)["error"]  # still JSON
    assert failed.tool_ok is False and len(failed.observation) <= 16_384 and len(failed.observation) >= 16_380
    assert message.startswith("fail_long failed: ValueError: \n\n") and message.endswith(
        " characters cut: a tool result is at most 16384 characters]"
    )
    # native tool calls get the same cut observation
    _, native = toy_session(folder)
    turn = AssistantTurn(tool_calls=(ToolCall("big", {"size": 5000000}, "c1"),))
    assert native.respond(turn).tool_results[0].content == result.observation


def test_max_observation_chars_is_an_entry_argument_checked_when_the_config_is_built(tmp_path):
    folder = toy_domain(tmp_path)
    _, session = toy_session(folder, max_observation_chars=300)
    observation = session.step('CALL big {"size": 1000}').observation
    note = "\n[762 characters cut: a tool result is at most 300 characters]"
    assert observation == "x" * (300 - len(note)) + note and 300 - len(note) + 762 == 1000
    entry = {"name": f"sopbench:{folder}", "kwargs": {"max_observation_chars": 4096}}
    assert load_config(None, values={"environment.domains": [entry]}).environment.entries()[0][1] == {
        "max_observation_chars": 4096
    }
    for bad in (255, True, 1000.0, "big"):
        entry = {"name": f"sopbench:{folder}", "kwargs": {"max_observation_chars": bad}}
        with pytest.raises(
            ValueError, match=r"environment\.domains\[0\].*max_observation_chars must be a whole number .* >= 256"
        ):
            load_config(None, values={"environment.domains": [entry]})


def test_a_tools_system_exit_is_an_error_observation_and_keyboard_interrupt_still_stops(tmp_path):
    _, session = toy_session(toy_domain(tmp_path))
    result = session.step('CALL leave {"code": 3}')
    assert (result.tool_name, result.tool_ok, result.done) == ("leave", False, False)
    assert json.loads(result.observation) == {"error": "leave failed: SystemExit: 3"}
    assert session.step('CALL note {"text": "still here"}').observation == "noted"  # the episode goes on
    with pytest.raises(KeyboardInterrupt):
        session.step("CALL interrupt {}")


CONSTRUCTORS = {
    "needs an argument": (
        "    def __init__(self, db_path):\n        self.db_path = db_path\n",
        r"TypeError: .*missing 1 required positional argument: 'db_path'",
    ),
    "raises": ("    def __init__(self):\n        raise RuntimeError('no database')\n", "RuntimeError: no database"),
    "exits": ("    def __init__(self):\n        raise SystemExit(2)\n", "SystemExit: 2"),
}


@pytest.mark.parametrize("kind", sorted(CONSTRUCTORS))
def test_a_manager_that_cannot_be_made_is_refused_at_load_naming_tools_py_and_the_class(tmp_path, kind):
    constructor, error = CONSTRUCTORS[kind]
    tools_py = TOY_TOOLS.replace("    def __init__(self):\n        self.calls = 0\n", constructor)
    folder = toy_domain(tmp_path, tools_py)
    message = (
        rf"toy/tools\.py: the manager class ToyManager cannot be made with no arguments \(one instance per "
        rf"episode\): ToyManager\(\) raised {error}"
    )
    with pytest.raises(ValueError, match=message):
        load_environment(f"sopbench:{folder}")
    with pytest.raises(ValueError, match=r"environment\.domains\[0\] .*" + message):  # when the config is built
        load_config(None, values={"environment.domains": [f"sopbench:{folder}"]})


def test_a_system_exit_while_importing_tools_py_or_in_a_later_constructor_is_an_error(tmp_path):
    folder = toy_domain(tmp_path, "raise SystemExit(4)\n" + TOY_TOOLS)
    with pytest.raises(ValueError, match=r"importing .*toy/tools\.py raised SystemExit: 4"):
        load_environment(f"sopbench:{folder}")
    later = TOY_TOOLS.replace(
        "    def __init__(self):\n        self.calls = 0\n",
        "    made = 0\n\n    def __init__(self):\n        ToyManager.made += 1\n"
        "        if ToyManager.made > 1:\n            raise SystemExit(5)\n",
    )
    toy = load_environment(f"sopbench:{toy_domain(tmp_path / 'later', later)}")  # the load's instance works
    with pytest.raises(RuntimeError, match=r"ToyManager\(\) raised SystemExit\(5\)"):  # a fault the engine retries
        toy.start(task_of(toy, "q1"))


def test_the_tool_lines_show_each_arguments_json_type(tmp_path):
    toy = load_environment(f"sopbench:{toy_domain(tmp_path)}")
    lines = toy.system_prompt().splitlines()
    assert lines[lines.index("Tools:") + 1 :] == [
        "big(size: integer): big tool",
        "big_json(size: integer): big_json tool",
        "fail_long(size: integer): fail_long tool",
        "leave(code: integer): leave tool",
        "interrupt(): interrupt tool",
        "nap(seconds: number): nap tool",
        "note(text: string or null, extra): note tool",  # a union of types; no type given: the name alone
        "Reply with one action per turn:",
        'CALL <tool> {"<arg>": <value of its type>}',
        'ANSWER {"answer": "..."}',
    ]


def test_a_slow_tool_runs_to_its_end_and_the_episode_then_ends_as_timeout(tmp_path, reference_policy):
    """Tools run synchronously: rollout.timeout_s is checked between turns, after the call returns."""
    import time

    from rl_core.model.generation import Generation
    from rl_core.rollout import RolloutSettings, collect_rollouts

    toy = load_environment(f"sopbench:{toy_domain(tmp_path)}")
    tokenizer, stop = reference_policy.tokenizer, reference_policy.episode_renderer().stop_id
    moves = iter(['CALL nap {"seconds": 0.3}', 'ANSWER {"answer": "1"}'])

    def sampler(keys, contexts, limits, temperature):
        ids = [*tokenizer.encode(next(moves), add_special_tokens=False), stop]
        return [Generation(ids, [-0.5] * len(ids), True)]

    settings = RolloutSettings(max_turns=4, max_tokens_per_turn=40, context_window=2048, temperature=1.0, timeout_s=0.1)
    started = time.monotonic()
    (episode,) = collect_rollouts(
        reference_policy,
        [(toy, task_of(toy, "q1"))],
        settings,
        group_size=1,
        run_id="slow",
        iteration=1,
        token_sampler=sampler,
    )
    assert time.monotonic() - started >= 0.3  # the nap was not interrupted
    assert (episode.finish_reason, episode.reward, episode.num_turns) == ("timeout", pytest.approx(-0.1), 1)
    assert [t.text for t in episode.turns if t.role == "tool"] == ["rested"]


# -- the context budget -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_policy():
    from rl_core.learner import load_start_policy

    return load_start_policy(load_config(CONFIG))


def test_the_measured_prompt_of_the_long_procedure_fits_the_shipped_config(env, reference_policy):
    from rl_core.context_budget import measure_context_budget

    cfg = load_config(CONFIG)
    budget = measure_context_budget(cfg, reference_policy.episode_renderer(), [env])
    assert (budget.prompt_tokens, budget.tasks, budget.fits) == (4900, 52, True)
    assert budget.total == 8 * (80 + 160) + 4900 <= cfg.policy.context_window <= reference_policy.max_positions


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["environment.prompt_tokens=4000"], r"over environment\.prompt_tokens \(4000\).*at least 4900"),
        (
            ["environment.prompt_tokens=100", "policy.context_window=6000"],
            r"= 8 \* \(80 \+ 160\) \+ 4900 = 6820 > policy\.context_window \(6000\)",
        ),
    ],
)
def test_a_budget_that_cannot_hold_the_procedure_is_refused_naming_the_field(tmp_path, overrides, message):
    from rl_core.run import TrainingRun

    cfg = load_config(CONFIG, [*overrides, f"storage.run_dir={tmp_path}"])  # the config's own check passes
    with pytest.raises(ValueError, match=message):
        TrainingRun(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before anything is written


def test_a_window_past_the_checkpoints_positions_is_refused():
    from rl_core.learner import load_start_policy

    with pytest.raises(ValueError, match=r"policy\.context_window \(9000\) exceeds .* \(8192\)"):
        load_start_policy(load_config(CONFIG, ["policy.context_window=9000"]))


def test_an_episode_that_outgrows_the_window_ends_as_context_overflow(env, reference_policy):
    """The budget fits by the config's numbers (40 tokens per tool result), but get_model_terms answers with
    about 300: the episode that asks for it overflows the window; the one that does not is answered."""
    from rl_core.collector import rollout_settings
    from rl_core.context_budget import measure_context_budget
    from rl_core.model.generation import Generation
    from rl_core.rollout import collect_rollouts

    overrides = ["rollout.max_turns=2", "environment.expected_tool_output=40", "policy.context_window=5184"]
    cfg = load_config(CONFIG, overrides)
    budget = measure_context_budget(cfg, reference_policy.episode_renderer(), [env])
    assert budget.fits and budget.total == 2 * (80 + 40) + 4900 == 5140 <= 5184
    task = task_of(env, "WC-1043")
    moves = {
        0: ['CALL get_model_terms {"model_code": "AW-DSH-450"}', "unused"],
        1: ['CALL get_registration {"serial_number": "SN-48989"}', format_answer(task.expected)],
    }
    tokenizer, stop = reference_policy.tokenizer, reference_policy.episode_renderer().stop_id
    played = Counter()

    def sampler(keys, contexts, limits, temperature):
        out = []
        for key in keys:
            ids = [*tokenizer.encode(moves[key][played[key]], add_special_tokens=False), stop]
            played[key] += 1
            out.append(Generation(ids, [-0.5] * len(ids), True))
        return out

    overflow, answered = collect_rollouts(
        reference_policy,
        [(env, task), (env, task)],
        rollout_settings(cfg),
        group_size=1,
        run_id="budget",
        iteration=1,
        token_sampler=sampler,
    )
    assert overflow.prompt_tokens == answered.prompt_tokens <= budget.prompt_tokens <= cfg.environment.prompt_tokens
    assert (overflow.finish_reason, overflow.reward, overflow.num_turns) == ("context_overflow", pytest.approx(-0.1), 1)
    assert len(overflow.tokens) <= 5184
    assert (answered.finish_reason, answered.reward) == ("answered", 1.0)


# -- training and evaluation through the real path -----------------------------------------------------------


@pytest.mark.slow
def test_one_iteration_trains_and_evaluates_on_the_sopbench_domain(env, tmp_path):
    from rl_core.run import TrainingRun
    from rl_core.store import TrajectoryStore
    from rl_core.trajectory import FINISH_REASONS

    overrides = [
        "iterations=1",
        "rollout.group_size=2",
        "rollout.global_batch_size=4",
        "evaluation.max_tasks=2",
        "evaluation.num_samples=2",
        "evaluation.pass_k=[1,2]",
        "evaluation.val_every=1",
        f"storage.run_dir={tmp_path}",
        "storage.run_id=sopbench",
    ]
    run = TrainingRun(load_config(CONFIG, overrides))
    result = run.run(log=lambda line: None)
    assert [(r.iteration, r.step) for r in result.records] == [(1, 1)]
    rows = TrajectoryStore(tmp_path).read_table("sopbench", 1).to_pylist()
    assert len(rows) == 4 and {r["env_name"] for r in rows} == {"appliance_warranty"}
    train_ids = {t.task_id for t in env.tasks("train")}
    assert {r["task_id"] for r in rows} <= train_ids
    shares = [-0.1, 0.0, 1 / 3, 2 / 3, 1.0]  # the share of fields right, or no answer at all
    for row in rows:
        assert row["finish_reason"] in FINISH_REASONS and row["finish_reason"] != "env_error"
        assert min(abs(row["reward"] - share) for share in shares) < 1e-6
        assert row["reward"] == pytest.approx(sum(dict(row["reward_components"]).values()))
        assert row["prompt_tokens"] >= 4800  # the long procedure is in every prompt
        assert len(row["tokens"]) <= 7168
    for report in (result.before, result.after):
        assert set(report.per_env) == {"appliance_warranty"} and 0.0 <= report.pass_at_1 <= 1.0
        assert len(report.task_success) == 2 and all(k.startswith("appliance_warranty/") for k in report.task_success)
        heldout = {f"appliance_warranty/{t.task_id}" for t in env.tasks("heldout")}
        assert set(report.task_success) <= heldout
        finish = [v for k, v in report.metrics.items() if k.startswith("val/finish_frac/") and k.count("/") == 2]
        assert sum(finish) == pytest.approx(1.0)
    stored = json.loads((tmp_path / "sopbench" / "evaluations" / "step-000001.json").read_text())
    assert stored["metrics"]["val/pass_at_1/appliance_warranty"] == result.after.per_env["appliance_warranty"]
