"""What the run does after the training doctor examined a step: pure decisions over typed records.

`doctor_history(records, pass_at_1)` builds the history `diagnose` reads from the iteration
records so far (trained iterations in order, held-out pass@1 merged in by step, plus a step-0
entry, minus the collapsed stretch a rollback undid); `decide_after_step` diagnoses the run after
the latest record's step and decides the `DoctorDecision`: which findings are new, which
checkpoints to keep from pruning (the rollback target and this step's), and the action on a
reward collapse from `doctor.on_collapse`: none (warn), stop, or roll back to the last good
checkpoint (`last_good_step`). Rollbacks beyond `doctor.max_rollbacks`, or a collapse with no
good checkpoint left on disk, become a stop. An iteration that took no optimizer step because
its steps were not finite (`IterationRecord.examined_untrained`) is examined too: the doctor
names it (`nonfinite_step`) and takes no action (it moved no weights). Nothing here reads files
or logs: the caller (the loop in rl_core/loop.py, through its stages) reports and applies it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from rl_core.config import RunConfig
from rl_core.doctor.history import best_window, metric_series
from rl_core.doctor.symptoms import NONFINITE_STEP, REWARD, VAL_PASS_AT_1, Finding, diagnose
from rl_core.runs.records import IterationRecord

COLLAPSE = "reward_collapse"

DoctorAction = Literal["stop", "rollback"]


@dataclass(frozen=True)
class DoctorDecision:
    """The doctor's findings for one step and what the run does about them.

    new_findings: the findings whose symptoms were not reported before this step, in SYMPTOMS
    order. protected_steps: checkpoints (policy versions) to keep whatever
    `storage.keep_checkpoints` says. action: None (go on), "stop" or "rollback" (to step
    `rollback_to`); reason: the action in one sentence ("" without one).
    """

    new_findings: list[Finding] = field(default_factory=list)
    protected_steps: list[int] = field(default_factory=list)
    action: DoctorAction | None = None
    rollback_to: int | None = None
    reason: str = ""

    @property
    def stopped(self) -> str | None:
        """Why the run stops after this step, or None."""
        return self.reason if self.action == "stop" else None


def newly_reported(previous: Sequence[Finding], current: Sequence[Finding]) -> list[Finding]:
    """The findings of `current` whose symptom was not reported in `previous` (for quiet logs)."""
    seen = {f.symptom for f in previous}
    return [f for f in current if f.symptom not in seen]


def last_good_step(history: Sequence[Mapping[str, float]], cfg: RunConfig) -> int | None:
    """The step to roll back to after a collapse: the policy version that sampled the last batch of
    the window with the best mean training reward (entry step - 1; 0 is the starting policy).
    None without any training reward."""
    best = best_window(metric_series(history, REWARD), cfg.doctor.window)
    return None if best is None else best[0] - 1


def doctor_history(records: Sequence[IterationRecord], pass_at_1: Mapping[int, float]) -> list[dict[str, float]]:
    """The history `diagnose` reads: trained iterations in order, each with "val/pass_at_1" when its
    step was evaluated (plus a step-0 entry), minus the steps a rollback undid. An iteration whose
    every optimizer step was skipped as not finite enters with its step and `train/nonfinite_step`
    only (its rewards trained nothing, so the reward checks do not see them)."""
    history: list[dict[str, float]] = [{"step": 0, VAL_PASS_AT_1: pass_at_1[0]}] if 0 in pass_at_1 else []
    for record in records:
        if record.examined_untrained:
            history.append({"step": record.step, NONFINITE_STEP: record.metrics[NONFINITE_STEP]})
            continue
        if not record.trained:
            continue
        entry = {"iteration": record.iteration, "step": record.step, **record.metrics}
        if record.step in pass_at_1:
            entry[VAL_PASS_AT_1] = pass_at_1[record.step]
        history.append(entry)
        if record.rollback_to is not None:
            history = [h for h in history if h["step"] <= record.rollback_to]
    return history


def decide_after_step(
    records: Sequence[IterationRecord],
    pass_at_1: Mapping[int, float],
    reported: Collection[str],
    rollback_targets: Collection[int],
    cfg: RunConfig,
) -> DoctorDecision:
    """Diagnose the run after the step of `records[-1]` and decide what to do.

    records: every iteration so far, in order, the one just finished last. pass_at_1: held-out
    pass@1 by evaluated step. reported: symptoms already reported in this run. rollback_targets: the
    steps the run can roll back to now (those with a checkpoint on disk, and 0: the starting
    policy). Raises ValueError for empty `records`."""
    if not records:
        raise ValueError("decide_after_step needs the record of the step just finished")
    record = records[-1]
    history = doctor_history(records, pass_at_1)
    findings = diagnose(history, cfg)
    new = [f for f in findings if f.symptom not in reported]
    if not record.trained:  # not finite: named, nothing to act on
        return DoctorDecision(new_findings=new)
    good = last_good_step(history, cfg)
    # keep the rollback target, and this step's checkpoint: a window ending at the next step makes it the target
    protected = sorted({s for s in (good, record.step) if s is not None and s in rollback_targets})
    if not any(f.symptom == COLLAPSE for f in findings) or cfg.doctor.on_collapse == "warn":
        return DoctorDecision(new_findings=new, protected_steps=protected)
    d = cfg.doctor
    rollbacks = sum(r.rollback_to is not None for r in records)
    can_roll_back = good is not None and good in rollback_targets
    if d.on_collapse == "rollback" and can_roll_back and rollbacks < d.max_rollbacks:
        reason = (
            f"training reward collapsed; rolled back to the checkpoint of step {good} (rollback {rollbacks + 1} "
            f"of {d.max_rollbacks})"
        )
        return DoctorDecision(new, protected, "rollback", good, reason)
    cause = "no good checkpoint left" if not can_roll_back else f"{rollbacks} rollbacks already"
    why = "" if d.on_collapse == "stop" else f" (rollback not possible: {cause})"
    return DoctorDecision(new, protected, "stop", None, f"training reward collapsed; the run stops{why}")
