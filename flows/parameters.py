"""Typed flow parameters: what the Prefect UI shows as a form when a run is started by hand.

Each settings model names the config fields people change most often as typed fields (plain
integers, numbers and choices, each with its constraint and description), plus free
`section.field=value` overrides for everything else (see rl_core/config/ for every field).

Every typed field holds a concrete value, and that value is what runs:

- A typed field that is left out (or given as None) takes the value of the config file, read
  with the overrides (`RunSettings._fill_from_config`): `TrainSettings(config_path="x.yaml")`
  runs x.yaml as it is, `TrainSettings(overrides=["iterations=2"])` runs 2 iterations.
- A typed field that is given wins over the file and the overrides. The Prefect form sends every
  field it shows, so what the form shows is what runs: its starting values are those of the config
  the deployment is served on (`deployment_parameters`), the shipped quickstart by default.

`load()` builds the config: the free overrides are read as text by their field's type
(`apply_overrides`), and the typed fields (`typed_values()`) are handed over as the values they
already are, never written out as text and parsed again (run_id "2024" stays the string "2024"),
last so that they win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rl_core.advantages import AdvantageMethod
from rl_core.config import OnCollapse, RunConfig, load_config
from rl_core.config.run import DEFAULT_CONFIG_PATH
from rl_core.losses import LossFn
from rl_core.paths import REPO_ROOT

SHIPPED_CONFIG = DEFAULT_CONFIG_PATH.relative_to(REPO_ROOT).as_posix()  # "data/configs/quickstart.yaml"
_SHIPPED = load_config(DEFAULT_CONFIG_PATH)  # the form's starting values: the shipped config's


def config_file(config_path: str | Path | None) -> Path:
    """The YAML file `config_path` names: empty is the shipped quickstart; a relative path is looked up in the
    current folder, then in the Turnstile checkout (where deployments run). The path is returned as it is
    when neither holds it (`load_config` then raises FileNotFoundError naming it)."""
    if not config_path:
        return DEFAULT_CONFIG_PATH
    path = Path(config_path)
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def _dotted(cfg: RunConfig, key: str) -> Any:
    """The value of the dotted config field `key` ("optimizer.lr") of `cfg`."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


CONSTRAINTS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "minLength", "maxLength")


def _constraints_in_all_of(schema: dict[str, Any]) -> None:
    """Repeat each property's constraints (minimum, pattern, ...) as `allOf: [{...}]` next to them.

    Prefect's V1 UI passes only some keys of a property to its form validation (type, enum, anyOf, allOf, not
    minimum or pattern), so without the copy a bad value there is caught only when the server rejects the run;
    with it the form marks the field ("0 is less than the minimum of 1"). The V2 UI and the server read the
    plain keys."""
    for prop in schema.get("properties", {}).values():
        limits = {key: prop[key] for key in CONSTRAINTS if key in prop}
        if limits and "allOf" not in prop:
            prop["allOf"] = [limits]


