"""The gate decision: may a candidate checkpoint replace the champion? Pure rules, no I/O.

`decide`: a candidate is promoted only if its held-out pass@1 reaches the floor
`gate.min_pass_at_1` AND (there is no champion yet, OR `gate.require_improvement` is off, OR it
beats the champion's pass@1 strictly). The champion's pass@1 only counts when it was measured on
the same task set (`same_tasks`); when it was not and improvement is required, the candidate is
held back and the reasons say to re-evaluate the champion. Scores closer than 1e-9 count as
equal. Every decision carries its reasons in plain words, and the registry version of the
champion it was made against (`champion_version`, None when there was none): promotion is
compare-and-set on that version (tasks/promote.py), so a decision made against a champion that
has since been replaced is made again, never applied.

`best_candidate` picks what a run puts to the gate; `no_candidate_reason` says why a run has
nothing to gate. The Prefect task that logs and publishes a decision is `tasks.gate.gate_candidate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rl_core.config import GateConfig
from rl_core.evaluation import EvalReport
from rl_core.runs.records import IterationRecord

_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateDecision:
    """The gate decision on one candidate.

    Fields: `promote` (whether it may replace the champion), `reasons` (plain sentences, in order), the held-out pass@1
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
    def outcome(self) -> str:
        """ "promoted" or "rejected"."""
        return "promoted" if self.promote else "rejected"

    def as_dict(self) -> dict:
        """The decision as JSON-ready data (gate.json, the flow's summary), with its `outcome`."""
        return {**asdict(self), "outcome": self.outcome}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """The decision `as_dict` wrote (its derived `outcome`, or the older `verdict` key, is ignored)."""
        return cls(**{k: v for k, v in data.items() if k not in ("outcome", "verdict")})

    def to_markdown(self, title: str = "candidate") -> str:
        champion = "none" if self.champion_pass_at_1 is None else f"{self.champion_pass_at_1:.3f}"
        if self.champion_version is not None:
            champion += f" (version {self.champion_version})"
        lines = [
            f"# Gate: {title} {self.outcome}",
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


@dataclass(frozen=True)
class Candidate:
    """An evaluated checkpoint of a run: its held-out evaluation, registry version and step."""

    report: EvalReport
    version: str | None
    step: int


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate a run puts to the gate: the highest held-out pass@1, the latest step on ties.

    Raises ValueError for an empty sequence (see `no_candidate_reason`)."""
    if not candidates:
        raise ValueError("no candidate to gate")
    return max(candidates, key=lambda c: (c.report.pass_at_1, c.step))


@dataclass(frozen=True)
class GateRecord:
    """The gate decision on a run's candidate, as recorded in the run folder's gate.json: the
    candidate's registry `version` and `step`, and the `decision` (with the champion version it was
    made against)."""

    version: str
    step: int
    decision: GateDecision

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of gate.json."""
        return {"version": self.version, "step": self.step, "decision": self.decision.as_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateRecord:
        """What `to_dict` wrote. Raises KeyError without "version", "step" or "decision"."""
        return cls(str(data["version"]), int(data["step"]), GateDecision.from_dict(data["decision"]))


def recorded_decision(gate_record: GateRecord | None, candidate: Candidate) -> GateDecision | None:
    """The recorded gate decision when it was made on this candidate's registry version (a re-run
    re-applies it), else None (decide now)."""
    if gate_record is None or gate_record.version != candidate.version:
        return None
    return gate_record.decision


SKIP_WORDS = {"validation": "failed validation", "trainer": "took no optimizer step"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def no_candidate_reason(records: Sequence[IterationRecord]) -> str:
    """Why the run has no checkpoint to gate, in words derived from its iteration records."""
    if not records:
        return "no iteration ran"
    trained = [r for r in records if r.trained]
    if not trained:
        kinds = Counter(r.skip_kind for r in records)
        return (
            "no optimizer step was taken ("
            + ", ".join(f"{_count(n, 'iteration')} {SKIP_WORDS[k]}" for k, n in kinds.items())
            + ")"
        )
    last = trained[-1]
    if last.rollback_to is not None:
        return (
            f"the training doctor rolled the policy back to step {last.rollback_to} at iteration {last.iteration}, "
            "and no checkpoint up to that step was evaluated"
        )
    return "no checkpoint after step 0 was evaluated"
