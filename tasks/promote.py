"""Promotion stage: checkpoints as MLflow model versions, and the `champion` / `previous` aliases.

Contract:
- `register_checkpoint` copies a checkpoint folder into the MLflow run's artifacts under
  `checkpoints/<folder name>` and registers that location as a version of
  `cfg.tracking.registered_model`, tagged with its lineage (`lineage_tags`). Registering the
  same folder from the same run again returns the existing version.
- Alias `champion` is the version in service; `previous` is the champion it replaced, kept
  for `rollback`. A version's held-out pass@1 and the hash of the task set it was measured
  on are tags (`pass_at_1`, `eval_tasks_hash`), so a later candidate can check it is compared
  on the same tasks (`champion_eval_tasks_hash`).
- `promote` records the gate's decision on the candidate (`gate.decision` = promoted or
  rejected, `gate.reasons`, and `gate.champion_version`: the champion it was decided against)
  either way; only a promoted candidate moves the aliases. It is safe to repeat after a
  partial failure.
- `rollback` makes `previous` the champion and the demoted champion `previous`.
- Refusals (`PromotionError`) are deterministic: the Prefect tasks do not retry them; they
  retry transient registry failures (1, 2, 4 s).

Promotion is compare-and-set on the `champion` alias
----------------------------------------------------
A gate decision compares the candidate with one champion (`GateDecision.champion_version`).
Two runs that gate against the same champion v1 at about the same time must not end with the
worse one in service because it happened to write last. So `promote(..., expected_champion)`
moves the aliases only if `champion` still names `expected_champion` (None: no champion);
otherwise it changes nothing and returns `PromotionResult(applied=False, champion=<the new
one>)`, and `settle_promotion` has the caller decide again against the new champion
(re-evaluating on the same tasks), up to `MAX_REDECISIONS` times; the final decision's reasons
say what happened ("the champion changed from version 1 to version 3 during the gate; decided
again against version 3"). A decision that is already applied (the candidate holds `champion`)
is applied, whatever it was decided against, so a repeat after a crash changes nothing. A
rejection moves no alias and is recorded as it is.

MLflow's registry has no atomic compare-and-set on aliases (`set_registered_model_alias`
overwrites). Turnstile makes one: every alias change it makes (`promote`, `rollback`) reads the
champion, compares and writes inside one critical section under an exclusive lock
(`promotion_lock`, an OS file lock through the `filelock` package, released by the OS if the
holder dies, so no lock is ever left stale), and reads the champion back after writing.
Where the lock lives, and what that guarantees, depends on the store:

- SQLite store (`sqlite:///<path>`, the default `<run_dir>/mlflow.db`): the lock file is
  `<path>.promotion.lock`, next to the database, so every process that opens the database takes
  the same lock. Guarantee: **linearizable compare-and-set among Turnstile promoters**: the
  promotions and rollbacks of all processes run one at a time, each moves `champion` only away
  from the version its decision was made against, and `previous` is always the champion that
  was actually replaced. (On a network filesystem this holds where the filesystem honours
  `flock`, which SQLite needs too.) A local file store (`file:` URI or a path) is the same, with
  `<root>/.promotion.lock`.
- MLflow server (`http(s)://`, `databricks`) or a database URI (`postgresql://`, `mysql://`, ...):
  there is no file every promoter shares. The lock is machine-local
  (`<tempdir>/turnstile-promotion-<hash of the URI>.lock`), so promoters on one machine get the
  guarantee above. Across machines it is **read-check-set with a re-read after setting**: the
  lost-update window is from our read of the champion to the end of our alias writes (three
  requests: read `champion`, set `previous`, set `champion`). If another machine's promoter
  writes in that window and its read-back comes before our write, our write replaces its champion
  unnoticed by either side (a better
  champion can be replaced by a worse one, and `previous` names the champion we read). Any
  other overlap is detected: whoever reads back a champion other than its own returns
  `applied=False` and decides again against it. Serialise promotions on a shared server
  (one promote queue, or `concurrency_limit: 1` on the deployments that promote) when that
  window matters.

Alias writes made outside Turnstile (the MLflow UI, `mlflow` commands) take no lock; a
promotion notices them only through the read-back.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

import mlflow.artifacts
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.config import RunConfig
from rl_core.runs.checkpoint import STATE_FILE, read_checkpoint_state
from tasks.gate import GateDecision
from tasks.tracking import MLFLOW_RETRIES, Tracker, VerdictError, config_hash, mlflow_client, tracking_uri, truncate

CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"
MAX_TAG_VALUE_LENGTH = 8000  # MLflow's run-tag limit; registry stores allow more, servers may not

CONFIG_HASH_TAG = "config_hash"
STEP_TAG = "step"
MANIFESTS_TAG = "manifests"
VALIDATION_TAG = "validation"
PASS_AT_1_TAG = "pass_at_1"
EVAL_TASKS_HASH_TAG = "eval_tasks_hash"
DECISION_TAG = "gate.decision"
REASONS_TAG = "gate.reasons"
AGAINST_TAG = "gate.champion_version"  # the champion the recorded decision was made against ("none": there was none)

PROMOTION_LOCK_TIMEOUT_S = (
    60.0  # how long a promotion waits for another one to finish before giving up (transient: retried)
)
MAX_REDECISIONS = 3  # how many times `settle_promotion` decides again after the champion changed under a decision


class PromotionError(VerdictError):
    """The registry is not in a state the requested operation can work from."""


class PromotionLockTimeout(TimeoutError):
    """Another promotion held the registry's promotion lock for longer than the timeout (transient: retried)."""


