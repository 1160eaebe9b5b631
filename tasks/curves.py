"""Pictures of a run: reward, held-out pass@1 and truncation curves as PNG files.

`draw_curves(run_dir, records, pass_at_1)` draws the run's iteration records and held-out pass@1
(as the training loop holds them, rl_core/runs/records.py) into
`<run_dir>/curves/{reward,pass_at_1,truncation}.png`; `publish_curves_task` draws them at
the end of a flow run and puts them in MLflow (artifacts under `curves/`) and in Prefect
(image artifacts, the PNG inlined as a data URL so the UI shows it without a file server).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_image_artifact  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from rl_core.atomic import write_bytes_atomically  # noqa: E402
from rl_core.runs.records import IterationRecord  # noqa: E402
from tasks.tracking import Tracker  # noqa: E402
from tasks.validate import artifact_slug  # noqa: E402

CURVES_DIR = "curves"
TRUNCATION_REASONS = ("token_cap", "max_turns", "context_overflow")


def _series(records: list[IterationRecord], key: str) -> tuple[list[int], list[float]]:
    points = [(r.iteration, r.metrics[key]) for r in records if key in r.metrics]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(title: str, xlabel: str, ylabel: str):
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    return write_bytes_atomically(path, png.getvalue())


def _reward_curve(records: list[IterationRecord], path: Path) -> Path:
    figure, axes = _figure("Training reward", "iteration", "mean over the batch")
    for key, label in (("rollout/reward/mean", "reward"), ("rollout/success/mean", "success rate")):
        x, y = _series(records, key)
        axes.plot(x, y, marker=".", label=label)
    for record in records:
        if record.rollback_to is not None:
            axes.axvline(record.iteration, color="red", linestyle=":", label=f"rollback to step {record.rollback_to}")
    axes.legend(loc="best")
    return _save(figure, path)


def _pass_at_1_curve(evaluations: dict[int, float], path: Path) -> Path:
    figure, axes = _figure("Held-out pass@1 (greedy)", "training step", "pass@1")
    steps = sorted(evaluations)
    axes.plot(steps, [evaluations[s] for s in steps], marker="o")
    axes.set_ylim(0, 1)
    return _save(figure, path)


def _truncation_curve(records: list[IterationRecord], path: Path) -> Path:
    figure, axes = _figure("Truncated episodes", "iteration", "fraction of the batch")
    for reason in TRUNCATION_REASONS:
        x, y = _series(records, f"rollout/finish/{reason}")
        axes.plot(x, y, marker=".", label=reason)
    axes.legend(loc="best")
    return _save(figure, path)


def draw_curves(run_dir: Path, records: list[IterationRecord], pass_at_1: dict[int, float]) -> list[Path]:
    """Draw the three curves (trained iterations of `records`; `pass_at_1` by evaluated step) into
    `<run_dir>/curves/`; returns the PNG paths."""
    folder = Path(run_dir) / CURVES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    trained = [r for r in records if r.trained]
    return [
        _reward_curve(trained, folder / "reward.png"),
        _pass_at_1_curve(dict(sorted(pass_at_1.items())), folder / "pass_at_1.png"),
        _truncation_curve(trained, folder / "truncation.png"),
    ]


def png_data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@task(name="publish-curves", cache_policy=NONE)
def publish_curves_task(
    run_id: str, run_dir: Path, records: list[IterationRecord], pass_at_1: dict[int, float], tracker: Tracker
) -> list[Path]:
    """Draw the run's curves (`draw_curves`) and publish them to MLflow and Prefect; returns the PNG paths."""
    paths = draw_curves(run_dir, records, pass_at_1)
    for path in paths:
        tracker.log_file(path, CURVES_DIR)
        create_image_artifact(
            image_url=png_data_url(path),
            key=f"curve-{artifact_slug(run_id)}-{artifact_slug(path.stem)}",
            description=f"{path.stem} curve of {run_id} (also in MLflow under {CURVES_DIR}/{path.name})",
        )
    get_run_logger().info("curves: %s", ", ".join(str(p) for p in paths))
    return paths
