"""Reading, writing and comparing run configs: YAML files, `--set` text overrides and typed values.

`load_config(path, overrides, values)` reads a YAML file, applies `section.field=value` text
overrides (the command line's `--set`; see `apply_overrides` for how the text is read) and
then already-typed `values` (form fields), which are set as they are and checked against their
field's type, never parsed again. `dump_config` writes a config that reads back equal,
`config_differences` names the fields two configs disagree on, and `config_error_line` puts a
config error on one line.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from rl_core.config.run import DEFAULT_CONFIG_PATH, RunConfig

_NULL_TEXTS = ("", "~", "null", "Null", "NULL")  # YAML's spellings of null


def config_error_line(err: Exception) -> str:
    """A config error in one line: each of pydantic's errors as `field: message`, joined by '; '."""
    if not isinstance(err, ValidationError):
        return str(err)
    parts = []
    for error in err.errors():
        where, message = ".".join(str(part) for part in error["loc"]), error["msg"].removeprefix("Value error, ")
        parts.append(message if not where or message.startswith(where) else f"{where}: {message}")
    return "; ".join(parts)


def field_annotation(key: str, model: type[BaseModel] | None = None) -> Any | None:
    """The type annotation of the dotted field `key` (e.g. "storage.run_id") of `model` (default RunConfig).

    None when `key` names no field: an unknown name (the config then rejects it by name), or a
    key inside a dict-valued field such as environment.env_kwargs.
    """
    node: Any = RunConfig if model is None else model
    annotation = None
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        annotation = node.model_fields[part].annotation
        node = annotation
    return annotation


def _is_text_type(annotation: Any) -> tuple[bool, bool]:
    """(the type holds strings only, it also admits None) for str, a Literal of strings, and their Optionals."""
    if annotation is str:
        return True, False
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(choice, str) for choice in get_args(annotation)), False
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        optional = len(members) < len(get_args(annotation))
        return bool(members) and all(_is_text_type(m)[0] for m in members), optional
    return False, False


def override_value(key: str, raw: str, model: type[BaseModel] | None = None) -> Any:
    """The value of the text override `key=raw` (the command line's `--set`), read by the field's type.

    A field whose type holds strings only (str, a Literal of strings) takes the raw text as it
    is: `storage.run_id=2024` gives "2024", `tracking.experiment=on` gives "on" (YAML would give
    the int 2024 and the bool True). If that type also admits None, YAML's null spellings
    (empty, `~`, `null`) give None, so a logged config (tasks/tracking.py writes None as
    "null") reads back. Every other field, and a key the config does not know, gets the text
    parsed as YAML (`rollout.group_size=4` gives 4, `environment.domains=[refunds]` a list).
    Raises ValueError naming the key when YAML cannot parse the text.
    """
    text_only, optional = _is_text_type(field_annotation(key, model))
    if text_only:
        return None if optional and raw.strip() in _NULL_TEXTS else raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(f"override {key}={raw!r}: the value of {key} is not valid YAML ({first_line})") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b]... = value for key "a.b...", creating sections; ValueError if a part is not a section."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Apply `a.b=value` text overrides to a nested dict of `model` (default RunConfig) data.

    Each value is read by its field's type (`override_value`): the raw text for string fields,
    YAML for the rest. Raises ValueError on bad syntax or unparsable YAML, naming the override.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        _set_dotted(data, key.strip(), override_value(key.strip(), raw, model))
    return data


def apply_values(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set already-typed values (e.g. {"storage.run_id": "2024"}) on a nested dict at dotted keys.

    The values are set as they are, never turned into text and parsed again; building the
    config then checks each against its field's type and names the field if it does not fit.
    """
    for key, value in values.items():
        _set_dotted(data, key, value)
    return data


# Fields renamed since configs were written: (section, old name) -> new name. A config file (e.g. the
# config.yaml of a run started before the rename) is read with the new name, so that the run goes on.
RENAMED_FIELDS = {("doctor", "zero_adv_groups_max"): "zero_variance_groups_max"}


def upgrade_renamed_fields(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a config file's mapping) with RENAMED_FIELDS under their new names. Raises ValueError
    when a section holds both the old and the new name."""
    for (section, old), new in RENAMED_FIELDS.items():
        fields = data.get(section)
        if isinstance(fields, dict) and old in fields:
            if new in fields:
                raise ValueError(f"{section}.{old} was renamed {section}.{new}; the config sets both")
            data = {**data, section: {(new if k == old else k): v for k, v in fields.items()}}
    return data


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: Mapping[str, Any] | None = None
) -> RunConfig:
    """Build a RunConfig from YAML (default: data/configs/quickstart.yaml), text overrides, then typed values.

    `overrides` are `section.field=value` texts (`apply_overrides`); `values` map dotted field
    names to typed values (`apply_values`) and are applied last, so they win. Raises
    FileNotFoundError for a missing file and ValueError (pydantic's ValidationError) naming the
    field for a bad value.
    """
    path = Path(path) if path else DEFAULT_CONFIG_PATH
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    data = upgrade_renamed_fields(data)
    return RunConfig.model_validate(apply_values(apply_overrides(data, overrides or []), values or {}))


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML that `load_config` reads back to an equal RunConfig.

    Environment constructor arguments (`kwargs`, `env_kwargs`) keep the types YAML gave them (a
    date stays a date, not its ISO text), so a run's config.yaml builds the same environments
    and compares equal to the config it was started with; values YAML cannot write (objects
    given from Python) fall back to their JSON form.
    """
    data = cfg.model_dump(mode="json")
    data["environment"] = cfg.environment.model_dump(mode="python")
    try:
        return yaml.safe_dump(data, sort_keys=False)
    except yaml.YAMLError:
        return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_differences(a: BaseModel, b: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two configs of the same type."""
    names: list[str] = []
    for name in type(a).model_fields:
        left, right = getattr(a, name), getattr(b, name)
        if isinstance(left, BaseModel) and isinstance(right, BaseModel):
            names += config_differences(left, right, f"{prefix}{name}.")
        elif left != right:
            names.append(f"{prefix}{name}")
    return names
