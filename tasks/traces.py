"""Agent episodes as MLflow traces, so that MLflow's experiment view (its GenAI "Traces" view, the one
it opens first) and a run's Traces tab show the agent at work: what it was asked, each turn it wrote,
each tool it called with what arguments and what came back, and the reward it got.

Which episodes: a deterministic sample (`rl_core.evaluation.sample_rollouts`) of
`tracking.traced_episodes` rollouts of each training batch (spread over its groups, seeded by the
Turnstile run id and the iteration), logged when the batch is written; and the greedy episodes of
`tracking.traced_eval_episodes` held-out tasks per evaluation (spread over the environments; the same
tasks at every evaluation of one config, so one task's trace can be compared from step to step). 0
logs none. An external agent's rollout of several segments gives a trace per segment.

Trace layout (one trace per episode row; `build_trace`):
- Root span, type AGENT, named `<phase>: <env_name>/<task_id>` (phase `train` or `eval`; also the
  trace name). Inputs: `{"messages": [...]}`, the episode's opening turns (system prompt, task
  prompt) as chat messages, so the trace list's Request column shows the task prompt. Outputs: the
  last policy turn's text (the Response column). Attributes `turnstile.*`: reward, success,
  finish_reason, env_error, policy_version, sampling temperature, prompt / response tokens, policy
  turns, segment. Status ERROR (and the trace's state ERROR) only for an `env_error` episode.
- Per policy turn (role `assistant`), in order, a child span of type CHAT_MODEL named `policy turn
  <n>`: inputs `{"context_tokens": <tokens before the turn>}`, outputs the turn's text; token usage
  (`mlflow.chat.tokenUsage`: input = context tokens, output = the turn's tokens, which MLflow sums
  into the trace's token count); attributes `turnstile.token_start` / `turnstile.token_end` (the
  turn's span of the episode's tokens), `turnstile.finish_reason` (stop / length),
  `turnstile.mean_logprob` (the sampler's mean log-prob of the turn's tokens),
  `turnstile.parse_error` and `turnstile.turn_reward` when set. A turn whose tool call could not be
  parsed has status ERROR with the parse error.
- Per tool call (role `tool`: the environment's answer), a child span of type TOOL named after the
  tool: inputs `{"arguments": {...}}` parsed from the calling turn's text (the text action format,
  else the Hermes and Gemma native formats), or `{"call": <the turn's text>}` when none parses;
  outputs the tool's result (the tool turn's text); `turnstile.tool_ok`; status ERROR when the call
  failed (tool_ok false). Other later turns (a `user` message from the environment) are UNKNOWN spans.
- Feedback (MLflow assessments, source CODE `<env_name> environment`): `reward` (float, rationale:
  the finish reason), `success` (bool), `reward/<component>` per reward component, and
  `turn_reward` on a policy turn's span when the agent gave per-turn rewards. Rewards and log-probs
  are shown as MLflow metrics are (`tasks.tracking.readable_value`); the exact values are in the Parquet
  trajectories.
- Tags: `turnstile.run_id`, `turnstile.phase`, `turnstile.iteration` (training) or `turnstile.step`
  (evaluations: the policy version evaluated), `turnstile.group_id`, `turnstile.sample_index`,
  `turnstile.task_id`, `turnstile.env`, `turnstile.finish_reason`, `turnstile.success`,
  `turnstile.reward`, `turnstile.policy_version`. Searchable, e.g.
  `tags.\\`turnstile.finish_reason\\` = 'max_turns'`.
- The trace belongs to the MLflow run (`mlflow.sourceRun`), so it is listed on the run's Traces tab.
- Time: per-turn wall-clock times are not recorded, so the time axis counts tokens: the trace ends at
  the episode's `created_at` and spans 1 µs per token; each span covers its turn's tokens. The
  durations MLflow shows are token counts in µs, not latencies (`turnstile.time_axis` says so).
- Ids are derived from (MLflow run, phase, iteration or step, group, sample, segment): logging the same
  episodes again (a retried task, a resumed run) replaces their traces instead of adding copies.
- Texts longer than `MAX_TEXT_CHARS` are cut with a note (SQLite store size).

How it talks to MLflow: MLflow's tracing APIs (`mlflow.start_span`, `MlflowClient.start_trace` /
`start_span`) export through one process-wide tracer to the process-wide tracking URI (not the
client's), in a background queue, dropping failures with a log line. Turnstile talks to each run's
store by explicit URI from Prefect's worker threads (tasks/tracking.py), so a trace is built here as a
finished `mlflow.entities.Trace` and written with the store calls MLflow's own exporter makes,
`TracingClient(uri).start_trace(trace_info)` and `log_spans`: synchronous, on the tracker's URI, and a
failure reaches the task (which retries it, `MLFLOW_RETRIES`). Logging traces never fails training or
an evaluation: `trace_batch` and `trace_evaluation` log a warning instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from mlflow import MlflowClient
from mlflow.entities import (
    AssessmentSource,
    AssessmentSourceType,
    Feedback,
    Span,
    SpanType,
    Trace,
    TraceData,
    TraceInfo,
    TraceLocation,
    TraceState,
)
from mlflow.tracing.client import TracingClient
from mlflow.tracing.constant import (
    MAX_CHARS_IN_TRACE_INFO_METADATA,
    TRACE_REQUEST_RESPONSE_PREVIEW_MAX_LENGTH_OSS,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    SpanAttributeKey,
    TraceMetadataKey,
    TraceTagKey,
)
from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import MissingContextError

from rl_core.environments.actions import ToolCall, parse_action
from rl_core.evaluation import EvalReport, sample_rollouts, stable_seed
from rl_core.model.tool_parsers import TOOL_PARSERS
from rl_core.trajectory import Episode, Turn
from tasks.tracking import MLFLOW_RETRIES, Tracker, readable_value, truncate

Phase = Literal["train", "eval"]

TAG = "turnstile."
"""Prefix of the trace tags and span attributes Turnstile sets."""
MAX_TEXT_CHARS = 20_000
"""Longest turn text stored in a span; longer ones are cut with a note."""
NS_PER_TOKEN = 1_000
"""The time axis of a trace: 1 µs per token (module docstring)."""
TIME_AXIS = "1 microsecond per token; per-turn wall-clock times are not recorded"


@dataclass(frozen=True)
class TraceContext:
    """Where episodes were played, for their traces' names, tags and ids.

    run_id: the Turnstile run id. phase: "train" (a training batch) or "eval" (a held-out
    evaluation). iteration: the training iteration (phase "train"; None for evaluations, whose
    traces are keyed by the policy version evaluated instead)."""

    run_id: str
    phase: Phase
    iteration: int | None = None


# --------------------------------------------------------------------------- the trace of an episode


def _hex_id(digits: int, *parts: object) -> str:
    """`digits` hex digits of the sha256 of `parts`, never all zeros (OpenTelemetry ids must not be 0)."""
    text = hashlib.sha256("/".join(str(p) for p in parts).encode()).hexdigest()[:digits]
    return text if int(text, 16) else "1".rjust(digits, "0")


def trace_id_of(episode: Episode, context: TraceContext, mlflow_run_id: str) -> str:
    """The trace id of `episode` ("tr-" and 32 hex digits), the same every time it is logged into that run."""
    key = context.iteration if context.phase == "train" else episode.policy_version
    return "tr-" + _hex_id(
        32, mlflow_run_id, context.phase, key, episode.group_id, episode.sample_index, episode.segment
    )


def _b64(hex_id: str) -> str:
    """An id as the base64 of its bytes, the form of span dicts (`Span.from_dict`)."""
    return base64.b64encode(bytes.fromhex(hex_id)).decode()


def _clip(text: str) -> str:
    return truncate(text, MAX_TEXT_CHARS)


def _tool_arguments(text: str, tool: str) -> dict[str, Any] | None:
    """The arguments of the call to `tool` written in a policy turn's `text`: the text action format
    (`CALL tool {...}`), else a native format Turnstile parses (Hermes, Gemma); None when none parses."""
    action = parse_action(text)
    if isinstance(action, ToolCall) and action.tool == tool:
        return action.arguments
    for parse in TOOL_PARSERS.values():
        try:
            calls = parse(text).tool_calls
        except Exception:  # a parser for another format: not this turn's
            continue
        for call in calls:
            if call.tool == tool:
                return call.arguments
    return None


class _SpanBuilder:
    """Collects the span dicts of one trace (the serialized form `Span.from_dict` reads)."""

    def __init__(self, trace_id: str):
        self.trace_id, self.otel_trace = trace_id, trace_id.removeprefix("tr-")
        self.dicts: list[dict[str, Any]] = []

    def add(
        self,
        name: str,
        span_type: str,
        start_ns: int,
        end_ns: int,
        *,
        parent: str | None,
        inputs: Any = None,
        outputs: Any = None,
        attributes: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> str:
        """Add a span; returns its span id (16 hex digits)."""
        span_id = _hex_id(16, self.trace_id, len(self.dicts))
        attrs = {SpanAttributeKey.REQUEST_ID: self.trace_id, SpanAttributeKey.SPAN_TYPE: span_type}
        if inputs is not None:
            attrs[SpanAttributeKey.INPUTS] = inputs
        if outputs is not None:
            attrs[SpanAttributeKey.OUTPUTS] = outputs
        attrs.update(attributes or {})
        self.dicts.append(
            {
                "trace_id": _b64(self.otel_trace),
                "span_id": _b64(span_id),
                "parent_span_id": _b64(parent) if parent else None,
                "name": name,
                "start_time_unix_nano": start_ns,
                "end_time_unix_nano": end_ns,
                "events": [],
                "status": {"code": "STATUS_CODE_ERROR" if error else "STATUS_CODE_OK", "message": error or ""},
                # MLflow keeps every attribute value as JSON text
                "attributes": {k: json.dumps(v, ensure_ascii=False) for k, v in attrs.items() if v is not None},
                "links": [],
            }
        )
        return span_id

    def spans(self) -> list[Span]:
        return [Span.from_dict(d) for d in self.dicts]


def _preview(text: str | None) -> str | None:
    if text is None:
        return None
    limit = TRACE_REQUEST_RESPONSE_PREVIEW_MAX_LENGTH_OSS
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metadata_text(value: Any) -> str:
    """JSON of `value` cut to what every store keeps in a metadata value (the trace list's old columns)."""
    text = json.dumps(value, ensure_ascii=False)
    limit = MAX_CHARS_IN_TRACE_INFO_METADATA
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000


def _mean_logprob(episode: Episode, turn: Turn) -> float | None:
    values = [episode.behavior_logprobs[i] for i in range(turn.start, turn.end) if episode.loss_mask[i]]
    mean = sum(values) / len(values) if values else None
    return readable_value(mean) if mean is not None and math.isfinite(mean) else None


def build_trace(episode: Episode, context: TraceContext, experiment_id: str, mlflow_run_id: str) -> Trace:
    """The MLflow trace of one episode (layout: module docstring), in experiment `experiment_id`, belonging
    to MLflow run `mlflow_run_id`. Pure: builds the entities, writes nothing."""
    trace_id = trace_id_of(episode, context, mlflow_run_id)
    total = len(episode.tokens)
    end_ns = _ns(episode.created_at)
    start_ns = end_ns - total * NS_PER_TOKEN

    def at(token: int) -> int:
        return start_ns + token * NS_PER_TOKEN

    turns = episode.turns
    first_policy = next((i for i, t in enumerate(turns) if t.role == "assistant"), len(turns))
    messages = [{"role": t.role, "content": _clip(t.text)} for t in turns[:first_policy]]
    policy_texts = [t.text for t in turns if t.role == "assistant"]
    answer = _clip(policy_texts[-1]) if policy_texts else None
    prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    env_error = episode.env_error if episode.finish_reason == "env_error" else None
    sampling = episode.sampling

    builder = _SpanBuilder(trace_id)
    root = builder.add(
        f"{context.phase}: {episode.env_name}/{episode.task_id}",
        SpanType.AGENT,
        start_ns,
        end_ns,
        parent=None,
        inputs={"messages": messages},
        outputs=answer,
        attributes={
            SpanAttributeKey.EXPERIMENT_ID: experiment_id,
            f"{TAG}reward": readable_value(episode.reward),
            f"{TAG}success": bool(episode.success),
            f"{TAG}finish_reason": episode.finish_reason,
            f"{TAG}env_error": episode.env_error,
            f"{TAG}policy_version": episode.policy_version,
            f"{TAG}temperature": None if sampling is None else sampling.temperature,
            f"{TAG}prompt_tokens": episode.prompt_tokens,
            f"{TAG}response_tokens": episode.response_tokens,
            f"{TAG}policy_turns": episode.num_turns,
            f"{TAG}segment": episode.segment,
            f"{TAG}time_axis": TIME_AXIS,
        },
        error=env_error or ("env_error" if episode.finish_reason == "env_error" else None),
    )
    turn_rewards: list[tuple[str, float]] = []
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    policy_turn, last_policy = 0, None
    for turn in turns[first_policy:]:
        if turn.role == "assistant":
            policy_turn += 1
            last_policy = turn
            tokens = {
                "input_tokens": turn.start,
                "output_tokens": turn.end - turn.start,
                "total_tokens": turn.end,
            }
            for key, value in tokens.items():
                usage[key] += value
            span = builder.add(
                f"policy turn {policy_turn}",
                SpanType.CHAT_MODEL,
                at(turn.start),
                at(turn.end),
                parent=root,
                inputs={"context_tokens": turn.start},
                outputs=_clip(turn.text),
                attributes={
                    SpanAttributeKey.CHAT_USAGE: tokens,
                    f"{TAG}token_start": turn.start,
                    f"{TAG}token_end": turn.end,
                    f"{TAG}finish_reason": turn.finish_reason,
                    f"{TAG}mean_logprob": _mean_logprob(episode, turn),
                    f"{TAG}parse_error": turn.parse_error,
                    f"{TAG}turn_reward": None if turn.reward is None else readable_value(turn.reward),
                },
                error=None if turn.parse_error is None else f"tool call not parsed: {turn.parse_error}",
            )
            if turn.reward is not None:
                turn_rewards.append((span, readable_value(turn.reward)))
        elif turn.role == "tool":
            tool = turn.tool_name or (last_policy.tool_name if last_policy else None) or "tool"
            call_text = last_policy.text if last_policy else ""
            arguments = _tool_arguments(call_text, tool)
            builder.add(
                tool,
                SpanType.TOOL,
                at(turn.start),
                at(turn.end),
                parent=root,
                inputs={"arguments": arguments} if arguments is not None else {"call": _clip(call_text)},
                outputs=_clip(turn.text),
                attributes={
                    f"{TAG}tool_ok": turn.tool_ok,
                    f"{TAG}token_start": turn.start,
                    f"{TAG}token_end": turn.end,
                },
                error="tool call failed" if turn.tool_ok is False else None,
            )
        else:
            builder.add(
                f"{turn.role} message",
                SpanType.UNKNOWN,
                at(turn.start),
                at(turn.end),
                parent=root,
                outputs=_clip(turn.text),
                attributes={f"{TAG}token_start": turn.start, f"{TAG}token_end": turn.end},
            )

    source = AssessmentSource(source_type=AssessmentSourceType.CODE, source_id=f"{episode.env_name} environment")
    created_ms = end_ns // 1_000_000
    feedback = [
        Feedback(
            name="reward",
            value=readable_value(episode.reward),
            source=source,
            trace_id=trace_id,
            rationale=f"finish reason: {episode.finish_reason}",
            create_time_ms=created_ms,
            last_update_time_ms=created_ms,
        ),
        Feedback(
            name="success",
            value=bool(episode.success),
            source=source,
            trace_id=trace_id,
            create_time_ms=created_ms,
            last_update_time_ms=created_ms,
        ),
    ]
    feedback += [
        Feedback(
            name=f"reward/{name}",
            value=readable_value(value),
            source=source,
            trace_id=trace_id,
            create_time_ms=created_ms,
            last_update_time_ms=created_ms,
        )
        for name, value in sorted(episode.reward_components.items())
    ]
    feedback += [
        Feedback(
            name="turn_reward",
            value=value,
            source=source,
            trace_id=trace_id,
            span_id=span,
            create_time_ms=created_ms,
            last_update_time_ms=created_ms,
        )
        for span, value in turn_rewards
    ]

    tags = {
        TraceTagKey.TRACE_NAME: builder.dicts[0]["name"],
        f"{TAG}run_id": context.run_id,
        f"{TAG}phase": context.phase,
        f"{TAG}group_id": episode.group_id,
        f"{TAG}sample_index": str(episode.sample_index),
        f"{TAG}task_id": episode.task_id,
        f"{TAG}env": episode.env_name,
        f"{TAG}finish_reason": episode.finish_reason,
        f"{TAG}success": str(bool(episode.success)).lower(),
        f"{TAG}reward": f"{readable_value(episode.reward):g}",
        f"{TAG}policy_version": str(episode.policy_version),
    }
    if context.phase == "train":
        tags[f"{TAG}iteration"] = str(context.iteration)
    else:
        tags[f"{TAG}step"] = str(episode.policy_version)
    if episode.segment:
        tags[f"{TAG}segment"] = str(episode.segment)
    inputs = {"messages": messages}
    info = TraceInfo(
        trace_id=trace_id,
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=start_ns // 1_000_000,
        execution_duration=(end_ns - start_ns) // 1_000_000,
        state=TraceState.ERROR if episode.finish_reason == "env_error" else TraceState.OK,
        request_preview=_preview(prompt),
        response_preview=_preview(answer),
        trace_metadata={
            TraceMetadataKey.SOURCE_RUN: mlflow_run_id,
            TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
            TraceMetadataKey.INPUTS: _metadata_text(inputs),
            TraceMetadataKey.OUTPUTS: _metadata_text(answer),
            TraceMetadataKey.TOKEN_USAGE: json.dumps(usage),
        },
        tags={key: truncate(value, 4096) for key, value in tags.items()},
        assessments=feedback,
    )
    return Trace(info=info, data=TraceData(spans=builder.spans()))


# --------------------------------------------------------------------------- writing traces


def log_traces(tracker: Tracker, traces: Sequence[Trace]) -> list[str]:
    """Write finished traces into `tracker`'s store (its experiment), replacing any trace of the same id;
    returns their ids. Raises what the store raises (MlflowException)."""
    if not traces:
        return []
    ids = [t.info.trace_id for t in traces]
    MlflowClient(tracker.uri).delete_traces(tracker.experiment_id, trace_ids=ids)  # a retry's leftovers
    client = TracingClient(tracker.uri)
    for trace in traces:
        client.start_trace(trace.info)
    client.log_spans(tracker.experiment_id, [span for trace in traces for span in trace.data.spans])
    return ids


def _task_run_name(parameters: dict[str, Any]) -> str:
    """`log-traces-iteration-<n>` (a training batch) or `log-traces-eval-step-<version>` (an evaluation)."""
    context, episodes = parameters["context"], parameters["episodes"]
    if context.phase == "train":
        return f"log-traces-iteration-{context.iteration}"
    return f"log-traces-eval-step-{episodes[0].policy_version if episodes else 0}"


@task(name="log-traces", task_run_name=_task_run_name, cache_policy=NONE, **MLFLOW_RETRIES)
def log_traces_task(tracker: Tracker, episodes: Sequence[Episode], context: TraceContext) -> list[str]:
    """Log each of `episodes` as an MLflow trace of `tracker`'s run (`build_trace`, `log_traces`); returns
    the trace ids. Retried like every MLflow call (`MLFLOW_RETRIES`)."""
    started = time.perf_counter()
    traces = [build_trace(e, context, tracker.experiment_id, tracker.mlflow_run_id) for e in episodes]
    ids = log_traces(tracker, traces)
    get_run_logger().info(
        "%d %s episode(s) logged as MLflow traces in %.2f s", len(ids), context.phase, time.perf_counter() - started
    )
    return ids


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else this module's logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _log_quietly(tracker: Tracker, episodes: Sequence[Episode], context: TraceContext) -> list[str]:
    """Run `log_traces_task`; a failure (after its retries) is a logged warning, never an exception."""
    if not episodes:
        return []
    try:
        state = log_traces_task(tracker, list(episodes), context, return_state=True)
        if state.is_completed():
            return state.result()
        reason = state.message
    except Exception as exc:  # e.g. the orchestration itself failed
        reason = f"{type(exc).__name__}: {exc}"
    _logger().warning(
        "%d %s episode(s) of %s were not logged as MLflow traces (%s); the run goes on without them",
        len(episodes),
        context.phase,
        context.run_id,
        reason,
    )
    return []


def trace_batch(tracker: Tracker, run_id: str, iteration: int, episodes: Sequence[Episode], count: int) -> list[str]:
    """Log `count` rollouts of an iteration's batch as traces (`sample_rollouts` over its groups, seeded
    by `run_id` and `iteration`); returns the trace ids (none when logging failed: a warning is logged)."""
    chosen = sample_rollouts(episodes, count, stable_seed("traced-batch", run_id, iteration))
    return _log_quietly(tracker, chosen, TraceContext(run_id, "train", iteration))


def trace_evaluation(tracker: Tracker, run_id: str, report: EvalReport) -> list[str]:
    """Log an evaluation's kept greedy episodes (`EvalReport.traced_episodes`) as traces; returns the trace
    ids (none when logging failed: a warning is logged)."""
    return _log_quietly(tracker, report.traced_episodes, TraceContext(run_id, "eval"))
