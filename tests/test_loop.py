"""The training loop's pure parts and its Python API: the doctor's decisions (rl_core/doctor/decisions.py),
iteration records (rl_core/runs/records.py), the run's ledger (rl_core/runs/ledger.py), the gate's
choices (rl_core/gate.py), and `TrainingRun.run` end to end on a tiny run (a few seconds)."""

from __future__ import annotations

import json

import pytest

from rl_core.config import GateConfig, RunConfig, load_config
from rl_core.doctor import Finding, decide_after_step, doctor_history
from rl_core.evaluation import EvalReport
from rl_core.gate import (
    Candidate,
    GateDecision,
    GateRecord,
    best_candidate,
    decide_simple,
    no_candidate_reason,
    recorded_decision,
)
from rl_core.runs import ledger as ledger_module
from rl_core.runs.ledger import RunLedger
from rl_core.runs.records import EvaluationRecord, IterationRecord
from rl_core.validation_report import ValidationReport
from tests.test_train_flow import TINY

REWARD = "rollout/reward/mean"
NONFINITE = "train/nonfinite_step"

# doctor.window=2: windowed means .25, .375, .625, .75 (best, ending at step 4), .4375, .125 -> a collapse
# at step 6 (.125 < 0.5 x .75); the last good step is 4 - 1 = 3
COLLAPSING = (0.25, 0.5, 0.75, 0.75, 0.125, 0.125)
COLLAPSE_REASON = "training reward collapsed; rolled back to the checkpoint of step 3 (rollback 1 of 2)"


def doctor_cfg(**doctor) -> RunConfig:
    return RunConfig.model_validate({"doctor": {"window": 2, **doctor}})


def trained(iteration: int, step: int, reward: float, **fields) -> IterationRecord:
    return IterationRecord(iteration, step, True, metrics={REWARD: reward}, **fields)


def collapsing() -> list[IterationRecord]:
    return [trained(i, i, reward) for i, reward in enumerate(COLLAPSING, start=1)]


# -- the doctor's decision ------------------------------------------------------------------------


def test_a_collapse_only_warns_with_on_collapse_warn():
    decision = decide_after_step(collapsing(), {}, set(), {0, 3, 4, 5, 6}, doctor_cfg(on_collapse="warn"))
    assert [f.symptom for f in decision.new_findings] == ["reward_collapse"]
    finding = decision.new_findings[0]
    assert (finding.step, finding.value, finding.threshold) == (6, 0.125, 0.375)
    assert decision.protected_steps == [3, 6]
    assert (decision.action, decision.rollback_to, decision.reason, decision.stopped) == (None, None, "", None)
    # the step before the collapse is quiet: nothing new, nothing done
    quiet = decide_after_step(collapsing()[:5], {}, set(), {0, 3, 4, 5}, doctor_cfg(on_collapse="rollback"))
    assert (quiet.new_findings, quiet.protected_steps, quiet.action) == ([], [3, 5], None)


def test_a_collapse_stops_the_run_with_on_collapse_stop():
    decision = decide_after_step(collapsing(), {}, set(), {0, 3, 6}, doctor_cfg(on_collapse="stop"))
    assert (decision.action, decision.rollback_to) == ("stop", None)
    assert decision.reason == decision.stopped == "training reward collapsed; the run stops"
    assert decision.protected_steps == [3, 6]


def test_a_collapse_rolls_back_to_the_last_good_checkpoint():
    decision = decide_after_step(collapsing(), {}, set(), {0, 3, 4, 5, 6}, doctor_cfg(on_collapse="rollback"))
    assert (decision.action, decision.rollback_to, decision.reason) == ("rollback", 3, COLLAPSE_REASON)
    assert decision.stopped is None
    assert decision.protected_steps == [3, 6]
    assert [f.symptom for f in decision.new_findings] == ["reward_collapse"]


def test_a_rollback_to_a_checkpoint_not_on_disk_becomes_a_stop():
    decision = decide_after_step(collapsing(), {}, set(), {0, 5, 6}, doctor_cfg(on_collapse="rollback"))
    assert (decision.action, decision.rollback_to) == ("stop", None)
    assert (
        decision.stopped == "training reward collapsed; the run stops (rollback not possible: no good checkpoint left)"
    )
    assert decision.protected_steps == [6]  # the good step 3 has no checkpoint to keep


