"""The closing summary of a train run: what a person needs after it, from the flow's returned dict.

One function, `closing_summary`, used by both places a run ends: the train flow logs it as its last
line (so a run started from the Prefect UI has it in its log), and `turnstile train` prints it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rl_core.gate import SKIP_WORDS
from tasks.links import DEFAULT_MLFLOW_UI

SERVED_PREFECT_UI = "http://127.0.0.1:4200"
"""Where `turnstile serve` shows the Prefect UI (its default port)."""


def _iterations_sentence(summary: dict[str, Any]) -> str:
    """How many iterations ran, trained and were skipped (and why), from the run's iteration records."""
    done = summary.get("iterations_run", summary["iterations"])
    kinds = Counter(s.get("by", "validation") for s in summary["skipped"])
    text = f"{done} of {summary['iterations']} ({summary['trained_steps']} trained"
    if kinds:
        text += f", {len(summary['skipped'])} skipped: " + ", ".join(f"{n} {SKIP_WORDS[k]}" for k, n in kinds.items())
    return text + ")"


def _pass_at_1_sentence(summary: dict[str, Any]) -> str:
    before, after = summary["pass_at_1_before"], summary["pass_at_1_after"]
    if not summary.get("optimizer_steps", summary["trained_steps"]):
        return f"{before:.3f} at step 0 (no optimizer step was taken: the policy is the starting one)"
    return f"{before:.3f} before -> {after:.3f} after"


def _gate_sentence(summary: dict[str, Any]) -> str:
    gate = summary["gate"]
    if gate is None:
        return f"no candidate: {summary.get('no_candidate') or 'no checkpoint after step 0 was evaluated'}"
    checks = gate.get("checks") or []
    failed = [c["reason"] for c in checks if not c["passed"]]
    # the reasons that decided it: what failed, or (promoted) what it was compared with; all of them in gate.json
    decisive = failed or (gate["reasons"][len(checks) - 1 :] if checks else gate["reasons"])
    return (
        f"version {summary['candidate_version']} (step {summary['candidate_step']}) {gate['outcome']}: "
        f"{'; '.join(decisive)}"
    )


def _champion_sentence(summary: dict[str, Any]) -> str:
    version = summary.get("champion_version")
    if version is None and "champion_version" in summary:
        return f"none yet (no version of {summary['registered_model']} holds the alias champion)"
    suffix = "" if version is None else f" (version {version})"
    return f"models:/{summary['registered_model']}@champion{suffix}"


def closing_summary(summary: dict[str, Any], seconds: float) -> str:
    """What a person needs after a run: results, where things are, how to look at them. Every sentence
    comes from the flow's summary, which the flow derives from the run's records (iteration records,
    evaluations, gate decision)."""
    mlflow_uri = summary["mlflow_uri"]
    run_dir = Path(summary["checkpoints"]).parent.parent
    lines = [
        "",
        f"Run {summary['run_id']} finished in {seconds / 60:.1f} min",
        f"  iterations run:         {_iterations_sentence(summary)}",
        *(
            f"    iteration {s['iteration']} {SKIP_WORDS[s.get('by', 'validation')]}: {s['reason']}"
            for s in summary["skipped"]
        ),
        f"  held-out pass@1:        {_pass_at_1_sentence(summary)}",
        f"  gate:                   {_gate_sentence(summary)}",
        f"  Parquet trajectories:   {summary['trajectories']}",
        f"  checkpoints:            {summary['checkpoints']}",
        f"  MLflow store:           {mlflow_uri} (run {summary['mlflow_run_id']})",
        f"  champion:               {_champion_sentence(summary)}",
        f"  continue or re-run:     .venv/bin/turnstile resume {summary['run_id']} --run-dir {run_dir}",
        f"  curves:                 {Path(summary['checkpoints']).parent / 'curves'} (also in MLflow and Prefect)",
        *(
            f"  doctor, step {f['step']}: {f['message']} First change to try: {f['first_change']}"
            for f in summary["findings"]
        ),
        *([f"  stopped early: {summary['stopped']}"] if summary["stopped"] else []),
        "",
        "Look at it:",
        *_look_at_it(summary, run_dir),
    ]
    return "\n".join(lines)


def _look_at_it(summary: dict[str, Any], run_dir: Path) -> list[str]:
    """The pages to open: the MLflow runs view (metric charts), the traces view (the logged episodes) and the
    Prefect flow run; with the commands that serve them when the run used local stores."""
    mlflow_uri = summary["mlflow_uri"]
    lines = []
    if not mlflow_uri.startswith(("http://", "https://")):
        port = urlsplit(summary.get("mlflow_runs_url") or DEFAULT_MLFLOW_UI).port or 5000  # tracking.ui_url's port
        command = f".venv/bin/mlflow ui --backend-store-uri {mlflow_uri} --workers 1 --port {port}"
        lines.append(f"  MLflow UI:        {command}")
    if summary.get("mlflow_runs_url"):
        lines += [
            f"  MLflow runs:      {summary['mlflow_runs_url']}  (metric charts: val/pass_at_1, rollout/reward/mean)",
            f"  MLflow run:       {summary['mlflow_run_url']}",
            f"  MLflow traces:    {summary['mlflow_traces_url']}  (the episodes, turn by turn)",
        ]
    if summary.get("prefect_flow_run_url"):
        lines.append(f"  Prefect flow run: {summary['prefect_flow_run_url']}")
    else:  # the temporary server is gone: its database is under the run folder, which `turnstile serve` opens
        page = f"/runs/flow-run/{summary['prefect_flow_run_id']}" if summary.get("prefect_flow_run_id") else ""
        lines += [
            f"  Prefect UI:       .venv/bin/turnstile serve --run-dir {run_dir}",
            f"                    (then open {SERVED_PREFECT_UI}{page}: this run's flow run, the deployments, "
            "and runs started from the UI)",
        ]
    return lines
