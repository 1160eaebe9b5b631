"""RunConfig: defaults honour the design's numbers; bad values and combinations name the field."""

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from rl_core.config import RunConfig, apply_overrides, load_config


def test_defaults_follow_the_design():
    cfg = RunConfig()
    assert (cfg.algorithm.clip_low_threshold, cfg.algorithm.clip_high_threshold) == (0.8, 1.2)
    assert (
        cfg.algorithm.clip_ratio_dual == 3.0
        and RunConfig.model_validate({"algorithm": {"clip_ratio_dual": None}}).algorithm.clip_ratio_dual is None
    )
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.optimizer.eps == 1e-8
    assert cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.grad_clip == 1.0
    assert cfg.rollout.group_size == 8 and cfg.algorithm.max_steps_off_policy == 3
    assert cfg.rollout.timeout_s == 600 and cfg.rollout.max_retries == 3
    assert cfg.evaluation.success_threshold == 1.0


def test_shipped_quickstart_config_loads():
    cfg = load_config()
    assert cfg.rollout.global_batch_size % cfg.rollout.group_size == 0


def test_context_budget_is_checked_with_the_fields_named():
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(
            {"rollout": {"max_turns": 20, "max_tokens_per_turn": 64}, "policy": {"context_window": 512}}
        )
    msg = str(err.value)
    assert "rollout.max_turns" in msg and "policy.context_window" in msg and "environment.expected_tool_output" in msg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"rollout": {"group_size": 0}}, "rollout.group_size"),
        ({"algorithm": {"clip_low_threshold": 1.5}}, "algorithm.clip_low_threshold"),
        ({"algorithm": {"clip_high_threshold": 0.5}}, "algorithm.clip_high_threshold"),
        ({"algorithm": {"loss_fn": "dpo"}}, "algorithm.loss_fn"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr"),
        ({"rollout": {"temperature": -0.5}}, "rollout.temperature"),
        ({"rollout": {"max_turn": 3}}, "rollout.max_turn"),
        ({"storage": {"run_id": "../escape"}}, "storage.run_id"),
        ({"algorithm": {"clip_ratio_dual": 1.0}}, "algorithm.clip_ratio_dual"),
        ({"validation": {"max_context_overflow_frac": 1.5}}, "validation.max_context_overflow_frac"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(data)
    assert field in str(err.value)


def test_bad_combinations_name_the_fields():
    with pytest.raises(ValidationError, match="rollout.global_batch_size"):
        RunConfig.model_validate({"rollout": {"global_batch_size": 30, "group_size": 8}})
    with pytest.raises(ValidationError, match="evaluation.num_samples"):
        RunConfig.model_validate({"evaluation": {"pass_k": [1, 16], "num_samples": 8}})


def test_overrides_parse_yaml_values():
    data = apply_overrides(
        {}, ["rollout.group_size=4", "algorithm.clip_high_threshold=1.3", "environment.domains=[refunds]"]
    )
    assert data == {
        "rollout": {"group_size": 4},
        "algorithm": {"clip_high_threshold": 1.3},
        "environment": {"domains": ["refunds"]},
    }
    with pytest.raises(ValueError, match="section.field=value"):
        apply_overrides({}, ["no_equals_sign"])


# Every field of RunConfig by dotted name, in declaration order: the config's public schema. The only
# change the layout refactor (issue 10) made is doctor.zero_adv_groups_max -> doctor.zero_variance_groups_max;
# issue 11 added policy.tool_parser and policy.stop_token (native tool calls through a chat template).
EXPECTED_FIELDS = [
    "seed",
    "iterations",
    "policy.path",
    "policy.context_window",
    "policy.chat_format",
    "policy.tool_parser",
    "policy.stop_token",
    "policy.dtype",
    "policy.device",
    "policy.lora.enabled",
    "policy.lora.rank",
    "policy.lora.alpha",
    "policy.lora.dropout",
    "policy.lora.target_modules",
    "environment.domains",
    "environment.domains_dir",
    "environment.env_kwargs",
    "environment.prompt_tokens",
    "environment.expected_tool_output",
    "environment.train_split",
    "rollout.group_size",
    "rollout.global_batch_size",
    "rollout.max_turns",
    "rollout.max_tokens_per_turn",
    "rollout.temperature",
    "rollout.timeout_s",
    "rollout.max_retries",
    "rollout.generation_batch_size",
    "rollout.overlap_collection",
    "rollout.backend",
    "rollout.vllm.url",
    "rollout.vllm.python",
    "rollout.vllm.port",
    "rollout.vllm.dtype",
    "rollout.vllm.kv_cache_gib",
    "rollout.vllm.max_num_batched_tokens",
    "rollout.vllm.threads",
    "rollout.vllm.cpu_bind",
    "rollout.vllm.extra_args",
    "rollout.vllm.startup_timeout_s",
    "rollout.vllm.request_timeout_s",
    "rollout.vllm.max_concurrency",
    "rollout.agent",  # optional: an anyOf of the AgentConfig section and null
    "algorithm.advantage_method",
    "algorithm.normalize_advantage_std",
    "algorithm.pass_k",
    "algorithm.loss_fn",
    "algorithm.loss_aggregation",
    "algorithm.clip_low_threshold",
    "algorithm.clip_high_threshold",
    "algorithm.clip_ratio_dual",
    "algorithm.kl_coef",
    "algorithm.tis_cap",
    "algorithm.max_steps_off_policy",
    "algorithm.zero_variance_groups",
    "algorithm.max_resample_rounds",
    "algorithm.mask_truncated",
    "algorithm.reasoning_in_loss",
    "optimizer.lr",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.weight_decay",
    "optimizer.grad_clip",
    "optimizer.micro_batch_size",
    "optimizer.mini_batches_per_step",
    "optimizer.epochs_per_batch",
    "trainer.backend",
    "trainer.zero_stage",
    "trainer.num_processes",
    "trainer.num_nodes",
    "trainer.master_addr",
    "trainer.master_port",
    "trainer.precision",
    "trainer.gradient_checkpointing",
    "trainer.packing",
    "evaluation.split",
    "evaluation.max_tasks",
    "evaluation.val_every",
    "evaluation.pass_k",
    "evaluation.num_samples",
    "evaluation.sample_temperature",
    "evaluation.success_threshold",
    "evaluation.gate_fraction",
    "validation.reward_min",
    "validation.reward_max",
    "validation.max_token_cap_frac",
    "validation.max_turns_unanswered_frac",
    "validation.max_env_error_frac",
    "validation.max_context_overflow_frac",
    "tracking.mlflow_uri",
    "tracking.experiment",
    "tracking.registered_model",
    "tracking.ui_url",
    "tracking.traced_episodes",
    "tracking.traced_eval_episodes",
    "gate.rule",
    "gate.min_pass_at_1",
    "gate.require_improvement",
    "gate.confidence",
    "gate.min_effect",
    "gate.env_tolerance",
    "gate.max_truncated_frac",
    "gate.max_env_error_frac",
    "doctor.enabled",
    "doctor.on_collapse",
    "doctor.max_rollbacks",
    "doctor.window",
    "doctor.flat_reward_steps",
    "doctor.zero_variance_groups_max",
    "doctor.collapse_frac",
    "doctor.token_cap_frac_max",
    "doctor.grad_clip_pinned_frac",
    "doctor.hacking_min_gain",
    "storage.run_dir",
    "storage.run_id",
    "storage.keep_checkpoints",
]


def _schema_fields(schema: dict, node: dict, prefix: str = "") -> list[str]:
    """Dotted names of the leaf fields of a pydantic JSON schema node, following $refs into sections."""
    names = []
    for name, prop in node["properties"].items():
        ref = prop.get("$ref")
        if ref:
            names += _schema_fields(schema, schema["$defs"][ref.rsplit("/", 1)[1]], f"{prefix}{name}.")
        else:
            names.append(f"{prefix}{name}")
    return names


def test_the_json_schema_names_every_field_once_as_before():
    schema = RunConfig.model_json_schema()
    assert _schema_fields(schema, schema) == EXPECTED_FIELDS
    zero_variance = schema["$defs"]["DoctorConfig"]["properties"]["zero_variance_groups_max"]
    assert zero_variance["default"] == 0.8 and "analysis/zero_variance_groups" in zero_variance["description"]
    with pytest.raises(ValidationError, match="doctor.zero_adv_groups_max"):
        RunConfig.model_validate({"doctor": {"zero_adv_groups_max": 0.5}})


def test_every_config_field_has_a_description():
    schema = RunConfig.model_json_schema()
    sections = {ref.rsplit("/", 1)[1] for ref in _refs(schema)}
    for section in sections:
        for name, prop in schema["$defs"][section]["properties"].items():
            assert prop.get("description") or "$ref" in prop, f"{section}.{name} has no description"


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_each_list_of_allowed_values_is_one_alias_used_everywhere():
    from flows.parameters import TrainSettings
    from rl_core.advantages import AdvantageMethod
    from rl_core.config import (
        AlgorithmConfig,
        ChatFormatName,
        DoctorConfig,
        DType,
        OnCollapse,
        PolicyConfig,
        TrainerBackendName,
        TrainerConfig,
        TruncatedFinishReason,
        ZeroStage,
        ZeroVarianceGroups,
    )
    from rl_core.losses import LossAggregation, LossFn
    from rl_core.model.policy import DTYPES
    from rl_core.trajectory import FINISH_REASONS

    def annotation(model, name):
        return model.model_fields[name].annotation

    assert annotation(PolicyConfig, "chat_format") is ChatFormatName
    assert annotation(PolicyConfig, "dtype") is DType
    assert annotation(TrainerConfig, "backend") is TrainerBackendName
    assert annotation(TrainerConfig, "zero_stage") is ZeroStage
    assert annotation(AlgorithmConfig, "zero_variance_groups") is ZeroVarianceGroups
    assert annotation(AlgorithmConfig, "mask_truncated") == list[TruncatedFinishReason]
    assert annotation(AlgorithmConfig, "advantage_method") is AdvantageMethod
    assert annotation(AlgorithmConfig, "loss_fn") is LossFn
    assert annotation(AlgorithmConfig, "loss_aggregation") is LossAggregation
    assert annotation(DoctorConfig, "on_collapse") is OnCollapse
    # The Prefect form takes the same lists (a dropdown starting at the config's value).
    assert annotation(TrainSettings, "loss_fn") is LossFn
    assert annotation(TrainSettings, "advantage_method") is AdvantageMethod
    assert annotation(TrainSettings, "on_collapse") is OnCollapse
    # The functions' own tables cover exactly the allowed values.
    assert tuple(DTYPES) == get_args(DType)
    assert set(get_args(TruncatedFinishReason)) <= set(FINISH_REASONS)


def test_every_name_imported_from_rl_core_config_is_exported_and_modules_stay_small():
    import rl_core.config as config

    for name in config.__all__:
        assert getattr(config, name) is not None
    folder = Path(config.__file__).parent
    for module in folder.glob("*.py"):
        assert len(module.read_text().splitlines()) <= 400, module.name


def test_a_config_file_written_before_the_rename_still_loads(tmp_path):
    """A run's config.yaml from before issue 10 names doctor.zero_adv_groups_max: it loads under the new name."""
    from rl_core.config import dump_config, load_config

    old = dump_config(load_config(None, ["doctor.zero_variance_groups_max=0.7"])).replace(
        "zero_variance_groups_max", "zero_adv_groups_max"
    )
    (tmp_path / "config.yaml").write_text(old)
    assert load_config(tmp_path / "config.yaml").doctor.zero_variance_groups_max == 0.7
    both = old.replace("zero_adv_groups_max: 0.7", "zero_adv_groups_max: 0.7\n  zero_variance_groups_max: 0.6")
    (tmp_path / "both.yaml").write_text(both)
    with pytest.raises(ValueError, match="doctor.zero_adv_groups_max was renamed doctor.zero_variance_groups_max"):
        load_config(tmp_path / "both.yaml")


def test_the_policy_path_expands_the_home_folder_and_resolves_against_the_repository(tmp_path, monkeypatch):
    from rl_core.paths import REPO_ROOT

    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, ["policy.path=~/models/smol"]).resolved_policy_path() == str(tmp_path / "models/smol")
    shipped = load_config(None, []).resolved_policy_path()
    assert shipped == str(REPO_ROOT / "data/checkpoints/reference")
    assert load_config(None, ["policy.path=org/model"]).resolved_policy_path() == "org/model"  # a hub id


def test_the_shipped_real_model_config_loads_and_fits_its_context_window():
    """data/configs/smollm2.yaml: SmolLM2 through its own template with Hermes tool calls, from the cache folder
    scripts/fetch_smollm2.py fills (the budget is checked again on the real prompts when a run starts)."""
    from rl_core.paths import REPO_ROOT

    cfg = load_config(REPO_ROOT / "data/configs/smollm2.yaml", [])
    assert (cfg.policy.chat_format, cfg.policy.tool_parser) == ("hf_template", "hermes")
    assert cfg.resolved_policy_path() == str(Path.home() / ".cache/turnstile/smollm2-135m-instruct")
    r, e = cfg.rollout, cfg.environment
    assert r.max_turns * (r.max_tokens_per_turn + e.expected_tool_output) + e.prompt_tokens <= cfg.policy.context_window