def after_one_rollback() -> list[IterationRecord]:
    """Iteration 6 rolled back to step 3; iterations 7 and 8 (steps 4, 5) collapse again: rewards .25, .5,
    .75, .125, .125 -> best window ends at step 3 (.625), last good step 2."""
    records = collapsing()
    records[-1] = trained(6, 6, COLLAPSING[-1], rollback_to=3)
    return [*records, trained(7, 4, 0.125), trained(8, 5, 0.125)]


def test_max_rollbacks_counts_the_rollbacks_already_made():
    records = after_one_rollback()
    again = decide_after_step(records, {}, {"reward_collapse"}, {0, 2, 3, 5}, doctor_cfg(on_collapse="rollback"))
    assert (again.action, again.rollback_to) == ("rollback", 2)
    assert again.reason == "training reward collapsed; rolled back to the checkpoint of step 2 (rollback 2 of 2)"
    assert again.new_findings == []  # reported before
    assert again.protected_steps == [2, 5]
    spent = decide_after_step(
        records, {}, {"reward_collapse"}, {0, 2, 3, 5}, doctor_cfg(on_collapse="rollback", max_rollbacks=1)
    )
    assert (spent.action, spent.rollback_to) == ("stop", None)
    assert spent.stopped == "training reward collapsed; the run stops (rollback not possible: 1 rollbacks already)"
    none_allowed = decide_after_step(
        collapsing(), {}, set(), {0, 3, 6}, doctor_cfg(on_collapse="rollback", max_rollbacks=0)
    )
    assert none_allowed.stopped == (
        "training reward collapsed; the run stops (rollback not possible: 0 rollbacks already)"
    )


def test_a_nonfinite_untrained_step_is_named_and_nothing_is_done():
    nonfinite = IterationRecord(7, 6, False, "not finite", "trainer", metrics={NONFINITE: 1.0})
    records = [*collapsing(), nonfinite]
    cfg = doctor_cfg(on_collapse="rollback")
    decision = decide_after_step(records, {}, {"reward_collapse"}, {0, 3, 6}, cfg)
    assert [f.symptom for f in decision.new_findings] == ["nonfinite_step"]
    finding = decision.new_findings[0]
    assert (finding.step, finding.metric, finding.value, finding.threshold) == (6, NONFINITE, 1.0, 0.0)
    assert "0 earlier step(s)" in finding.message
    assert (decision.action, decision.rollback_to, decision.protected_steps, decision.reason) == (None, None, [], "")
    # unreported, the collapse the history still shows is new too, yet an untrained step acts on nothing
    fresh = decide_after_step(records, {}, set(), {0, 3, 6}, cfg)
    assert [f.symptom for f in fresh.new_findings] == ["reward_collapse", "nonfinite_step"]
    assert (fresh.action, fresh.protected_steps) == (None, [])


def test_already_reported_symptoms_are_not_new():
    decision = decide_after_step(collapsing(), {}, {"reward_collapse"}, {0, 3, 6}, doctor_cfg(on_collapse="warn"))
    assert decision.new_findings == []
    assert decision.protected_steps == [3, 6]
    other = decide_after_step(collapsing(), {}, {"reward_flat"}, {0, 3, 6}, doctor_cfg(on_collapse="warn"))
    assert [f.symptom for f in other.new_findings] == ["reward_collapse"]


def test_protected_steps_are_the_good_step_and_this_step_that_have_checkpoints():
    cfg = doctor_cfg(on_collapse="warn")
    assert decide_after_step(collapsing(), {}, set(), {0, 3, 4, 5, 6}, cfg).protected_steps == [3, 6]
    assert decide_after_step(collapsing(), {}, set(), {3}, cfg).protected_steps == [3]
    assert decide_after_step(collapsing(), {}, set(), {6}, cfg).protected_steps == [6]
    assert decide_after_step(collapsing(), {}, set(), set(), cfg).protected_steps == []
    # first step: the best window ends at step 1, so the good step is the starting policy (0)
    assert decide_after_step(collapsing()[:1], {}, set(), {0, 1}, cfg).protected_steps == [0, 1]
    with pytest.raises(ValueError, match="needs the record"):
        decide_after_step([], {}, set(), {0}, cfg)


