"""Evaluate stage: held-out pass@1 (greedy), pass@k / pass^k (sampled), as a retryable Prefect task.

Publishes a markdown artifact with the summary, where a person looks for it.
`tag_evaluation_task` records on the evaluate flow's MLflow run what was evaluated.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from rl_core.evaluation import EvalReport, Evaluator
from rl_core.model.policy import Policy, load_policy
from tasks.tracking import MLFLOW_RETRIES, Tracker
from tasks.validate import artifact_slug


def summary_markdown(run_id: str, step: int, report: EvalReport) -> str:
    lines = [f"# Evaluation of {run_id} at step {step}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| `{name}` | {value:.4f} |" for name, value in sorted(report.metrics.items())]
    return "\n".join(lines)


@task(name="evaluate", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def evaluate_task(evaluator: Evaluator, policy: Policy, run_id: str, samples: bool = True) -> EvalReport:
    """Evaluate `policy` on the held-out split (`Evaluator.evaluate`); publishes the summary artifact
    `eval-<run_id>-step-<version>`."""
    report = evaluator.evaluate(policy, samples=samples)
    step = policy.version
    get_run_logger().info(
        "step %d: held-out pass@1 %.3f %s", step, report.pass_at_1, {k: round(v, 3) for k, v in report.per_env.items()}
    )
    create_markdown_artifact(
        markdown=summary_markdown(run_id, step, report),
        key=f"eval-{artifact_slug(run_id)}-step-{step}",
        description="held-out evaluation",
    )
    return report


@task(name="evaluate-checkpoint", retries=2, retry_delay_seconds=[2, 8], cache_policy=NONE)
def evaluate_checkpoint_task(evaluator: Evaluator, checkpoint: str) -> EvalReport:
    """Evaluate another checkpoint folder (e.g. the registry champion) on the held-out tasks, greedy only."""
    cfg = evaluator.cfg.policy
    policy = load_policy(
        checkpoint,
        chat=cfg.chat_format,
        dtype=cfg.dtype,
        device=cfg.device,
        tool_parser=cfg.tool_parser,
        stop_token=cfg.stop_token,
    )
    report = evaluator.evaluate(policy, samples=False)
    get_run_logger().info("checkpoint %s: held-out pass@1 %.3f", checkpoint, report.pass_at_1)
    return report


@task(name="tag-evaluation", cache_policy=NONE, **MLFLOW_RETRIES)
def tag_evaluation_task(tracker: Tracker, tags: dict[str, str]) -> None:
    """Record on the MLflow run what was evaluated."""
    for key, value in tags.items():
        tracker.client.set_tag(tracker.mlflow_run_id, key, value)
