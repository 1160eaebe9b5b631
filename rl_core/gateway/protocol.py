"""The gateway's wire format: OpenAI-compatible requests and responses, and its error answers.

Requests are checked with pydantic; a request that does not fit is answered 400 with a message naming the
field (`GatewayError`). Shapes follow the OpenAI API reference (Chat Completions, Completions): unknown
fields are accepted and ignored (frameworks send their own), fields the gateway cannot honour are refused
(`n` > 1, `top_logprobs`, `echo`). Responses are plain dicts in the OpenAI shape, plus vLLM's
`prompt_token_ids` / `token_ids` when the request asks with `return_token_ids`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rl_core.environments.messages import AssistantTurn
from rl_core.model.tokenizer import repair_unicode


class GatewayError(Exception):
    """An error answer: HTTP `status`, a `message` for people, the request field it is about (`param`) and
    an OpenAI-style `code` (e.g. "invalid_request_error", "context_length_exceeded")."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: {"error": {"message", "type", "param", "code"}}."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def parse_json(body: bytes) -> Any:
    """The request body as JSON. Raises GatewayError 400 naming the position of a syntax error."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def validated(model: type[BaseModel], data: Any) -> Any:
    """`data` checked against `model`. Raises GatewayError 400 naming the first bad field (dotted path)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(p) for p in _field_path(data, first["loc"])) or "body"
        return_msg = f"{path}: {first['msg']}"
        if len(exc.errors()) > 1:
            return_msg += f" (and {len(exc.errors()) - 1} more problem(s))"
        raise GatewayError(400, f"invalid request: {return_msg}", param=path, code="invalid_request") from None


def _field_path(data: Any, loc: tuple) -> list:
    """The part of a pydantic error location that names fields and list positions of `data`: what follows a
    value that is neither an object nor a list is the union member pydantic tried ("reward.float" -> "reward")."""
    path, node = [], data
    for part in loc:
        if not (isinstance(node, dict) and isinstance(part, str)) and not (
            isinstance(node, list) and isinstance(part, int)
        ):
            break
        path.append(part)
        node = node.get(part) if isinstance(node, dict) else node[part] if part < len(node) else None
    return path


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Open):
    """`{"name", "arguments"}`: arguments are a JSON text (as the OpenAI API sends them) or an object."""

    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallItem(_Open):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Open):
    """One chat message. `content` is text or a list of content parts (only text parts are read)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: `content`, or its text parts joined ("" for none); text that is not valid Unicode
        (lone surrogates) is repaired (U+FFFD), as environment text is."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return repair_unicode(self.content)[0]
        parts = (str(part.get("text", "")) for part in self.content if part.get("type", "text") == "text")
        return repair_unicode("".join(parts))[0]

    def calls(self) -> list[tuple[str, Any]]:
        """The tool calls as (name, arguments as decoded JSON, or the raw text when it is not JSON)."""
        out = []
        for call in self.tool_calls or []:
            arguments: Any = call.function.arguments
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    pass
            out.append((call.function.name, arguments))
        return out


class _Sampled(_Open):
    """What both endpoints share: sampling parameters and streaming."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1)
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("the gateway samples one choice per call (n must be 1)")
        return value


class ChatRequest(_Sampled):
    """`POST .../v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _no_top(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("top_logprobs is not served (only the sampled token's log-prob)")
        return value

    @field_validator("tools")
    @classmethod
    def _functions(cls, tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for i, tool in enumerate(tools or []):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
                raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        return tools

    def token_limit(self) -> int | None:
        """The call's own cap on generated tokens (`max_completion_tokens`, else `max_tokens`)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampled):
    """`POST .../v1/completions`: one prompt, as text or as token ids."""

    prompt: str | list[int]
    logprobs: int | None = None
    echo: bool = False

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not served")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens


def _no_text_numbers(value: Any) -> Any:
    """Refuse what pydantic would coerce into a reward: a bool or a string is not a number here."""
    values = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
    if any(isinstance(v, (bool, str)) for v in values):
        raise ValueError("rewards are JSON numbers (not strings or booleans)")
    return value


