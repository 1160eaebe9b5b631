"""Trajectory schema version 3: `turns[].parse_error`, and version-1/2 batches read upgraded."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_core.store import KNOWN_SCHEMA_VERSIONS, CorruptTrajectoryError, TrajectoryStore
from rl_core.trajectory import (
    SCHEMA_VERSION,
    SCHEMAS_BY_VERSION,
    TRAJECTORY_SCHEMA,
    TRAJECTORY_SCHEMA_V1,
    TRAJECTORY_SCHEMA_V2,
    TRAJECTORY_SCHEMA_V3,
    Sampling,
    episodes_to_table,
    table_to_episodes,
    upgrade_table,
)
from tests.test_store import RUN, make_batch

V2_TURN_FIELDS = ["role", "text", "start", "end", "tool_name", "tool_ok", "finish_reason"]


def with_parse_errors() -> list:
    """A batch whose first episode's first assistant turn did not parse; one episode records sampling."""
    episodes = make_batch()
    episodes[0].turns[2].parse_error = "call 1: invalid JSON (Expecting value at char 40)"
    episodes[2].turns[4].parse_error = "expected </tool_call> after the JSON object"
    episodes[1].sampling = Sampling(0.7, 1.0, 40, "hf", 0)
    return episodes


def old_table(episodes: list, version: int) -> pa.Table:
    """`episodes` as an older Turnstile wrote them: no segment or stitch_break (version 4), turns without
    reward (version 4) and parse_error (and, for 1, no sampling)."""
    table = episodes_to_table(episodes).drop_columns(["segment", "stitch_break"])
    rows = [
        [{k: v for k, v in dataclasses.asdict(t).items() if k not in ("parse_error", "reward")} for t in ep.turns]
        for ep in episodes
    ]
    turns_field = TRAJECTORY_SCHEMA_V2.field("turns")
    table = table.set_column(table.schema.get_field_index("turns"), turns_field, pa.array(rows, type=turns_field.type))
    if version == 1:
        table = table.drop_columns(["sampling"])
    table = table.set_column(
        table.schema.get_field_index("schema_version"),
        table.schema.field("schema_version"),
        pa.array([version] * len(episodes), type=pa.int32()),
    )
    return table


def expected_after_upgrade(episodes: list, version: int) -> list:
    """What an older batch of `episodes` reads back as: parse_error null (and, for 1, sampling null)."""
    expected = copy.deepcopy(episodes)
    for ep in expected:
        ep.schema_version = version
        for turn in ep.turns:
            turn.parse_error = None
        if version == 1:
            ep.sampling = None
    return expected


