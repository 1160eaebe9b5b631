"""Evaluate stage: held-out pass@1 (greedy), pass@k / pass^k (sampled), as a retryable Prefect task.

Publishes a markdown artifact with the summary, where a person looks for it. Given the MLflow run's
`Tracker`, `evaluate_task` also logs a sample of the greedy episodes as MLflow traces (tasks/traces.py).
`tag_evaluation_task` records on the evaluate flow's MLflow run what was evaluated;
`record_evaluation_task` records one model's evaluation on its MLflow run (tags, metrics at its
step, the report as `evaluation/report.json`).

Several models side by side (the evaluate flow): `draw_comparison` draws one PNG of the models per
environment (grouped bars: greedy pass@1, and pass@k / pass^k at the largest k when sampled), and
`publish_comparison_task` writes the comparison table (rl_core/comparison.py) and the PNG into the
evaluation's folder, logs both to an MLflow run (artifacts under `comparison/`) and publishes them
as one Prefect card on the flow run (the table, with the PNG inlined below it).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402

from rl_core.atomic import write_bytes_atomically, write_text_atomically  # noqa: E402
from rl_core.comparison import ALL, Comparison  # noqa: E402
from rl_core.evaluation import EvalReport, Evaluator, Part  # noqa: E402
from rl_core.model.policy import Policy, load_policy  # noqa: E402
from tasks.cards import markdown_image, publish_flow_run_card  # noqa: E402
from tasks.traces import trace_evaluation  # noqa: E402
from tasks.tracking import MLFLOW_RETRIES, Tracker  # noqa: E402
from tasks.validate import artifact_slug  # noqa: E402

COMPARISON_DIR = "comparison"
"""The MLflow artifact folder of a comparison (`comparison.md`, `comparison.png`)."""
REPORT_ARTIFACT = "evaluation/report.json"
"""A model's `EvalReport.to_dict()` on its MLflow run."""


def summary_markdown(run_id: str, step: int, report: EvalReport) -> str:
    lines = [f"# Evaluation of {run_id} at step {step}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{name}` | {value:.4f} |" for name, value in sorted(report.metrics.items())]
    return "\n".join(lines)


