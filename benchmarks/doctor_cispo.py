"""CISPO at an aggressive learning rate on the shipped environment, with the training doctor watching.

Trains the quickstart config with `algorithm.loss_fn=cispo` (ratio bounds 1.0, 6.0) and a large
`optimizer.lr`, builds the metric history step by step as the train flow does, runs
`rl_core.doctor.diagnose` after every step and prints each finding when its symptom
(re)appears, then a summary of every symptom seen.

    python benchmarks/doctor_cispo.py [--iterations 30] [--lr 2e-3] [--batch 64] [--group-size 8]
                                      [--val-every 10] [--eval-tasks 10] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable

import torch

from rl_core.config import load_config
from rl_core.doctor import Finding, diagnose, newly_reported
from rl_core.metrics import rollout_metrics
from rl_core.run import TrainingRun

History = list[dict[str, float]]


def cispo_overrides(
    lr: float, batch: int, group_size: int, iterations: int, val_every: int, eval_tasks: int
) -> list[str]:
    """Quickstart overrides for an aggressive CISPO run (without storage settings)."""
    return [
        "algorithm.loss_fn=cispo",
        "algorithm.clip_low_threshold=1.0",
        "algorithm.clip_high_threshold=6.0",
        f"optimizer.lr={lr}",
        f"rollout.global_batch_size={batch}",
        f"rollout.group_size={group_size}",
        f"iterations={iterations}",
        f"evaluation.val_every={val_every}",
        f"evaluation.max_tasks={eval_tasks}",
    ]


def run_with_doctor(
    overrides: list[str],
    on_finding: Callable[[Finding], None] = lambda f: None,
    on_step: Callable[[dict[str, float]], None] = lambda entry: None,
    evaluate: bool = True,
) -> tuple[History, list[Finding]]:
    """Train the quickstart config with `overrides` in a temporary run folder, diagnosing after every step.

    Returns the metric history and every finding at the step its symptom (re)appeared. With
    `evaluate`, held-out pass@1 is measured at step 0 and every `evaluation.val_every` steps."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(
            None,
            overrides + [f"storage.run_dir={run_dir}", "storage.run_id=doctor-cispo", "storage.keep_checkpoints=1"],
        )
        run = TrainingRun(cfg)
        history: History = [{"step": 0, "val/pass_at_1": run.evaluate(samples=False).pass_at_1}] if evaluate else []
        for entry in history:
            on_step(entry)
        reported: list[Finding] = []
        previous: list[Finding] = []
        for iteration, episodes in run.batches(1, cfg.iterations):
            run.write(iteration, episodes)
            entry = {"iteration": float(iteration), **rollout_metrics(episodes), **run.train(episodes).as_dict()}
            entry["step"] = run.policy.version
            if evaluate and iteration % cfg.evaluation.val_every == 0:
                entry["val/pass_at_1"] = run.evaluate(samples=False).pass_at_1
            history.append(entry)
            on_step(entry)
            findings = diagnose(history, cfg)
            for finding in newly_reported(previous, findings):
                reported.append(finding)
                on_finding(finding)
            previous = findings
    return history, reported


def print_step(entry: dict[str, float]) -> None:
    """One line per step: the numbers the doctor reads."""
    shown = {
        "reward": "rollout/reward/mean",
        "success": "rollout/success/mean",
        "zero_variance": "analysis/zero_variance_groups",
        "token_cap": "rollout/finish/token_cap",
        "grad_norm": "train/grad_norm",
        "val/pass_at_1": "val/pass_at_1",
    }
    numbers = " ".join(f"{label} {entry[key]:.3f}" for label, key in shown.items() if key in entry)
    print(f"step {entry['step']:>3}: {numbers}", flush=True)


def print_summary(reported: list[Finding], seconds: float) -> None:
    print(f"\n{len(reported)} finding(s) in {seconds:.0f}s")
    for finding in reported:
        print(
            f"  step {finding.step:>3} {finding.symptom}: {finding.metric}={finding.value:.4g} (threshold "
            f"{finding.threshold:.4g})"
        )
        print(f"           first change: {finding.first_change}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=64, help="rollout.global_batch_size (episodes per step)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument(
        "--eval-tasks", type=int, default=10, help="evaluation.max_tasks (held-out tasks per environment)"
    )
    parser.add_argument(
        "--no-eval", action="store_true", help="skip held-out evaluations (reward_hacking then stays quiet)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--history-out", metavar="PATH", help="write the metric history as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = cispo_overrides(args.lr, args.batch, args.group_size, args.iterations, args.val_every, args.eval_tasks)
    started = time.perf_counter()
    history, reported = run_with_doctor(
        overrides + args.overrides,
        on_finding=lambda f: print(f"  DOCTOR {f.describe()}", flush=True),
        on_step=print_step,
        evaluate=not args.no_eval,
    )
    if args.history_out:
        with open(args.history_out, "w") as out:
            json.dump(history, out, indent=1)
    print_summary(reported, time.perf_counter() - started)


if __name__ == "__main__":
    main()
