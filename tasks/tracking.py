"""Tracking stage: MLflow glue and the Prefect tasks that log a training run.

Contract:
- The store is `cfg.tracking.mlflow_uri`, or by default a SQLite file `<run_dir>/mlflow.db`
  whose experiments keep their artifacts in `<run_dir>/mlartifacts` (a local folder; a
  server URI leaves artifact storage to the server).
- One MLflow run per Turnstile run: `Tracker.start(cfg, run_id)` finds the MLflow run tagged
  with that `turnstile.run_id` or creates it (named `run_id`), so a retried or resumed start
  never makes a second one. It logs the whole config as flattened params (`rollout.group_size`).
- Metric names are kept as given (`rollout/reward/mean`, `val/pass_at_k/4`); only characters
  MLflow rejects are replaced (`@` -> `_at_`, others -> `_`). Values are stored as a person reads
  them (`readable_value`: 0.3333 rather than 0.3333333333333333, which MLflow's UI prints as stored);
  the exact values stay in the run folder (iteration records, `evaluations/*.json`).
- `Tracker` is a frozen (URI, ids) record, picklable, so Prefect tasks can take it; each call
  talks to MLflow through `MlflowClient` with an explicit run id (never the fluent API, whose
  active run is per thread and breaks under Prefect's thread pool).
- Tasks that talk to MLflow retry transient failures 3 times (1, 2, 4 s); a rejected request
  (bad value, missing entity) or a Turnstile refusal (`PermanentError`) fails at once (`retry_if_transient`).

What a person sees in the MLflow UI (3.17)
------------------------------------------
- The run's description (`mlflow.note.content`, markdown, on its Overview) says what the run is
  and links to its Prefect flow run from the start (`start_description`); at the end it states
  the outcome: held-out pass@1 before and after, the gate's decision and the champion
  (`run_description`, set by `describe_run_task` from the flow's summary).
- The UI's own chart layout cannot be set from outside: it makes one section per metric-name
  prefix (everything before the last `/`), sorts the sections alphabetically (so `analysis/...`
  comes first and `val/pass_at_1` last), titles each chart with the part after the last `/`
  ("mean", "4"), shows no metric columns in the runs list, and keeps a person's changes in the
  browser. What it does read from the store is a *view* saved on the experiment (an experiment
  tag `mlflow.sharedViewState.<id>`, what its Views / Share buttons write). `Tracker.start`
  writes one, "Turnstile: held-out pass@1 first" (`charts_view_state`, `saved_view`): the
  held-out evaluation's charts first, then the training batch, the learner and the analysis,
  and pass@1, gate pass@1 and mean reward as columns of the runs list. `charts_view_url` is its
  address (`.../#/experiments/<id>/runs?compareRunsMode=CHART&viewStateShareKey=turnstile`); the
  runs page also lists it under "Views". (That page titles charts by the whole metric name; the
  run page's "Model metrics" tab keeps MLflow's own layout and titles, and cannot be set.)
- The metric names stay the ones README promises (`rollout/reward/mean`, `val/pass_at_k/4`).
"""

from __future__ import annotations

import hashlib
import json
import math
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
from tasks.links import mlflow_ui_url, prefect_flow_run_url

RUN_ID_TAG = "turnstile.run_id"
CONFIG_HASH_TAG = "turnstile.config_hash"
FLOW_RUN_TAG = "prefect.flow_run_id"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # an experiment tag holding a saved view of the runs page
VIEW_ID = "turnstile"  # the id of the view Turnstile saves (`charts_view_state`)
VIEW_NAME = "Turnstile: held-out pass@1 first"  # its name in the runs page's "Views" list
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


METRIC_DECIMALS = 4
"""Decimal places of a logged metric value of size 1 or more; significant digits of a smaller one."""


def readable_value(value: float) -> float:
    """`value` rounded for MLflow's UI, which prints stored values in full: 4 significant digits below 1 in
    size (1/3 -> 0.3333, a KL of 1.23456e-05 -> 1.235e-05, never 0), 4 decimal places from 1 on
    (43.7333333 -> 43.7333, 12345 stays 12345). NaN and infinities pass unchanged."""
    value = float(value)
    if not math.isfinite(value) or value == 0:
        return value
    if abs(value) < 1:
        return float(f"{value:.{METRIC_DECIMALS}g}")
    return round(value, METRIC_DECIMALS)


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
            if runtime.flow_run.id:  # the flow run now working on it, as the run description will link it
                client.set_tag(mlflow_run_id, FLOW_RUN_TAG, runtime.flow_run.id)
            params = {k: v for k, v in params.items() if k not in found[0].data.params}
        else:
            tags = {RUN_ID_TAG: run_id, CONFIG_HASH_TAG: config_hash(cfg)}
            if runtime.flow_run.id:
                tags[FLOW_RUN_TAG] = runtime.flow_run.id
            tags[DESCRIPTION_TAG] = start_description(run_id, runtime.flow_run.id)
            mlflow_run_id = client.create_run(experiment_id, run_name=run_id, tags=tags).info.run_id
        client.set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_ID, saved_view(charts_view_state(cfg)))
        tracker = cls(uri=tracking_uri(cfg), mlflow_run_id=mlflow_run_id, experiment_id=experiment_id)
        tracker.log_params(params)
        return tracker

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params (re-logging an equal value is a no-op; a different one is rejected by MLflow)."""
        entries = [Param(key, value) for key, value in params.items()]
        for batch in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.mlflow_run_id, params=batch, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric at `step` (names kept unless MLflow rejects a character; values as `readable_value`)."""
        now = int(time.time() * 1000)
        entries = [Metric(metric_key(name), readable_value(value), now, step) for name, value in metrics.items()]
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


