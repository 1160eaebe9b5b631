"""Tokenizers and chat formats.

`build_tokenizer(corpus)` trains a small byte-level BPE tokenizer on the domains' own text
(no hub download) with digits split one per token, so ids never seen in training are still
spelled from known tokens. It comes back as a `PreTrainedTokenizerFast` and saves/loads
like any Hugging Face tokenizer.

`ChatFormat` says which token ids open and close each turn. The rollout engine builds
episodes segment by segment from these ids (token-in, token-out: earlier turns are never
re-tokenized), and the reference-checkpoint script renders demonstrations the same way.

`repair_unicode(text)` makes text that is not valid Unicode (lone UTF-16 surrogates, which a
Python `str` can hold but UTF-8, the tokenizer and Parquet cannot) valid before it is
tokenized or stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import get_args

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from rl_core.config.choices import ChatFormatName

ROLES = ("system", "user", "assistant", "tool")
TURNSTILE_SPECIAL_TOKENS = ["<|pad|>", "<|end|>"] + [f"<|{role}|>" for role in ROLES]


def repair_unicode(text: str) -> tuple[str, int]:
    """`text` as valid Unicode, and how many invalid code points (surrogates) it held.

    A Python `str` may hold surrogate code points (U+D800-U+DFFF), e.g. from the JSON escape
    `"\\ud83d"` (half an emoji); they have no UTF-8 encoding, so a tokenizer or a Parquet
    writer rejects the string. A high surrogate directly followed by a low one is joined into
    the code point the pair stands for (as UTF-16 does); every other surrogate is replaced by
    U+FFFD REPLACEMENT CHARACTER (the Unicode standard's substitute for an ill-formed
    sequence). Valid text comes back unchanged with count 0. Raises TypeError if `text` is not
    a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        pass
    invalid = sum(1 for char in text if "\ud800" <= char <= "\udfff")
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace"), invalid


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Turnstile's role tokens on `corpus`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TURNSTILE_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        additional_special_tokens=[f"<|{role}|>" for role in ROLES],
    )


@dataclass(frozen=True)
class ChatFormat:
    """Token ids around turns: `prefix[role]` opens a turn, `end` closes it.

    The policy's turn is opened by the environment side (its prefix is part of the
    context) and closed by the policy itself emitting `end` (a stop token).
    """

    prefix: dict[str, list[int]]
    end: list[int]
    pad_id: int

    @property
    def stop_id(self) -> int:
        """The single token that ends a policy turn."""
        return self.end[-1]

    def encode(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added."""
        return list(tokenizer.encode(text, add_special_tokens=False))

    def message(self, tokenizer: PreTrainedTokenizerBase, role: str, text: str) -> list[int]:
        """A whole closed turn: prefix, text, end."""
        return self.prefix[role] + self.encode(tokenizer, text) + self.end

    def prompt(self, tokenizer: PreTrainedTokenizerBase, system: str, user: str) -> list[int]:
        """System and user turns, then the opening of the first policy turn."""
        return (
            self.message(tokenizer, "system", system) + self.message(tokenizer, "user", user) + self.prefix["assistant"]
        )

    def observation(self, tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
        """An environment turn, then the opening of the next policy turn."""
        return self.message(tokenizer, "tool", text) + self.prefix["assistant"]


def chat_format(name: ChatFormatName, tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """The ChatFormat called `name` (one of `ChatFormatName`: `turnstile` or `chatml`) with this tokenizer's ids.

    Raises ValueError for an unknown name, or when the tokenizer lacks one of the format's special tokens.
    """

    def single(token: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"chat format {name!r} needs token {token!r}, which the tokenizer lacks")
        return int(token_id)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if name == "turnstile":
        return ChatFormat({role: [single(f"<|{role}|>")] for role in ROLES}, [single("<|end|>")], int(pad))
    if name == "chatml":
        start = single("<|im_start|>")
        prefixes = {role: [start] + list(tokenizer.encode(f"{role}\n", add_special_tokens=False)) for role in ROLES}
        return ChatFormat(prefixes, [single("<|im_end|>")], int(pad))
    expected = " or ".join(repr(known) for known in get_args(ChatFormatName))
    raise ValueError(f"unknown chat format {name!r}; expected {expected}")
