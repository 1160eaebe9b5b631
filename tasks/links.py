"""Addresses of the pages a person opens in the MLflow and Prefect UIs, so that each side links to the other.

MLflow's UI addresses its pages by fragment (`#/experiments/<id>/runs/<run id>`); the UI's base
address is `tracking.ui_url`, else the tracking URI when it is an http(s) server, else what
`mlflow ui` serves by default (http://127.0.0.1:5000). Prefect's UI address comes from Prefect's
own setting (`PREFECT_UI_URL`, derived from `PREFECT_API_URL`); a flow run on the temporary server
that Prefect starts when none is configured has no UI a person can open, so it gets no link.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from rl_core.config import RunConfig

DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` (and `mlflow server`) listen unless told otherwise."""


def mlflow_ui_url(cfg: RunConfig) -> str:
    """Base address of the MLflow UI for the run's store, without a trailing slash."""
    if cfg.tracking.ui_url:
        return cfg.tracking.ui_url.rstrip("/")
    uri = cfg.tracking.mlflow_uri or ""
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_MLFLOW_UI


def mlflow_runs_url(cfg: RunConfig, experiment_id: str) -> str:
    """The experiment's runs list (the "Model training" view, with the metric charts)."""
    return f"{mlflow_ui_url(cfg)}/#/experiments/{experiment_id}/runs"


def mlflow_run_url(cfg: RunConfig, experiment_id: str, mlflow_run_id: str) -> str:
    """One MLflow run's page."""
    return f"{mlflow_ui_url(cfg)}/#/experiments/{experiment_id}/runs/{mlflow_run_id}"


def mlflow_traces_url(cfg: RunConfig, experiment_id: str) -> str:
    """The experiment's traces (the logged episodes)."""
    return f"{mlflow_ui_url(cfg)}/#/experiments/{experiment_id}/traces"


def mlflow_model_version_url(cfg: RunConfig, name: str, version: int | str) -> str:
    """One registered model version's page."""
    return f"{mlflow_ui_url(cfg)}/#/models/{quote(name, safe='')}/versions/{version}"


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The Prefect UI page of a flow run (`<PREFECT_UI_URL>/runs/flow-run/<id>`, the address Prefect's own
    `url_for` gives and its UI serves), or None with no flow run or no UI a person can reach.

    Uses `PREFECT_UI_URL` (Prefect derives it from `PREFECT_API_URL`); None on the temporary
    server Prefect starts when no API URL is set, which stops with the process."""
    if not flow_run_id:
        return None
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.urls import url_for

    if not PREFECT_API_URL.value():
        return None
    return url_for("flow-run", obj_id=str(flow_run_id))


def current_flow_run_url() -> str | None:
    """The Prefect UI page of the flow run this code runs in (None outside a flow run or without a UI)."""
    from prefect.runtime import flow_run

    return prefect_flow_run_url(flow_run.get_id())


def flow_run_parameter(name: str) -> Any:
    """The parameter `name` of the flow run this code runs in (None outside one, or when it has none):
    what a flow's `flow_run_name` callable, which Prefect calls with no arguments, names the run after."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return (context.parameters or {}).get(name) if context else None


def name_flow_run(name: str) -> None:
    """Rename the flow run this code runs in to `name` (no-op outside a flow run or when it is so named):
    for a flow whose run's name (a Turnstile run id) is known only once its body has started."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.name == name:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(context.flow_run.id, name)
    context.flow_run.name = name
