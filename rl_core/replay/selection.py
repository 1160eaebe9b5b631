"""Which stored batches to replay: a run's iterations (optionally a range), or manifest paths anywhere.

Contracts:
- read-only: nothing here writes to the store or into a run folder;
- bad input (an unknown run, an empty selection, a missing or unreadable manifest, a run
  folder without its config) raises `ReplayError`, the replay package's one error type (a
  ValueError), naming the run, iteration or path;
- a `StoredBatch` is found by its manifest: committed when the store says it is in use
  (`TrajectoryStore.in_use`), and its stored validation report is the one the store keeps
  beside it (`TrajectoryStore.report_path_beside`: in `trajectories/`, or the copy in quarantine);
- `read_episodes` verifies the episodes against the manifest (raises CorruptTrajectoryError).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rl_core.config import RunConfig
from rl_core.runs.folder import RUN_CONFIG_FILE, load_run_config
from rl_core.store import StoreError, TrajectoryStore
from rl_core.trajectory import Episode, table_to_episodes


class ReplayError(ValueError):
    """Bad replay input: an unknown run, an empty selection, a bad scorer path, ..."""


@dataclass(frozen=True)
class StoredBatch:
    """One stored batch, found by its manifest; `run_folder` holds the run's config.yaml (None if not found)."""

    run_id: str
    iteration: int
    manifest_path: Path
    run_folder: Path | None

    @property
    def committed(self) -> bool:
        """In use as training data (in `trajectories/`), not quarantined."""
        return TrajectoryStore.in_use(self.manifest_path)

    @property
    def report_path(self) -> Path:
        """Where the batch's validation report lies (beside its manifest), whether or not it exists."""
        return TrajectoryStore.report_path_beside(self.manifest_path)

    @property
    def label(self) -> str:
        return f"{self.run_id} iteration {self.iteration}" + ("" if self.committed else " (quarantined)")


def select_batches(
    run_dir: str | Path,
    run_id: str | None = None,
    first: int | None = None,
    last: int | None = None,
    manifests: Iterable[str | Path] = (),
    include_quarantined: bool = False,
) -> list[StoredBatch]:
    """The batches to replay, ordered by run and iteration.

    Either `run_id` (its committed iterations, optionally only `first..last`, plus the
    quarantined ones with `include_quarantined`) or explicit manifest paths, anywhere.
    """
    manifests = [Path(m) for m in manifests]
    if manifests and (run_id or first is not None or last is not None):
        raise ReplayError("give either manifest paths or a run_id (with first/last iteration), not both")
    if manifests:
        batches = {m.resolve(): batch_at(m) for m in manifests}.values()
        return sorted(batches, key=lambda b: (b.run_id, b.iteration, not b.committed))
    if not run_id:
        raise ReplayError("nothing selected: give a run_id or manifest paths")
    if first is not None and last is not None and last < first:
        raise ReplayError(f"iteration range {first}..{last} is empty: last_iteration must be >= first_iteration")
    store = TrajectoryStore(run_dir)
    _check_run_exists(Path(run_dir), run_id)
    wanted = lambda i: (first is None or i >= first) and (last is None or i <= last)  # noqa: E731
    paths = [store.manifest_path(run_id, i) for i in store.iterations(run_id) if wanted(i)]
    if include_quarantined:
        paths += [m for i in store.quarantined_iterations(run_id) if wanted(i) for m in store.quarantined(run_id, i)]
    if not paths:
        span = f"{'start' if first is None else first}..{'end' if last is None else last}"
        raise ReplayError(
            f"run {run_id!r} has no {'stored' if include_quarantined else 'committed'} iteration in {span} "
            f"(committed: {store.iterations(run_id)}, quarantined: {store.quarantined_iterations(run_id)})"
        )
    return sorted((batch_at(p) for p in paths), key=lambda b: (b.iteration, not b.committed))


def batch_at(manifest_path: str | Path) -> StoredBatch:
    """The batch a manifest commits, wherever it lies; its run folder is the nearest ancestor named after the run."""
    path = Path(manifest_path)
    if not path.is_file():
        raise ReplayError(f"manifest {path} does not exist")
    try:
        manifest = TrajectoryStore.manifest_at(path)
    except StoreError as err:
        raise ReplayError(str(err)) from err
    folder = next(
        (p for p in path.resolve().parents if p.name == manifest.run_id and (p / RUN_CONFIG_FILE).is_file()), None
    )
    return StoredBatch(manifest.run_id, manifest.iteration, path, folder)


def find_batch(run_dir: str | Path, run_id: str, iteration: int) -> StoredBatch:
    """The committed batch of `iteration`, else its newest quarantined copy."""
    _check_run_exists(Path(run_dir), run_id)
    store = TrajectoryStore(run_dir)
    if store.exists(run_id, iteration):
        return batch_at(store.manifest_path(run_id, iteration))
    quarantined = store.quarantined(run_id, iteration)
    if quarantined:
        return batch_at(quarantined[-1])
    raise ReplayError(
        f"run {run_id!r} has no batch for iteration {iteration} "
        f"(committed: {store.iterations(run_id)}, quarantined: {store.quarantined_iterations(run_id)})"
    )


def batch_of_iteration(batches: list[StoredBatch], iteration: int) -> StoredBatch:
    """The one selected batch of `iteration`; ReplayError if none or several are."""
    found = [b for b in batches if b.iteration == iteration]
    if len(found) != 1:
        problem = "is not among" if not found else f"matches {len(found)} of"
        raise ReplayError(f"iteration {iteration} {problem} the selected batches {[b.label for b in batches]}")
    return found[0]


def read_episodes(batch: StoredBatch) -> list[Episode]:
    """The batch's episodes, verified against its manifest (raises CorruptTrajectoryError)."""
    return table_to_episodes(TrajectoryStore.read_manifest_path(batch.manifest_path))


def run_config(batch: StoredBatch) -> RunConfig:
    """The config the batch's run was started with."""
    if batch.run_folder is None:
        raise ReplayError(f"{batch.label}: no run folder with a {RUN_CONFIG_FILE} above {batch.manifest_path}")
    return load_run_config(batch.run_folder)


def _check_run_exists(run_dir: Path, run_id: str) -> None:
    if not (run_dir / run_id).is_dir():
        known = sorted(p.name for p in run_dir.iterdir() if (p / RUN_CONFIG_FILE).is_file()) if run_dir.is_dir() else []
        raise ReplayError(f"unknown run {run_id!r}: no folder {run_dir / run_id} (runs in {run_dir}: {known})")
