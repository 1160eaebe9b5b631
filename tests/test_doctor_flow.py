"""The training doctor inside the train flow: reported symptoms, and rollback / stop on a reward collapse."""

from __future__ import annotations

import json

from rl_core.store import TrajectoryStore
from tests.test_train_flow import run_flow

COLLAPSING = [
    "environment.domains=['tests.fault_envs:CollapsingDomain']",
    "environment.env_kwargs={domain: refunds, healthy_episodes: 24}",  # 3 iterations of 8 episodes
    "evaluation.success_threshold=0.3",
    "iterations=8",
    "doctor.window=2",
    "storage.keep_checkpoints=1",  # the last good checkpoint must survive pruning
]


def _records(run_dir):
    return [json.loads(p.read_text()) for p in sorted((run_dir / "history").glob("*.json"))]


def test_collapse_rolls_back_to_the_last_good_checkpoint_then_stops(prefect_harness, tmp_path):
    summary = run_flow(tmp_path, "collapse", [*COLLAPSING, "doctor.on_collapse=rollback", "doctor.max_rollbacks=1"])

    records = _records(tmp_path / "collapse")
    rollbacks = [r for r in records if r.get("rollback_to") is not None]
    assert len(rollbacks) == 1
    good = rollbacks[0]["rollback_to"]
    assert good < rollbacks[0]["step"] and good <= 3
    assert any(f["symptom"] == "reward_collapse" for f in rollbacks[0]["findings"])
    # the run went on after the rollback, collapsed again, and stopped (max_rollbacks=1)
    assert records[-1].get("stopped") and "collapsed" in summary["stopped"]
    assert records[-1]["iteration"] > rollbacks[0]["iteration"] and records[-1]["iteration"] < 8
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # steps keep counting up
    collapse = next(f for f in summary["findings"] if f["symptom"] == "reward_collapse")
    assert collapse["metric"] == "rollout/reward/mean" and collapse["value"] < collapse["threshold"]
    assert "optimizer.lr" in collapse["first_change"]
    assert TrajectoryStore(tmp_path).iterations("collapse") == [r["iteration"] for r in records]
    assert sorted(p.name for p in (tmp_path / "collapse" / "curves").iterdir()) == [
        "pass_at_1.png",
        "reward.png",
        "truncation.png",
    ]


def test_collapse_stops_the_run_when_told_to(prefect_harness, tmp_path):
    summary = run_flow(tmp_path, "stop", [*COLLAPSING, "doctor.on_collapse=stop"])
    records = _records(tmp_path / "stop")
    assert summary["stopped"] and records[-1]["stopped"] == summary["stopped"]
    assert not any(r.get("rollback_to") is not None for r in records)
    assert len(records) < 8 and summary["gate"] is not None  # what was trained before the stop is still gated
