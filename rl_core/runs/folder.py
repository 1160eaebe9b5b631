"""A run's folder: `<storage.run_dir>/<run_id>/`, its recorded config, and cleaning up after a killed writer.

`config.yaml` is written before the run's first batch or checkpoint (`record_run_config`); a run
continued later must have the same training setup (only RESUMABLE_CHANGES may differ). What lives
beside it: `trajectories/` and `quarantine/` (rl_core/store/), `checkpoints/`
(rl_core/runs/checkpoint.py), `history/`, `evaluations/`, `sampling/`, `gate.json`
(rl_core/runs/records.py).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from rl_core.atomic import sweep_temp_files, write_text_atomically
from rl_core.config import RunConfig, config_differences, dump_config, load_config
from rl_core.runs.checkpoint import checkpoints_dir, remove_unfinished_checkpoints

RUN_CONFIG_FILE = "config.yaml"
# Fields a resumed run may change: how long it runs, where it lives, how it is watched and gated, and on what
# learner ranks it trains.
# rollout.vllm and rollout.agent: where the sampler and the agents are reached, not what is trained (an agent's
# reward function is not among them)
RESUMABLE_CHANGES = (
    "iterations",
    "storage.",
    "doctor.",
    "gate.",
    "rollout.vllm.",
    *(
        f"rollout.agent.{name}"
        for name in ("mode", "url", "host", "port", "public_url", "token", "max_concurrency", "batch_window_s")
    ),
    "rollout.agent.max_request_bytes",
    "rollout.agent.start_timeout_s",
    "rollout.agent.reward_wait_s",
    # how the same update is computed (checkpoints hold torch AdamW's state whatever the backend and ranks); not
    # trainer.precision, which changes the numbers
    *(
        f"trainer.{name}"
        for name in (
            "backend",
            "zero_stage",
            "num_processes",
            "num_nodes",
            "master_addr",
            "master_port",
            "gradient_checkpointing",
            "packing",
        )
    ),
)


def run_folder(cfg: RunConfig) -> Path:
    """`<storage.run_dir>/<storage.run_id>`. Raises ValueError when the config names no run."""
    if cfg.storage.run_id is None:
        raise ValueError("storage.run_id is not set: the run has no folder yet")
    return Path(cfg.storage.run_dir) / cfg.storage.run_id


def new_run_id() -> str:
    """A run id from the current UTC time: `run-YYYYmmdd-HHMMSS`."""
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def record_run_config(cfg: RunConfig, run_dir: Path) -> Path:
    """Write the run's config to `<run_dir>/config.yaml`, or check it against the one there.

    A run that already exists may only be continued with the same training setup: any
    difference outside RESUMABLE_CHANGES raises ValueError naming the fields."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if path.exists():
        stored = load_config(path)
        changed = [f for f in config_differences(stored, cfg) if not f.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ValueError(
                f"run {Path(run_dir).name!r} already exists with a different config ({', '.join(changed)} differ "
                f"from {path}); "
                "continue it with the same settings or start a new run with another storage.run_id"
            )
    write_text_atomically(path, dump_config(cfg))
    return path


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run was started with (its `config.yaml`). Raises FileNotFoundError without one."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a Turnstile run folder")
    return load_config(path)


def sweep_leftovers(run_dir: Path) -> None:
    """Remove what a killed writer left behind (temp files, unfinished `step-*.tmp` checkpoint
    folders): the caller is now the run's only writer."""
    sweep_temp_files(run_dir)
    remove_unfinished_checkpoints(checkpoints_dir(run_dir))
