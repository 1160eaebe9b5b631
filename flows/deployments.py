"""Turnstile's Prefect deployments, as deployments/prefect.yaml declares them, served two ways.

- **One machine** (`turnstile serve`): `served_deployments` builds each deployment of the file with
  `flow.to_deployment(...)` (same names, descriptions, tags, parameter defaults and schedules), and
  `serve` runs them in this process with Prefect's `Runner`, which is what `prefect.serve` does:
  no work pool, no worker. Flow runs start as `python -m prefect.engine` subprocesses in the
  current directory (the repository root, where `turnstile serve` works).
- **Many machines** (`turnstile serve --work-pool`, or `prefect deploy` by hand): `deploy_all`
  registers the file with `prefect deploy` on its process work pool (`ensure_work_pool` creates it),
  and `run_worker` runs Prefect's `ProcessWorker` for that pool in this process.

Either way a schedule that someone enabled stays enabled when the deployments are registered
again (the file registers the nightly schedule paused). This module imports prefect: set
PREFECT_HOME first (flows.environment.prepare_environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from prefect.client.orchestration import SyncPrefectClient
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Schedule

from flows.serving import ServeError, child_environment
from rl_core.paths import REPO_ROOT

PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


def load_prefect_file(prefect_file: Path = PREFECT_FILE) -> dict[str, Any]:
    """The parsed prefect.yaml; ServeError when it cannot be read or has no deployments."""
    try:
        config = yaml.safe_load(Path(prefect_file).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ServeError(f"cannot read {prefect_file}: {exc}") from exc
    if not isinstance(config, dict) or not config.get("deployments"):
        raise ServeError(f"{prefect_file} lists no deployments")
    return config


def work_pool_name(config: Mapping[str, Any]) -> str:
    """The one work pool every deployment of a prefect.yaml uses (ServeError otherwise)."""
    pools = {(d.get("work_pool") or {}).get("name") for d in config["deployments"]}
    if len(pools) != 1 or None in pools:
        raise ServeError(f"the deployments must share one named work pool; found {sorted(map(str, pools))}")
    return pools.pop()


def present_deployments(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The deployments of a prefect.yaml whose entrypoint file exists (a warning on stderr for each other).

    ServeError when none exists."""
    present = []
    for deployment in config["deployments"]:
        entrypoint_file = REPO_ROOT / str(deployment.get("entrypoint", "")).split(":")[0]
        if entrypoint_file.is_file():
            present.append(deployment)
        else:
            print(
                f"turnstile serve: skipping deployment {deployment.get('name')!r}: {entrypoint_file} does not exist",
                file=sys.stderr,
            )
    if not present:
        raise ServeError(f"none of the entrypoints of the prefect.yaml exist under {REPO_ROOT}")
    return present


def _settings_model(flow: Any) -> type | None:
    """The RunSettings subclass of the flow's `settings` parameter (None when it has none)."""
    from flows.parameters import RunSettings

    try:
        model = typing.get_type_hints(flow.fn).get("settings")
    except (NameError, TypeError):
        return None
    return model if isinstance(model, type) and issubclass(model, RunSettings) else None


