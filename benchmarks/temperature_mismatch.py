"""Token-sampler/trainer log-prob mismatch on the first, fully on-policy step, per sampling temperature.

Issue 9 item 1: the quickstart config with 4 tasks x group 4, one collection, then the first
training step. With the trainer reading log-probs at each episode's sampling temperature,
`train/logprob_mismatch_max` stays at float error and `train/clip_fraction` at 0 at every T
(before, at T = 0.5 they were about 0.55 and 0.005).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/temperature_mismatch.py [T ...]
"""

from __future__ import annotations

import sys
import tempfile

import torch

from rl_core.config import load_config
from rl_core.run import TrainingRun


def main(temperatures: list[float]) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="turnstile-bench-") as run_dir:
        for t in temperatures:
            overrides = [
                f"rollout.temperature={t}",
                "rollout.group_size=4",
                "rollout.global_batch_size=16",
                f"storage.run_dir={run_dir}",
                f"storage.run_id=t{t}",
            ]
            run = TrainingRun(load_config(None, overrides))
            metrics = run.train(run.collect(1))
            print(
                f"T={t}: train/logprob_mismatch_max={metrics.logprob_mismatch_max:.2e} "
                f"train/clip_fraction={metrics.clip_fraction:.4f}"
            )


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0.5, 1.0])
