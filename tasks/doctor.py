"""Doctor stage: the training doctor after every step, as a Prefect task, and its findings artifact.

`examine_step_task` asks `rl_core.doctor.decide_after_step` (pure: the history built from the
typed iteration records, `diagnose`, and the action on a reward collapse from
`doctor.on_collapse`) and logs each new symptom with its metric and first change to try, and the
action. The loop (rl_core/loop.py) applies the decision. `publish_findings_task` publishes what
was seen as a Prefect markdown card on the flow run at the end of the run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.config import RunConfig
from rl_core.doctor import DoctorDecision, Finding, decide_after_step
from rl_core.runs.records import IterationRecord
from tasks.cards import publish_flow_run_card
from tasks.validate import artifact_slug


@task(name="training-doctor", cache_policy=NONE)
def examine_step_task(
    records: Sequence[IterationRecord],
    pass_at_1: Mapping[int, float],
    reported: Collection[str],
    rollback_targets: Collection[int],
    cfg: RunConfig,
) -> DoctorDecision:
    """The doctor's decision after the step of `records[-1]` (see `decide_after_step` for the
    arguments), with each new finding and the action logged as a warning."""
    logger = get_run_logger()
    decision = decide_after_step(records, pass_at_1, reported, rollback_targets, cfg)
    for finding in decision.new_findings:
        logger.warning(
            "doctor, step %d: %s (%s = %.4g, threshold %.4g). First change to try: %s",
            finding.step,
            finding.message,
            finding.metric,
            finding.value,
            finding.threshold,
            finding.first_change,
        )
    if decision.action is not None:
        logger.warning("doctor: %s", decision.reason)
    return decision


def findings_markdown(run_id: str, findings: list[Finding], stopped: str | None) -> str:
    """The doctor's findings of a run as a markdown table (and why it stopped, if it did)."""
    lines = [f"# Training doctor: `{run_id}`", ""]
    if not findings:
        lines.append("No symptoms seen.")
    else:
        lines += [
            "| step | symptom | metric | value | threshold | first change to try |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {f.step} | {f.symptom} | `{f.metric}` | {f.value:.4g} | {f.threshold:.4g} | {f.first_change} |"
            for f in findings
        ]
    if stopped:
        lines += ["", f"**Stopped:** {stopped}"]
    return "\n".join(lines) + "\n"


@task(name="publish-doctor-findings", cache_policy=NONE)
def publish_findings_task(run_id: str, findings: list[Finding], stopped: str | None) -> None:
    """Publish the run's doctor findings as the `doctor-<run>` markdown card on the flow run."""
    publish_flow_run_card(
        findings_markdown(run_id, findings, stopped),
        key=f"doctor-{artifact_slug(run_id)}",
        description=doctor_description(findings, stopped),
    )


def doctor_description(findings: list[Finding], stopped: str | None) -> str:
    """One line for the doctor's card: how many symptoms, which, and whether the run was stopped."""
    if not findings:
        text = "Training doctor: no symptoms seen"
    else:
        names = ", ".join(dict.fromkeys(f.symptom for f in findings))
        text = f"Training doctor: {len(findings)} symptom{'s' if len(findings) != 1 else ''} ({names})"
    return text + ("; the run was stopped" if stopped else "")