def form_parameters(flow: Any, parameters: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A deployment's parameters with its `settings` filled in: every typed field at the value of the config the
    deployment is served on (its `settings.config_path`, the shipped quickstart by default; read with its
    `settings.overrides`), so that the Custom run form starts at what would run. Fields the prefect.yaml gives
    stay as given. Flows whose settings are no RunSettings get `parameters` as they are. ServeError when the
    config cannot be read."""
    model = _settings_model(flow)
    given = dict(parameters or {})
    if model is None:
        return given or None
    settings = dict(given.get("settings") or {})
    try:
        full = model.deployment_parameters(settings.get("config_path"), settings.get("overrides"))
    except (OSError, ValueError) as exc:
        raise ServeError(f"cannot read the config of the {flow.name} deployment's settings: {exc}") from exc
    return {**given, "settings": {**full, **settings}}


def schedule_line(schedules: list[tuple[str, bool]]) -> str | None:
    """The first line of a scheduled deployment's description: its schedules' state, so that the Deployments page
    shows a paused schedule without hovering. `schedules`: (cron text, active) pairs; None when there are none."""
    if not schedules:
        return None
    paused = [cron for cron, active in schedules if not active]
    if paused:
        return (
            f"Schedule PAUSED ({', '.join(paused)}): no run starts until its toggle under Schedules on this "
            "deployment's page is switched on (state when `turnstile serve` registered it)."
        )
    return f"Schedule ON ({', '.join(cron for cron, _ in schedules)}) (state when `turnstile serve` registered it)."


def _described(description: str | None, schedules: list[tuple[str, bool]]) -> str | None:
    line = schedule_line(schedules)
    return "\n\n".join(part for part in (line, description) if part) or None


def _cron_text(entry: Mapping[str, Any]) -> str:
    text = entry.get("cron") or entry.get("rrule") or f"every {entry.get('interval')} s"
    return f"{text} {entry.get('timezone', '')}".strip()


# --------------------------------------------------------------------------- one machine: Runner


def _schedule(entry: Mapping[str, Any], enabled_now: bool | None) -> Schedule:
    """A prefect.yaml schedule entry (cron/interval/rrule, timezone, slug, active, parameters) as a
    `prefect.schedules.Schedule`; `enabled_now` (the server's state of that slug) wins over `active`."""
    fields = {key: value for key, value in entry.items() if key not in ("active", "replaces")}
    active = entry.get("active", True) if enabled_now is None else enabled_now
    try:
        return Schedule(**fields, active=active)
    except (TypeError, ValueError) as exc:
        raise ServeError(f"bad schedule {dict(entry)}: {exc}") from exc


def _enabled_by_slug(client: SyncPrefectClient, full_name: str) -> dict[str, bool]:
    """{slug: active} of the registered deployment `flow/deployment`'s schedules ({} when none is registered)."""
    from prefect.exceptions import ObjectNotFound

    try:
        deployment = client.read_deployment_by_name(full_name)
    except ObjectNotFound:
        return {}
    return {s.slug: s.active for s in deployment.schedules if s.slug}


def _load_flow(entrypoint: str) -> Any:
    """The flow at `entrypoint` ("flows/train.py:train_flow"); ServeError when its file fails to import."""
    try:  # no placeholder flow: a flow file that fails to import is an error, shown as it is
        return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    except Exception as exc:
        raise ServeError(f"cannot load the flow {entrypoint}: {exc!r}") from exc


def served_deployments(api_url: str, prefect_file: Path = PREFECT_FILE) -> list[RunnerDeployment]:
    """The deployments of `prefect_file` (those whose entrypoint exists), ready for `serve`.

    Each is `flow.to_deployment(...)` of the flow at its entrypoint, with the file's name,
    description (after a first line saying whether its schedule is paused), tags, parameters (the
    settings filled in from the config: `form_parameters`), version, enforce_parameter_schema and
    schedules. The work pool
    is left out (the Runner runs them). A schedule whose slug is registered already keeps its
    current on/off state; a new one starts as the file says (`active: false`: paused). Must be
    called from the repository root (entrypoints are relative to it). ServeError on a bad file."""
    out = []
    with SyncPrefectClient(api_url) as client:
        for entry in present_deployments(load_prefect_file(prefect_file)):
            flow = _load_flow(entry["entrypoint"])
            enabled = _enabled_by_slug(client, f"{flow.name}/{entry['name']}")
            schedules = [_schedule(s, enabled.get(s.get("slug"))) for s in entry.get("schedules") or []]
            options = {k: entry[k] for k in ("version", "enforce_parameter_schema") if k in entry}
            entries = entry.get("schedules") or []
            states = [(_cron_text(s), bool(schedule.active)) for s, schedule in zip(entries, schedules)]
            out.append(
                flow.to_deployment(
                    name=entry["name"],
                    description=_described(entry.get("description"), states),
                    tags=entry.get("tags"),
                    parameters=form_parameters(flow, entry.get("parameters")),
                    schedules=schedules or None,
                    **options,
                )
            )
    return out


def serve(
    deployments: list[RunnerDeployment],
    limit: int | None = None,
    on_ready: Callable[[list[UUID]], None] = lambda ids: None,
) -> None:
    """Register `deployments` and run their flow runs here until SIGTERM or Ctrl-C; then return.

    Prefect's `Runner` (the body of `prefect.serve`): schedules stay as they are on shutdown
    (`pause_on_shutdown=False`), `limit` flow runs at most at once (None: no limit). On SIGTERM the
    Runner cancels its flow runs (they end Cancelled, "Runner is shutting down.") and stops; on
    Ctrl-C it kills them. `on_ready(ids)` is called with the deployments' ids once all are registered."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    runner = Runner(name="turnstile", pause_on_shutdown=False, limit=limit)
    on_ready([runner.add_deployment(deployment) for deployment in deployments])
    with contextlib.suppress(KeyboardInterrupt, TerminationSignal):
        asyncio.run(runner.start())


# --------------------------------------------------------------------------- many machines: work pool


def ensure_work_pool(api_url: str, pool: str) -> bool:
    """Create process work pool `pool` unless it exists; returns whether it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api_url) as client:
        try:
            client.read_work_pool(pool)
            return False
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type, base_job_template=template))
        except ObjectAlreadyExists:
            return False
    return True


