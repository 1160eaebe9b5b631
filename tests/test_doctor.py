"""The training doctor: each symptom on a synthetic history that has it, silence on a healthy one,
advice that names the config field to change, and one real aggressive CISPO run (slow)."""

from __future__ import annotations

import importlib.util
import math
import statistics

import pytest

from rl_core.config import RunConfig
from rl_core.doctor import SYMPTOMS, Finding, diagnose, last_good_step, newly_reported
from rl_core.paths import REPO_ROOT


def config(**sections) -> RunConfig:
    """A RunConfig with `section={field: value}` changes (e.g. algorithm={"loss_fn": "cispo"})."""
    return RunConfig.model_validate(sections)


def entry(step: int, reward: float, **metrics: float) -> dict[str, float]:
    """A trained step's metrics, healthy unless overridden (keys use '__' for '/', e.g. train__grad_norm)."""
    out = {
        "step": step,
        "iteration": step,
        "rollout/episodes": 128.0,
        "rollout/reward/mean": reward,
        "rollout/reward/std": 0.45,
        "rollout/success/mean": reward,
        "rollout/finish/token_cap": 0.02,
        "rollout/finish/answered": 0.95,
        "analysis/zero_variance_groups": 0.25,
        "analysis/zero_variance_groups/all_correct": 0.1,
        "analysis/zero_variance_groups/all_wrong": 0.15,
        "train/grad_norm": 0.4,
        "train/entropy": 0.07,
        "train/loss": 0.01,
    }
    out.update({key.replace("__", "/"): value for key, value in metrics.items()})
    return out


def wobble(step: int) -> float:
    """Deterministic batch-to-batch noise of +-0.03."""
    return 0.03 * math.sin(1.7 * step)


def learning_history(steps: int = 30, val_every: int = 10) -> list[dict[str, float]]:
    """Reward rising 0.30 -> 0.60 with noise, held-out pass@1 rising with it."""
    history = [{"step": 0, "val/pass_at_1": 0.34}]
    for step in range(1, steps + 1):
        history.append(entry(step, 0.30 + 0.30 * step / steps + wobble(step)))
        if step % val_every == 0:
            history[-1]["val/pass_at_1"] = 0.34 + 0.25 * step / steps
    return history


def rise_then_collapse(peak_step: int = 20, steps: int = 30) -> list[dict[str, float]]:
    """Reward rising to 0.60 at `peak_step`, then falling to about 0.05 within a few steps."""
    history = []
    for step in range(1, steps + 1):
        reward = 0.30 + 0.30 * step / peak_step if step <= peak_step else max(0.05, 0.60 - 0.15 * (step - peak_step))
        history.append(entry(step, reward + wobble(step)))
    return history


def symptoms(findings: list[Finding]) -> list[str]:
    return [f.symptom for f in findings]


def only(findings: list[Finding], symptom: str) -> Finding:
    matching = [f for f in findings if f.symptom == symptom]
    assert len(matching) == 1, f"expected one {symptom} finding, got {symptoms(findings)}"
    return matching[0]


# --- healthy --------------------------------------------------------------------------------------


def test_a_healthy_learning_history_is_quiet_at_every_step():
    history, cfg = learning_history(), config()
    for end in range(1, len(history) + 1):
        assert diagnose(history[:end], cfg) == [], f"findings at step {history[end - 1]['step']}"


def test_findings_carry_every_field_and_a_symptom_name():
    finding = only(diagnose(rise_then_collapse(), config()), "reward_collapse")
    assert finding.symptom in SYMPTOMS
    assert set(finding.as_dict()) == {"symptom", "step", "metric", "value", "threshold", "message", "first_change"}
    assert finding.step == 30
    assert "step 30 reward_collapse: rollout/reward/mean=" in finding.describe()


def test_a_disabled_doctor_reports_nothing():
    assert diagnose(rise_then_collapse(), config(doctor={"enabled": False})) == []


# --- one test per symptom -------------------------------------------------------------------------


