"""Renderers: how an episode's messages become token ids, and generated ids become a policy turn.

A `Renderer` (one per policy) opens a `Conversation` per episode. The conversation gives the first
prompt's token ids (system, tools, task, then the opening of the first policy turn), turns each
policy turn's generated ids into what the environment receives (`parse`), and turns the
environment's answer into the token ids that extend the episode (`extend`: observation or tool
results, then the opening of the next policy turn). Token-in, token-out: the ids the policy was fed
and sampled are the episode's tokens; a renderer never re-tokenizes or rewrites earlier turns.

Renderers:
- `TextRenderer` over a `ChatFormat` (`turnstile`, `chatml`): tools are described in the system
  prompt and the policy writes Turnstile's text actions (`CALL tool {...}` / `ANSWER {...}`);
  `parse` gives the turn's text, which goes to `EnvSession.step`. (`native_tools` False.)
- Renderers with `native_tools` True (a tokenizer's own chat template with a tool-call parser)
  give an `AssistantTurn` (rl_core/environments/messages.py), which goes to `EnvSession.respond`,
  and render `StepResult.tool_results` as the template's tool messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from rl_core.environments.base import StepResult
from rl_core.environments.messages import AssistantTurn
from rl_core.model.tokenizer import ChatFormat


class Conversation(Protocol):
    """One episode's rendering.

    prompt_ids: the first prompt ([prompt tokens]): system (with tools), task, then the opening of
    the first policy turn. system_length: how many of `prompt_ids` are the system turn (for the
    episode's turn records)."""

    prompt_ids: list[int]
    system_length: int

    def parse(self, generated: list[int]) -> str | AssistantTurn:
        """The policy turn whose generated ids (ending with the stop token when it stopped) are
        `generated`: its text for a text renderer, an `AssistantTurn` for a native one (a malformed
        tool call gives `parse_error`, never an exception)."""

    def extend(self, generated: list[int], result: StepResult) -> list[int]:
        """The ids that follow the policy turn `generated`: the environment's answer `result` (its
        observation, or its tool results) and the opening of the next policy turn."""


class Renderer(Protocol):
    """Renders episodes for one policy's tokenizer. name: as in the config (`policy.chat_format`).
    native_tools: whether tools go to the model as schemas and turns come back as structured tool
    calls. stop_id: the token that ends a policy turn. stop_ids: every token that ends a policy turn
    (`stop_id` among them; e.g. harmony ends a turn at `<|call|>` or `<|return|>`). pad_id: the
    padding token."""

    name: str
    native_tools: bool
    stop_id: int
    stop_ids: frozenset[int]
    pad_id: int

    def reasoning_spans(self, generated: list[int]) -> list[tuple[int, int]]:
        """The reasoning blocks of one policy turn's generated ids ([start, end) positions; markers
        included), for `algorithm.reasoning_in_loss: false` (rl_core/reasoning_mask.py)."""

    def start(self, system: str, tools: list[dict[str, Any]], user: str) -> Conversation:
        """Open one episode: `system` (the environment's system prompt for this renderer), `tools` (OpenAI
        function schemas; a text renderer ignores them, the system prompt describes the tools), `user`
        (the task prompt)."""


@dataclass
class _TextConversation:
    chat: ChatFormat
    tokenizer: PreTrainedTokenizerBase
    prompt_ids: list[int] = field(default_factory=list)
    system_length: int = 0

    def parse(self, generated: list[int]) -> str:
        body = generated[:-1] if generated and generated[-1] == self.chat.stop_id else generated
        return self.tokenizer.decode(body, skip_special_tokens=False)

    def extend(self, generated: list[int], result: StepResult) -> list[int]:
        return self.chat.observation(self.tokenizer, "" if result.observation is None else result.observation)


@dataclass(frozen=True)
class TextRenderer:
    """Turnstile's text actions between a `ChatFormat`'s role markers (the `turnstile` and `chatml`
    formats): the same token ids the rollout engine has always built."""

    name: str
    chat: ChatFormat
    tokenizer: PreTrainedTokenizerBase
    native_tools: bool = False

    @property
    def stop_id(self) -> int:
        return self.chat.stop_id

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.chat.stop_id})

    @property
    def pad_id(self) -> int:
        return self.chat.pad_id

    def reasoning_spans(self, generated: list[int]) -> list[tuple[int, int]]:
        """None: Turnstile's text actions have no reasoning block."""
        return []

    def start(self, system: str, tools: list[dict[str, Any]], user: str) -> _TextConversation:
        prompt = self.chat.prompt(self.tokenizer, system, user)
        system_length = len(self.chat.message(self.tokenizer, "system", system))
        return _TextConversation(self.chat, self.tokenizer, prompt, system_length)

    def prompt_lengths(self, system: str, tools: list[dict[str, Any]], users: list[str]) -> list[int]:
        """len(start(system, tools, user).prompt_ids) for each of `users` (tokens), in one batched encoding."""
        fixed = len(self.chat.message(self.tokenizer, "system", system)) + len(self.chat.prefix["assistant"])
        user_turn = len(self.chat.prefix["user"]) + len(self.chat.end)
        encoded = self.tokenizer(users, add_special_tokens=False)["input_ids"] if users else []
        return [fixed + user_turn + len(ids) for ids in encoded]
