"""Attention over packed rows computed episode by episode: no query-key pair across episodes, no padding.

A packed micro-batch (token_batch.py, `trainer.packing`) lays its episodes end to end in one row
whose position ids restart at 0 for each episode. Hugging Face's sdpa and eager attention keep
attention within episodes by masking: they build a block-diagonal [L, L] mask and still compute
every query-key pair of the row, so their cost grows with the square of the whole row (measured:
15.8x the within-episode pairs for 16 quickstart episodes), which makes packing slower than
padding. flash-attention's varlen kernel computes only the blocks on the diagonal; this module
does the same on any device with torch's scaled_dot_product_attention, one causal call per
episode (Dao 2023, "FlashAttention-2", varlen/cu_seqlens layout): `use_packed_attention(model)`
registers an attention implementation that splits a packed row at its position-id restarts and
delegates everything else (padded batches, generation with a cache, features sdpa lacks) to the
model's own implementation, with the mask that implementation builds.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "turnstile_packed|"  # + the model's own implementation, to which every other call goes
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")  # what per-episode sdpa cannot compute


def episode_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]] | None:
    """[start, end) of each episode of one packed row (position_ids [1, L], restarting at 0 per episode), or None
    when the row holds one sequence (no restart after position 0) or the batch has several rows."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, [*starts[1:], position_ids.shape[1]]))


def _packed_forward(original: str):
    fallback = ALL_ATTENTION_FUNCTIONS.get(original)

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """query [1, heads, L, head_dim], key/value [1, kv_heads, L, head_dim] -> ([1, L, heads, head_dim], None)."""
        position_ids = kwargs.get("position_ids")
        bounds = None
        if (
            position_ids is not None
            and query.shape[2] == key.shape[2] == position_ids.shape[-1]  # no cache: the whole row attends to itself
            and kwargs.get("sliding_window") is None
            and not any(kwargs.get(name) is not None for name in _UNSUPPORTED)
        ):
            bounds = episode_bounds(position_ids)
        if bounds is None:
            if fallback is None:
                from transformers.models.llama.modeling_llama import eager_attention_forward

                return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
            return fallback(module, query, key, value, attention_mask, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
        outputs = [
            sdpa_attention_forward(
                module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, is_causal=True, **rest
            )[0]
            for s, e in bounds
        ]
        return torch.cat(outputs, dim=1), None

    return attention


def use_packed_attention(model: torch.nn.Module) -> str:
    """Make `model` (a Hugging Face causal LM, or a PEFT model around one) compute a packed row's attention episode
    by episode; returns the implementation now set. flash-attention implementations already do (varlen) and are
    left as they are. Idempotent. The model's outputs are unchanged for every input (padded batches, generation
    with a cache and the rest go to its own implementation)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = base.config._attn_implementation or "eager"
    if current.startswith(PREFIX) or current.startswith("flash_attention"):
        return current
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _packed_forward(current))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    base.set_attn_implementation(name)
    return name
