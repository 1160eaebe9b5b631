"""The `turnstile` command line.

    turnstile train [--config PATH] [--set section.field=value ...]   # the Prefect train flow
    turnstile demo  [--set ...]                                       # train on the shipped quickstart config
    turnstile eval  [--config PATH] [--set ...]                       # held-out evaluation of the starting policy
    turnstile evaluate [--model SPEC ...] [--no-samples] [--part P]  # models side by side (flows/evaluate_cli.py)
    turnstile serve [--port 4200] [--work-pool]                      # Prefect server + the deployments, served here
    turnstile replay RUN_ID ... / turnstile transcript RUN_ID ...   # stored trajectories (flows/replay_cli.py)
    turnstile resume RUN_ID [--run-dir runs] [--set iterations=N]     # continue a run on the config it started with

Without PREFECT_API_URL, Prefect runs the flow on a temporary local server whose database
lives under the run directory (PREFECT_HOME defaults to `<storage.run_dir>/prefect`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from flows.environment import prepare_environment
from flows.evaluate_cli import add_evaluate_command, run_evaluate_command
from flows.parameters import TrainSettings
from flows.replay_cli import add_replay_commands, run_replay_command
from flows.serve import add_serve_command, run_serve_command
from rl_core.config import config_error_line
from rl_core.gate import SKIP_WORDS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnstile", description="Multi-turn RL for LLM agents.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "run the train flow"),
        ("eval", "evaluate the starting policy on held-out tasks"),
        ("demo", "run the train flow on the shipped quickstart config"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", default=None, help="YAML run config (default: data/configs/quickstart.yaml)")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. rollout.group_size=4",
        )
    add_evaluate_command(commands)
    add_replay_commands(commands)
    add_serve_command(commands)
    resume = commands.add_parser(
        "resume", help="continue a run (after a crash, or for more iterations) on the config it started with"
    )
    resume.add_argument("run_id", help="the run to continue (a folder under --run-dir)")
    resume.add_argument("--run-dir", default="runs", help="storage.run_dir the run lives in (default: runs)")
    resume.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change what a continued run may change, e.g. iterations=40",
    )
    return parser


def _settings(args: argparse.Namespace) -> TrainSettings:
    """The config file and overrides a command runs on (`resume`: the run's own recorded config).

    `resume`'s run id and folder go in as the typed settings fields, as they are: `turnstile
    resume 2024` (or `on`, `null`) continues the run named "2024", never one named by YAML's reading of it.
    """
    if args.command == "demo":
        return TrainSettings(overrides=args.overrides)
    if args.command == "resume":
        from rl_core.runs.folder import RUN_CONFIG_FILE

        return TrainSettings(
            config_path=str(Path(args.run_dir) / args.run_id / RUN_CONFIG_FILE),
            overrides=args.overrides,
            run_dir=args.run_dir,
            run_id=args.run_id,
        )
    return TrainSettings(config_path=args.config, overrides=args.overrides)


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
        f"  MLflow UI:   .venv/bin/mlflow ui --backend-store-uri {mlflow_uri} --workers 1 --port 5000",
        f"  Prefect UI:  .venv/bin/turnstile serve --run-dir {run_dir}",
        "               (then open http://127.0.0.1:4200: this run's flow, the deployments, and runs "
        "started from the UI)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("replay", "transcript"):
        return run_replay_command(args)
    if args.command == "serve":
        return run_serve_command(args)
    if args.command == "evaluate":
        return run_evaluate_command(args)
    try:
        settings = _settings(args)
        cfg = settings.load()
    except (ValueError, FileNotFoundError) as err:
        print(f"turnstile: bad config: {config_error_line(err)}", file=sys.stderr)
        return 2
    prepare_environment(cfg)
    started = time.time()
    if args.command == "eval":
        from rl_core.evaluation import Evaluator
        from rl_core.learner import load_start_policy

        evaluator = None
        try:
            evaluator = Evaluator.from_config(cfg)
            report = evaluator.evaluate(load_start_policy(cfg))
        except (ValueError, FileNotFoundError) as err:  # e.g. a policy the configured chat format cannot render
            print(f"turnstile: {err}", file=sys.stderr)
            return 2
        finally:
            if evaluator is not None:
                evaluator.close()
        for key, value in sorted(report.metrics.items()):
            print(f"{key:40s} {value:.4f}")
        return 0
    from flows.train import train_flow

    try:
        summary = train_flow(settings)
    except (
        ValueError,
        FileNotFoundError,
    ) as err:  # e.g. continuing a run with another setup; the flow run logged the traceback
        print(f"turnstile: {err}", file=sys.stderr)
        return 2
    print(closing_summary(summary, time.time() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
