"""Typed flow parameters: what the Prefect UI shows as a form when a run is started by hand.

Each settings model names the config fields people change most often as typed fields with
descriptions (left empty = the config file's value), plus free `section.field=value`
overrides for everything else (see rl_core/config/ for every field). `load()` builds the
config: the free overrides are read as text by their field's type (`apply_overrides`), and
the typed fields (`typed_values()`) are handed over as the values they already are, never
written out as text and parsed again (run_id "2024" stays the string "2024"), last so that
they win.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rl_core.advantages import AdvantageMethod
from rl_core.config import OnCollapse, RunConfig, load_config
from rl_core.losses import LossFn


class RunSettings(BaseModel):
    """The config a flow runs on: a YAML file plus overrides."""

    model_config = ConfigDict(extra="forbid")

    config_path: str | None = Field(
        None,
        description="YAML run config on the machine that runs the "
        "flow (empty: the shipped data/configs/quickstart.yaml).",
    )
    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the run (storage.run_id). Naming an existing run continues it from its last completed "
        "stage.",
    )
    run_dir: str | None = Field(
        None, description="Folder for all runtime output (storage.run_dir; empty: the config's, 'runs' by default)."
    )
    overrides: list[str] = Field(
        default_factory=list, description="Any other config field as section.field=value, e.g. rollout.max_turns=4."
    )

    def typed_values(self) -> dict[str, Any]:
        """Dotted config field -> value of every typed field that is set (empty fields are left out)."""
        pairs = {"storage.run_id": self.run_id, "storage.run_dir": self.run_dir}
        return {key: value for key, value in pairs.items() if value is not None}

    def load(self) -> RunConfig:
        """The RunConfig these settings describe (raises ValueError naming a bad field)."""
        return load_config(self.config_path, self.overrides, self.typed_values())


class TrainSettings(RunSettings):
    """Parameters of the train flow."""

    iterations: int | None = Field(None, ge=1, description="Training iterations (collect -> validate -> train) to run.")
    learning_rate: float | None = Field(None, gt=0, description="AdamW learning rate (optimizer.lr).")
    group_size: int | None = Field(None, ge=1, le=64, description="Episodes sampled per task (rollout.group_size).")
    global_batch_size: int | None = Field(
        None, ge=1, description="Episodes per iteration (rollout.global_batch_size), a multiple of group_size."
    )
    loss_fn: LossFn | None = Field(None, description="Policy loss (algorithm.loss_fn).")
    advantage_method: AdvantageMethod | None = Field(
        None, description="How advantages come from rewards (algorithm.advantage_method)."
    )
    on_collapse: OnCollapse | None = Field(
        None, description="What the training doctor does when training reward collapses (doctor.on_collapse)."
    )

    def typed_values(self) -> dict[str, Any]:
        pairs = {
            "iterations": self.iterations,
            "optimizer.lr": self.learning_rate,
            "rollout.group_size": self.group_size,
            "rollout.global_batch_size": self.global_batch_size,
            "algorithm.loss_fn": self.loss_fn,
            "algorithm.advantage_method": self.advantage_method,
            "doctor.on_collapse": self.on_collapse,
        }
        return {**{key: value for key, value in pairs.items() if value is not None}, **super().typed_values()}