def test_reward_flat_after_flat_reward_steps():
    cfg = config()
    steps = cfg.doctor.flat_reward_steps
    history = [entry(step, 0.30 + wobble(step)) for step in range(1, steps + 1)]
    assert "reward_flat" not in symptoms(diagnose(history[:-1], cfg))
    finding = only(diagnose(history, cfg), "reward_flat")
    assert finding.metric == "rollout/reward/mean"
    assert finding.value <= finding.threshold
    slope, _ = statistics.linear_regression([e["step"] for e in history], [e["rollout/reward/mean"] for e in history])
    assert finding.value == pytest.approx(abs(slope) * (steps - 1))  # the fitted change over steps 1..steps
    assert "optimizer.lr" in finding.first_change


def test_reward_that_is_zero_everywhere_is_flat_and_points_at_zero_variance_groups():
    history = [
        entry(
            step,
            0.0,
            rollout__reward__std=0.0,
            analysis__zero_variance_groups=1.0,
            analysis__zero_variance_groups__all_correct=0.0,
            analysis__zero_variance_groups__all_wrong=1.0,
        )
        for step in range(1, 21)
    ]
    finding = only(diagnose(history, config(doctor={"flat_reward_steps": 20})), "reward_flat")
    assert finding.value == 0.0
    assert "algorithm.zero_variance_groups=resample" in finding.first_change


def test_zero_variance_groups_mostly_all_wrong():
    history = [
        entry(
            step,
            0.05,
            analysis__zero_variance_groups=0.9,
            analysis__zero_variance_groups__all_correct=0.05,
            analysis__zero_variance_groups__all_wrong=0.85,
        )
        for step in range(1, 6)
    ]
    finding = only(diagnose(history, config()), "zero_variance_groups")
    assert finding.metric == "analysis/zero_variance_groups"
    assert finding.value == pytest.approx(0.9)
    assert finding.threshold == 0.8
    assert "85% all wrong" in finding.message
    assert "easier tasks" in finding.first_change
    assert "algorithm.zero_variance_groups=resample" in finding.first_change
    assert "rollout.group_size" in finding.first_change


def test_zero_variance_groups_mostly_all_correct_asks_for_harder_tasks():
    history = [
        entry(
            step,
            0.95,
            analysis__zero_variance_groups=0.9,
            analysis__zero_variance_groups__all_correct=0.85,
            analysis__zero_variance_groups__all_wrong=0.05,
        )
        for step in range(1, 6)
    ]
    finding = only(diagnose(history, config()), "zero_variance_groups")
    assert "harder tasks" in finding.first_change


def test_zero_variance_groups_waits_for_a_full_window():
    history = [entry(step, 0.05, analysis__zero_variance_groups=1.0) for step in range(1, 5)]
    assert "zero_variance_groups" not in symptoms(diagnose(history, config()))


def test_reward_hacking_when_training_reward_rises_and_held_out_falls():
    history = learning_history()
    for e, val in zip([x for x in history if "val/pass_at_1" in x], (0.34, 0.33, 0.31, 0.30)):
        e["val/pass_at_1"] = val
    finding = only(diagnose(history, config()), "reward_hacking")
    trained = [e for e in history if "rollout/reward/mean" in e]
    slope, _ = statistics.linear_regression([e["step"] for e in trained], [e["rollout/reward/mean"] for e in trained])
    assert finding.metric == "rollout/reward/mean"
    assert finding.value == pytest.approx(slope * 29)  # the fitted rise over steps 1..30
    assert finding.threshold == 0.1
    assert "0.340 -> 0.300" in finding.message
    assert "turnstile replay --scorer" in finding.first_change


def test_a_rise_smaller_than_the_reward_noise_is_not_hacking():
    history = learning_history()
    for e in history[1:]:  # fitted rise 0.126 over steps 1..30, standard error 0.158
        e["rollout/reward/mean"] = 0.3 + (0.25 if e["step"] % 2 else -0.25) + 0.006 * e["step"]
    for e in [x for x in history if "val/pass_at_1" in x]:
        e["val/pass_at_1"] = 0.34
    assert "reward_hacking" not in symptoms(diagnose(history, config()))


