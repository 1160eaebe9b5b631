"""LoRA: low-rank adapters on the policy (via peft), their checkpoints, and the merge-to-full export.

Contracts:
- `apply_lora(policy, cfg)` wraps `policy.model` in a peft model, in place: only the adapter
  weights require grad (so an optimizer over `requires_grad` parameters trains the adapter
  alone), and at init the outputs equal the base model's (LoRA's B matrices start at zero).
- `save_adapter(model, directory)` writes the standard Hugging Face PEFT layout
  (`adapter_config.json` + `adapter_model.safetensors`). The config's `base_model_name_or_path`
  names the base model: an absolute local path or a hub id. A base with no durable path (built
  from a config in memory, or itself loaded from a checkpoint's `base/` folder, which pruning may
  delete) is saved in full beside the adapter, in the `base/` subfolder, and recorded as `base`
  (relative to the adapter folder): such checkpoints stay self-contained at the cost of one copy
  of the base weights each.
- `load_adapter_model(directory, dtype, device)` loads the base (its `base/` subfolder when
  present, else `base_model_name_or_path`) plus the adapter, trainable, ready to resume.
- `merge_to_full(checkpoint_dir, out_dir)` folds the adapter into the base weights and writes a
  plain Hugging Face causal-LM folder (safetensors + tokenizer), loadable without peft.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

if TYPE_CHECKING:
    from rl_core.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"
_NAME = "default"  # peft's name for the single adapter


class _HasModel(Protocol):
    """What `apply_lora` needs of a policy (rl_core.model.policy.Policy; not imported: policy imports this module)."""

    model: PreTrainedModel


_P = TypeVar("_P", bound=_HasModel)


def is_lora(model: torch.nn.Module) -> bool:
    """True when `model` is a peft model carrying adapters."""
    return isinstance(model, PeftModel)


def is_adapter_dir(path: str | Path) -> bool:
    """True when `path` is a local folder holding a PEFT adapter (`adapter_config.json`)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _durable_path(model: PreTrainedModel) -> str | None:
    """Where `model` can be loaded from again: an absolute local path, a hub id, or None (in memory)."""
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:
        return None
    local = Path(name)
    return str(local.resolve()) if local.exists() else name


def apply_lora(policy: _P, cfg: LoraConfig) -> _P:
    """Wrap `policy.model` with fresh LoRA adapters from `cfg` (in place); returns `policy`."""
    if is_lora(policy.model):
        raise ValueError("the policy already carries LoRA adapters")
    base = policy.model
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
    )
    model = get_peft_model(base, peft_cfg)
    model.peft_config[_NAME].base_model_name_or_path = _durable_path(base)
    policy.model = model
    return policy


def _base_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's own weights, with the adapter layers' wrapping taken off the names."""
    state = model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def save_adapter(model: PeftModel, directory: str | Path) -> None:
    """Write the adapter in PEFT layout to `directory` (plus `base/` when the base has no durable path)."""
    directory = Path(directory)
    config = model.peft_config[_NAME]
    base_ref = config.base_model_name_or_path
    if base_ref is None:
        model.get_base_model().save_pretrained(directory / BASE_DIR, state_dict=_base_state_dict(model))
    config.base_model_name_or_path = base_ref or BASE_DIR
    try:
        # Turnstile never resizes the vocabulary, so full embedding layers need not be saved (and
        # peft need not look the base's config up, possibly on the hub, to decide that).
        model.save_pretrained(directory, save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = base_ref


def adapter_base(directory: str | Path) -> str:
    """Where the base model of adapter folder `directory` is: its `base/` subfolder or the recorded reference."""
    directory = Path(directory)
    if (directory / BASE_DIR).is_dir():
        return str(directory / BASE_DIR)
    ref = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not ref or ref == BASE_DIR:
        raise FileNotFoundError(
            f"adapter {directory} has no {BASE_DIR}/ folder and names no base model (base_model_name_or_path)"
        )
    return ref


def tokenizer_dir(path: str | Path) -> str:
    """Where the tokenizer for model folder `path` is: the folder itself, or an adapter's base when it holds none."""
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").exists():
        return adapter_base(path)
    return str(path)


def load_adapter_model(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> PeftModel:
    """Base model plus the adapter saved in `directory`, with the adapter trainable."""
    base_ref = adapter_base(directory)
    base = AutoModelForCausalLM.from_pretrained(base_ref, dtype=dtype).to(device)
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=True)
    in_checkpoint = Path(base_ref) == Path(directory) / BASE_DIR
    model.peft_config[_NAME].base_model_name_or_path = None if in_checkpoint else base_ref
    return model


def merge_to_full(checkpoint_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Merge the adapter of LoRA checkpoint `checkpoint_dir` into its base; save a plain HF folder at `out_dir`."""
    if not is_adapter_dir(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} is not a LoRA checkpoint (no {ADAPTER_CONFIG})")
    out_dir = Path(out_dir)
    merged = load_adapter_model(checkpoint_dir, dtype=dtype).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir(checkpoint_dir)).save_pretrained(out_dir)
    return out_dir
