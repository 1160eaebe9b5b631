"""The Gemma 3 family: its turn format as a chat template, and a tiny random-init Gemma 3 model.

Gemma 3 270M is on the package index only as the *base* model (GGUF, no chat template), so the
turn format comes from us: `GEMMA_CHAT_TEMPLATE` is our own Jinja text (not Google's template)
rendering the format Google publishes, with tools and tool calls in Google's documented
prompt-defined function-calling convention (the `gemma` tool-call parser,
rl_core/model/tool_parsers.py `parse_gemma` / `format_gemma`).

What it renders (`tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=...)`):
- `bos_token` (Gemma: `<bos>`, id 2), then one turn per message: `<start_of_turn>user\\n{text}<end_of_turn>\\n`
  and, for role `assistant`, `<start_of_turn>model\\n{text}<end_of_turn>\\n`; the generation prompt is
  `<start_of_turn>model\\n`. Text is rendered verbatim (not stripped), so a sampled turn re-renders as
  it was sampled and the template extends tool-call episodes (see HFTemplateRenderer).
- No system role: a leading `system` message's text, then (when `tools` are given) the tool
  definitions and `GEMMA_CALL_INSTRUCTIONS` (the constant itself, built into the template, so the
  two never drift), go at the start of the first user turn, each part separated by a blank line:
  `{system}\\n\\n{GEMMA_TOOLS_INTRO}\\n{tool JSON, one per line}\\n\\n{GEMMA_CALL_INSTRUCTIONS}\\n\\n{user}`.
  A tool is rendered as the JSON of its `function` object (OpenAI function format) or of itself.
- An assistant message with `tool_calls` is rendered as `format_gemma` writes it: the content, a
  newline, then ```tool_code\\n[name(arg="value", ...), ...]\\n``` (strings as JSON strings, True /
  False / None, lists, dicts with string keys). Arguments must be a mapping.
- Consecutive `tool` messages are rendered in ONE user turn, each as a ```tool_output\\n{content}\\n```
  block, blocks separated by a newline.
- Errors (`raise_exception`, a jinja TemplateError from transformers): a `system` message that is not
  the first message, a role other than system/user/assistant/tool, the system text or tools followed
  by a first message that is not a user message, tool-call arguments that are not a mapping.

Sources (facts taken, not text):
- Turn format and no system role: https://ai.google.dev/gemma/docs/core/prompt-structure
  ("Gemma formatting and system instructions": `<start_of_turn>` / `<end_of_turn>`, roles `user` and
  `model`, `<end_of_turn>\\n` as the turn separator, system instructions in the first user prompt).
- Function calling: https://ai.google.dev/gemma/docs/capabilities/function-calling (no tool
  token; tool definitions as JSON in the prompt; calls as a Python-style list
  `[func_name(param=value, ...)]`) and https://ai.google.dev/gemma/docs/meme-generator (calls
  wrapped in ```tool_code```, results given back wrapped in ```tool_output```).
- Token ids (the real tokenizer, docs/real-models.md section 4): `<pad>` 0, `<eos>` 1, `<bos>` 2,
  `<start_of_turn>` 105, `<end_of_turn>` 106, vocabulary 262,144.
"""

from __future__ import annotations

import json

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerBase

from rl_core.model.template_renderer import GEMMA_CALL_INSTRUCTIONS

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
GEMMA_STOP_TOKEN = END_OF_TURN  # a policy turn ends at <end_of_turn> (id 106 in Gemma 3's vocabulary)
# The line that introduces the tool definitions in the first user turn.
GEMMA_TOOLS_INTRO = "You have access to the following functions, given as JSON schemas:"