def test_reward_hacking_needs_two_evaluations():
    history = [e for e in learning_history() if e["step"] > 0]
    for e in history:
        e.pop("val/pass_at_1", None)
    history[-1]["val/pass_at_1"] = 0.1
    assert "reward_hacking" not in symptoms(diagnose(history, config()))


def test_reward_collapse_value_and_threshold():
    history = rise_then_collapse()
    assert "reward_collapse" not in symptoms(diagnose(history[:22], config()))
    finding = only(diagnose(history, config()), "reward_collapse")
    rewards = [e["rollout/reward/mean"] for e in history]
    best = max(sum(rewards[end - 5 : end]) / 5 for end in range(5, len(rewards) + 1))
    assert finding.metric == "rollout/reward/mean"
    assert finding.value == pytest.approx(sum(rewards[-5:]) / 5)
    assert finding.threshold == pytest.approx(0.5 * best)


def test_reward_collapse_with_off_policy_cispo_goes_on_policy_then_to_ppo():
    cfg = config(
        algorithm={"loss_fn": "cispo", "clip_low_threshold": 1.0, "clip_high_threshold": 6.0},
        rollout={"overlap_collection": True},
    )
    finding = only(diagnose(rise_then_collapse(), cfg), "reward_collapse")
    assert finding.first_change.startswith("set rollout.overlap_collection=false and algorithm.max_steps_off_policy=0;")
    assert (
        "switch to algorithm.loss_fn=ppo with clip_low_threshold=0.8, clip_high_threshold=1.2" in finding.first_change
    )


def test_reward_collapse_with_on_policy_cispo_lowers_the_learning_rate_and_says_why():
    cfg = config(
        algorithm={"loss_fn": "cispo", "clip_low_threshold": 1.0, "clip_high_threshold": 6.0}, optimizer={"lr": 3e-3}
    )
    finding = only(diagnose(rise_then_collapse(), cfg), "reward_collapse")
    assert finding.first_change.startswith("lower optimizer.lr (now 0.003, e.g. to 0.001)")
    assert "on-policy" in finding.first_change and "algorithm.max_steps_off_policy=0" in finding.first_change


def test_reward_collapse_with_ppo_lowers_the_learning_rate():
    ppo = only(diagnose(rise_then_collapse(), config(optimizer={"lr": 3e-4})), "reward_collapse")
    assert ppo.first_change.startswith("lower optimizer.lr (now 0.0003, e.g. to 0.0001)")
    assert "loss_fn" not in ppo.first_change
    off_policy_ppo = only(
        diagnose(rise_then_collapse(), config(rollout={"overlap_collection": True})), "reward_collapse"
    )
    assert off_policy_ppo.first_change.startswith("lower optimizer.lr")


def test_a_collapse_inside_the_first_window_is_still_seen():
    history = [entry(step, reward) for step, reward in enumerate((0.05, 0.30, -0.10, -0.10, -0.10), start=1)]
    finding = only(diagnose(history, config()), "reward_collapse")
    assert finding.value == pytest.approx(0.01)
    assert last_good_step(history, config()) == 1


def test_no_collapse_from_a_best_that_never_left_zero():
    history = [entry(step, 0.04 if step < 10 else 0.0) for step in range(1, 16)]
    assert "reward_collapse" not in symptoms(diagnose(history, config()))


def test_last_good_step_is_the_policy_that_sampled_the_end_of_the_best_window():
    history = rise_then_collapse(peak_step=20)
    rewards = [e["rollout/reward/mean"] for e in history]
    best_end = max(range(5, len(rewards) + 1), key=lambda end: sum(rewards[end - 5 : end]))
    assert last_good_step(history, config()) == best_end - 1
    assert 18 <= last_good_step(history, config()) <= 21
    assert last_good_step([], config()) is None


