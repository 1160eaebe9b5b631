"""`turnstile serve`: the Prefect server and Turnstile's deployments on this machine.

    turnstile serve [--host 127.0.0.1] [--port 4200] [--run-dir runs] [--limit N] [--work-pool]

1. Starts Prefect's API server and UI on HOST:PORT (flows/serving.py: Prefect's own subprocess
   server), unless PREFECT_API_URL is set (then that server is used and left alone).
2. Builds the deployments of deployments/prefect.yaml and serves them here with Prefect's
   `Runner` (flows/deployments.py): no work pool, no worker. The nightly train schedule is
   created paused and stays as someone last set it.
   With `--work-pool`: registers the file on its process work pool instead (`prefect deploy`)
   and runs a process worker for that pool here: the many-machines setup of
   deployments/README.md, on one machine.
3. Prints where the UI is and how to enable the schedule and start runs ("Turnstile is served."),
   and runs until Ctrl-C or SIGTERM (exit code 0); flow runs still in progress are stopped, then
   the server. A failed step exits 1.

Prefect's state (its database, the server log) stays under `<run-dir>/prefect` unless
PREFECT_HOME is set, as for `turnstile train`. `enter_repo_root` is the pull step of
deployments/prefect.yaml. This module imports prefect only once PREFECT_HOME is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flows.environment import prepare_environment
from rl_core.paths import REPO_ROOT

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"


class Stopped(Exception):
    """SIGTERM arrived before Prefect's own handling of it took over."""


def enter_repo_root() -> dict[str, str]:
    """Prefect pull step: work in the Turnstile checkout this Python environment runs from.

    Entrypoints (`flows/train.py:train_flow`) and relative paths in parameters then resolve
    against that checkout, wherever it was cloned on the machine that runs the flow.
    Returns `{"directory": <the checkout>}` (what Prefect's `set_working_directory` returns)."""
    from prefect.deployments.steps import set_working_directory

    return set_working_directory(str(REPO_ROOT))


