"""Supervised fine-tuning on demonstration transcripts (used to make starting checkpoints).

`render_transcript` lays out a demonstration exactly as the rollout engine lays out an
episode (same ChatFormat pieces: prompt, each action + end token, each observation), with
the loss mask on the action tokens only. `fine_tune` trains next-token cross-entropy on
those tokens with AdamW.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from rl_core.model.policy import Policy


def render_transcript(
    policy: Policy, system: str, prompt: str, turns: list[tuple[str, str | None]]
) -> tuple[list[int], list[int]]:
    """(tokens, loss_mask) of a transcript: turns are (action text, observation text or None)."""
    tok, chat = policy.tokenizer, policy.chat
    tokens = chat.prompt(tok, system, prompt)
    mask = [0] * len(tokens)
    for action, observation in turns:
        ids = chat.encode(tok, action) + chat.end
        tokens += ids
        mask += [1] * len(ids)
        if observation is not None:
            obs = chat.observation(tok, observation)
            tokens += obs
            mask += [0] * len(obs)
    return tokens, mask


def fine_tune(
    policy: Policy,
    examples: list[tuple[list[int], list[int]]],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> float:
    """Cross-entropy on masked tokens; returns the last epoch's mean loss."""
    model = policy.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    total_steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.1)
    rng = random.Random(seed)
    epoch_loss = 0.0
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        losses = []
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(t) for t, _ in batch)
            tokens = torch.full((len(batch), width), policy.episode_renderer().pad_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, mask) in enumerate(batch):
                tokens[row, : len(ids)] = torch.tensor(ids)
                attention[row, : len(ids)] = 1
                labels[row, : len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), torch.tensor(-100))
            loss = model(
                input_ids=tokens.to(policy.device),
                attention_mask=attention.to(policy.device),
                labels=labels.to(policy.device),
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        epoch_loss = sum(losses) / len(losses)
        log(f"sft epoch {epoch + 1}/{epochs}: loss {epoch_loss:.4f}")
    return epoch_loss
