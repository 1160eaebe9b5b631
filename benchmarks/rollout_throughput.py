"""Rollout throughput: the batched engine against one episode at a time, side by side.

Both sides run the same policy, the same tasks, the same rollout settings and the same
engine code (`collect_rollouts`); the only difference is batching:
  batched    : one call for all `tasks x group_size` episodes, every turn's generation
               batched across all live episodes;
  sequential : one call per episode (group_size 1), so every forward pass holds one sequence.
Prints generated tokens per second for both and their ratio. The sides alternate over
`--repeats` rounds and the best round of each is reported, to damp noise on a shared machine.

    python benchmarks/rollout_throughput.py [--tasks 32] [--group-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import load_config
from rl_core.learner import load_start_policy
from rl_core.rollout import collect_rollouts
from rl_core.runs.task_sampler import TaskSampler


def generated_tokens(episodes) -> int:
    return sum(e.response_tokens for e in episodes)


def run_batched(policy, work, settings, group_size, seed):
    episodes = collect_rollouts(
        policy,
        work,
        settings,
        group_size=group_size,
        run_id="bench",
        iteration=0,
        generator=torch.Generator().manual_seed(seed),
    )
    return generated_tokens(episodes)


def run_sequential(policy, work, settings, group_size, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    for pair in work:
        for _ in range(group_size):
            tokens += generated_tokens(
                collect_rollouts(
                    policy, [pair], settings, group_size=1, run_id="bench", iteration=0, generator=generator
                )
            )
    return tokens


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run config (default: the shipped quickstart)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--tasks", type=int, default=32, help="tasks (groups) per batch")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    policy = load_start_policy(cfg)
    work = TaskSampler(load_environments(cfg), cfg.environment.train_split, cfg.seed).next_batch(args.tasks)
    settings = rollout_settings(cfg)
    best = {"batched": 0.0, "sequential": 0.0}
    for round_ in range(args.repeats):
        for name, fn in (("batched", run_batched), ("sequential", run_sequential)):
            tokens, seconds = timed(fn, policy, work, settings, args.group_size, round_)
            rate = tokens / seconds
            best[name] = max(best[name], rate)
            print(f"round {round_ + 1} {name:>10}: {tokens:6d} generated tokens in {seconds:7.2f}s = {rate:8.1f} tok/s")
    episodes = args.tasks * args.group_size
    print(f"\n{episodes} episodes ({args.tasks} tasks x group_size {args.group_size}), {args.threads} threads")
    print(f"batched    {best['batched']:8.1f} generated tok/s")
    print(f"sequential {best['sequential']:8.1f} generated tok/s")
    print(f"ratio      {best['batched'] / best['sequential']:8.1f}x")


if __name__ == "__main__":
    main()
