"""Rollout backends: the in-process decoder (`hf`) against a vLLM server (`vllm`), side by side.

Both sides play the same collection through the same engine code (`collect_rollouts`): the same
policy, tasks, rollout settings and token-sampler seeds; the only difference is the token sampler:
  hf   : the policy's own model in this process (`hf_token_sampler`, torch with `--threads` threads);
  vllm : `VLLMClient.generate` on a vLLM server this script starts from the vLLM venv (`make vllm`)
         serving the same checkpoint (OMP threads `--server-threads`), token-in, token-out over HTTP.
The sides alternate over `--rounds` rounds after one small warm-up collection each; every round's
generated tokens/s is printed (with this process's CPU seconds: with the server, what the HTTP client and
the rollout engine's own work take from the cores the server also needs) and the best round of each side is
reported with their ratio. Then the weight sync is timed: the policy's trainable weights are perturbed and
`sync_policy` pushes them to the server (saved, reloaded in place, prefix cache reset; a LoRA policy
hot-loads its adapter), `--sync-repeats` times, median reported. The server's cold start (process start to
`/health` answering) is reported too. The server runs with the run config's `rollout.vllm.*` settings
(e.g. `--set rollout.vllm.max_concurrency=256` lets all 256 episodes' requests be in flight at once).

Both engines share this machine's CPU cores (2 on the reference machine: 2 threads each by default, used
one side at a time), so run it alone: any other job on the machine disturbs both sides' figures. vLLM
binds its engine to cores itself (`VLLM_CPU_OMP_THREADS_BIND`, default 'auto': on 2 cores, core 0, with
core 1 reserved); `--server-bind 0-1` gives it both. Left-over vLLM workers of other runs bound to the
same core slow the server down badly: check `ps` for stray `VLLM::Worker` processes first.

    python benchmarks/rollout_backends.py [--tasks 32] [--group-size 8] [--rounds 2] [--threads 2]
        [--server-threads 2] [--server-bind 0-1] [--port 8041] [--sync-repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import load_config
from rl_core.learner import load_start_policy
from rl_core.paths import REPO_ROOT
from rl_core.rollout import collect_rollouts
from rl_core.runs.task_sampler import TaskSampler
from rl_core.vllm import VLLMClient, sync_policy
from rl_core.vllm.backend import configured_server


def vllm_sampler(client: VLLMClient, generator: torch.Generator):
    """`client.generate` as a TokenSampler, with per-request seeds drawn from `generator`."""

    def sample(keys, contexts, limits, temperature):
        return client.generate(keys, contexts, limits, temperature, generator)

    return sample


def collect(policy, work, settings, group_size: int, seed: int, client: VLLMClient | None) -> tuple[int, float, float]:
    """One collection; returns (generated tokens, wall seconds, this process's CPU seconds). client None = the
    in-process `hf` sampler; with the server, the CPU seconds are the rollout engine's and the HTTP client's share."""
    generator = torch.Generator().manual_seed(seed)
    extra = {} if client is None else {"token_sampler": vllm_sampler(client, generator), "backend": "vllm"}
    start, cpu = time.perf_counter(), time.process_time()
    episodes = collect_rollouts(
        policy, work, settings, group_size=group_size, run_id="bench", iteration=0, generator=generator, **extra
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return sum(e.response_tokens for e in episodes), seconds, cpu


def time_syncs(client: VLLMClient, policy, folder: Path, repeats: int) -> list[float]:
    """Seconds of `repeats` weight syncs, each after perturbing the policy's trainable weights (a new version)."""
    generator = torch.Generator().manual_seed(1234)
    seconds = []
    for _ in range(repeats):
        with torch.no_grad():
            for parameter in policy.model.parameters():
                if parameter.requires_grad:
                    parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        policy.version += 1
        seconds.append(sync_policy(client, policy, folder))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="run config (default: the shipped quickstart)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--tasks", type=int, default=32, help="tasks (groups) per collection")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of each side, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the in-process decoder")
    parser.add_argument("--server-threads", type=int, default=2, help="OMP threads of the vLLM server")
    parser.add_argument(
        "--server-bind",
        default=None,
        help="cores the server's engine is bound to (VLLM_CPU_OMP_THREADS_BIND, e.g. 0-1); default: vLLM's 'auto', "
        "which on 2 cores binds it to core 0 and reserves core 1",
    )
    parser.add_argument("--port", type=int, default=8041, help="port of the server (127.0.0.1); must be free")
    parser.add_argument("--sync-repeats", type=int, default=3, help="weight syncs timed (median reported)")
    parser.add_argument("--python", default=None, help="the vLLM venv's interpreter (default: rollout.vllm.python)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.server_bind:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.server_bind  # the server inherits this environment
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    cfg = load_config(args.config or REPO_ROOT / "data/configs/quickstart.yaml", args.overrides)
    policy = load_start_policy(cfg)
    work = TaskSampler(load_environments(cfg), cfg.environment.train_split, cfg.seed).next_batch(args.tasks)
    settings = rollout_settings(cfg)
    v = cfg.rollout.vllm

    with tempfile.TemporaryDirectory(prefix="rollout_backends_") as scratch:
        server = configured_server(cfg, str(cfg.resolved_policy_path()), Path(scratch) / "server.log")
        server.port, server.threads = args.port, args.server_threads
        if args.python:
            server.python = Path(args.python) if Path(args.python).is_absolute() else REPO_ROOT / args.python
        try:
            start = time.perf_counter()
            url = server.start()
            cold_start = time.perf_counter() - start
            print(
                f"vLLM server up at {url} in {cold_start:.1f}s ({args.server_threads} OMP threads, cores bound: {bind})"
            )
            client = VLLMClient(
                url,
                sorted(policy.episode_renderer().stop_ids),
                timeout_s=v.request_timeout_s,
                max_concurrency=v.max_concurrency,
            )
            sides = {"hf": None, "vllm": client}
            for side in sides.values():  # warm-up: first-call costs out of the timed rounds
                collect(policy, work[:1], settings, 1, 0, side)
            best = dict.fromkeys(sides, 0.0)
            for round_ in range(args.rounds):
                for name, side in sides.items():
                    tokens, seconds, cpu = collect(policy, work, settings, args.group_size, round_, side)
                    rate = tokens / seconds
                    best[name] = max(best[name], rate)
                    line = (
                        f"{tokens:6d} generated tokens in {seconds:7.2f}s = {rate:8.1f} tok/s ({cpu:5.1f} CPU s here)"
                    )
                    print(f"round {round_ + 1} {name:>4}: {line}")
            syncs = time_syncs(client, policy, Path(scratch) / "weights", args.sync_repeats)
        finally:
            server.stop()

    episodes = args.tasks * args.group_size
    print(f"\n{episodes} episodes ({args.tasks} tasks x group_size {args.group_size}), best of {args.rounds} rounds")
    print(f"hf   {best['hf']:8.1f} generated tok/s ({args.threads} torch threads)")
    print(f"vllm {best['vllm']:8.1f} generated tok/s ({args.server_threads} server threads)")
    print(f"ratio {best['vllm'] / best['hf']:7.2f}x (vllm / hf)")
    kind = "LoRA adapter hot-load" if cfg.policy.lora.enabled else "full weights, reloaded in place"
    shown = ", ".join(f"{s:.2f}" for s in syncs)
    print(f"weight sync ({kind}): median {statistics.median(syncs):.2f}s over {len(syncs)} ({shown})")
    print(f"server cold start {cold_start:.1f}s")


if __name__ == "__main__":
    main()
