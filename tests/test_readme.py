"""The README's Python snippet runs from rl_core alone, and held-out pass@1 rises."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [snippet] = [b for b in blocks if "TrainingRun" in b]
    return snippet


def test_readme_training_snippet_raises_heldout_pass_at_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    out = StringIO()
    with redirect_stdout(out):
        exec(compile(readme_snippet(), "README.md", "exec"), {})
    match = re.search(r"held-out pass@1 ([0-9.]+) -> ([0-9.]+)", out.getvalue())
    assert match, out.getvalue()
    before, after = map(float, match.groups())
    assert after > before
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and len(list((runs[0] / "trajectories").glob("*.parquet"))) == 10


def readme_block(language: str, marker: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    [block] = [b for b in blocks if marker in b]
    return block


@pytest.mark.slow
@pytest.mark.gateway
def test_readme_bring_your_own_agent_example_trains(tmp_path):
    """The README's agent (my_agent.py, the openai client, pull form) plays a real `turnstile train` run."""
    agent_file = tmp_path / "my_agent.py"
    agent_file.write_text(readme_block("python", "# my_agent.py"))
    command = readme_block("bash", "my_agent.py")
    train_line = command[command.index(".venv/bin/turnstile") :].replace("\\\n", " ")
    argv = shlex.split(train_line)
    argv[0] = str(REPO / argv[0])
    port = free_port()
    argv = [a.replace("port: 8100", f"port: {port}") for a in argv]
    argv += ["--set", f"storage.run_dir={tmp_path / 'runs'}", "--set", "storage.run_id=byoa"]
    env = os.environ | {"TURNSTILE_GATEWAY": f"http://127.0.0.1:{port}", "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen([sys.executable, str(agent_file)], cwd=REPO, env=env)
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        agent.kill()
        agent.wait()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "byoa"
    for iteration in (1, 2):
        report = json.loads((run / "trajectories" / f"iteration-{iteration:06d}.validation.json").read_text())
        assert report["passed"] is True and report["rows"] == 16
    assert len(list((run / "history").glob("iteration-*.json"))) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
