"""`TrajectoryStore`: committed batches, their manifests, validation reports and quarantine folders.

Layout under `root` (the store is the only code that builds these names):
    <run_id>/trajectories/iteration-000001.parquet
    <run_id>/trajectories/iteration-000001.manifest.json     (the commit marker)
    <run_id>/trajectories/iteration-000001.validation.json   (the validation report, once validated)
    <run_id>/quarantine/iteration-000001[-N]/                 (batches taken out of use, with reason.txt
                                                               and a copy of the validation report)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from rl_core.atomic import temp_path, write_bytes_atomically, write_text_atomically
from rl_core.store.manifest import (
    MANIFEST_SUFFIX,
    PARQUET_SUFFIX,
    CorruptTrajectoryError,
    Manifest,
    StoreError,
    TrajectoryExistsError,
    TrajectoryNotFoundError,
    load_manifest,
    parquet_bytes,
    read_verified,
    sha256_hex,
)
from rl_core.trajectory import SCHEMA_VERSION, Episode, episodes_to_table, table_to_episodes
from rl_core.validation_report import ValidationReport

REPORT_SUFFIX = ".validation.json"
TRAJECTORIES_DIR = "trajectories"
QUARANTINE_DIR = "quarantine"
QUARANTINE_NOTE = "reason.txt"
_MANIFEST_NAME = re.compile(r"^iteration-(\d+)\.manifest\.json$")
_QUARANTINE_NAME = re.compile(r"^iteration-(\d+)(?:-\d+)?$")


@dataclass(frozen=True)
class CommittedBatch:
    """What `TrajectoryStore.commit` wrote, without reading it back.

    `manifest`: the commit record. `table`: the exact Arrow table written (N rows in
    `TRAJECTORY_SCHEMA`, the one whose Parquet bytes `manifest.sha256` hashes). `episodes`: the
    N episodes decoded from `table` by the function `TrajectoryStore.read` uses, so they equal
    what a read from disk returns (decoded on first use)."""

    manifest: Manifest
    table: pa.Table

    @cached_property
    def episodes(self) -> list[Episode]:
        return table_to_episodes(self.table)


class TrajectoryStore:
    """Committed trajectory batches under `root`, one per (run_id, iteration)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # -- paths -------------------------------------------------------------------------

    def path(self, run_id: str, iteration: int) -> Path:
        """Where the batch's Parquet file lives (whether or not it is committed)."""
        return self._folder(run_id) / f"{_stem(iteration)}{PARQUET_SUFFIX}"

    def manifest_path(self, run_id: str, iteration: int) -> Path:
        """Where the batch's manifest (its commit marker) lives once committed."""
        return self._folder(run_id) / f"{_stem(iteration)}{MANIFEST_SUFFIX}"

    def report_path(self, run_id: str, iteration: int) -> Path:
        """Where the batch's validation report lives: beside its Parquet file (whether or not it exists)."""
        return self._folder(run_id) / f"{_stem(iteration)}{REPORT_SUFFIX}"

    @staticmethod
    def report_path_beside(manifest_path: Path | str) -> Path:
        """The validation report's path beside a manifest, wherever it lies (in trajectories/ or quarantine/)."""
        path = Path(manifest_path)
        return path.with_name(path.name.removesuffix(MANIFEST_SUFFIX) + REPORT_SUFFIX)

    @staticmethod
    def in_use(manifest_path: Path | str) -> bool:
        """True when the manifest lies in a run's trajectories/ folder (a committed batch, training
        data), False when it lies in quarantine/ or anywhere else."""
        return Path(manifest_path).parent.name == TRAJECTORIES_DIR

    def _folder(self, run_id: str) -> Path:
        return self.root / _checked_run_id(run_id) / TRAJECTORIES_DIR

    def _quarantine_folder(self, run_id: str) -> Path:
        return self.root / _checked_run_id(run_id) / QUARANTINE_DIR

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
        """The committed batch's manifest; TrajectoryNotFoundError / CorruptTrajectoryError like `read`."""
        return load_manifest(self._committed_manifest_path(run_id, iteration))

    # -- validation reports ------------------------------------------------------------

    def read_report(self, run_id: str, iteration: int) -> ValidationReport | None:
        """The validation report saved for the iteration's batch, or None if it was never validated.
        Raises ValueError / TypeError / KeyError on a report file that does not parse."""
        return self.read_report_beside(self.manifest_path(run_id, iteration))

    @staticmethod
    def read_report_beside(manifest_path: Path | str) -> ValidationReport | None:
        """The validation report beside a manifest, wherever it lies (e.g. in quarantine), or None."""
        path = TrajectoryStore.report_path_beside(manifest_path)
        return ValidationReport.from_json(path.read_text()) if path.is_file() else None

    def write_report(self, run_id: str, iteration: int, report: ValidationReport) -> Path:
        """Save the batch's validation report atomically beside its Parquet file; returns its path."""
        return write_text_atomically(self.report_path(run_id, iteration), report.to_json())

    @staticmethod
    def write_report_beside(manifest_path: Path | str, report: ValidationReport) -> Path:
        """Save a validation report atomically beside a manifest (e.g. the copy in quarantine); returns its path."""
        return write_text_atomically(TrajectoryStore.report_path_beside(manifest_path), report.to_json())

    # -- reads -------------------------------------------------------------------------

    def read(self, run_id: str, iteration: int) -> list[Episode]:
        """The verified batch's episodes (raises like `read_table`)."""
        return table_to_episodes(self.read_table(run_id, iteration))

    def read_table(self, run_id: str, iteration: int) -> pa.Table:
        """The verified batch as an Arrow table with exactly `TRAJECTORY_SCHEMA`.

        Raises TrajectoryNotFoundError when the batch is not committed, CorruptTrajectoryError
        when the file does not match its manifest or the schema."""
        manifest_path = self._committed_manifest_path(run_id, iteration)
        manifest, table = read_verified(manifest_path)
        if (manifest.run_id, manifest.iteration) != (run_id, iteration):
            raise CorruptTrajectoryError(
                f"{manifest_path}: manifest names run {manifest.run_id!r} iteration "
                f"{manifest.iteration}, expected run {run_id!r} iteration {iteration}"
            )
        return table

    @staticmethod
    def manifest_at(path: Path | str) -> Manifest:
        """The manifest at `path`, wherever it lies (e.g. in quarantine); raises like `manifest`."""
        return load_manifest(Path(path))

    @staticmethod
    def read_manifest_path(path: Path | str) -> pa.Table:
        """The verified batch a manifest commits, wherever it lies (e.g. in quarantine)."""
        return read_verified(Path(path))[1]

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
        """Atomically commit a new batch; returns its manifest (see `commit`, which raises the same)."""
        return self.commit(run_id, iteration, episodes).manifest

    def commit(self, run_id: str, iteration: int, episodes: Iterable[Episode]) -> CommittedBatch:
        """Atomically commit a new batch and return what was written, so the caller need not read it back.

        The Parquet bytes are encoded and hashed once, in memory, then written. Raises ValueError
        for an empty batch or episodes of another run or iteration, TrajectoryExistsError when
        the batch is already committed (the store never overwrites one)."""
        episodes = list(episodes)
        _check_lineage(run_id, iteration, episodes)
        table = episodes_to_table(episodes)
        data_path = self.path(run_id, iteration)
        manifest_path = self.manifest_path(run_id, iteration)
        if manifest_path.exists():
            raise TrajectoryExistsError(f"{manifest_path} already exists; committed trajectories are never overwritten")
        folder = data_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        data = parquet_bytes(table)
        manifest = Manifest(
            run_id=run_id,
            iteration=iteration,
            file=data_path.name,
            rows=table.num_rows,
            sha256=sha256_hex(data),
            bytes=len(data),
            schema_version=SCHEMA_VERSION,
            created_at=datetime.now(timezone.utc),
        )
        data_tmp, manifest_tmp = temp_path(data_path), temp_path(manifest_path)
        try:
            _write_bytes_durably(data_tmp, data)
            _write_bytes_durably(manifest_tmp, manifest.to_bytes())
            os.replace(data_tmp, data_path)  # replaces only an uncommitted leftover
            _fsync_dir(folder)
            _link_no_clobber(manifest_tmp, manifest_path)  # the commit
            _fsync_dir(folder)
        finally:
            data_tmp.unlink(missing_ok=True)
            manifest_tmp.unlink(missing_ok=True)
        return CommittedBatch(manifest, table)

    # -- quarantine --------------------------------------------------------------------

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
        target = _new_quarantine_dir(self._quarantine_folder(run_id), _stem(iteration))
        note = (
            f"run_id: {run_id}\niteration: {iteration}\n"
            f"quarantined_at: {datetime.now(timezone.utc).isoformat()}\nreason: {reason}\n"
        )
        write_bytes_atomically(target / QUARANTINE_NOTE, note.encode())
        os.replace(manifest_path, target / manifest_path.name)
        if data_path.exists():
            os.replace(data_path, target / data_path.name)
        _fsync_dir(manifest_path.parent)
        _fsync_dir(target)
        return target / manifest_path.name

    def quarantined(self, run_id: str, iteration: int) -> list[Path]:
        """Manifests of the iteration's quarantined batches (oldest first)."""
        folder = self._quarantine_folder(run_id)
        stem = _stem(iteration)
        name = f"{stem}{MANIFEST_SUFFIX}"
        found = (
            [d / name for d in folder.glob(f"{stem}*") if d.is_dir() and (d / name).is_file()]
            if folder.is_dir()
            else []
        )
        return sorted(found, key=lambda p: _quarantine_copy_number(p.parent.name, stem))

    def quarantined_iterations(self, run_id: str) -> list[int]:
        """Iterations of `run_id` with at least one quarantine folder, ascending."""
        folder = self._quarantine_folder(run_id)
        if not folder.is_dir():
            return []
        matches = (_QUARANTINE_NAME.match(p.name) for p in folder.iterdir() if p.is_dir())
        return sorted({int(m.group(1)) for m in matches if m})

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
            if not any(p.name.endswith(MANIFEST_SUFFIX) for p in candidate.iterdir()):
                return candidate  # a quarantine that crashed before moving anything in
    raise StoreError(f"too many quarantined copies of {stem} in {parent}")
