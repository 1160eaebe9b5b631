"""`hf_template`: a tokenizer's own Jinja chat template, with native tool calls, token-exact.

`HFTemplateRenderer` renders an episode with `tokenizer.apply_chat_template(messages, tools=...)`
and parses each policy turn with a tool-call parser (e.g. Hermes `<tool_call>{...}</tool_call>`,
rl_core/model/tool_parsers.py). The episode's token ids are always the first prompt's ids, the ids
the policy SAMPLED (never a re-tokenization of them) and the extensions this renderer returns.

The extension after a policy turn is computed from renderings of the whole conversation:
1. The conversation keeps the message history. The policy turn becomes an assistant message, first
   as its raw decoded text (`{"role": "assistant", "content": text}`, which a template renders
   verbatim), then, when the turn has tool calls and the raw form does not fit, as the structured
   form (`"tool_calls": [{"type": "function", "function": {"name", "arguments"}}]`); the
   environment's answer becomes one `{"role": "tool", "content", "tool_call_id", "name"}` message
   per `ToolResult`, or one `user` message holding the observation when there are no tool results.
2. The whole conversation is rendered with the generation prompt and tokenized. If those ids start
   with the episode's ids so far (prompt, earlier extensions, the sampled ids ending with the stop
   token), the extension is the rest: it begins with whatever the template puts after the
   assistant's end-of-turn marker (e.g. ChatML's "\n" after `<|im_end|>`), then the tool messages,
   then the opening of the next assistant turn. The episode then equals the template's rendering.
3. Fallback (the template is non-extending): when the re-render does not start with the episode's
   ids (the template rewrites earlier turns, e.g. Qwen3 dropping past reasoning once a new user
   message follows; it renders the assistant message differently from the sampled text; or the
   re-tokenized text differs from the sampled ids, e.g. a non-canonical BPE sample), the sampled
   tokens are kept and only the new messages are rendered, as a string suffix: the rendering of
   [..., assistant, tool messages] (with the generation prompt) from just after the assistant's
   end-of-turn marker (the stop token's text: its k-th occurrence, k = its count in the rendering
   of [..., assistant]), tokenized on its own. The reason is appended to `conversation.rewrites`
   (one entry per turn that used the fallback), so the rollout can count non-extending turns.

Tools: when the template renders `tools` (its rendering with and without them differs) they are
passed to it. A template that ignores `tools` (e.g. SmolLM2's plain ChatML) gets the documented
fallback: the tool schemas (JSON, one per line inside `<tools></tools>`) and the parser's call
format instructions are appended to the system message text (`conversation.tools_in_system`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from rl_core.environments.base import StepResult
from rl_core.environments.messages import AssistantTurn
from rl_core.model.tool_parsers import tool_formatter
from rl_core.reasoning_mask import marker_spans

# The Hermes / Qwen call format, as Qwen's own templates describe it to the model.
HERMES_CALL_INSTRUCTIONS = (
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

# Google's documented Gemma convention (rl_core/model/tool_parsers.py parse_gemma).
GEMMA_CALL_INSTRUCTIONS = (
    "To call functions, write the calls as Python keyword calls inside a tool_code block:\n"
    '```tool_code\nfunction_name(argument="value")\n```\n'
    "The results come back in a tool_output block."
)
# The call instructions of each tool-call format (`policy.tool_parser`), for the system message when
# the chat template does not render the tools itself.
CALL_INSTRUCTIONS = {"hermes": HERMES_CALL_INSTRUCTIONS, "gemma": GEMMA_CALL_INSTRUCTIONS}

Message = dict[str, Any]


def tools_system_text(system: str, tools: list[dict[str, Any]], call_instructions: str) -> str:
    """The system message text with the tools appended (the fallback for a template that ignores
    `tools`): `system`, a "# Tools" section listing each schema as one JSON line inside
    <tools></tools>, then `call_instructions`."""
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        f"{system}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>\n\n"
        f"{call_instructions}"
    )


def _result_messages(result: StepResult) -> list[Message]:
    """The environment's answer as template messages: one tool message per tool result, else one
    user message holding the observation."""
    if not result.tool_results:
        return [{"role": "user", "content": "" if result.observation is None else result.observation}]
    messages = []
    for r in result.tool_results:
        message: Message = {"role": "tool", "content": r.content, "name": r.tool}
        if r.call_id is not None:
            message["tool_call_id"] = r.call_id
        messages.append(message)
    return messages


def _structured_message(turn: AssistantTurn) -> Message:
    calls = [
        {"type": "function", "function": {"name": c.tool, "arguments": c.arguments}}
        | ({"id": c.call_id} if c.call_id is not None else {})
        for c in turn.tool_calls
    ]
    return {"role": "assistant", "content": turn.content, "tool_calls": calls}


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class TemplateConversation:
    """One episode rendered through a chat template (see the module docstring).

    prompt_ids: the first prompt's ids. system_length: how many of them are the system turn (0 when
    the rendering of the system message alone is not a prefix of the prompt). messages: the message
    history as given to the template. ids: the episode's ids so far (prompt, sampled ids,
    extensions). rewrites: one reason per turn whose extension used the non-extending fallback.
    tools_in_system: the tools were put into the system message text (the template ignores `tools`).
    """

    renderer: HFTemplateRenderer
    tools: list[dict[str, Any]] | None
    messages: list[Message]
    prompt_ids: list[int]
    system_length: int = 0
    tools_in_system: bool = False
    ids: list[int] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    _parsed: tuple[tuple[int, ...], str, AssistantTurn] | None = None

    def _turn(self, generated: list[int]) -> tuple[str, AssistantTurn]:
        key = tuple(generated)
        if self._parsed is None or self._parsed[0] != key:
            text = self.renderer.decode(generated)
            self._parsed = (key, text, self.renderer.parser(text))
        return self._parsed[1], self._parsed[2]

    def parse(self, generated: list[int]) -> AssistantTurn:
        """The policy turn `generated` (ids, ending with the stop token when it stopped), decoded
        without the stop token, as the parser reads it. Never raises for malformed tool calls (the
        parser gives `parse_error`)."""
        return self._turn(generated)[1]

    def extend(self, generated: list[int], result: StepResult) -> list[int]:
        """The ids that follow the sampled turn `generated`: the template's tool messages for
        `result.tool_results` (or a user message with `result.observation`) and the opening of the
        next assistant turn. Exact extension when the template extends the episode; else the
        suffix fallback, with the reason appended to `rewrites`. Never changes earlier ids.

        Raises ValueError when the template cannot render the conversation in either assistant form
        (the template's own error, e.g. `raise_exception`, is quoted)."""
        r = self.renderer
        text, turn = self._turn(generated)
        sampled = self.ids + list(generated)
        new = _result_messages(result)
        raw: Message = {"role": "assistant", "content": text}
        candidates = [raw] + ([_structured_message(turn)] if turn.tool_calls else [])
        renderable: list[Message] = []
        error: Exception | None = None
        for message in candidates:
            try:
                full = r.encode(r.render(self.messages + [message] + new, self.tools, True))
            except Exception as exc:  # e.g. a template that refuses tool results after a turn without tool_calls
                error = exc
                continue
            renderable.append(message)
            if full[: len(sampled)] == sampled:
                self.messages += [message, *new]
                self.ids = full
                return full[len(sampled) :]
        if not renderable:
            raise ValueError(f"hf_template renderer: the chat template cannot render the conversation: {error}")
        assistant = renderable[0]
        self.rewrites.append(self._diagnose(assistant, new))
        extension = r.encode(self._suffix(assistant, new))
        self.messages += [assistant, *new]
        self.ids = sampled + extension
        return extension

    def _suffix(self, assistant: Message, new: list[Message]) -> str:
        r = self.renderer
        upto = r.render(self.messages + [assistant], self.tools, False)
        full = r.render(self.messages + [assistant] + new, self.tools, True)
        k = upto.count(r.stop_token)
        cut, start = -1, 0
        for _ in range(k):
            cut = full.find(r.stop_token, start)
            if cut < 0:
                break
            start = cut + len(r.stop_token)
        if k and cut >= 0:
            return full[start:]
        return full[_common_prefix(upto, full) :]

    def _diagnose(self, assistant: Message, new: list[Message]) -> str:
        r = self.renderer
        history = r.render(self.messages, self.tools, True)
        upto = r.render(self.messages + [assistant], self.tools, False)
        full = r.render(self.messages + [assistant] + new, self.tools, True)
        if not upto.startswith(history):
            return "template rewrites earlier turns when the assistant turn is added"
        if not full.startswith(upto):
            return "template rewrites earlier turns when the next messages follow (e.g. drops past reasoning)"
        if assistant.get("tool_calls") or not upto.startswith(history + assistant["content"]):
            return "template renders the assistant turn differently from the sampled text"
        if r.encode(history) != self.ids:
            return "episode ids differ from the template's rendering of the history (an earlier fallback)"
        return "re-tokenized assistant text differs from the sampled ids"


# End-of-turn markers of the chat formats Turnstile knows, most specific first (Gemma, ChatML/Qwen/SmolLM2).
END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>")


def default_stop_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The token that ends a policy turn when `policy.stop_token` is not set: the first of
    `END_OF_TURN_TOKENS` in the tokenizer's vocabulary (a chat template ends each turn with it, and a base
    model's eos, e.g. Gemma's `<eos>` or Qwen's `<|endoftext|>`, never ends a turn), else the eos token."""
    vocab = tokenizer.get_vocab()
    return next((token for token in END_OF_TURN_TOKENS if token in vocab), tokenizer.eos_token)


class HFTemplateRenderer:
    """Renders episodes through a Hugging Face tokenizer's own chat template (`hf_template`).

    tokenizer: has a `chat_template`. parser: turns a policy turn's decoded text (without the stop
    token) into an `AssistantTurn` (e.g. `parse_hermes`); must not raise for malformed calls.
    stop_token: the token that ends a policy turn, which must also be the template's end-of-turn
    marker (default: `default_stop_token(tokenizer)`). call_instructions: the call
    format text used when the template ignores `tools` (default: Hermes). template_kwargs: extra
    variables for the template (e.g. `enable_thinking`). reasoning_markers: the text that opens and
    closes a reasoning block in a policy turn (default Qwen's `<think>`, `</think>`), for
    `reasoning_spans`.

    Raises ValueError when the tokenizer has no chat template, when no stop token is given and the
    tokenizer has no eos token, or when the stop token is not in the vocabulary.
    """

    name = "hf_template"
    native_tools = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        parser: Callable[[str], AssistantTurn],
        stop_token: str | None = None,
        *,
        call_instructions: str = HERMES_CALL_INSTRUCTIONS,
        template_kwargs: dict[str, Any] | None = None,
        reasoning_markers: tuple[str, str] = ("<think>", "</think>"),
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("hf_template renderer: the tokenizer has no chat template (tokenizer.chat_template)")
        stop_token = stop_token if stop_token is not None else default_stop_token(tokenizer)
        if not stop_token:
            raise ValueError("hf_template renderer: no stop token given and the tokenizer has no eos token")
        vocab = tokenizer.get_vocab()
        if stop_token not in vocab:
            raise ValueError(f"hf_template renderer: stop token {stop_token!r} is not in the tokenizer's vocabulary")
        self.tokenizer = tokenizer
        self.parser = parser
        self.stop_token = stop_token
        self.stop_id = int(vocab[stop_token])
        self.stop_ids = frozenset({self.stop_id})
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.stop_id
        self.call_instructions = call_instructions
        self.template_kwargs = dict(template_kwargs or {})
        self.reasoning_ids = (self.encode(reasoning_markers[0]), self.encode(reasoning_markers[1]))

    def render(self, messages: list[Message], tools: list[dict[str, Any]] | None, generation_prompt: bool) -> str:
        """The template's text for `messages` (with `tools` when given, and the opening of the next
        assistant turn when `generation_prompt`)."""
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **self.template_kwargs
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text, no special tokens added (as `apply_chat_template(tokenize=True)`)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, generated: list[int]) -> str:
        """The text of a policy turn's ids, without the trailing stop token; special tokens kept."""
        body = generated[:-1] if generated and generated[-1] == self.stop_id else generated
        return self.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def turn_ids(self, turn: AssistantTurn) -> list[int]:
        """The ids a policy samples to write `turn` (its text in the parser's format, then the stop token),
        e.g. for demonstrations (rl_core/model/demonstrations.py). Raises ValueError for a parser whose
        format Turnstile cannot write."""
        write = tool_formatter(self.parser)
        if write is None:
            raise ValueError("hf_template renderer: no writer for this tool-call parser's format")
        return [*self.encode(write(turn)), self.stop_id]

    def reasoning_spans(self, generated: list[int]) -> list[tuple[int, int]]:
        """The reasoning block of a policy turn's ids, as the tool-call parser reads the turn: when the parser
        finds reasoning (a leading `<think>` block), the first block delimited by `reasoning_markers`
        (matched as their token ids; rl_core/reasoning_mask.py marker_spans), markers included, as
        [start, end) positions; else none (a `<think>` later in the turn is content, and stays in the loss)."""
        if self._turn_of(generated).reasoning is None:
            return []
        return marker_spans(generated, *self.reasoning_ids)[:1]

    def _turn_of(self, generated: list[int]) -> AssistantTurn:
        return self.parser(self.decode(generated))

    def ignores_tools(self, system: str, tools: list[dict[str, Any]], user: str) -> bool:
        """Whether the template renders [system, user] the same with and without `tools`."""
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return self.render(messages, tools, True) == self.render(messages, None, True)

    def start(self, system: str, tools: list[dict[str, Any]], user: str) -> TemplateConversation:
        """Open one episode: prompt ids = the template's rendering of [system, user] with `tools` and
        the generation prompt (tools go into the system text when the template ignores them)."""
        passed: list[dict[str, Any]] | None = list(tools) if tools else None
        in_system = bool(passed) and self.ignores_tools(system, passed, user)
        if in_system:
            system, passed = tools_system_text(system, list(tools), self.call_instructions), None
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        prompt = self.encode(self.render(messages, passed, True))
        system_length = 0
        try:
            head = self.encode(self.render(messages[:1], passed, False))
            system_length = len(head) if head and prompt[: len(head)] == head else 0
        except Exception:  # a template that refuses a lone system message: no system span
            system_length = 0
        return TemplateConversation(self, passed, messages, prompt, system_length, in_system, list(prompt))