# -- the doctor's history -------------------------------------------------------------------------


def test_doctor_history_drops_undone_steps_and_merges_pass_at_1():
    records = [
        trained(1, 1, 0.25),
        IterationRecord(2, 1, False, "bad batch", "validation", metrics={REWARD: 0.9}),
        trained(3, 2, 0.5),
        trained(4, 3, 0.75, rollback_to=1),
        IterationRecord(5, 1, False, "not finite", "trainer", metrics={REWARD: 0.4, NONFINITE: 2.0}),
        trained(6, 2, 0.125),
    ]
    history = doctor_history(records, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})
    assert history == [
        {"step": 0, "val/pass_at_1": 0.1},
        {"iteration": 1, "step": 1, REWARD: 0.25, "val/pass_at_1": 0.2},
        {"step": 1, NONFINITE: 2.0},
        {"iteration": 6, "step": 2, REWARD: 0.125, "val/pass_at_1": 0.3},
    ]
    # no step-0 evaluation: no step-0 entry
    assert doctor_history(records[:1], {1: 0.2}) == [{"iteration": 1, "step": 1, REWARD: 0.25, "val/pass_at_1": 0.2}]
    assert doctor_history([], {0: 0.5}) == [{"step": 0, "val/pass_at_1": 0.5}]


# -- iteration records ----------------------------------------------------------------------------


def test_iteration_record_round_trip():
    finding = Finding("reward_collapse", 4, REWARD, 0.1, 0.4, "collapsed", "lower optimizer.lr")
    record = IterationRecord(
        3, 4, True, "passed", metrics={REWARD: 0.5, "train/loss": -1.0}, findings=[finding], protected_steps=[2, 4]
    )
    record = record.examined([finding], [2, 4], 2, "stopped: collapse")
    data = record.to_dict()
    assert data == {
        "iteration": 3,
        "step": 4,
        "trained": True,
        "reason": "passed",
        REWARD: 0.5,
        "train/loss": -1.0,
        "findings": [finding.as_dict()],
        "protected_steps": [2, 4],
        "rollback_to": 2,
        "stopped": "stopped: collapse",
    }
    assert IterationRecord.from_dict(json.loads(json.dumps(data))) == record
    skipped = IterationRecord(5, 4, False, "nothing to train on", "trainer", metrics={NONFINITE: 0.0})
    assert skipped.to_dict() == {
        "iteration": 5,
        "step": 4,
        "trained": False,
        "reason": "nothing to train on",
        "skipped_by": "trainer",
        NONFINITE: 0.0,
    }
    assert IterationRecord.from_dict(skipped.to_dict()) == skipped
    assert (skipped.skip_kind, skipped.examined_untrained, record.skip_kind) == ("trainer", False, None)


def test_an_old_record_without_skipped_by_was_skipped_by_validation():
    old = IterationRecord.from_dict(
        {"iteration": 2, "step": 1, "trained": False, "reason": None, "note": "text", "flag": True, "x": 3}
    )
    assert (old.skipped_by, old.skip_kind, old.reason) == (None, "validation", "")
    assert old.metrics == {"x": 3}  # strings and booleans are not metrics
    assert (old.findings, old.protected_steps, old.rollback_to, old.stopped) == (None, None, None, None)
    with pytest.raises(KeyError):
        IterationRecord.from_dict({"iteration": 2, "step": 1})


def test_examined_adds_what_the_doctor_did_and_keeps_the_rest():
    record = trained(4, 4, 0.5, reason="ok")
    token_cap = Finding("token_cap", 4, "rollout/finish/token_cap", 0.5, 0.2, "cut off", "raise the cap")
    examined = record.examined([token_cap], [4], None, None)
    assert examined == IterationRecord(
        4, 4, True, "ok", metrics={REWARD: 0.5}, findings=[token_cap], protected_steps=[4]
    )
    assert record.findings is None  # frozen: a new record
    assert "rollback_to" not in examined.to_dict() and "stopped" not in examined.to_dict()
    nonfinite = IterationRecord(5, 4, False, "not finite", "trainer", metrics={NONFINITE: 1.0})
    assert nonfinite.examined_untrained and not IterationRecord(1, 1, True, metrics={NONFINITE: 1.0}).examined_untrained


