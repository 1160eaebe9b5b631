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
  rejected, `gate.reasons`) either way; only a promoted candidate moves the aliases. It is
  safe to repeat after a partial failure.
- `rollback` makes `previous` the champion and the demoted champion `previous`.
- Refusals (`PromotionError`) are deterministic: the Prefect tasks do not retry them; they
  retry transient registry failures (1, 2, 4 s).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.checkpoint import STATE_FILE
from rl_core.config import RunConfig
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


class PromotionError(VerdictError):
    """The registry is not in a state the requested operation can work from."""


class Champion(NamedTuple):
    version: str
    pass_at_1: float


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
    state_file = checkpoint_dir / STATE_FILE
    if not state_file.is_file():
        raise PromotionError(f"{checkpoint_dir} is not a Turnstile checkpoint (no {STATE_FILE}); pass lineage['step']")
    return int(json.loads(state_file.read_text())["step"])


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
        client.create_registered_model(name, description="Turnstile policy checkpoints; alias `champion` is in service.")
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


def promote(client: MlflowClient, name: str, version: str, decision: GateDecision) -> None:
    """Record `decision` on `version`; when it promotes, `version` becomes `champion` and the old champion `previous`."""
    version = str(version)
    client.set_model_version_tag(name, version, DECISION_TAG, decision.verdict)
    client.set_model_version_tag(name, version, REASONS_TAG, _tag_value(decision.reasons))
    if not decision.promote:
        return
    current = _aliases(client, name).get(CHAMPION_ALIAS)
    if current is not None and current != version:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)


def rollback(client: MlflowClient, name: str) -> str:
    """Make `previous` the champion again (the demoted champion becomes `previous`); returns the new champion."""
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
def register_checkpoint_task(cfg: RunConfig, tracker: Tracker, checkpoint_dir: str | Path, lineage: Mapping[str, Any]) -> str:
    version = register_checkpoint(tracker.client, cfg, checkpoint_dir, tracker.mlflow_run_id, lineage)
    get_run_logger().info("registered %s as %s version %s", checkpoint_dir, cfg.tracking.registered_model, version)
    return version


@task(name="read-champion", cache_policy=NONE, **MLFLOW_RETRIES)
def champion_task(cfg: RunConfig) -> tuple[Champion | None, str | None]:
    """The champion (version, pass@1) and the task-set hash its pass@1 was measured on."""
    client, name = mlflow_client(cfg), cfg.tracking.registered_model
    return champion(client, name), champion_eval_tasks_hash(client, name)


@task(name="promote", cache_policy=NONE, **MLFLOW_RETRIES)
def promote_task(cfg: RunConfig, version: str, decision: GateDecision) -> None:
    name = cfg.tracking.registered_model
    promote(mlflow_client(cfg), name, version, decision)
    outcome = f"is now {CHAMPION_ALIAS!r}" if decision.promote else f"was rejected; {CHAMPION_ALIAS!r} unchanged"
    get_run_logger().info("%s version %s %s", name, version, outcome)


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


@task(name="download-champion", cache_policy=NONE, **MLFLOW_RETRIES)
def download_champion_task(cfg: RunConfig, destination: str | Path) -> Path | None:
    """Copy the champion's checkpoint folder to `destination` (for re-evaluating it); None without a champion."""
    source = champion_source(mlflow_client(cfg), cfg.tracking.registered_model)
    if source is None:
        return None
    Path(destination).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri(cfg)))
