"""Pictures of a run: reward, held-out pass@1 and truncation curves as PNG files.

`draw_curves(run_dir, records, pass_at_1)` draws the run's iteration records and held-out pass@1
(as the training loop holds them, rl_core/runs/records.py) into
`<run_dir>/curves/{reward,pass_at_1,truncation}.png`; `publish_curves_task` draws them at
the end of a flow run and puts them in MLflow (artifacts under `curves/`) and in Prefect (one
markdown card on the flow run, `curves-<run>`, showing the three pictures; tasks/cards.py).

Iterations and steps are whole numbers, so the x-axes tick only at integers. Series that can lie
on top of each other (the truncation shares are often all zero) get their own marker and line
style, and a series that is zero everywhere says so in the legend.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from prefect import get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from rl_core.atomic import write_bytes_atomically  # noqa: E402
from rl_core.runs.records import IterationRecord  # noqa: E402
from tasks.cards import markdown_image, png_data_url, publish_flow_run_card  # noqa: E402, F401 (png_data_url: kept for callers)
from tasks.tracking import Tracker  # noqa: E402
from tasks.validate import artifact_slug  # noqa: E402

CURVES_DIR = "curves"
TRUNCATION_REASONS = ("token_cap", "max_turns", "context_overflow")
STYLES = (("o", "-"), ("s", "--"), ("^", ":"), ("D", "-."))
"""(marker, line style) of the 1st, 2nd, ... series of a plot, so that equal series stay apart."""
TITLES = {"reward": "Training reward", "pass_at_1": "Held-out pass@1 (greedy)", "truncation": "Truncated episodes"}


def _series(records: list[IterationRecord], key: str) -> tuple[list[int], list[float]]:
    points = [(r.iteration, r.metrics[key]) for r in records if key in r.metrics]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(title: str, xlabel: str, ylabel: str):
    figure, axes = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations and steps are whole numbers
    return figure, axes


def series_label(name: str, values: list[float]) -> str:
    """`name` for a legend, with "(all zero)" when every value is 0 (such series overlap)."""
    return f"{name} (all zero)" if values and all(v == 0 for v in values) else name


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    return write_bytes_atomically(path, png.getvalue())


def _reward_curve(records: list[IterationRecord], path: Path) -> Path:
    figure, axes = _figure("Training reward", "iteration", "mean over the batch")
    series = (("rollout/reward/mean", "reward"), ("rollout/success/mean", "success rate"))
    for (key, label), (marker, line) in zip(series, STYLES):
        x, y = _series(records, key)
        axes.plot(x, y, marker=marker, linestyle=line, label=series_label(label, y))
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
    for reason, (marker, line) in zip(TRUNCATION_REASONS, STYLES):
        x, y = _series(records, f"rollout/finish/{reason}")
        axes.plot(x, y, marker=marker, linestyle=line, fillstyle="none", markersize=8, label=series_label(reason, y))
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


def curves_markdown(run_id: str, paths: list[Path]) -> str:
    """The markdown of the curves card: a heading, then each PNG of `paths` (named `<curve>.png`) as an
    inlined picture (its title as the alternative text), and where MLflow keeps the files."""
    lines = [f"# Curves of `{run_id}`", ""]
    for path in paths:
        title = TITLES.get(path.stem, path.stem)
        lines += [markdown_image(path, title), ""]  # each picture carries its title
    lines.append(f"The PNG files are in the run folder and in MLflow under `{CURVES_DIR}/`.")
    return "\n".join(lines) + "\n"


def curves_artifact_key(run_id: str) -> str:
    """The Prefect key of a run's curves card: `curves-<run id>` in lowercase letters, digits and dashes."""
    return f"curves-{artifact_slug(run_id)}"


@task(name="publish-curves", cache_policy=NONE)
def publish_curves_task(
    run_id: str, run_dir: Path, records: list[IterationRecord], pass_at_1: dict[int, float], tracker: Tracker
) -> list[Path]:
    """Draw the run's curves (`draw_curves`) and publish them: to MLflow (under `curves/`) and as one
    markdown card on the Prefect flow run (`curves_artifact_key`). Returns the PNG paths."""
    paths = draw_curves(run_dir, records, pass_at_1)
    for path in paths:
        tracker.log_file(path, CURVES_DIR)
    publish_flow_run_card(
        curves_markdown(run_id, paths),
        key=curves_artifact_key(run_id),
        description="Curves: training reward, held-out pass@1, truncated episodes per iteration",
    )
    get_run_logger().info("curves: %s", ", ".join(str(p) for p in paths))
    return paths
