"""The policy: a Hugging Face causal LM, its tokenizer and chat format, and its version.

`build_tiny_model(tokenizer, ...)` makes a small Llama-architecture model from a config
(no download), for tests and the shipped reference checkpoint. `load_policy(path, ...)` is
the ordinary loading of any Hugging Face causal LM directory (or hub id, where a hub can
be reached); a PEFT adapter folder loads as base plus trainable adapter, and `lora=` adds
fresh LoRA adapters to a plain model (see rl_core/model/lora.py). `save_policy` writes safetensors
weights (or, for a LoRA policy, the adapter in PEFT layout) and the tokenizer.
`Policy.version` counts optimizer steps applied since the run started from `path`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rl_core.config.choices import ChatFormatName, DType, ToolParserName
from rl_core.model.harmony_renderer import HarmonyRenderer
from rl_core.model.lora import apply_lora, is_adapter_dir, is_lora, load_adapter_model, save_adapter, tokenizer_dir
from rl_core.model.renderers import Renderer, TextRenderer
from rl_core.model.template_renderer import CALL_INSTRUCTIONS, HFTemplateRenderer
from rl_core.model.tokenizer import ChatFormat, chat_format
from rl_core.model.tool_parsers import tool_parser as tool_parser_for

if TYPE_CHECKING:
    from rl_core.config import LoraConfig

log = logging.getLogger(__name__)

DTYPES: dict[DType, torch.dtype] = {name: getattr(torch, name) for name in get_args(DType)}  # policy.dtype -> torch


@dataclass
class Policy:
    """A causal LM ready for generation and training."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    chat: ChatFormat | None  # the role markers of a text-action policy; None with a native `renderer`
    version: int = 0
    renderer: Renderer | None = None  # how episodes are rendered; None: Turnstile's text actions in `chat`

    def episode_renderer(self) -> Renderer:
        """The renderer of this policy's episodes: `renderer`, or the text actions between `chat`'s role
        markers. Raises ValueError when the policy has neither."""
        if self.renderer is not None:
            return self.renderer
        if self.chat is None:
            raise ValueError("the policy has neither a renderer nor a chat format")
        return TextRenderer("text", self.chat, self.tokenizer)

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


def load_policy(
    path: str | Path,
    *,
    chat: ChatFormatName = "turnstile",
    dtype: DType = "float32",
    device: str = "cpu",
    lora: LoraConfig | None = None,
    tool_parser: ToolParserName = "auto",
    stop_token: str | None = None,
) -> Policy:
    """Load a Hugging Face causal LM and its tokenizer from `path`.

    `chat` names how episodes are rendered: `turnstile` / `chatml` (text actions between role
    markers, `chat_format`), or `hf_template`: the tokenizer's own chat template with tools as
    schemas and native tool calls read by `tool_parser`, turns ending at `stop_token` (default: the
    template's end-of-turn marker, `default_stop_token`; `HFTemplateRenderer`, which raises ValueError for
    a tokenizer without a chat template or without that token), or `harmony`: GPT-OSS's harmony format
    (`HarmonyRenderer`, which parses its own tool calls: `tool_parser` must be harmony or auto, else ValueError;
    so must a `tool_parser` harmony have `chat` harmony; ValueError for a tokenizer that is not harmony's).

    A PEFT adapter folder (`adapter_config.json`) loads as its base model plus the adapter,
    trainable. With `lora` enabled, a plain model gets fresh adapters; an adapter folder keeps
    its own (the saved adapter's rank and targets win over `lora`).
    """
    _check_harmony_pair(chat, tool_parser)  # before loading anything, and again once `auto` is resolved
    if not str(path) or (Path(path).is_absolute() and not Path(path).exists()):
        raise FileNotFoundError(f"policy.path {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(path))
    if is_adapter_dir(path):
        model = load_adapter_model(path, dtype=DTYPES[dtype], device=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype]).to(device)
    # harmony parses its own tool calls: a named harmony side decides an `auto` other side
    if chat == "auto" and tool_parser == "harmony":
        chat = "harmony"
    chat = resolve_chat_format(chat, tokenizer)
    tool_parser = (
        "harmony" if chat == "harmony" and tool_parser == "auto" else resolve_tool_parser(tool_parser, tokenizer)
    )
    _check_harmony_pair(chat, tool_parser)
    if chat in ("turnstile", "chatml") and (stop_token is not None or tool_parser != "hermes"):
        log.warning(
            "policy.chat_format %s writes Turnstile's text actions and ends turns at its own end marker: "
            "policy.tool_parser (%s) and policy.stop_token (%s) are not used",
            chat,
            tool_parser,
            stop_token,
        )
    if chat == "hf_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"policy.chat_format hf_template: the tokenizer at {path} has no chat template; use "
            "policy.chat_format turnstile or chatml (Turnstile's text actions), or auto to pick from the tokenizer"
        )
    if chat == "harmony":
        policy = Policy(model=model, tokenizer=tokenizer, chat=None, renderer=HarmonyRenderer(tokenizer))
    elif chat == "hf_template":
        renderer = HFTemplateRenderer(
            tokenizer, tool_parser_for(tool_parser), stop_token, call_instructions=CALL_INSTRUCTIONS[tool_parser]
        )
        policy = Policy(model=model, tokenizer=tokenizer, chat=None, renderer=renderer)
    else:
        policy = Policy(model=model, tokenizer=tokenizer, chat=chat_format(chat, tokenizer))
    if lora is not None and lora.enabled and not is_lora(model):
        apply_lora(policy, lora)
    return policy


