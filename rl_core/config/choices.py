"""The allowed values of the config's enumerated fields, each list written once as a `Literal` alias.

The config's fields, the Prefect parameters (flows/parameters.py) and the functions that take
such a value all use these aliases; `typing.get_args(alias)` gives the values as a tuple (for
argparse choices and error messages). Lists owned by the module that implements them stay
there: `AdvantageMethod` (rl_core/advantages.py), `LossFn` and `LossAggregation`
(rl_core/losses.py), `ValidationThresholds` (rl_core/replay/revalidation.py).
"""

from __future__ import annotations

from typing import Literal

# policy.chat_format: the role markers around turns (rl_core/model/tokenizer.py chat_format), a chat template
# (rl_core/model/template_renderer.py) or GPT-OSS's harmony format (rl_core/model/harmony_renderer.py).
ChatFormatName = Literal["turnstile", "chatml", "hf_template", "harmony", "auto"]

# policy.tool_parser: how a native chat model writes tool calls (rl_core/model/tool_parsers.py; harmony:
# rl_core/model/harmony_renderer.py, only with chat_format harmony).
ToolParserName = Literal["hermes", "gemma", "harmony", "auto"]

# rollout.backend: what samples the rollouts (hf: the in-process decoder; vllm: a vLLM server, rl_core/vllm/).
RolloutBackendName = Literal["hf", "vllm"]

# policy.dtype: parameter dtype, the name of a torch dtype (rl_core/model/policy.py DTYPES).
DType = Literal["float32", "bfloat16", "float16"]

# trainer.backend: the training backend (rl_core/model/backends.py make_backend).
TrainerBackendName = Literal["torch", "deepspeed"]

# trainer.zero_stage: the DeepSpeed ZeRO stage.
ZeroStage = Literal[0, 1, 2, 3]

# trainer.precision: the training compute precision (fp32, or bf16 autocast over fp32 weights).
TrainingPrecision = Literal["fp32", "bf16"]

# algorithm.zero_variance_groups: what happens to groups whose rewards are all equal
# (keep and drop: rl_core/trainer.py; resample: the collector).
ZeroVarianceGroups = Literal["keep", "drop", "resample"]

# algorithm.mask_truncated: the finish reasons (a subset of rl_core.trajectory.FINISH_REASONS)
# that mean an episode was cut off rather than judged.
TruncatedFinishReason = Literal["token_cap", "context_overflow", "max_turns", "timeout"]

# doctor.on_collapse: what the training doctor does when training reward collapses.
OnCollapse = Literal["warn", "stop", "rollback"]

# gate.rule: how the promotion gate decides (rl_core/gate.py): every threshold and a paired test, or the
# floor and a higher pass@1 by any margin.
GateRule = Literal["paired_test", "simple"]
