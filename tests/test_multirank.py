"""The learner on two CPU ranks (torchrun, gloo) takes the single-process update: same parameters after three
steps for ZeRO 1 and 3, the same optimizer state in checkpoints, and weights and optimizer state that load back.

Each test launches its ranks through `Learner` exactly as a run does (rl_core/distributed/), from the shipped
reference checkpoint (the ranks load the run's starting model from its path).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import torch

from rl_core.config import load_config
from rl_core.distributed.launch import LearnerRanksError, free_port
from rl_core.learner import Learner, load_start_policy, make_trainer
from rl_core.paths import REPO_ROOT
from tests.test_trainer import make_episodes

pytestmark = pytest.mark.slow  # each test starts torchrun and two ranks (~10 s)

STEPS = 3
# lr 1e-2 moves every weight visibly (~3e-2 in three steps); CISPO's gradient is not cut off by ratio clipping on
# random-token episodes, and grad_clip 1.0 clips every step (norms ~6-14), so clipping is exercised. Seven
# episodes in micro-batches of 2: the ranks get 4 and 3 episodes (rank_shares), 2 micro-batches each.
OVERRIDES = [
    "optimizer.lr=1e-2",
    "optimizer.micro_batch_size=2",
    "optimizer.grad_clip=1.0",
    "algorithm.loss_fn=cispo",
    "algorithm.advantage_method=rloo",
]
# Tolerance. Two ranks add their gradients in another order than one process (and DeepSpeed averages them, the
# backend scaling the loss by the world size), so gradients differ in the last bits (norms agree to ~1e-6
# relative). Adam divides by sqrt(v) + eps: on a weight whose gradient is a near-cancelling sum (|g| ~ eps = 1e-8),
# last-bit differences become update differences up to a fair share of lr. Measured against the torch backend:
# mean |difference| below 1e-7; a few weights in 10^4 off by 1e-5 to 6e-4 (one weight at 8.7e-5 with ZeRO-3
# after three steps; 0.13% of the weights beyond 1e-5, max 6e-4, with two steps under tis_cap and KL). That is
# the float noise of this update itself: the same step in one process with micro-batches of 1 instead of 3
# leaves 0.085% of the weights beyond 1e-5 (max 2.3e-4). Hence: mean |difference| within MEAN_ATOL = 1e-6, and at
# most OUTLIERS = 0.5% of the weights further than NEAR = 1e-5. The runs move the weights by 8e-3 on average, so
# a wrong update (a rank's share counted twice or not at all, the ranks' gradients averaged instead of summed:
# half the update, a missed clip) moves most weights by far more and fails both.
MEAN_ATOL, NEAR, OUTLIERS = 1e-6, 1e-5, 5e-3


def config(**trainer):
    values = {f"trainer.{key}": value for key, value in trainer.items()}
    return load_config(None, overrides=OVERRIDES, values=values)


@pytest.fixture(scope="module")
def single_process():
    """The torch backend's three steps in this process: the update every multi-rank run must take."""
    cfg = config()
    start = load_start_policy(cfg)
    episodes = make_episodes(start, n=7)
    policy = copy.deepcopy(start)
    trainer = make_trainer(cfg, policy)
    metrics = [trainer.step(episodes) for _ in range(STEPS)]
    return start, episodes, policy, trainer.optimizer.state_dict(), metrics


def assert_same_params(a, b):
    difference = torch.cat([(x - y).detach().abs().flatten() for x, y in zip(a.parameters(), b.parameters())])
    assert float(difference.mean()) <= MEAN_ATOL, f"mean |difference| {float(difference.mean()):.3g}"
    far = float((difference > NEAR).float().mean())
    assert far <= OUTLIERS, f"{far:.2%} of the weights differ by more than {NEAR} (max {float(difference.max()):.3g})"


def assert_same_optimizer_state(a, b, atol):
    assert a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(value, b["state"][index][key], rtol=1e-4, atol=atol, msg=f"{index} {key}")


@pytest.mark.parametrize("zero_stage, ranks", [(1, 2), (3, 2), (3, 3)])
def test_several_ranks_take_the_single_process_update(tmp_path, single_process, zero_stage, ranks):
    """Two ranks for ZeRO 1 and 3; and three for ZeRO-3, which does not divide most weight sizes (the last rank's
    partition is padded)."""
    start, episodes, expected, expected_state, expected_metrics = single_process
    cfg = config(backend="deepspeed", zero_stage=zero_stage, num_processes=ranks)
    policy = copy.deepcopy(start)
    learner = Learner(cfg, policy, tmp_path / "checkpoints")
    try:
        metrics = [learner.train(episodes) for _ in range(STEPS)]
        assert policy.version == STEPS
        for got, want in zip(metrics, expected_metrics):
            assert got.skipped is None and got.optimizer_steps == 1
            assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
            assert got.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
            assert got.loss_tokens == want.loss_tokens and got.episodes == want.episodes == 7
            assert got.entropy == pytest.approx(want.entropy, rel=1e-5)
        moved = max((a - b).abs().max().item() for a, b in zip(expected.model.parameters(), start.model.parameters()))
        assert moved > 1000 * NEAR
        assert_same_params(policy.model, expected.model)
        # the checkpoint's optimizer state (gathered from the ranks' ZeRO partitions) is the torch optimizer's
        state = learner.trainer.optimizer.state_dict()
        assert_same_optimizer_state(state, expected_state, atol=1e-6)

        # ZeRO shards: each rank holds 1/ranks of the optimizer state and fp32 master weights (stage 3: of the weights)
        total = sum(p.numel() for p in start.model.parameters())
        shares = learner.trainer.shard_sizes()
        assert len(shares) == ranks
        for sizes in shares:
            assert sizes["master_weights"] == pytest.approx(total / ranks, rel=1e-3)
            assert sizes["optimizer_state"] == 2 * sizes["master_weights"]
            assert sizes["weights"] == (pytest.approx(total / ranks, rel=1e-3) if zero_stage == 3 else total)

        # a rollback: the start's weights and a fresh optimizer, then the same three steps again
        learner.trainer.load_weights(dict(start.model.named_parameters()))
        learner.trainer.reset_optimizer()
        policy.version = 0
        again = [learner.train(episodes) for _ in range(STEPS)]
        assert [m.grad_norm for m in again] == pytest.approx([m.grad_norm for m in metrics], rel=1e-5)
        assert_same_params(policy.model, expected.model)

        # a resume: the optimizer state saved after step 3 loads back into the ranks
        learner.trainer.optimizer.load_state_dict(state)
        assert_same_optimizer_state(learner.trainer.optimizer.state_dict(), state, atol=0)
    finally:
        learner.close()
    ranks = learner.trainer.ranks
    assert ranks.process.returncode is not None  # torchrun and its ranks are gone
    assert "Traceback" not in ranks.log_tail(400), ranks.log_tail(60)


