"""The `turnstile` command line.

    turnstile train [--config PATH] [--set section.field=value ...]   # the Prefect train flow
    turnstile demo  [--set ...]                                       # train on the shipped quickstart config
    turnstile eval  [--config PATH] [--set ...]                       # held-out evaluation of the starting policy
    turnstile evaluate [--model SPEC ...] [--no-samples] [--part P]  # models side by side (flows/evaluate_cli.py)
    turnstile serve [--port 4200] [--work-pool]                      # Prefect server + the deployments, served here
    turnstile replay RUN_ID ... / turnstile transcript RUN_ID ...   # stored trajectories (flows/replay_cli.py)
    turnstile resume RUN_ID [--run-dir runs] [--set iterations=N]     # continue a run on the config it started with
    turnstile learner-node --node-rank K [--config PATH] [--set ...]  # machine K's learner ranks of a multi-node run

Without PREFECT_API_URL, Prefect runs the flow on a temporary local server whose database
lives under the run directory (PREFECT_HOME defaults to `<storage.run_dir>/prefect`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flows.environment import prepare_environment
from flows.evaluate_cli import add_evaluate_command, run_evaluate_command
from flows.parameters import TrainSettings
from flows.replay_cli import add_replay_commands, run_replay_command
from flows.serve import add_serve_command, run_serve_command
from flows.summary import closing_summary
from rl_core.config import config_error_line

__all__ = ["closing_summary", "main"]


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
    node = commands.add_parser(
        "learner-node",
        help="start this machine's learner ranks for a run whose trainer.num_nodes > 1 (node 0 is the run's machine)",
    )
    node.add_argument("--node-rank", type=int, required=True, help="this machine's node rank, 1..trainer.num_nodes-1")
    node.add_argument("--config", default=None, help="the run's YAML config (the trainer section is read)")
    node.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as the run's --set"
    )
    return parser


def run_learner_node(args: argparse.Namespace) -> int:
    """Run machine `--node-rank`'s learner ranks (torchrun, in the foreground) until the run's learner stops; they
    join node 0's rendezvous at trainer.master_addr:master_port and take the run's config from rank 0.
    Returns torchrun's exit code (2 for a bad config or node rank)."""
    import subprocess

    from rl_core.config import load_config
    from rl_core.distributed.launch import torchrun_command

    try:
        cfg = load_config(args.config, overrides=args.overrides)
        nodes = cfg.trainer.num_nodes
        if nodes == 1:
            raise ValueError("learner-node is for a run whose trainer.num_nodes > 1 (this config has 1 machine)")
        if args.node_rank == 0:
            raise ValueError("node rank 0 is the run's own machine: its ranks start with the run (turnstile train)")
        if not 0 < args.node_rank < nodes:
            raise ValueError(f"--node-rank must be in 1..{nodes - 1} (trainer.num_nodes {nodes}), got {args.node_rank}")
        command = torchrun_command(cfg.trainer, args.node_rank, cfg.trainer.master_port)
    except (ValueError, FileNotFoundError) as err:
        print(f"turnstile: bad learner node: {config_error_line(err)}", file=sys.stderr)
        return 2
    t = cfg.trainer
    print(
        f"node {args.node_rank} of {nodes}: {t.num_processes} learner rank(s), waiting for node 0 (the run) at "
        f"{t.master_addr}:{t.master_port}\n{' '.join(command)}",
        flush=True,
    )
    return subprocess.call(command)


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("replay", "transcript"):
        return run_replay_command(args)
    if args.command == "serve":
        return run_serve_command(args)
    if args.command == "evaluate":
        return run_evaluate_command(args)
    if args.command == "learner-node":
        return run_learner_node(args)
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
    from rl_core.distributed.launch import LearnerRanksError

    try:
        summary = train_flow(settings)
    except LearnerRanksError as err:  # the learner's ranks died; the run resumes from its last checkpoint
        print(f"turnstile: {str(err).splitlines()[0]}", file=sys.stderr)
        if err.log_path is not None:
            run = err.log_path.parent.parent
            print(f"the ranks' log: {err.log_path}", file=sys.stderr)
            print(f"continue the run with: turnstile resume {run.name} --run-dir {run.parent}", file=sys.stderr)
        return 1
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
