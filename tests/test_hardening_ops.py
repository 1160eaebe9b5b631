"""Issue 9, item 8: typed values from the Prefect form and the command line keep their type.

A typed form field (TrainSettings.run_id, learning_rate, ...) reaches the config as the value it
already is, never written as `key=value` text and parsed as YAML again; `--set key=value` text is
read by the field's type: the raw text for string fields, YAML for the rest.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.cli import _parser, _settings
from flows.evaluate import EvaluateSettings
from flows.parameters import RunSettings, TrainSettings
from rl_core.config import apply_overrides, dump_config, load_config, override_value
from rl_core.runs.folder import RUN_CONFIG_FILE

# Each is a valid run name (the form's pattern) that YAML reads as something else:
# 2024, 0x1F, 1_000, -1 -> int; on, yes, Off -> bool; null, NULL -> None; 1.0e3, .inf -> float.
YAML_LOOKALIKES = ["2024", "on", "null", "1e3", "yes", "1.0e3", "0x1F", "Off", "NULL", ".inf", "1_000", "-1"]


@pytest.mark.parametrize("name", YAML_LOOKALIKES)
def test_typed_run_id_stays_the_string_it_is(name):
    assert TrainSettings(run_id=name).load().storage.run_id == name
    assert RunSettings(run_id=name).load().storage.run_id == name


def test_every_typed_field_reaches_the_config_with_its_type():
    settings = TrainSettings(
        run_id="2024",
        run_dir="yes",
        iterations=3,
        learning_rate=1e-5,
        group_size=4,
        global_batch_size=8,
        loss_fn="cispo",
        advantage_method="rloo",
        on_collapse="stop",
        overrides=["storage.run_id=overridden", "optimizer.lr=0.5"],  # the typed fields win
    )
    assert settings.typed_values() == {
        "iterations": 3,
        "optimizer.lr": 1e-5,
        "rollout.group_size": 4,
        "rollout.global_batch_size": 8,
        "algorithm.loss_fn": "cispo",
        "algorithm.advantage_method": "rloo",
        "doctor.on_collapse": "stop",
        "storage.run_id": "2024",
        "storage.run_dir": "yes",
    }
    cfg = settings.load()
    assert (cfg.storage.run_id, cfg.storage.run_dir) == ("2024", "yes")
    assert cfg.iterations == 3 and cfg.optimizer.lr == 1e-5
    assert (cfg.rollout.group_size, cfg.rollout.global_batch_size) == (4, 8)
    assert (cfg.algorithm.loss_fn, cfg.algorithm.advantage_method, cfg.doctor.on_collapse) == ("cispo", "rloo", "stop")
    # a field left out takes the config file's value (read with the overrides)
    assert TrainSettings(overrides=["iterations=2"]).load().iterations == 2


def test_evaluate_settings_hand_over_typed_values():
    settings = EvaluateSettings(run_id="on", max_tasks=2)
    assert settings.typed_values() == {"evaluation.max_tasks": 2, "storage.run_id": "on", "storage.run_dir": "runs"}
    cfg = settings.load()
    assert cfg.evaluation.max_tasks == 2 and cfg.storage.run_id == "on"


def test_a_typed_value_the_config_rejects_names_the_field():
    with pytest.raises(ValidationError, match="rollout.global_batch_size"):
        TrainSettings(group_size=8, global_batch_size=30).load()


@pytest.mark.parametrize("name", ["2024", "on", "null", "yes"])
def test_resume_continues_the_run_it_names(tmp_path, name):
    # the run's recorded config, as a first `turnstile train` wrote it
    first = load_config(None, values={"storage.run_id": name, "storage.run_dir": str(tmp_path)})
    (tmp_path / name).mkdir()
    (tmp_path / name / RUN_CONFIG_FILE).write_text(dump_config(first))

    settings = _settings(_parser().parse_args(["resume", name, "--run-dir", str(tmp_path), "--set", "iterations=40"]))
    cfg = settings.load()

    assert cfg.storage.run_id == name and cfg.storage.run_dir == str(tmp_path)
    assert cfg.iterations == 40
    assert settings.config_path == str(tmp_path / name / RUN_CONFIG_FILE)


# -- --set text: raw for string fields, YAML for the rest ------------------------------


@pytest.mark.parametrize(
    ("override", "section", "field", "expected"),
    [
        ("storage.run_id=2024", "storage", "run_id", "2024"),
        ("storage.run_id=on", "storage", "run_id", "on"),
        ("storage.run_id=1e3", "storage", "run_id", "1e3"),
        ("tracking.experiment=2024", "tracking", "experiment", "2024"),
        ("tracking.experiment=yes", "tracking", "experiment", "yes"),
        ("policy.device=null", "policy", "device", "null"),  # a plain str field has no None to mean
        ("storage.run_id=null", "storage", "run_id", None),  # an optional str: YAML's null is None
        ("tracking.mlflow_uri=", "tracking", "mlflow_uri", None),
        ("algorithm.loss_fn=cispo", "algorithm", "loss_fn", "cispo"),
        # not strings by their type: parsed as YAML
        ("rollout.group_size=4", "rollout", "group_size", 4),
        ("rollout.temperature=0.5", "rollout", "temperature", 0.5),
        ("optimizer.betas=[0.8, 0.9]", "optimizer", "betas", (0.8, 0.9)),
        ("environment.domains=[refunds, access]", "environment", "domains", ["refunds", "access"]),
        ("rollout.overlap_collection=on", "rollout", "overlap_collection", True),
        ("algorithm.clip_ratio_dual=null", "algorithm", "clip_ratio_dual", None),
        ("evaluation.pass_k=[1, 2]", "evaluation", "pass_k", [1, 2]),
    ],
)
def test_set_reads_the_text_by_the_fields_type(override, section, field, expected):
    extra = ["algorithm.max_steps_off_policy=1"] if "overlap_collection" in override else []
    cfg = load_config(None, [override, *extra])
    assert getattr(getattr(cfg, section), field) == expected
    assert type(getattr(getattr(cfg, section), field)) is type(expected)


def test_set_on_a_key_inside_a_dict_field_still_parses_yaml():
    assert apply_overrides({}, ["environment.env_kwargs.seed=7"]) == {"environment": {"env_kwargs": {"seed": 7}}}
    assert override_value("no_such.field", "2024") == 2024  # unknown: YAML, and the config then names it


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("rollout.group_size=abc", "rollout.group_size"),
        ("rollout.group_size=[1", "rollout.group_size"),  # not YAML at all
        ("storage.run_id=../escape", "storage.run_id"),
        ("rollout.no_such_field=1", "rollout.no_such_field"),
    ],
)
def test_a_bad_set_value_names_the_field(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_logged_params_rebuild_the_config_they_came_from():
    # tasks/tracking.py logs strings as they are and everything else as JSON (None as "null");
    # read back as --set text, a run id of digits stays a string
    from tasks.tracking import flatten_config

    cfg = load_config(None, values={"storage.run_id": "2024", "tracking.experiment": "on"})
    params = flatten_config(cfg)
    rebuilt = load_config(None, [f"{key}={value}" for key, value in params.items()])
    assert rebuilt == cfg


@pytest.mark.parametrize("key", ["tracking.experiment", "tracking.registered_model", "storage.run_dir"])
def test_an_empty_set_on_a_required_name_is_refused_naming_the_field(key):
    """`--set key=` reads as the empty text for a string field; names that cannot be empty refuse it."""
    with pytest.raises(ValueError, match=key.split(".")[1]):
        load_config(None, [f"{key}="])