def test_token_cap_from_the_start_raises_the_turn_budget():
    history = [entry(step, 0.3, rollout__finish__token_cap=0.5) for step in range(1, 6)]
    finding = only(diagnose(history, config()), "token_cap")
    assert finding.metric == "rollout/finish/token_cap"
    assert finding.value == pytest.approx(0.5)
    assert finding.threshold == 0.2
    assert finding.first_change.startswith("raise rollout.max_tokens_per_turn")
    assert "up to 56" in finding.first_change  # (768 - 192) // 6 - 40 with the defaults


def test_token_cap_reached_while_training_is_a_drift():
    shares = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9)
    history = [entry(step, 0.3, rollout__finish__token_cap=share) for step, share in enumerate(shares, start=1)]
    finding = only(diagnose(history, config()), "token_cap")
    assert finding.value == pytest.approx(sum(shares[-5:]) / 5)
    assert "drifted" in finding.first_change and "optimizer.lr" in finding.first_change
    assert not finding.first_change.startswith("raise rollout.max_tokens_per_turn")


def test_grad_norm_pinned_at_the_clip():
    history = [entry(step, 0.3, train__grad_norm=1.5 + 0.1 * step) for step in range(1, 6)]
    finding = only(diagnose(history, config()), "grad_norm_pinned")
    assert finding.metric == "train/grad_norm"
    assert finding.value == 1.0
    assert finding.threshold == 0.8
    assert "optimizer.lr" in finding.first_change


def test_grad_norm_reaching_the_clip_now_and_then_is_not_pinned():
    norms = (1.5, 1.5, 1.5, 1.5, 0.5)
    history = [entry(step, 0.3, train__grad_norm=norm) for step, norm in enumerate(norms, start=1)]
    assert "grad_norm_pinned" not in symptoms(diagnose(history, config()))


# --- robustness and helpers -----------------------------------------------------------------------


def test_missing_keys_and_nan_values_are_tolerated():
    cfg = config()
    assert diagnose([], cfg) == []
    assert diagnose([{"step": 0, "val/pass_at_1": 0.3}], cfg) == []
    assert diagnose([{"step": s} for s in range(1, 20)], cfg) == []
    assert diagnose([{"rollout/reward/mean": float("nan"), "train/grad_norm": None} for _ in range(20)], cfg) == []
    assert last_good_step([{"step": 1}], cfg) is None
    only_rewards = [{"step": e["step"], "rollout/reward/mean": e["rollout/reward/mean"]} for e in rise_then_collapse()]
    assert symptoms(diagnose(only_rewards, cfg)) == ["reward_collapse"]


def test_newly_reported_keeps_only_symptoms_not_seen_the_step_before():
    cfg = config()
    before = diagnose(rise_then_collapse()[:-1], cfg)
    now = diagnose(rise_then_collapse(), cfg)
    assert symptoms(now) == ["reward_collapse"]
    assert newly_reported([], now) == now
    assert newly_reported(before, now) == ([] if "reward_collapse" in symptoms(before) else now)


# --- one real run -------------------------------------------------------------------------------


def load_benchmark():
    """benchmarks/doctor_cispo.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("doctor_cispo", REPO_ROOT / "benchmarks" / "doctor_cispo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_aggressive_cispo_on_the_shipped_environment_collapses_and_is_diagnosed():
    """At lr 3e-3 the shipped policy collapses within a few steps (rambling to the token cap);
    the doctor must report the collapse and the token cap (about 30 s on 2 CPU cores)."""
    benchmark = load_benchmark()
    overrides = benchmark.cispo_overrides(lr=3e-3, batch=64, group_size=8, iterations=10, val_every=100, eval_tasks=1)
    history, reported = benchmark.run_with_doctor(overrides, evaluate=False)
    assert [e["step"] for e in history] == list(range(1, 11))
    found = {f.symptom: f for f in reported}
    assert {"reward_collapse", "token_cap"} <= set(found), [f.describe() for f in reported]
    collapse = found["reward_collapse"]
    assert collapse.metric == "rollout/reward/mean" and collapse.value < collapse.threshold
    assert collapse.first_change.startswith("lower optimizer.lr (now 0.003")
    assert found["token_cap"].value > 0.2
