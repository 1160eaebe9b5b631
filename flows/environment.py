"""The process environment every command line sets up before importing Prefect.

`prepare_environment(cfg)` is shared by `turnstile` (flows/cli.py), its replay command
(flows/replay_cli.py) and `turnstile serve` (flows/serve.py); it lives here so that flows.cli
imports those two modules and neither imports flows.cli.

It also points Prefect at Turnstile's logging config (`flows/logging.yml`: Prefect's own, plus the
two filters below), unless PREFECT_LOGGING_SETTINGS_PATH is already set. Prefect has no setting for
the line its task engine logs after every task run, "Finished in state Completed()": with it, most
of a run's log was that line. The filter drops it for completed task runs only: a failed or crashed
task run's "Finished in state Failed(...)" is an ERROR and stays, and so do retries ("Task run
failed with exception ... Retry 1/2 will start") and the flow run's own closing state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_core.config import RunConfig


LOGGING_CONFIG = Path(__file__).with_name("logging.yml")
"""Turnstile's Prefect logging config (Prefect's default with `CompletedTaskRunFilter` and `ConsoleFilter`)."""

NOT_ON_CONSOLE = {"turnstile_console": False}
"""`extra=` for a run-logger record meant for the Prefect UI's log only: the closing summary, which the
command line prints itself (`ConsoleFilter` keeps it off the terminal)."""


class CompletedTaskRunFilter(logging.Filter):
    """Drops the INFO record "Finished in state Completed()" that Prefect's task engine logs after every
    completed task run (logger `prefect.task_runs`); keeps every other record, including the ERROR
    "Finished in state Failed(...)" / "Crashed(...)" and the retry messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not isinstance(record.msg, str):
            return True
        return not record.msg.startswith("Finished in state Completed(")


class ConsoleFilter(logging.Filter):
    """Keeps records logged with `extra=NOT_ON_CONSOLE` off the console (they still go to the Prefect API)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "turnstile_console", True)


def prepare_environment(cfg: RunConfig) -> None:
    """Keep Prefect's state under the run directory, its telemetry off and its logging on Turnstile's
    config (before importing prefect: Prefect reads these when it is imported)."""
    run_dir = Path(cfg.storage.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(run_dir / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_SETTINGS_PATH", str(LOGGING_CONFIG))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bar per checkpoint saved or loaded
    from transformers.utils import logging as transformers_logging  # already imported by the policy code

    transformers_logging.disable_progress_bar()