def _check_harmony_pair(chat: ChatFormatName, tool_parser: ToolParserName) -> None:
    """Harmony parses its own tool calls: raise ValueError unless both are harmony (or auto)."""
    if chat == "harmony" and tool_parser not in ("harmony", "auto"):
        raise ValueError(f"policy.chat_format harmony needs policy.tool_parser harmony or auto, not {tool_parser!r}")
    if tool_parser == "harmony" and chat not in ("harmony", "auto"):
        raise ValueError(f"policy.tool_parser harmony needs policy.chat_format harmony or auto, not {chat!r}")


def resolve_chat_format(name: ChatFormatName, tokenizer: PreTrainedTokenizerBase) -> ChatFormatName:
    """`name`, or for "auto" the format the tokenizer was made for: `harmony` when it has harmony's
    `<|channel|>` token (GPT-OSS; checked first: GPT-OSS tokenizers also carry a chat template), else
    `hf_template` when it carries a chat template (a chat model's own), else `turnstile` when it has
    Turnstile's role tokens (`<|user|>`, `<|assistant|>`, `<|end|>`), else `chatml`."""
    if name != "auto":
        return name
    if "<|channel|>" in tokenizer.get_vocab():
        return "harmony"
    if getattr(tokenizer, "chat_template", None):
        return "hf_template"
    vocab = tokenizer.get_vocab()
    return "turnstile" if all(token in vocab for token in ("<|user|>", "<|assistant|>", "<|end|>")) else "chatml"


def resolve_tool_parser(name: ToolParserName, tokenizer: PreTrainedTokenizerBase) -> ToolParserName:
    """`name`, or for "auto": `harmony` for a tokenizer with harmony's `<|channel|>` (GPT-OSS), `gemma` for
    one with Gemma's turn tokens (`<start_of_turn>`), else `hermes` (the `<tool_call>` format of Qwen,
    Hermes and most open chat models)."""
    if name != "auto":
        return name
    vocab = tokenizer.get_vocab()
    if "<|channel|>" in vocab:
        return "harmony"
    return "gemma" if "<start_of_turn>" in vocab else "hermes"


def save_policy(policy: Policy, directory: str | Path) -> None:
    """Write weights (safetensors) and model config, or a LoRA policy's adapter (PEFT layout), and the
    tokenizer to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_lora(policy.model):
        save_adapter(policy.model, directory)
    else:
        policy.model.save_pretrained(directory, safe_serialization=True)
    policy.tokenizer.save_pretrained(directory)
