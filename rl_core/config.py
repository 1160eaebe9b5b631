"""The run configuration: one typed, validated `RunConfig` loaded from YAML.

Every field has a one-line description. Bad values and bad combinations are rejected when
the config is built, and the error names the field (pydantic's `ValidationError` lists
the dotted location, e.g. `rollout.max_turns`). `load_config(path, overrides, values)` reads
a YAML file, applies `section.field=value` text overrides (the command line's `--set`; see
`apply_overrides` for how the text is read) and then already-typed `values` (form fields), which
are set as they are and checked against their field's type, never parsed again.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rl_core.advantages import AdvantageMethod
from rl_core.losses import LossAggregation, LossFn
from rl_core.paths import DATA_DIR, REPO_ROOT

DEFAULT_CONFIG_PATH = DATA_DIR / "configs" / "quickstart.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Section):
    enabled: bool = Field(
        False,
        description="Train low-rank adapters (peft LoRA) instead of all weights; checkpoints then hold only the "
        "adapter.",
    )
    rank: int = Field(
        32, gt=0, description="LoRA rank r of each adapter (32 for large models; small models do with 4-16)."
    )
    alpha: int = Field(64, gt=0, description="LoRA alpha; the adapter update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters (Llama-style attention and MLP projections "
        "by default).",
    )


class PolicyConfig(_Section):
    path: str = Field(
        "data/checkpoints/reference",
        description="Hugging Face causal LM directory (or hub id when online) to start from; relative paths are "
        "resolved against the repository root.",
    )
    context_window: int = Field(
        768,
        gt=0,
        description="Longest episode in tokens (prompt + all turns); must not exceed the model's maximum positions.",
    )
    chat_format: Literal["turnstile", "chatml"] = Field(
        "turnstile",
        description="Role markers around turns: Turnstile's own special tokens, or ChatML (<|im_start|>role ... "
        "<|im_end|>) for models trained on it.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Parameter dtype for training and generation."
    )
    device: str = Field("cpu", description="Torch device for the policy: cpu, cuda, cuda:1 ...")
    lora: LoraConfig = Field(
        default_factory=LoraConfig, description="Low-rank adaptation (LoRA) of the policy; off by default."
    )


class EnvironmentEntry(_Section):
    """One entry of `environment.domains` that carries its own constructor arguments."""

    name: str = Field(
        min_length=1,
        description="Built-in SOP domain name, or 'package.module:Class' path of your own Environment class.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for this entry's class (class paths only: built-in domains take none).",
    )


class EnvironmentConfig(_Section):
    """The environments and the prompt side of the context budget.

    Each entry of `domains` is checked when the config is built (rl_core.environments.
    check_environment): a class path must import, name an Environment subclass and accept its
    keyword arguments; a domain name must exist. A failure raises ValueError naming the entry,
    e.g. `environment.domains[1]`.
    """

    domains: list[str | EnvironmentEntry] = Field(
        default_factory=lambda: ["refunds", "inventory", "access"],
        min_length=1,
        description="The environments: a built-in SOP domain name or a 'package.module:Class' path of your own "
        "Environment class, or a mapping {name: ..., kwargs: {...}} that gives that class its own "
        "constructor arguments.",
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
                out.append((entry, dict(self.env_kwargs) if ":" in entry else {}))
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


class RolloutConfig(_Section):
    group_size: int = Field(8, ge=1, le=64, description="Episodes sampled per task (one group); 2-32 in practice.")
    global_batch_size: int = Field(
        32,
        ge=1,
        description="Episodes per iteration (tasks per batch x group_size); 128 in production, 32 for debugging.",
    )
    max_turns: int = Field(6, ge=1, description="Policy turns before an unanswered episode ends as max_turns.")
    max_tokens_per_turn: int = Field(
        40, ge=1, description="Token cap for one policy turn; hitting it ends the episode as token_cap."
    )
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature for training rollouts (0 = greedy).")
    timeout_s: float = Field(
        600.0, gt=0, description="Wall-clock limit for one episode; past it the episode ends as timeout."
    )
    max_retries: int = Field(
        3, ge=0, description="Retries of an environment step that raised before the episode ends as env_error."
    )
    generation_batch_size: int = Field(256, ge=1, description="Most sequences generated in one batched forward pass.")
    overlap_collection: bool = Field(
        False,
        description="Collect iteration k+1 (from a snapshot of the policy) while step k trains; its rollouts "
        "are then one step off-policy, so it needs algorithm.max_steps_off_policy >= 1.",
    )


class AlgorithmConfig(_Section):
    advantage_method: AdvantageMethod = Field(
        "group_based",
        description="How advantages come from rewards (see rl_core/advantages.py): group_based = GRPO (reward "
        "minus group mean, over group std).",
    )
    normalize_advantage_std: bool = Field(
        True, description="group_based / group_based_per_turn: divide by the group's reward standard deviation."
    )
    pass_k: int = Field(
        4, ge=1, description="grpo_passk: the k whose pass@k the advantages optimise (needs group_size >= k)."
    )
    loss_fn: LossFn = Field(
        "ppo",
        description="Policy loss (see rl_core/losses.py): ratio-weighted policy gradient, PPO clipped surrogate, "
        "or CISPO (clipped stop-gradient weight times log-prob).",
    )
    loss_aggregation: LossAggregation = Field(
        "token_mean",
        description="How per-token losses add up: over all loss tokens of the batch, or per sequence then over "
        "sequences.",
    )
    clip_low_threshold: float = Field(
        0.8, ge=0.0, le=1.0, description="Lower bound on the ratio pi_new/pi_old (PPO 0.8; CISPO usually 1.0)."
    )
    clip_high_threshold: float = Field(
        1.2, ge=1.0, description="Upper bound on the ratio pi_new/pi_old (PPO 1.2; CISPO usually 6.0)."
    )
    clip_ratio_dual: float | None = Field(
        3.0,
        gt=1.0,
        description="Dual-clip bound c of ppo (Ye et al. 2020): on tokens with a negative advantage the loss "
        "is capped at -c * A however large the ratio grows; must be > 1 (None = off).",
    )
    kl_coef: float = Field(
        0.0, ge=0.0, description="Weight of a KL(pi || pi_ref) penalty against the starting policy (0 = off)."
    )
    tis_cap: float | None = Field(
        None,
        gt=0.0,
        description="Truncated importance sampling against the inference/trainer mismatch: pi_old becomes the "
        "trainer's own log-probs and each token is weighted by min(pi_trainer / pi_sampler, cap). "
        "None = off.",
    )
    max_steps_off_policy: int = Field(
        3,
        ge=0,
        description="Rollouts sampled by a policy more than this many "
        "optimizer steps old are dropped (0 = synchronous).",
    )
    zero_variance_groups: Literal["keep", "drop", "resample"] = Field(
        "keep",
        description="Groups whose rewards are all equal carry no signal: keep them (their advantages are 0 but "
        "their tokens count in the loss denominator), drop them from the loss, or resample (dynamic "
        "sampling: drop them and collect more tasks until the batch is full).",
    )
    max_resample_rounds: int = Field(
        3, ge=1, description="With zero_variance_groups=resample: most extra collection rounds per iteration."
    )
    mask_truncated: list[Literal["token_cap", "context_overflow", "max_turns", "timeout"]] = Field(
        default_factory=list,
        description=(
            "Finish reasons that count as truncated (cut off, not judged): such episodes get no loss "
            "tokens and are left out of "
            "their group's baseline statistics, whose advantages come from the group's other members, "
            "because a cut-off "
            "attempt's reward is not a verdict on the attempt and counting its penalty would lift wrong "
            "answers above the "
            "baseline ([] = train on them as on any episode)."
        ),
    )

    @model_validator(mode="after")
    def _mask_truncated_unique(self) -> "AlgorithmConfig":
        if len(set(self.mask_truncated)) != len(self.mask_truncated):
            raise ValueError(f"algorithm.mask_truncated lists a finish reason twice: {self.mask_truncated}")
        return self


class OptimizerConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    micro_batch_size: int = Field(
        16,
        ge=1,
        description="Episodes per forward/backward pass; gradients accumulate over the micro-batches of one mini-batch "
        "into one optimizer step.",
    )
    mini_batches_per_step: int = Field(
        1,
        ge=1,
        description="Mini-batches each iteration's batch is split into (whole groups, in batch order; single "
        "episodes when there are fewer groups, and at most one mini-batch per episode), each taking "
        "one optimizer step; 1 = one step per batch.",
    )
    epochs_per_batch: int = Field(
        1,
        ge=1,
        description="Passes over the batch's mini-batches per iteration (PPO epochs); optimizer steps per iteration "
        "= mini-batches x epochs_per_batch, at most mini_batches_per_step x epochs_per_batch.",
    )

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimizerConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {self.betas}")
        return self


class TrainerConfig(_Section):
    backend: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="Training backend (rl_core/model/backends.py): plain torch, or a DeepSpeed engine on one process "
        "(gloo on CPU) taking the same update.",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0,
        description="DeepSpeed ZeRO stage (backend deepspeed only); 0-3 all run on CPU and take the torch update; "
        "on one process none saves memory, and 3 (weights kept whole for rollouts and checkpoints) "
        "cannot deep-copy the policy, as rollout.overlap_collection does.",
    )

    @model_validator(mode="after")
    def _zero_needs_deepspeed(self) -> "TrainerConfig":
        if self.zero_stage and self.backend != "deepspeed":
            raise ValueError(
                f"trainer.zero_stage {self.zero_stage} needs trainer.backend 'deepspeed' (got {self.backend!r})"
            )
        return self


class EvaluationConfig(_Section):
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


class ValidationConfig(_Section):
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


class TrackingConfig(_Section):
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: a SQLite store under the run directory (runs/mlflow.db)."
    )
    experiment: str = Field("turnstile", min_length=1, description="MLflow experiment name.")
    registered_model: str = Field("turnstile-policy", min_length=1, description="MLflow registry name of the policy.")


class GateConfig(_Section):
    min_pass_at_1: float = Field(0.0, ge=0, le=1, description="Held-out pass@1 a candidate must reach to be promoted.")
    require_improvement: bool = Field(
        True, description="Promote only if the candidate beats the current champion's pass@1 on the same tasks."
    )


OnCollapse = Literal["warn", "stop", "rollback"]  # doctor.on_collapse (acted on in tasks/doctor.py)


class DoctorConfig(_Section):
    """The training doctor (rl_core/doctor.py): checks run after every step on the metric history."""

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
    zero_adv_groups_max: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Fraction of groups with all-equal rewards (analysis/zero_adv_groups) above which the batch "
        "carries little signal.",
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


class StorageConfig(_Section):
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


class RunConfig(_Section):
    """Everything one training run needs."""

    seed: int = Field(0, description="Seed for sampling, data order and initialisation.")
    iterations: int = Field(10, ge=1, description="Training iterations (collect -> write -> train) to run.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    doctor: DoctorConfig = Field(default_factory=DoctorConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    @model_validator(mode="after")
    def _combinations(self) -> "RunConfig":
        r, e, p = self.rollout, self.environment, self.policy
        if self.algorithm.advantage_method == "grpo_passk" and r.group_size < self.algorithm.pass_k:
            raise ValueError(
                f"algorithm.pass_k ({self.algorithm.pass_k}) must be <= rollout.group_size ({r.group_size}) "
                "for grpo_passk"
            )
        if self.trainer.backend == "deepspeed" and p.dtype != "float32":
            raise ValueError(f"trainer.backend deepspeed trains in float32 only; policy.dtype is {p.dtype!r}")
        if r.overlap_collection and self.trainer.zero_stage == 3:
            raise ValueError(
                "rollout.overlap_collection copies the model for sampling, which trainer.zero_stage 3 does not allow"
            )
        if r.overlap_collection and self.algorithm.max_steps_off_policy < 1:
            raise ValueError(
                "rollout.overlap_collection samples one step off-policy: it needs algorithm.max_steps_off_policy "
                ">= 1 (0 = synchronous)"
            )
        steps = self.optimizer.mini_batches_per_step * self.optimizer.epochs_per_batch
        if r.overlap_collection and self.algorithm.max_steps_off_policy < steps:
            raise ValueError(
                "rollout.overlap_collection samples one iteration off-policy, which is optimizer.mini_batches_per_step "
                "x "
                f"optimizer.epochs_per_batch = {steps} optimizer steps: it needs algorithm.max_steps_off_policy "
                f">= {steps} "
                f"(got {self.algorithm.max_steps_off_policy}), or every overlapped batch is dropped as stale"
            )
        if r.global_batch_size % r.group_size:
            raise ValueError(
                f"rollout.global_batch_size ({r.global_batch_size}) must be a multiple of rollout.group_size "
                f"({r.group_size})"
            )
        budget = r.max_turns * (r.max_tokens_per_turn + e.expected_tool_output) + e.prompt_tokens
        if budget > p.context_window:
            raise ValueError(
                "context budget exceeded: rollout.max_turns * (rollout.max_tokens_per_turn + "
                "environment.expected_tool_output) + environment.prompt_tokens = "
                f"{r.max_turns} * ({r.max_tokens_per_turn} + {e.expected_tool_output}) + {e.prompt_tokens} = {budget} "
                f"> policy.context_window ({p.context_window})"
            )
        return self

    @property
    def tasks_per_batch(self) -> int:
        return self.rollout.global_batch_size // self.rollout.group_size

    def resolved_policy_path(self) -> str:
        """The policy path, resolved against the repository root when it is a relative local path."""
        candidate = REPO_ROOT / self.policy.path
        return str(candidate) if not Path(self.policy.path).is_absolute() and candidate.exists() else self.policy.path


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