def rewrite_as(store: TrajectoryStore, iteration: int, table: pa.Table, version: int) -> None:
    """Replace a committed batch by `table` with a manifest of `version`, as an older Turnstile wrote it."""
    path, manifest_path = store.path(RUN, iteration), store.manifest_path(RUN, iteration)
    pq.write_table(table, path, compression="zstd")
    data = path.read_bytes()
    manifest = json.loads(manifest_path.read_text()) | {
        "schema_version": version,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    manifest_path.write_text(json.dumps(manifest))


def test_version_three_adds_a_nullable_parse_error_after_finish_reason():
    assert SCHEMA_VERSION == 4  # version 4 (test_schema_v4.py) keeps parse_error
    assert set(SCHEMAS_BY_VERSION) == set(KNOWN_SCHEMA_VERSIONS) == {1, 2, 3, 4}
    assert SCHEMAS_BY_VERSION[3] is TRAJECTORY_SCHEMA_V3
    turn_type = TRAJECTORY_SCHEMA_V3.field("turns").type.value_type
    assert [f.name for f in turn_type] == [*V2_TURN_FIELDS, "parse_error"]
    assert turn_type.field("parse_error").nullable and turn_type.field("parse_error").type == pa.string()
    assert [f.name for f in TRAJECTORY_SCHEMA_V2.field("turns").type.value_type] == V2_TURN_FIELDS
    assert TRAJECTORY_SCHEMA_V2.names == TRAJECTORY_SCHEMA_V3.names
    assert TRAJECTORY_SCHEMA_V1.names == [n for n in TRAJECTORY_SCHEMA_V3.names if n != "sampling"]
    assert TRAJECTORY_SCHEMA_V1.field("turns").equals(TRAJECTORY_SCHEMA_V2.field("turns"))


def test_a_version_three_batch_round_trips_parse_error(tmp_path):
    episodes = with_parse_errors()
    assert table_to_episodes(episodes_to_table(episodes)) == episodes
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, episodes)
    assert store.manifest(RUN, 1).schema_version == SCHEMA_VERSION
    read = store.read(RUN, 1)
    assert read == episodes
    assert read[0].turns[2].parse_error == "call 1: invalid JSON (Expecting value at char 40)"
    assert read[2].turns[4].parse_error == "expected </tool_call> after the JSON object"
    assert [t.parse_error for t in read[1].turns] == [None] * 5


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_batch_reads_back_upgraded_with_parse_error_null(tmp_path, version):
    episodes = with_parse_errors()
    table = old_table(episodes, version)
    assert table.schema.equals(SCHEMAS_BY_VERSION[version])
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, episodes)
    rewrite_as(store, 1, table, version)

    read = store.read(RUN, 1)
    assert read == expected_after_upgrade(episodes, version)
    assert all(t.parse_error is None for ep in read for t in ep.turns)
    assert (read[1].sampling is None) == (version == 1)
    upgraded = store.read_table(RUN, 1)
    assert upgraded.schema.equals(TRAJECTORY_SCHEMA)
    assert upgraded.drop_columns(["turns", "sampling", "segment", "stitch_break"]).equals(
        table.drop_columns(["turns", *(["sampling"] * (version == 2))])
    )
    # and straight from the table, without the store
    assert table_to_episodes(table) == expected_after_upgrade(episodes, version)


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_batch_that_claims_the_new_schema_or_the_other_way_round_is_corrupt(tmp_path, version):
    episodes = make_batch()
    store = TrajectoryStore(tmp_path)
    store.write(RUN, 1, episodes)
    rewrite_as(store, 1, episodes_to_table(episodes), version)  # current columns, an older manifest
    with pytest.raises(CorruptTrajectoryError, match="schema mismatch"):
        store.read(RUN, 1)
    episodes = make_batch(iteration=2)
    store.write(RUN, 2, episodes)
    rewrite_as(store, 2, old_table(episodes, version), SCHEMA_VERSION)  # older columns, a current manifest
    with pytest.raises(CorruptTrajectoryError, match="schema mismatch"):
        store.read(RUN, 2)


def test_upgrade_keeps_rows_of_sliced_and_chunked_turns():
    episodes = with_parse_errors() * 3
    for i, ep in enumerate(episodes):
        ep = episodes[i] = copy.deepcopy(ep)
        ep.sample_index = i
        ep.turns = ep.turns[: 2 + i % 4]  # lists of different lengths, so offsets matter
    table = old_table(episodes, 2)
    # chunks that are slices of the column, one of them empty, each with a non-zero offset
    chunked = pa.concat_tables([table.slice(5, 4), table.slice(9, 0), table.slice(1, 4), table.slice(9, 3)])
    assert chunked.column("turns").num_chunks == 4
    upgraded = upgrade_table(chunked, 2)
    upgraded.validate(full=True)
    assert upgraded.schema.equals(TRAJECTORY_SCHEMA)
    order = [*range(5, 9), *range(1, 5), *range(9, 12)]
    assert table_to_episodes(upgraded) == expected_after_upgrade([episodes[i] for i in order], 2)
    assert upgraded.column("turns").to_pylist() == [
        [row | {"parse_error": None, "reward": None} for row in turns] for turns in chunked.column("turns").to_pylist()
    ]


def test_upgrade_refuses_a_version_it_cannot_read():
    table = episodes_to_table(make_batch())
    assert upgrade_table(table, SCHEMA_VERSION) is table
    for version in (0, SCHEMA_VERSION + 1):
        with pytest.raises(ValueError, match=f"no upgrade from trajectory schema version {version}"):
            upgrade_table(table, version)
