"""Promotion is compare-and-set on the `champion` alias (issue 9, item 7).

The race of the issue: two train runs gate against the same champion v1 (pass@1 0.30); B
promotes v3 (0.50), then A, decided against v1, would promote v2 (0.40) over it. Every test here
drives that interleaving against a real SQLite MLflow registry in tmp_path: through the registry
functions, through two threads racing for the promotion lock, through the train flow's gate
(a fresh decision, and a decision recorded before a crash and re-applied on resume), and
through the promote flow.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from rl_core.config import GateConfig, RunConfig
from rl_core.evaluation import EvalReport, TaskOutcome
from rl_core.gate import GateDecision, decide_simple
from rl_core.runs import records as run_records
from tasks.promote import PromotionResult, promote, rollback, settle_promotion
from tasks.promotion_lock import PromotionLockTimeout, promotion_lock, promotion_lock_path
from tasks.registry import (
    AGAINST_TAG,
    CHAMPION_ALIAS,
    DECISION_TAG,
    PREVIOUS_ALIAS,
    REASONS_TAG,
    champion,
    register_checkpoint,
)
from tasks.tracking import Tracker, task_set_hash, tracking_uri

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

MODEL = "policy-under-race"
EVAL_TASKS = {"refunds/r-001": True, "refunds/r-002": False, "inventory/i-001": True}
GATE = GateConfig(rule="simple", min_pass_at_1=0.0, require_improvement=True)  # these tests are about the race
SOLVED = {"1": 3, "2": 4, "3": 5}  # gate tasks (of 10) each registry version solves: pass@1 0.30, 0.40, 0.50


def gate_report(solved: int, tasks: int = 10) -> EvalReport:
    """A greedy evaluation of `tasks` gate tasks, the first `solved` of them solved."""
    outcomes = [TaskOutcome("refunds", f"r-{i:03d}", i < solved, float(i < solved), "answered") for i in range(tasks)]
    return EvalReport.from_outcomes(outcomes, gate_tasks=[o.key for o in outcomes])


CHANGED_1_TO_3 = "the champion changed from version 1 to version 3 during the gate; decided again against version 3"


@pytest.fixture()
def cfg(tmp_path, empty_store) -> RunConfig:
    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    shutil.copy(empty_store, run_dir / "mlflow.db")
    return RunConfig(
        storage={"run_dir": str(run_dir), "run_id": "run-a"},
        tracking={"registered_model": MODEL},
        gate=GATE.model_dump(),
    )


@pytest.fixture()
def client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


@pytest.fixture()
def registry(cfg, client, tmp_path) -> dict[str, str]:
    """v1 (pass@1 0.30) is champion; v2 is run A's candidate (0.40), v3 run B's (0.50)."""
    tracker = Tracker.start(cfg, "run-a")
    versions = {}
    for step, (label, score) in enumerate((("v1", 0.30), ("v2", 0.40), ("v3", 0.50)), start=1):
        folder = tmp_path / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        lineage = {"pass_at_1": score, "eval_tasks_hash": task_set_hash(EVAL_TASKS)}
        versions[label] = register_checkpoint(client, cfg, folder, tracker.mlflow_run_id, lineage)
    assert versions == {"v1": "1", "v2": "2", "v3": "3"}
    first = decide_simple(0.30, None, GATE)
    assert promote(client, MODEL, "1", first, None).applied
    return versions


def aliases(client) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(MODEL).aliases.items()}


def recorded(client, version: str) -> tuple[str, list[str], str]:
    tags = client.get_model_version(MODEL, version).tags
    return tags[DECISION_TAG], json.loads(tags[REASONS_TAG]), tags[AGAINST_TAG]


def decide_against_current(client, candidate: float):
    """What every caller's `decide_again` does: read the champion now and decide against it."""

    def decide_again() -> GateDecision:
        current = champion(client, MODEL)
        return decide_simple(candidate, current.pass_at_1, GATE, champion_version=current.version)

    return decide_again


def apply_with(client, version: str):
    return lambda d: promote(client, MODEL, version, d, d.champion_version)


# --------------------------------------------------------------------------- registry functions


