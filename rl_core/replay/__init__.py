"""Replay: look again at stored trajectory batches without collecting a single new rollout.

Four things work on batches selected from the store (selection.py: `select_batches`):
- revalidation.py: `stored_report` / `compare_reports` put a batch's stored validation report
  beside a fresh one (the GX suite itself lives in tasks/, so the caller runs it);
- scoring.py: `rescore` gives every episode a new reward from a scorer and counts how many
  successes flip, per environment. Scorers (`SCORERS`, or `package.module:function`
  taking `(episode, task) -> float`) are described in `load_scorer`;
- retraining.py: `retrain` replays the stored batches through a fresh trainer into a NEW run;
- transcripts.py: `render_transcript` shows one episode as text or markdown.

Contracts:
- nothing here writes into an existing run folder: `retrain` refuses a folder that exists;
- bad input raises `ReplayError` (a ValueError) naming the run, iteration, path or scorer;
- a batch's stored validation report is the one the store keeps beside its manifest
  (`TrajectoryStore.read_report_beside`: in `trajectories/`, or the copy in quarantine);
- this package re-exports the public names of its modules: import from `rl_core.replay`.
"""

from __future__ import annotations

from rl_core.replay.retraining import (
    REPLAY_RECORD,
    RetrainReport,
    RetrainStep,
    retrain,
    retrain_config,
    weights_difference,
)
from rl_core.replay.revalidation import ReportComparison, ValidationThresholds, compare_reports, stored_report
from rl_core.replay.scoring import (
    SCORERS,
    ActionReplay,
    EnvironmentTally,
    RescoreReport,
    ScoreChange,
    Scorer,
    TaskCatalog,
    load_scorer,
    replay_actions,
    rescore,
)
from rl_core.replay.selection import (
    ReplayError,
    StoredBatch,
    batch_at,
    batch_of_iteration,
    find_batch,
    read_episodes,
    run_config,
    select_batches,
)
from rl_core.replay.transcripts import EpisodeRef, pick_episode, render_transcript

__all__ = [
    "REPLAY_RECORD",
    "SCORERS",
    "ActionReplay",
    "EnvironmentTally",
    "EpisodeRef",
    "ReplayError",
    "ReportComparison",
    "RescoreReport",
    "RetrainReport",
    "RetrainStep",
    "ScoreChange",
    "Scorer",
    "StoredBatch",
    "TaskCatalog",
    "ValidationThresholds",
    "batch_at",
    "batch_of_iteration",
    "compare_reports",
    "find_batch",
    "load_scorer",
    "pick_episode",
    "read_episodes",
    "render_transcript",
    "replay_actions",
    "rescore",
    "retrain",
    "retrain_config",
    "run_config",
    "select_batches",
    "stored_report",
    "weights_difference",
]
