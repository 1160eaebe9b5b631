"""Tracking stage: MLflow glue and the Prefect tasks that log a training run.

Contract:
- The store is `cfg.tracking.mlflow_uri`, or by default a SQLite file `<run_dir>/mlflow.db`
  whose experiments keep their artifacts in `<run_dir>/mlartifacts` (a local folder; a
  server URI leaves artifact storage to the server).
- One MLflow run per Turnstile run: `Tracker.start(cfg, run_id)` finds the MLflow run tagged
  with that `turnstile.run_id` or creates it (named `run_id`), so a retried or resumed start
  never makes a second one. It logs the whole config as flattened params (`rollout.group_size`).
- Metric names are kept as given (`rollout/reward/mean`, `val/pass_at_k/4`); only characters
  MLflow rejects are replaced (`@` -> `_at_`, others -> `_`).
- `Tracker` is a frozen (URI, ids) record, picklable, so Prefect tasks can take it; each call
  talks to MLflow through `MlflowClient` with an explicit run id (never the fluent API, whose
  active run is per thread and breaks under Prefect's thread pool).
- Tasks that talk to MLflow retry transient failures 3 times (1, 2, 4 s); a rejected request
  (bad value, missing entity) or a Turnstile refusal (`PermanentError`) fails at once (`retry_if_transient`).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NONE
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from rl_core.config import RunConfig

RUN_ID_TAG = "turnstile.run_id"
CONFIG_HASH_TAG = "turnstile.config_hash"
FLOW_RUN_TAG = "prefect.flow_run_id"
VALIDATION_DIR = "validation"
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_REMOTE_SCHEMES = ("http://", "https://", "databricks")
_INVALID_NAME_CHARS = re.compile(r"[^/\w.\- :]")

RunEndStatus = Literal["FINISHED", "FAILED", "KILLED"]


class PermanentError(Exception):
    """A deterministic refusal (bad registry state, bad input): retrying cannot help, so the
    MLflow tasks fail at once instead of retrying (`is_transient` is False for it)."""


# --------------------------------------------------------------------------- hashes and names


def config_hash(cfg: RunConfig) -> str:
    """First 12 hex digits of the sha256 of the config's canonical JSON."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def task_set_hash(task_ids: Iterable[str]) -> str:
    """First 12 hex digits of the sha256 of a task set (order and duplicates ignored).

    Pass `EvalReport.task_success.keys()`: two pass@1 values are comparable only when
    their task-set hashes are equal.
    """
    canonical = json.dumps(sorted(set(task_ids)))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def flatten_config(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """`section.field` -> value as MLflow param strings: strings as they are, everything else
    as JSON (so `--set key=value` with the logged value rebuilds the config). Values longer
    than MLflow's limit are cut with a note."""
    flat: dict[str, str] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            flat.update(flatten_config(value, prefix=f"{key}."))
        else:
            text = (
                value if isinstance(value, str) else json.dumps(to_jsonable_python(value), sort_keys=True)
            )  # models inside lists too
            flat[key] = truncate(text, MAX_PARAM_VAL_LENGTH)
    return flat


def truncate(text: str, limit: int) -> str:
    """`text` if it fits in `limit` characters, else its head and a note of the cut length."""
    if len(text) <= limit:
        return text
    note = f"...[truncated {len(text)} chars]"
    return text[: limit - len(note)] + note


def metric_key(name: str) -> str:
    """The name MLflow stores: unchanged when valid, else `@` -> `_at_` and other bad characters -> `_`."""
    return _INVALID_NAME_CHARS.sub("_", name.replace("@", "_at_"))


# --------------------------------------------------------------------------- store location


def tracking_uri(cfg: RunConfig) -> str:
    """The configured MLflow URI, or a SQLite store `<abs run_dir>/mlflow.db`."""
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    return f"sqlite:///{Path(cfg.storage.run_dir).resolve() / 'mlflow.db'}"


def artifact_location(cfg: RunConfig) -> str | None:
    """Where a new experiment keeps artifacts: `<run_dir>/mlartifacts`, or None for a server URI.

    (A server decides where its artifacts go.)"""
    if tracking_uri(cfg).startswith(_REMOTE_SCHEMES):
        return None
    return (Path(cfg.storage.run_dir).resolve() / "mlartifacts").as_uri()


def mlflow_client(cfg: RunConfig) -> MlflowClient:
    """A client on the run's store (the run directory is created so SQLite can open its file)."""
    if not cfg.tracking.mlflow_uri:
        Path(cfg.storage.run_dir).mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri(cfg))


