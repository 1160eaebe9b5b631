"""Crash-safe resume of the train flow: killed with SIGKILL mid-training, re-run, nothing lost or doubled."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from rl_core.paths import REPO_ROOT
from rl_core.store import TrajectoryStore
from tests.test_train_flow import TINY, run_flow

RUN = "crash"
# three iterations; one episode per micro-batch so that a training step lasts long enough to be killed in
CRASH_RUN = [
    *TINY,
    "iterations=3",
    "rollout.global_batch_size=16",
    "optimizer.micro_batch_size=1",
    "evaluation.val_every=2",
]


def _train_command(run_dir: Path) -> list[str]:
    overrides = [*CRASH_RUN, f"storage.run_dir={run_dir}", f"storage.run_id={RUN}"]
    return [sys.executable, "-m", "flows.cli", "train", *(arg for o in overrides for arg in ("--set", o))]


def _environment(run_dir: Path) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PYTHONUNBUFFERED="1", PREFECT_HOME=str(run_dir / "prefect"))
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()  # the session's test server: no second server to start
    return env


def _kill_when(command: list[str], env: dict[str, str], marker: str, timeout_s: float = 300) -> list[str]:
    """Start `command`, SIGKILL it as soon as it prints `marker`; returns the lines it printed."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines, deadline = [], time.time() + timeout_s
    try:
        for line in process.stdout:
            lines.append(line)
            if marker in line:
                process.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(lines[-30:])
        else:
            pytest.fail("the run ended before printing %r:\n%s" % (marker, "".join(lines[-40:])))
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return lines


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


KILL_POINTS = {
    "training": "iteration 2: training step 2",  # inside step 2's forward/backward passes
    "writing": "iteration 2: 16 episodes",  # collected; the Parquet write is under way
    "registering": "step 2: held-out pass@1",  # step 2 evaluated; its record and registration under way
}


