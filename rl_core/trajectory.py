"""The trajectory record: one row per episode, the contract between pipeline stages.

Column names follow `docs/architecture.md`. `Episode` is the in-memory form; the explicit
Arrow schema `TRAJECTORY_SCHEMA` and the converters `episodes_to_table` /
`table_to_episodes` are the on-disk form (see `rl_core/store/`).

Contract: `table_to_episodes(episodes_to_table(eps)) == eps` for every episode that passes
`check_episode`, including None values, maps and the UTC `created_at`. `behavior_logprobs`
are stored as float32, so values that are not float32-exact come back rounded to float32.

Schema versions: 2 added the nullable `sampling` struct (what the token sampler was asked:
temperature, top_p, max tokens per turn, token-sampler backend, policy version). Version-1 tables
(`TRAJECTORY_SCHEMA_V1`, no `sampling` column) are read through `upgrade_table`, which adds the
column as null; the trainer then falls back to its configured temperature for those rows.
3 added the nullable string `parse_error` to each `turns` struct, after `finish_reason`: on an
assistant turn, why the renderer's tool-call parser could not parse it (null when it parsed, for
text-action policies and for other roles). Version-1 and version-2 tables (`TRAJECTORY_SCHEMA_V1`,
`TRAJECTORY_SCHEMA_V2`) are read through `upgrade_table`, which adds the field as null.
4 added what the rollout gateway records for external agents: the nullable float64 `reward` at the
end of each `turns` struct (on an assistant turn, the reward the agent gave that turn when it gave
one per turn; null otherwise), the int32 `segment` (0-based index of the row among the rows of one
rollout; 0 for every in-process episode) and the nullable string `stitch_break` (for segment > 0, why
that segment could not extend the previous one), both after `sample_index`. A rollout whose model
calls could not all be stitched into one token sequence is several rows (segments 0, 1, ...) that
share `group_id` and `sample_index` and each carry the rollout's outcome (`reward`,
`reward_components`, `success`, `finish_reason`). Version-1, -2 and -3 tables (`TRAJECTORY_SCHEMA_V1`,
`TRAJECTORY_SCHEMA_V2`, `TRAJECTORY_SCHEMA_V3`) are read through `upgrade_table`, which adds segment 0,
a null `stitch_break` and a null turn `reward`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 4

FINISH_REASONS = (
    "answered",
    "max_turns",
    "token_cap",
    "context_overflow",
    "env_error",
    "timeout",
    "parse_error",
)


@dataclass
class Turn:
    """One turn of an episode. `start`/`end` index the episode's `tokens` (end exclusive).

    role: `system`, `user`, `assistant` (policy) or `tool` (environment).
    finish_reason: for assistant turns, why generation stopped (`stop` or `length`).
    parse_error: for assistant turns of a native tool-calling policy, why the renderer's tool-call
        parser could not parse the turn (the environment answered it with an error observation);
        None when it parsed, for text-action policies and for other roles.
    reward: for assistant turns, the reward the agent gave this turn when it gave one per turn
        (finite; see `token_batch.turn_rewards`); None otherwise, and always None for other roles.
    """

    role: str
    text: str
    start: int
    end: int
    tool_name: str | None = None
    tool_ok: bool | None = None
    finish_reason: str | None = None
    parse_error: str | None = None
    reward: float | None = None


@dataclass
class Sampling:
    """What the token sampler was asked for one episode (the trajectory's `sampling` column).

    temperature: softmax temperature T of every policy turn; the sampled distribution is
        softmax(logits / T), and 0 means greedy (argmax, log-probs recorded at T = 1).
    top_p: nucleus-sampling mass (1.0 = the full distribution).
    max_tokens_per_turn: the per-turn token cap the token sampler was given.
    backend: which token sampler produced the tokens (e.g. "hf", the in-process one).
    policy_version: the policy version (optimizer steps taken) the token sampler's weights had.
    """

    temperature: float
    top_p: float
    max_tokens_per_turn: int
    backend: str
    policy_version: int


@dataclass
class Episode:
    """One multi-turn episode with lineage, tokens, masks, log-probs and reward.

    `sampling` is what the token sampler was asked (`Sampling`); None when it was not recorded (batches
    of schema version 1, hand-built episodes): the trainer then assumes its own temperature.
    `segment` is the 0-based index of this row among the rows of one rollout (rows sharing
    `group_id` and `sample_index`): an external agent's rollout whose model calls could not all be
    stitched into one token sequence gives several rows, each carrying the rollout's outcome;
    in-process episodes are always segment 0. `stitch_break` says, for segment > 0, why this segment
    could not extend the previous one; None for segment 0.
    """

    run_id: str
    iteration: int
    policy_version: int
    env_name: str
    task_id: str
    group_id: str
    sample_index: int
    tokens: list[int]
    loss_mask: list[int]
    behavior_logprobs: list[float]
    turns: list[Turn]
    reward: float
    reward_components: dict[str, float]
    success: bool
    finish_reason: str
    env_error: str | None = None
    attempts: int = 1
    schema_version: int = SCHEMA_VERSION
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    sampling: Sampling | None = None
    segment: int = 0
    stitch_break: str | None = None

    @property
    def num_turns(self) -> int:
        """Policy turns taken (assistant turns)."""
        return sum(1 for t in self.turns if t.role == "assistant")

    @property
    def prompt_tokens(self) -> int:
        """Tokens before the first generated token (system + user prompt)."""
        first = next((t.start for t in self.turns if t.role == "assistant"), len(self.tokens))
        return first

    @property
    def response_tokens(self) -> int:
        """Tokens the policy generated (loss_mask == 1)."""
        return int(sum(self.loss_mask))


def _required(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _list_of(type_: pa.DataType) -> pa.DataType:
    """A list whose items are never null."""
    return pa.list_(pa.field("item", type_, nullable=False))


TURN_TYPE = pa.struct(
    [
        _required("role", pa.string()),
        _required("text", pa.string()),
        _required("start", pa.int32()),
        _required("end", pa.int32()),
        pa.field("tool_name", pa.string()),
        pa.field("tool_ok", pa.bool_()),
        pa.field("finish_reason", pa.string()),
        pa.field("parse_error", pa.string()),  # null: parsed, a text action, or not an assistant turn
        pa.field("reward", pa.float64()),  # null: no per-turn reward given, or not an assistant turn
    ]
)

# Schema version 3: turns without `reward`.
TURN_TYPE_V3 = pa.struct([f for f in TURN_TYPE if f.name != "reward"])
# Schema versions 1 and 2: turns without `parse_error` either.
TURN_TYPE_V2 = pa.struct([f for f in TURN_TYPE_V3 if f.name != "parse_error"])

SAMPLING_TYPE = pa.struct(
    [
        _required("temperature", pa.float64()),
        _required("top_p", pa.float64()),
        _required("max_tokens_per_turn", pa.int32()),
        _required("backend", pa.string()),
        _required("policy_version", pa.int64()),
    ]
)

TRAJECTORY_SCHEMA = pa.schema(
    [
        _required("run_id", pa.string()),
        _required("iteration", pa.int64()),
        _required("policy_version", pa.int64()),
        _required("env_name", pa.string()),
        _required("task_id", pa.string()),
        _required("group_id", pa.string()),
        _required("sample_index", pa.int32()),
        _required("segment", pa.int32()),
        pa.field("stitch_break", pa.string()),  # null: segment 0
        _required("tokens", _list_of(pa.int32())),
        _required("loss_mask", _list_of(pa.int8())),
        _required("behavior_logprobs", _list_of(pa.float32())),
        _required("turns", _list_of(TURN_TYPE)),
        _required("num_turns", pa.int32()),
        _required("prompt_tokens", pa.int32()),
        _required("response_tokens", pa.int32()),
        _required("reward", pa.float64()),
        _required(
            "reward_components",
            pa.map_(pa.string(), pa.field("value", pa.float64(), nullable=False)),
        ),
        _required("success", pa.bool_()),
        _required("finish_reason", pa.string()),
        pa.field("sampling", SAMPLING_TYPE),  # null: not recorded (schema version 1, hand-built episodes)
        pa.field("env_error", pa.string()),
        _required("attempts", pa.int32()),
        _required("schema_version", pa.int32()),
        _required("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

# Schema version 3: no `segment` or `stitch_break`, turns without `reward`.
TRAJECTORY_SCHEMA_V3 = pa.schema(
    [
        _required("turns", _list_of(TURN_TYPE_V3)) if f.name == "turns" else f
        for f in TRAJECTORY_SCHEMA
        if f.name not in ("segment", "stitch_break")
    ]
)
# Schema version 2: version 3 with turns without `parse_error`.
TRAJECTORY_SCHEMA_V2 = pa.schema(
    [_required("turns", _list_of(TURN_TYPE_V2)) if f.name == "turns" else f for f in TRAJECTORY_SCHEMA_V3]
)
# Schema version 1: version 2 without `sampling`.
TRAJECTORY_SCHEMA_V1 = pa.schema([f for f in TRAJECTORY_SCHEMA_V2 if f.name != "sampling"])

# The Arrow schema of each schema version this code reads.
SCHEMAS_BY_VERSION = {
    1: TRAJECTORY_SCHEMA_V1,
    2: TRAJECTORY_SCHEMA_V2,
    3: TRAJECTORY_SCHEMA_V3,
    SCHEMA_VERSION: TRAJECTORY_SCHEMA,
}


def upgrade_table(table: pa.Table, version: int) -> pa.Table:
    """A table written with schema `version` as a `TRAJECTORY_SCHEMA` table (same rows, same order).

    Versions 1, 2 and 3 get `segment` 0 and a null `stitch_break` on every row (each was one whole
    episode) and a null `reward` in every `turns` struct (no per-turn reward recorded); versions 1
    and 2 also get a null `parse_error` in every `turns` struct (not recorded); version 1 also gets a
    null `sampling` column (the token sampler's settings were not recorded). The current version is
    returned as is. Raises ValueError for a version with no upgrade path.
    """
    if version == SCHEMA_VERSION:
        return table
    if version not in (1, 2, 3):
        raise ValueError(f"no upgrade from trajectory schema version {version} to {SCHEMA_VERSION}")
    table = _with_turn_fields(_with_segments(table))
    return _with_sampling(table) if version == 1 else table


def _insert_after(table: pa.Table, previous: str, name: str, values: pa.Array) -> pa.Table:
    """`table` with column `name` (its `TRAJECTORY_SCHEMA` field, holding `values`) right after column
    `previous`, or last when `table` has no `previous`."""
    names = table.column_names
    position = names.index(previous) + 1 if previous in names else len(names)
    return table.add_column(position, TRAJECTORY_SCHEMA.field(name), values)


def _with_sampling(table: pa.Table) -> pa.Table:
    """`table` with a null `sampling` column at its place in `TRAJECTORY_SCHEMA` (after `finish_reason`)."""
    return _insert_after(table, "finish_reason", "sampling", pa.nulls(table.num_rows, SAMPLING_TYPE))


def _with_segments(table: pa.Table) -> pa.Table:
    """`table` with what it lacks of `segment` (0 on every row) and `stitch_break` (null), after `sample_index`."""
    if "segment" not in table.column_names:
        zeros = pa.array(np.zeros(table.num_rows, dtype=np.int32), type=pa.int32())
        table = _insert_after(table, "sample_index", "segment", zeros)
    if "stitch_break" not in table.column_names:
        table = _insert_after(table, "segment", "stitch_break", pa.nulls(table.num_rows, pa.string()))
    return table


def _with_turn_fields(table: pa.Table) -> pa.Table:
    """`table` with its `turns` column as list<TURN_TYPE>: fields an older struct lacks (`parse_error`,
    `reward`) are null on every turn."""
    position = table.schema.get_field_index("turns")
    return table.set_column(position, TRAJECTORY_SCHEMA.field("turns"), _turns_upgraded(table.column("turns")))


def _turns_upgraded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An older `turns` column (list<TURN_TYPE_V2> or list<TURN_TYPE_V3>) as list<TURN_TYPE>, the
    fields its structs lack null."""
    chunks = []
    for chunk in column.chunks:
        # offsets index the unsliced child `values`, so sliced chunks keep their rows
        values = chunk.values
        present = {f.name for f in values.type}
        children = [values.field(f.name) if f.name in present else pa.nulls(len(values), f.type) for f in TURN_TYPE]
        mask = values.is_null() if values.null_count else None
        structs = pa.StructArray.from_arrays(children, fields=list(TURN_TYPE), mask=mask)
        mask = chunk.is_null() if chunk.null_count else None
        chunks.append(pa.ListArray.from_arrays(chunk.offsets, structs, type=_list_of(TURN_TYPE), mask=mask))
    return pa.chunked_array(chunks, type=_list_of(TURN_TYPE))


# Columns computed from `Episode` properties: written for readers, recomputed on load.
DERIVED_COLUMNS = ("num_turns", "prompt_tokens", "response_tokens")

_NUMERIC_LIST_COLUMNS = ("tokens", "loss_mask", "behavior_logprobs")


def check_episode(ep: Episode) -> None:
    """Raise ValueError, naming the field, if `ep` cannot be a valid trajectory row."""
    where = f"episode {ep.group_id}/{ep.sample_index} (task {ep.task_id})"
    n = len(ep.tokens)
    for name in ("loss_mask", "behavior_logprobs"):
        if len(getattr(ep, name)) != n:
            raise ValueError(f"{where}: {name} has {len(getattr(ep, name))} entries but tokens has {n}")
    if any(m not in (0, 1) for m in ep.loss_mask):
        raise ValueError(f"{where}: loss_mask must hold only 0 and 1")
    if ep.finish_reason not in FINISH_REASONS:
        raise ValueError(f"{where}: finish_reason {ep.finish_reason!r} is not one of {FINISH_REASONS}")
    if ep.segment < 0:
        raise ValueError(f"{where}: segment must be >= 0, got {ep.segment!r}")
    if ep.segment == 0 and ep.stitch_break is not None:
        raise ValueError(f"{where}: stitch_break must be None on segment 0, got {ep.stitch_break!r}")
    for i, turn in enumerate(ep.turns):
        if not 0 <= turn.start <= turn.end <= n:
            raise ValueError(f"{where}: turns[{i}] span [{turn.start}, {turn.end}) is out of range for {n} tokens")
        if turn.reward is not None:
            if turn.role != "assistant":
                raise ValueError(
                    f"{where}: turns[{i}].reward is set on a {turn.role!r} turn; only assistant turns carry one"
                )
            if not math.isfinite(turn.reward):
                raise ValueError(f"{where}: turns[{i}].reward must be finite, got {turn.reward!r}")
    if ep.created_at.tzinfo is None or ep.created_at.utcoffset() is None:
        raise ValueError(f"{where}: created_at must be timezone-aware, got {ep.created_at!r}")
    if ep.sampling is not None:
        _check_sampling(where, ep.sampling)


def _check_sampling(where: str, sampling: Sampling) -> None:
    """Raise ValueError, naming the field, for token-sampler settings no token sampler can have used."""
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise ValueError(f"{where}: sampling.temperature must be finite and >= 0, got {sampling.temperature!r}")
    if not 0 < sampling.top_p <= 1:
        raise ValueError(f"{where}: sampling.top_p must lie in (0, 1], got {sampling.top_p!r}")
    if sampling.max_tokens_per_turn < 1:
        raise ValueError(f"{where}: sampling.max_tokens_per_turn must be >= 1, got {sampling.max_tokens_per_turn!r}")


def _column_values(episodes: list[Episode], name: str) -> list:
    if name == "turns":
        return [[asdict(t) for t in ep.turns] for ep in episodes]
    if name == "reward_components":
        return [list(ep.reward_components.items()) for ep in episodes]
    if name == "sampling":
        return [None if ep.sampling is None else asdict(ep.sampling) for ep in episodes]
    return [getattr(ep, name) for ep in episodes]


def _find_null(array: pa.Array, type_: pa.DataType, path: str) -> str | None:
    """Path of the first nested non-nullable child of `array` that holds a null, if any."""
    if pa.types.is_map(type_):
        children = [(array.keys, type_.key_field), (array.items, type_.item_field)]
    elif pa.types.is_list(type_):
        children = [(array.flatten(), type_.value_field)]
    elif pa.types.is_struct(type_):
        children = [(array.field(i), type_.field(i)) for i in range(type_.num_fields)]
    else:
        return None
    for child, child_field in children:
        child_path = f"{path}.{child_field.name}"
        if not child_field.nullable and child.null_count:
            return child_path
        found = _find_null(child, child_field.type, child_path)
        if found:
            return found
    return None


def _reject_nulls(table: pa.Table) -> None:
    """Arrow does not enforce nullability when building arrays; enforce it here."""
    for schema_field, column in zip(table.schema, table.columns):
        if not schema_field.nullable and column.null_count:
            raise ValueError(f"column {schema_field.name} holds a null but is not nullable")
        for chunk in column.chunks:
            found = _find_null(chunk, schema_field.type, schema_field.name)
            if found:
                raise ValueError(f"{found} holds a null but is not nullable")


def episodes_to_table(episodes: Iterable[Episode]) -> pa.Table:
    """Episodes as a table with exactly `TRAJECTORY_SCHEMA` (never inferred); checks each."""
    episodes = list(episodes)
    for ep in episodes:
        check_episode(ep)
    arrays = [pa.array(_column_values(episodes, f.name), type=f.type) for f in TRAJECTORY_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=TRAJECTORY_SCHEMA)
    _reject_nulls(table)
    return table


def _numeric_lists(column: pa.ChunkedArray) -> list[list]:
    """A list<number> column as Python lists, via numpy (much faster than to_pylist)."""
    lists: list[list] = []
    for chunk in column.chunks:
        if len(chunk) == 0:
            continue
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        ends = np.cumsum(chunk.value_lengths().to_numpy(zero_copy_only=False))
        lists.extend(part.tolist() for part in np.split(flat, ends[:-1]))
    return lists


def _python_values(table: pa.Table, name: str) -> list:
    column = table.column(name)
    if name in _NUMERIC_LIST_COLUMNS:
        return _numeric_lists(column)
    values = column.to_pylist()
    if name == "turns":
        return [[Turn(**t) for t in turns] for turns in values]
    if name == "reward_components":
        return [dict(pairs) for pairs in values]
    if name == "sampling":
        return [None if value is None else Sampling(**value) for value in values]
    if name == "created_at":
        return [ts.astimezone(timezone.utc) for ts in values]
    return values


def table_to_episodes(table: pa.Table) -> list[Episode]:
    """Episodes from a trajectory table; extra columns are ignored, derived ones recomputed.

    A table of an older schema version is upgraded first, as `upgrade_table` does, by what it
    lacks: a table without the `sampling` column (version 1) gives `sampling=None`, turns without
    `parse_error` (versions 1 and 2) give `parse_error=None`, turns without `reward` (versions 1 to
    3) give `reward=None`, and a table without `segment` / `stitch_break` (versions 1 to 3) gives
    `segment=0`, `stitch_break=None`.
    """
    if not table.schema.field("turns").type.value_type.equals(TURN_TYPE):
        table = _with_turn_fields(table)
    if "sampling" not in table.column_names:
        table = _with_sampling(table)
    table = _with_segments(table)
    names = [f.name for f in fields(Episode)]
    columns = {name: _python_values(table, name) for name in names}
    return [Episode(**{name: columns[name][row] for name in names}) for row in range(table.num_rows)]
