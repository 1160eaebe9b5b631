"""Gate stage: decide whether a candidate may replace the champion, log it, publish it, and promote.

The rules are `rl_core.gate.decide` (pure). `gate_candidate` is the Prefect task: it decides, logs
the decision and publishes it as a markdown artifact (key `gate-decision`). A decision is not a
fault, so it never retries, and it is never cached (each gate publishes its own artifact).
`champion_pass_at_1` is the champion's score on the candidate's tasks (re-evaluated by the
caller's function when it was measured on other tasks); `gate_run` gates a training run's best
candidate once and promotes it by compare-and-set, re-applying a recorded decision on a re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE

from rl_core.config import GateConfig, RunConfig
from rl_core.gate import Candidate, GateDecision, GateRecord, best_candidate, decide, recorded_decision
from rl_core.runs.ledger import RunLedger
from tasks.promote import Champion, PromotionResult, champion_task, promote_task, settle_promotion
from tasks.tracking import task_set_hash


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
    """Decide (`rl_core.gate.decide`), log the decision with its reasons and publish it as the
    `gate-decision` artifact. `champion_version`: the registry version whose pass@1 `champion_pass_at_1` is."""
    decision = decide(
        candidate_pass_at_1, champion_pass_at_1, cfg, same_tasks=same_tasks, champion_version=champion_version
    )
    get_run_logger().info("gate: %s %s (%s)", label, decision.outcome, "; ".join(decision.reasons))
    create_markdown_artifact(
        key="gate-decision",
        markdown=decision.to_markdown(label),
        description=f"Gate decision for {label}: {decision.outcome}",
    )
    return decision


def champion_pass_at_1(
    cfg: RunConfig, candidate_version: str | None, eval_tasks_hash: str, evaluate: Callable[[Champion], float]
) -> tuple[str | None, float | None]:
    """The champion's registry version and its held-out pass@1 on the candidate's tasks: the recorded
    score when it was measured on the same task set (`eval_tasks_hash`) or is the candidate itself,
    else `evaluate(champion)`. (None, None) without a champion."""
    champion, champion_tasks = champion_task(cfg)
    if champion is None:
        return None, None
    if champion.version == candidate_version or champion_tasks == eval_tasks_hash:
        return champion.version, champion.pass_at_1
    return champion.version, evaluate(champion)


def gate_run(
    cfg: RunConfig, ledger: RunLedger, candidates: Sequence[Candidate], evaluate: Callable[[Champion], float]
) -> tuple[Candidate, GateDecision]:
    """Gate the run's best candidate (`best_candidate`; `candidates` not empty) once, and promote it by
    compare-and-set on the champion.

    The decision is recorded (gate.json, with the champion version it was made against) before
    it is applied; a re-run re-applies the recorded decision (`recorded_decision`), through the same
    compare-and-set. When the champion changed since the decision (another run promoted, or a
    rollback), the candidate is decided again against the new champion (`settle_promotion`), and that
    decision is recorded and applied instead. `evaluate(champion)`: its pass@1 on the run's tasks."""
    best = best_candidate(candidates)
    label = f"version {best.version} (step {best.step})"

    def decide_now() -> GateDecision:
        tasks_hash = task_set_hash(best.report.task_success)
        champion_version, champion_score = champion_pass_at_1(cfg, best.version, tasks_hash, evaluate)
        return gate_candidate(
            best.report.pass_at_1, champion_score, cfg.gate, champion_version=champion_version, label=label
        )

    def record_and_promote(decision: GateDecision) -> PromotionResult:
        ledger.record_gate(GateRecord(best.version, best.step, decision))
        return promote_task(cfg, best.version, decision, decision.champion_version)

    decision = recorded_decision(ledger.gate, best) or decide_now()
    decision, _ = settle_promotion(record_and_promote, decide_now, decision)
    return best, decision