def test_a_decision_made_against_a_replaced_champion_is_made_again_and_rejected(client, registry):
    decision_a = decide_simple(0.40, 0.30, GATE, champion_version="1")  # run A decides against v1 ...
    decision_b = decide_simple(0.50, 0.30, GATE, champion_version="1")  # ... so does run B,
    assert decision_a.promote and decision_b.promote
    assert promote(client, MODEL, "3", decision_b, "1") == PromotionResult(True, "3", "1")  # and B promotes first

    stale = promote(client, MODEL, "2", decision_a, "1")  # A's decision is not applied
    assert stale == PromotionResult(applied=False, champion="3", expected="1") and stale.champion_changed
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}
    assert DECISION_TAG not in client.get_model_version(MODEL, "2").tags  # nothing recorded for a stale decision

    final, result = settle_promotion(apply_with(client, "2"), decide_against_current(client, 0.40), decision_a)
    assert result == PromotionResult(True, "3", "3")
    assert not final.promote and final.champion_version == "3" and final.baseline_pass_at_1 == 0.50
    assert final.reasons[0] == CHANGED_1_TO_3
    assert "it is worse than the champion's pass@1 0.500 by 0.100" in final.reasons
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}  # the better model stays in service
    assert recorded(client, "2") == ("rejected", final.reasons, "3")


def test_a_candidate_that_still_beats_the_new_champion_is_promoted_over_it(client, registry):
    decision_a = decide_simple(0.60, 0.30, GATE, champion_version="1")  # A (0.60) decided against v1
    assert promote(
        client, MODEL, "3", decide_simple(0.50, 0.30, GATE, champion_version="1"), "1"
    ).applied  # B promotes v3

    final, result = settle_promotion(
        apply_with(client, "2"), lambda: decide_simple(0.60, 0.50, GATE, champion_version="3"), decision_a
    )
    assert result == PromotionResult(True, "2", "3")
    assert final.promote and final.reasons[0] == CHANGED_1_TO_3
    assert "it beats the champion's pass@1 0.500 by 0.100" in final.reasons
    assert aliases(client) == {CHAMPION_ALIAS: "2", PREVIOUS_ALIAS: "3"}  # `previous` is the champion actually replaced
    assert recorded(client, "2") == ("promoted", final.reasons, "3")
    assert rollback(client, MODEL) == "3" and aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "2"}


def test_a_champion_that_keeps_changing_leaves_the_candidate_unpromoted_after_the_retries(client, registry):
    moves = iter(["3", "1", "3"])

    def decide_then_overtaken() -> GateDecision:
        decision = decide_against_current(client, 0.95)()
        current = aliases(client)[CHAMPION_ALIAS]  # another run moves the champion right after every decision
        assert promote(client, MODEL, next(moves), decide_simple(0.9, None, GATE), current).applied
        return decision

    final, result = settle_promotion(
        apply_with(client, "2"), decide_then_overtaken, decide_then_overtaken(), max_redecisions=2
    )
    assert result.applied and not final.promote
    assert final.reasons[-1].startswith("the champion changed 3 times during the gate, so no decision could be applied")
    assert sum(r.startswith("the champion changed from") for r in final.reasons) == 3
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}
    assert recorded(client, "2")[0] == "rejected"


def test_repeating_an_applied_promotion_changes_nothing(client, registry):
    decision = decide_simple(0.40, 0.30, GATE, champion_version="1")
    assert promote(client, MODEL, "2", decision, "1").applied
    assert promote(client, MODEL, "2", decision, "1") == PromotionResult(True, "2", "1")  # a retry after a crash
    assert aliases(client) == {CHAMPION_ALIAS: "2", PREVIOUS_ALIAS: "1"}


