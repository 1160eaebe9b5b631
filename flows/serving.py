"""The Prefect API server of `turnstile serve`: Prefect's own subprocess server, with its UI, on a chosen address.

`PrefectServer` is Prefect's `SubprocessASGIServer` (what Prefect starts as its temporary server:
uvicorn on `prefect.server.api.server:create_app`, a health wait, terminate-then-kill on stop)
bound to a host and port of our choosing, with the UI on, its output in a log file and its own
session, so that a terminal's Ctrl-C reaches `turnstile serve` first and the server outlives the
flow runs being stopped. This module imports prefect: set PREFECT_HOME first
(flows.environment.prepare_environment), as flows/serve.py does before importing it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

HEALTH_TIMEOUT_S = 120.0


class ServeError(RuntimeError):
    """A step of serving failed; the message says which and why."""


def api_url_for(host: str, port: int) -> str:
    """The Prefect API address of a server on host:port, e.g. `http://127.0.0.1:4200/api`."""
    return f"http://{host}:{port}/api"


def ui_url_for(api_url: str) -> str:
    """The UI address that goes with a Prefect API address (the API URL without `/api`)."""
    return api_url.rstrip("/").removesuffix("/api")


def child_environment(api_url: str, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with PREFECT_API_URL set and telemetry off, plus `extra`."""
    env = dict(os.environ if base is None else base)
    env["PREFECT_API_URL"] = api_url
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra)
    return env


def port_in_use(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        return probe.connect_ex((host, port)) == 0


def wait_healthy(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Return once `<api_url>/health` answers 200; ServeError after `timeout_s` seconds without."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServeError(f"no healthy Prefect API at {api_url} after {timeout_s:.0f} s")


def _log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def start_server(host: str, port: int, log: Path, timeout_s: float = HEALTH_TIMEOUT_S) -> PrefectServer:
    """Start the Prefect API server and UI on host:port and return it once healthy.

    Returns a `PrefectServer` (`.api_url`, `.address`, `.log`; `.stop()` terminates it, and
    kills it 5 s later if need be). Raises ServeError when the port is taken, or when the server
    exits or stays unhealthy for `timeout_s` seconds (the message ends with its log)."""
    if port_in_use(host, port):
        raise ServeError(
            f"port {port} on {host} is in use. If a Prefect server runs there, use it: "
            f"PREFECT_API_URL={api_url_for(host, port)}; otherwise pick another port with --port"
        )
    server = PrefectServer(port, host=host, log=log)
    try:
        server.start(timeout=int(timeout_s))
    except Exception as exc:
        server.stop()
        raise ServeError(
            f"the Prefect server did not start: {exc}; its log ({log}) ends with:\n{_log_tail(log)}"
        ) from exc
    return server


class PrefectServer(SubprocessASGIServer):
    """Prefect's subprocess server (`SubprocessASGIServer`) on `host`, with the UI on, its output in `log`.

    `PrefectServer(port, host=..., log=...)`; `.start(timeout=s)` returns once `<api_url>/health`
    answers (RuntimeError otherwise), `.stop()` terminates the server and kills it after 5 s."""

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1", log: Path | None = None):
        super().__init__(port)
        self.host = host
        self.log = log

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run_uvicorn_command(self) -> subprocess.Popen:
        # The command of `prefect server start --background`, with the environment Prefect gives
        # its temporary server less the switches that make it ephemeral and UI-less; a session of
        # its own so that a terminal's Ctrl-C reaches `turnstile serve` and not the server.
        command = [
            *(sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)),
            *("--factory", "prefect.server.api.server:create_app", "--host", self.host, "--port", str(self.port)),
            *("--log-level", "warning", "--lifespan", "on"),
        ]
        env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT__SERVER_FINAL": "1",
            # the UI asks /ui-settings where the API is: this server, not the default port 4200
            "PREFECT_SERVER_API_HOST": self.host,
            "PREFECT_SERVER_API_PORT": str(self.port),
        }
        if self.log is None:
            return subprocess.Popen(command, env=env, start_new_session=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as output:
            return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
