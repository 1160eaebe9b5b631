"""An agent's OpenAI messages through the policy's chat format, and generated ids back into a message.

`ChatRendering` wraps the policy's renderer (rl_core/model/renderers.py: `TextRenderer`,
`HFTemplateRenderer`, `HarmonyRenderer`) for the gateway:

- `open(messages, tools)`: a call whose messages are `[system or developer, user]` opens a renderer
  `Conversation` (the same first prompt ids the in-process rollout engine gives that system prompt,
  tools and task), so later calls extend it token-exactly. Any other shape is rendered whole.
- `answer(new, tool_names)`: the messages an agent adds after the policy's turn (its tool results, or one
  user message) as the `StepResult` the conversation's `extend` renders: the tool messages become
  `ToolResult`s (their tool names from the calls the gateway returned; for the text format one tool message
  is the observation, with its call's tool name), a user message the observation.
  None when the new messages are another shape (then the call is rendered whole).
- `whole(messages, tools)`: the ids of a whole conversation with the opening of the next assistant turn
  (the chat template's `apply_chat_template(..., add_generation_prompt=True)`, the harmony library's
  rendering for completion, or the text format's role markers).
- `reply(generated, conversation)`: the policy's turn as an `AssistantTurn` (content, reasoning, tool calls):
  the renderer's tool-call parser for a native format; for the text format the text is the content and a
  well-formed `CALL tool {...}` is also given as a tool call.
"""

from __future__ import annotations

import json
from typing import Any

import openai_harmony as oh

from rl_core.environments.actions import ToolCall, format_call, parse_action
from rl_core.environments.base import StepResult
from rl_core.environments.messages import AssistantTurn, ToolResult
from rl_core.gateway.protocol import GatewayError, Message
from rl_core.model.gpt_oss import VOCAB_SIZE
from rl_core.model.harmony_renderer import HarmonyRenderer
from rl_core.model.renderers import Conversation, Renderer, TextRenderer
from rl_core.model.template_renderer import HFTemplateRenderer, tools_system_text

SYSTEM_ROLES = ("system", "developer")


