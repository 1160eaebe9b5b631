"""Make the shipped reference starting checkpoint (data/checkpoints/reference).

1. Train a byte-level BPE tokenizer on the domains' own text (system prompts, task
   prompts, expert actions and observations of the TRAINING split only).
2. Build a small Llama-style model from a config.
3. Fine-tune it on IMPERFECT expert demonstrations: at every branch of a procedure the
   demonstrator takes the wrong branch with probability `--mistake-rate`, so the policy
   starts well above 0 and well below 100% held-out pass@1, leaving room for RL.
4. Save it (safetensors, float32) and print held-out pass@1 (greedy).

Deterministic for a given seed. Takes a few minutes on 2 CPU cores:
    python scripts/make_reference_checkpoint.py [--out DIR] [--epochs N] [--mistake-rate P]
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch

from rl_core.environments import load_environment
from rl_core.environments.expert import solve
from rl_core.evaluation import evaluate
from rl_core.model.policy import Policy, build_tiny_model, save_policy
from rl_core.model.sft import fine_tune, render_transcript
from rl_core.model.tokenizer import build_tokenizer, chat_format
from rl_core.paths import DATA_DIR
from rl_core.rollout import RolloutSettings

DOMAINS = ["refunds", "inventory", "access"]


def tokenizer_corpus(envs) -> list[str]:
    """Training-split text the tokenizer learns its merges from."""
    corpus = []
    for env in envs:
        corpus.append(env.system_prompt())
        for task in env.tasks("train"):
            corpus.append(task.prompt)
            for action, observation in solve(env, task).turns:
                corpus += [action] + ([observation] if observation else [])
    return corpus


def demonstrations(
    policy: Policy, envs, per_task: int, mistake_rate: float, seed: int
) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    examples = []
    for env in envs:
        system = env.system_prompt()
        for task in env.tasks("train"):
            for _ in range(per_task):
                demo = solve(env, task, mistake_rate=mistake_rate, rng=rng)
                examples.append(render_transcript(policy, system, task.prompt, demo.turns))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "checkpoints" / "reference")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--demos-per-task", type=int, default=1)
    parser.add_argument("--mistake-rate", type=float, default=0.35)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=768)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.time()
    torch.manual_seed(args.seed)
    envs = [load_environment(name) for name in DOMAINS]
    tokenizer = build_tokenizer(tokenizer_corpus(envs), vocab_size=args.vocab_size)
    # RoPE has no learned position weights: the limit is config only. 8192 fits the long procedure of the
    # SOP-Bench-format domain (data/sopbench/appliance_warranty, data/configs/sopbench.yaml).
    model = build_tiny_model(tokenizer, max_positions=8192, seed=args.seed)
    policy = Policy(model=model, tokenizer=tokenizer, chat=chat_format("turnstile", tokenizer))
    examples = demonstrations(policy, envs, args.demos_per_task, args.mistake_rate, args.seed)
    lengths = sorted(len(t) for t, _ in examples)
    print(
        f"{len(examples)} demonstrations, tokens median {lengths[len(lengths) // 2]} max {lengths[-1]}, "
        f"vocab {len(tokenizer)}, params {sum(p.numel() for p in model.parameters()):,}"
    )
    fine_tune(policy, examples, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)

    settings = RolloutSettings(max_turns=6, max_tokens_per_turn=40, context_window=768, temperature=0.0)
    report = evaluate(policy, envs, settings, split="heldout")
    print(f"held-out pass@1 {report.pass_at_1:.3f} per domain {report.per_env}")
    if args.out.exists():
        shutil.rmtree(args.out)
    save_policy(policy, args.out)
    print(f"saved {args.out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
