"""Trajectory store: one Parquet file per (run, iteration), committed by a manifest.

The store owns the names of the batch, manifest, validation report and quarantine folders
(layout in `trajectory_store.py`); everything else asks `TrajectoryStore` for them.

Contract:
- `commit` (and `write`, which returns only the manifest) is atomic: the Parquet file and then
  the manifest are each written to a temp file in the same folder, fsynced and renamed into
  place, then the folder is fsynced. A batch exists only once its manifest does; a Parquet file
  without one is never read. `commit` returns the table it wrote (and its episodes), so the
  process that wrote a batch need not read it back; the bytes are hashed once, in memory.
- A committed batch is never overwritten (`TrajectoryExistsError`); a failed write leaves no
  temp files behind. At most one writer per (run_id, iteration) at a time.
- Every read from disk verifies size, sha256, schema version, Arrow schema and row count
  against the manifest; any mismatch raises `CorruptTrajectoryError` naming the file and the
  problem. Batches of an older known schema version (KNOWN_SCHEMA_VERSIONS) are checked
  against that version's schema and returned upgraded to `TRAJECTORY_SCHEMA`
  (`trajectory.upgrade_table`).
- The validation report (`rl_core.validation_report.ValidationReport`) is saved beside the
  batch (`write_report`, `report_path`) and read back typed (`read_report`); a quarantined
  batch keeps a copy beside its manifest (`write_report_beside`, `read_report_beside`).

Modules: `manifest.py` (the file format: Manifest, errors, the integrity check),
`trajectory_store.py` (TrajectoryStore, CommittedBatch: paths, reads, commits, quarantine).
"""

from rl_core.store.manifest import (
    KNOWN_SCHEMA_VERSIONS,
    MANIFEST_SUFFIX,
    CorruptTrajectoryError,
    Manifest,
    StoreError,
    TrajectoryExistsError,
    TrajectoryNotFoundError,
)
from rl_core.store.trajectory_store import REPORT_SUFFIX, CommittedBatch, TrajectoryStore

__all__ = [
    "KNOWN_SCHEMA_VERSIONS",
    "MANIFEST_SUFFIX",
    "REPORT_SUFFIX",
    "CommittedBatch",
    "CorruptTrajectoryError",
    "Manifest",
    "StoreError",
    "TrajectoryExistsError",
    "TrajectoryNotFoundError",
    "TrajectoryStore",
]
