"""Environments: action parsing, the SOP environment's observations and rewards, the built-in
domains (expert scores 1.0 everywhere, disjoint splits, balanced branches, reproducible
generator) and `load_environment` for domains and user classes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from rl_core.environments import (
    Environment,
    EnvSession,
    SOPEnvironment,
    StepResult,
    Task,
    available_domains,
    load_environment,
)
from rl_core.environments.actions import FinalAnswer, ParseFailure, ToolCall, format_answer, format_call, parse_action
from rl_core.environments.expert import ExpertError, expert_actions, solve
from rl_core.paths import DOMAINS_DIR, REPO_ROOT

BUILTIN = ["access", "inventory", "refunds"]
SPLITS = ["train", "heldout"]
ENTITY_KEYS = {"order_id", "customer_id", "sku", "supplier_id", "email", "user_id"}


# --- a user environment, loaded by class path in the tests below ----------------------


class EchoEnv(Environment):
    """Succeeds when the policy repeats `reply`."""

    name = "echo"

    def __init__(self, reply: str = "ok"):
        self.reply = reply

    def system_prompt(self) -> str:
        return "Repeat the reply."

    def tasks(self, split: str) -> list[Task]:
        return [Task("echo-0", self.name, split, "Say it.", expected={"text": self.reply})]

    def start(self, task: Task) -> EnvSession:
        return _EchoSession(task.expected["text"])


class _EchoSession(EnvSession):
    def __init__(self, reply: str):
        self.reply = reply

    def step(self, action_text: str) -> StepResult:
        reward = 1.0 if action_text.strip() == self.reply else 0.0
        return StepResult(observation=None, done=True, reward=reward, finish_reason="answered")

    def finish(self) -> tuple[float, dict[str, float]]:
        return 0.0, {}


class NotAnEnvironment:
    pass


# --- a hand-written mini domain, so observations and rewards can be checked by hand -----

MINI_DOMAIN = {
    "name": "mini",
    "description": "Hand-checked test domain.",
    "procedure_text": "Get the order; open orders get refund with the order amount.",
    "tools": [
        {
            "name": "get_order",
            "description": "an order",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
                "additionalProperties": False,
            },
            "table": "orders",
            "key": ["order_id"],
            "not_found": "order {order_id} not found",
            "returns": ["status", "amount"],
        }
    ],
    "procedure": [
        {"call": "get_order", "args": {"order_id": "$input.order_id"}, "save_as": "order"},
        {
            "if": {"ref": "$order.status", "op": "equals", "value": "open"},
            "then": [{"answer": {"decision": "refund", "amount": "$order.amount"}}],
            "else": [{"answer": {"decision": "deny", "amount": "0"}}],
        },
    ],
    "answer_fields": ["decision", "amount"],
}
MINI_ROWS = {
    "orders": [
        {"order_id": "4821", "status": "open", "amount": "120"},
        {"order_id": "4822", "status": "closed", "amount": "75"},
    ]
}
MINI_TASKS = {
    "train": [
        {
            "task_id": "mini-train-0",
            "prompt": "Refund order 4821.",
            "inputs": {"order_id": "4821"},
            "expected": {"decision": "refund", "amount": "120"},
        }
    ],
    "heldout": [
        {
            "task_id": "mini-heldout-0",
            "prompt": "Refund order 4822.",
            "inputs": {"order_id": "4822"},
            "expected": {"decision": "deny", "amount": "0"},
        }
    ],
}


@pytest.fixture
def mini_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "mini"
    folder.mkdir()
    (folder / "domain.json").write_text(json.dumps(MINI_DOMAIN))
    (folder / "fixtures.json").write_text(json.dumps(MINI_ROWS))
    for split, tasks in MINI_TASKS.items():
        (folder / f"tasks_{split}.jsonl").write_text("".join(json.dumps(task) + "\n" for task in tasks))
    return folder


@pytest.fixture
def mini(mini_dir: Path) -> SOPEnvironment:
    return SOPEnvironment(mini_dir)


@pytest.fixture
def mini_session(mini: SOPEnvironment) -> EnvSession:
    return mini.start(mini.tasks("train")[0])


@pytest.fixture(scope="module")
def builtin() -> dict[str, SOPEnvironment]:
    return {name: load_environment(name) for name in BUILTIN}


# --- action parsing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, action",
    [
        ('CALL get_order {"order_id": "4821"}', ToolCall("get_order", {"order_id": "4821"})),
        ('\n  CALL get_order{"order_id": "4821"}  \n', ToolCall("get_order", {"order_id": "4821"})),
        ('ANSWER {"decision": "refund", "amount": "120"}', FinalAnswer({"decision": "refund", "amount": "120"})),
        ("  ANSWER {}\n", FinalAnswer({})),
        ("I think we should refund", ParseFailure("expected CALL <tool> {...} or ANSWER {...}")),
        ('CALLget_order {"order_id": "4821"}', ParseFailure("expected CALL <tool> {...} or ANSWER {...}")),
        ('call get_order {"order_id": "4821"}', ParseFailure("expected CALL <tool> {...} or ANSWER {...}")),
        ('CALL {"order_id": "4821"}', ParseFailure("CALL needs a tool name, then a JSON object")),
        ("CALL get_order", ParseFailure("missing JSON object")),
        ('CALL get_order {"order_id": "4821"', ParseFailure("bad JSON (Expecting ',' delimiter)")),
        ('CALL get_order {"order_id": "1"} CALL get_order {"order_id": "2"}', ParseFailure("bad JSON (Extra data)")),
        ('ANSWER ["refund"]', ParseFailure("expected a JSON object")),
        ('ANSWER {"decision": "refund", "amount": 120}', ParseFailure("answer value for 'amount' must be a string")),
        ("ANSWER {decision: refund}", ParseFailure("bad JSON (Expecting property name enclosed in double quotes)")),
    ],
)
def test_parse_action(text: str, action: object) -> None:
    assert parse_action(text) == action


def test_formatted_actions_parse_back() -> None:
    call = format_call("get_quote", {"supplier_id": "7311", "qty": "12"})
    assert call == 'CALL get_quote {"supplier_id": "7311", "qty": "12"}'
    assert parse_action(call) == ToolCall("get_quote", {"supplier_id": "7311", "qty": "12"})
    answer = format_answer({"action": "ship", "source": "north"})
    assert answer == 'ANSWER {"action": "ship", "source": "north"}'
    assert parse_action(answer) == FinalAnswer({"action": "ship", "source": "north"})


# --- SOP session: observations ---------------------------------------------------------


@pytest.mark.parametrize(
    "action, observation, tool_name, tool_ok",
    [
        ('CALL get_order {"order_id": "4821"}', '{"status": "open", "amount": "120"}', "get_order", True),
        ('CALL get_order {"order_id": "9999"}', '{"error": "order 9999 not found"}', "get_order", False),
        ('CALL get_refund {"order_id": "4821"}', '{"error": "unknown tool \'get_refund\'"}', "get_refund", False),
        ("CALL get_order {}", '{"error": "missing argument \'order_id\' for get_order"}', "get_order", False),
        (
            'CALL get_order {"order_id": "4821", "note": "x"}',
            '{"error": "unknown argument \'note\' for get_order"}',
            "get_order",
            False,
        ),
        (
            'CALL get_order {"order_id": 4821}',
            '{"error": "argument \'order_id\' must be a string"}',
            "get_order",
            False,
        ),
        ("refund it please", '{"error": "expected CALL <tool> {...} or ANSWER {...}"}', None, False),
        ('ANSWER {"decision": "refund"', '{"error": "bad JSON (Expecting \',\' delimiter)"}', None, False),
    ],
)
def test_step_observations(
    mini_session: EnvSession, action: str, observation: str, tool_name: str | None, tool_ok: bool
) -> None:
    result = mini_session.step(action)
    assert result == StepResult(observation=observation, tool_name=tool_name, tool_ok=tool_ok)
    assert json.loads(result.observation)  # always valid JSON


def test_bad_actions_never_end_the_episode(mini_session: EnvSession) -> None:
    for text in ["", "ANSWER", "CALL", "{}", 'ANSWER {"a": [1, {"b": null}]}', "CALL x " + "[" * 5000, "\x00\ud800"]:
        result = mini_session.step(text)
        assert not result.done and result.tool_ok is False
    assert mini_session.step('ANSWER {"decision": "refund", "amount": "120"}').done


# --- SOP session: rewards ---------------------------------------------------------------


def test_all_fields_right_scores_one(mini_session: EnvSession) -> None:
    result = mini_session.step('ANSWER {"decision": " Refund ", "amount": "120"}')
    assert (result.done, result.finish_reason, result.observation) == (True, "answered", None)
    assert result.reward == 1.0
    assert result.reward_components == {"field/decision": 0.5, "field/amount": 0.5, "format_penalty": 0.0}
    assert mini_session.finish() == (1.0, result.reward_components)


def test_one_field_of_two_scores_half(mini_session: EnvSession) -> None:
    result = mini_session.step('ANSWER {"decision": "refund", "amount": "100", "note": "extra fields are ignored"}')
    assert result.reward == 0.5
    assert result.reward_components == {"field/decision": 0.5, "field/amount": 0.0, "format_penalty": 0.0}
    assert sum(result.reward_components.values()) == pytest.approx(result.reward)


def test_missing_answer_field_scores_zero_for_it(mini_session: EnvSession) -> None:
    assert mini_session.step('ANSWER {"amount": "120"}').reward == 0.5


def test_no_answer_is_penalised(mini_session: EnvSession) -> None:
    mini_session.step('CALL get_order {"order_id": "4821"}')
    mini_session.step('ANSWER {"decision": "refund", "amount": 120}')  # malformed: not an answer
    reward, components = mini_session.finish()
    assert reward == pytest.approx(-0.1)
    assert components == {"field/decision": 0.0, "field/amount": 0.0, "format_penalty": -0.1}
    assert sum(components.values()) == pytest.approx(reward)


def test_stepping_after_the_answer_is_a_caller_bug(mini_session: EnvSession) -> None:
    mini_session.step('ANSWER {"decision": "deny", "amount": "0"}')
    with pytest.raises(RuntimeError, match="already answered"):
        mini_session.step('ANSWER {"decision": "refund", "amount": "120"}')


def test_start_rejects_foreign_tasks(mini: SOPEnvironment) -> None:
    with pytest.raises(ValueError, match="belongs to 'echo'"):
        mini.start(Task("t", "echo", "train", "p", expected={"decision": "x", "amount": "y"}))
    with pytest.raises(ValueError, match="no expected value"):
        mini.start(Task("t", "mini", "train", "p", expected={"decision": "x"}))


def test_sessions_are_deterministic(builtin: dict[str, SOPEnvironment]) -> None:
    env = builtin["inventory"]
    task = env.tasks("train")[7]
    actions = ["nonsense", 'CALL find_supplier {"sku": "0000"}'] + expert_actions(env, task, mistake_rate=0.5)
    runs = []
    for _ in range(2):
        session = env.start(task)
        runs.append([session.step(action) for action in actions])
    assert runs[0] == runs[1]
    assert runs[0][-1].done and runs[0][1].observation == '{"error": "no supplier for sku 0000"}'
    assert solve(env, task, mistake_rate=0.5).turns == solve(env, task, mistake_rate=0.5).turns


# --- the expert ------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_expert_solves_every_task(builtin: dict[str, SOPEnvironment], name: str) -> None:
    env = builtin[name]
    for split in SPLITS:
        for task in env.tasks(split):
            episode = solve(env, task)
            assert (episode.reward, episode.success) == (1.0, True), (task.task_id, episode.turns)
            assert episode.turns[-1][1] is None and episode.turns[-1][0].startswith("ANSWER ")
            assert all(not json.loads(obs).get("error") for _, obs in episode.turns[:-1])


@pytest.mark.parametrize("name", BUILTIN)
def test_expert_with_mistakes_fails_some(builtin: dict[str, SOPEnvironment], name: str) -> None:
    env = builtin[name]
    tasks = env.tasks("train")
    always_wrong = [solve(env, task, mistake_rate=1.0) for task in tasks]
    assert sum(not episode.success for episode in always_wrong) >= len(tasks) // 2
    assert all(episode.mistakes >= 1 for episode in always_wrong)
    rng = random.Random(0)
    sometimes_wrong = [solve(env, task, mistake_rate=0.2, rng=rng) for task in tasks]
    share = sum(episode.success for episode in sometimes_wrong) / len(tasks)
    assert 0.5 < share < 0.98


def test_expert_never_reads_expected(builtin: dict[str, SOPEnvironment]) -> None:
    env = builtin["refunds"]
    task = env.tasks("heldout")[0]
    wrong = dataclasses.replace(task, expected={"decision": "nope", "amount": "nope"})
    assert expert_actions(env, wrong) == expert_actions(env, task)
    assert solve(env, wrong).reward == 0.0


def test_expert_reports_a_broken_procedure(mini_dir: Path) -> None:
    domain = dict(MINI_DOMAIN, procedure=[{"answer": {"decision": "$order.status", "amount": "0"}}])
    (mini_dir / "domain.json").write_text(json.dumps(domain))
    env = SOPEnvironment(mini_dir)
    with pytest.raises(ExpertError, match=r"\$order.status has no value"):
        solve(env, env.tasks("train")[0])


# --- the built-in domains ----------------------------------------------------------------


def test_builtin_domains_are_shipped(builtin: dict[str, SOPEnvironment]) -> None:
    assert available_domains() == BUILTIN
    for env in builtin.values():
        assert (len(env.tasks("train")), len(env.tasks("heldout"))) == (1000, 60)
        assert len({task.task_id for split in SPLITS for task in env.tasks(split)}) == 1060


@pytest.mark.parametrize("name", BUILTIN)
def test_system_prompt_is_short_and_complete(builtin: dict[str, SOPEnvironment], name: str) -> None:
    env = builtin[name]
    prompt = env.system_prompt()
    assert len(prompt.split()) <= 120
    assert env.domain.procedure_text in prompt
    for tool in env.domain.tools.values():
        assert f"{tool.name}({', '.join(tool.argument_names)})" in prompt
    assert 'CALL <tool> {"<arg>": "<value>"}' in prompt
    assert "ANSWER {" + ", ".join(f'"{field}": "..."' for field in env.domain.answer_fields) + "}" in prompt


def _entities(env: SOPEnvironment, split: str) -> set[str]:
    """Entity ids in a split's inputs and in every observation the expert (right or wrong) reaches."""
    found = set()
    for task in env.tasks(split):
        found |= {value for key, value in task.inputs.items() if key in ENTITY_KEYS}
        for rate in (0.0, 1.0):
            for _, observation in solve(env, task, mistake_rate=rate).turns[:-1]:
                found |= {value for key, value in json.loads(observation).items() if key in ENTITY_KEYS}
    return found


