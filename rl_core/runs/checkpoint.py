"""Checkpoints: model weights (safetensors) + tokenizer + optimizer state + step, written atomically.

Layout: `<run_dir>/checkpoints/step-000003/` holding the Hugging Face model files
(`model.safetensors`, `config.json`), the tokenizer files, `optimizer.pt`, `rng.pt` (random
number generator states, for exact resume) and `trainer_state.json` ({"step": 3, ...}). A
checkpoint is written into a temporary sibling folder (`step-000003.tmp`) and renamed into place,
so a folder named `step-*` without a suffix is always complete. This module owns these names:
everything else asks `checkpoints_dir`, `checkpoint_dir`, `latest_checkpoint` and
`remove_unfinished_checkpoints`. The folder
loads with `load_policy` like any Hugging Face model directory.

For a LoRA policy the model files are the adapter in PEFT layout (`adapter_config.json`,
`adapter_model.safetensors`, plus `base/` when the base model has no path on disk; see
rl_core/model/lora.py), and `optimizer.pt` covers only the adapter parameters (the trainable ones).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rl_core.model.policy import Policy, load_policy, save_policy

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
CHECKPOINTS_DIR = "checkpoints"
_UNFINISHED_SUFFIX = ".tmp"
_COMPLETE_GLOB = "step-[0-9]*[0-9]"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's checkpoints: `<run_dir>/checkpoints`."""
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_dir(checkpoints_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint after optimizer step `step` (whether or not it exists)."""
    return Path(checkpoints_dir) / f"step-{step:06d}"


def remove_unfinished_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Delete the temporary folders a killed `save_checkpoint` or `prune_checkpoints` left; returns them.
    Call only when no writer is active there (e.g. when a run starts or resumes)."""
    unfinished = sorted(Path(checkpoints_dir).glob(f"step-*{_UNFINISHED_SUFFIX}"))
    for folder in unfinished:
        shutil.rmtree(folder, ignore_errors=True)
    return unfinished


def save_checkpoint(
    checkpoints_dir: str | Path,
    policy: Policy,
    optimizer: torch.optim.Optimizer | None,
    extra: dict[str, Any] | None = None,
    rng_states: dict[str, Any] | None = None,
) -> Path:
    """Save the policy at its current version; returns the checkpoint folder. Refuses to overwrite."""
    final = checkpoint_dir(checkpoints_dir, policy.version)
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    temp = final.with_name(final.name + _UNFINISHED_SUFFIX)
    shutil.rmtree(temp, ignore_errors=True)
    try:
        save_policy(policy, temp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), temp / OPTIMIZER_FILE)
        if rng_states is not None:
            torch.save(rng_states, temp / RNG_FILE)
        state = {"step": policy.version, **(extra or {})}
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        for path in (p for p in temp.rglob("*") if p.is_file()):
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temp, final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer state (step, iteration, the step's metrics, ...), without the weights."""
    state_file = Path(path) / STATE_FILE
    if not state_file.exists():
        raise FileNotFoundError(f"{path} is not a Turnstile checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def load_checkpoint(path: str | Path, **policy_kwargs: Any) -> tuple[Policy, dict[str, Any]]:
    """Load a checkpoint's policy (version = its step) and its trainer state."""
    state = read_checkpoint_state(path)
    policy = load_policy(Path(path), **policy_kwargs)
    policy.version = int(state["step"])
    return policy, state


def restore_optimizer(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer state saved in checkpoint `path` into `optimizer` (built over the loaded policy)."""
    optimizer.load_state_dict(torch.load(Path(path) / OPTIMIZER_FILE, weights_only=True))


def load_rng_states(path: str | Path) -> dict[str, Any] | None:
    """The random generator states saved with checkpoint `path`, or None if it has none."""
    file = Path(path) / RNG_FILE
    return torch.load(file, weights_only=True) if file.exists() else None


def prune_checkpoints(
    checkpoints_dir: str | Path, keep: int, protect: set[Path] | frozenset[Path] = frozenset()
) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints and those in `protect`; returns the deleted folders."""
    folders = sorted(Path(checkpoints_dir).glob(_COMPLETE_GLOB))
    doomed = [f for f in (folders[:-keep] if keep > 0 else []) if f not in protect]
    for folder in doomed:  # renamed out of the `step-*` names first: a crash mid-delete leaves no half checkpoint
        going = folder.with_name(folder.name + _UNFINISHED_SUFFIX)
        shutil.rmtree(going, ignore_errors=True)
        os.replace(folder, going)
        shutil.rmtree(going)
    return doomed


def checkpoint_steps(checkpoints_dir: str | Path) -> list[int]:
    """The steps (policy versions) of the complete checkpoints in `checkpoints_dir`, ascending."""
    return sorted(int(f.name.removeprefix("step-")) for f in Path(checkpoints_dir).glob(_COMPLETE_GLOB))


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint folder, or None."""
    folders = sorted(Path(checkpoints_dir).glob(_COMPLETE_GLOB))
    return folders[-1] if folders else None
