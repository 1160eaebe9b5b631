"""`turnstile serve` on one machine: Prefect's server and `Runner` serve the deployments of prefect.yaml.

The module runs the serve command itself (`python -m flows.serve`, what `turnstile serve` runs)
on a free port of 127.0.0.1 with its own PREFECT_HOME and waits for its banner. The deployments
must match deployments/prefect.yaml (names, entrypoints, descriptions, tags, the nightly schedule
paused) with no work pool, and keep their typed parameter forms. One train run, started through
the API with non-default settings, must complete on the served Runner. Last, a second train run
is left running and serve gets SIGTERM: it must exit 0 and leave no server or flow-run process
behind. About 60 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.deployments import PREFECT_FILE, load_prefect_file, served_deployments
from flows.serving import api_url_for, child_environment
from rl_core.paths import REPO_ROOT
from tests.test_deployments import (
    EVALUATE,
    HOST,
    NIGHTLY,
    PROMOTE,
    REPLAY,
    ROLLBACK,
    RUN_TIMEOUT_S,
    TRAIN,
    Served,
    _client,
    _flow_run_processes,
    _free_port,
    _settings_schema,
    _wait_for_banner,
    _wait_until_final,
)
from tests.test_train_flow import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("served")
    port = _free_port()
    api_url = api_url_for(HOST, port)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        OMP_NUM_THREADS="1",
    )
    output = root / "serve.log"
    with open(output, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.serve", "--host", HOST, "--port", str(port), "--run-dir", str(root / "runs")],
            cwd=root,  # serve works in the repository root wherever it is started
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_banner(process, output)
        with _client(api_url) as client:
            deployments = {f"{client.read_flow(d.flow_id).name}/{d.name}": d for d in client.read_deployments()}
        served = Served(api_url, deployments, "", child_environment(api_url, env), output)
        served.process = process
        yield served
    finally:
        if process.poll() is None:  # a test failed before SIGTERM: take everything down
            children = psutil.Process(process.pid).children(recursive=True)
            process.kill()
            process.wait()
            for child in children:
                child.kill()


def _by_full_name(served: Served) -> dict[str, dict]:
    """prefect.yaml's deployments by the full name they are served under."""
    flows = {d.entrypoint: d.flow_id for d in served.deployments.values()}
    with _client(served.api_url) as client:
        names = {entrypoint: client.read_flow(flow_id).name for entrypoint, flow_id in flows.items()}
    return {
        f"{names[d['entrypoint']]}/{d['name']}": d
        for d in load_prefect_file()["deployments"]
        if d["entrypoint"] in names
    }


def test_the_deployments_of_prefect_yaml_are_served_without_a_work_pool(served):
    expected = {TRAIN, NIGHTLY, EVALUATE, PROMOTE, ROLLBACK}
    if (REPO_ROOT / "flows" / "replay.py").is_file():
        expected.add(REPLAY)
    assert set(served.deployments) == expected
    declared = _by_full_name(served)
    assert set(declared) == expected
    for name, deployment in served.deployments.items():
        assert deployment.work_pool_name is None  # the Runner in `turnstile serve` runs them
        assert deployment.entrypoint == declared[name]["entrypoint"]
        assert deployment.description.endswith(declared[name]["description"])  # after the schedule's state
        assert deployment.tags == declared[name]["tags"]
        assert deployment.enforce_parameter_schema is True


def test_the_nightly_train_schedule_is_served_paused(served):
    [schedule] = served.deployments[NIGHTLY].schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.slug == "nightly-0200-utc"
    assert schedule.active is False


def test_parameters_are_typed_forms_with_descriptions(served):
    for name, deployment in served.deployments.items():
        fields = _settings_schema(deployment)["properties"]
        assert fields and all(field.get("description") for field in fields.values()), name
    train = _settings_schema(served.deployments[TRAIN])["properties"]
    assert {"run_id", "run_dir", "iterations", "learning_rate", "group_size", "overrides"} <= set(train)
    assert (train["iterations"]["type"], train["iterations"]["minimum"]) == ("integer", 1)
    promote = _settings_schema(served.deployments[PROMOTE])
    assert promote["required"] == ["version"]


def test_serving_again_keeps_an_enabled_schedule_enabled(served, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deployment = served.deployments[NIGHTLY]
    [schedule] = deployment.schedules
    monkeypatch.chdir(REPO_ROOT)
    with _client(served.api_url) as client:
        client.update_deployment_schedule(deployment.id, schedule.id, active=True)
        try:
            with temporary_settings({PREFECT_API_URL: served.api_url}):
                again = {
                    d.name: d
                    for d in served_deployments(served.api_url, PREFECT_FILE)
                    if d.flow_name == "turnstile-train"
                }
                assert again["nightly"].apply() == deployment.id
            assert [s.active for s in client.read_deployment(deployment.id).schedules] == [True]
        finally:
            client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def test_a_custom_train_run_started_through_the_api_completes_on_the_runner(served, tmp_path):
    from rl_core.runs.folder import load_run_config
    from rl_core.store import TrajectoryStore

    typed = ("iterations=", "rollout.group_size=", "rollout.global_batch_size=")
    settings = {
        "run_id": "served",
        "run_dir": str(tmp_path),
        "iterations": 1,
        "learning_rate": 2.0e-4,
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
    cfg = load_run_config(Path(tmp_path) / "served")
    assert (cfg.iterations, cfg.optimizer.lr, cfg.rollout.group_size) == (1, 2.0e-4, 4)
    assert TrajectoryStore(tmp_path).iterations("served") == [1]


def test_sigterm_stops_serve_its_server_and_a_flow_run_in_progress(served, tmp_path):
    process = served.process
    settings = {
        "run_dir": str(tmp_path),
        "iterations": 5,
        "overrides": [i for i in TINY if not i.startswith("iterations=")],
    }
    with _client(served.api_url) as client:
        flow_run = client.create_flow_run_from_deployment(
            served.deployments[TRAIN].id, parameters={"settings": settings}
        )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _flow_run_processes(flow_run.id):
        assert time.monotonic() < deadline, f"the flow run never started; serve's output:\n{served.output_tail()}"
        time.sleep(0.5)
    started = psutil.Process(process.pid).children(recursive=True)
    assert len(started) >= 2  # the Prefect server and the flow run

    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not stop within 90 s after SIGTERM; its output:\n{served.output_tail()}")
    _, left = psutil.wait_procs(started, timeout=5)
    assert code == 0, served.output_tail()
    assert not left, f"serve left processes behind: {[p.pid for p in left]}"
    assert not _flow_run_processes(flow_run.id)
