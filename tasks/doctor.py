"""Doctor stage: the training doctor after every step, and what the run does about a collapse.

`examine_step_task(run, records, pass_at_1, reported)` builds the doctor's view of the run (the
iteration records so far, this step's last, with held-out pass@1 merged in by step, and without
the collapsed stretch a rollback undid), runs `rl_core.doctor.diagnose`, logs each symptom not
reported before with its metric and first change to try, and decides the action on a reward
collapse from `doctor.on_collapse`: nothing (warn), stop, or roll back to the last good
checkpoint (`last_good_step`), which the run protects from pruning. Rollbacks beyond
`doctor.max_rollbacks` become a stop. An iteration that took no optimizer step because its steps
were not finite is examined too (`examined_untrained`): the doctor names it (`nonfinite_step`)
and takes no action. `publish_findings_task` publishes what was seen as a Prefect markdown
artifact at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from rl_core.doctor import NONFINITE_STEP, diagnose, last_good_step
from rl_core.run import TrainingRun
from tasks.validate import artifact_slug

COLLAPSE = "reward_collapse"


@dataclass
class DoctorVerdict:
    """The doctor's findings for one step and the action the run takes."""

    new_findings: list[dict[str, Any]] = field(default_factory=list)
    action: str | None = None  # None, "stop" or "rollback"
    rollback_to: int | None = None
    reason: str = ""


def examined_untrained(record: dict[str, Any]) -> bool:
    """Whether an iteration that took no optimizer step is still examined: its steps were skipped as
    not finite (`train/nonfinite_step`), a fault the doctor names (`nonfinite_step`)."""
    value = record.get(NONFINITE_STEP)
    return not record["trained"] and isinstance(value, (int, float)) and value > 0


def doctor_history(records: list[dict[str, Any]], evaluations: dict[int, float]) -> list[dict[str, Any]]:
    """The history the doctor reads: trained iterations in order, each with "val/pass_at_1" when its
    step was evaluated (plus a step-0 entry), minus the steps a rollback undid. An iteration whose
    every optimizer step was skipped as not finite (`examined_untrained`) enters with its step and
    `train/nonfinite_step` only (its rewards trained nothing, so the reward checks do not see them)."""
    history: list[dict[str, Any]] = [{"step": 0, "val/pass_at_1": evaluations[0]}] if 0 in evaluations else []
    for record in records:
        if examined_untrained(record):
            history.append({"step": record["step"], NONFINITE_STEP: record[NONFINITE_STEP]})
            continue
        if not record["trained"]:
            continue
        entry = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if record["step"] in evaluations:
            entry["val/pass_at_1"] = evaluations[record["step"]]
        history.append(entry)
        if record.get("rollback_to") is not None:
            history = [h for h in history if h["step"] <= record["rollback_to"]]
    return history


def _rollbacks_so_far(records: list[dict[str, Any]]) -> int:
    return sum(r.get("rollback_to") is not None for r in records)


@task(name="training-doctor", cache_policy=NONE)
def examine_step_task(
    run: TrainingRun, records: list[dict[str, Any]], pass_at_1: dict[int, float], reported: list[dict[str, Any]]
) -> DoctorVerdict:
    """Diagnose the run after the step of `records[-1]` (`records`: every iteration so far, in order;
    `pass_at_1`: held-out pass@1 by evaluated step; `reported`: findings already reported)."""
    logger = get_run_logger()
    record = records[-1]
    history = doctor_history(records, pass_at_1)
    findings = diagnose(history, run.cfg)
    known = {f["symptom"] for f in reported}
    verdict = DoctorVerdict(new_findings=[f.as_dict() for f in findings if f.symptom not in known])
    for finding in verdict.new_findings:
        logger.warning(
            "doctor, step %d: %s (%s = %.4g, threshold %.4g). First change to try: %s",
            finding["step"],
            finding["message"],
            finding["metric"],
            finding["value"],
            finding["threshold"],
            finding["first_change"],
        )
    if not record["trained"]:  # a non-finite iteration (examined_untrained): named, nothing to act on
        return verdict
    good = last_good_step(history, run.cfg)
    # keep the rollback target, and this step's checkpoint: a window ending at the next step makes it the target
    run.protected_steps = {s for s in (good, record["step"]) if s is not None and run.can_roll_back_to(s)}
    if not any(f.symptom == COLLAPSE for f in findings) or run.cfg.doctor.on_collapse == "warn":
        return verdict
    return _collapse_action(run, verdict, good, _rollbacks_so_far(records))


def _collapse_action(run: TrainingRun, verdict: DoctorVerdict, good: int | None, rollbacks: int) -> DoctorVerdict:
    logger = get_run_logger()
    cfg = run.cfg.doctor
    can_roll_back = good is not None and run.can_roll_back_to(good)
    if cfg.on_collapse == "rollback" and can_roll_back and rollbacks < cfg.max_rollbacks:
        verdict.action, verdict.rollback_to = "rollback", good
        verdict.reason = (
            f"training reward collapsed; rolled back to the checkpoint of step {good} (rollback {rollbacks + 1} "
            f"of {cfg.max_rollbacks})"
        )
    else:
        cause = "no good checkpoint left" if not can_roll_back else f"{rollbacks} rollbacks already"
        why = "" if cfg.on_collapse == "stop" else f" (rollback not possible: {cause})"
        verdict.action, verdict.reason = "stop", f"training reward collapsed; the run stops{why}"
    logger.warning("doctor: %s", verdict.reason)
    return verdict


def findings_markdown(run_id: str, findings: list[dict[str, Any]], stopped: str | None) -> str:
    lines = [f"# Training doctor: `{run_id}`", ""]
    if not findings:
        lines.append("No symptoms seen.")
    else:
        lines += [
            "| step | symptom | metric | value | threshold | first change to try |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [
            f"| {f['step']} | {f['symptom']} | `{f['metric']}` | {f['value']:.4g} | {f['threshold']:.4g} "
            f"| {f['first_change']} |"
            for f in findings
        ]
    if stopped:
        lines += ["", f"**Stopped:** {stopped}"]
    return "\n".join(lines) + "\n"


@task(name="publish-doctor-findings", cache_policy=NONE)
def publish_findings_task(run_id: str, findings: list[dict[str, Any]], stopped: str | None) -> None:
    create_markdown_artifact(
        markdown=findings_markdown(run_id, findings, stopped),
        key=f"doctor-{artifact_slug(run_id)}",
        description=f"training doctor: {len(findings)} symptom(s)" + (", run stopped" if stopped else ""),
    )