def test_two_promotions_racing_for_the_lock_apply_one_after_the_other(cfg, registry, monkeypatch):
    """Both decided against v1, released at the same instant. Whichever checks the champion first
    stalls before its writes, long enough for the other to read, check, write and read back: without
    the lock both would apply (and the one writing last would win, whichever it is). With it,
    exactly one applies first, the other finds the winner and decides again against it, and the
    better model ends as champion."""
    real_set_alias = MlflowClient.set_registered_model_alias
    stalled = threading.Event()

    def stall_the_first_writer(self, *args, **kwargs):
        if not stalled.is_set():
            stalled.set()
            time.sleep(1.0)
        return real_set_alias(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", stall_the_first_writer)
    start = threading.Barrier(2)
    first_attempts: dict[str, PromotionResult] = {}
    outcomes: dict[str, tuple[GateDecision, PromotionResult]] = {}
    errors: list[BaseException] = []

    def run(label: str, version: str, score: float) -> None:
        try:
            client = MlflowClient(tracking_uri(cfg))
            decision = decide_simple(score, 0.30, GATE, champion_version="1")

            def apply(d: GateDecision) -> PromotionResult:
                result = promote(client, MODEL, version, d, d.champion_version)
                first_attempts.setdefault(label, result)
                return result

            start.wait()
            outcomes[label] = settle_promotion(apply, decide_against_current(client, score), decision)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=args) for args in (("A", "2", 0.40), ("B", "3", 0.50))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors

    winners = [label for label, result in first_attempts.items() if result.applied]
    assert len(winners) == 1, first_attempts  # exactly one ordering
    loser = "B" if winners == ["A"] else "A"
    assert first_attempts[loser] == PromotionResult(False, "2" if winners == ["A"] else "3", "1")
    client = MlflowClient(tracking_uri(cfg))
    if winners == ["B"]:  # B first: A is decided again against v3 and rejected
        assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}
        assert not outcomes["A"][0].promote and outcomes["A"][0].reasons[0] == CHANGED_1_TO_3
    else:  # A first: B is decided again against v2 and still wins
        assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "2"}
        assert outcomes["B"][0].promote and outcomes["B"][0].reasons[0].startswith(
            "the champion changed from version 1 to version 2"
        )


def test_the_lock_lives_next_to_a_sqlite_store_and_is_per_machine_for_a_server(tmp_path):
    database = tmp_path / "runs" / "mlflow.db"
    assert promotion_lock_path(f"sqlite:///{database}") == tmp_path / "runs" / "mlflow.db.promotion.lock"
    assert promotion_lock_path(f"file://{tmp_path / 'mlruns'}") == tmp_path / "mlruns" / ".promotion.lock"
    assert promotion_lock_path(str(tmp_path / "mlruns")) == tmp_path / "mlruns" / ".promotion.lock"
    server = promotion_lock_path("http://mlflow:5000")
    assert server.name.startswith("turnstile-promotion-") and server != promotion_lock_path("http://other:5000")
    assert promotion_lock_path("postgresql://db/mlflow").name.startswith("turnstile-promotion-")

    uri = f"sqlite:///{database}"
    with promotion_lock(uri) as held:  # a second holder (another thread or process) waits, then gives up
        assert held == tmp_path / "runs" / "mlflow.db.promotion.lock"
        waited: list[BaseException] = []

        def contend() -> None:
            try:
                with promotion_lock(uri, timeout_s=0.2):
                    pass
            except BaseException as exc:
                waited.append(exc)

        other = threading.Thread(target=contend)
        other.start()
        other.join()
        assert len(waited) == 1 and isinstance(waited[0], PromotionLockTimeout) and isinstance(waited[0], TimeoutError)
    with promotion_lock(uri, timeout_s=0.2):  # released
        pass


# --------------------------------------------------------------------------- the train flow's gate


def train_run(cfg, tmp_path) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The parts of a TrainingRun and of the loop's result that `gate_run` reads: A's candidate is v2, pass@1 0.40."""
    from rl_core.gate import Candidate

    run_dir = tmp_path / "runs" / "run-a"
    run_dir.mkdir(parents=True, exist_ok=True)
    report = gate_report(SOLVED["2"])
    return SimpleNamespace(cfg=cfg, run_dir=run_dir), SimpleNamespace(
        candidates=[Candidate(report=report, version="2", step=2)]
    )


def _gate(run, progress):
    """The train flow's gate (`tasks.gate.gate_run`) on a run folder whose ledger is read afresh."""
    import tasks.gate as gate
    from rl_core.runs.ledger import RunLedger

    def starting():
        raise AssertionError("there is a champion: the starting policy is not the baseline")

    def evaluate_champion(champion):
        return gate_report(SOLVED[champion.version])

    ledger = RunLedger(run.run_dir, lambda iteration: False)
    return gate.gate_run(run.cfg, ledger, progress.candidates, starting, evaluate_champion)


