"""Gate stage: may a candidate checkpoint replace the champion?

Contract: `decide` is pure. A candidate is promoted only if its held-out pass@1 reaches the
floor `gate.min_pass_at_1` AND (there is no champion yet, OR `gate.require_improvement` is
off, OR it beats the champion's pass@1 strictly). The champion's pass@1 only counts when it
was measured on the same task set (`same_tasks`); when it was not and improvement is
required, the candidate is held back and the reasons say to re-evaluate the champion.
Scores closer than 1e-9 count as equal. Every decision carries its reasons in plain words, and
the registry version of the champion it was made against (`champion_version`, None when there
was none): promotion is compare-and-set on that version (tasks/promote.py), so a decision made
against a champion that has since been replaced is made again, never applied.

`gate_candidate` is the Prefect task: it decides, logs the decision and publishes it as a
markdown artifact (key `gate-decision`). A decision is a verdict, so it never retries, and it is
never cached (each gate publishes its own artifact).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from rl_core.config import GateConfig

_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on one candidate.

    Fields: `promote` (the verdict), `reasons` (plain sentences, in order), the held-out pass@1
    of the candidate and of the champion it was compared with (fractions of tasks solved,
    0..1; `champion_pass_at_1` None when there was no champion), the floor
    (`gate.min_pass_at_1`) and `champion_version`: the registry version that held the alias
    `champion` when the decision was made (None: no champion), which promotion checks before
    moving the alias.
    """

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_pass_at_1: float = 0.0
    champion_pass_at_1: float | None = None
    floor: float = 0.0
    champion_version: str | None = None

    @property
    def verdict(self) -> str:
        return "promoted" if self.promote else "rejected"

    def as_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    def to_markdown(self, title: str = "candidate") -> str:
        champion = "none" if self.champion_pass_at_1 is None else f"{self.champion_pass_at_1:.3f}"
        if self.champion_version is not None:
            champion += f" (version {self.champion_version})"
        lines = [
            f"# Gate: {title} {self.verdict}",
            "",
            "| held-out pass@1 | value |",
            "| --- | --- |",
            f"| candidate | {self.candidate_pass_at_1:.3f} |",
            f"| champion | {champion} |",
            f"| floor | {self.floor:.3f} |",
            "",
            "Reasons:",
            "",
            *(f"- {reason}" for reason in self.reasons),
        ]
        return "\n".join(lines)


def _at_least(value: float, bound: float) -> bool:
    return value >= bound or math.isclose(value, bound, abs_tol=_TOLERANCE)


def decide(
    candidate: float,
    champion: float | None,
    cfg: GateConfig,
    *,
    same_tasks: bool = True,
    champion_version: str | None = None,
) -> GateDecision:
    """Apply the gate rules to held-out pass@1 scores (`champion` None = no champion yet).

    `champion_version` is the registry version whose score `champion` is; it is carried on the
    decision so that promotion can check the champion is still that version."""
    floor = cfg.min_pass_at_1
    result = {
        "candidate_pass_at_1": candidate,
        "champion_pass_at_1": champion,
        "floor": floor,
        "champion_version": None if champion_version is None else str(champion_version),
    }
    if math.isnan(candidate):
        return GateDecision(False, ["the candidate's held-out pass@1 is not a number"], **result)

    reasons = []
    clears_floor = _at_least(candidate, floor)
    if clears_floor:
        reasons.append(f"held-out pass@1 {candidate:.3f} reaches the floor {floor:.3f}")
    else:
        reasons.append(f"held-out pass@1 {candidate:.3f} is below the floor {floor:.3f}")

    if champion is None:
        reasons.append("there is no champion yet")
        beats_champion = True
    elif not cfg.require_improvement:
        reasons.append(
            f"improvement over the champion ({champion:.3f}) is not required (gate.require_improvement is off)"
        )
        beats_champion = True
    elif not same_tasks:
        reasons.append(
            f"the champion's pass@1 {champion:.3f} was measured on a different task set, so the two cannot be "
            "compared; re-evaluate the champion on the candidate's tasks"
        )
        beats_champion = False
    elif candidate > champion and not math.isclose(candidate, champion, abs_tol=_TOLERANCE):
        reasons.append(f"it beats the champion's pass@1 {champion:.3f} by {candidate - champion:.3f}")
        beats_champion = True
    elif math.isclose(candidate, champion, abs_tol=_TOLERANCE):
        reasons.append(f"it only ties the champion's pass@1 {champion:.3f}, and improvement is required")
        beats_champion = False
    else:
        reasons.append(f"it is worse than the champion's pass@1 {champion:.3f} by {champion - candidate:.3f}")
        beats_champion = False
    return GateDecision(clears_floor and beats_champion, reasons, **result)


@task(name="gate-candidate", cache_policy=NONE)
def gate_candidate(
    candidate_pass_at_1: float,
    champion_pass_at_1: float | None,
    cfg: GateConfig,
    *,
    same_tasks: bool = True,
    champion_version: str | None = None,
    label: str = "candidate",
) -> GateDecision:
    """Decide, log the decision with its reasons and publish it as the `gate-decision` artifact.

    `champion_version`: the registry version whose pass@1 `champion_pass_at_1` is (see `decide`)."""
    decision = decide(
        candidate_pass_at_1, champion_pass_at_1, cfg, same_tasks=same_tasks, champion_version=champion_version
    )
    get_run_logger().info("gate: %s %s (%s)", label, decision.verdict, "; ".join(decision.reasons))
    create_markdown_artifact(
        key="gate-decision",
        markdown=decision.to_markdown(label),
        description=f"Gate decision for {label}: {decision.verdict}",
    )
    return decision