class Champion(NamedTuple):
    version: str
    pass_at_1: float


@dataclass(frozen=True)
class PromotionResult:
    """What `promote` did with a decision.

    `applied`: the decision is recorded and, when it promotes, the candidate holds `champion`.
    False only for a promoting decision whose champion changed: then nothing was recorded or
    moved, and the decision must be made again against `champion`.
    `champion`: the version holding `champion` afterwards (the one found, when not applied).
    `expected`: the champion the decision was made against (None: none).
    """

    applied: bool
    champion: str | None
    expected: str | None

    @property
    def champion_changed(self) -> bool:
        return not self.applied


# --------------------------------------------------------------------------- lineage


def manifest_refs(manifests: Iterable[Any]) -> list[dict[str, Any]]:
    """{run_id, iteration, sha256} of each manifest (a `rl_core.store.Manifest` or a dict)."""
    refs = []
    for manifest in manifests:
        data = manifest if isinstance(manifest, Mapping) else manifest.to_dict()
        refs.append({"run_id": data["run_id"], "iteration": int(data["iteration"]), "sha256": data["sha256"]})
    return refs


def json_list_within(items: list[Any], limit: int = MAX_TAG_VALUE_LENGTH) -> str:
    """`items` as a JSON list of at most `limit` characters: when too long, the first items
    that fit followed by `{"omitted": <count>}`."""
    text = json.dumps(items, sort_keys=True)
    if len(text) <= limit:
        return text
    kept = list(items)
    while kept:
        kept.pop()
        text = json.dumps([*kept, {"omitted": len(items) - len(kept)}], sort_keys=True)
        if len(text) <= limit:
            return text
    return json.dumps([{"omitted": len(items)}])


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return truncate(text, MAX_TAG_VALUE_LENGTH)


def checkpoint_step(checkpoint_dir: Path) -> int:
    """The optimizer step a checkpoint folder holds (from its trainer_state.json)."""
    try:
        return int(read_checkpoint_state(checkpoint_dir)["step"])
    except FileNotFoundError:
        raise PromotionError(
            f"{checkpoint_dir} is not a Turnstile checkpoint (no {STATE_FILE}); pass lineage['step']"
        ) from None


def lineage_tags(cfg: RunConfig, lineage: Mapping[str, Any]) -> dict[str, str]:
    """Model-version tags from a lineage dict.

    Known keys: `step` (int), `manifests` (Manifest objects or dicts; stored as
    {run_id, iteration, sha256} and cut to fit with an `omitted` count), `validation`
    (verdicts, JSON), `pass_at_1` (held-out pass@1), `eval_tasks_hash` (`task_set_hash` of
    the evaluated tasks). Other keys are stored as strings or JSON. `config_hash` comes from `cfg`.
    """
    tags = {CONFIG_HASH_TAG: config_hash(cfg)}
    for key, value in lineage.items():
        if key == MANIFESTS_TAG:
            tags[key] = json_list_within(manifest_refs(value))
        elif key == PASS_AT_1_TAG:
            tags[key] = repr(float(value))
        else:
            tags[key] = _tag_value(value)
    return tags