class ChatRendering:
    """The gateway's use of one policy renderer (see the module docstring).

    Raises ValueError for a renderer the gateway does not know (not text, hf_template or harmony)."""

    def __init__(self, renderer: Renderer):
        if not isinstance(renderer, (TextRenderer, HFTemplateRenderer, HarmonyRenderer)):
            raise ValueError(f"the rollout gateway cannot render chat format {getattr(renderer, 'name', renderer)!r}")
        self.renderer = renderer
        # a conversation used only to parse turns rendered whole (parsing needs no history)
        self._parser = renderer.start("", [], "")

    def open(self, messages: list[Message], tools: list[dict[str, Any]]) -> Conversation | None:
        """A renderer conversation for a first call of the form [system or developer, user]; None for any
        other shape (rendered whole)."""
        if len(messages) != 2 or messages[0].role not in SYSTEM_ROLES or messages[1].role != "user":
            return None
        return self.renderer.start(messages[0].text(), tools, messages[1].text())

    def answer(self, new: list[Message], tool_names: dict[str, str]) -> StepResult | None:
        """The messages after the policy's turn as an environment answer, or None when they are not all tool
        messages answering the returned calls, nor a single user message."""
        if len(new) == 1 and new[0].role == "user":
            return StepResult(observation=new[0].text())
        if not new or any(m.role != "tool" or m.tool_call_id not in tool_names for m in new):
            return None
        if isinstance(self.renderer, TextRenderer):  # the text format shows one observation after a turn
            if len(new) != 1:
                return None
            return StepResult(observation=new[0].text(), tool_name=tool_names[new[0].tool_call_id])
        results = [ToolResult(m.tool_call_id, tool_names[m.tool_call_id], m.text(), True) for m in new]
        return StepResult(observation=None, tool_results=results)

    def whole(self, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]:
        """Token ids of the whole conversation and the opening of the next assistant turn.

        Raises GatewayError 400 when the chat format cannot render these messages."""
        try:
            if isinstance(self.renderer, TextRenderer):
                return self._text_ids(messages)
            if isinstance(self.renderer, HFTemplateRenderer):
                return self._template_ids(messages, tools)
            return self._harmony_ids(messages, tools)
        except GatewayError:
            raise
        except Exception as exc:  # the chat template's own refusal (raise_exception), a harmony error
            raise GatewayError(
                400, f"the policy's chat format cannot render these messages: {exc}", param="messages"
            ) from None

    def reply(self, generated: list[int], conversation: Conversation | None) -> AssistantTurn:
        """The policy turn `generated` (ending with a stop id when it stopped) as an AssistantTurn."""
        parsed = (conversation or self._parser).parse(generated)
        if isinstance(parsed, AssistantTurn):
            return parsed
        action = parse_action(parsed)
        calls = (action,) if isinstance(action, ToolCall) else ()
        return AssistantTurn(content=parsed, tool_calls=calls)

    def decode(self, ids: list[int]) -> str:
        """The text of generated ids, without a trailing stop id; special tokens kept."""
        r = self.renderer
        body = ids[:-1] if ids and ids[-1] in r.stop_ids else ids
        if isinstance(r, HarmonyRenderer):
            return r.encoding.decode(body)
        return r.tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @property
    def vocab_size(self) -> int:
        """How many token ids the policy's tokenizer has (valid ids are 0 .. vocab_size - 1)."""
        r = self.renderer
        if isinstance(r, HarmonyRenderer):
            return VOCAB_SIZE
        return len(r.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt (no special tokens added; special-token text is read as those tokens)."""
        r = self.renderer
        if isinstance(r, HarmonyRenderer):
            return list(r.encoding.encode(text, allowed_special="all"))
        return list(r.tokenizer.encode(text, add_special_tokens=False))

    # -- whole renderings -------------------------------------------------------------------------------

    def _text_ids(self, messages: list[Message]) -> list[int]:
        r = self.renderer
        roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
        ids: list[int] = []
        for m in messages:
            text = m.text()
            if m.role == "assistant" and not text and m.tool_calls:  # an agent that kept only the parsed call
                text = "\n".join(format_call(name, args) for name, args in m.calls())
            ids += r.chat.message(r.tokenizer, roles[m.role], text)
        return ids + list(r.chat.prefix["assistant"])

    def _template_ids(self, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]:
        r = self.renderer
        names = _tool_names(messages)
        plain = [_template_message(m, names) for m in messages]
        passed: list[dict[str, Any]] | None = list(tools) if tools else None
        if passed and r.render(plain, passed, True) == r.render(plain, None, True):  # the template ignores tools
            if plain[0]["role"] in SYSTEM_ROLES:
                plain[0] = plain[0] | {"content": tools_system_text(plain[0]["content"], passed, r.call_instructions)}
            else:
                plain.insert(0, {"role": "system", "content": tools_system_text("", passed, r.call_instructions)})
            passed = None
        return r.encode(r.render(plain, passed, True))

    def _harmony_ids(self, messages: list[Message], tools: list[dict[str, Any]]) -> list[int]:
        r = self.renderer
        names = _tool_names(messages)
        system = "\n\n".join(m.text() for m in messages if m.role in SYSTEM_ROLES)
        out = list(r.head(system, tools))
        assistant, tool = oh.Role.ASSISTANT, oh.Role.TOOL
        for m in messages:
            if m.role == "user":
                out.append(oh.Message.from_role_and_content(oh.Role.USER, m.text()))
            elif m.role == "assistant":
                if m.text() or not m.tool_calls:
                    channel = "commentary" if m.tool_calls else "final"
                    out.append(oh.Message.from_role_and_content(assistant, m.text()).with_channel(channel))
                for name, args in m.calls():
                    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                    out.append(
                        oh.Message.from_role_and_content(assistant, text)
                        .with_channel("commentary")
                        .with_recipient(f"functions.{name}")
                        .with_content_type("<|constrain|>json")
                    )
            elif m.role == "tool":
                name = names.get(m.tool_call_id or "", m.name or "tool")
                author = oh.Author.new(tool, f"functions.{name}")
                out.append(
                    oh.Message.from_author_and_content(author, m.text())
                    .with_channel("commentary")
                    .with_recipient("assistant")
                )
        return list(
            r.encoding.render_conversation_for_completion(oh.Conversation.from_messages(out), oh.Role.ASSISTANT)
        )


def _tool_names(messages: list[Message]) -> dict[str, str]:
    """Tool call id -> tool name, from the assistant messages' tool calls."""
    return {c.id: c.function.name for m in messages for c in (m.tool_calls or []) if c.id}


def _template_message(m: Message, names: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.role == "assistant" and m.tool_calls:
        out["tool_calls"] = [
            {"type": "function", "function": {"name": name, "arguments": args}} | ({"id": call.id} if call.id else {})
            for call, (name, args) in zip(m.tool_calls, m.calls())
        ]
    if m.role == "tool":
        out["name"] = names.get(m.tool_call_id or "", m.name or "tool")
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
    return out