def test_a_rank_that_raises_is_reported_with_its_traceback(tmp_path, single_process):
    start, episodes, *_ = single_process
    cfg = config(backend="deepspeed", zero_stage=1, num_processes=2)
    learner = Learner(cfg, copy.deepcopy(start), tmp_path / "checkpoints")
    try:
        with pytest.raises(KeyError, match="no trainable parameter named"):  # refused by the driver's copy first
            learner.trainer.load_weights({"model.no_such_weight": torch.zeros(1)})
        with pytest.raises(LearnerRanksError, match="(?s)a learner rank raised during 'load_weights'.*KeyError"):
            learner.trainer.ranks.call("load_weights", {"model.no_such_weight": torch.zeros(1)})
        learner.trainer.ranks.process.wait(timeout=60)  # the rank that raised exits; torchrun stops the other
        with pytest.raises(LearnerRanksError, match="torchrun exited|channel to rank 0 closed") as failed:
            learner.train(episodes)
        first = str(failed.value).splitlines()[0]  # what the command line prints: the rank's exception named
        assert re.search(r"a rank logged: \[rank[01]\]: KeyError", first), first  # both ranks raised it
        assert failed.value.log_path == learner.trainer.ranks.log_path
    finally:
        learner.close()
    assert learner.trainer.ranks.process.returncode != 0
    assert "KeyError" in learner.trainer.ranks.log_tail(200)


def test_two_machines_of_one_rank_each_take_the_same_update(tmp_path, single_process):
    """trainer.num_nodes 2 on one machine: node 0's rank starts with the learner, node 1's with `turnstile
    learner-node --node-rank 1`; together they take the single-process update (ZeRO-2 here)."""
    start, episodes, expected, _, expected_metrics = single_process
    port = free_port()
    trainer = {"backend": "deepspeed", "zero_stage": 2, "num_nodes": 2, "master_port": port}
    sets = [arg for o in [*OVERRIDES, *(f"trainer.{k}={v}" for k, v in trainer.items())] for arg in ("--set", o)]
    node = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "learner-node", "--node-rank", "1", *sets],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        policy = copy.deepcopy(start)
        learner = Learner(config(**trainer), policy, tmp_path / "checkpoints")
        try:
            metrics = [learner.train(episodes) for _ in range(STEPS)]
        finally:
            learner.close()
        assert [m.grad_norm for m in metrics] == pytest.approx([m.grad_norm for m in expected_metrics], rel=1e-5)
        assert_same_params(policy.model, expected.model)
        output, _ = node.communicate(timeout=60)
        assert node.returncode == 0, output[-3000:]
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()


def test_two_ranks_with_several_optimizer_steps_tis_and_kl_take_the_single_process_update(tmp_path):
    """Two mini-batches per step (two optimizer steps), tis_cap's pi_old from the iteration's starting weights
    (each rank computes it for its own share), a KL penalty against the starting model (on every rank) and an
    odd micro-batch count (ranks with unequal numbers of passes): still the single-process update (ZeRO-3)."""
    extra = {
        "algorithm.tis_cap": 2.0,
        "algorithm.kl_coef": 0.05,
        "optimizer.mini_batches_per_step": 2,
        "optimizer.micro_batch_size": 3,
    }
    cfg = load_config(None, overrides=OVERRIDES, values=extra)
    start = load_start_policy(cfg)
    episodes = make_episodes(start, n=8)
    expected = copy.deepcopy(start)
    want = [make_trainer(cfg, expected).step(episodes)]
    multi = load_config(
        None,
        overrides=OVERRIDES,
        values={**extra, "trainer.backend": "deepspeed", "trainer.zero_stage": 3, "trainer.num_processes": 2},
    )
    policy = copy.deepcopy(start)
    learner = Learner(multi, policy, tmp_path / "checkpoints")
    try:
        got = [learner.train(episodes)]
    finally:
        learner.close()
    assert got[0].optimizer_steps == want[0].optimizer_steps == 2 and policy.version == 2
    for name in ("loss", "grad_norm", "ref_kl", "is_weight_mean", "logprob_mismatch_mean", "entropy"):
        assert getattr(got[0], name) == pytest.approx(getattr(want[0], name), rel=1e-5, abs=1e-7), name
    assert want[0].ref_kl > 0 and want[0].logprob_mismatch_mean > 0
    assert_same_params(policy.model, expected.model)
