"""`RunConfig`, the whole run configuration: its sections and the checks that span sections."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator

from rl_core.config.operations import (
    DoctorConfig,
    EnvironmentConfig,
    EvaluationConfig,
    GateConfig,
    StorageConfig,
    TrackingConfig,
    ValidationConfig,
)
from rl_core.config.section import Section
from rl_core.config.trainer import TrainerConfig
from rl_core.config.training import AlgorithmConfig, OptimizerConfig, PolicyConfig, RolloutConfig
from rl_core.paths import DATA_DIR, REPO_ROOT

DEFAULT_CONFIG_PATH = DATA_DIR / "configs" / "quickstart.yaml"


def device_missing(device: str) -> str | None:
    """Why torch `device` cannot be used on this machine (None when it can): a CUDA device on a machine without
    CUDA, or an index past its GPU count. The config is built on the machine that runs it (the CLI, the flow)."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this machine has no CUDA device (torch.cuda.is_available() is False); use cpu"
    count = torch.cuda.device_count()
    if index and (not index.isdigit() or int(index) >= count):
        return f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}"
    return None


def bf16_unsupported(device: str) -> str | None:
    """Why bfloat16 compute cannot run on torch `device` here (None when it can, or when the device is a CUDA
    GPU this machine does not have: the run's machine decides then). CPU: needs the AVX512-BF16 or AMX
    instructions (oneDNN's check); CUDA: compute capability 8.0 or newer (torch.cuda.is_bf16_supported)."""
    kind = device.split(":", 1)[0]
    if kind == "cpu":
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); use trainer.precision fp32"
        return None
    if kind == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name()} has no bfloat16 support (compute capability below 8.0)"
    return None


class RunConfig(Section):
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
        problem = device_missing(p.device)
        if problem:
            raise ValueError(f"policy.device {p.device!r}: {problem}")
        if self.trainer.precision == "bf16":
            if p.dtype != "float32":
                raise ValueError(
                    "trainer.precision bf16 keeps float32 master weights: policy.dtype must be float32, "
                    f"not {p.dtype!r}"
                )
            problem = bf16_unsupported(p.device)
            if problem:
                raise ValueError(f"trainer.precision bf16 cannot run on policy.device {p.device!r}: {problem}")
        if r.overlap_collection and self.trainer.zero_stage == 3 and self.trainer.world_size == 1:
            raise ValueError(
                "rollout.overlap_collection copies the model for sampling, which trainer.zero_stage 3 does not allow "
                "in the run's own process (with trainer.num_processes > 1 the run samples from its own plain copy)"
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
        """The policy path: `~` expanded, then resolved against the repository root when it is a relative
        local path that exists there (else as given: a hub id, or a path the loader reports missing)."""
        path = str(Path(self.policy.path).expanduser()) if self.policy.path.startswith("~") else self.policy.path
        candidate = REPO_ROOT / path
        return str(candidate) if not Path(path).is_absolute() and candidate.exists() else path
