"""The run configuration: one typed, validated `RunConfig` loaded from YAML.

Every field has a one-line description. Bad values and bad combinations are rejected when
the config is built, and the error names the field (pydantic's `ValidationError` lists
the dotted location, e.g. `rollout.max_turns`). `load_config(path, overrides, values)` reads
a YAML file, applies `section.field=value` text overrides (the command line's `--set`; see
`apply_overrides` for how the text is read) and then already-typed `values` (form fields), which
are set as they are and checked against their field's type, never parsed again.

The package, by concern (import everything from `rl_core.config`):

- `choices`: the allowed values of enumerated fields, one `Literal` alias per list
  (`ChatFormatName`, `DType`, `TrainerBackendName`, `ZeroStage`, `TrainingPrecision`, `ZeroVarianceGroups`,
  `TruncatedFinishReason`, `OnCollapse`).
- `section`: `Section`, the base of every section (unknown keys refused).
- `training`: what is trained and how: `PolicyConfig` (with `LoraConfig`), `RolloutConfig`,
  `AlgorithmConfig`, `OptimizerConfig`.
- `trainer`: how the update is computed: `TrainerConfig` (backend, ZeRO stage, learner ranks,
  precision, gradient checkpointing, packing).
- `operations`: everything around training: `EnvironmentConfig` (with `EnvironmentEntry`),
  `EvaluationConfig`, `ValidationConfig`, `TrackingConfig`, `GateConfig`, `DoctorConfig`,
  `StorageConfig`.
- `run`: `RunConfig`, the sections together and the checks that span them, and
  `DEFAULT_CONFIG_PATH`.
- `loading`: `load_config`, `dump_config`, `apply_overrides`, `apply_values`, `override_value`,
  `field_annotation`, `config_differences`, `config_error_line`.
"""

from rl_core.config.choices import (
    ChatFormatName,
    DType,
    OnCollapse,
    ToolParserName,
    TrainerBackendName,
    TrainingPrecision,
    TruncatedFinishReason,
    ZeroStage,
    ZeroVarianceGroups,
)
from rl_core.config.loading import (
    apply_overrides,
    apply_values,
    config_differences,
    config_error_line,
    dump_config,
    field_annotation,
    load_config,
    override_value,
)
from rl_core.config.operations import (
    DoctorConfig,
    EnvironmentConfig,
    EnvironmentEntry,
    EvaluationConfig,
    GateConfig,
    StorageConfig,
    TrackingConfig,
    ValidationConfig,
)
from rl_core.config.run import DEFAULT_CONFIG_PATH, RunConfig
from rl_core.config.section import Section
from rl_core.config.trainer import TrainerConfig
from rl_core.config.training import (
    AgentConfig,
    AlgorithmConfig,
    LoraConfig,
    OptimizerConfig,
    PolicyConfig,
    RolloutConfig,
    VLLMConfig,
)

__all__ = [
    "AlgorithmConfig",
    "ChatFormatName",
    "ToolParserName",
    "DEFAULT_CONFIG_PATH",
    "DType",
    "DoctorConfig",
    "EnvironmentConfig",
    "EnvironmentEntry",
    "EvaluationConfig",
    "GateConfig",
    "LoraConfig",
    "OnCollapse",
    "OptimizerConfig",
    "PolicyConfig",
    "AgentConfig",
    "RolloutConfig",
    "VLLMConfig",
    "RunConfig",
    "Section",
    "StorageConfig",
    "TrackingConfig",
    "TrainerBackendName",
    "TrainingPrecision",
    "TrainerConfig",
    "TruncatedFinishReason",
    "ValidationConfig",
    "ZeroStage",
    "ZeroVarianceGroups",
    "apply_overrides",
    "apply_values",
    "config_differences",
    "config_error_line",
    "dump_config",
    "field_annotation",
    "load_config",
    "override_value",
]
