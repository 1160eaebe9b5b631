"""The committed batch's file format: the manifest, and the integrity check of a batch against it.

A batch is a Parquet file (zstd) holding one row per episode in `TRAJECTORY_SCHEMA`, and a
JSON manifest beside it (`iteration-NNNNNN.manifest.json`, the commit marker) recording the
file's name, size in bytes, sha256, row count, schema version and commit time. Only
`rl_core.store` reads and writes these files; everything else asks `TrajectoryStore`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl_core.trajectory import SCHEMAS_BY_VERSION, upgrade_table

# Schema versions this code can read: each has its Arrow schema in SCHEMAS_BY_VERSION and an
# upgrade to the current TRAJECTORY_SCHEMA in `upgrade_table` (1: no `sampling` column; 1 and 2: no
# `parse_error` in the `turns` structs; 1 to 3: no `segment` and `stitch_break` columns and no turn `reward`).
KNOWN_SCHEMA_VERSIONS = frozenset(SCHEMAS_BY_VERSION)

MANIFEST_SUFFIX = ".manifest.json"
PARQUET_SUFFIX = ".parquet"


class StoreError(Exception):
    """Base class for trajectory store failures."""


class TrajectoryNotFoundError(StoreError):
    """No committed batch (no manifest) for the requested run and iteration."""


class TrajectoryExistsError(StoreError):
    """A committed batch already exists; the store never overwrites one."""


class CorruptTrajectoryError(StoreError):
    """A committed batch does not match its manifest or the trajectory schema."""


@dataclass(frozen=True)
class Manifest:
    """What a committed batch must look like; `file` is a name in the manifest's folder,
    `bytes` its size, `sha256` the hex digest of its bytes, `rows` its episodes."""

    run_id: str
    iteration: int
    file: str
    rows: int
    sha256: str
    bytes: int
    schema_version: int
    created_at: datetime

    def to_dict(self) -> dict:
        return {**asdict(self), "created_at": self.created_at.isoformat()}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        """Parse a manifest dict; raises ValueError on missing fields or bad values."""
        missing = sorted(set(cls.__dataclass_fields__) - set(data))
        if missing:
            raise ValueError(f"manifest is missing fields {missing}")
        file = str(data["file"])
        if Path(file).name != file:
            raise ValueError(f"manifest file {file!r} must be a bare file name")
        created_at = datetime.fromisoformat(data["created_at"])
        if created_at.tzinfo is None:
            raise ValueError(f"manifest created_at {data['created_at']!r} has no timezone")
        return cls(
            run_id=str(data["run_id"]),
            iteration=int(data["iteration"]),
            file=file,
            rows=int(data["rows"]),
            sha256=str(data["sha256"]),
            bytes=int(data["bytes"]),
            schema_version=int(data["schema_version"]),
            created_at=created_at,
        )

    def to_bytes(self) -> bytes:
        """The manifest file's content: sorted, indented JSON and a trailing newline."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` encoded as the batch's Parquet file (zstd), in memory: the exact bytes to write and hash."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_manifest(path: Path) -> Manifest:
    """The manifest at `path`; TrajectoryNotFoundError when missing, CorruptTrajectoryError when unreadable."""
    if not path.is_file():
        raise TrajectoryNotFoundError(f"{path} is missing: no committed trajectories there")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptTrajectoryError(f"{path}: unreadable manifest: {err}") from err


def read_verified(manifest_path: Path) -> tuple[Manifest, pa.Table]:
    """Load a batch from disk and check it against its manifest and `TRAJECTORY_SCHEMA`.

    The file is read once; its size and sha256 are checked on the very bytes that are parsed.
    Returns the table upgraded to the current schema. Raises CorruptTrajectoryError naming the
    file and the problem (unknown schema version, missing file, size, sha256, schema or row count
    mismatch, not Parquet), TrajectoryNotFoundError without a manifest."""
    manifest = load_manifest(manifest_path)
    data_path = manifest_path.parent / manifest.file

    def corrupt(problem: str) -> CorruptTrajectoryError:
        return CorruptTrajectoryError(f"{data_path}: {problem}")

    if manifest.schema_version not in KNOWN_SCHEMA_VERSIONS:
        raise corrupt(
            f"unknown schema_version {manifest.schema_version} (this code reads {sorted(KNOWN_SCHEMA_VERSIONS)})"
        )
    if not data_path.is_file():
        raise corrupt(f"data file is missing but {manifest_path.name} commits it")
    data = data_path.read_bytes()  # hash and parse the very same bytes
    if len(data) != manifest.bytes:
        raise corrupt(
            f"size mismatch: {len(data)} bytes on disk, manifest says {manifest.bytes} "
            "(file was truncated or modified after writing)"
        )
    if sha256_hex(data) != manifest.sha256:
        raise corrupt("sha256 mismatch: file was modified or truncated after writing")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise corrupt(f"not readable as Parquet: {err}") from err
    expected = SCHEMAS_BY_VERSION[manifest.schema_version]
    if not table.schema.equals(expected):
        raise corrupt(
            f"schema mismatch:\n{table.schema}\nexpected the trajectory schema of version "
            f"{manifest.schema_version}:\n{expected}"
        )
    if table.num_rows != manifest.rows:
        raise corrupt(f"row count mismatch: {table.num_rows} rows, manifest says {manifest.rows}")
    return manifest, upgrade_table(table, manifest.schema_version)