# -- the ledger -----------------------------------------------------------------------------------


def test_work_left_answers_and_recorded_after(tmp_path):
    ledger = RunLedger(tmp_path, batch_committed=lambda k: k in (1, 3, 5))
    ledger.record_iteration(trained(1, 1, 0.5))
    assert ledger.work_left(1, checkpoint_iteration=2) == "nothing"
    assert ledger.work_left(2, checkpoint_iteration=2) == "record"
    assert ledger.work_left(3, checkpoint_iteration=2) == "train"
    assert ledger.work_left(4, checkpoint_iteration=2) == "collect"
    assert ledger.work_left(2, checkpoint_iteration=1) == "collect"
    with pytest.raises(ValueError, match="iteration 2 of run .* has no record .* trained outside the training loop"):
        ledger.work_left(2, checkpoint_iteration=3)  # before the newest checkpoint, never recorded

    skipped = [IterationRecord(i, 1, False, "bad", "validation") for i in (2, 3)]
    for record in [*skipped, trained(4, 2, 0.5), IterationRecord(5, 2, False, "empty", "trainer")]:
        ledger.record_iteration(record)
    assert ledger.recorded_after(1) == skipped
    assert ledger.recorded_after(2) == skipped[1:]
    assert ledger.recorded_after(0) == []  # iteration 1 trained
    assert ledger.recorded_after(3) == []
    assert [r.iteration for r in ledger.recorded_after(4)] == [5]
    assert ledger.recorded_after(5) == []


def test_record_iteration_is_kept_in_memory_and_on_disk(tmp_path):
    ledger = RunLedger(tmp_path, batch_committed=lambda k: False)
    assert (ledger.iterations, ledger.evaluations, ledger.gate) == ({}, {}, None)
    record = trained(1, 1, 0.5, findings=[], protected_steps=[0, 1])
    path = ledger.record_iteration(record)
    assert path == tmp_path / "history" / "iteration-000001.json"
    assert json.loads(path.read_text()) == record.to_dict()
    assert ledger.iterations == {1: record}
    assert RunLedger(tmp_path, batch_committed=lambda k: False).iterations == {1: record}


def test_record_evaluation_and_pass_at_1(tmp_path):
    ledger = RunLedger(tmp_path, batch_committed=lambda k: False)
    late = EvalReport({"val/pass_at_1": 0.75}, {"refunds": 0.75}, {"refunds/t1": True})
    start = EvalReport({"val/pass_at_1": 0.5}, {"refunds": 0.5}, {"refunds/t1": False})
    assert ledger.record_evaluation(2, late, "7") == EvaluationRecord(2, late, "7")
    ledger.record_evaluation(0, start)
    assert list(ledger.pass_at_1().items()) == [(0, 0.5), (2, 0.75)]
    assert ledger.evaluation(2) == EvaluationRecord(2, late, "7")
    assert ledger.evaluation(1) is None
    fresh = RunLedger(tmp_path, batch_committed=lambda k: False)
    assert fresh.evaluations == {0: EvaluationRecord(0, start, None), 2: EvaluationRecord(2, late, "7")}
    assert fresh.pass_at_1() == {0: 0.5, 2: 0.75}


def test_record_gate_writes_only_a_different_decision(tmp_path, monkeypatch):
    writes = []
    save_gate = ledger_module.save_gate
    monkeypatch.setattr(
        ledger_module, "save_gate", lambda run_dir, data: writes.append(data) or save_gate(run_dir, data)
    )
    ledger = RunLedger(tmp_path, batch_committed=lambda k: False)
    first = GateRecord("3", 2, decide_simple(0.7, None, GateConfig()))
    ledger.record_gate(first)
    ledger.record_gate(GateRecord("3", 2, decide_simple(0.7, None, GateConfig())))
    assert writes == [first.to_dict()]
    assert json.loads((tmp_path / "gate.json").read_text()) == first.to_dict()
    fresh = RunLedger(tmp_path, batch_committed=lambda k: False)
    assert fresh.gate == first
    fresh.record_gate(first)  # the recorded one: not written again
    second = GateRecord("4", 2, first.decision)
    fresh.record_gate(second)
    assert writes == [first.to_dict(), second.to_dict()]
    assert json.loads((tmp_path / "gate.json").read_text()) == second.to_dict()