# --------------------------------------------------------------------------- registry glue


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    """alias -> version of registered model `name` ({} when the model does not exist)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {alias: str(version) for alias, version in model.aliases.items()}


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(
            name, description="Turnstile policy checkpoints; alias `champion` is in service."
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _existing_version(client: MlflowClient, name: str, run_id: str, source: str) -> str | None:
    for version in client.search_model_versions(f"run_id = '{run_id}'"):
        if version.name == name and version.source == source:
            return str(version.version)
    return None


def register_checkpoint(
    client: MlflowClient, cfg: RunConfig, checkpoint_dir: str | Path, mlflow_run_id: str, lineage: Mapping[str, Any]
) -> str:
    """Log `checkpoint_dir` under `checkpoints/<name>` of the MLflow run and register it; returns the version."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise PromotionError(f"checkpoint folder {checkpoint_dir} does not exist")
    lineage = dict(lineage)
    if STEP_TAG not in lineage:
        lineage[STEP_TAG] = checkpoint_step(checkpoint_dir)
    artifact_path = f"checkpoints/{checkpoint_dir.name}"
    name = cfg.tracking.registered_model
    source = f"{client.get_run(mlflow_run_id).info.artifact_uri}/{artifact_path}"
    _ensure_registered_model(client, name)
    existing = _existing_version(client, name, mlflow_run_id, source)
    if existing is not None:  # registered before (a re-run): the files behind it are left as they are
        return existing
    client.log_artifacts(mlflow_run_id, str(checkpoint_dir), artifact_path)
    full_lineage = {**lineage, MANIFESTS_TAG: manifest_refs(lineage.get(MANIFESTS_TAG, []))}
    client.log_dict(mlflow_run_id, full_lineage, f"lineage/{checkpoint_dir.name}.json")
    version = client.create_model_version(name, source=source, run_id=mlflow_run_id, tags=lineage_tags(cfg, lineage))
    return str(version.version)


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version holding alias `champion`, or None (no champion, or no registered model)."""
    return _aliases(client, name).get(CHAMPION_ALIAS)


def champion(client: MlflowClient, name: str) -> Champion | None:
    """The version holding alias `champion` and its recorded held-out pass@1, or None."""
    version = _aliases(client, name).get(CHAMPION_ALIAS)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    if PASS_AT_1_TAG not in tags:
        raise PromotionError(f"champion {name} version {version} has no {PASS_AT_1_TAG!r} tag; re-evaluate it")
    return Champion(version, float(tags[PASS_AT_1_TAG]))


def champion_eval_tasks_hash(client: MlflowClient, name: str) -> str | None:
    """The task-set hash the champion's pass@1 was measured on (None: no champion or not recorded)."""
    version = _aliases(client, name).get(CHAMPION_ALIAS)
    if version is None:
        return None
    return client.get_model_version(name, version).tags.get(EVAL_TASKS_HASH_TAG)


def promotion_lock_path(uri: str) -> Path:
    """The lock file that serialises alias changes on the registry at `uri` (see the module docstring).

    `sqlite:///<path>` -> `<path>.promotion.lock`; a local file store (`file:` URI or a plain
    path) -> `<root>/.promotion.lock`; anything else (a server, another database, in-memory
    SQLite) -> `<tempdir>/turnstile-promotion-<sha256(uri)[:12]>.lock`, shared by this machine only.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        database = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
        if database and database != ":memory:":
            path = Path(database).resolve()
            return path.with_name(path.name + ".promotion.lock")
    elif parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve() / ".promotion.lock"
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a path (or a Windows drive)
        return Path(uri).resolve() / ".promotion.lock"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"turnstile-promotion-{digest}.lock"


def registry_uri(client: MlflowClient) -> str:
    """The registry URI `client` talks to."""
    return client._registry_uri  # MlflowClient keeps it only privately; set by its constructor


@contextmanager
def promotion_lock(uri: str, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the exclusive promotion lock of the registry at `uri` (a new lock object per call, so it
    also excludes other threads of this process); yields the lock file's path.

    Raises `PromotionLockTimeout` after `timeout_s` seconds of waiting."""
    path = promotion_lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout_s, thread_local=False)
    try:
        lock.acquire()
    except Timeout as exc:
        raise PromotionLockTimeout(f"another promotion has held {path} for more than {timeout_s:.0f} s") from exc
    try:
        yield path
    finally:
        lock.release()


def _version_label(version: str | None) -> str:
    return "none" if version is None else f"version {version}"