# --------------------------------------------------------------------------- what the MLflow UI shows


def _prefect_line(flow_run_id: str | None) -> str:
    """Where the run's Prefect flow run is, as a markdown line."""
    url = prefect_flow_run_url(flow_run_id)
    if url:
        return f"**Prefect flow run:** [{flow_run_id}]({url})"
    if flow_run_id:
        return (
            f"**Prefect flow run:** `{flow_run_id}`, on Prefect's temporary server, which stopped with the "
            "process (start `prefect server start` and set `PREFECT_API_URL` to keep flow runs to look at)"
        )
    return "**Prefect flow run:** none (run outside Prefect)"


def start_description(run_id: str, flow_run_id: str | None) -> str:
    """The MLflow run's description while it runs (markdown): what it is and where its flow run is."""
    return f"Turnstile training run `{run_id}`: running.\n\n{_prefect_line(flow_run_id)}\n"


def run_description(summary: Mapping[str, Any], charts_url: str | None = None) -> str:
    """The MLflow run's description at its end (markdown), from the train flow's summary dict: first where
    to look (the Prefect flow run, the charts view at `charts_url`), then the outcome, then the gate's reasons
    (the UI shows the first lines and folds the rest under "Show more").

    Uses `run_id`, `pass_at_1_before` / `pass_at_1_after`, `optimizer_steps`, `gate` (`GateDecision.as_dict()`
    or None), `no_candidate`, `candidate_version` / `candidate_step`, `registered_model`,
    `champion_version`, `stopped` and `prefect_flow_run_id`; missing keys are left out."""
    head = f"Turnstile training run `{summary.get('run_id')}`: finished."
    if charts_url:
        head += f" [Charts, held-out pass@1 first]({charts_url})."
    lines = [head, _prefect_line(summary.get("prefect_flow_run_id"))]
    before, after = summary.get("pass_at_1_before"), summary.get("pass_at_1_after")
    if before is not None and after is not None:
        steps = summary.get("optimizer_steps")
        lines.append(
            f"**Held-out pass@1 (greedy):** {before:.3f} at step 0 → {after:.3f}"
            + (f" at step {steps}" if steps is not None else "")
        )
    gate = summary.get("gate")
    if gate:
        version = summary.get("candidate_version")
        what = f"version {version} (step {summary.get('candidate_step')})" if version else "the candidate"
        score = gate.get("baseline_pass_at_1")
        against = (gate.get("baseline") or "nothing") + ("" if score is None else f" {score:.3f}")
        lines.append(
            f"**Gate:** {what} **{gate.get('outcome')}**: gate pass@1 {gate.get('candidate_pass_at_1', 0):.3f} "
            f"against {against}"
        )
    elif "gate" in summary:
        lines.append(f"**Gate:** no candidate ({summary.get('no_candidate') or 'nothing evaluated after step 0'})")
    if "champion_version" in summary:
        model, champion = summary.get("registered_model", "the registered model"), summary.get("champion_version")
        lines.append(f"**Champion:** {model} version {champion}" if champion else f"**Champion:** none yet ({model})")
    if summary.get("stopped"):
        lines.append(f"**Stopped by the training doctor:** {summary['stopped']}")
    text = "  \n".join(lines) + "\n"
    reasons = (gate or {}).get("reasons") or []
    if reasons:
        text += "\nThe gate's reasons:\n\n" + "\n".join(f"- {reason}" for reason in reasons) + "\n"
    return text + "\nCurves: Artifacts, `curves/`. Gate record: the registered model version's description and tags.\n"


