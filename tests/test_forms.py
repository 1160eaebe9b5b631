"""Issue 15, item 3: the Prefect UI's Custom run form starts at the config's values, as plain typed fields.

The forms are the JSON schemas Prefect makes of each flow's `settings` parameter. Each typed field
must be a plain field (no `anyOf` with null: the UI would show an `int | None` switch starting at
None) holding the shipped config's value, choices must be enums (dropdowns), and a bad value must
get a message the form can show next to the field, in both of Prefect 3.9's UIs: the V1 UI hands
its validation only some keys of each property (not `minimum` or `pattern`), hence the copy of the
constraints under `allOf`. And what runs must stay what was asked for: fields left out take the
config file's value, so the CLI (`turnstile train --config X`, `resume`, `demo`) runs X as it is,
and a deployment served on X starts its form at X's values.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import build_error_obj, validate

from flows.cli import _parser, _settings
from flows.deployments import form_parameters, schedule_line
from flows.evaluate import evaluate_flow
from flows.parameters import SHIPPED_CONFIG, RunSettings, TrainSettings
from flows.promote import promote_flow, rollback_flow
from flows.train import train_flow
from rl_core.config import dump_config, load_config
from rl_core.runs.folder import RUN_CONFIG_FILE

FLOWS = {"train": train_flow, "evaluate": evaluate_flow, "promote": promote_flow, "rollback": rollback_flow}

# The keys of a property Prefect 3.9's V1 UI passes to /ui/schemas/validate (its SchemaPropertyResponse mapper).
V1_KEYS = {
    "position", "block_type_slug", "$ref", "anyOf", "allOf", "example", "default", "const", "description", "enum",
    "format", "items", "prefixItems", "properties", "required", "title", "type", "maxItems", "minItems",
}  # fmt: skip

# A config unlike the quickstart in every typed field of the train form.
OTHER = {
    "iterations": 3,
    "optimizer": {"lr": 1.0e-5},
    "rollout": {"group_size": 4, "global_batch_size": 16},
    "algorithm": {"loss_fn": "cispo", "advantage_method": "rloo"},
    "doctor": {"on_collapse": "stop"},
    "storage": {"run_dir": "elsewhere"},
}


def _settings_schema(flow: Any) -> dict[str, Any]:
    schema = parameter_schema(flow).model_dump_for_openapi()
    reference = schema["properties"]["settings"]["$ref"].rsplit("/", 1)[-1]
    return schema["definitions"][reference]


def _other_config(tmp_path: Path) -> Path:
    shipped = yaml.safe_load((Path(__file__).parent.parent / SHIPPED_CONFIG).read_text())
    for key, value in OTHER.items():
        shipped[key] = {**shipped.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(shipped))
    return path


def _same(a, b) -> bool:
    return dump_config(a) == dump_config(b)


@pytest.mark.parametrize("name", FLOWS)
def test_no_form_field_of_the_config_starts_as_none(name):
    fields = _settings_schema(FLOWS[name])["properties"]
    registry = name in ("promote", "rollback")  # they make no run of their own: no run_id
    assert ("run_id" in fields) is not registry
    for field in ("config_path", "run_dir", *(() if registry else ("run_id",))):
        assert fields[field]["type"] == "string" and "anyOf" not in fields[field], (name, field)
        assert fields[field].get("default") is not None, (name, field)


def test_the_train_form_is_plain_typed_fields_at_the_shipped_values():
    fields = _settings_schema(train_flow)["properties"]
    shipped = load_config(None)
    assert not [name for name, field in fields.items() if "anyOf" in field or field.get("type") == "null"]
    expected = {
        "config_path": ("string", SHIPPED_CONFIG),
        "run_id": ("string", ""),
        "run_dir": ("string", shipped.storage.run_dir),
        "iterations": ("integer", shipped.iterations),
        "learning_rate": ("number", shipped.optimizer.lr),
        "group_size": ("integer", shipped.rollout.group_size),
        "global_batch_size": ("integer", shipped.rollout.global_batch_size),
        "loss_fn": ("string", shipped.algorithm.loss_fn),
        "advantage_method": ("string", shipped.algorithm.advantage_method),
        "on_collapse": ("string", shipped.doctor.on_collapse),
    }
    assert {name: (fields[name]["type"], fields[name]["default"]) for name in expected} == expected
    assert fields["iterations"]["minimum"] == 1 and fields["learning_rate"]["exclusiveMinimum"] == 0
    assert (fields["group_size"]["minimum"], fields["group_size"]["maximum"]) == (1, 64)
    assert "ppo" in fields["loss_fn"]["enum"] and "rloo" in fields["advantage_method"]["enum"]
    assert fields["on_collapse"]["enum"] == ["warn", "stop", "rollback"]
    # the flow's default settings are those values too (what a deployment without parameters shows)
    assert TrainSettings().model_dump() == {
        **{name: default for name, (_, default) in expected.items()},
        "overrides": [],
    }


@pytest.mark.parametrize("v1", [False, True], ids=["schema", "v1-ui"])
def test_a_bad_value_gets_a_message_naming_the_limit(v1):
    schema = parameter_schema(train_flow).model_dump_for_openapi()
    if v1:  # what the V1 UI sends to /ui/schemas/validate
        for definition in schema["definitions"].values():
            definition["properties"] = {
                name: {k: v for k, v in field.items() if k in V1_KEYS}
                for name, field in definition["properties"].items()
            }
    values = {"settings": {**TrainSettings().model_dump(), "iterations": 0, "learning_rate": -0.1, "run_id": "a b"}}
    errors = build_error_obj(validate(values, schema))["errors"]
    [settings] = errors
    messages = {entry["property"]: entry["errors"] for entry in settings["errors"]}
    assert messages["iterations"] == ["0 is less than the minimum of 1"]
    assert messages["learning_rate"] == ["-0.1 is less than or equal to the minimum of 0"]
    assert "does not match" in messages["run_id"][0]
    assert not validate({"settings": TrainSettings().model_dump()}, schema)


def test_a_field_left_out_takes_the_config_files_value(tmp_path):
    other = _other_config(tmp_path)
    assert _same(TrainSettings(config_path=str(other)).load(), load_config(other))
    assert TrainSettings(config_path=str(other)).iterations == 3
    assert TrainSettings(overrides=["iterations=2", "optimizer.lr=0.5"]).load().optimizer.lr == 0.5
    # a given field wins over the file and the overrides; None counts as left out
    settings = TrainSettings(config_path=str(other), overrides=["iterations=7"], iterations=5, group_size=None)
    assert (settings.load().iterations, settings.group_size) == (5, 4)
    # an empty run_id is a generated name (the flow makes it); None is empty
    assert TrainSettings(run_id=None).load().storage.run_id is None


def test_a_config_that_cannot_be_read_fails_on_load_naming_it(tmp_path):
    settings = TrainSettings(config_path=str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        settings.load()


def _args(argv: list[str]) -> argparse.Namespace:
    return _parser().parse_args(argv)


def test_the_cli_runs_the_config_it_names(tmp_path):
    other = _other_config(tmp_path)
    assert _same(_settings(_args(["train", "--config", str(other)])).load(), load_config(other))
    with_set = _settings(_args(["train", "--config", str(other), "--set", "iterations=9"])).load()
    assert _same(with_set, load_config(other, ["iterations=9"]))
    assert _same(_settings(_args(["demo"])).load(), load_config(None))


def test_resume_runs_the_runs_recorded_config(tmp_path):
    other = _other_config(tmp_path)
    recorded = load_config(other, values={"storage.run_id": "first", "storage.run_dir": str(tmp_path / "runs")})
    (tmp_path / "runs" / "first").mkdir(parents=True)
    (tmp_path / "runs" / "first" / RUN_CONFIG_FILE).write_text(dump_config(recorded))
    args = _args(["resume", "first", "--run-dir", str(tmp_path / "runs")])
    assert _same(_settings(args).load(), recorded)


def test_a_deployment_served_on_another_config_starts_its_form_there(tmp_path):
    other = _other_config(tmp_path)
    parameters = form_parameters(train_flow, {"settings": {"config_path": str(other), "run_dir": "/data/runs"}})
    settings = parameters["settings"]
    assert (settings["iterations"], settings["loss_fn"], settings["run_dir"], settings["run_id"]) == (
        3,
        "cispo",
        "/data/runs",  # what the prefect.yaml gives stays
        "",
    )
    assert _same(TrainSettings(**settings).load(), load_config(other, values={"storage.run_dir": "/data/runs"}))
    # the shipped config by default: the flow's own defaults
    assert form_parameters(train_flow, None) == {"settings": TrainSettings().model_dump()}
    # the registry flows have no run_id; their form has the config's run_dir
    assert form_parameters(rollback_flow, None)["settings"] == {
        "config_path": SHIPPED_CONFIG,
        "overrides": [],
        "run_dir": load_config(None).storage.run_dir,
    }
    assert RunSettings.deployment_parameters()["run_id"] == ""


def test_the_schedule_line_says_paused_first():
    assert schedule_line([]) is None
    assert schedule_line([("0 2 * * * UTC", False)]).startswith("Schedule PAUSED (0 2 * * * UTC)")
    assert schedule_line([("0 2 * * * UTC", True)]).startswith("Schedule ON (0 2 * * * UTC)")
