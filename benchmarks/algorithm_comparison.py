"""Compare losses and advantage methods on the shipped environment: held-out pass@1 after N steps.

Every combination of `--losses` x `--advantages` trains from the same reference policy, with
the same seed, tasks and number of steps (the quickstart config otherwise), and reports greedy
held-out pass@1 before and after. CISPO runs with its usual ratio bounds (1.0, 6.0); the
others with PPO's (0.8, 1.2).

    python benchmarks/algorithm_comparison.py [--iterations 20] [--losses ppo cispo importance_sampling]
                                              [--advantages group_based rloo] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rl_core.config import load_config
from rl_core.run import TrainingRun

CLIP_BOUNDS = {"cispo": (1.0, 6.0)}


def train_and_evaluate(overrides: list[str], iterations: int) -> tuple[float, float, float]:
    """(pass@1 before, pass@1 after, seconds) for one configuration."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            None, overrides + [f"iterations={iterations}", f"storage.run_dir={run_dir}", "storage.keep_checkpoints=1"]
        )
        run = TrainingRun(cfg)
        before = run.evaluate(samples=False).pass_at_1
        for iteration in range(1, iterations + 1):
            run.train(run.collect(iteration))
        after = run.evaluate(samples=False).pass_at_1
    return before, after, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--losses", nargs="+", default=["ppo", "cispo", "importance_sampling"])
    parser.add_argument("--advantages", nargs="+", default=["group_based", "rloo"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for loss in args.losses:
        low, high = CLIP_BOUNDS.get(loss, (0.8, 1.2))
        for advantage in args.advantages:
            overrides = args.overrides + [
                f"algorithm.loss_fn={loss}",
                f"algorithm.advantage_method={advantage}",
                f"algorithm.clip_low_threshold={low}",
                f"algorithm.clip_high_threshold={high}",
            ]
            before, after, seconds = train_and_evaluate(overrides, args.iterations)
            rows.append((loss, advantage, before, after, seconds))
            print(
                f"{loss:>20} + {advantage:<14} held-out pass@1 {before:.3f} -> {after:.3f}  ({seconds:.0f}s)",
                flush=True,
            )

    print(f"\n| loss | advantages | pass@1 before | pass@1 after {args.iterations} steps |")
    print("| --- | --- | --- | --- |")
    for loss, advantage, before, after, _ in rows:
        print(f"| {loss} | {advantage} | {before:.3f} | {after:.3f} |")


if __name__ == "__main__":
    main()
