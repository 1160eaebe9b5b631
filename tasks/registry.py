"""The MLflow model registry as Turnstile uses it: checkpoints as versions, lineage tags, the champion.

Contract:
- `register_checkpoint` copies a checkpoint folder into the MLflow run's artifacts under
  `checkpoints/<folder name>` and registers that location as a version of
  `cfg.tracking.registered_model`, tagged with its lineage (`lineage_tags`). Registering the
  same folder from the same run again returns the existing version.
- Alias `champion` is the version in service; `previous` is the champion it replaced. A
  version's held-out pass@1 and the hash of the task set it was measured on are tags
  (`pass_at_1`, `eval_tasks_hash`), so a later candidate can check it is compared on the same
  tasks (`champion_eval_tasks_hash`).
- Refusals (`PromotionError`, a `PermanentError`) are deterministic: the Prefect tasks do not
  retry them. Moving the aliases is tasks/promote.py's job.
- For a person, each version carries its MLflow run (`run_id`: the UI's "Source Run" shows the run's
  name and links to it; a `run_link` would replace the name by a cut URL, so none is set) and a
  markdown description of its lineage (`lineage_markdown`: step, run, trained batches, validation,
  held-out pass@1); the gate's decision is added to it when it is recorded (`with_gate_section`).
  The tags stay the machine-readable record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from rl_core.config import RunConfig
from rl_core.runs.checkpoint import STATE_FILE, read_checkpoint_state
from tasks.links import mlflow_run_url
from tasks.tracking import PermanentError, config_hash, mlflow_client, tracking_uri, truncate

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


class PromotionError(PermanentError):
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


def tag_value(value: Any) -> str:
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
    (validation reports, JSON), `pass_at_1` (held-out pass@1), `eval_tasks_hash` (`task_set_hash` of
    the evaluated tasks). Other keys are stored as strings or JSON. `config_hash` comes from `cfg`.
    """
    tags = {CONFIG_HASH_TAG: config_hash(cfg)}
    for key, value in lineage.items():
        if key == MANIFESTS_TAG:
            tags[key] = json_list_within(manifest_refs(value))
        elif key == PASS_AT_1_TAG:
            tags[key] = repr(float(value))
        else:
            tags[key] = tag_value(value)
    return tags


def lineage_markdown(run_name: str, run_url: str | None, lineage: Mapping[str, Any]) -> str:
    """A model version's description (markdown): the step and run it comes from, the batches it was trained on,
    their validation, its held-out pass@1 and where the full lineage is. `lineage`: as `lineage_tags` takes it
    (`manifests` as Manifest objects or dicts, `validation` as a list of {iteration, passed, reason} or a mapping
    of iteration -> outcome)."""
    run = f"[{run_name}]({run_url})" if run_url else f"`{run_name}`"
    step = lineage.get(STEP_TAG)
    lines = [f"Checkpoint at step {step} of Turnstile run {run}.", ""]
    manifests = manifest_refs(lineage.get(MANIFESTS_TAG, []))
    if manifests:
        iterations = [m["iteration"] for m in manifests]
        contiguous = iterations == list(range(iterations[0], iterations[-1] + 1))
        span = ", ".join(map(str, iterations))
        if contiguous and len(iterations) > 2:
            span = f"{iterations[0]}-{iterations[-1]}"
        batches = f"{len(manifests)} batch{'es' if len(manifests) != 1 else ''}"
        lines.append(f"- **Trained on:** {batches}, iterations {span} (sha256 of each: tag `manifests`)")
    validation = lineage.get(VALIDATION_TAG)
    if isinstance(validation, Mapping):
        outcomes = [str(v) == "passed" for v in validation.values()]
    elif isinstance(validation, list):
        outcomes = [bool(v.get("passed")) if isinstance(v, Mapping) else bool(v) for v in validation]
    else:
        outcomes = []
    if outcomes:
        failed = outcomes.count(False)
        lines.append(
            f"- **Validation:** all {len(outcomes)} batches passed"
            if not failed
            else f"- **Validation:** {failed} of {len(outcomes)} batches failed"
        )
    if PASS_AT_1_TAG in lineage:
        tasks = lineage.get(EVAL_TASKS_HASH_TAG)
        lines.append(
            f"- **Held-out pass@1 (greedy):** {float(lineage[PASS_AT_1_TAG]):.3f}"
            + (f" on task set `{tasks}`" if tasks else "")
        )
    if step is not None:
        lines.append(f"- **Full lineage:** the run's artifact `lineage/step-{int(step):06d}.json`")
    return "\n".join(lines) + "\n"