_TEMPLATE = r"""{#- Gemma 3 turn format with tools (rl_core/model/gemma.py); our own text. -#}
{%- set call_instructions = @CALL_INSTRUCTIONS@ -%}
{%- set tools_intro = @TOOLS_INTRO@ -%}
{%- macro text(content) -%}
    {%- if content is none -%}
    {%- elif content is string -%}{{- content -}}
    {%- else -%}{%- for part in content -%}{%- if part.type == "text" -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro py(value) -%}
    {%- if value is none -%}{{- "None" -}}
    {%- elif value is boolean -%}{{- "True" if value else "False" -}}
    {%- elif value is string -%}{{- value | tojson -}}
    {%- elif value is number -%}{{- value -}}
    {%- elif value is mapping -%}
        {{- "{" -}}
        {%- for key, item in value.items() -%}
            {{- (key | string) | tojson -}}{{- ": " -}}{{- py(item) -}}{%- if not loop.last -%}{{- ", " -}}{%- endif -%}
        {%- endfor -%}
        {{- "}" -}}
    {%- elif value is iterable -%}
        {{- "[" -}}
        {%- for item in value -%}{{- py(item) -}}{%- if not loop.last -%}{{- ", " -}}{%- endif -%}{%- endfor -%}
        {{- "]" -}}
    {%- else -%}{{- raise_exception("gemma template: a tool-call argument is not JSON-like") -}}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(prefix="", start=0, tools="") -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set ns.prefix = text(messages[0].content) -%}
    {%- set ns.start = 1 -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.tools = tools_intro -%}
    {%- for tool in tools -%}
        {%- set ns.tools = ns.tools ~ "\n" ~ ((tool.function if tool.function is defined else tool) | tojson) -%}
    {%- endfor -%}
    {%- set ns.tools = ns.tools ~ "\n\n" ~ call_instructions -%}
    {%- set ns.prefix = (ns.prefix ~ "\n\n" ~ ns.tools) if ns.prefix else ns.tools -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in messages[ns.start:] -%}
    {%- set role = message.role -%}
    {%- if role == "user" -%}
        {{- "<start_of_turn>user\n" -}}
        {%- if loop.first and ns.prefix -%}{{- ns.prefix ~ "\n\n" -}}{%- endif -%}
        {{- text(message.content) -}}{{- "<end_of_turn>\n" -}}
    {%- elif loop.first and ns.prefix -%}
        {{- raise_exception("gemma template: the system text and tools need a user message to follow them") -}}
    {%- elif role == "assistant" -%}
        {{- "<start_of_turn>model\n" -}}
        {%- if message.tool_calls -%}
            {%- if message.content -%}{{- text(message.content) ~ "\n" -}}{%- endif -%}
            {{- "```tool_code\n[" -}}
            {%- for call in message.tool_calls -%}
                {%- set call = call.function if call.function is defined else call -%}
                {%- if call.arguments is defined and call.arguments is not mapping -%}
                    {{- raise_exception("gemma template: tool-call arguments must be a mapping, not a JSON string") -}}
                {%- endif -%}
                {{- call.name ~ "(" -}}
                {%- for key, value in (call.arguments or {}).items() -%}
                    {{- key ~ "=" -}}{{- py(value) -}}{%- if not loop.last -%}{{- ", " -}}{%- endif -%}
                {%- endfor -%}
                {{- ")" -}}{%- if not loop.last -%}{{- ", " -}}{%- endif -%}
            {%- endfor -%}
            {{- "]\n```" -}}
        {%- else -%}
            {{- text(message.content) -}}
        {%- endif -%}
        {{- "<end_of_turn>\n" -}}
    {%- elif role == "tool" -%}
        {%- if loop.first or loop.previtem.role != "tool" -%}{{- "<start_of_turn>user\n" -}}
        {%- else -%}{{- "\n" -}}{%- endif -%}
        {%- if message.content is string or message.content is none -%}{%- set output = text(message.content) -%}
        {%- else -%}{%- set output = message.content | tojson -%}{%- endif -%}
        {{- "```tool_output\n" ~ output ~ "\n```" -}}
        {%- if loop.last or loop.nextitem.role != "tool" -%}{{- "<end_of_turn>\n" -}}{%- endif -%}
    {%- elif role == "system" -%}
        {{- raise_exception("gemma template: Gemma has no system role; only the first message may be system") -}}
    {%- else -%}
        {{- raise_exception("gemma template: unknown role " ~ role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<start_of_turn>model\n" -}}{%- endif -%}"""

# Jinja string literals read backslash escapes, so a JSON string (ASCII, escaped) is one.
GEMMA_CHAT_TEMPLATE = _TEMPLATE.replace("@CALL_INSTRUCTIONS@", json.dumps(GEMMA_CALL_INSTRUCTIONS)).replace(
    "@TOOLS_INTRO@", json.dumps(GEMMA_TOOLS_INTRO)
)


def gemma_tools_text(tools: list[dict], system: str = "") -> str:
    """The text the template puts at the start of the first user turn (before "\\n\\n" and the
    user's text) for `system` and `tools`: the Python mirror of the template, for tests and docs."""
    parts = [system] if system else []
    if tools:
        lines = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
        parts.append(f"{GEMMA_TOOLS_INTRO}\n{lines}\n\n{GEMMA_CALL_INSTRUCTIONS}")
    return "\n\n".join(parts)


def build_tiny_gemma3(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 1,
    head_dim: int = 16,
    intermediate_size: int = 128,
    max_positions: int = 4096,
    seed: int = 0,
) -> Gemma3ForCausalLM:
    """A tiny random-init Gemma 3 causal LM (text only, `Gemma3TextConfig`: Gemma 3's architecture,
    alternating sliding-window (512) and global attention layers, embeddings scaled by sqrt(hidden),
    tied lm_head)
    sized to `tokenizer` (len(tokenizer) rows: 262,144 for Gemma 3's vocabulary, so the embedding is
    almost all of the 16,847,488 parameters at the defaults; a forward pass over 1x256 tokens takes
    0.26-0.35 s on one CPU thread), initialised from `seed`, float32.
    Special ids come from the tokenizer (Gemma: pad 0, eos 1, bos 2). Raises ValueError when
    `hidden_size` is not positive or the tokenizer has no pad token."""
    if hidden_size <= 0:
        raise ValueError(f"hidden_size must be positive, got {hidden_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("build_tiny_gemma3: the tokenizer has no pad token (Gemma's is <pad>, id 0)")
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        sliding_window=512,
        # Gemma 3 has 5 sliding-window layers per global one; a tiny model keeps one of each kind
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        query_pre_attn_scalar=head_dim,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(config)