class RunSettings(BaseModel):
    """The config a flow runs on: a YAML file, overrides, and typed fields applied on top of both.

    `CONFIG_FIELDS` maps each typed field to the dotted config field it sets."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_constraints_in_all_of)

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {"run_dir": "storage.run_dir"}

    config_path: str = Field(
        SHIPPED_CONFIG,
        min_length=1,
        description="YAML run config on the machine that runs the flow (relative: to the Turnstile checkout). "
        "The fields below are applied on top of it, so they win over the file; they start as the values "
        "of the config this deployment is served on.",
    )
    run_id: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_.-]*$",
        description="Name of the run (storage.run_id; letters, digits, _ . -). Empty: a generated name "
        "like run-20250101-020000-1a2b3c. Naming an existing run continues it from its last completed stage.",
    )
    run_dir: str = Field(
        _SHIPPED.storage.run_dir,
        min_length=1,
        description="Folder for all runtime output (storage.run_dir); relative: to the Turnstile checkout.",
    )
    overrides: list[str] = Field(
        default_factory=list,
        description="Any other config field as section.field=value, e.g. rollout.max_turns=4 (the typed fields "
        "win over these).",
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_from_config(cls, data: Any) -> Any:
        """Fill every typed field that is missing or None with the config file's value (read with the overrides);
        `run_id` None is empty. A file that cannot be read or holds a bad value leaves the defaults: `load()`
        raises its error."""
        if not isinstance(data, dict):
            return data
        data = {key: value for key, value in data.items() if value is not None or key not in cls._fillable()}
        if data.get("config_path") is None:
            data.pop("config_path", None)
        missing = [name for name in cls._fillable() if name not in data]
        if not missing:
            return data
        try:
            cfg = load_config(config_file(data.get("config_path")), list(data.get("overrides") or []))
        except (ValueError, OSError):
            return data
        for name in missing:
            if name == "run_id":
                data[name] = cfg.storage.run_id or ""
            else:
                data[name] = _dotted(cfg, cls.CONFIG_FIELDS[name])
        return data

    @classmethod
    def _fillable(cls) -> list[str]:
        """The typed fields filled from the config when left out (run_id unless a subclass excludes it)."""
        run_id = [] if cls.model_fields["run_id"].exclude else ["run_id"]
        return [*run_id, *cls.CONFIG_FIELDS]

    @classmethod
    def deployment_parameters(cls, config_path: str | None = None, overrides: list[str] | None = None) -> dict:
        """The JSON parameters a deployment serving `config_path` registers for this model: config_path,
        overrides and every typed field at that config's value (run_id empty). Raises FileNotFoundError or
        ValueError when the config cannot be read."""
        cfg = load_config(config_file(config_path), list(overrides or []))
        values = {name: _dotted(cfg, key) for name, key in cls.CONFIG_FIELDS.items()}
        out = {"config_path": config_path or SHIPPED_CONFIG, "overrides": list(overrides or []), **values}
        if "run_id" in cls._fillable():
            out["run_id"] = ""
        return out

    def typed_values(self) -> dict[str, Any]:
        """Dotted config field -> value of every typed field (run_id only when not empty)."""
        values = {key: getattr(self, name) for name, key in self.CONFIG_FIELDS.items()}
        if self.run_id:
            values["storage.run_id"] = self.run_id
        return values

    def load(self) -> RunConfig:
        """The RunConfig these settings describe: the file, the overrides, then the typed fields.

        Raises FileNotFoundError for a missing file and ValueError (pydantic's ValidationError) naming a bad
        field."""
        return load_config(config_file(self.config_path), self.overrides, self.typed_values())


class TrainSettings(RunSettings):
    """Parameters of the train flow."""

    CONFIG_FIELDS: ClassVar[dict[str, str]] = {
        **RunSettings.CONFIG_FIELDS,
        "iterations": "iterations",
        "learning_rate": "optimizer.lr",
        "group_size": "rollout.group_size",
        "global_batch_size": "rollout.global_batch_size",
        "loss_fn": "algorithm.loss_fn",
        "advantage_method": "algorithm.advantage_method",
        "on_collapse": "doctor.on_collapse",
    }

    iterations: int = Field(
        _SHIPPED.iterations, ge=1, description="Training iterations (collect -> validate -> train) to run."
    )
    learning_rate: float = Field(_SHIPPED.optimizer.lr, gt=0, description="AdamW learning rate (optimizer.lr).")
    group_size: int = Field(
        _SHIPPED.rollout.group_size, ge=1, le=64, description="Episodes sampled per task (rollout.group_size)."
    )
    global_batch_size: int = Field(
        _SHIPPED.rollout.global_batch_size,
        ge=1,
        description="Episodes per iteration (rollout.global_batch_size), a multiple of group_size.",
    )
    loss_fn: LossFn = Field(_SHIPPED.algorithm.loss_fn, description="Policy loss (algorithm.loss_fn).")
    advantage_method: AdvantageMethod = Field(
        _SHIPPED.algorithm.advantage_method,
        description="How advantages come from rewards (algorithm.advantage_method).",
    )
    on_collapse: OnCollapse = Field(
        _SHIPPED.doctor.on_collapse,
        description="What the training doctor does when training reward collapses (doctor.on_collapse).",
    )
