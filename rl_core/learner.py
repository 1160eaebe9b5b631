"""The learner: the policy being trained, its trainer (optimizer, backend, KL reference) and its checkpoints.

`Learner.train` takes one training step (`Trainer.step`); `save_checkpoint` writes everything a
resume needs into `checkpoints/step-NNNNNN/` (rl_core/runs/checkpoint.py) and prunes beyond
`storage.keep_checkpoints` (except `protected_steps`); `roll_back_to` loads an earlier step's
weights and optimizer state into the policy (the training doctor's rollback); `snapshot` is a
frozen copy that can sample while the policy trains (overlapped collection).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from rl_core.config import RunConfig
from rl_core.model.policy import Policy, load_policy
from rl_core.runs.checkpoint import (
    checkpoint_dir,
    checkpoint_steps,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_state,
    restore_optimizer,
    save_checkpoint,
)
from rl_core.trainer import StepMetrics, Trainer
from rl_core.trajectory import Episode


def load_start_policy(cfg: RunConfig) -> Policy:
    """The policy the run starts from (`policy.path`), checked against the configured context window.

    Raises ValueError when `policy.context_window` exceeds the model's max_position_embeddings."""
    policy = load_policy(
        cfg.resolved_policy_path(),
        chat=cfg.policy.chat_format,
        tool_parser=cfg.policy.tool_parser,
        stop_token=cfg.policy.stop_token,
        dtype=cfg.policy.dtype,
        device=cfg.policy.device,
        lora=cfg.policy.lora,
    )
    if cfg.policy.context_window > policy.max_positions:
        raise ValueError(
            f"policy.context_window ({cfg.policy.context_window}) exceeds the model's max_position_embeddings "
            f"({policy.max_positions})"
        )
    return policy


def load_run_checkpoint(cfg: RunConfig, folder: str | Path) -> tuple[Policy, dict[str, Any]]:
    """A checkpoint's policy (version = its step) and trainer state, loaded as the config's policy says."""
    p = cfg.policy
    return load_checkpoint(
        folder, chat=p.chat_format, dtype=p.dtype, device=p.device, tool_parser=p.tool_parser, stop_token=p.stop_token
    )


def reference_model(cfg: RunConfig) -> torch.nn.Module | None:
    """A frozen copy of the starting policy's model, for the KL penalty (None when algorithm.kl_coef is 0)."""
    if cfg.algorithm.kl_coef == 0:
        return None
    reference = load_start_policy(cfg).model.eval()
    reference.requires_grad_(False)
    return reference


def make_trainer(cfg: RunConfig, policy: Policy) -> Trainer:
    """The config's `Trainer` over `policy` (in this process: one rank of a multi-rank learner, or the whole one)."""
    return Trainer(
        policy,
        cfg.algorithm,
        cfg.optimizer,
        reference=reference_model(cfg),
        trainer_cfg=cfg.trainer,
        temperature=cfg.rollout.temperature,  # for episodes without a sampling record
    )


class Learner:
    """The policy in training, its trainer, and the checkpoints in `checkpoints_dir`.

    With `trainer.num_processes` x `trainer.num_nodes` > 1 the trainer is a `RemoteTrainer`: torchrun-launched
    ranks train (rl_core/distributed/), logging to `<checkpoints_dir>/../learner/ranks.log`, and `policy` is the
    driver's copy they update after each step; `close` stops them."""

    def __init__(self, cfg: RunConfig, policy: Policy, checkpoints_dir: Path):
        self.cfg, self.policy, self.checkpoints_dir = cfg, policy, Path(checkpoints_dir)
        if cfg.trainer.world_size > 1:
            from rl_core.distributed.launch import RemoteTrainer

            self.trainer = RemoteTrainer(cfg, policy, self.checkpoints_dir.parent / "learner")
        else:
            self.trainer = make_trainer(cfg, policy)
        self.checkpointed_version = policy.version  # version of the newest checkpoint (the start needs none)
        self.last_step: StepMetrics | None = None  # what the latest `train` call did
        self.protected_steps: set[int] = set()  # checkpoints kept whatever storage.keep_checkpoints says

    def train(self, episodes: list[Episode]) -> StepMetrics:
        """One training step on `episodes` (`Trainer.step`); `StepMetrics.skipped` says why when no
        optimizer step was applied (the policy version and weights are then unchanged)."""
        self.last_step = self.trainer.step(episodes)
        return self.last_step

    def close(self) -> None:
        """Stop the learner's ranks (a multi-rank learner); nothing to do for one in this process."""
        close = getattr(self.trainer, "close", None)
        if close is not None:
            close()

    @property
    def moved(self) -> bool:
        """Whether the policy took an optimizer step since its newest checkpoint."""
        return self.policy.version != self.checkpointed_version

    def save_checkpoint(self, state: dict[str, Any], rng_states: dict[str, Any]) -> Path:
        """Checkpoint the policy, optimizer, `rng_states` and trainer `state` (JSON-ready), then drop the
        oldest checkpoints beyond `storage.keep_checkpoints` (never `protected_steps`); returns the folder.
        Raises FileExistsError when a checkpoint of this step exists."""
        path = save_checkpoint(self.checkpoints_dir, self.policy, self.trainer.optimizer, state, rng_states)
        self.checkpointed_version = self.policy.version
        if self.cfg.storage.keep_checkpoints is not None:
            keep = {checkpoint_dir(self.checkpoints_dir, step) for step in self.protected_steps}
            prune_checkpoints(self.checkpoints_dir, self.cfg.storage.keep_checkpoints, protect=keep)
        return path

    def checkpoint_metrics(self) -> dict[str, float]:
        """The train metrics saved with the checkpoint of the policy's current step ({} without them).
        Raises FileNotFoundError when that checkpoint is missing."""
        return read_checkpoint_state(checkpoint_dir(self.checkpoints_dir, self.policy.version)).get("metrics", {})

    def restore_optimizer(self, folder: str | Path) -> None:
        """Load the optimizer state of checkpoint `folder` (taken over this policy)."""
        restore_optimizer(folder, self.trainer.optimizer)

    def rollback_targets(self) -> set[int]:
        """The steps the policy can be rolled back to: 0 (the starting policy) and every checkpoint on disk."""
        return {0, *checkpoint_steps(self.checkpoints_dir)}

    def roll_back_to(self, step: int) -> None:
        """Load the weights and optimizer state this run had at `step` (0: the starting policy, with a
        fresh optimizer) into the policy. The step counter keeps counting up (versions stay unique;
        staleness stays measured in steps). Raises FileNotFoundError if that checkpoint is gone."""
        if step == 0:
            earlier = load_start_policy(self.cfg)
        else:
            folder = checkpoint_dir(self.checkpoints_dir, step)
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"cannot roll back to step {step}: {folder} is gone (pruned by storage.keep_checkpoints?)"
                )
            earlier, _ = load_run_checkpoint(self.cfg, folder)
        trainable = {name for name, p in self.policy.model.named_parameters() if p.requires_grad}
        self.trainer.load_weights({name: p for name, p in earlier.model.named_parameters() if name in trainable})
        if step == 0:
            self.trainer.reset_optimizer()
        else:
            self.restore_optimizer(folder)

    def snapshot(self) -> Policy:
        """A frozen copy of the policy (same version) that can sample while the original trains."""
        model = copy.deepcopy(self.policy.model).eval()
        model.requires_grad_(False)
        policy = self.policy
        return Policy(model, policy.tokenizer, policy.chat, policy.version, policy.renderer)
