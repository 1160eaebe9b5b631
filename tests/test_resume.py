"""Exact resume: a run stopped after step 2 and resumed ends with the same parameters as one never stopped."""

import torch

from rl_core.config import load_config
from rl_core.run import TrainingRun
from rl_core.runs.checkpoint import latest_checkpoint

SMALL = ["rollout.group_size=4", "rollout.global_batch_size=8", "optimizer.micro_batch_size=4", "optimizer.lr=3e-4"]


def train(run: TrainingRun, iterations: range) -> None:
    for iteration in iterations:
        episodes = run.collect(iteration)
        run.write(iteration, episodes)
        run.train(episodes)
        run.save_checkpoint(iteration)


def test_stopped_after_step_2_and_resumed_matches_an_uninterrupted_run(tmp_path):
    straight = TrainingRun(
        load_config(None, SMALL + ["iterations=4", f"storage.run_dir={tmp_path}", "storage.run_id=straight"])
    )
    train(straight, range(1, 5))

    cfg = load_config(None, SMALL + ["iterations=4", f"storage.run_dir={tmp_path}", "storage.run_id=stopped"])
    first = TrainingRun(cfg)
    train(first, range(1, 3))
    del first  # the process "dies" after step 2

    resumed = TrainingRun.resume(cfg, latest_checkpoint(tmp_path / "stopped" / "checkpoints"))
    assert resumed.policy.version == 2 and resumed.last_iteration == 2 and resumed.run_id == "stopped"
    train(resumed, range(resumed.last_iteration + 1, 5))

    assert resumed.policy.version == straight.policy.version == 4
    for (name, a), b in zip(straight.policy.model.state_dict().items(), resumed.policy.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the resumed run saw exactly the tasks and samples of the uninterrupted one
    for iteration in (3, 4):
        a, b = straight.store.read("straight", iteration), resumed.store.read("stopped", iteration)
        assert [e.tokens for e in a] == [e.tokens for e in b]


def test_dynamic_sampling_fills_the_batch_with_informative_groups(tmp_path):
    from rl_core.selection import drop_zero_variance_groups

    cfg = load_config(
        None,
        [
            "rollout.group_size=4",
            "rollout.global_batch_size=32",
            "algorithm.zero_variance_groups=resample",
            f"storage.run_dir={tmp_path}",
            "storage.run_id=dyn",
        ],
    )
    run = TrainingRun(cfg)
    episodes = run.collect(1)
    groups = {e.group_id for e in episodes}
    assert len(groups) == cfg.tasks_per_batch and drop_zero_variance_groups(episodes) == episodes
    assert (1, 1) in run.collector._work  # degenerate groups were replaced by further tasks
    assert len(episodes) == 32


def test_overlapped_collection_samples_one_step_behind_and_nothing_is_dropped(tmp_path):
    cfg = load_config(
        None,
        SMALL
        + [
            "rollout.overlap_collection=true",
            "algorithm.max_steps_off_policy=1",
            f"storage.run_dir={tmp_path}",
            "storage.run_id=overlap",
        ],
    )
    run = TrainingRun(cfg)
    seen = []
    for iteration, episodes in run.batches(1, 3):
        seen.append((iteration, run.policy.version, {e.policy_version for e in episodes}))
        metrics = run.train(episodes)
        assert metrics.stale_dropped == 0
    # batch k+1 was sampled by the policy of before step k: one step behind when it is trained on
    assert seen == [(1, 0, {0}), (2, 1, {0}), (3, 2, {1})]


def test_overlap_needs_an_off_policy_allowance():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="algorithm.max_steps_off_policy"):
        load_config(None, ["rollout.overlap_collection=true", "algorithm.max_steps_off_policy=0"])