_VIEW_SECTIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "Held-out evaluation (val/)",
        (
            ("val/pass_at_1", "held-out pass@1 (greedy)"),
            ("val/gate/pass_at_1", "gate tasks: pass@1"),
            ("val/selection/pass_at_1", "selection tasks: pass@1"),
            ("val/reward_mean", "held-out mean reward"),
            ("val/truncated_frac", "held-out truncated share"),
        ),
    ),
    (
        "Training batch (rollout/)",
        (
            ("rollout/reward/mean", "batch reward: mean"),
            ("rollout/success/mean", "batch success rate"),
            ("rollout/reward/zero_frac", "batch share of zero reward"),
            ("rollout/finish/token_cap", "ended at the token cap"),
            ("rollout/finish/max_turns", "ended at max_turns"),
            ("rollout/turns/mean", "turns per episode: mean"),
            ("rollout/tokens/response_mean", "response tokens per episode: mean"),
            ("rollout/tool_parse_errors", "tool calls that did not parse, per episode"),
        ),
    ),
    (
        "Learner (train/)",
        (
            ("train/loss", "loss"),
            ("train/clip_fraction", "clip fraction"),
            ("train/approx_kl", "approx. KL"),
            ("train/entropy", "entropy"),
            ("train/grad_norm", "gradient norm"),
        ),
    ),
    (
        "Analysis (analysis/)",
        (
            ("analysis/zero_variance_groups", "zero-variance groups: share"),
            ("analysis/zero_variance_groups/all_correct", "zero-variance groups: all correct"),
            ("analysis/zero_variance_groups/all_wrong", "zero-variance groups: all wrong"),
        ),
    ),
)
"""The saved view's sections in order: (section title, ((metric, chart title), ...))."""

VIEW_COLUMNS = ("val/pass_at_1", "val/gate/pass_at_1", "rollout/reward/mean")
"""The metrics the saved view shows as columns of the runs list."""


def charts_view_state(cfg: RunConfig) -> dict[str, Any]:
    """The runs-page view Turnstile saves on its experiment (MLflow's ExperimentPageUIState, as its Share
    button serialises it): sections in the order of `_VIEW_SECTIONS` plus pass@k / pass^k at each
    `evaluation.pass_k`, empty charts hidden, and `VIEW_COLUMNS` as columns. Each chart also carries a title in
    words (`displayName`), which MLflow 3.17's runs page does not show: it titles charts by the metric's name.
    Metrics not named here keep MLflow's own sections after these."""
    sections = [(title, list(charts)) for title, charts in _VIEW_SECTIONS]
    ks = sorted(set(cfg.evaluation.pass_k))
    sections[0][1].extend(
        [(f"val/pass_at_k/{k}", f"pass@{k} (sampled)") for k in ks]
        + [(f"val/pass_hat_k/{k}", f"pass^{k}: all {k} samples succeed") for k in ks]
    )
    section_configs, charts = [], []
    for number, (title, metrics) in enumerate(sections):
        section_id = f"turnstile-section-{number}"
        section_configs.append(
            {
                "uuid": section_id,
                "name": title,
                "display": True,
                "isReordered": True,
                "deleted": False,
                "isGenerated": False,
            }
        )
        for metric, chart_title in metrics:
            charts.append(
                {
                    "uuid": f"turnstile-chart-{metric_key(metric).replace('/', '-')}",
                    "type": "LINE",
                    "runsCountToCompare": 10,
                    "metricSectionId": section_id,
                    "deleted": False,
                    "isGenerated": False,
                    "displayName": chart_title,
                    "metricKey": metric_key(metric),
                    "selectedMetricKeys": [metric_key(metric)],
                    "lineSmoothness": 0,
                    "scaleType": "linear",
                    "xAxisScaleType": "linear",
                    "xAxisKey": "step",
                    "selectedXAxisMetricKey": "",
                }
            )
    return {
        "selectedColumns": [f"metrics.`{metric_key(m)}`" for m in VIEW_COLUMNS],
        "compareRunCharts": charts,
        "compareRunSections": section_configs,
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }


def saved_view(state: Mapping[str, Any], name: str = VIEW_NAME) -> str:
    """The experiment-tag value of a saved view: MLflow's envelope {name, createdAt, updatedAt, state} with the
    view state as JSON text, so the view is listed by `name` under the runs page's "Views" and opens from
    `charts_view_url`."""
    now = int(time.time() * 1000)
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def charts_view_url(mlflow_ui: str, experiment_id: str) -> str:
    """The address of Turnstile's saved view of the experiment's runs (charts shown) in the MLflow UI at
    `mlflow_ui` (its base address, e.g. `tasks.links.mlflow_ui_url(cfg)`)."""
    query = f"compareRunsMode=CHART&viewStateShareKey={VIEW_ID}"
    return f"{mlflow_ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


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


@task(name="describe-mlflow-run", cache_policy=NONE, **MLFLOW_RETRIES)
def describe_run_task(tracker: Tracker, summary: Mapping[str, Any], cfg: RunConfig) -> str:
    """Set the MLflow run's description (`run_description` of the train flow's summary dict, with the
    address of the charts view); returns the markdown."""
    text = run_description(summary, charts_view_url(mlflow_ui_url(cfg), tracker.experiment_id))
    tracker.client.set_tag(tracker.mlflow_run_id, DESCRIPTION_TAG, text)
    return text