GATE_HEADING = "**Gate:**"


def with_gate_section(description: str | None, outcome: str, against: str | None, reasons: list[str]) -> str:
    """`description` with its gate line(s) replaced by the decision: outcome, the champion it was decided
    against (None: none) and its reasons."""
    kept = (description or "").split(f"\n{GATE_HEADING}")[0].rstrip("\n")
    against_text = f"champion version {against}" if against else "no champion (the starting policy)"
    lines = [f"{GATE_HEADING} **{outcome}**, decided against {against_text}"] + [f"- {r}" for r in reasons]
    return (kept + "\n\n" if kept else "") + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- registry glue


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
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
    run = client.get_run(mlflow_run_id)
    run_url = mlflow_run_url(cfg, run.info.experiment_id, mlflow_run_id)
    version = client.create_model_version(
        name,
        source=source,
        run_id=mlflow_run_id,
        tags=lineage_tags(cfg, lineage),
        description=lineage_markdown(run.info.run_name or mlflow_run_id, run_url, lineage),
    )
    return str(version.version)


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version holding alias `champion`, or None (no champion, or no registered model)."""
    return aliases(client, name).get(CHAMPION_ALIAS)


def champion(client: MlflowClient, name: str) -> Champion | None:
    """The version holding alias `champion` and its recorded held-out pass@1, or None."""
    version = aliases(client, name).get(CHAMPION_ALIAS)
    if version is None:
        return None
    tags = client.get_model_version(name, version).tags
    if PASS_AT_1_TAG not in tags:
        raise PromotionError(f"champion {name} version {version} has no {PASS_AT_1_TAG!r} tag; re-evaluate it")
    return Champion(version, float(tags[PASS_AT_1_TAG]))


def champion_eval_tasks_hash(client: MlflowClient, name: str) -> str | None:
    """The task-set hash the champion's pass@1 was measured on (None: no champion or not recorded)."""
    version = aliases(client, name).get(CHAMPION_ALIAS)
    if version is None:
        return None
    return client.get_model_version(name, version).tags.get(EVAL_TASKS_HASH_TAG)


def champion_source(client: MlflowClient, name: str) -> str | None:
    """Artifact URI of the champion's checkpoint folder, or None without a champion."""
    version = aliases(client, name).get(CHAMPION_ALIAS)
    return None if version is None else client.get_model_version(name, version).source


def download_checkpoint(cfg: RunConfig, source: str, destination: str | Path) -> Path:
    """Copy the registered checkpoint folder at artifact URI `source` under `destination`; the local folder."""
    Path(destination).mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri(cfg)
        )
    )


@dataclass(frozen=True)
class RegistryVersion:
    """One version of the registered model: where its checkpoint folder lives and its recorded pass@1."""

    name: str
    version: str
    source: str
    pass_at_1: float | None
    is_champion: bool


def registry_version(cfg: RunConfig, version: int | str | None) -> RegistryVersion:
    """Version `version` of `tracking.registered_model`, or the champion when None.

    Raises PermanentError when the model has no such version (or no champion)."""
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
        raise PermanentError(f"registered model {name!r} in {tracking_uri(cfg)} has no {wanted}") from exc
    recorded = found.tags.get(PASS_AT_1_TAG)
    return RegistryVersion(
        name=name,
        version=str(found.version),
        source=found.source,
        pass_at_1=None if recorded is None else float(recorded),
        is_champion=CHAMPION_ALIAS in (found.aliases or []),
    )
