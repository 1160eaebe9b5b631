"""The process environment every command line sets up before importing Prefect.

`prepare_environment(cfg)` is shared by `turnstile` (flows/cli.py), its replay command
(flows/replay_cli.py) and `turnstile serve` (flows/serve.py); it lives here so that flows.cli
imports those two modules and neither imports flows.cli.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_core.config import RunConfig


def prepare_environment(cfg: RunConfig) -> None:
    """Keep Prefect's state under the run directory and its telemetry off (before importing prefect)."""
    run_dir = Path(cfg.storage.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(run_dir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bar per checkpoint saved or loaded
    from transformers.utils import logging as transformers_logging  # already imported by the policy code

    transformers_logging.disable_progress_bar()
