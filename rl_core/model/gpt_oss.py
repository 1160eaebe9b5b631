"""The GPT-OSS family's vocabulary and a tiny model: the harmony encoding, a Hugging Face tokenizer of it, and a
tiny random-init GPT-OSS for tests.

`harmony_encoding()` is the `openai_harmony` library's o200k_harmony encoding (`oss-harmony` 0.0.11, which
embeds its vocabulary and works offline; docs/real-models.md section 3). The policy and the trajectory
records decode with a Hugging Face tokenizer, so `harmony_tokenizer()` builds one from the library's embedded
vocabulary with transformers' `TikTokenConverter` (o200k_base's pre-tokenizer regex) and the library's
special tokens. `build_tiny_gpt_oss` is a tiny random-init `GptOssForCausalLM` sized to it. The renderer of
harmony conversations is rl_core/model/harmony_renderer.py.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import openai_harmony as oh
import torch
from tokenizers import Tokenizer
from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rl_core.model.fetch import model_cache_dir

# o200k_harmony's special tokens (docs/real-models.md section 3; OpenAI's tiktoken `o200k_harmony`).
CALL, RETURN, END, START, CHANNEL, MESSAGE, CONSTRAIN = 200012, 200002, 200007, 200006, 200005, 200008, 200003
ENDOFTEXT, STARTOFTEXT = 199999, 199998
SPECIAL_IDS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
}
SPECIAL_IDS |= {"<|channel|>": CHANNEL, "<|start|>": START, "<|end|>": END, "<|message|>": MESSAGE, "<|call|>": CALL}
SPECIAL_IDS |= {"<|reserved_200013|>": 200013, "<|reserved_201087|>": 201087}
N_ORDINARY = 199998  # ids 0..199997 are byte-pair tokens; the specials start at <|startoftext|>
VOCAB_SIZE = 201088  # GPT-OSS's vocabulary (tiktoken's o200k_harmony ends with <|reserved_201087|>)
# o200k_base's pre-tokenizer regex (tiktoken_ext/openai_public.py, o200k_base; o200k_harmony reuses it).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


@functools.cache
def harmony_encoding() -> oh.HarmonyEncoding:
    """The library's GPT-OSS encoding (o200k_harmony), loaded once (~0.2 s, no network with oss-harmony)."""
    return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


def _cache_file() -> Path:
    from importlib.metadata import version

    return model_cache_dir() / f"harmony-tokenizer-oss-harmony-{version('oss-harmony')}" / "tokenizer.json"


def _convert() -> Tokenizer:
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    enc = harmony_encoding()
    # The byte string of every ordinary id, from the library's own decoder (as docs/real-models.md dumped the
    # vocabulary: it is the official o200k_base file); handed to transformers' tiktoken converter directly.
    ranks = {bytes(enc._inner.decode_bytes([i])): i for i in range(N_ORDINARY)}

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: Any) -> dict[bytes, int]:
            return tiktoken_url

    backend = _Converter(vocab_file=ranks, pattern=O200K_PATTERN).converted()
    specials = sorted((enc.encode(s, allowed_special="all")[0], s) for s in enc.special_tokens_set)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for i, s in specials if i < VOCAB_SIZE])
    return backend


@functools.cache
def _harmony_tokenizer() -> PreTrainedTokenizerFast:
    path = _cache_file()
    backend = Tokenizer.from_file(str(path)) if path.is_file() else None
    if backend is None or any(backend.token_to_id(s) != i for s, i in SPECIAL_IDS.items()):
        backend = _convert()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        backend.save(str(partial))
        os.replace(partial, path)
    for s, i in SPECIAL_IDS.items():
        if backend.token_to_id(s) != i:
            raise RuntimeError(f"harmony tokenizer: special token {s} got id {backend.token_to_id(s)}, not {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>"
    )


def harmony_tokenizer() -> PreTrainedTokenizerFast:
    """A Hugging Face tokenizer of GPT-OSS's o200k_harmony vocabulary, built from the library's embedded
    vocabulary with transformers' `TikTokenConverter` (o200k_base's regex) plus the library's special tokens
    with ids 199998..201087 (`len` 201088; the fork's extra `<|reserved_201088|>` lies outside GPT-OSS's
    vocabulary and is left out). `encode(text, add_special_tokens=False)` equals the library's
    `encode(text, allowed_special="all")`. Building takes ~2.2 s (1 thread); the tokenizer.json is cached
    under $TURNSTILE_MODEL_CACHE or ~/.cache/turnstile (reloading ~1.2 s). One shared object per process:
    copy it before changing it. Raises RuntimeError if a special token lands on the wrong id."""
    return _harmony_tokenizer()


def build_tiny_gpt_oss(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_experts: int = 4,
    max_positions: int = 4096,
    seed: int = 0,
) -> GptOssForCausalLM:
    """A tiny random-init GPT-OSS (mixture-of-experts, sliding + full attention) for tests, sized to
    `tokenizer` (harmony's: 201,088 ids). Defaults: 13.0 M parameters (12.9 M of them the tied embedding),
    float32; 1 thread: forward of 1x256 tokens ~0.18 s, forward+backward ~0.74 s."""
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_local_experts=num_experts,
        num_experts_per_tok=2,
        sliding_window=128,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GptOssForCausalLM(config)