def promote(
    client: MlflowClient, name: str, version: str, decision: GateDecision, expected_champion: str | None
) -> PromotionResult:
    """Apply `decision` on `version` as a compare-and-set on the `champion` alias.

    Under the registry's promotion lock: a promoting decision is applied only if `champion` still
    names `expected_champion` (the version the decision was made against; None: there was no
    champion) or already names `version`; then `version` becomes `champion` and the champion it
    replaced `previous`, and the alias is read back. Otherwise nothing is recorded or moved and
    the result says `applied=False` with the champion found. A rejection is recorded as it is.
    The decision, its reasons and `expected_champion` are tags of `version` (`gate.decision`,
    `gate.reasons`, `gate.champion_version`).

    Raises `PromotionLockTimeout` when another promotion holds the lock too long, and MLflow's
    errors for registry calls that fail.
    """
    version = str(version)
    expected = None if expected_champion is None else str(expected_champion)
    with promotion_lock(registry_uri(client)):
        current = _aliases(client, name).get(CHAMPION_ALIAS)
        if decision.promote and current != version:
            if current != expected:
                return PromotionResult(applied=False, champion=current, expected=expected)
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            current = _aliases(client, name).get(
                CHAMPION_ALIAS
            )  # read back: a writer outside this lock may have moved it
            if current != version:
                return PromotionResult(applied=False, champion=current, expected=expected)
        # recorded after the aliases moved (a crash in between is repaired by repeating:
        # the candidate is champion by then)
        client.set_model_version_tag(name, version, DECISION_TAG, decision.verdict)
        client.set_model_version_tag(name, version, REASONS_TAG, _tag_value(decision.reasons))
        client.set_model_version_tag(name, version, AGAINST_TAG, "none" if expected is None else expected)
        return PromotionResult(applied=True, champion=current, expected=expected)


def settle_promotion(
    apply: Callable[[GateDecision], PromotionResult],
    decide_again: Callable[[], GateDecision],
    decision: GateDecision,
    *,
    max_redecisions: int = MAX_REDECISIONS,
) -> tuple[GateDecision, PromotionResult]:
    """Apply `decision`; each time the champion changed under it, decide again and apply that.

    `apply(d)` promotes (`promote` or `promote_task` with `expected_champion=d.champion_version`);
    `decide_again()` reads the current champion and returns a fresh decision against it (with its
    `champion_version`), evaluated on the same tasks as the first. Every re-made decision's
    reasons start with what happened ("the champion changed from version 1 to version 3 during
    the gate; decided again against version 3"). After `max_redecisions` changes the candidate is
    rejected ("left unpromoted") and that is recorded. Returns the decision applied and its result.
    """
    notes: list[str] = []
    for attempt in range(max_redecisions + 1):
        result = apply(decision)
        if result.applied:
            return decision, result
        changed = (
            f"the champion changed from {_version_label(result.expected)} to {_version_label(result.champion)} "
            "during the gate"
        )
        if attempt == max_redecisions:
            break
        fresh = decide_again()
        notes.append(f"{changed}; decided again against {_version_label(fresh.champion_version)}")
        decision = replace(fresh, reasons=[*notes, *fresh.reasons])
    gave_up = replace(
        decision,
        promote=False,
        reasons=[
            *decision.reasons,
            changed,
            f"the champion changed {max_redecisions + 1} times during the gate, so no decision could be applied; the "
            "candidate is left unpromoted (gate it again with the turnstile-promote flow, gate on)",
        ],
        champion_version=result.champion,
    )
    return gave_up, apply(gave_up)


def rollback(client: MlflowClient, name: str) -> str:
    """Make `previous` the champion again (the demoted champion becomes `previous`); returns the new champion.

    Runs under the registry's promotion lock, so it is ordered with promotions (whose
    compare-and-set then sees the restored champion). Raises `PromotionError` without `previous`."""
    with promotion_lock(registry_uri(client)):
        return _rollback(client, name)


def _rollback(client: MlflowClient, name: str) -> str:
    aliases = _aliases(client, name)
    restored, demoted = aliases.get(PREVIOUS_ALIAS), aliases.get(CHAMPION_ALIAS)
    if restored is None:
        raise PromotionError(f"cannot roll back {name!r}: no version holds the alias {PREVIOUS_ALIAS!r}")
    if restored == demoted:
        raise PromotionError(
            f"cannot roll back {name!r}: {CHAMPION_ALIAS!r} and {PREVIOUS_ALIAS!r} both point to version {restored} "
            f"(an interrupted rollback?); set {PREVIOUS_ALIAS!r} to the version to fall back to"
        )
    client.set_registered_model_alias(name, CHAMPION_ALIAS, restored)
    if demoted is None:
        client.delete_registered_model_alias(name, PREVIOUS_ALIAS)
    else:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, demoted)
    return restored


# --------------------------------------------------------------------------- Prefect tasks


@task(name="register-checkpoint", cache_policy=NONE, **MLFLOW_RETRIES)
def register_checkpoint_task(
    cfg: RunConfig, tracker: Tracker, checkpoint_dir: str | Path, lineage: Mapping[str, Any]
) -> str:
    version = register_checkpoint(tracker.client, cfg, checkpoint_dir, tracker.mlflow_run_id, lineage)
    get_run_logger().info("registered %s as %s version %s", checkpoint_dir, cfg.tracking.registered_model, version)
    return version