@pytest.mark.parametrize("name", BUILTIN)
def test_heldout_entities_never_appear_in_training(builtin: dict[str, SOPEnvironment], name: str) -> None:
    env = builtin[name]
    train, heldout = _entities(env, "train"), _entities(env, "heldout")
    assert len(train) >= 300 and len(heldout) >= 60
    assert not train & heldout
    train_text = "\n".join(task.prompt for task in env.tasks("train"))
    assert not [entity for entity in heldout if entity in train_text]


@pytest.mark.parametrize("name", BUILTIN)
def test_branches_are_balanced_in_both_splits(builtin: dict[str, SOPEnvironment], name: str) -> None:
    env = builtin[name]
    first_field = env.domain.answer_fields[0]
    shares = {}
    for split in SPLITS:
        tasks = env.tasks(split)
        outcomes = [task.expected[first_field] for task in tasks]
        shares[split] = {value: outcomes.count(value) / len(tasks) for value in set(outcomes)}
        assert min(shares[split].values()) >= 0.2, shares
    assert shares["train"].keys() == shares["heldout"].keys()
    assert len(shares["train"]) >= 3


def test_generator_is_reproducible_and_matches_shipped_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("make_domains", REPO_ROOT / "scripts" / "make_domains.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_domains", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    assert len(written) == 4 * len(BUILTIN)
    for relative in written:
        assert (tmp_path / relative).read_bytes() == (DOMAINS_DIR / relative).read_bytes(), relative


# --- load_environment ----------------------------------------------------------------------


def test_load_builtin_domain() -> None:
    env = load_environment("refunds", reply="class-path kwargs are not for built-in domains")
    assert isinstance(env, SOPEnvironment) and env.name == "refunds"
    assert env.tasks("heldout")[0].env_name == "refunds" and env.tasks("heldout")[0].split == "heldout"


def test_load_domain_from_another_folder(mini_dir: Path) -> None:
    env = load_environment("mini", domains_dir=mini_dir.parent)
    assert env.name == "mini" and [task.task_id for task in env.tasks("train")] == ["mini-train-0"]


def test_load_user_class_by_path() -> None:
    env = load_environment("tests.test_environments:EchoEnv", reply="hello")
    assert isinstance(env, EchoEnv) and env.reply == "hello"
    task = env.tasks("train")[0]
    assert env.start(task).step("hello").reward == 1.0


def test_unknown_domain_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown environment 'nope'.*\['access', 'inventory', 'refunds'\]"):
        load_environment("nope")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.no_such_module:EchoEnv", "cannot import module 'tests.no_such_module'"),
        ("tests.test_environments:Missing", "has no attribute 'Missing'"),
        ("tests.test_environments:NotAnEnvironment", "NotAnEnvironment is not a subclass"),
        ("json:loads", "loads is not a subclass"),
        ("tests.test_environments:", "must look like 'package.module:ClassName'"),
    ],
)
def test_bad_class_paths_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        load_environment(spec)
    assert spec in str(error.value) and message in str(error.value)
