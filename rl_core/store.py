"""Trajectory store: one Parquet file per (run, iteration), committed by a manifest.

Layout under `root`:
    <run_id>/trajectories/iteration-000001.parquet
    <run_id>/trajectories/iteration-000001.manifest.json   (the commit marker)
    <run_id>/quarantine/iteration-000001[-N]/               (batches taken out of use)

Contract:
- `write` is atomic: the Parquet file and then the manifest are each written to a temp file
  in the same folder, fsynced and renamed into place, then the folder is fsynced. A batch
  exists only once its manifest does; a Parquet file without one is never read.
- A committed batch is never overwritten (`TrajectoryExistsError`); a failed write leaves no
  temp files behind. At most one writer per (run_id, iteration) at a time.
- Every read verifies size, sha256, schema version, Arrow schema and row count against the
  manifest; any mismatch raises `CorruptTrajectoryError` naming the file and the problem.
  Batches of an older known schema version (KNOWN_SCHEMA_VERSIONS) are checked against that
  version's schema and returned upgraded to `TRAJECTORY_SCHEMA` (`trajectory.upgrade_table`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl_core.atomic import temp_path, write_bytes_atomically
from rl_core.trajectory import (
    SCHEMA_VERSION,
    SCHEMAS_BY_VERSION,
    Episode,
    episodes_to_table,
    table_to_episodes,
    upgrade_table,
)

# Schema versions this code can read: each has its Arrow schema in SCHEMAS_BY_VERSION and an
# upgrade to the current TRAJECTORY_SCHEMA in `upgrade_table` (1: no `sampling` column).
KNOWN_SCHEMA_VERSIONS = frozenset(SCHEMAS_BY_VERSION)

_MANIFEST_SUFFIX = ".manifest.json"
_MANIFEST_NAME = re.compile(r"^iteration-(\d+)\.manifest\.json$")


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
    """What a committed batch must look like; `file` is a name in the manifest's folder."""

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


class TrajectoryStore:
    """Committed trajectory batches under `root`, one per (run_id, iteration)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------

    def path(self, run_id: str, iteration: int) -> Path:
        """Where the batch's Parquet file lives (whether or not it is committed)."""
        return self._folder(run_id) / f"{_stem(iteration)}.parquet"

    def manifest_path(self, run_id: str, iteration: int) -> Path:
        return self._folder(run_id) / f"{_stem(iteration)}{_MANIFEST_SUFFIX}"

    def _folder(self, run_id: str) -> Path:
        return self.root / _checked_run_id(run_id) / "trajectories"

    # -- queries -----------------------------------------------------------------------

    def exists(self, run_id: str, iteration: int) -> bool:
        """True when the batch is committed (its manifest is in place)."""
        return self.manifest_path(run_id, iteration).is_file()

    def iterations(self, run_id: str) -> list[int]:
        """Committed iterations of `run_id`, ascending; uncommitted files are ignored."""
        folder = self._folder(run_id)
        if not folder.is_dir():
            return []
        matches = (_MANIFEST_NAME.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in matches if m)

    def manifest(self, run_id: str, iteration: int) -> Manifest:
        return _load_manifest(self._committed_manifest_path(run_id, iteration))

    # -- reads -------------------------------------------------------------------------

    def read(self, run_id: str, iteration: int) -> list[Episode]:
        return table_to_episodes(self.read_table(run_id, iteration))

    def read_table(self, run_id: str, iteration: int) -> pa.Table:
        """The verified batch as an Arrow table with exactly `TRAJECTORY_SCHEMA`."""
        manifest_path = self._committed_manifest_path(run_id, iteration)
        manifest, table = _read_verified(manifest_path)
        if (manifest.run_id, manifest.iteration) != (run_id, iteration):
            raise CorruptTrajectoryError(
                f"{manifest_path}: manifest names run {manifest.run_id!r} iteration "
                f"{manifest.iteration}, expected run {run_id!r} iteration {iteration}"
            )
        return table

    @staticmethod
    def manifest_at(path: Path | str) -> Manifest:
        """The manifest at `path`, wherever it lies (e.g. in quarantine); raises like `manifest`."""
        return _load_manifest(Path(path))

    @staticmethod
    def read_manifest_path(path: Path | str) -> pa.Table:
        """The verified batch a manifest commits, wherever it lies (e.g. in quarantine)."""
        return _read_verified(Path(path))[1]

    def _committed_manifest_path(self, run_id: str, iteration: int) -> Path:
        manifest_path = self.manifest_path(run_id, iteration)
        if manifest_path.is_file():
            return manifest_path
        hint = (
            f"; {self.path(run_id, iteration).name} exists but was never committed (half-written)"
            if self.path(run_id, iteration).exists()
            else ""
        )
        raise TrajectoryNotFoundError(
            f"no committed trajectories for run {run_id!r} iteration {iteration}: {manifest_path} is missing{hint}"
        )

    # -- writes ------------------------------------------------------------------------

    def write(self, run_id: str, iteration: int, episodes: Iterable[Episode]) -> Manifest:
        """Atomically commit a new batch; refuses to replace a committed one."""
        episodes = list(episodes)
        _check_lineage(run_id, iteration, episodes)
        table = episodes_to_table(episodes)
        data_path = self.path(run_id, iteration)
        manifest_path = self.manifest_path(run_id, iteration)
        if manifest_path.exists():
            raise TrajectoryExistsError(f"{manifest_path} already exists; committed trajectories are never overwritten")
        folder = data_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        data_tmp, manifest_tmp = temp_path(data_path), temp_path(manifest_path)
        try:
            _write_parquet_durably(table, data_tmp)
            manifest = Manifest(
                run_id=run_id,
                iteration=iteration,
                file=data_path.name,
                rows=table.num_rows,
                sha256=_sha256_of(data_tmp),
                bytes=data_tmp.stat().st_size,
                schema_version=SCHEMA_VERSION,
                created_at=datetime.now(timezone.utc),
            )
            _write_bytes_durably(manifest_tmp, _manifest_bytes(manifest))
            os.replace(data_tmp, data_path)  # replaces only an uncommitted leftover
            _fsync_dir(folder)
            _link_no_clobber(manifest_tmp, manifest_path)  # the commit
            _fsync_dir(folder)
        finally:
            data_tmp.unlink(missing_ok=True)
            manifest_tmp.unlink(missing_ok=True)
        return manifest

    def quarantine(self, run_id: str, iteration: int, reason: str) -> Path:
        """Move a committed batch out of use; returns the quarantined manifest's path.

        The batch goes to `<run_id>/quarantine/iteration-NNNNNN[-N]/` with a `reason.txt`.
        Moving the manifest first un-commits it atomically; the data file follows. Works on
        corrupt batches too (nothing is parsed). A quarantine cut short by a crash (manifest
        moved, data file left behind) is finished instead of started again. Raises
        TrajectoryNotFoundError if the batch is neither committed nor half-quarantined.
        """
        data_path = self.path(run_id, iteration)
        manifest_path = self.manifest_path(run_id, iteration)
        if not manifest_path.is_file():
            unfinished = self._unfinished_quarantine(run_id, iteration)
            if unfinished is None:
                self._committed_manifest_path(run_id, iteration)  # raises, naming what is missing
            if data_path.exists():
                os.replace(data_path, unfinished.parent / data_path.name)
                _fsync_dir(unfinished.parent)
            return unfinished
        target = _new_quarantine_dir(self.root / run_id / "quarantine", _stem(iteration))
        note = (
            f"run_id: {run_id}\niteration: {iteration}\n"
            f"quarantined_at: {datetime.now(timezone.utc).isoformat()}\nreason: {reason}\n"
        )
        write_bytes_atomically(target / "reason.txt", note.encode())
        os.replace(manifest_path, target / manifest_path.name)
        if data_path.exists():
            os.replace(data_path, target / data_path.name)
        _fsync_dir(manifest_path.parent)
        _fsync_dir(target)
        return target / manifest_path.name

    def quarantined(self, run_id: str, iteration: int) -> list[Path]:
        """Manifests of the iteration's quarantined batches (oldest first)."""
        folder = self.root / _checked_run_id(run_id) / "quarantine"
        stem = _stem(iteration)
        name = f"{stem}{_MANIFEST_SUFFIX}"
        found = (
            [d / name for d in folder.glob(f"{stem}*") if d.is_dir() and (d / name).is_file()]
            if folder.is_dir()
            else []
        )
        return sorted(found, key=lambda p: _quarantine_copy_number(p.parent.name, stem))

    def _unfinished_quarantine(self, run_id: str, iteration: int) -> Path | None:
        """The newest quarantined manifest of the iteration whose data file has not followed it yet."""
        for manifest in reversed(self.quarantined(run_id, iteration)):
            if not (manifest.parent / self.path(run_id, iteration).name).exists():
                return manifest
        return None


