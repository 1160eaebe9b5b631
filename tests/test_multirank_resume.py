"""Crash-safe resume with a two-rank learner: the run's process is killed with SIGKILL while its ranks are inside a
training step, the ranks stop, and the resumed run ends with the parameters of a run never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl_core.paths import REPO_ROOT
from rl_core.runs.checkpoint import checkpoint_dir, checkpoints_dir

pytestmark = pytest.mark.slow  # three runs with two learner ranks each (~3 minutes)

OVERRIDES = [
    "iterations=3",
    "rollout.group_size=4",
    "rollout.global_batch_size=8",
    "rollout.max_turns=4",
    "optimizer.micro_batch_size=1",  # 8 forward/backward passes per step over 2 ranks: a step to be killed in
    "evaluation.max_tasks=2",
    "evaluation.num_samples=2",
    "evaluation.pass_k=[1,2]",
    "evaluation.val_every=10",
    "trainer.backend=deepspeed",
    "trainer.zero_stage=1",
    "trainer.num_processes=2",
]
STEP_SENT = "STEP SENT"

# The run, from Python (TrainingRun.open continues a run that has checkpoints). The only test hook: the driver
# prints a marker once a step's command has reached rank 0, so that the kill lands inside that step.
SCRIPT = """
import sys
from rl_core.config import load_config
from rl_core.distributed import launch
from rl_core.run import TrainingRun

cfg = load_config(None, overrides=sys.argv[1:])
sent = launch.send
def send(connection, message):
    sent(connection, message)
    if message[0] == "step":
        print("STEP_MARK", message[1]["version"] + 1, flush=True)
launch.send = send
TrainingRun.open(cfg).run(log=lambda line: print(line, flush=True))
print("RUN DONE", flush=True)
""".replace("STEP_MARK", STEP_SENT)


def _command(run_dir: Path, run_id: str) -> list[str]:
    overrides = [*OVERRIDES, f"storage.run_dir={run_dir}", f"storage.run_id={run_id}"]
    return [sys.executable, "-c", SCRIPT, *overrides]


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _run(run_dir: Path, run_id: str) -> str:
    done = subprocess.run(
        _command(run_dir, run_id), cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "RUN DONE" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _workers() -> list[int]:
    """Process ids of learner ranks running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"rl_core.distributed.worker" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _final_weights(run_dir: Path, run_id: str) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dir(checkpoints_dir(run_dir / run_id), 3) / "model.safetensors")


def test_a_two_rank_run_killed_mid_step_resumes_to_the_uninterrupted_parameters(tmp_path):
    assert not _workers(), "learner ranks of another run are still alive"
    _run(tmp_path, "straight")
    expected = _final_weights(tmp_path, "straight")

    process = subprocess.Popen(
        _command(tmp_path, "crash"),
        cwd=REPO_ROOT,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, deadline = [], time.time() + 600
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(f"{STEP_SENT} 2"):  # step 2's command is with the ranks: kill the run mid-step
                process.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "".join(lines[-30:])
        else:
            pytest.fail("the run ended before step 2:\n" + "".join(lines[-40:]))
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    crashed = checkpoints_dir(tmp_path / "crash")
    assert sorted(p.name for p in crashed.iterdir()) == ["step-000001"]  # step 2 never finished

    # the ranks notice their driver is gone (rank 0's channel closes) and torchrun stops them
    deadline = time.time() + 120
    while _workers() and time.time() < deadline:
        time.sleep(1)
    assert not _workers(), "the learner ranks outlived their run"

    out = _run(tmp_path, "crash")
    assert f"{STEP_SENT} 1" not in out and f"{STEP_SENT} 2" in out  # continued from step 1's checkpoint
    resumed = _final_weights(tmp_path, "crash")
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)