class CompleteRequest(_Open):
    """`POST /rollouts/{id}/complete`: `status` "ready" (the agent finished) or "failed" (with `reason`);
    an optional reward given here is recorded as by `/reward`; `client_token` makes a repeat harmless."""

    status: Literal["ready", "failed"] = "ready"
    reason: str | None = None
    reward: float | list[float] | None = None
    reward_components: dict[str, float] | None = None
    client_token: str | None = None

    _numbers = field_validator("reward", "reward_components", mode="before")(_no_text_numbers)


class RewardRequest(_Open):
    """`POST /rollouts/{id}/reward`: one value for the episode, or one per model call (per turn), and named
    components; `client_token` makes a repeat harmless."""

    reward: float | list[float]
    reward_components: dict[str, float] | None = None
    client_token: str | None = None

    _numbers = field_validator("reward", "reward_components", mode="before")(_no_text_numbers)


def new_id(prefix: str) -> str:
    """An unguessable id: `prefix` then 24 hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def tool_call_items(turn: AssistantTurn, ids: list[str]) -> list[dict[str, Any]]:
    """The turn's tool calls in the OpenAI shape, with `ids` (one per call)."""
    return [
        {
            "id": call_id,
            "type": "function",
            "function": {"name": call.tool, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
        }
        for call, call_id in zip(turn.tool_calls, ids)
    ]


def chat_response(
    model: str,
    message: dict[str, Any],
    finish_reason: str,
    prompt_ids: list[int],
    completion_ids: list[int],
    logprobs: list[dict[str, Any]] | None,
    token_ids: bool,
) -> dict[str, Any]:
    """A `chat.completion` object with one choice. `finish_reason`: "stop", "length" or "tool_calls"."""
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return _body("chatcmpl-", "chat.completion", model, choice, prompt_ids, completion_ids, token_ids)


def completion_response(
    model: str,
    text: str,
    finish_reason: str,
    prompt_ids: list[int],
    completion_ids: list[int],
    logprobs: list[float] | None,
    tokens: list[str] | None,
    token_ids: bool,
) -> dict[str, Any]:
    """A `text_completion` object with one choice."""
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    if logprobs is not None:
        choice["logprobs"] = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": None}
    return _body("cmpl-", "text_completion", model, choice, prompt_ids, completion_ids, token_ids)


def _body(
    prefix: str,
    kind: str,
    model: str,
    choice: dict[str, Any],
    prompt_ids: list[int],
    completion_ids: list[int],
    token_ids: bool,
) -> dict[str, Any]:
    """A response object of `kind` with its one `choice`, the usage (tokens), and vLLM's `prompt_token_ids` /
    `token_ids` when asked."""
    if token_ids:
        choice["token_ids"] = list(completion_ids)
    usage = {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(completion_ids),
        "total_tokens": len(prompt_ids) + len(completion_ids),
    }
    body = {
        "id": new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
    if token_ids:
        body["prompt_token_ids"] = list(prompt_ids)
    return body


def chat_chunks(response: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished `chat.completion` as the `chat.completion.chunk` events of a stream: the role, the
    reasoning and content, each tool call, then the finish reason (and, when asked, the usage)."""
    base = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    choice, message = response["choices"][0], response["choices"][0]["message"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    chunks = [chunk({"role": "assistant", "content": ""})]
    if message.get("reasoning_content"):
        chunks.append(chunk({"reasoning_content": message["reasoning_content"]}))
    if message.get("content"):
        chunks.append(chunk({"content": message["content"]}))
    for index, call in enumerate(message.get("tool_calls") or []):
        chunks.append(chunk({"tool_calls": [{"index": index, **call}]}))
    chunks.append(chunk({}, choice["finish_reason"]))
    if include_usage:
        chunks.append(base | {"choices": [], "usage": response["usage"]})
    return chunks


def completion_chunks(response: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A finished `text_completion` as stream events: the text, then the finish reason (and the usage)."""
    base = {k: response[k] for k in ("id", "created", "model", "object")}
    choice = response["choices"][0]
    chunks = [base | {"choices": [{"index": 0, "text": choice["text"], "finish_reason": None, "logprobs": None}]}]
    chunks.append(base | {"choices": [{"index": 0, "text": "", "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        chunks.append(base | {"choices": [], "usage": response["usage"]})
    return chunks
