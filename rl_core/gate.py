"""The gate decision: may a candidate checkpoint replace the champion? Pure rules, no I/O.

The gate compares the candidate with a baseline on the same gate tasks (the gate part of the held-out split,
`rl_core/heldout_split.py`, never used to choose the candidate): the registry champion, or, when there is
none yet, the starting policy of the run. Two rules (`gate.rule`):

- `paired_test` (default), `decide`: every threshold must hold, each named by its config field in the
  decision's reasons: `min_pass_at_1` (a floor on the candidate's gate pass@1), `max_truncated_frac` and
  `max_env_error_frac` (of the candidate's greedy gate episodes), `env_tolerance` (no environment's gate
  pass@1 below the baseline's by more than this) and, with `require_improvement`, `confidence` /
  `min_effect`: the exact McNemar test on the per-task outcomes (`rl_core/paired_test.py`) shows the
  candidate better at that confidence by at least that much pass@1.
- `simple`, `decide_simple`: the floor, and (with `require_improvement`) a strictly higher pass@1 than the
  baseline's by any margin. Kept for comparison with older runs; it promotes on noise.

Scores closer than 1e-9 count as equal. Every decision carries its reasons in plain words and every number
it was made on (`GateDecision.checks`, `paired`, `per_env`), and the registry version of the champion it was
made against (`champion_version`, None when there was none): promotion is compare-and-set on that version
(tasks/promote.py), so a decision made against a champion that has since been replaced is made again, never
applied.

`best_candidate` picks what a run puts to the gate (by pass@1 on the selection part); `no_candidate_reason`
says why a run has nothing to gate. The Prefect task that logs and publishes a decision is
`tasks.gate.gate_candidate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rl_core.config import GateConfig
from rl_core.evaluation import EvalReport
from rl_core.paired_test import mcnemar_exact
from rl_core.runs.records import IterationRecord

_TOLERANCE = 1e-9

STARTING_POLICY = "starting policy"
"""The baseline's name when there is no champion yet."""


