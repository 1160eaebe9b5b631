"""trainer.precision bf16, trainer.gradient_checkpointing and trainer.packing in the trainer, and the config refusing
trainer settings that cannot work, with the field named."""

from __future__ import annotations

import copy

import pytest
import torch

from rl_core.config import AlgorithmConfig, OptimizerConfig, RunConfig, TrainerConfig
from rl_core.token_batch import batch_logprobs, micro_batch
from rl_core.trainer import Trainer
from tests.test_trainer import make_episodes

OPTIMIZER = OptimizerConfig(lr=1e-2, micro_batch_size=2)
ALGORITHM = AlgorithmConfig(loss_fn="cispo", advantage_method="rloo")


def trained(policy, episodes, steps=2, **trainer):
    """A deep copy of `policy` after `steps` steps with TrainerConfig(**trainer); and the steps' metrics."""
    policy = copy.deepcopy(policy)
    t = Trainer(policy, ALGORITHM, OPTIMIZER, trainer_cfg=TrainerConfig(**trainer))
    return policy, t, [t.step(episodes) for _ in range(steps)]


def max_difference(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_bf16_trains_float32_weights_with_float32_logprobs_close_to_fp32(tiny_policy):
    episodes = make_episodes(tiny_policy, n=6)
    fp32, _, fp32_metrics = trained(tiny_policy, episodes)
    bf16, trainer, bf16_metrics = trained(tiny_policy, episodes, precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.float32}  # the master weights stay float32
    with trainer.autocast():
        batch = micro_batch(episodes, [torch.ones(1)] * 6, 0, bf16.device)
        logprobs, entropy = batch_logprobs(bf16.model, batch)
        hidden = bf16.model.model.embed_tokens(batch["tokens"]) @ bf16.model.model.layers[0].mlp.up_proj.weight.T
    assert hidden.dtype == torch.bfloat16  # the forward's matmuls run in bf16 ...
    assert logprobs.dtype == entropy.dtype == torch.float32  # ... the log-probs (and the loss) in float32
    for a, b in zip(fp32_metrics, bf16_metrics):  # bf16 rounds activations (8 bits of mantissa): close, not equal
        assert b.loss == pytest.approx(a.loss, rel=5e-2, abs=5e-3)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=5e-2)
    # bf16 took the step fp32 took, roughly: the two updates point the same way (Adam's near-sign updates flip on
    # weights whose gradient bf16 rounding changes sign, so single weights may differ by a whole step)
    update = [
        torch.cat([(p - q).flatten() for p, q in zip(x.model.parameters(), tiny_policy.model.parameters())])
        for x in (fp32, bf16)
    ]
    assert torch.nn.functional.cosine_similarity(update[0], update[1], dim=0) > 0.9
    assert max_difference(bf16, fp32) > 0  # and bf16 did run: not bit-identical


def test_gradient_checkpointing_takes_the_same_update(tiny_policy):
    episodes = make_episodes(tiny_policy, n=6)
    plain, _, plain_metrics = trained(tiny_policy, episodes)
    checkpointed, trainer, metrics = trained(tiny_policy, episodes, gradient_checkpointing=True)
    assert checkpointed.model.is_gradient_checkpointing
    assert [m.grad_norm for m in metrics] == pytest.approx([m.grad_norm for m in plain_metrics], rel=1e-6)
    assert max_difference(checkpointed, plain) <= 1e-6


def test_packing_takes_the_padded_update(tiny_policy):
    episodes = make_episodes(tiny_policy, n=7)
    padded, _, padded_metrics = trained(tiny_policy, episodes)
    packed, _, packed_metrics = trained(tiny_policy, episodes, packing=True, gradient_checkpointing=True)
    assert packed.model.config._attn_implementation.startswith("turnstile_packed|")
    assert [m.loss for m in packed_metrics] == pytest.approx([m.loss for m in padded_metrics], rel=1e-5)
    assert max_difference(packed, padded) <= 1e-5  # Adam's eps amplifies last-bit gradient differences
    assert max_difference(padded, tiny_policy) > 1e-3


@pytest.mark.parametrize(
    "values, message",
    [
        ({"trainer": {"num_processes": 2}}, "needs trainer.backend 'deepspeed'"),
        ({"trainer": {"backend": "deepspeed", "num_processes": 2}}, "needs trainer.zero_stage 1, 2 or 3"),
        ({"trainer": {"backend": "deepspeed", "zero_stage": 1, "num_nodes": 2}}, "needs a fixed trainer.master_port"),
        ({"trainer": {"num_processes": 0}}, "trainer.num_processes"),
        ({"trainer": {"precision": "fp16"}}, "trainer.precision"),
        ({"trainer": {"precision": "bf16"}, "policy": {"dtype": "bfloat16"}}, "policy.dtype must be float32"),
    ],
)
def test_trainer_settings_that_cannot_work_are_refused_with_the_field_named(values, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.model_validate(values)


def test_bf16_is_refused_on_a_cpu_without_bf16_instructions(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="trainer.precision bf16 cannot run on policy.device 'cpu'.*AVX512-BF16"):
        RunConfig.model_validate({"trainer": {"precision": "bf16"}})


def test_a_trainer_for_several_ranks_outside_a_process_group_is_refused(tiny_policy):
    cfg = TrainerConfig(backend="deepspeed", zero_stage=1, num_processes=2)
    with pytest.raises(ValueError, match="2 learner ranks, but this process group has 1"):
        Trainer(copy.deepcopy(tiny_policy), ALGORITHM, OPTIMIZER, trainer_cfg=cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_cuda_device_on_a_machine_without_one_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match="policy.device 'cuda:1': this machine has no CUDA device"):
        RunConfig.model_validate({"policy": {"device": "cuda:1"}, "trainer": {"precision": "bf16"}})


def test_a_continued_run_may_change_its_learner_ranks_but_not_its_precision(tmp_path):
    """The ranks, backend, ZeRO stage, checkpointing and packing compute the same update (checkpoints are torch
    AdamW's whatever they are): a run may continue on other ones. bf16 changes the numbers: refused."""
    from rl_core.runs.folder import record_run_config

    record_run_config(RunConfig(), tmp_path)
    ranks = {"backend": "deepspeed", "zero_stage": 3, "num_processes": 4, "packing": True}
    record_run_config(RunConfig.model_validate({"trainer": ranks}), tmp_path)
    with pytest.raises(ValueError, match=r"trainer.precision differ"):
        record_run_config(RunConfig.model_validate({"trainer": {"precision": "bf16"}}), tmp_path)