@task(name="read-champion", cache_policy=NONE, **MLFLOW_RETRIES)
def champion_task(cfg: RunConfig) -> tuple[Champion | None, str | None]:
    """The champion (version, pass@1) and the task-set hash its pass@1 was measured on."""
    client, name = mlflow_client(cfg), cfg.tracking.registered_model
    return champion(client, name), champion_eval_tasks_hash(client, name)


@task(name="read-champion-version", cache_policy=NONE, **MLFLOW_RETRIES)
def champion_version_task(cfg: RunConfig) -> str | None:
    """The version holding `champion` (None: none), whether or not its pass@1 is recorded."""
    return champion_version(mlflow_client(cfg), cfg.tracking.registered_model)


@task(name="promote", cache_policy=NONE, **MLFLOW_RETRIES)
def promote_task(
    cfg: RunConfig, version: str, decision: GateDecision, expected_champion: str | None
) -> PromotionResult:
    """`promote` on `tracking.registered_model` (compare-and-set against `expected_champion`), logged."""
    name = cfg.tracking.registered_model
    result = promote(mlflow_client(cfg), name, version, decision, expected_champion)
    if not result.applied:
        outcome = (
            f"was not applied: {CHAMPION_ALIAS!r} changed from {_version_label(result.expected)} to "
            f"{_version_label(result.champion)} since the decision"
        )
    elif decision.promote:
        outcome = f"is now {CHAMPION_ALIAS!r}"
    else:
        outcome = f"was rejected; {CHAMPION_ALIAS!r} unchanged"
    get_run_logger().info("%s version %s %s", name, version, outcome)
    return result


@task(name="rollback", cache_policy=NONE, **MLFLOW_RETRIES)
def rollback_task(cfg: RunConfig) -> str:
    name = cfg.tracking.registered_model
    version = rollback(mlflow_client(cfg), name)
    get_run_logger().info("%s rolled back: version %s is %r again", name, version, CHAMPION_ALIAS)
    return version


def champion_source(client: MlflowClient, name: str) -> str | None:
    """Artifact URI of the champion's checkpoint folder, or None without a champion."""
    version = _aliases(client, name).get(CHAMPION_ALIAS)
    return None if version is None else client.get_model_version(name, version).source


def download_checkpoint(cfg: RunConfig, source: str, destination: str | Path) -> Path:
    """Copy the registered checkpoint folder at artifact URI `source` under `destination`; the local folder."""
    Path(destination).mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri(cfg)
        )
    )


@task(name="download-champion", cache_policy=NONE, **MLFLOW_RETRIES)
def download_champion_task(cfg: RunConfig, destination: str | Path) -> Path | None:
    """Copy the champion's checkpoint folder to `destination` (for re-evaluating it); None without a champion."""
    source = champion_source(mlflow_client(cfg), cfg.tracking.registered_model)
    return None if source is None else download_checkpoint(cfg, source, destination)


@dataclass(frozen=True)
class RegistryVersion:
    """One version of the registered model: where its checkpoint folder lives and its recorded pass@1."""

    name: str
    version: str
    source: str
    pass_at_1: float | None
    is_champion: bool


@task(name="read-registry-version", cache_policy=NONE, **MLFLOW_RETRIES)
def read_registry_version_task(cfg: RunConfig, version: int | str | None) -> RegistryVersion:
    """Version `version` of `tracking.registered_model`, or the champion when None (VerdictError when missing)."""
    client, name = mlflow_client(cfg), cfg.tracking.registered_model
    try:
        found = (
            client.get_model_version(name, str(version))
            if version is not None
            else client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        )
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        wanted = (
            f"version {version}"
            if version is not None
            else f"version holding the alias {CHAMPION_ALIAS!r} (nothing promoted yet)"
        )
        raise VerdictError(f"registered model {name!r} in {tracking_uri(cfg)} has no {wanted}") from exc
    recorded = found.tags.get(PASS_AT_1_TAG)
    return RegistryVersion(
        name=name,
        version=str(found.version),
        source=found.source,
        pass_at_1=None if recorded is None else float(recorded),
        is_champion=CHAMPION_ALIAS in (found.aliases or []),
    )


@task(name="download-registry-version", cache_policy=NONE, **MLFLOW_RETRIES)
def download_registry_version_task(cfg: RunConfig, registered: RegistryVersion, destination: str | Path) -> Path:
    """Copy a registry version's checkpoint folder under `destination`; returns the local folder."""
    return download_checkpoint(cfg, registered.source, destination)
