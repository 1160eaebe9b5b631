"""Replay: look again at stored trajectory batches without collecting a single new rollout.

Four things work on batches selected from the store (selection.py: `select_batches`):
- verdicts.py: `stored_verdict` / `compare_verdicts` put a batch's stored validation verdict
  beside a fresh one (the GX suite itself lives in tasks/, so the caller runs it);
- scoring.py: `rescore` gives every episode a new reward from a scorer and counts how many
  success verdicts flip, per environment. Scorers (`SCORERS`, or `package.module:function`
  taking `(episode, task) -> float`) are described in `load_scorer`;
- retraining.py: `retrain` replays the stored batches through a fresh trainer into a NEW run;
- transcripts.py: `render_transcript` shows one episode as text or markdown.

Contracts:
- nothing here writes into an existing run folder: `retrain` refuses a folder that exists;
- bad input raises `ReplayError` (a ValueError) naming the run, iteration, path or scorer;
- a batch's stored verdict is the `iteration-NNNNNN.validation.json` beside its manifest
  (in `trajectories/`, or the copy in `quarantine/iteration-NNNNNN[-N]/`);
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
    MANIFEST_SUFFIX,
    VERDICT_SUFFIX,
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
from rl_core.replay.verdicts import ValidationThresholds, VerdictComparison, compare_verdicts, stored_verdict

__all__ = [
    "MANIFEST_SUFFIX",
    "REPLAY_RECORD",
    "SCORERS",
    "VERDICT_SUFFIX",
    "ActionReplay",
    "EnvironmentTally",
    "EpisodeRef",
    "ReplayError",
    "RescoreReport",
    "RetrainReport",
    "RetrainStep",
    "ScoreChange",
    "Scorer",
    "StoredBatch",
    "TaskCatalog",
    "ValidationThresholds",
    "VerdictComparison",
    "batch_at",
    "batch_of_iteration",
    "compare_verdicts",
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
    "stored_verdict",
    "weights_difference",
]
