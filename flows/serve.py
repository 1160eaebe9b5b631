"""`turnstile serve`: the Prefect server, Turnstile's deployments and a worker on one machine.

    turnstile serve [--host 127.0.0.1] [--port 4200] [--run-dir runs] [--limit N]

1. Starts `prefect server start --host HOST --port PORT` as a child process, unless
   PREFECT_API_URL is set (then that server is used and left alone), and waits until it is healthy.
2. Creates the process work pool named in deployments/prefect.yaml when it is missing.
3. Registers every deployment of deployments/prefect.yaml (`prefect --no-prompt deploy --all`,
   run from the repository root). A deployment whose entrypoint file is missing is skipped with
   a warning. Schedules that were enabled before stay enabled (the file registers the nightly
   schedule paused, and re-registering would pause it again).
4. Starts a worker for the pool, prints where the UI is and how to enable the nightly schedule
   and trigger runs, and keeps running until Ctrl-C or SIGTERM (exit code 0), or until a child
   dies (1); then it stops the worker's flow runs (they end as Crashed), the worker, then the
   server: SIGTERM to each process group, SIGKILL after a grace period.

Prefect's state (its database, the server log) stays under `<run-dir>/prefect` unless
PREFECT_HOME is set, as for `turnstile train`.

The pieces (`start_server`, `wait_healthy`, `ensure_work_pool`, `deploy_all`, `start_worker`,
`stop`) take the API address and the child environment explicitly, so tests and other tools can
compose them. `enter_repo_root` is the pull step of deployments/prefect.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.environment import prepare_environment
from rl_core.paths import REPO_ROOT

PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4200
HEALTH_TIMEOUT_S = 120.0
STOP_GRACE_S = 20.0


class ServeError(RuntimeError):
    """A step of serving failed; the message says which and why."""


class Stopped(Exception):
    """SIGTERM arrived."""


@dataclass
class Child:
    """A process `serve` started (in its own process group), and where its output goes."""

    name: str
    process: subprocess.Popen
    log: Path | None = None

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- the pull step


def enter_repo_root() -> dict[str, str]:
    """Prefect pull step: work in the Turnstile checkout this Python environment runs from.

    Entrypoints (`flows/train.py:train_flow`) and relative paths in parameters then resolve
    against that checkout, wherever it was cloned on the machine that runs the flow."""
    from prefect.deployments.steps import set_working_directory

    return set_working_directory(str(REPO_ROOT))


# --------------------------------------------------------------------------- addresses and environment


def api_url_for(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def ui_url_for(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


def child_environment(api_url: str, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with PREFECT_API_URL set and telemetry off, plus `extra`."""
    env = dict(os.environ if base is None else base)
    env["PREFECT_API_URL"] = api_url
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra)
    return env


def prefect_cli(*args: str) -> list[str]:
    """The `prefect` command of this Python environment."""
    return [sys.executable, "-m", "prefect", *args]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def _spawn(name: str, command: list[str], env: Mapping[str, str], log: Path | None) -> Child:
    """Start `command` in its own process group (so a terminal's Ctrl-C reaches only `serve`)."""
    if log is None:
        process = subprocess.Popen(command, env=dict(env), cwd=REPO_ROOT, start_new_session=True)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            process = subprocess.Popen(
                command, env=dict(env), cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
    return Child(name, process, log)


# --------------------------------------------------------------------------- server


def start_server(host: str, port: int, env: Mapping[str, str], log: Path) -> Child:
    """Start `prefect server start` on host:port with its output in `log`; ServeError when the port is taken."""
    if port_in_use(host, port):
        raise ServeError(
            f"port {port} on {host} is in use. If a Prefect server runs there, use it: "
            f"PREFECT_API_URL={api_url_for(host, port)}; otherwise pick another port with --port"
        )
    return _spawn("Prefect server", prefect_cli("server", "start", "--host", host, "--port", str(port)), env, log)


def wait_healthy(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S, server: Child | None = None) -> None:
    """Return once `<api_url>/health` answers 200; ServeError when `server` exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            raise ServeError(
                f"{server.name} exited with code {server.process.returncode}; its log ({server.log}) ends "
                f"with:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    tail = f"; its log ends with:\n{server.log_tail()}" if server is not None else ""
    raise ServeError(f"no healthy Prefect API at {api_url} after {timeout_s:.0f} s{tail}")


# --------------------------------------------------------------------------- deployments


def _client(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


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


def ensure_work_pool(api_url: str, pool: str) -> bool:
    """Create process work pool `pool` unless it exists; returns whether it was created."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with _client(api_url) as client:
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


def _entrypoint_file(deployment: Mapping[str, Any]) -> Path:
    return REPO_ROOT / str(deployment.get("entrypoint", "")).split(":")[0]


def _enabled_schedules(client: Any, pool: str) -> set[tuple[Any, str]]:
    """(deployment id, schedule slug) of every enabled, slugged schedule of the pool's deployments."""
    from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName

    deployments = client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])))
    return {(d.id, s.slug) for d in deployments for s in d.schedules if s.slug and s.active}