def _enabled_schedules(client: SyncPrefectClient, pool: str) -> set[tuple[Any, str]]:
    """(deployment id, schedule slug) of every enabled, slugged schedule of the pool's deployments."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    deployments = client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    return {(d.id, s.slug) for d in deployments for s in d.schedules if s.slug and s.active}


def _reenable(client: SyncPrefectClient, enabled_before: set[tuple[Any, str]]) -> None:
    for deployment_id, slug in enabled_before:
        for schedule in client.read_deployment_schedules(deployment_id):
            if schedule.slug == slug and not schedule.active:
                client.update_deployment_schedule(deployment_id, schedule.id, active=True)


def _filled_entry(client: SyncPrefectClient, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A prefect.yaml deployment entry as `deploy_all` registers it: parameters filled in (`form_parameters`), the
    schedules' state as the description's first line (a schedule registered already keeps its state)."""
    flow = _load_flow(entry["entrypoint"])
    enabled = _enabled_by_slug(client, f"{flow.name}/{entry['name']}")
    states = [(_cron_text(s), enabled.get(s.get("slug"), s.get("active", True))) for s in entry.get("schedules") or []]
    filled = {**entry, "description": _described(entry.get("description"), states)}
    parameters = form_parameters(flow, entry.get("parameters"))
    return {**filled, "parameters": parameters} if parameters else filled


def deploy_all(api_url: str, prefect_file: Path = PREFECT_FILE, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Register every deployment of `prefect_file` whose entrypoint file exists, on its work pool.

    Runs `prefect --no-prompt deploy --all` from the repository root; schedules enabled before
    stay enabled (`prefect deploy` would apply `active: false` again). Returns the registered
    deployments as read back from the API, by full name (`turnstile-train/nightly`). The registered
    entries are `_filled_entry`'s (parameters and description filled in). ServeError
    when the command fails or a deployment is missing afterwards."""
    config = load_prefect_file(prefect_file)
    pool = work_pool_name(config)
    present = present_deployments(config)
    with SyncPrefectClient(api_url) as client:
        enabled_before = _enabled_schedules(client, pool)
        filled = [_filled_entry(client, entry) for entry in present]
    # A filtered copy rather than `--name`: Prefect matches `--name flow/deployment` against the
    # entrypoint's function name (train_flow), not the flow's name (turnstile-train).
    with tempfile.TemporaryDirectory(prefix="turnstile-deploy-") as scratch:
        deployable = Path(scratch) / "prefect.yaml"
        deployable.write_text(yaml.safe_dump({**config, "deployments": filled}, sort_keys=False))
        command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(deployable)]
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=child_environment(api_url, env), capture_output=True, text=True
        )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise ServeError(f"`prefect deploy` failed (exit code {result.returncode}):\n{output}")

    wanted = {(d["entrypoint"], d["name"]) for d in present}
    with SyncPrefectClient(api_url) as client:
        _reenable(client, enabled_before)
        found = [d for d in client.read_deployments() if (d.entrypoint, d.name) in wanted]
        flow_names = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
    missing = wanted - {(d.entrypoint, d.name) for d in found}
    if missing:
        raise ServeError(f"`prefect deploy` did not register {sorted(missing)}; its output:\n{result.stdout[-3000:]}")
    return {f"{flow_names[d.flow_id]}/{d.name}": d for d in found}


def run_worker(pool: str, limit: int | None = None) -> None:
    """Run Prefect's process worker for `pool` in this process until SIGTERM or Ctrl-C; then return.

    What `prefect worker start --pool POOL --type process` runs. Stopping it cancels the worker,
    whose flow runs (subprocesses) are then terminated, and killed if they outlive the grace period."""
    from prefect.workers.process import ProcessWorker

    async def work() -> None:
        main = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await ProcessWorker(work_pool_name=pool, limit=limit).start()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(work())