# -- the gate -------------------------------------------------------------------------------------


def candidate(pass_at_1: float, step: int, version: str | None = None) -> Candidate:
    return Candidate(EvalReport({"val/pass_at_1": pass_at_1}), version, step)


def test_best_candidate_is_the_highest_pass_at_1_and_the_latest_step_on_ties():
    candidates = [candidate(0.5, 1), candidate(0.7, 2), candidate(0.7, 4), candidate(0.6, 5)]
    assert best_candidate(candidates).step == 4
    assert best_candidate(candidates[::-1]).step == 4
    assert best_candidate([candidate(0.2, 3), candidate(0.1, 9)]).step == 3
    with pytest.raises(ValueError, match="no candidate to gate"):
        best_candidate([])


def test_recorded_decision_is_reapplied_only_for_the_same_version():
    decision = decide_simple(0.7, 0.5, GateConfig(), champion_version="2")
    record = GateRecord("3", 4, decision)
    assert recorded_decision(record, candidate(0.7, 4, "3")) == decision
    assert recorded_decision(record, candidate(0.7, 4, "4")) is None
    assert recorded_decision(record, candidate(0.7, 4, None)) is None
    assert recorded_decision(None, candidate(0.7, 4, "3")) is None
    old = {k: v for k, v in decision.as_dict().items() if k != "outcome"}
    old["verdict"] = "promoted"
    assert GateRecord.from_dict({"version": "3", "step": 4, "decision": old}) == record  # gate.json before the rename


def test_gate_decision_round_trip():
    decision = decide_simple(0.4, 0.5, GateConfig(min_pass_at_1=0.3), champion_version="2")
    data = decision.as_dict()
    assert data["outcome"] == "rejected" and data["champion_version"] == "2"
    assert GateDecision.from_dict(data) == decision
    promoted = decide_simple(0.6, None, GateConfig())
    assert GateDecision.from_dict(promoted.as_dict()) == promoted
    assert promoted.as_dict()["outcome"] == "promoted"


def test_no_candidate_reason():
    assert no_candidate_reason([]) == "no iteration ran"
    skipped = [
        IterationRecord(1, 0, False, "bad", "validation"),
        IterationRecord(2, 0, False, "empty", "trainer"),
        IterationRecord.from_dict({"iteration": 3, "step": 0, "trained": False}),  # old record: validation
    ]
    assert no_candidate_reason(skipped) == (
        "no optimizer step was taken (2 iterations failed validation, 1 iteration took no optimizer step)"
    )
    assert no_candidate_reason(skipped[1:2]) == "no optimizer step was taken (1 iteration took no optimizer step)"
    rolled_back = [trained(1, 1, 0.5), trained(2, 2, 0.1), trained(5, 3, 0.1, rollback_to=1), skipped[1]]
    assert no_candidate_reason(rolled_back) == (
        "the training doctor rolled the policy back to step 1 at iteration 5, "
        "and no checkpoint up to that step was evaluated"
    )
    assert no_candidate_reason([trained(1, 1, 0.5), skipped[0]]) == "no checkpoint after step 0 was evaluated"


# -- the Python API loop --------------------------------------------------------------------------


def tiny_config(run_dir, run_id):
    return load_config(None, [*TINY, f"storage.run_dir={run_dir}", f"storage.run_id={run_id}"])