@task(name="evaluate", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def evaluate_task(
    evaluator: Evaluator,
    policy: Policy,
    run_id: str,
    samples: bool = True,
    part: Part = "all",
    tracker: Tracker | None = None,
) -> EvalReport:
    """Evaluate `policy` on the held-out split (`Evaluator.evaluate`; only its gate or selection part with
    `part`); publishes the summary artifact `eval-<run_id>-step-<version>`. With `tracker`, the greedy
    episodes the report keeps (`tracking.traced_eval_episodes` tasks) are logged as MLflow traces of that
    run (tasks/traces.py; a failure to log them is a warning)."""
    report = evaluator.evaluate(policy, samples=samples, part=part)
    step = policy.version
    get_run_logger().info(
        "step %d: held-out pass@1 %.3f %s%s",
        step,
        report.pass_at_1,
        {k: round(v, 3) for k, v in report.per_env.items()},
        "" if part == "all" else f" ({part} tasks)",
    )
    create_markdown_artifact(
        markdown=summary_markdown(run_id, step, report),
        key=f"eval-{artifact_slug(run_id)}-step-{step:03d}",
        description=f"Held-out evaluation at step {step}: pass@1 {report.pass_at_1:.3f}",
    )
    if tracker is not None:
        trace_evaluation(tracker, run_id, report)
    return report


@task(name="evaluate-checkpoint", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def evaluate_checkpoint_task(evaluator: Evaluator, checkpoint: str, part: Part = "all") -> EvalReport:
    """Evaluate another checkpoint folder (e.g. the registry champion) on the held-out tasks, greedy only; only
    the gate or the selection part of them with `part`."""
    cfg = evaluator.cfg.policy
    policy = load_policy(
        checkpoint,
        chat=cfg.chat_format,
        dtype=cfg.dtype,
        device=cfg.device,
        tool_parser=cfg.tool_parser,
        stop_token=cfg.stop_token,
    )
    report = evaluator.evaluate(policy, samples=False, part=part)
    get_run_logger().info("checkpoint %s: held-out pass@1 %.3f (%s tasks)", checkpoint, report.pass_at_1, part)
    return report


@task(name="tag-evaluation", cache_policy=NONE, **MLFLOW_RETRIES)
def tag_evaluation_task(tracker: Tracker, tags: dict[str, str]) -> None:
    """Record on the MLflow run what was evaluated."""
    for key, value in tags.items():
        tracker.client.set_tag(tracker.mlflow_run_id, key, value)


@task(name="record-evaluation", cache_policy=NONE, **MLFLOW_RETRIES)
def record_evaluation_task(tracker: Tracker, report: EvalReport, step: int, tags: dict[str, str]) -> None:
    """Record one model's evaluation on its MLflow run: `tags`, every metric of `report` at `step`, and the
    report itself (`EvalReport.to_dict()`, per-task outcomes included) as `evaluation/report.json`."""
    for key, value in tags.items():
        tracker.client.set_tag(tracker.mlflow_run_id, key, value)
    tracker.log_metrics(report.metrics, step)
    tracker.log_dict(report.to_dict(), REPORT_ARTIFACT)


# --------------------------------------------------------------------------- several models side by side


def _panels(comparison: Comparison) -> list[tuple[str, str]]:
    """(metric, title) of each panel: greedy pass@1, then pass@k and pass^k at the largest k some model sampled."""
    panels = [("pass_at_1", "greedy pass@1")]
    sampled = [
        int(c.metric.split("/")[1])
        for c in comparison.columns
        if c.metric.startswith("pass_at_k/") and any(c.metric in row for row in comparison.values[ALL].values())
    ]
    if sampled:
        k = max(sampled)
        panels += [(f"pass_at_k/{k}", f"pass@{k} (sampled)"), (f"pass_hat_k/{k}", f"pass^{k} (sampled)")]
    return panels


def draw_comparison(comparison: Comparison, path: str | Path, title: str = "Held-out evaluation") -> Path:
    """Draw the models per environment into the PNG `path` (written atomically; returns it): a panel per
    metric (greedy pass@1; with samples also pass@k and pass^k at the largest k), on each a group of bars per
    scope ("all" and each environment) with one bar per model, its value written on it. A model without a
    metric (pass@k of a greedy-only evaluation) has no bar there."""
    panels = _panels(comparison)
    scopes, labels = comparison.scopes, comparison.labels
    width = 0.8 / len(labels)
    panel_width = max(4.8, 0.6 + 0.25 * len(scopes) * (len(labels) + 1))
    figure, axes = plt.subplots(
        1, len(panels), figsize=(panel_width * len(panels), 4.2), dpi=100, squeeze=False, layout="constrained"
    )
    for axis, (metric, panel_title) in zip(axes[0], panels):
        for i, label in enumerate(labels):
            heights = [comparison.values[scope][label].get(metric, math.nan) for scope in scopes]
            offsets = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(scopes))]
            bars = axis.bar(offsets, heights, width, label=label)
            axis.bar_label(bars, labels=["" if math.isnan(h) else f"{h:.2f}" for h in heights], fontsize=7)
        axis.set_xticks(range(len(scopes)), ["all" if s == ALL else s for s in scopes], rotation=20)
        axis.set_ylim(0, 1.12)
        axis.set_title(panel_title)
        axis.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("share of tasks")
    handles, names = axes[0][0].get_legend_handles_labels()
    columns = 1 if max(len(n) for n in names) > 30 else min(len(names), 4)  # long checkpoint paths: one a line
    figure.legend(handles, names, loc="outside lower center", ncol=columns, fontsize=8, frameon=False)
    figure.suptitle(title)
    png = io.BytesIO()
    figure.savefig(png, format="png", bbox_inches="tight")  # never cut off a long legend entry
    plt.close(figure)
    return write_bytes_atomically(path, png.getvalue())


@task(name="publish-comparison", cache_policy=NONE, **MLFLOW_RETRIES)
def publish_comparison_task(
    run_id: str, comparison: Comparison, markdown: str, folder: str | Path, tracker: Tracker
) -> tuple[Path, Path]:
    """Write `markdown` (the comparison table) and the PNG (`draw_comparison`) as `comparison.md` and
    `comparison.png` into `folder`, log both to `tracker`'s MLflow run under `comparison/`, and publish them
    as one Prefect card on the flow run, `eval-comparison-<run_id>` (the table with the picture inlined below
    it). Returns the two paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = write_text_atomically(folder / "comparison.md", markdown)
    plot = draw_comparison(comparison, folder / "comparison.png", title=f"Held-out evaluation {run_id}")
    for path in (table, plot):
        tracker.log_file(path, COMPARISON_DIR)
    slug = artifact_slug(run_id)
    publish_flow_run_card(
        markdown=f"{markdown}\n\n{markdown_image(plot, 'models per environment')}\n",
        key=f"eval-comparison-{slug}",
        description=f"Models side by side on the same held-out tasks: table and picture (also in MLflow under "
        f"{COMPARISON_DIR}/)",
    )
    get_run_logger().info("comparison: %s, %s", table, plot)
    return table, plot
