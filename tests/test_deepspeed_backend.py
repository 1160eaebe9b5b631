"""The DeepSpeed backend takes the torch backend's update: same parameters after three steps, same
optimizer state, and checkpoints that move between the backends.

Runs on CPU in one process (gloo, rank 0 of 1) like the rest of the suite. Every ZeRO stage runs on
CPU, so the test covers 0-3.
"""

import copy

import pytest
import torch

from rl_core.config import AlgorithmConfig, OptimizerConfig, RunConfig, TrainerConfig
from rl_core.trainer import Trainer
from tests.test_trainer import make_episodes

STEPS = 3
# lr 1e-2 makes each step move the weights visibly. CISPO's gradient is not cut off by ratio clipping
# on these random-token episodes (PPO's is, to norms ~0.01), and its norms (~0.91, 1.08, 1.11) straddle
# grad_clip 1.0 (asserted below): the first step is not clipped, the others are.
OPTIMIZER = OptimizerConfig(lr=1e-2, grad_clip=1.0, micro_batch_size=2)  # 6 episodes: 3 micro-batches per step
ALGORITHM = AlgorithmConfig(loss_fn="cispo", advantage_method="rloo")

# Tolerance. Forward passes are bit-identical across the backends, and so are the gradients with
# ZeRO 0-2; stage 0 ends bit-identical to torch, and so do 1-2 without clipping. What remains is
# float32 summation order: ZeRO 1-2 compute the clipping norm with their own reduction (clip
# coefficients differ in the last bit; measured: params within 1.2e-7 after three steps), and
# ZeRO-3's backward hooks change the attention backward's rounding (gradients differ by ~2e-7
# relative). Adam divides by sqrt(v) + eps,
# so weights whose gradient is ~1e-9, below eps = 1e-8, turn those last-bit differences into update
# differences of up to ~5e-6 (measured 5.1e-6 with ZeRO-3). Hence atol 1e-6 for stages 0-2 and 2e-5
# for stage 3: well above that noise, and 500x or more below one step's movement (~lr = 1e-2 per
# weight), so a wrong update (DeepSpeed's 1/gradient_accumulation_steps loss scaling, a missed or
# doubled clip, a skipped step) fails; the per-step gradient norms are compared at rel 1e-5 as well.
RTOL, ATOL = 1e-5, 1e-6
ATOL_ZERO3 = 2e-5


def train(policy, trainer_cfg, steps=STEPS, episodes=None, optimizer_state=None):
    """`steps` training steps on the same episodes; returns the trainer and each step's metrics."""
    trainer = Trainer(policy, ALGORITHM, OPTIMIZER, trainer_cfg=trainer_cfg)
    if optimizer_state is not None:
        trainer.optimizer.load_state_dict(optimizer_state)
    return trainer, [trainer.step(episodes) for _ in range(steps)]


def assert_same_params(a, b, atol=ATOL):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_optimizer_state(a, b, atol=ATOL):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(
                value,
                b["state"][index][key],
                rtol=RTOL,
                atol=atol,
                msg=lambda m, index=index, key=key: f"state {index} {key}: {m}",
            )


@pytest.fixture()
def reference_run(tiny_policy):
    """The torch backend's three steps from the tiny policy (well under a second)."""
    episodes = make_episodes(tiny_policy)
    policy = copy.deepcopy(tiny_policy)
    trainer, metrics = train(policy, None, episodes=episodes)
    return tiny_policy, episodes, policy, trainer, metrics


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_deepspeed_takes_the_torch_update(reference_run, zero_stage):
    start, episodes, torch_policy, torch_trainer, torch_metrics = reference_run
    policy = copy.deepcopy(start)
    trainer, metrics = train(policy, TrainerConfig(backend="deepspeed", zero_stage=zero_stage), episodes=episodes)
    assert type(trainer.backend).__name__ == "DeepSpeedBackend" and policy.version == torch_policy.version == STEPS
    norms = [m.grad_norm for m in torch_metrics]
    assert min(norms) < OPTIMIZER.grad_clip < max(norms)  # steps with and without clipping
    for ours, theirs in zip(metrics, torch_metrics):
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-5, abs=1e-7)
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-5)
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(policy.model.state_dict().values(), start.model.state_dict().values())
    )
    assert moved > 1e-3  # the steps happened
    atol = ATOL_ZERO3 if zero_stage == 3 else ATOL
    assert_same_params(policy.model, torch_policy.model, atol)
    # the optimizer state, in torch AdamW's own checkpoint format
    assert_same_optimizer_state(trainer.optimizer.state_dict(), torch_trainer.optimizer.state_dict(), atol)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_checkpoints_move_between_the_backends(reference_run, zero_stage):
    """Two torch steps, the optimizer state loaded into a fresh DeepSpeed trainer, one more step there:
    the torch backend's three-step result. And back: a DeepSpeed state dict loads into torch's AdamW."""
    start, episodes, torch_policy, torch_trainer, _ = reference_run
    policy = copy.deepcopy(start)
    first, _ = train(policy, None, steps=2, episodes=episodes)
    saved = copy.deepcopy(first.optimizer.state_dict())
    resumed, _ = train(
        policy,
        TrainerConfig(backend="deepspeed", zero_stage=zero_stage),
        steps=1,
        episodes=episodes,
        optimizer_state=saved,
    )
    atol = ATOL_ZERO3 if zero_stage == 3 else ATOL
    assert_same_params(policy.model, torch_policy.model, atol)
    back = Trainer(copy.deepcopy(policy), ALGORITHM, OPTIMIZER)
    back.optimizer.load_state_dict(resumed.optimizer.state_dict())
    assert_same_optimizer_state(back.optimizer.state_dict(), torch_trainer.optimizer.state_dict(), atol)


def test_trainer_config():
    assert RunConfig().trainer == TrainerConfig(backend="torch", zero_stage=0)
    with pytest.raises(ValueError, match="trainer.zero_stage"):
        TrainerConfig(zero_stage=2)
    with pytest.raises(ValueError):
        TrainerConfig(backend="deepspeed", zero_stage=4)


def test_zero3_keeps_the_policy_weights_whole(tiny_policy):
    """Rollouts and checkpoints read `policy.model` directly: with ZeRO-3 on one process its weights
    stay whole (not partitioned away) from the start, and a plain forward pass sees the trained ones."""
    from rl_core.token_batch import pad_batch, token_logprobs

    policy = copy.deepcopy(tiny_policy)
    shapes = {k: v.shape for k, v in policy.model.state_dict().items()}
    trainer = Trainer(policy, ALGORITHM, OPTIMIZER, trainer_cfg=TrainerConfig(backend="deepspeed", zero_stage=3))
    assert {k: v.shape for k, v in policy.model.state_dict().items()} == shapes
    episodes = make_episodes(policy)
    trainer.step(episodes)
    assert {k: v.shape for k, v in policy.model.state_dict().items()} == shapes
    batch = pad_batch(episodes, [torch.zeros(2)] * len(episodes), policy.chat.pad_id, policy.device)
    plain = copy.deepcopy(tiny_policy)
    plain.model.load_state_dict(policy.model.state_dict())
    with torch.no_grad():
        ours, _ = token_logprobs(policy.model.eval(), batch["tokens"], batch["attention"])
        theirs, _ = token_logprobs(plain.model.eval(), batch["tokens"], batch["attention"])
    torch.testing.assert_close(ours, theirs)
