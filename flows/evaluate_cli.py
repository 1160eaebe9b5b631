"""The `evaluate` command of the `turnstile` command line: several models side by side on held-out tasks.

    turnstile evaluate [--config PATH] [--set section.field=value ...] [--model SPEC ...]
                       [--no-samples] [--max-tasks N] [--part all|gate|selection] [--run-id ID]

SPEC is `start` (the config's policy.path), `champion`, `version:N` (a registered model version) or
a checkpoint folder; without `--model`: start and champion (the champion is skipped, with a note,
when there is none). It runs the Prefect flow `turnstile-evaluate` (flows/evaluate.py) and prints
the comparison table and where the results are. What is wrong with the request (a malformed spec,
a missing checkpoint folder or one that holds no model, a registry version that does not exist, a
`--run-id` already used by an earlier run, a bad config value) is checked before the flow starts
and printed as one line (`turnstile: ...`), exit code 2.

Wire it into a parser with `add_evaluate_command(subparsers)` and dispatch with
`run_evaluate_command(args)`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, get_args

from pydantic import ValidationError

from flows.environment import prepare_environment
from flows.parameters import RunSettings
from rl_core.config import config_error_line
from rl_core.evaluation import Part


def add_evaluate_command(subparsers: Any) -> None:
    """Add `evaluate` to an argparse subparsers object (dest must be `command`)."""
    evaluate = subparsers.add_parser(
        "evaluate", help="score several models side by side on the same held-out tasks (MLflow, table, plot)"
    )
    evaluate.add_argument("--config", default=None, help="YAML run config (default: data/configs/quickstart.yaml)")
    evaluate.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. evaluation.num_samples=4",
    )
    evaluate.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="SPEC",
        help="a model to evaluate (repeat for more): start, champion, version:N or a checkpoint folder "
        "(default: start and champion)",
    )
    evaluate.add_argument(
        "--no-samples", dest="samples", action="store_false", help="greedy pass@1 only (no pass@k / pass^k)"
    )
    evaluate.add_argument("--max-tasks", type=int, default=None, help="held-out tasks per environment")
    evaluate.add_argument(
        "--part", choices=get_args(Part), default="all", help="all held-out tasks, or only the gate / selection part"
    )
    evaluate.add_argument("--run-id", default=None, help="name of the evaluation (default: eval-<UTC time>-<hex>)")


def _fail(message: str) -> int:
    print(f"turnstile: {message}", file=sys.stderr)
    return 2


def run_evaluate_command(args: Any) -> int:
    """Check the request, run the evaluate flow, print the table; 0, or 2 with one line on stderr."""
    try:
        base = RunSettings(config_path=args.config, overrides=args.overrides)
        cfg = base.load()
    except (ValueError, FileNotFoundError) as err:
        return _fail(f"bad config: {config_error_line(err)}")
    prepare_environment(cfg)  # before Prefect is imported

    from flows.evaluate import EvaluateSettings, check_run_id_free, evaluate_flow, resolve_models
    from tasks.registry import champion_version, registry_version
    from tasks.tracking import PermanentError, mlflow_client

    try:
        settings = EvaluateSettings(
            config_path=args.config,
            overrides=args.overrides,
            models=args.models,
            samples=args.samples,
            max_tasks=args.max_tasks,
            part=args.part,
            run_id=args.run_id,
        )
        cfg = settings.load()
        targets, _ = resolve_models(  # the same checks the flow makes, before a Prefect server starts
            cfg,
            settings.model_specs(),
            registry_version,
            lambda c: champion_version(mlflow_client(c), c.tracking.registered_model),
        )
        if cfg.storage.run_id:  # a default run id is made fresh by the flow
            check_run_id_free(cfg, cfg.storage.run_id, targets)
    except ValidationError as err:
        return _fail(config_error_line(err))
    except (ValueError, FileNotFoundError, PermanentError) as err:
        return _fail(str(err))

    started = time.time()
    try:
        result = evaluate_flow(settings)
    except (ValueError, FileNotFoundError, PermanentError) as err:  # the flow run logged the traceback
        return _fail(str(err))
    print(result["table"])
    print(closing_lines(result, time.time() - started))
    return 0


def closing_lines(result: dict[str, Any], seconds: float) -> str:
    """Where an evaluation's results are, from the flow's result."""
    runs = ", ".join(f"{m['label']} {m['mlflow_run_id']}" for m in result["models"])
    return "\n".join(
        [
            f"Evaluation {result['run_id']} of {len(result['models'])} model(s) finished in {seconds / 60:.1f} min",
            f"  table:        {result['folder']}/comparison.md",
            f"  plot:         {result['plot']}",
            f"  reports:      {result['folder']}/reports/",
            f"  MLflow store: {result['mlflow_uri']} (parent run {result['mlflow_run_id']}; {runs})",
            f"  MLflow run:   {result['mlflow_run_url']}  (the models' runs nested under it)",
            f"  MLflow traces: {result['mlflow_traces_url']}  (the evaluation episodes, turn by turn)",
        ]
    )
