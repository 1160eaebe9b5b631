"""Gate stage: decide whether a candidate may replace the champion, log it, publish it, and promote.

The rules are `rl_core.gate.decide` (pure). `gate_candidate` is the Prefect task: it decides on the
candidate's and the baseline's greedy evaluations of the gate tasks, logs the decision and publishes it as
a markdown artifact whose key names what was gated (`gate_artifact_key`: `gate-<run id>` for a training run,
`gate-<registered model>-v<version>` for the promote flow), so each decision is found apart in the Prefect
UI. A decision is not a fault, so it never retries, and it is never cached (each gate publishes its own
artifact). The baseline is the registry champion, re-evaluated on the
candidate's gate tasks (`gate_baseline`), or, with no champion yet, the starting policy. `gate_run` gates a
training run's best candidate once and promotes it by compare-and-set, re-applying a recorded decision on a
re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.config import GateConfig, RunConfig
from rl_core.evaluation import EvalReport
from rl_core.gate import (
    STARTING_POLICY,
    Candidate,
    GateDecision,
    GateRecord,
    best_candidate,
    decide,
    recorded_decision,
)
from rl_core.runs.ledger import RunLedger
from tasks.cards import publish_flow_run_card
from tasks.promote import Champion, PromotionResult, champion_task, promote_task, settle_promotion
from tasks.validate import artifact_slug


@task(name="gate-candidate", cache_policy=NONE)
def gate_candidate(
    candidate: EvalReport,
    baseline: EvalReport | None,
    cfg: GateConfig,
    *,
    baseline_name: str | None = None,
    champion_version: str | None = None,
    label: str = "candidate",
    key: str,
) -> GateDecision:
    """Decide (`rl_core.gate.decide`) on the candidate's and the baseline's greedy evaluations of the same gate
    tasks, log the decision with its reasons and publish it as the markdown card `key` (`gate_artifact_key`) on
    the flow run.
    `champion_version`: the registry version holding `champion` when deciding (None: none)."""
    decision = decide(candidate, baseline, cfg, baseline_name=baseline_name, champion_version=champion_version)
    get_run_logger().info("gate: %s %s (%s)", label, decision.outcome, "; ".join(decision.reasons))
    publish_flow_run_card(
        decision.to_markdown(label),
        key=key,
        description=f"Gate decision on {label}: {decision.outcome}",
    )
    return decision


def gate_artifact_key(what: str) -> str:
    """The Prefect artifact key of a gate decision on `what` (a run id, or "<registered model>-v<version>"):
    "gate-" and `what` in lowercase letters, digits and dashes."""
    return f"gate-{artifact_slug(what)}"


def gate_baseline(
    cfg: RunConfig,
    candidate_version: str | None,
    candidate: EvalReport,
    starting: Callable[[], EvalReport],
    evaluate_champion: Callable[[Champion], EvalReport],
) -> tuple[str | None, str, EvalReport]:
    """What the candidate must beat, on its gate tasks: (champion version or None, the baseline's name, its
    greedy evaluation of the gate tasks). The champion is evaluated now (`evaluate_champion`) unless it is the
    candidate itself (`candidate` stands for it); with no champion, the starting policy (`starting()`)."""
    champion, _ = champion_task(cfg)
    if champion is None:
        return None, STARTING_POLICY, starting()
    name = f"champion version {champion.version}"
    if champion.version == candidate_version:
        return champion.version, name, candidate
    return champion.version, name, evaluate_champion(champion)


def gate_run(
    cfg: RunConfig,
    ledger: RunLedger,
    candidates: Sequence[Candidate],
    starting: Callable[[], EvalReport],
    evaluate_champion: Callable[[Champion], EvalReport],
) -> tuple[Candidate, GateDecision]:
    """Gate the run's best candidate (`best_candidate`, chosen on the selection part; `candidates` not empty)
    once on the gate part, and promote it by compare-and-set on the champion.

    `starting()`: the starting policy's greedy evaluation of the gate part (the baseline with no champion);
    `evaluate_champion(champion)`: the champion's. The decision is recorded (gate.json, with the champion
    version it was made against) before it is applied; a re-run re-applies the recorded decision
    (`recorded_decision`), through the same compare-and-set. When the champion changed since the decision
    (another run promoted, or a rollback), the candidate is decided again against the new champion
    (`settle_promotion`), and that decision is recorded and applied instead. Raises ValueError when the
    candidate's evaluation record keeps no per-task outcomes (written by an older Turnstile)."""
    best = best_candidate(candidates)
    label = f"version {best.version} (step {best.step})"

    def decide_now() -> GateDecision:
        gate_report = best.report.part("gate")
        champion_version, name, baseline = gate_baseline(cfg, best.version, gate_report, starting, evaluate_champion)
        return gate_candidate(
            gate_report,
            baseline,
            cfg.gate,
            baseline_name=name,
            champion_version=champion_version,
            label=label,
            key=gate_artifact_key(str(cfg.storage.run_id)),
        )

    def record_and_promote(decision: GateDecision) -> PromotionResult:
        ledger.record_gate(GateRecord(best.version, best.step, decision))
        return promote_task(cfg, best.version, decision, decision.champion_version)

    decision = recorded_decision(ledger.gate, best) or decide_now()
    decision, _ = settle_promotion(record_and_promote, decide_now, decision)
    return best, decision
