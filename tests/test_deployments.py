"""`turnstile serve --work-pool`: the deployments of deployments/prefect.yaml on a work pool and a worker.

The module runs the serve command itself in its work-pool mode (`python -m flows.serve
--work-pool`, what `turnstile serve --work-pool` runs: the many-machines path on one machine) on
a free port of 127.0.0.1 with its own PREFECT_HOME, waits until it has registered the
deployments and started its worker, and at the end stops it with SIGTERM: it must exit 0 and
leave no server, worker or flow-run process behind. A train run is started through the API the
way the UI starts a custom run, with non-default settings, and the worker runs it to completion.
Another train run is killed with SIGKILL in iteration 2 and retried the way the UI's Retry does
it: the same Turnstile run continues and nothing is collected twice. About 90 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from prefect.states import AwaitingRetry

from flows.deployments import PREFECT_FILE, deploy_all, ensure_work_pool, load_prefect_file, work_pool_name
from flows.parameters import TrainSettings
from flows.serving import api_url_for, child_environment, wait_healthy
from rl_core.paths import REPO_ROOT
from tests.test_train_flow import TINY

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
TRAIN = "turnstile-train/train-now"  # hand-started training
NIGHTLY = "turnstile-train/nightly"  # the schedule only
EVALUATE = "turnstile-evaluate/compare-models"
PROMOTE = "turnstile-promote/promote-version"
ROLLBACK = "turnstile-rollback/restore-previous-champion"
REPLAY = "turnstile-replay/replay-batches"
SERVED_BANNER = "Turnstile is served."
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 240


@dataclass
class Served:
    api_url: str
    deployments: dict[str, Any]
    pool: str
    env: dict[str, str]
    output: Path

    def output_tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _client(api_url: str):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api_url)


def _wait_for_banner(process: subprocess.Popen, output: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while SERVED_BANNER not in output.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"serve did not come up (exit code {process.poll()}); "
                f"its output:\n{output.read_text(errors='replace')[-4000:]}"
            )
        time.sleep(0.5)


def _stop_serve(process: subprocess.Popen, output: Path) -> None:
    """SIGTERM the serve command; it must exit 0 and take every process it started with it."""
    started = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(
            f"serve did not stop within 90 s after SIGTERM; its output:\n{output.read_text(errors='replace')[-4000:]}"
        )
    _, left = psutil.wait_procs(started, timeout=5)
    for orphan in left:
        orphan.kill()
    assert code == 0, output.read_text(errors="replace")[-4000:]
    assert not left, f"serve left processes behind: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served")
    port = _free_port()
    api_url = api_url_for(HOST, port)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        OMP_NUM_THREADS="1",
    )
    output = root / "serve.log"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "flows.serve", "--work-pool", "--host", HOST, "--port", str(port)),
                *("--run-dir", str(root / "runs")),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_banner(process, output)
        wait_healthy(api_url, timeout_s=10)
        pool = work_pool_name(load_prefect_file())
        with _client(api_url) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        yield Served(api_url, deployments, pool, child_environment(api_url, env), output)
    finally:
        _stop_serve(process, output)


def _settings_schema(deployment: Any) -> dict[str, Any]:
    schema = deployment.parameter_openapi_schema
    reference = schema["properties"]["settings"]["$ref"].rsplit("/", 1)[-1]
    return schema["definitions"][reference]


def _wait_until_final(client: Any, flow_run_id: Any, served: Served) -> Any:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        time.sleep(1)
    pytest.fail(
        f"flow run {flow_run_id} not finished after {RUN_TIMEOUT_S} "
        f"s; serve's output ends with:\n{served.output_tail()}"
    )


def test_every_deployment_is_registered_on_the_pool_with_the_portable_pull_step(served):
    expected = {TRAIN, NIGHTLY, EVALUATE, PROMOTE, ROLLBACK}
    if (REPO_ROOT / "flows" / "replay.py").is_file():
        expected.add(REPLAY)
    assert set(served.deployments) == expected
    for deployment in served.deployments.values():
        assert deployment.work_pool_name == served.pool
        assert deployment.pull_steps == [{"flows.serve.enter_repo_root": {}}]  # nothing machine-specific recorded
    assert ensure_work_pool(served.api_url, served.pool) is False  # serve created it; it is not made twice


def test_the_nightly_train_schedule_is_registered_paused_and_says_so_first(served):
    [schedule] = served.deployments[NIGHTLY].schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active is False
    assert served.deployments[NIGHTLY].description.startswith("Schedule PAUSED (0 2 * * * UTC)")
    assert not served.deployments[TRAIN].schedules  # hand-started runs have a deployment of their own


def test_parameters_are_typed_forms_with_descriptions(served):
    for name, deployment in served.deployments.items():
        fields = _settings_schema(deployment)["properties"]
        assert fields, name
        assert all(field.get("description") for field in fields.values()), name
    train = _settings_schema(served.deployments[TRAIN])["properties"]
    assert {"run_id", "run_dir", "iterations", "learning_rate", "group_size", "global_batch_size", "overrides"} <= set(
        train
    )
    assert (train["iterations"]["type"], train["iterations"]["minimum"]) == ("integer", 1)  # no `int | None`
    # the form starts at the served config's values (the shipped quickstart)
    assert served.deployments[TRAIN].parameters == {"settings": TrainSettings().model_dump()}
    evaluate = _settings_schema(served.deployments[EVALUATE])["properties"]
    assert {"checkpoint", "version", "samples", "max_tasks"} <= set(evaluate)
    promote = _settings_schema(served.deployments[PROMOTE])
    assert promote["required"] == ["version"] and "run_id" not in promote["properties"]


def test_the_server_rejects_settings_outside_the_schema(served):
    from prefect.exceptions import PrefectHTTPStatusError

    with _client(served.api_url) as client, pytest.raises(PrefectHTTPStatusError) as rejected:
        client.create_flow_run_from_deployment(
            served.deployments[TRAIN].id, parameters={"settings": {"learning_rate": -1}}
        )
    assert rejected.value.response.status_code == 409
    assert "settings.learning_rate" in rejected.value.response.json()["detail"]


def test_a_custom_train_run_started_through_the_api_runs_on_the_worker_with_its_settings(served, tmp_path):
    from rl_core.runs.folder import load_run_config
    from rl_core.store import TrajectoryStore

    typed = ("iterations=", "rollout.group_size=", "rollout.global_batch_size=")
    settings = {
        "run_id": "from-the-ui",
        "run_dir": str(tmp_path),
        "iterations": 1,
        "learning_rate": 1.0e-4,
        "group_size": 4,
        "global_batch_size": 8,
        "overrides": [item for item in TINY if not item.startswith(typed)],
    }
    with _client(served.api_url) as client:
        flow_run = client.create_flow_run_from_deployment(
            served.deployments[TRAIN].id, parameters={"settings": settings}
        )
        state = _wait_until_final(client, flow_run.id, served)
    assert state.is_completed(), f"{state.type}: {state.message}\n{served.output_tail()}"

    cfg = load_run_config(Path(tmp_path) / "from-the-ui")
    assert (cfg.iterations, cfg.optimizer.lr, cfg.rollout.group_size, cfg.rollout.global_batch_size) == (
        1,
        1.0e-4,
        4,
        8,
    )
    assert cfg.evaluation.max_tasks == 2  # a free-form override
    assert TrajectoryStore(tmp_path).iterations("from-the-ui") == [1]


def test_registering_again_keeps_an_enabled_schedule_enabled(served):
    deployment = served.deployments[NIGHTLY]
    [schedule] = deployment.schedules
    with _client(served.api_url) as client:
        client.update_deployment_schedule(deployment.id, schedule.id, active=True)
    try:
        redeployed = deploy_all(served.api_url, PREFECT_FILE, served.env)
        assert [s.active for s in redeployed[NIGHTLY].schedules] == [True]
        assert redeployed[NIGHTLY].description.startswith("Schedule ON")
        assert redeployed[NIGHTLY].id == deployment.id
    finally:
        with _client(served.api_url) as client:
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def _flow_run_processes(flow_run_id: Any) -> list[psutil.Process]:
    """The processes the worker started for a flow run (they carry the run's id in their environment)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _wait_for(path_glob: str, folder: Path, served: Served) -> Path:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        found = list(folder.glob(path_glob))
        if found:
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"{path_glob} never appeared under {folder}; serve's output ends with:\n{served.output_tail()}")