@dataclass(frozen=True)
class Check:
    """One threshold of the gate: `name` (its config field under `gate.`), whether it `passed`, the measured
    `value` and the `threshold` it was held to (None where the check has no single number), and `reason`,
    one plain sentence."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    reason: str


@dataclass(frozen=True)
class GateDecision:
    """The gate decision on one candidate.

    `promote` (whether it may replace the champion); `reasons` (plain sentences, in order); the gate pass@1
    of the candidate and of the baseline it was compared with (fractions of gate tasks solved, 0..1;
    `baseline_pass_at_1` None when there was nothing to compare with); `floor` (`gate.min_pass_at_1`);
    `champion_version`: the registry version that held the alias `champion` when the decision was made
    (None: no champion), which promotion checks before moving the alias. `rule` (`gate.rule`),
    `baseline` (what was beaten or not: "champion version N", "starting policy", None), `gate_tasks`
    (tasks compared), `checks` (every threshold, `Check` as a dict), `paired` (the McNemar test: tasks,
    candidate_only, champion_only (the baseline's), p_value, difference, confidence, min_effect; None
    when not run) and `per_env` (environment -> {"candidate", "baseline"} gate pass@1).
    """

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_pass_at_1: float = 0.0
    baseline_pass_at_1: float | None = None
    floor: float = 0.0
    champion_version: str | None = None
    rule: str = "simple"
    baseline: str | None = None
    gate_tasks: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    paired: dict[str, Any] | None = None
    per_env: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """ "promoted" or "rejected"."""
        return "promoted" if self.promote else "rejected"

    def as_dict(self) -> dict:
        """The decision as JSON-ready data (gate.json, the flow's summary), with its `outcome`."""
        return {**asdict(self), "outcome": self.outcome}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateDecision:
        """The decision `as_dict` wrote (its derived `outcome`, or the older `verdict` key, is ignored; an older
        record's `champion_pass_at_1` is its `baseline_pass_at_1`)."""
        values = {k: v for k, v in data.items() if k not in ("outcome", "verdict", "champion_pass_at_1")}
        if "champion_pass_at_1" in data and "baseline_pass_at_1" not in data:
            values["baseline_pass_at_1"] = data["champion_pass_at_1"]
            values.setdefault("baseline", None if data["champion_pass_at_1"] is None else "champion")
        return cls(**values)

    def to_markdown(self, title: str = "candidate") -> str:
        """The decision for a person: the scores, every check with its number and threshold, the paired test,
        the environments, the reasons."""
        baseline = "none" if self.baseline_pass_at_1 is None else f"{self.baseline_pass_at_1:.3f}"
        lines = [
            f"# Gate: {title} {self.outcome}",
            "",
            f"Rule `{self.rule}`, {self.gate_tasks} gate tasks, compared with: {self.baseline or 'nothing'}"
            + (
                ""
                if self.champion_version is None or "champion" in (self.baseline or "")
                else f" (champion version {self.champion_version})"
            ),
            "",
            "| gate pass@1 | value |",
            "| --- | --- |",
            f"| candidate | {self.candidate_pass_at_1:.3f} |",
            f"| {self.baseline or 'baseline'} | {baseline} |",
            f"| floor | {self.floor:.3f} |",
        ]
        if self.checks:
            lines += ["", "| check | value | threshold | passed |", "| --- | --- | --- | --- |"]
            lines += [
                f"| `gate.{c['name']}` | {_number(c['value'])} | {_number(c['threshold'])} | "
                f"{'yes' if c['passed'] else '**no**'} |"
                for c in self.checks
            ]
        if self.paired:
            p = self.paired
            lines += [
                "",
                "| exact McNemar | value |",
                "| --- | --- |",
                f"| tasks | {p['tasks']} |",
                f"| solved by the candidate only | {p['candidate_only']} |",
                f"| solved by the {self.baseline or 'baseline'} only | {p['champion_only']} |",
                f"| difference in pass@1 | {p['difference']:+.3f} |",
                f"| one-sided exact McNemar p-value | {_p_value(p['p_value'])} |",
            ]
        if self.per_env:
            lines += ["", "| environment | candidate | baseline |", "| --- | --- | --- |"]
            lines += [
                f"| {env} | {_number(v['candidate'])} | {_number(v['baseline'])} |" for env, v in self.per_env.items()
            ]
        lines += ["", "Reasons:", "", *(f"- {reason}" for reason in self.reasons)]
        return "\n".join(lines)


def _p_value(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _at_least(value: float, bound: float) -> bool:
    return value >= bound or math.isclose(value, bound, abs_tol=_TOLERANCE)


def _at_most(value: float, bound: float) -> bool:
    return value <= bound or math.isclose(value, bound, abs_tol=_TOLERANCE)


def _floor_check(candidate: float, cfg: GateConfig) -> Check:
    floor = cfg.min_pass_at_1
    passed = _at_least(candidate, floor)
    reason = f"gate pass@1 {candidate:.3f} {'reaches' if passed else 'is below'} the floor {floor:.3f}"
    return Check("min_pass_at_1", passed, candidate, floor, reason)


def decide_simple(
    candidate: float,
    baseline: float | None,
    cfg: GateConfig,
    *,
    champion_version: str | None = None,
    baseline_name: str | None = None,
    gate_tasks: int = 0,
) -> GateDecision:
    """The `simple` rule on pass@1 scores of the same tasks (fractions, 0..1; `baseline` None = nothing to
    compare with): the floor `gate.min_pass_at_1`, and with `gate.require_improvement` a strictly higher
    pass@1 than the baseline's, by any margin. `baseline_name` says what the baseline is (default: the
    champion, or nothing when `baseline` is None)."""
    name = baseline_name or (None if baseline is None else "champion")
    result = {
        "candidate_pass_at_1": candidate,
        "baseline_pass_at_1": baseline,
        "floor": cfg.min_pass_at_1,
        "champion_version": None if champion_version is None else str(champion_version),
        "rule": "simple",
        "baseline": name,
        "gate_tasks": gate_tasks,
    }
    if math.isnan(candidate):
        return GateDecision(False, ["the candidate's gate pass@1 is not a number"], **result)
    floor = _floor_check(candidate, cfg)
    reasons = [floor.reason]
    if baseline is None:
        reasons.append("there is nothing to compare with")
        better = True
    elif not cfg.require_improvement:
        reasons.append(
            f"improvement over the {name} ({baseline:.3f}) is not required (gate.require_improvement is off)"
        )
        better = True
    elif candidate > baseline and not math.isclose(candidate, baseline, abs_tol=_TOLERANCE):
        reasons.append(f"it beats the {name}'s pass@1 {baseline:.3f} by {candidate - baseline:.3f}")
        better = True
    elif math.isclose(candidate, baseline, abs_tol=_TOLERANCE):
        reasons.append(f"it only ties the {name}'s pass@1 {baseline:.3f}, and improvement is required")
        better = False
    else:
        reasons.append(f"it is worse than the {name}'s pass@1 {baseline:.3f} by {baseline - candidate:.3f}")
        better = False
    return GateDecision(floor.passed and better, reasons, checks=[asdict(floor)], **result)


def decide(
    candidate: EvalReport,
    baseline: EvalReport | None,
    cfg: GateConfig,
    *,
    baseline_name: str | None = None,
    champion_version: str | None = None,
) -> GateDecision:
    """Decide on the candidate's greedy evaluation of the gate tasks against the baseline's on the same tasks
    (`baseline` None: nothing to compare with; `baseline_name`: "champion version N" or `STARTING_POLICY`).
    The rule is `cfg.rule` (module docstring); `champion_version` is carried on the decision for the
    compare-and-set. A baseline scored on other tasks cannot be compared: improvement is then not shown and
    the reasons say to re-evaluate it."""
    name = baseline_name or (None if baseline is None else "champion")
    if cfg.rule == "simple":
        return decide_simple(
            candidate.pass_at_1,
            None if baseline is None else baseline.pass_at_1,
            cfg,
            champion_version=champion_version,
            baseline_name=name,
            gate_tasks=len(candidate.task_success),
        )
    score = candidate.pass_at_1
    metrics = candidate.metrics
    checks = [_floor_check(score, cfg)]
    checks.append(
        _rate_check(
            "max_truncated_frac", metrics.get("val/truncated_frac", 0.0), cfg.max_truncated_frac, "were truncated"
        )
    )
    checks.append(
        _rate_check(
            "max_env_error_frac", metrics.get("val/env_error_frac", 0.0), cfg.max_env_error_frac, "ended as env_error"
        )
    )
    per_env = {env: {"candidate": value, "baseline": None} for env, value in candidate.per_env.items()}
    paired = None
    if baseline is None:
        reasons_tail = ["there is nothing to compare with"]
    else:
        for env, value in baseline.per_env.items():
            per_env.setdefault(env, {"candidate": None, "baseline": None})["baseline"] = value
        checks.append(_env_check(per_env, name, cfg))
        reasons_tail = []
        if cfg.require_improvement:
            check, paired = _improvement_check(candidate, baseline, name, cfg)
            checks.append(check)
        else:
            reasons_tail.append(f"improvement over the {name} is not required (gate.require_improvement is off)")
    promote = all(c.passed for c in checks)
    return GateDecision(
        promote,
        [c.reason for c in checks] + reasons_tail,
        candidate_pass_at_1=score,
        baseline_pass_at_1=None if baseline is None else baseline.pass_at_1,
        floor=cfg.min_pass_at_1,
        champion_version=None if champion_version is None else str(champion_version),
        rule="paired_test",
        baseline=name,
        gate_tasks=len(candidate.task_success),
        checks=[asdict(c) for c in checks],
        paired=paired,
        per_env=per_env,
    )


def _rate_check(name: str, value: float, limit: float, what: str) -> Check:
    """A share of the candidate's greedy gate episodes held to an upper limit (`gate.<name>`)."""
    passed = _at_most(value, limit)
    reason = f"{value:.3f} of the gate episodes {what} ({'within' if passed else 'above'} the limit {limit:.3f})"
    return Check(name, passed, value, limit, reason)


def _env_check(per_env: dict[str, dict[str, float | None]], name: str, cfg: GateConfig) -> Check:
    """No environment's candidate pass@1 below the baseline's by more than `gate.env_tolerance`."""
    drops = {env: v["baseline"] - (v["candidate"] or 0.0) for env, v in per_env.items() if v["baseline"] is not None}
    worst = max(drops.values(), default=0.0)
    over = {env: d for env, d in drops.items() if d > cfg.env_tolerance + _TOLERANCE}
    if over:
        named = ", ".join(
            f"{env} (pass@1 {per_env[env]['candidate'] or 0.0:.3f} vs {per_env[env]['baseline']:.3f}, -{d:.3f})"
            for env, d in sorted(over.items(), key=lambda item: -item[1])
        )
        reason = f"it regresses beyond the tolerance {cfg.env_tolerance:.3f} against the {name} in: {named}"
        return Check("env_tolerance", False, worst, cfg.env_tolerance, reason)
    reason = (
        f"no environment falls below the {name} by more than {cfg.env_tolerance:.3f} "
        f"(largest drop {max(worst, 0.0):.3f})"
    )
    return Check("env_tolerance", True, worst, cfg.env_tolerance, reason)


def _improvement_check(
    candidate: EvalReport, baseline: EvalReport, name: str, cfg: GateConfig
) -> tuple[Check, dict[str, Any] | None]:
    """The exact McNemar test of the candidate against the baseline on the same gate tasks."""
    try:
        test = mcnemar_exact(candidate.task_success, baseline.task_success)
    except ValueError as err:
        reason = f"improvement over the {name} cannot be shown: {err}; re-evaluate the {name} on the gate tasks"
        return Check("confidence", False, None, cfg.confidence, reason), None
    paired = {**asdict(test), "confidence": cfg.confidence, "min_effect": cfg.min_effect}
    shown = test.shows_improvement(cfg.confidence, cfg.min_effect)
    evidence = (
        f"{test.candidate_only} gate tasks solved by the candidate alone and {test.champion_only} by the {name} "
        f"alone out of {test.tasks}: pass@1 {test.difference:+.3f}, "
        f"one-sided exact McNemar p = {_p_value(test.p_value)}"
    )
    if shown:
        reason = (
            f"it improves on the {name} at confidence {cfg.confidence} by at least {cfg.min_effect:.3f} ({evidence})"
        )
    elif test.p_value > 1.0 - cfg.confidence:
        reason = (
            f"improvement over the {name} is not shown at confidence {cfg.confidence} "
            f"(needs p <= {1.0 - cfg.confidence:.3f}; {evidence})"
        )
    else:
        reason = f"the improvement over the {name} is below gate.min_effect {cfg.min_effect:.3f} ({evidence})"
    return Check("confidence", shown, test.p_value, round(1.0 - cfg.confidence, 12), reason), paired


@dataclass(frozen=True)
class Candidate:
    """An evaluated checkpoint of a run: its held-out evaluation, registry version and step."""

    report: EvalReport
    version: str | None
    step: int


def best_candidate(candidates: Sequence[Candidate]) -> Candidate:
    """The candidate a run puts to the gate: the highest pass@1 on the selection part of the held-out split
    (never on the gate part: the gate must not see a score that chose), the latest step on ties.

    Raises ValueError for an empty sequence (see `no_candidate_reason`)."""
    if not candidates:
        raise ValueError("no candidate to gate")
    return max(candidates, key=lambda c: (c.report.selection_pass_at_1, c.step))


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
