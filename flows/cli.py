"""The `turnstile` command line.

    turnstile train [--config PATH] [--set section.field=value ...]
    turnstile demo                      # train on the shipped quickstart config
    turnstile eval  [--config PATH] [--set ...]

For now the commands run the rl_core loop in this process (collect -> write Parquet ->
train -> checkpoint, with held-out evaluation before and after); the Prefect flows that
orchestrate the same stages as retryable tasks build on it.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rl_core.config import load_config
from rl_core.run import TrainingRun


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turnstile", description="Multi-turn RL for LLM agents.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "run training iterations"), ("eval", "evaluate the starting policy"), ("demo", "train on the shipped quickstart config")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", default=None, help="YAML run config (default: data/configs/quickstart.yaml)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. rollout.group_size=4")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"turnstile: bad config: {err}", file=sys.stderr)
        return 2
    run = TrainingRun(cfg)
    started = time.time()
    if args.command == "eval":
        report = run.evaluate()
        for key, value in sorted(report.metrics.items()):
            print(f"{key:40s} {value:.4f}")
        return 0
    summary = run.run()
    print(
        f"\nrun {run.run_id}: {cfg.iterations} iterations in {time.time() - started:.0f}s; held-out pass@1 "
        f"{summary['pass_at_1_before']:.3f} -> {summary['pass_at_1_after']:.3f}\n"
        f"trajectories: {run.run_dir / 'trajectories'}\ncheckpoints:  {run.checkpoints_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
