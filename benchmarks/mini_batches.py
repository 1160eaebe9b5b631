"""Mini-batches per batch: held-out pass@1 after the same number of collected batches (issue 9, item 11).

Each `--mini-batches` value trains from the same reference policy with the quickstart config,
the same seed and the same number of collected batches (`--iterations`); with M mini-batches
every batch is split into M mini-batches of whole groups, each taking one optimizer step
(`optimizer.mini_batches_per_step`), so the policy takes M x `--epochs` optimizer steps per
batch and the ratio pi_new / pi_old, and with it PPO's clipping, moves within a batch. Reports
greedy held-out pass@1 before and after, the mean clip fraction, optimizer steps and time.

    python benchmarks/mini_batches.py [--iterations 10] [--mini-batches 1 4] [--epochs 1]
                                      [--seeds 0] [--threads 2] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from rl_core.config import load_config
from rl_core.run import TrainingRun


@dataclass
class Result:
    """One training run: pass@1 before and after, mean clip fraction, optimizer steps, seconds."""

    mini_batches: int
    seed: int
    before: float
    after: float
    clip_fraction: float
    optimizer_steps: int
    seconds: float


def train_and_evaluate(mini_batches: int, epochs: int, seed: int, iterations: int, overrides: list[str]) -> Result:
    """Collect and train `iterations` batches with `mini_batches` mini-batches per batch; evaluate before and after."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            None,
            overrides
            + [
                f"seed={seed}",
                f"iterations={iterations}",
                f"storage.run_dir={run_dir}",
                "storage.keep_checkpoints=1",
                f"optimizer.mini_batches_per_step={mini_batches}",
                f"optimizer.epochs_per_batch={epochs}",
            ],
        )
        run = TrainingRun(cfg)
        before = run.evaluate(samples=False).pass_at_1
        clip = []
        for iteration in range(1, iterations + 1):
            metrics = run.train(run.collect(iteration))
            clip.append(metrics.clip_fraction)
        after = run.evaluate(samples=False).pass_at_1
        steps = run.policy.version
    return Result(mini_batches, seed, before, after, statistics.fmean(clip), steps, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=10, help="collected batches per run")
    parser.add_argument("--mini-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--epochs", type=int, default=1, help="optimizer.epochs_per_batch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for seed in args.seeds:
        for mini_batches in args.mini_batches:
            r = train_and_evaluate(mini_batches, args.epochs, seed, args.iterations, args.overrides)
            results.append(r)
            print(
                f"mini_batches={r.mini_batches} seed={r.seed}: held-out pass@1 {r.before:.3f} -> {r.after:.3f}, "
                f"clip fraction {r.clip_fraction:.4f}, {r.optimizer_steps} optimizer steps ({r.seconds:.0f}s)",
                flush=True,
            )

    print(
        f"\n| mini-batches | optimizer steps | mean clip fraction | pass@1 before | pass@1 after {args.iterations} "
        "batches |"
    )
    print("| --- | --- | --- | --- | --- |")
    for mini_batches in args.mini_batches:
        rows = [r for r in results if r.mini_batches == mini_batches]
        print(
            f"| {mini_batches} | {statistics.fmean(r.optimizer_steps for r in rows):.0f} | "
            f"{statistics.fmean(r.clip_fraction for r in rows):.4f} | {statistics.fmean(r.before for r in rows):.3f} | "
            f"{statistics.fmean(r.after for r in rows):.3f} |"
        )


if __name__ == "__main__":
    main()
