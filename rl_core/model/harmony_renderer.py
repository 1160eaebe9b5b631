"""`harmony`: GPT-OSS's harmony chat format, rendered and parsed by the `openai_harmony` library, token-exact.

Format source: OpenAI's harmony response format (https://cookbook.openai.com/articles/openai-harmony and the
`openai-harmony` library); here the `oss-harmony` 0.0.11 fork, which embeds the o200k_harmony vocabulary and
works offline (docs/real-models.md section 3). A conversation is messages `<|start|>{author}<|channel|>{channel}
[ to={recipient}][ <|constrain|>json]<|message|>{text}<|end|>`; the assistant thinks in channel `analysis`,
answers in `final` (the turn ends with `<|return|>`) and calls a function in `commentary` with recipient
`functions.NAME` and JSON arguments (the turn ends with `<|call|>`); a tool answers as author `functions.NAME`
on `commentary`, to the assistant.

`HarmonyRenderer` renders an episode's first prompt with the library (a fixed system message, a developer
message with the environment's system text as instructions and its OpenAI function schemas as function
tools, the user task, `<|start|>assistant`). The episode's ids are that prompt, the ids the policy SAMPLED
and, after each policy turn, the library's rendering of only the new messages (tool results, or a user
message with the observation) followed by `<|start|>assistant`: earlier ids are never re-rendered.
Re-rendering the whole conversation is prefix-preserving after a tool-call turn (ending in `<|call|>`), and
each extension is checked against it; where it is not (after a `<|return|>` final turn the library renders
`<|end|>` and drops earlier analysis; a turn the library cannot parse), the reason goes to
`conversation.rewrites` (the episode keeps the sampled ids).

The encoding, a Hugging Face tokenizer of its vocabulary (`harmony_tokenizer`) and a tiny random-init GPT-OSS
(`build_tiny_gpt_oss`) are in rl_core/model/gpt_oss.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import openai_harmony as oh
from transformers import PreTrainedTokenizerBase

from rl_core.environments.actions import ToolCall
from rl_core.environments.base import StepResult
from rl_core.environments.messages import AssistantTurn
from rl_core.model.call_syntax import strict_json
from rl_core.model.gpt_oss import (
    CALL,
    CHANNEL,
    END,
    ENDOFTEXT,
    MESSAGE,
    N_ORDINARY,
    RETURN,
    START,
    harmony_encoding,
)

ReasoningEffortName = Literal["low", "medium", "high"]


def _text(message: oh.Message) -> str:
    return "".join(getattr(c, "text", "") for c in message.content)


def turn_from_messages(messages: list[oh.Message], stop: int | None) -> AssistantTurn:
    """The policy turn that the parsed harmony `messages` are, which ended with token `stop` (None: no stop
    token). Channel `analysis` -> reasoning, `final` (and `commentary` without recipient, a preamble) ->
    content, recipient `functions.NAME` -> a tool call whose text is its JSON arguments object. Anything
    else gives `parse_error` with a short reason for the model (and no tool calls); never raises."""
    reasoning, content, calls, errors = [], [], [], []
    for message in messages:
        if message.author.role != oh.Role.ASSISTANT:
            errors.append(f"the turn wrote a {message.author.role.value} message; write only assistant messages")
            continue
        text, recipient = _text(message), message.recipient
        if recipient is not None:
            name = recipient.removeprefix("functions.")
            if not recipient.startswith("functions.") or not name or any(c in name for c in " .<>|"):
                errors.append(f"unknown recipient {recipient!r}: call a function as to=functions.NAME")
                continue
            try:
                arguments = strict_json(text)
            except ValueError as exc:
                errors.append(f"call {len(calls) + 1}: invalid JSON arguments ({exc})")
                continue
            if not isinstance(arguments, dict):
                errors.append(f"call {len(calls) + 1}: the arguments must be a JSON object")
                continue
            calls.append(ToolCall(name, arguments))
        elif message.channel == "analysis":
            reasoning.append(text)
        elif message.channel in ("final", "commentary"):
            content.append(text)
        else:
            errors.append(f"message on channel {message.channel!r}: use analysis, commentary or final")
    if stop is None:
        errors.append("the turn did not end with <|call|> or <|return|>")
    elif stop == CALL and not calls and not errors:
        errors.append("<|call|> ended a turn without a function call (to=functions.NAME)")
    return AssistantTurn(
        content="\n".join(content),
        tool_calls=() if errors else tuple(calls),
        reasoning="\n".join(reasoning) if reasoning else None,
        parse_error="; ".join(errors) or None,
    )


@dataclass
class HarmonyConversation:
    """One episode in harmony (see the module docstring).

    prompt_ids: the first prompt's ids. system_length: how many of them are the system and developer
    messages. messages: the conversation as library messages (None once a turn could not be parsed).
    ids: the episode's ids so far. rewrites: one reason per turn where the library's re-render of the whole
    conversation is not the episode's ids (the episode keeps the sampled ids)."""

    renderer: HarmonyRenderer
    messages: list[oh.Message] | None
    prompt_ids: list[int]
    system_length: int = 0
    ids: list[int] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    _parsed: tuple[tuple[int, ...], list[oh.Message] | None, AssistantTurn] | None = None

    def _turn(self, generated: list[int]) -> tuple[list[oh.Message] | None, AssistantTurn]:
        key = tuple(generated)
        if self._parsed is None or self._parsed[0] != key:
            stop = generated[-1] if generated and generated[-1] in self.renderer.stop_ids else None
            body = generated[:-1] if stop is not None else generated
            try:
                messages = self.renderer.encoding.parse_messages_from_completion_tokens(
                    [*body, stop if stop is not None else END], oh.Role.ASSISTANT
                )
            except Exception as exc:  # HarmonyError (malformed header, text outside a message, ...)
                self._parsed = (key, None, AssistantTurn(parse_error=f"not a harmony message: {exc}"))
            else:
                self._parsed = (key, messages, turn_from_messages(messages, stop))
        return self._parsed[1], self._parsed[2]

    def parse(self, generated: list[int]) -> AssistantTurn:
        """The policy turn `generated` (ids after `<|start|>assistant`, ending with `<|call|>` or
        `<|return|>` when it stopped) as an `AssistantTurn`; a malformed turn gives `parse_error`."""
        return self._turn(generated)[1]

    def extend(self, generated: list[int], result: StepResult) -> list[int]:
        """The ids after the sampled turn `generated`: a tool message (author `functions.NAME`, channel
        commentary, to the assistant) per `result.tool_results`, or a user message with
        `result.observation` when there are none, then `<|start|>assistant`. Only the new messages are
        rendered; earlier ids are never changed. Checked against the library's render of the whole
        conversation (mismatch reasons go to `rewrites`)."""
        enc = self.renderer.encoding
        parsed, _ = self._turn(generated)
        new = _result_messages(result)
        extension = [t for m in new for t in enc.render(m)] + self.renderer.opening
        episode = self.ids + list(generated) + extension
        if self.messages is not None and parsed is None:
            self.rewrites.append("the library cannot parse the sampled turn, so it cannot re-render the episode")
            self.messages = None
        elif self.messages is not None:
            self.messages += [*parsed, *new]
            full = enc.render_conversation_for_completion(
                oh.Conversation.from_messages(self.messages), oh.Role.ASSISTANT
            )
            if full != episode:
                if full[: len(self.ids) + len(generated)] != self.ids + list(generated):
                    reason = (
                        "the library re-renders earlier turns differently (e.g. <|return|> as <|end|>, drops analysis)"
                    )
                else:
                    reason = "the library renders the new messages differently"
                self.rewrites.append(reason)
        self.ids = episode
        return extension