def _reenable(client: Any, enabled_before: set[tuple[Any, str]]) -> None:
    for deployment_id, slug in enabled_before:
        for schedule in client.read_deployment_schedules(deployment_id):
            if schedule.slug == slug and not schedule.active:
                client.update_deployment_schedule(deployment_id, schedule.id, active=True)


def deploy_all(api_url: str, prefect_file: Path = PREFECT_FILE, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Register every deployment of `prefect_file` whose entrypoint file exists.

    Runs `prefect --no-prompt deploy --all` from the repository root; schedules enabled before
    stay enabled. Returns the registered deployments as read back from the API, by full name
    (`turnstile-train/nightly`). ServeError when the command fails or a deployment is missing afterwards."""
    config = load_prefect_file(prefect_file)
    pool = work_pool_name(config)
    present = [d for d in config["deployments"] if _entrypoint_file(d).is_file()]
    for skipped in (d for d in config["deployments"] if d not in present):
        print(
            f"turnstile serve: skipping deployment {skipped.get('name')!r}: {_entrypoint_file(skipped)} does not exist",
            file=sys.stderr,
        )
    if not present:
        raise ServeError(f"none of the entrypoints in {prefect_file} exist under {REPO_ROOT}")

    with _client(api_url) as client:
        enabled_before = _enabled_schedules(client, pool)
    # A filtered copy rather than `--name`: Prefect matches `--name flow/deployment` against the
    # entrypoint's function name (train_flow), not the flow's name (turnstile-train).
    with tempfile.TemporaryDirectory(prefix="turnstile-deploy-") as scratch:
        deployable = Path(scratch) / "prefect.yaml"
        deployable.write_text(yaml.safe_dump({**config, "deployments": present}, sort_keys=False))
        command = prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", str(deployable))
        result = subprocess.run(
            command, cwd=REPO_ROOT, env=child_environment(api_url, env), capture_output=True, text=True
        )
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
        raise ServeError(f"`prefect deploy` failed (exit code {result.returncode}):\n{output}")

    wanted = {(d["entrypoint"], d["name"]) for d in present}
    with _client(api_url) as client:
        _reenable(client, enabled_before)
        found = [d for d in client.read_deployments() if (d.entrypoint, d.name) in wanted]
        flow_names = {d.flow_id: client.read_flow(d.flow_id).name for d in found}
    missing = wanted - {(d.entrypoint, d.name) for d in found}
    if missing:
        raise ServeError(f"`prefect deploy` did not register {sorted(missing)}; its output:\n{result.stdout[-3000:]}")
    return {f"{flow_names[d.flow_id]}/{d.name}": d for d in found}


# --------------------------------------------------------------------------- worker and shutdown


def start_worker(pool: str, env: Mapping[str, str], log: Path | None = None, limit: int | None = None) -> Child:
    """Start `prefect worker start --pool POOL --type process` (output to `log`, or this terminal)."""
    command = prefect_cli("worker", "start", "--pool", pool, "--type", "process")
    if limit is not None:
        command += ["--limit", str(limit)]
    return _spawn("Prefect worker", command, env, log)


def _process_groups(pid: int) -> set[int]:
    """The process groups of `pid` and of every process it started (a worker's flow runs have their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    groups = set()
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    return groups


def _signal_groups(groups: Iterable[int], sig: int) -> set[int]:
    """Send `sig` (0: none, only a check) to each process group; returns the groups that still had a member."""
    alive = set()
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
            alive.add(group)
    return alive


def _terminate_groups(groups: set[int], grace_s: float, reap: subprocess.Popen | None = None) -> None:
    """SIGTERM the process groups, wait up to `grace_s` seconds for them to empty, SIGKILL what is left."""
    alive = _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        if reap is not None:
            reap.poll()  # a finished child must be reaped before its group counts as empty
        time.sleep(0.2)
        alive = _signal_groups(alive, 0)
    _signal_groups(alive, signal.SIGKILL)


def stop(children: Iterable[Child], grace_s: float = STOP_GRACE_S) -> None:
    """Stop each child in turn, with everything it started.

    First the process groups the child's descendants run in (a worker runs each flow run in a
    group of its own and would leave it running: on SIGTERM a flow run reports itself crashed
    while the server still listens), then the child's own group. Each gets SIGTERM, and SIGKILL
    after `grace_s` seconds."""
    for child in children:
        if child.process.poll() is not None:
            continue
        own_group = os.getpgid(child.process.pid)
        _terminate_groups(_process_groups(child.process.pid) - {own_group}, grace_s)
        _terminate_groups({own_group}, grace_s, reap=child.process)
        child.process.wait()


@contextlib.contextmanager
def _sigterm_raises_stopped() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_undisturbed(children: Iterable[Child]) -> None:
    """`stop`, with Ctrl-C and SIGTERM ignored meanwhile so that a second one cannot cut the shutdown short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_while_running(children: list[Child]) -> Child:
    """Block until one of `children` exits; returns it."""
    while True:
        for child in children:
            if child.process.poll() is not None:
                return child
        time.sleep(1.0)


# --------------------------------------------------------------------------- the command


def describe(api_url: str, deployments: Mapping[str, Any], pool: str, started_server: Child | None) -> str:
    """What a person needs once everything runs: the UI, the deployments, how to schedule and trigger runs."""
    env = f"PREFECT_API_URL={api_url}"
    prefect = Path(sys.executable).with_name("prefect")
    lines = ["", f"Turnstile is served. Prefect UI: {ui_url_for(api_url)}", "", f"Deployments (work pool {pool!r}):"]
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
        "Start a run in the UI (Deployments > the deployment > Run > Custom run shows the settings form), or:",
        f"  {env} {prefect} deployment run 'turnstile-train/nightly' -p 'settings={{\"iterations\": "
        f'5, "run_id": "try-1"}}\'',
        "",
        f"Prefect's state: {os.environ.get('PREFECT_HOME', '~/.prefect')}"
        + (f" (server log: {started_server.log})" if started_server else ""),
        "Ctrl-C stops the worker"
        + (" and the server." if started_server else " (the server at PREFECT_API_URL keeps running)."),
    ]
    return "\n".join(lines)


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; dispatch it to `run_serve_command(args)`."""
    sub = subparsers.add_parser("serve", help="run the Prefect server, the deployments and a worker on this machine")
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
        "--prefect-file", default=str(PREFECT_FILE), help="deployments to register (default: deployments/prefect.yaml)"
    )
    sub.add_argument(
        "--limit", type=int, default=None, help="most flow runs the worker runs at once (default: no limit)"
    )
    return sub


def run_serve_command(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM (exit code 0) or until a step or a child fails (1)."""
    from rl_core.config import RunConfig, StorageConfig

    prepare_environment(RunConfig(storage=StorageConfig(run_dir=args.run_dir)))
    home = Path(os.environ["PREFECT_HOME"])
    external_api = os.environ.get("PREFECT_API_URL")
    api_url = external_api or api_url_for(args.host, args.port)
    env = child_environment(api_url)
    children: list[Child] = []
    try:
        with _sigterm_raises_stopped():
            server = None if external_api else start_server(args.host, args.port, env, home / "server.log")
            children += [server] if server else []
            print(f"turnstile serve: waiting for the Prefect API at {api_url} ...", flush=True)
            wait_healthy(api_url, server=server)
            pool = work_pool_name(load_prefect_file(Path(args.prefect_file)))
            if ensure_work_pool(api_url, pool):
                print(f"turnstile serve: created the process work pool {pool!r}", flush=True)
            print(f"turnstile serve: registering the deployments of {args.prefect_file} ...", flush=True)
            deployments = deploy_all(api_url, Path(args.prefect_file), env)
            children.append(start_worker(pool, env, limit=args.limit))
            print(describe(api_url, deployments, pool, server), flush=True)
            ended = _wait_while_running(children)
            print(
                f"turnstile serve: {ended.name} exited with code {ended.process.returncode}; stopping", file=sys.stderr
            )
            return 1
    except (KeyboardInterrupt, Stopped):
        print("\nturnstile serve: stopping", flush=True)
        return 0
    except ServeError as err:
        print(f"turnstile serve: {err}", file=sys.stderr)
        return 1
    finally:
        _stop_undisturbed(reversed(children))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    return run_serve_command(parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])]))


if __name__ == "__main__":
    sys.exit(main())
