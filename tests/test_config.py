"""RunConfig: defaults honour the design's numbers; bad values and combinations name the field."""

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
