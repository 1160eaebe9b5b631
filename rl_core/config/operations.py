"""The sections around training: environment, evaluation, validation, tracking, gate, doctor, storage.

Where episodes come from, how checkpoints are judged (held-out evaluation, the batch's
validation thresholds, the promotion gate, the training doctor) and where the run's output
goes. Each field has a one-line description; a bad value raises pydantic's ValidationError
naming the dotted field (e.g. `environment.domains[1]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from rl_core.config.choices import GateRule, OnCollapse
from rl_core.config.section import Section


class EnvironmentEntry(Section):
    """One entry of `environment.domains` that carries its own constructor arguments."""

    name: str = Field(
        min_length=1,
        description="Built-in SOP domain name, 'package.module:Class' path of your own Environment class, or "
        "'sopbench:/path/to/folder' of a domain in the SOP-Bench benchmark's layout.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for this entry's class, or heldout_fraction / max_observation_chars for a "
        "'sopbench:' folder "
        "(built-in domains take none).",
    )


class EnvironmentConfig(Section):
    """The environments and the prompt side of the context budget.

    Each entry of `domains` is checked when the config is built (rl_core.environments.
    check_environment): a class path must import, name an Environment subclass and accept its
    keyword arguments; a domain name must exist. A failure raises ValueError naming the entry,
    e.g. `environment.domains[1]`.
    """

    domains: list[str | EnvironmentEntry] = Field(
        default_factory=lambda: ["refunds", "inventory", "access"],
        min_length=1,
        description="The environments: a built-in SOP domain name, a 'package.module:Class' path of your own "
        "Environment class or a 'sopbench:/path/to/folder' SOP-Bench-format domain, or a mapping {name: ..., "
        "kwargs: {...}} that gives that entry its own constructor arguments.",
    )
    domains_dir: str | None = Field(None, description="Folder holding SOP domains; default: the shipped data/domains.")
    env_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for every class-path entry of environment.domains written as a plain string "
        "(a mapping entry uses its own kwargs instead; built-in domains take none).",
    )
    prompt_tokens: int = Field(
        192,
        gt=0,
        description="Longest prompt in tokens (system and task turns with their role markers, and the opening "
        "of the first policy turn: the trajectory's prompt_tokens); an episode whose prompt is longer "
        "ends as context_overflow before any generation.",
    )
    expected_tool_output: int = Field(
        40, ge=0, description="Tokens budgeted per environment turn (tool result plus role markers)."
    )
    train_split: str = Field("train", description="Split the training tasks come from.")

    @field_validator("domains", mode="before")
    @classmethod
    def _entry_shapes(cls, value: Any) -> Any:
        """An entry that is neither a name nor a mapping {name, kwargs} is refused naming it
        (`environment.domains[i]`), instead of with pydantic's error for each member of the union."""
        if not isinstance(value, list):
            return value
        for index, entry in enumerate(value):
            where = f"environment.domains[{index}]"
            if isinstance(entry, (str, EnvironmentEntry)):
                continue
            if not isinstance(entry, dict):
                raise ValueError(
                    f"{where}: an entry is a domain name, a 'package.module:Class' path or a mapping "
                    f"{{name: ..., kwargs: {{...}}}}, got {type(entry).__name__} {entry!r}"
                )
            unknown = sorted(str(key) for key in entry if key not in ("name", "kwargs"))
            if unknown:
                raise ValueError(
                    f"{where}: a mapping entry takes the keys name and kwargs, got unknown key(s) {unknown}"
                )
            if not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(
                    f"{where}: a mapping entry needs name: a domain name or a 'package.module:Class' path, got "
                    f"{entry.get('name')!r}"
                )
            if not isinstance(entry.get("kwargs", {}), dict):
                raise ValueError(
                    f"{where} ({entry['name']!r}): kwargs must be a "
                    f"mapping of constructor arguments, got {entry['kwargs']!r}"
                )
        return value

    def entries(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, constructor keyword arguments) for each entry of `domains`, in order."""
        out = []
        for entry in self.domains:
            if isinstance(entry, EnvironmentEntry):
                out.append((entry.name, dict(entry.kwargs)))
            else:
                class_path = ":" in entry and not entry.startswith("sopbench:")  # env_kwargs: class paths only
                out.append((entry, dict(self.env_kwargs) if class_path else {}))
        return out

    @model_validator(mode="after")
    def _environments_load(self) -> "EnvironmentConfig":
        from rl_core.environments import check_environment

        domains_dir = Path(self.domains_dir) if self.domains_dir else None
        for index, (name, kwargs) in enumerate(self.entries()):
            try:
                check_environment(name, kwargs, domains_dir)
            except ValueError as err:
                raise ValueError(f"environment.domains[{index}] ({name!r}): {err}") from None
        return self


class EvaluationConfig(Section):
    split: str = Field("heldout", description="Split evaluated; its tasks never appear in training.")
    max_tasks: int | None = Field(
        None, ge=1, description="Evaluate only the first N tasks per environment (None = all)."
    )
    val_every: int = Field(5, ge=1, description="Evaluate every this many training steps (and at step 0 and the end).")
    pass_k: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        min_length=1,
        description="k values for pass@k and pass^k from sampled groups.",
    )
    num_samples: int = Field(8, ge=1, description="Samples per task for pass@k; must be >= the largest k.")
    sample_temperature: float = Field(
        1.0, gt=0.0, description="Temperature of the sampled groups (pass@1 itself is greedy)."
    )
    success_threshold: float = Field(1.0, description="Reward at or above which an episode is a success.")
    gate_fraction: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Share of each environment's held-out tasks set apart for the promotion gate (rl_core/"
        "heldout_split.py); the rest choose a run's best checkpoint, so the gate never sees a score that was used to "
        "choose. Half and half: the gate's paired test needs discordant tasks (on 90 gate tasks an exact McNemar "
        "test at 0.95 needs at least 5 more solved than lost), while choosing among a run's few checkpoints needs "
        "only a ranking.",
    )

    @model_validator(mode="after")
    def _samples_cover_k(self) -> "EvaluationConfig":
        if max(self.pass_k) > self.num_samples:
            raise ValueError(
                f"evaluation.num_samples ({self.num_samples}) must "
                f"be >= the largest evaluation.pass_k ({max(self.pass_k)})"
            )
        if min(self.pass_k) < 1:
            raise ValueError("evaluation.pass_k values must be >= 1")
        return self


class ValidationConfig(Section):
    reward_min: float = Field(-0.1, description="Lowest valid episode reward.")
    reward_max: float = Field(1.0, description="Highest valid episode reward.")
    max_token_cap_frac: float = Field(
        0.05, ge=0, le=1, description="Most episodes that may end at the per-turn token cap."
    )
    max_turns_unanswered_frac: float = Field(
        0.10, ge=0, le=1, description="Most episodes that may hit max_turns without an answer."
    )
    max_env_error_frac: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Most episodes that may end in a permanent environment failure (above it: an environment bug).",
    )
    max_context_overflow_frac: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Most episodes that may end as context_overflow: the config's context budget should make "
        "it rare, so above it (5%, as for token-cap hits, another cut-off ending) prompts or tool "
        "outputs do not fit policy.context_window.",
    )

    @model_validator(mode="after")
    def _range(self) -> "ValidationConfig":
        if self.reward_min > self.reward_max:
            raise ValueError(
                f"validation.reward_min ({self.reward_min}) must be <= validation.reward_max ({self.reward_max})"
            )
        return self


class TrackingConfig(Section):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a SQLite store under the run directory (runs/mlflow.db)."
    )
    experiment: str = Field("turnstile", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("turnstile-policy", min_length=1, description="MLflow registry name of the policy.")
    ui_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s]+$",
        description="Base address of the MLflow UI that shows this store (links in logs, Prefect artifacts and the "
        "closing summary); default: the tracking URI when it is an http(s) server, else http://127.0.0.1:5000 (what "
        "`mlflow ui` serves).",
    )
    traced_episodes: int = Field(
        4,
        ge=0,
        le=256,
        description="Episodes of each training batch logged as MLflow traces (a deterministic sample; 0: none).",
    )
    traced_eval_episodes: int = Field(
        16,
        ge=0,
        le=4096,
        description="Greedy evaluation episodes logged as MLflow traces per evaluation (a deterministic sample of the "
        "held-out tasks; 0: none).",
    )


class GateConfig(Section):
    """The promotion gate (rl_core/gate.py): what a candidate must show, on the gate part of the held-out split,
    to replace the champion (or, with no champion yet, the starting policy)."""

    rule: GateRule = Field(
        "paired_test",
        description="paired_test: every threshold below, and an improvement shown by an exact McNemar test on the "
        "same gate tasks; simple: the floor and a higher pass@1 than the champion's by any margin (no test, no "
        "other threshold).",
    )
    min_pass_at_1: float = Field(0.0, ge=0, le=1, description="Held-out pass@1 a candidate must reach to be promoted.")
    require_improvement: bool = Field(
        True,
        description="Promote only if the candidate is better than the champion (or the starting policy) on the same "
        "gate tasks; off: the thresholds alone decide.",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        lt=1,
        description="Confidence at which the paired test must show the improvement (one-sided p-value <= 1 - "
        "confidence); below 0.5 a candidate worse than the champion could pass.",
    )
    min_effect: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Smallest pass@1 gain over the champion (fraction of gate tasks) that counts as an improvement.",
    )
    env_tolerance: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Most any one environment's gate pass@1 may fall below the champion's (fraction of that "
        "environment's gate tasks; 30 tasks make one task 0.033 and a noise of about 0.09).",
    )
    max_truncated_frac: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Most of the candidate's greedy gate episodes that may end truncated (token_cap, "
        "context_overflow or max_turns).",
    )
    max_env_error_frac: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Most of the candidate's greedy gate episodes that may end as env_error (above it the score "
        "measures the environment, not the policy).",
    )


class DoctorConfig(Section):
    """The training doctor (rl_core/doctor/): checks run after every step on the metric history."""

    enabled: bool = Field(True, description="Run the training doctor after every step and report what it finds.")
    on_collapse: OnCollapse = Field(
        "warn",
        description="What to do when training reward collapses: only report it, stop the run, or roll back to "
        "the last good checkpoint and continue.",
    )
    max_rollbacks: int = Field(
        2, ge=0, description="With on_collapse=rollback: rollbacks allowed in one run before the run stops instead."
    )
    window: int = Field(5, ge=2, description="Steps a symptom is averaged over before it is reported.")
    flat_reward_steps: int = Field(
        20, ge=2, description="Steps after which a training reward that has not moved from step 0 is reported as flat."
    )
    zero_variance_groups_max: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Fraction of zero-variance groups (all rewards equal; analysis/zero_variance_groups) above "
        "which the batch carries little signal.",
    )
    collapse_frac: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Training reward below this fraction of its best windowed mean counts as a collapse.",
    )
    token_cap_frac_max: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Fraction of episodes ending at the per-turn token cap above which responses are clustering "
        "at the cap.",
    )
    grad_clip_pinned_frac: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Fraction of recent steps whose grad norm reached optimizer.grad_clip above which the norm "
        "is pinned at the clip.",
    )
    hacking_min_gain: float = Field(
        0.1,
        ge=0,
        description="Training reward gain over the evaluated span above which a flat held-out pass@1 suggests "
        "reward hacking.",
    )


class StorageConfig(Section):
    run_dir: str = Field(
        "runs",
        min_length=1,
        description="Folder for all runtime output (trajectories, checkpoints, tracking); relative to the working "
        "directory.",
    )
    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Name of this run; generated from the time when empty."
    )
    keep_checkpoints: int | None = Field(
        5,
        ge=1,
        description="Keep only the newest N step checkpoints of a run (None = all); registered ones live on in "
        "the MLflow store.",
    )
