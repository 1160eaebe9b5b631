"""Trajectory record and store: exact round trips, atomic commits, corruption detection."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl_core.store import (
    CorruptTrajectoryError,
    Manifest,
    TrajectoryExistsError,
    TrajectoryNotFoundError,
    TrajectoryStore,
)
from rl_core.trajectory import (
    SCHEMA_VERSION,
    TRAJECTORY_SCHEMA,
    Episode,
    Turn,
    check_episode,
    episodes_to_table,
    table_to_episodes,
)

RUN = "run-test"
T0 = datetime(2025, 3, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)


def _logprobs(rng: np.random.Generator, n: int) -> list[float]:
    """Float32-exact negative log-probs, as a sampler would produce."""
    return [float(x) for x in (-rng.exponential(0.5, size=n)).astype(np.float32)]


def make_episode(
    sample_index: int = 0,
    *,
    iteration: int = 1,
    finish_reason: str = "answered",
    env_error: str | None = None,
    tool_ok: bool | None = True,
) -> Episode:
    """A tool-using episode: prompt, assistant call, tool result, assistant answer."""
    rng = np.random.default_rng(sample_index)
    segments = [  # (role, text, length, generated, tool_name, tool_ok, finish_reason)
        ("system", "You are a calculator agent.", 6, False, None, None, None),
        ("user", "What is 17 * 23?", 5, False, None, None, None),
        ("assistant", '<tool>calc("17*23")</tool>', 7 + sample_index, True, None, None, "stop"),
        ("tool", "391", 2, False, "calc", tool_ok, None),
        ("assistant", "The answer is 391.", 4, True, None, None, "stop"),
    ]
    tokens, loss_mask, logprobs, turns = [], [], [], []
    for role, text, length, generated, tool_name, ok, reason in segments:
        start = len(tokens)
        tokens += rng.integers(0, 150_000, size=length).tolist()
        loss_mask += [1 if generated else 0] * length
        logprobs += _logprobs(rng, length) if generated else [0.0] * length
        turns.append(Turn(role, text, start, len(tokens), tool_name, ok, reason))
    reward = 1.0 if finish_reason == "answered" else 0.0
    return Episode(
        run_id=RUN,
        iteration=iteration,
        policy_version=iteration - 1,
        env_name="calculator",
        task_id="calc-0007",
        group_id=f"calc-0007/it{iteration}",
        sample_index=sample_index,
        tokens=tokens,
        loss_mask=loss_mask,
        behavior_logprobs=logprobs,
        turns=turns,
        reward=reward,
        reward_components={"correct": reward, "format": 0.25 * sample_index},
        success=reward >= 1.0,
        finish_reason=finish_reason,
        env_error=env_error,
        attempts=1 if env_error is None else 3,
        created_at=T0 + timedelta(seconds=sample_index),
    )


def make_batch(iteration: int = 1) -> list[Episode]:
    return [
        make_episode(0, iteration=iteration),
        make_episode(1, iteration=iteration, tool_ok=None),
        make_episode(2, iteration=iteration, tool_ok=False, finish_reason="max_turns"),
        make_episode(3, iteration=iteration, finish_reason="env_error", env_error="ConnectionError: sandbox"),
    ]


@pytest.fixture
def store(tmp_path: Path) -> TrajectoryStore:
    return TrajectoryStore(tmp_path)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- round trip and schema ----------------------------------------------------------------


def test_round_trip_preserves_every_field(store: TrajectoryStore) -> None:
    written = make_batch()
    store.write(RUN, 1, written)
    read = store.read(RUN, 1)

    assert len(read) == len(written)
    for original, loaded in zip(written, read):
        for f in dataclasses.fields(Episode):
            assert getattr(loaded, f.name) == getattr(original, f.name), f.name
        assert loaded.num_turns == original.num_turns == 2
        assert loaded.prompt_tokens == original.prompt_tokens == 11
        assert loaded.response_tokens == original.response_tokens
    assert read == written

    assert read[0].env_error is None
    assert read[3].env_error == "ConnectionError: sandbox"
    assert read[1].turns[3].tool_ok is None
    assert read[2].turns[3].tool_ok is False
    assert read[0].turns[0].tool_name is None and read[0].turns[3].tool_name == "calc"
    assert read[2].reward_components == {"correct": 0.0, "format": 0.5}
    assert read[1].created_at == T0 + timedelta(seconds=1)
    assert read[1].created_at.utcoffset() == timedelta(0)
    assert isinstance(read[0].tokens[0], int) and isinstance(read[0].behavior_logprobs[-1], float)


def test_written_file_has_exact_schema_and_derived_columns(store: TrajectoryStore) -> None:
    episodes = make_batch()
    store.write(RUN, 1, episodes)
    path = store.path(RUN, 1)

    assert pq.read_schema(path).equals(TRAJECTORY_SCHEMA)
    table = store.read_table(RUN, 1)
    assert table.schema.equals(TRAJECTORY_SCHEMA)
    assert table.column("num_turns").to_pylist() == [2, 2, 2, 2]
    assert table.column("prompt_tokens").to_pylist() == [11, 11, 11, 11]
    assert table.column("response_tokens").to_pylist() == [e.response_tokens for e in episodes]
    assert table.column("schema_version").to_pylist() == [SCHEMA_VERSION] * 4


def test_table_round_trip_without_store() -> None:
    episodes = make_batch()
    assert table_to_episodes(episodes_to_table(episodes)) == episodes


def test_schema_marks_required_fields() -> None:
    nullable = {f.name for f in TRAJECTORY_SCHEMA if f.nullable}
    assert nullable == {"env_error", "sampling", "stitch_break"}
    turn_type = TRAJECTORY_SCHEMA.field("turns").type.value_type
    nullable_turn_fields = {"tool_name", "tool_ok", "finish_reason", "parse_error", "reward"}
    assert {f.name for f in turn_type if f.nullable} == nullable_turn_fields
    assert TRAJECTORY_SCHEMA.field("created_at").type == pa.timestamp("us", tz="UTC")


# -- manifest -----------------------------------------------------------------------------


def test_manifest_records_rows_sha256_and_size(store: TrajectoryStore) -> None:
    manifest = store.write(RUN, 3, make_batch(iteration=3))
    data = store.path(RUN, 3).read_bytes()

    assert store.path(RUN, 3) == store.root / RUN / "trajectories" / "iteration-000003.parquet"
    assert manifest.file == "iteration-000003.parquet"
    assert (manifest.run_id, manifest.iteration, manifest.rows) == (RUN, 3, 4)
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.bytes == len(data)
    assert manifest.schema_version == SCHEMA_VERSION
    on_disk = json.loads(store.manifest_path(RUN, 3).read_text())
    assert Manifest.from_dict(on_disk) == manifest == store.manifest(RUN, 3)
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    assert store.manifest_path(RUN, 3).name == "iteration-000003.manifest.json"


def test_iterations_lists_committed_batches_only(store: TrajectoryStore) -> None:
    for it in (2, 1, 10):
        store.write(RUN, it, make_batch(iteration=it))
    pq.write_table(episodes_to_table(make_batch(iteration=4)), store.path(RUN, 4))  # no manifest

    assert store.iterations(RUN) == [1, 2, 10]
    assert store.exists(RUN, 2) and not store.exists(RUN, 4)
    assert store.iterations("other-run") == []


# -- corruption ---------------------------------------------------------------------------


def test_flipped_byte_is_rejected(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    path = store.path(RUN, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(CorruptTrajectoryError, match="sha256 mismatch") as err:
        store.read(RUN, 1)
    assert str(path) in str(err.value)


def test_truncated_file_is_rejected(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    path = store.path(RUN, 1)
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CorruptTrajectoryError, match="size mismatch") as err:
        store.read_table(RUN, 1)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("rows", 5, "row count mismatch"),
        ("schema_version", 99, "unknown schema_version 99"),
        ("iteration", 2, "manifest names run"),
    ],
)
def test_manifest_disagreement_is_rejected(store: TrajectoryStore, field: str, value: int, problem: str) -> None:
    store.write(RUN, 1, make_batch())
    manifest_path = store.manifest_path(RUN, 1)
    data = json.loads(manifest_path.read_text())
    data[field] = value
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(CorruptTrajectoryError, match=problem):
        store.read(RUN, 1)


def test_foreign_schema_is_rejected_even_with_matching_hash(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    path = store.path(RUN, 1)
    table = store.read_table(RUN, 1).drop_columns(["success"])
    pq.write_table(table, path)
    manifest_path = store.manifest_path(RUN, 1)
    data = json.loads(manifest_path.read_text())
    data.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(CorruptTrajectoryError, match="schema mismatch"):
        store.read(RUN, 1)


def test_missing_data_file_is_corrupt(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    store.path(RUN, 1).unlink()
    with pytest.raises(CorruptTrajectoryError, match="data file is missing"):
        store.read(RUN, 1)


def test_parquet_without_manifest_is_not_found(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    store.manifest_path(RUN, 1).unlink()  # as if the writer died before committing

    assert not store.exists(RUN, 1)
    assert store.iterations(RUN) == []
    with pytest.raises(TrajectoryNotFoundError, match="never committed"):
        store.read(RUN, 1)
    with pytest.raises(TrajectoryNotFoundError):
        store.manifest(RUN, 1)
    with pytest.raises(TrajectoryNotFoundError):
        store.read(RUN, 7)


# -- writes -------------------------------------------------------------------------------


def test_overwrite_is_refused_and_original_left_intact(store: TrajectoryStore) -> None:
    original = make_batch()
    store.write(RUN, 1, original)
    data_before = store.path(RUN, 1).read_bytes()
    manifest_before = store.manifest_path(RUN, 1).read_bytes()

    with pytest.raises(TrajectoryExistsError, match="never overwritten"):
        store.write(RUN, 1, make_batch()[:2])

    assert store.path(RUN, 1).read_bytes() == data_before
    assert store.manifest_path(RUN, 1).read_bytes() == manifest_before
    assert store.read(RUN, 1) == original
    assert _files(store.path(RUN, 1).parent) == [
        "iteration-000001.manifest.json",
        "iteration-000001.parquet",
    ]


def test_write_that_fails_midway_leaves_no_temp_files(store: TrajectoryStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def write_half_then_fail(table, where, **kwargs):
        where.write(b"PAR1 partial row group")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.write(RUN, 1, make_batch())
    monkeypatch.undo()

    assert _files(store.path(RUN, 1).parent) == []
    assert not store.exists(RUN, 1)
    store.write(RUN, 1, make_batch())  # a retry succeeds
    assert store.read(RUN, 1) == make_batch()


def test_write_that_fails_at_commit_leaves_no_temp_files(
    store: TrajectoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_link(src, dst):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "link", fail_link)
    with pytest.raises(OSError, match="I/O error"):
        store.write(RUN, 1, make_batch())
    monkeypatch.undo()

    assert not any(name.endswith(".tmp") for name in _files(store.path(RUN, 1).parent))
    assert not store.exists(RUN, 1)
    store.write(RUN, 1, make_batch())  # the uncommitted data file is replaced
    assert store.read(RUN, 1) == make_batch()


def test_write_rejects_episodes_from_another_batch(store: TrajectoryStore) -> None:
    with pytest.raises(ValueError, match=r"episodes\[0\]\.iteration"):
        store.write(RUN, 2, make_batch(iteration=1))
    with pytest.raises(ValueError, match=r"episodes\[0\]\.run_id"):
        store.write("another-run", 1, make_batch())
    with pytest.raises(ValueError, match="empty batch"):
        store.write(RUN, 1, [])
    with pytest.raises(ValueError, match="run_id"):
        store.path("../escape", 1)
    assert not (store.root / RUN).exists()


# -- episode checks -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["loss_mask", "behavior_logprobs"])
def test_check_episode_rejects_mismatched_lengths(field: str) -> None:
    ep = make_episode()
    getattr(ep, field).pop()
    with pytest.raises(ValueError, match=f"{field} has {len(ep.tokens) - 1} entries"):
        check_episode(ep)
    with pytest.raises(ValueError, match=field):
        episodes_to_table([ep])


def test_check_episode_rejects_bad_values() -> None:
    ep = make_episode()
    ep.finish_reason = "gave_up"
    with pytest.raises(ValueError, match="finish_reason 'gave_up'"):
        check_episode(ep)

    ep = make_episode()
    ep.turns[-1].end = len(ep.tokens) + 1
    with pytest.raises(ValueError, match=r"turns\[4\] span"):
        check_episode(ep)

    ep = make_episode()
    ep.loss_mask[0] = 2
    with pytest.raises(ValueError, match="loss_mask must hold only 0 and 1"):
        check_episode(ep)

    ep = make_episode()
    ep.created_at = datetime(2025, 1, 1)
    with pytest.raises(ValueError, match="created_at must be timezone-aware"):
        check_episode(ep)


def test_nulls_in_required_fields_are_rejected() -> None:
    ep = make_episode()
    ep.tokens[3] = None
    with pytest.raises(ValueError, match=r"tokens\.item holds a null"):
        episodes_to_table([ep])

    ep = make_episode()
    ep.turns[0].text = None
    with pytest.raises(ValueError, match=r"turns\.item\.text holds a null"):
        episodes_to_table([ep])


# -- quarantine ---------------------------------------------------------------------------


def test_quarantine_moves_both_files_and_unlists_the_batch(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    store.write(RUN, 2, make_batch(iteration=2))
    data_bytes = store.path(RUN, 1).read_bytes()

    moved = store.quarantine(RUN, 1, "reward out of range in 4/4 rows")

    assert moved == store.root / RUN / "quarantine" / "iteration-000001" / moved.name
    assert _files(moved.parent) == [
        "iteration-000001.manifest.json",
        "iteration-000001.parquet",
        "reason.txt",
    ]
    assert (moved.parent / "iteration-000001.parquet").read_bytes() == data_bytes
    assert "reward out of range in 4/4 rows" in (moved.parent / "reason.txt").read_text()
    assert not store.path(RUN, 1).exists() and not store.exists(RUN, 1)
    assert store.iterations(RUN) == [2]
    with pytest.raises(TrajectoryNotFoundError):
        store.read(RUN, 1)
    assert table_to_episodes(store.read_manifest_path(moved)) == make_batch()

    store.write(RUN, 1, make_batch())  # the iteration can be redone and quarantined again
    again = store.quarantine(RUN, 1, "second try failed too")
    assert again.parent.name == "iteration-000001-2"
    with pytest.raises(TrajectoryNotFoundError):
        store.quarantine(RUN, 1, "nothing left")


def test_quarantine_accepts_a_corrupt_batch(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    store.manifest_path(RUN, 1).write_text("{not json")
    with pytest.raises(CorruptTrajectoryError, match="unreadable manifest"):
        store.read(RUN, 1)

    moved = store.quarantine(RUN, 1, "manifest unreadable")
    assert (moved.parent / "iteration-000001.parquet").exists()
    assert store.iterations(RUN) == []


def test_a_quarantine_cut_short_by_a_crash_is_finished_not_repeated(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    data_bytes = store.path(RUN, 1).read_bytes()
    # the crash: the quarantine folder was made and the manifest moved, the data file never followed
    folder = store.root / RUN / "quarantine" / "iteration-000001"
    folder.mkdir(parents=True)
    store.manifest_path(RUN, 1).rename(folder / store.manifest_path(RUN, 1).name)
    assert store.path(RUN, 1).exists() and not store.exists(RUN, 1)

    moved = store.quarantine(RUN, 1, "finished after the crash")

    assert moved == folder / "iteration-000001.manifest.json"
    assert (folder / "iteration-000001.parquet").read_bytes() == data_bytes
    assert not store.path(RUN, 1).exists()
    assert [p.parent.name for p in store.quarantined(RUN, 1)] == ["iteration-000001"]
    assert table_to_episodes(store.read_manifest_path(moved)) == make_batch()


def test_a_quarantine_folder_left_empty_by_a_crash_is_reused(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    (store.root / RUN / "quarantine" / "iteration-000001").mkdir(parents=True)  # crashed right after mkdir
    moved = store.quarantine(RUN, 1, "bad batch")
    assert moved.parent.name == "iteration-000001"
    assert sorted(p.name for p in (store.root / RUN / "quarantine").iterdir()) == ["iteration-000001"]


# -- commit: what was written, without reading it back -------------------------------------


def test_commit_returns_exactly_what_a_read_returns(store: TrajectoryStore) -> None:
    committed = store.commit(RUN, 1, make_batch())

    assert committed.manifest == store.manifest(RUN, 1)
    assert committed.table.equals(store.read_table(RUN, 1))
    assert committed.table.schema.equals(TRAJECTORY_SCHEMA)
    assert committed.episodes == store.read(RUN, 1)
    data = store.path(RUN, 1).read_bytes()
    assert hashlib.sha256(data).hexdigest() == committed.manifest.sha256 and len(data) == committed.manifest.bytes


def test_commit_hashes_in_memory_and_never_reads_the_batch_back(store: TrajectoryStore, monkeypatch) -> None:
    import rl_core.store.trajectory_store as trajectory_store

    def no_read(*args, **kwargs):
        raise AssertionError("commit read the batch back")

    monkeypatch.setattr(trajectory_store, "read_verified", no_read)
    monkeypatch.setattr(Path, "read_bytes", no_read)
    committed = store.commit(RUN, 2, make_batch(iteration=2))
    assert committed.episodes == table_to_episodes(committed.table)
    assert store.write(RUN, 3, make_batch(iteration=3)).iteration == 3  # write: the same commit, manifest only
    monkeypatch.undo()
    assert store.read(RUN, 2) == committed.episodes


# -- validation reports and quarantine names -------------------------------------------------


def _report(passed: bool = True):
    from rl_core.validation_report import Check, ValidationReport

    check = Check("batch_not_empty", passed, 4, ">= 1 row", "4 episodes in the batch.")
    return ValidationReport(passed, "All 1 checks passed on 4 episodes.", [check], 4, 0.25, groups=4)


def test_validation_report_lies_beside_the_batch_and_reads_back_typed(store: TrajectoryStore) -> None:
    store.write(RUN, 1, make_batch())
    assert store.read_report(RUN, 1) is None
    assert store.report_path(RUN, 1).name == "iteration-000001.validation.json"
    assert store.report_path(RUN, 1).parent == store.manifest_path(RUN, 1).parent
    assert TrajectoryStore.report_path_beside(store.manifest_path(RUN, 1)) == store.report_path(RUN, 1)

    report = _report()
    assert store.write_report(RUN, 1, report) == store.report_path(RUN, 1)
    assert store.read_report(RUN, 1) == report
    assert store.read_report(RUN, 1).check("batch_not_empty").observed == 4


def test_quarantined_batch_keeps_its_report_and_is_not_in_use(store: TrajectoryStore) -> None:
    store.write(RUN, 2, make_batch(iteration=2))
    assert TrajectoryStore.in_use(store.manifest_path(RUN, 2))
    assert store.quarantined_iterations(RUN) == []
    moved = store.quarantine(RUN, 2, "test")
    store.write(RUN, 2, make_batch(iteration=2))
    again = store.quarantine(RUN, 2, "test again")

    assert not TrajectoryStore.in_use(moved) and not TrajectoryStore.in_use(again)
    assert store.quarantined_iterations(RUN) == [2]
    assert store.quarantined(RUN, 2) == [moved, again]
    report = _report(passed=False)
    path = TrajectoryStore.write_report_beside(moved, report)
    assert path == moved.parent / "iteration-000002.validation.json"
    assert TrajectoryStore.read_report_beside(moved) == report
    assert TrajectoryStore.read_report_beside(again) is None