def _result_messages(result: StepResult) -> list[oh.Message]:
    if not result.tool_results:
        observation = "" if result.observation is None else result.observation
        return [oh.Message.from_role_and_content(oh.Role.USER, observation)]
    return [
        oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, f"functions.{r.tool}"), r.content)
        .with_channel("commentary")
        .with_recipient("assistant")
        for r in result.tool_results
    ]


def function_tools(tools: list[dict[str, Any]]) -> list[oh.ToolDescription]:
    """OpenAI function schemas ([{"type": "function", "function": {"name", "description", "parameters"}}])
    as harmony function tools. Raises ValueError for an entry that is not of that form."""
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}] is not an OpenAI function schema {{'type': 'function', 'function': {{...}}}}")
        out.append(
            oh.ToolDescription.new(function["name"], function.get("description", ""), function.get("parameters"))
        )
    return out


class HarmonyRenderer:
    """Renders episodes in GPT-OSS's harmony format (`policy.chat_format: harmony`; module docstring).

    tokenizer: must be harmony's (`harmony_tokenizer()`, or GPT-OSS's own): its `<|call|>`, `<|return|>`,
    `<|start|>` and `<|endoftext|>` ids are checked against the library's. reasoning_effort: the system
    message's `Reasoning:` line (default low). conversation_start_date: a date string for the system message
    (default none, so the prompt is the same every day). Turns end at `<|call|>` or `<|return|>` (the
    library's stop tokens for assistant actions; `stop_id` is `<|call|>`); padding is `<|endoftext|>`.

    Raises ValueError for a tokenizer whose special ids differ from harmony's or an unknown reasoning effort.
    """

    name = "harmony"
    native_tools = True

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        reasoning_effort: ReasoningEffortName = "low",
        conversation_start_date: str | None = None,
    ) -> None:
        self.encoding = enc = harmony_encoding()
        self.stop_ids = frozenset(enc.stop_tokens_for_assistant_actions())
        self.stop_id, self.pad_id = CALL, ENDOFTEXT
        if self.stop_ids != {CALL, RETURN}:
            raise RuntimeError(
                f"openai_harmony's assistant stop tokens are {sorted(self.stop_ids)}, not <|call|>, <|return|>"
            )
        if tokenizer is not None:
            vocab = tokenizer.get_vocab()
            wanted = {"<|call|>": CALL, "<|return|>": RETURN, "<|start|>": START, "<|endoftext|>": ENDOFTEXT}
            wrong = {s: vocab.get(s) for s, i in wanted.items() if vocab.get(s) != i}
            if wrong:
                raise ValueError(
                    f"harmony renderer: the tokenizer is not harmony's (o200k_harmony): ids {wrong}, wanted {wanted}"
                )
        efforts = {e.value.lower(): e for e in oh.ReasoningEffort}
        if reasoning_effort not in efforts:
            raise ValueError(f"harmony renderer: reasoning_effort {reasoning_effort!r}, not one of {sorted(efforts)}")
        system = oh.SystemContent.new().with_reasoning_effort(efforts[reasoning_effort])
        if conversation_start_date is not None:
            system = system.with_conversation_start_date(conversation_start_date)
        self.system = oh.Message.from_role_and_content(oh.Role.SYSTEM, system)
        self.opening = enc.render_conversation_for_completion(oh.Conversation.from_messages([]), oh.Role.ASSISTANT)

    def turn_ids(self, turn: AssistantTurn) -> list[int]:
        """The ids a policy samples (after the prompt's `<|start|>assistant`) to write `turn`, e.g. for
        demonstrations (rl_core/model/demonstrations.py): its reasoning on `analysis`, then its one tool call
        on `commentary` to `functions.NAME` ending with `<|call|>` (its content, if any, as a commentary
        preamble before it), or its content on `final` ending with `<|return|>`. Rendered by the library.
        Raises ValueError for a turn with more than one tool call (a harmony turn ends at its first call)."""
        if len(turn.tool_calls) > 1:
            raise ValueError(f"harmony renderer: a turn makes at most one tool call, not {len(turn.tool_calls)}")
        assistant = oh.Role.ASSISTANT
        messages = []
        if turn.reasoning:
            messages.append(oh.Message.from_role_and_content(assistant, turn.reasoning).with_channel("analysis"))
        if turn.tool_calls:
            if turn.content:
                messages.append(oh.Message.from_role_and_content(assistant, turn.content).with_channel("commentary"))
            call = turn.tool_calls[0]
            messages.append(
                oh.Message.from_role_and_content(assistant, json.dumps(call.arguments, ensure_ascii=False))
                .with_channel("commentary")
                .with_recipient(f"functions.{call.tool}")
                .with_content_type("<|constrain|>json")  # the library's parser refuses "<|constrain|> json"
            )
        else:
            messages.append(oh.Message.from_role_and_content(assistant, turn.content).with_channel("final"))
        ids = [t for m in messages for t in self.encoding.render(m)][len(self.opening) :]
        return ids if turn.tool_calls else [*ids[:-1], RETURN]  # a final message ends the turn: <|return|>

    def reasoning_spans(self, generated: list[int]) -> list[tuple[int, int]]:
        """The analysis-channel messages of one policy turn's ids ([start, end) positions: from the message's
        `<|start|>` (or the turn's first id) through its `<|end|>`, markers included; a message cut off runs
        to the end of the turn), for `algorithm.reasoning_in_loss: false` (rl_core/reasoning_mask.py)."""
        spans, start, n = [], 0, len(generated)
        while start < n:
            end = next((j + 1 for j in range(start, n) if generated[j] in (END, CALL, RETURN)), n)
            message = generated[start:end]
            if CHANNEL in message:
                header = message[message.index(CHANNEL) + 1 : message.index(MESSAGE) if MESSAGE in message else None]
                words = self.encoding.decode([t for t in header if t < N_ORDINARY]).split()
                if words and words[0] == "analysis":
                    spans.append((start, end))
            start = end
        return spans

    def head(self, system: str, tools: list[dict[str, Any]]) -> list[oh.Message]:
        """The system message and (when `system` or `tools`) the developer message: `system` as its
        instructions, `tools` (OpenAI function schemas) as its function tools."""
        developer = oh.DeveloperContent.new()
        if system:
            developer = developer.with_instructions(system)
        if tools:
            developer = developer.with_function_tools(function_tools(tools))
        if not system and not tools:
            return [self.system]
        return [self.system, oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer)]

    def start(self, system: str, tools: list[dict[str, Any]], user: str) -> HarmonyConversation:
        """Open one episode: the library's rendering of [system, developer, user] for completion by the
        assistant (ends with `<|start|>assistant`)."""
        head = self.head(system, tools)
        messages = [*head, oh.Message.from_role_and_content(oh.Role.USER, user)]
        prompt = self.encoding.render_conversation_for_completion(
            oh.Conversation.from_messages(messages), oh.Role.ASSISTANT
        )
        system_ids = self.encoding.render_conversation(oh.Conversation.from_messages(head))
        system_length = len(system_ids) if prompt[: len(system_ids)] == system_ids else 0
        return HarmonyConversation(self, messages, prompt, system_length, list(prompt))