def describe(api_url: str, deployments: Mapping[str, Any], pool: str | None, own_server: Path | None) -> str:
    """What a person needs once everything runs: the UI, the deployments, how to schedule and trigger runs.

    `deployments`: registered deployments (Prefect `DeploymentResponse`) by full name; `pool`:
    their work pool (None when served by the Runner); `own_server`: the log of the server
    `serve` started (None when PREFECT_API_URL named one)."""
    from flows.serving import ui_url_for

    env = f"PREFECT_API_URL={api_url}"
    prefect = Path(sys.executable).with_name("prefect")
    where = f"on work pool {pool!r}" if pool else "served here"
    lines = ["", f"Turnstile is served. Prefect UI: {ui_url_for(api_url)}", "", f"Deployments ({where}):"]
    resume = []
    for full_name, deployment in sorted(deployments.items()):
        schedules = [
            f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', '')} "
            f"({'on' if s.active else 'PAUSED'})"
            for s in deployment.schedules
        ]
        lines.append(f"  {full_name}" + (f"   schedule: {', '.join(schedules)}" if schedules else ""))
        resume += [
            f"  {env} {prefect} deployment schedule resume {full_name} {s.id}"
            for s in deployment.schedules
            if not s.active
        ]
    if resume:
        lines += [
            "",
            "Enable a paused schedule in the UI (Deployments > the deployment > the schedule's toggle), or:",
            *resume,
        ]
    lines += [
        "",
        "Start a training run in the UI (Deployments > train-now > Run > Custom run: the settings form, starting",
        "at the config's values; run_id empty: a generated name), or (fields left out take the config's values):",
        f"  {env} {prefect} deployment run 'turnstile-train/train-now' -p 'settings={{\"iterations\": "
        f'5, "run_id": "try-1"}}\'',
        "",
        f"Prefect's state: {os.environ.get('PREFECT_HOME', '~/.prefect')}"
        + (f" (server log: {own_server})" if own_server else ""),
        "Ctrl-C stops the flow runs in progress"
        + (" and the server." if own_server else " (the server at PREFECT_API_URL keeps running)."),
    ]
    return "\n".join(lines)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; dispatch it to `run_serve_command(args)`."""
    sub = subparsers.add_parser("serve", help="run the Prefect server and Turnstile's deployments on this machine")
    sub.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address the Prefect server listens on (default {DEFAULT_HOST})"
    )
    sub.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port of the Prefect server and UI (default {DEFAULT_PORT})"
    )
    sub.add_argument(
        "--run-dir",
        default="runs",
        help="runtime output folder; Prefect's state goes to <run-dir>/prefect unless PREFECT_HOME is "
        "set (default: runs)",
    )
    sub.add_argument(
        "--prefect-file",
        default=str(DEFAULT_PREFECT_FILE),
        help="deployments to serve (default: deployments/prefect.yaml)",
    )
    sub.add_argument(
        "--limit", type=int, default=None, help="most flow runs at once on this machine (default: no limit)"
    )
    sub.add_argument(
        "--work-pool",
        action="store_true",
        help="register the deployments on the file's process work pool (`prefect deploy`) and run a worker "
        "for it here, as on each machine of a many-machines setup (deployments/README.md)",
    )
    return sub


@contextlib.contextmanager
def _sigterm_raises_stopped() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _read_back(api_url: str, deployment_ids: list[Any]) -> dict[str, Any]:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        found = [client.read_deployment(i) for i in deployment_ids]
        return {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in found}


def _serve(args: argparse.Namespace, api_url: str, own_server: Path | None) -> None:
    """Register and run the deployments against `api_url` until SIGTERM or Ctrl-C."""
    from flows import deployments as served

    prefect_file = Path(args.prefect_file)
    if args.work_pool:
        pool = served.work_pool_name(served.load_prefect_file(prefect_file))
        if served.ensure_work_pool(api_url, pool):
            print(f"turnstile serve: created the process work pool {pool!r}", flush=True)
        print(f"turnstile serve: registering the deployments of {prefect_file} on {pool!r} ...", flush=True)
        registered = served.deploy_all(api_url, prefect_file)
        print(describe(api_url, registered, pool, own_server), flush=True)
        served.run_worker(pool, limit=args.limit)
        return
    print(f"turnstile serve: serving the deployments of {prefect_file} ...", flush=True)
    deployments = served.served_deployments(api_url, prefect_file)

    def ready(deployment_ids: list[Any]) -> None:
        print(describe(api_url, _read_back(api_url, deployment_ids), None, own_server), flush=True)

    served.serve(deployments, limit=args.limit, on_ready=ready)


def run_serve_command(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM (exit code 0) or until a step fails (1)."""
    from rl_core.config import RunConfig, StorageConfig

    prepare_environment(RunConfig(storage=StorageConfig(run_dir=args.run_dir)))
    os.chdir(REPO_ROOT)  # entrypoints, and relative paths in parameters, are relative to the checkout
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serving import ServeError, api_url_for, start_server

    external_api = os.environ.get("PREFECT_API_URL")
    server = None
    try:
        with _sigterm_raises_stopped():
            if not external_api:
                print(f"turnstile serve: starting the Prefect server on {args.host}:{args.port} ...", flush=True)
                home = Path(os.environ["PREFECT_HOME"])
                server = start_server(args.host, args.port, home / "server.log")
            api_url = external_api or api_url_for(args.host, server.port)
            os.environ["PREFECT_API_URL"] = api_url  # for the flow runs' subprocesses
            with temporary_settings({PREFECT_API_URL: api_url}):
                _serve(args, api_url, server.log if server else None)
        print("\nturnstile serve: stopped", flush=True)
        return 0
    except (KeyboardInterrupt, Stopped):
        print("\nturnstile serve: stopping", flush=True)
        return 0
    except ServeError as err:
        print(f"turnstile serve: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:  # with Ctrl-C and SIGTERM ignored, so that a second one cannot cut this short
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                server.stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.serve [options]`: the same as `turnstile serve [options]`."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return run_serve_command(parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