def run_files(run_dir) -> dict[str, int]:
    """Every file of the run folder (relative path) with its modification time (ns)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_training_run_runs_the_loop_and_a_rerun_does_nothing_new(tmp_path):
    from rl_core.loop import LoopResult
    from rl_core.run import TrainingRun

    cfg = tiny_config(tmp_path, "api")
    lines: list[str] = []
    run = TrainingRun(cfg)
    result = run.run(log=lines.append)
    assert isinstance(result, LoopResult)
    assert [(r.iteration, r.step, r.trained, r.skipped_by) for r in result.records] == [
        (1, 1, True, None),
        (2, 2, True, None),
    ]
    assert run.policy.version == 2 and result.stopped is None and result.skipped == []
    assert [v["iteration"] for v in result.validation_lineage()] == [1, 2] and len(result.manifests) == 2
    assert result.before is not None and result.after is not None
    assert sorted(result.pass_at_1) == [0, 1, 2]
    assert result.pass_at_1[0] == result.before.pass_at_1 and result.pass_at_1[2] == result.after.pass_at_1
    assert [c.step for c in result.candidates] == [1, 2] and {c.version for c in result.candidates} == {None}
    assert all(r.findings is not None and r.step in r.protected_steps for r in result.records)  # examined
    assert lines[-1] == (
        f"[api] held-out pass@1 {result.before.pass_at_1:.3f} -> {result.after.pass_at_1:.3f} after 2 optimizer steps"
    )
    folder = tmp_path / "api"
    files = run_files(folder)
    for name in [
        "history/iteration-000001.json",
        "history/iteration-000002.json",
        "evaluations/step-000000.json",
        "evaluations/step-000001.json",
        "evaluations/step-000002.json",
        "sampling/iteration-000001.pt",
        "trajectories/iteration-000002.parquet",
        "checkpoints/step-000002/model.safetensors",
        "config.yaml",
    ]:
        assert name in files
    assert [
        IterationRecord.from_dict(json.loads((folder / "history" / n).read_text()))
        for n in sorted(p.name for p in (folder / "history").iterdir())
    ] == result.records

    last_evaluation = (folder / "evaluations" / "step-000002.json").read_text()
    again_lines: list[str] = []
    reopened = TrainingRun.open(cfg)
    assert reopened.ledger.work_left(1, reopened.checkpoint_iteration) == "nothing"
    assert reopened.ledger.work_left(2, reopened.checkpoint_iteration) == "nothing"
    again = reopened.run(log=again_lines.append)
    assert reopened.policy.version == 2
    assert again.records == result.records
    assert (again.before, again.after, again.pass_at_1) == (result.before, result.after, result.pass_at_1)
    assert not any("episodes, reward" in line for line in again_lines)  # nothing collected
    after = run_files(folder)
    changed = {name for name in files if after.get(name) != files[name]}
    # config.yaml is checked and written again; step 2 is registered again (no registry): same content
    assert changed <= {"config.yaml", "evaluations/step-000002.json"}
    assert (folder / "evaluations" / "step-000002.json").read_text() == last_evaluation
    assert set(after) == set(files)


def test_a_validator_that_fails_every_batch_trains_nothing(tmp_path):
    from rl_core.run import TrainingRun

    seen = []

    def validator(table):
        seen.append(table.num_rows)
        return ValidationReport(False, "x", [], table.num_rows, None)

    lines: list[str] = []
    run = TrainingRun(tiny_config(tmp_path, "refused"))
    result = run.run(log=lines.append, validator=validator)
    assert seen == [8, 8]
    assert [(r.iteration, r.step, r.trained, r.skipped_by, r.skip_kind, r.reason) for r in result.records] == [
        (1, 0, False, "validation", "validation", "x"),
        (2, 0, False, "validation", "validation", "x"),
    ]
    assert run.policy.version == 0
    assert result.summary()["skipped"] == [
        {"iteration": 1, "passed": False, "reason": "x", "by": "validation"},
        {"iteration": 2, "passed": False, "reason": "x", "by": "validation"},
    ]
    assert [r.iteration for r in result.skipped] == [1, 2]
    assert (result.validation_lineage(), result.manifests, result.candidates, result.findings) == ([], [], [], [])
    assert result.after is result.before and list(result.pass_at_1) == [0]
    assert "[refused] warning: Iteration 1: training skipped. x" in lines
    folder = tmp_path / "refused"
    assert sorted(p.name for p in (folder / "history").iterdir()) == ["iteration-000001.json", "iteration-000002.json"]
    assert sorted(p.name for p in (folder / "evaluations").iterdir()) == ["step-000000.json"]
    checkpoints = folder / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []
    assert no_candidate_reason(result.records) == "no optimizer step was taken (2 iterations failed validation)"
    # as in the flow: each report is saved and each failed batch quarantined (training and replay skip it)
    store = run.store
    assert store.iterations("refused") == [] and store.quarantined_iterations("refused") == [1, 2]
    assert store.read_report("refused", 1).quarantined_to == str(folder / "quarantine" / "iteration-000001")


def test_a_record_written_before_the_zero_variance_rename_reads_under_the_new_metric_names():
    old = {"iteration": 1, "step": 1, "trained": True, "analysis/zero_adv_groups": 0.5}
    old["analysis/zero_adv_groups/all_wrong"] = 0.25
    record = IterationRecord.from_dict(old)
    assert record.metrics == {"analysis/zero_variance_groups": 0.5, "analysis/zero_variance_groups/all_wrong": 0.25}


# -- what a user may do to a run folder -----------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-iteration run (one step each) made by the Python API loop; tests copy it."""
    from rl_core.run import TrainingRun

    root = tmp_path_factory.mktemp("finished")
    run = TrainingRun(tiny_config(root, "done"))
    result = run.run(log=lambda line: None)
    return root / "done", result