def ensure_experiment(client: MlflowClient, name: str, location: str | None) -> str:
    """The id of experiment `name`, created at `location` when new (restored when deleted)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # created concurrently by another process
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# --------------------------------------------------------------------------- the run handle


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class Tracker:
    """One MLflow run of one Turnstile run; every method logs into it."""

    uri: str
    mlflow_run_id: str
    experiment_id: str

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri)

    @property
    def artifact_uri(self) -> str:
        return self.client.get_run(self.mlflow_run_id).info.artifact_uri

    @classmethod
    def start(cls, cfg: RunConfig, run_id: str) -> Tracker:
        """The MLflow run of Turnstile run `run_id` (found or created), running, with the config logged."""
        client = mlflow_client(cfg)
        experiment_id = ensure_experiment(client, cfg.tracking.experiment, artifact_location(cfg))
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        params = flatten_config(cfg)
        if found:  # a resumed run: params already logged keep their first value (MLflow params are write-once)
            mlflow_run_id = found[0].info.run_id
            client.update_run(mlflow_run_id, status="RUNNING")
            params = {k: v for k, v in params.items() if k not in found[0].data.params}
        else:
            tags = {RUN_ID_TAG: run_id, CONFIG_HASH_TAG: config_hash(cfg)}
            if runtime.flow_run.id:
                tags[FLOW_RUN_TAG] = runtime.flow_run.id
            mlflow_run_id = client.create_run(experiment_id, run_name=run_id, tags=tags).info.run_id
        tracker = cls(uri=tracking_uri(cfg), mlflow_run_id=mlflow_run_id, experiment_id=experiment_id)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params (re-logging an equal value is a no-op; a different one is rejected by MLflow)."""
        entries = [Param(key, value) for key, value in params.items()]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.mlflow_run_id, params=batch, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric at `step` (names kept unless MLflow rejects a character)."""
        now = int(time.time() * 1000)
        entries = [Metric(metric_key(name), float(value), now, step) for name, value in metrics.items()]
        for batch in _chunks(entries, METRICS_PER_BATCH):
            self.client.log_batch(self.mlflow_run_id, metrics=batch, synchronous=True)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Write JSON-able `data` to `artifact_file` (e.g. `validation/iteration-000001.json`)."""
        self.client.log_dict(self.mlflow_run_id, data, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or every file of a folder) into the run's artifacts under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.mlflow_run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.mlflow_run_id, str(path), artifact_path)

    def log_validation_report(self, report: Mapping[str, Any] | str | Path, iteration: int) -> str:
        """Store a validation report under `validation/`; returns its artifact path.

        A dict becomes `validation/iteration-000001.json`; a file keeps its name inside `validation/`.
        """
        if isinstance(report, Mapping):
            artifact = f"{VALIDATION_DIR}/iteration-{iteration:06d}.json"
            self.log_dict(dict(report), artifact)
            return artifact
        self.log_file(report, VALIDATION_DIR)
        return f"{VALIDATION_DIR}/{Path(report).name}"

    def end(self, status: RunEndStatus = "FINISHED") -> None:
        """Close the run with `status` (FINISHED, FAILED or KILLED)."""
        if status not in get_args(RunEndStatus):
            raise ValueError(f"run end status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.client.set_terminated(self.mlflow_run_id, status=status)

    def status(self) -> str:
        return self.client.get_run(self.mlflow_run_id).info.status


# --------------------------------------------------------------------------- Prefect tasks


_DETERMINISTIC_MLFLOW_ERRORS = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "BAD_REQUEST",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised `exc` can help (locked database, lost connection, 5xx)."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in _DETERMINISTIC_MLFLOW_ERRORS
    return not isinstance(exc, (PermanentError, ValueError, TypeError, KeyError, FileNotFoundError))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only failures `is_transient` accepts."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, BaseException) or is_transient(exc)


MLFLOW_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": [1, 2, 4],
    "retry_condition_fn": retry_if_transient,
}
"""Task options for every call to MLflow (tracking and registry)."""


@task(name="start-tracking", cache_policy=NONE, **MLFLOW_RETRIES)
def start_tracking(cfg: RunConfig, run_id: str) -> Tracker:
    tracker = Tracker.start(cfg, run_id)
    get_run_logger().info("MLflow run %s (%s) at %s", tracker.mlflow_run_id, run_id, tracker.uri)
    return tracker


@task(name="log-metrics", cache_policy=NONE, **MLFLOW_RETRIES)
def log_metrics_task(tracker: Tracker, metrics: Mapping[str, float], step: int) -> None:
    tracker.log_metrics(metrics, step)


@task(name="log-validation-report", cache_policy=NONE, **MLFLOW_RETRIES)
def log_validation_report_task(tracker: Tracker, report: Mapping[str, Any] | str | Path, iteration: int) -> str:
    return tracker.log_validation_report(report, iteration)


@task(name="end-tracking", cache_policy=NONE, **MLFLOW_RETRIES)
def end_tracking(tracker: Tracker, status: RunEndStatus = "FINISHED") -> None:
    tracker.end(status)
    get_run_logger().info("MLflow run %s ended %s", tracker.mlflow_run_id, status)
