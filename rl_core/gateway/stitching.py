"""A rollout's model calls stitched into token sequences (segments), and the segments into episodes.

Every call an agent makes is recorded token for token (`CallRecord`): the prompt ids as the policy saw them
(rendered with the policy's chat format), the generated ids and their sampler log-probs, the text and tool
calls returned. Calls are stitched as follows (`RolloutRecord.plan`):

1. The first call opens segment 0: its prompt is the renderer's first prompt for `[system, user]`
   (token-exact with the in-process rollout engine) or the whole rendering of its messages.
2. A later call extends the newest segment when its messages are that segment's messages (the previous
   call's messages, then the assistant message the gateway returned, matched by its tool calls and, when the
   agent kept it, its content), followed by new messages: tool results answering the returned calls, or one
   user message. The new messages are rendered after the sampled ids (`Conversation.extend`), never
   re-tokenizing them: the usual multi-turn case is exact by construction.
3. Otherwise the whole conversation is rendered; when those ids start with the segment's ids (the agent
   re-sent its history and the template renders it the same), the call still extends the segment.
4. Otherwise (the agent rewrote its history, summarised it, ran a sub-agent, changed the tools, or made
   calls in parallel) the call starts a new segment, and `stitch_break` says why. Each break is counted in
   the batch's `rollout/stitch_breaks`.

Segments become rows of the trajectory record (`to_episodes`): one per segment, sharing the rollout's
`group_id` and `sample_index`, numbered by `segment`. Reward rule: every row carries the rollout's outcome
(reward, components, success, finish reason); a per-call reward list goes to the assistant turn of each
call (`Turn.reward`) and the episode reward is their sum. The trainer counts a rollout once in its group's
baseline whatever its number of segments (rl_core/trainer.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from rl_core.environments.base import StepResult, Task
from rl_core.environments.messages import AssistantTurn
from rl_core.gateway.conversation import ChatRendering
from rl_core.gateway.protocol import Message
from rl_core.model.renderers import Conversation
from rl_core.trajectory import Episode, Sampling, Turn


@dataclass
class CallRecord:
    """One model call as recorded: the segment it went into, whether it extended that segment (`stitched`),
    `prompt_ids` (the whole context the policy saw), `completion_ids` and their sampler `logprobs`
    (natural log, one per generated id), the decoded `text`, the parsed `turn`, and `finish_reason`
    ("stop" or "length")."""

    segment: int
    stitched: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    turn: AssistantTurn
    finish_reason: str


@dataclass
class Segment:
    """One token sequence of a rollout: the ids so far (`tokens`), which of them the policy generated
    (`loss_mask`), their log-probs, turn records, and what the next call must extend (`messages`: the
    conversation so far, the gateway's answer included; `tool_names`: call id -> tool)."""

    key: int
    conversation: Conversation | None
    tools: str
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tool_names: dict[str, str] = field(default_factory=dict)
    last_generated: list[int] = field(default_factory=list)
    stitch_break: str | None = None
    busy: bool = False

    def append(self, ids: list[int], generated: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += ids
        self.loss_mask += [1 if generated else 0] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


@dataclass
class Plan:
    """What a call will do: extend segment `segment` by `extension` (new ids before the policy's turn) or,
    with `new_segment`, start a segment whose prompt is `extension`; `reason`: why it could not extend."""

    segment: int
    extension: list[int]
    new_segment: bool
    conversation: Conversation | None
    reason: str | None
    prompt_turns: list[Turn]


def _tools_key(tools: list[dict[str, Any]] | None) -> str:
    return json.dumps(tools or [], sort_keys=True, ensure_ascii=False)


def _same(agent: Message, ours: Message) -> bool:
    """Whether the agent's message is ours: same role and tool calls; the same text unless the agent kept
    only the tool calls (an assistant message whose text it dropped)."""
    if agent.role != ours.role or agent.tool_call_id != ours.tool_call_id or agent.calls() != ours.calls():
        return False
    if agent.text() == ours.text() or agent.text().strip() == ours.text().strip():
        return True
    return agent.role == "assistant" and not agent.text() and bool(ours.tool_calls)


def _first_difference(messages: list[Message], history: list[Message]) -> str:
    for index, (agent, ours) in enumerate(zip(messages, history)):
        if not _same(agent, ours):
            return f"message {index} ({agent.role}) differs from the previous call's"
    if len(messages) <= len(history):
        return f"the call has {len(messages)} messages, not more than the previous call's {len(history)}"
    return "the new messages are not tool results for the returned calls nor one user message"


@dataclass
class RolloutRecord:
    """Everything recorded for one rollout: its segments and calls (see the module docstring)."""

    rollout_id: str
    task: Task
    group_id: str
    sample_index: int
    segments: list[Segment] = field(default_factory=list)
    calls: list[CallRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def plan(self, rendering: ChatRendering, messages: list[Message], tools: list[dict[str, Any]], key: int) -> Plan:
        """How the call with `messages` and `tools` is stitched (module docstring, steps 1-4). `key` is the
        token-sampler cache key a new segment takes. Raises GatewayError when the messages cannot be
        rendered."""
        if not self.segments:
            return self._open(rendering, messages, tools, None)
        seg = self.segments[-1]
        index = len(self.segments) - 1
        if seg.busy:
            return self._open(rendering, messages, tools, "a call of this rollout was still running (parallel calls)")
        if _tools_key(tools) != seg.tools:
            return self._open(rendering, messages, tools, "the call's tools differ from the previous call's")
        history = seg.messages
        prefix = len(messages) > len(history) and all(_same(a, o) for a, o in zip(messages, history))
        answer = rendering.answer(messages[len(history) :], seg.tool_names) if prefix else None
        if answer is not None and seg.conversation is not None:
            try:
                extension = seg.conversation.extend(seg.last_generated, answer)
            except Exception:  # the template cannot render the answer after the sampled turn: render whole
                seg.conversation = None
            else:
                turns = self._answer_turns(seg, extension, answer)
                return Plan(index, extension, False, seg.conversation, None, turns)
        whole = rendering.whole(messages, tools)
        if len(whole) > len(seg.tokens) and whole[: len(seg.tokens)] == seg.tokens:
            extension = whole[len(seg.tokens) :]
            return Plan(index, extension, False, None, None, [Turn("user", messages[-1].text(), 0, len(extension))])
        reason = _first_difference(messages, history) if not prefix else "the re-rendered prompt drifts: "
        if prefix:
            pairs = enumerate(zip(whole, seg.tokens))
            drift = next((i for i, (a, b) in pairs if a != b), min(len(whole), len(seg.tokens)))
            reason += f"its token {drift} differs from the segment's"
        return self._open(rendering, messages, tools, reason, whole)

    def plan_ids(self, prompt: list[int], key: int) -> Plan:
        """How a raw-prompt call (`/v1/completions`) is stitched: it extends the newest segment when its ids
        start with that segment's ids (prompt, completions, everything since), else it starts a segment."""
        seg = self.segments[-1] if self.segments else None
        turns = [Turn("user", "", 0, 0)]
        if (
            seg is not None
            and not seg.busy
            and len(prompt) > len(seg.tokens)
            and prompt[: len(seg.tokens)] == seg.tokens
        ):
            extension = prompt[len(seg.tokens) :]
            turns[0].end = len(extension)
            return Plan(len(self.segments) - 1, extension, False, None, None, turns)
        reason = None
        if seg is not None:
            reason = (
                "a call of this rollout was still running (parallel calls)"
                if seg.busy
                else ("the prompt does not start with the previous call's prompt and completion")
            )
        turns[0].end = len(prompt)
        return Plan(len(self.segments), list(prompt), True, None, reason, turns)

    def _open(
        self,
        rendering: ChatRendering,
        messages: list[Message],
        tools: list[dict[str, Any]],
        reason: str | None,
        whole: list[int] | None = None,
    ) -> Plan:
        conversation = rendering.open(messages, tools)
        if conversation is not None:
            prompt = list(conversation.prompt_ids)
            system_end = conversation.system_length
            turns = [
                Turn("system", messages[0].text(), 0, system_end),
                Turn("user", messages[1].text(), system_end, len(prompt)),
            ]
        else:
            prompt = whole if whole is not None else rendering.whole(messages, tools)
            turns = [Turn("user", messages[-1].text(), 0, len(prompt))]
        return Plan(len(self.segments), prompt, True, conversation, reason, turns)

    @staticmethod
    def _answer_turns(seg: Segment, extension: list[int], answer: StepResult) -> list[Turn]:
        if answer.tool_results:
            text = "\n".join(r.content for r in answer.tool_results)
            return [Turn("tool", text, 0, len(extension), tool_name=answer.tool_results[0].tool)]
        if answer.tool_name is not None:  # the text format's tool message: a tool turn, as in process
            return [Turn("tool", answer.observation or "", 0, len(extension), tool_name=answer.tool_name)]
        return [Turn("user", answer.observation or "", 0, len(extension))]

    def context(self, plan: Plan) -> list[int]:
        """The ids the policy continues for `plan`: the segment's ids and the extension, or a new prompt."""
        if plan.new_segment:
            return list(plan.extension)
        return self.segments[plan.segment].tokens + plan.extension

    def begin(self, plan: Plan, messages: list[Message], tools: list[dict[str, Any]], key: int) -> Segment:
        """Apply `plan` before sampling: open the new segment or append the extension; the segment is busy
        until `record`."""
        if plan.new_segment:
            seg = Segment(key=key, conversation=plan.conversation, tools=_tools_key(tools), stitch_break=plan.reason)
            self.segments.append(seg)
        else:
            seg = self.segments[plan.segment]
            seg.conversation = plan.conversation
        offset = len(seg.tokens)
        seg.append(plan.extension, generated=False)
        for turn in plan.prompt_turns:
            turn.start, turn.end = turn.start + offset, turn.end + offset
            seg.turns.append(turn)
        seg.messages = list(messages)
        seg.busy = True
        return seg

    def record(
        self,
        plan: Plan,
        generated: list[int],
        logprobs: list[float],
        stopped: bool,
        text: str,
        turn: AssistantTurn,
        reply: Message,
        call_ids: list[str],
    ) -> CallRecord:
        """Append the policy's turn to the segment `begin` opened, and record the call."""
        seg = self.segments[plan.segment]
        prompt = list(seg.tokens)
        start = len(seg.tokens)
        seg.append(generated, generated=True, logprobs=logprobs)
        tool = turn.tool_calls[0].tool if turn.tool_calls else None
        seg.turns.append(
            Turn(
                "assistant",
                text,
                start,
                len(seg.tokens),
                tool_name=tool,
                finish_reason="stop" if stopped else "length",
                parse_error=turn.parse_error,
            )
        )
        seg.messages = [*seg.messages, reply]
        seg.tool_names = {call_id: call.tool for call, call_id in zip(turn.tool_calls, call_ids)}
        seg.last_generated = list(generated)
        seg.busy = False
        call = CallRecord(
            segment=self.segments.index(seg),
            stitched=not plan.new_segment,
            prompt_ids=prompt,
            completion_ids=list(generated),
            logprobs=list(logprobs),
            text=text,
            turn=turn,
            finish_reason="stop" if stopped else "length",
        )
        self.calls.append(call)
        return call

    def release(self, plan: Plan) -> None:
        """Undo `begin` for a call that was not answered (the sampler failed, the rollout ended meanwhile)."""
        seg = self.segments[plan.segment]
        seg.busy = False

    @property
    def stitch_breaks(self) -> int:
        """Segments after the first: calls that could not extend the previous segment."""
        return max(len(self.segments) - 1, 0)

    def to_episodes(
        self,
        *,
        run_id: str,
        iteration: int,
        sampling: Sampling,
        finish_reason: str,
        reward: float,
        components: dict[str, float],
        turn_rewards: list[float] | None,
        success_threshold: float,
        env_error: str | None,
    ) -> list[Episode]:
        """One row per segment (at least one: a rollout without calls gives an empty env_error-style row
        with the given finish reason). `turn_rewards`: one per call, in call order, put on each call's
        assistant turn."""
        if turn_rewards is not None:
            assistant_turns = [t for seg in self.segments for t in seg.turns if t.role == "assistant"]
            for t, value in zip(assistant_turns, turn_rewards):
                t.reward = float(value)
        success = finish_reason != "env_error" and reward >= success_threshold
        segments = self.segments or [Segment(key=-1, conversation=None, tools="")]
        return [
            Episode(
                run_id=run_id,
                iteration=iteration,
                policy_version=sampling.policy_version,
                env_name=self.task.env_name,
                task_id=self.task.task_id,
                group_id=self.group_id,
                sample_index=self.sample_index,
                tokens=list(seg.tokens),
                loss_mask=list(seg.loss_mask),
                behavior_logprobs=list(seg.logprobs),
                turns=list(seg.turns),
                reward=reward,
                reward_components=dict(components),
                success=success,
                finish_reason=finish_reason,
                env_error=env_error,
                sampling=sampling,
                segment=index,
                stitch_break=seg.stitch_break if index else None,
            )
            for index, seg in enumerate(segments)
        ]