# -- helpers ---------------------------------------------------------------------------


def _stem(iteration: int) -> str:
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    return f"iteration-{iteration:06d}"


def _checked_run_id(run_id: str) -> str:
    if not run_id or run_id in (".", "..") or any(c in run_id for c in "/\\\0"):
        raise ValueError(f"run_id {run_id!r} must be a single, non-empty path component")
    return run_id


def _check_lineage(run_id: str, iteration: int, episodes: list[Episode]) -> None:
    if not episodes:
        raise ValueError(f"refusing to write an empty batch for run {run_id!r} iteration {iteration}")
    for i, ep in enumerate(episodes):
        if ep.run_id != run_id:
            raise ValueError(f"episodes[{i}].run_id is {ep.run_id!r}, expected {run_id!r}")
        if ep.iteration != iteration:
            raise ValueError(f"episodes[{i}].iteration is {ep.iteration}, expected {iteration}")


def _write_parquet_durably(table: pa.Table, path: Path) -> None:
    with open(path, "xb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())


def _write_bytes_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_no_clobber(source: Path, target: Path) -> None:
    """Give `source` the name `target` atomically, failing if `target` exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise TrajectoryExistsError(
            f"{target} appeared during the write; committed trajectories are never overwritten"
        ) from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode()


def _quarantine_copy_number(name: str, stem: str) -> int:
    suffix = name.removeprefix(stem).removeprefix("-")
    return int(suffix) if suffix.isdigit() else 1


def _new_quarantine_dir(parent: Path, stem: str) -> Path:
    """A quarantine folder for a new copy: the first free name, or one a crash left without a manifest."""
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = parent / (stem if n == 1 else f"{stem}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if not any(p.name.endswith(_MANIFEST_SUFFIX) for p in candidate.iterdir()):
                return candidate  # a quarantine that crashed before moving anything in
    raise StoreError(f"too many quarantined copies of {stem} in {parent}")


def _load_manifest(path: Path) -> Manifest:
    if not path.is_file():
        raise TrajectoryNotFoundError(f"{path} is missing: no committed trajectories there")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CorruptTrajectoryError(f"{path}: unreadable manifest: {err}") from err


def _read_verified(manifest_path: Path) -> tuple[Manifest, pa.Table]:
    """Load a batch and check it against its manifest and `TRAJECTORY_SCHEMA`."""
    manifest = _load_manifest(manifest_path)
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
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
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