@pytest.fixture(scope="module")
def uninterrupted(prefect_harness, tmp_path_factory) -> Path:
    """The same run, never killed: what a resumed run must end up as."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    finished = subprocess.run(
        _train_command(run_dir), cwd=REPO_ROOT, env=_environment(run_dir), capture_output=True, text=True, timeout=600
    )
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
    return run_dir / RUN


def _weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(checkpoint / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_sigkill_in_iteration_2_loses_and_duplicates_nothing(prefect_harness, tmp_path, stage, uninterrupted):
    env = _environment(tmp_path)
    _kill_when(_train_command(tmp_path), env, KILL_POINTS[stage])

    store = TrajectoryStore(tmp_path)
    committed = store.iterations(RUN)
    assert committed[:1] == [1]
    before = {i: (_sha256(store.path(RUN, i)), store.path(RUN, i).stat().st_ino) for i in committed}
    checkpoints = tmp_path / RUN / "checkpoints"
    iteration_2_finished = (tmp_path / RUN / "history" / "iteration-000002.json").exists()
    if stage == "registering":
        assert iteration_2_finished and committed == [1, 2]
    if stage == "training":
        assert committed == [1, 2]
        assert sorted(p.name for p in checkpoints.iterdir() if not p.name.endswith(".tmp")) == [
            "step-000001"
        ]  # killed mid-step 2

    finished = subprocess.run(
        _train_command(tmp_path), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, output[-4000:]
    if 2 in committed and not iteration_2_finished:
        assert "reusing the batch already written (iteration-000002.parquet)" in output

    assert store.iterations(RUN) == [1, 2, 3]
    for i in committed:  # what was committed before the kill is the same file, byte for byte, never rewritten
        assert (_sha256(store.path(RUN, i)), store.path(RUN, i).stat().st_ino) == before[i]
        assert _sha256(store.path(RUN, i)) == store.manifest(RUN, i).sha256
    trajectories = tmp_path / RUN / "trajectories"
    assert sorted(p.name for p in trajectories.glob("*.parquet")) == [f"iteration-00000{i}.parquet" for i in (1, 2, 3)]
    assert not (tmp_path / RUN / "quarantine").exists()
    assert _leftovers(tmp_path / RUN) == []

    history = [json.loads(p.read_text()) for p in sorted((tmp_path / RUN / "history").glob("*.json"))]
    assert [(r["iteration"], r["step"], r["trained"]) for r in history] == [(1, 1, True), (2, 2, True), (3, 3, True)]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002", "step-000003"]

    # sampling went on exactly where the killed attempt left it: the same batches, the same weights
    for i in (1, 2, 3):
        assert (
            store.read_table(RUN, i)
            .column("tokens")
            .equals(TrajectoryStore(uninterrupted.parent).read_table(RUN, i).column("tokens"))
        ), f"iteration {i} differs from the uninterrupted run"
    final, reference = _weights(checkpoints / "step-000003"), _weights(uninterrupted / "checkpoints" / "step-000003")
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [mlflow_run] = client.search_runs(client.get_experiment_by_name("turnstile").experiment_id)
    assert mlflow_run.info.status == "FINISHED"
    versions = client.search_model_versions("name='turnstile-policy'")
    sources = [v.source for v in versions]
    assert len(sources) == len(set(sources)) == 2  # steps 2 and 3 registered once each
    assert sorted(int(v.tags["step"]) for v in versions) == [2, 3]
    assert "gate.decision" in client.get_model_version("turnstile-policy", max(int(v.version) for v in versions)).tags


def test_rerunning_a_finished_run_repeats_no_work(prefect_harness, tmp_path):
    first = run_flow(tmp_path, "again")
    checkpoints = sorted(p.name for p in (tmp_path / "again" / "checkpoints").iterdir())
    stamps = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*") if p.is_file() and "prefect" not in p.parts
    }

    second = run_flow(tmp_path, "again")

    for key in ("trained_steps", "pass_at_1_before", "pass_at_1_after", "candidate_version", "gate"):
        assert second[key] == first[key], key
    assert sorted(p.name for p in (tmp_path / "again" / "checkpoints").iterdir()) == checkpoints
    records = [p for p in stamps if "trajectories" in p.parts or "history" in p.parts or "evaluations" in p.parts]
    assert records and all(p.stat().st_mtime_ns == stamps[p] for p in records)
    client = MlflowClient(first["mlflow_uri"])
    assert len(client.search_model_versions("name='turnstile-policy'")) == 2  # nothing registered twice


def test_continuing_a_run_with_another_training_setup_is_refused(prefect_harness, tmp_path):
    run_flow(tmp_path, "setup", ["iterations=1"])
    with pytest.raises(ValueError, match=r"optimizer\.lr differ"):
        run_flow(tmp_path, "setup", ["iterations=1", "optimizer.lr=0.5"])
    extended = run_flow(tmp_path, "setup", ["iterations=2"])  # running longer is allowed
    assert extended["trained_steps"] == 2
    assert TrajectoryStore(tmp_path).iterations("setup") == [1, 2]


def test_resume_command_continues_a_run_on_its_recorded_config(prefect_harness, tmp_path, monkeypatch, capsys):
    import flows.cli

    monkeypatch.setattr(flows.cli, "prepare_environment", lambda cfg: None)  # keep this process's Prefect settings
    run_flow(tmp_path, "resumed", ["iterations=1"])

    assert flows.cli.main(["resume", "resumed", "--run-dir", str(tmp_path), "--set", "iterations=2"]) == 0
    assert TrajectoryStore(tmp_path).iterations("resumed") == [1, 2]
    assert "turnstile resume resumed" in capsys.readouterr().out

    assert flows.cli.main(["resume", "no-such-run", "--run-dir", str(tmp_path)]) == 2
    assert "no-such-run" in capsys.readouterr().err


def test_an_unnamed_run_is_named_after_its_flow_run(prefect_harness, tmp_path):
    import re

    from prefect.client.orchestration import get_client

    from flows.parameters import TrainSettings
    from flows.train import train_flow

    state = train_flow(
        TrainSettings(overrides=[*TINY, "iterations=1", f"storage.run_dir={tmp_path}"]), return_state=True
    )
    run_id = state.result()["run_id"]
    match = re.fullmatch(r"run-(\d{8}-\d{6})-([0-9a-f]{6})", run_id)
    assert match, run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert str(flow_run.id).startswith(match.group(2)) and flow_run.created.strftime("%Y%m%d-%H%M%S") == match.group(1)
    assert (tmp_path / run_id / "config.yaml").is_file()