def _retry_until_final(client: Any, flow_run_id: Any, served: Served, attempts: int = 3) -> Any:
    """Retry a crashed flow run as the UI's Retry button does. The worker may report the crash a
    second time, late; if that report overrules the retry, the retry is made again (as a person would)."""
    for _ in range(attempts):
        client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
        state = _wait_until_final(client, flow_run_id, served)
        if not (state.is_crashed() and "infrastructure" in (state.message or "")):
            return state
    return state


def test_a_crashed_train_run_retried_from_the_ui_resumes_where_it_died(served, tmp_path):
    from rl_core.store import TrajectoryStore

    typed = ("iterations=", "rollout.group_size=", "rollout.global_batch_size=", "evaluation.val_every=")
    settings = {  # no run_id: the run is named after the flow run, which a retry keeps
        "run_dir": str(tmp_path),
        "iterations": 3,
        "group_size": 4,
        "global_batch_size": 16,
        "overrides": [
            *(item for item in TINY if not item.startswith(typed)),
            "optimizer.micro_batch_size=1",
            "evaluation.val_every=2",
        ],
    }
    with _client(served.api_url) as client:
        flow_run = client.create_flow_run_from_deployment(
            served.deployments[TRAIN].id, parameters={"settings": settings}
        )
        second_batch = _wait_for("*/trajectories/iteration-000002.manifest.json", tmp_path, served)
        doomed = _flow_run_processes(flow_run.id)
        assert doomed, f"no process runs flow run {flow_run.id}"
        for process in doomed:
            process.kill()  # SIGKILL in iteration 2
        psutil.wait_procs(doomed, timeout=30)
        crashed = _wait_until_final(client, flow_run.id, served)
        assert crashed.is_crashed(), f"{crashed.type}: {crashed.message}"
        run_folder = second_batch.parent.parent
        store = TrajectoryStore(tmp_path)
        before = {i: store.path(run_folder.name, i).stat().st_ino for i in store.iterations(run_folder.name)}

        state = _retry_until_final(client, flow_run.id, served)
        assert state.is_completed(), f"{state.type}: {state.message}\n{served.output_tail()}"

    assert [p.name for p in tmp_path.iterdir() if (p / "config.yaml").exists()] == [
        run_folder.name
    ]  # the same run, continued
    assert store.iterations(run_folder.name) == [1, 2, 3]
    assert {i: store.path(run_folder.name, i).stat().st_ino for i in before} == before  # nothing collected twice
