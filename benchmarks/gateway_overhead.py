"""What the rollout gateway costs: the same episodes collected in process and through the gateway.

Both sides play the same tasks with the same policy (`--config`: the quickstart's reference checkpoint with text
actions by default, or e.g. data/configs/smollm2.yaml, SmolLM2-135M-Instruct with its own chat template and
Hermes tool calls; `python scripts/fetch_smollm2.py` first) and the same in-process token sampler
(`hf_token_sampler`, torch with `--threads` threads):
  in-process : `collect_rollouts`, the environment sessions stepped by the rollout engine itself;
  gateway    : `AgentGateway.collect` in push mode: the agent, written with the official `openai` client
               (tests/agents/openai_agent.py), runs in its own process, served over HTTP on loopback, and
               plays each rollout in a thread of its own; every model call is an HTTP chat completion, the
               agent runs the tools and posts the reward and the completion over HTTP.
Sampling is greedy (temperature 0), so both sides play the same episodes; the script reports how many episodes
have the same generated ids and how many are the same whole token sequence (an episode that runs out of turns
keeps, in process, the environment's answer to its last turn; the agent stops after its last call). The
sides alternate over `--rounds` rounds after a warm-up; every round's generated tokens/s is printed and the
best round of each side is reported with the ratio gateway / in-process (goal: the gateway costs under 20%,
a ratio >= 0.80).

Run it alone: both sides share this machine's cores.

    python benchmarks/gateway_overhead.py [--config data/configs/quickstart.yaml] [--tasks 16] [--group-size 4]
        [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import subprocess
import sys
import time

import httpx
import torch

from rl_core.collector import load_environments, rollout_settings
from rl_core.config import AgentConfig, load_config
from rl_core.gateway.collection import AgentGateway
from rl_core.learner import load_start_policy
from rl_core.paths import REPO_ROOT
from rl_core.rollout import collect_rollouts


def sampled_ids(episode) -> list[int]:
    """The ids the policy generated in an episode (loss mask 1)."""
    return [t for t, m in zip(episode.tokens, episode.loss_mask) if m]


def generated(episodes) -> int:
    return sum(e.response_tokens for e in episodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="data/configs/quickstart.yaml")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("httpx").setLevel(logging.WARNING)

    cfg = load_config(REPO_ROOT / args.config)
    envs = load_environments(cfg)
    policy = load_start_policy(cfg)
    settings = dataclasses.replace(rollout_settings(cfg), temperature=0.0)
    tasks = [(env, task) for env in envs for task in env.tasks("train")]
    work = tasks[: args.tasks]
    rollouts = len(work) * args.group_size

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    native = ["--native"] if policy.episode_renderer().native_tools else []
    command = [sys.executable, "-m", "tests.agents.openai_agent", "--port", str(port), *native]
    agent = subprocess.Popen(command, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):  # its start-up: imports, then /health
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    gateway = AgentGateway(AgentConfig(url=url, max_concurrency=rollouts), cfg.rollout.max_retries)

    def in_process():
        return collect_rollouts(policy, work, settings, group_size=args.group_size, run_id="bench", iteration=1)

    def through_gateway():
        return gateway.collect(policy, work, settings, group_size=args.group_size, run_id="bench", iteration=1)

    sides = {"in-process": in_process, "gateway": through_gateway}
    best: dict[str, float] = {}
    episodes: dict[str, list] = {}
    for play in sides.values():  # warm-up
        play()
    for round_ in range(1, args.rounds + 1):
        for side, play in sides.items():
            started = time.perf_counter()
            episodes[side] = play()
            seconds = time.perf_counter() - started
            rate = generated(episodes[side]) / seconds
            best[side] = max(best.get(side, 0.0), rate)
            print(
                f"round {round_} {side:10s}: {generated(episodes[side]):6d} tokens in {seconds:6.2f} s "
                f"= {rate:7.1f} tok/s"
            )
    gateway.close()
    agent.terminate()
    agent.wait(timeout=30)
    pairs = list(zip(episodes["in-process"], episodes["gateway"]))
    same = sum(a.tokens == b.tokens for a, b in pairs)
    same_generated = sum(sampled_ids(a) == sampled_ids(b) for a, b in pairs)
    print(
        f"episodes: {rollouts} per side; identical generated ids: {same_generated}/{rollouts}, identical whole "
        f"episodes: {same}/{rollouts}; "
        f"agent failures: {sum(e.finish_reason == 'env_error' for e in episodes['gateway'])}"
    )
    ratio = best["gateway"] / best["in-process"]
    print(
        f"best: in-process {best['in-process']:.1f} tok/s, gateway {best['gateway']:.1f} tok/s; "
        f"gateway / in-process = {ratio:.2f} (overhead {100 * (1 - ratio):.0f}%)"
    )


if __name__ == "__main__":
    main()