def test_train_gate_decides_again_when_another_run_promotes_between_its_decision_and_its_promotion(
    prefect_harness, cfg, client, registry, tmp_path, monkeypatch
):
    from prefect import flow

    import tasks.gate as gate

    real_gate_candidate = gate.gate_candidate
    calls = []

    def gate_then_race(*args, **kwargs):
        decision = real_gate_candidate(*args, **kwargs)
        calls.append(decision)
        if len(calls) == 1:  # run B promotes v3 right after A decided against v1
            assert promote(client, MODEL, "3", decide_simple(0.50, 0.30, GATE, champion_version="1"), "1").applied
        return decision

    monkeypatch.setattr(gate, "gate_candidate", gate_then_race)
    run, progress = train_run(cfg, tmp_path)

    @flow
    def gate_a():
        return _gate(run, progress)

    best, decision = gate_a()
    assert [d.champion_version for d in calls] == ["1", "3"] and calls[0].promote  # decided against v1, then against v3
    assert best.version == "2" and not decision.promote
    assert decision.reasons[0] == CHANGED_1_TO_3
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}
    gate_record = run_records.load_gate(run.run_dir)
    assert gate_record["decision"]["champion_version"] == "3" and gate_record["decision"]["outcome"] == "rejected"


def test_a_resumed_run_reapplying_its_recorded_decision_goes_through_compare_and_set(
    prefect_harness, cfg, client, registry, tmp_path
):
    """Run A decided against v1 and recorded it, then crashed before promoting; B promoted v3; A resumes."""
    from prefect import flow

    run, progress = train_run(cfg, tmp_path)
    decided = decide_simple(0.40, 0.30, GATE, champion_version="1")
    run_records.save_gate(run.run_dir, {"version": "2", "step": 2, "decision": decided.as_dict()})
    assert promote(client, MODEL, "3", decide_simple(0.50, 0.30, GATE, champion_version="1"), "1").applied

    @flow
    def resume_gate():
        return _gate(run, progress)

    _, decision = resume_gate()
    assert not decision.promote and decision.champion_version == "3"
    assert decision.reasons[0] == CHANGED_1_TO_3
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}
    assert run_records.load_gate(run.run_dir)["decision"] == decision.as_dict()

    _, again = resume_gate()  # resumed once more: the recorded (new) decision is applied as it is
    assert again == decision and aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}


# --------------------------------------------------------------------------- the promote flow


def promote_settings(cfg, version: int, gate: bool):
    from flows.promote import PromoteSettings

    overrides = [f"tracking.registered_model={MODEL}", "gate.rule=simple", "gate.min_pass_at_1=0.0"]
    return PromoteSettings(run_dir=cfg.storage.run_dir, overrides=overrides, version=version, gate=gate)


def test_gated_promote_flow_decides_again_when_the_champion_changes_under_it(
    prefect_harness, cfg, client, registry, monkeypatch
):
    import flows.promote as promote_module

    def evaluate_flow(settings):
        (model,) = settings.models
        assert settings.part == "gate" and not settings.samples
        return {"models": [{"model": model, "report": gate_report(SOLVED[model.removeprefix("version:")]).to_dict()}]}

    monkeypatch.setattr(promote_module, "evaluate_flow", evaluate_flow)
    real_gate_candidate = promote_module.gate_candidate
    calls = []

    def gate_then_race(*args, **kwargs):
        decision = real_gate_candidate(*args, **kwargs)
        calls.append(decision)
        if len(calls) == 1:
            assert promote(client, MODEL, "3", decide_simple(0.50, 0.30, GATE, champion_version="1"), "1").applied
        return decision

    monkeypatch.setattr(promote_module, "gate_candidate", gate_then_race)
    outcome = promote_module.promote_flow(promote_settings(cfg, 2, gate=True))
    assert [d.champion_version for d in calls] == ["1", "3"]
    assert outcome["outcome"] == "rejected" and outcome["champion"] == "3"
    assert outcome["reasons"][0] == CHANGED_1_TO_3
    assert aliases(client) == {CHAMPION_ALIAS: "3", PREVIOUS_ALIAS: "1"}


def test_promote_by_hand_replaces_the_champion_it_finds_and_keeps_previous_for_rollback(
    prefect_harness, cfg, client, registry
):
    from flows.promote import RollbackSettings, promote_flow, rollback_flow

    outcome = promote_flow(promote_settings(cfg, 2, gate=False))
    assert outcome["outcome"] == "promoted" and outcome["champion"] == "2"
    assert aliases(client) == {CHAMPION_ALIAS: "2", PREVIOUS_ALIAS: "1"}
    assert recorded(client, "2")[2] == "1"
    restored = rollback_flow(
        RollbackSettings(run_dir=cfg.storage.run_dir, overrides=[f"tracking.registered_model={MODEL}"])
    )
    assert restored["champion"] == "1" and aliases(client) == {CHAMPION_ALIAS: "1", PREVIOUS_ALIAS: "2"}