def copy_of(finished_run, tmp_path, name: str):
    import shutil

    folder, result = finished_run
    shutil.copytree(folder, tmp_path / name)
    return tmp_path / name, result


def test_a_copied_run_folder_is_refused_and_nothing_is_written_anywhere(finished_run, tmp_path):
    from rl_core.run import TrainingRun

    original, _ = finished_run
    before = run_files(original)
    copy, _ = copy_of(finished_run, tmp_path, "copied")
    copied_files = run_files(copy)
    with pytest.raises(ValueError, match="belongs to run 'done', not to 'copied': the run folder was copied"):
        TrainingRun.open(load_config(None, [*TINY, f"storage.run_dir={tmp_path}", "storage.run_id=copied"]))
    assert run_files(original) == before and run_files(copy) == copied_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied"]  # no folder of the old name appeared


def test_a_new_training_run_over_an_existing_run_is_refused(finished_run, tmp_path):
    from rl_core.run import TrainingRun

    copy_of(finished_run, tmp_path, "done")
    fresh = TrainingRun(tiny_config(tmp_path, "done"))  # not TrainingRun.open: it knows nothing of the run
    with pytest.raises(ValueError, match=r"recorded iterations up to 2, .* TrainingRun\.open\(cfg\)\.run\(\)"):
        fresh.run(log=lambda line: None)


def test_a_deleted_step_0_evaluation_is_made_again_and_equals_the_first(finished_run, tmp_path):
    from rl_core.run import TrainingRun

    folder, result = copy_of(finished_run, tmp_path, "done")
    (folder / "evaluations" / "step-000000.json").unlink()
    lines: list[str] = []
    again = TrainingRun.open(tiny_config(tmp_path, "done")).run(log=lines.append)
    assert again.before.metrics == result.before.metrics and again.records == result.records
    assert (folder / "evaluations" / "step-000000.json").is_file()
    assert any("step-000000.json is missing: evaluating the starting policy again" in line for line in lines)


def test_a_validator_that_raises_or_returns_no_report_names_the_iteration_and_keeps_the_batch(tmp_path):
    from rl_core.run import TrainingRun

    def broken(table):
        raise KeyError("reward")

    run = TrainingRun(tiny_config(tmp_path, "broken"))
    with pytest.raises(RuntimeError, match="iteration 1: the validator raised KeyError: 'reward'; the batch stays"):
        run.run(log=lambda line: None, validator=broken)
    store = run.store
    assert store.iterations("broken") == [1] and store.read_report("broken", 1) is None  # committed, unvalidated
    assert not (tmp_path / "broken" / "history").exists()

    again = TrainingRun.open(tiny_config(tmp_path, "broken"))
    with pytest.raises(TypeError, match="the batch's check returned NoneType, not a ValidationReport"):
        again.run(log=lambda line: None, validator=lambda table: None)
    assert store.read_report("broken", 1) is None

    passing = TrainingRun.open(tiny_config(tmp_path, "broken"))
    lines: list[str] = []
    result = passing.run(lines.append, validator=lambda table: ValidationReport(True, "ok", [], table.num_rows, None))
    assert "[broken] iteration 1: reusing the batch already written (iteration-000001.parquet)" in lines
    assert [r.trained for r in result.records] == [True, True] and store.read_report("broken", 1).passed
