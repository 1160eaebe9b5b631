"""The policy: a Hugging Face causal LM, its tokenizer and chat format, and its version.

`build_tiny_model(tokenizer, ...)` makes a small Llama-architecture model from a config
(no download), for tests and the shipped reference checkpoint. `load_policy(path, ...)` is
the ordinary loading of any Hugging Face causal LM directory (or hub id, where a hub can
be reached). `save_policy` writes safetensors weights and the tokenizer.
`Policy.version` counts optimizer steps applied since the run started from `path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from rl_core.tokenizer import ChatFormat, chat_format

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """A causal LM ready for generation and training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat: ChatFormat
    version: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 384,
    max_positions: int = 1024,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A small Llama-style causal LM sized to `tokenizer`, initialised from `seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_policy(path: str | Path, *, chat: str = "turnstile", dtype: str = "float32", device: str = "cpu") -> Policy:
    """Load a Hugging Face causal LM and its tokenizer from `path`."""
    if not str(path) or (Path(path).is_absolute() and not Path(path).exists()):
        raise FileNotFoundError(f"policy.path {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype]).to(device)
    return Policy(model=model, tokenizer=tokenizer, chat=chat_format(chat, tokenizer))


def save_policy(policy: Policy, directory: str | Path) -> None:
    """Write weights (safetensors), model config and tokenizer to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(directory, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)
