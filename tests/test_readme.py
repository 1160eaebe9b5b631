"""The README's Python snippet runs from rl_core alone, and held-out pass@1 rises."""

import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

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
