"""Promotion stage: moving the `champion` / `previous` aliases, and the registry's Prefect tasks.

Contract:
- Checkpoints become MLflow model versions and the champion is read through tasks/registry.py
  (`register_checkpoint`, `champion`, ...); this module's Prefect tasks wrap those calls.
- Alias `champion` is the version in service; `previous` is the champion it replaced, kept
  for `rollback`.
- `promote` records the gate's decision on the candidate (`gate.decision` = promoted or
  rejected, `gate.reasons`, and `gate.champion_version`: the champion it was decided against)
  either way; only a promoted candidate moves the aliases. It is safe to repeat after a
  partial failure. The decision is also added to the version's description (`with_gate_section`).
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

The promotion lock (tasks/promotion_lock.py) makes every alias change one critical section; its
docstring says what that guarantees for each kind of store. Registry reads, registration and
lineage tags live in tasks/registry.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from rl_core.config import RunConfig
from rl_core.gate import GateDecision
from tasks.promotion_lock import promotion_lock, registry_uri
from tasks.registry import (
    AGAINST_TAG,
    CHAMPION_ALIAS,
    DECISION_TAG,
    PREVIOUS_ALIAS,
    REASONS_TAG,
    Champion,
    PromotionError,
    RegistryVersion,
    aliases,
    champion,
    champion_eval_tasks_hash,
    champion_source,
    champion_version,
    checkpoint_step,  # noqa: F401  (flows/evaluate.py imports it from here)
    download_checkpoint,
    register_checkpoint,
    registry_version,
    tag_value,
    with_gate_section,
)
from tasks.tracking import MLFLOW_RETRIES, Tracker, mlflow_client

MAX_REDECISIONS = 3  # how many times `settle_promotion` decides again after the champion changed under a decision


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


# --------------------------------------------------------------------------- alias changes


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
        current = aliases(client, name).get(CHAMPION_ALIAS)
        if decision.promote and current != version:
            if current != expected:
                return PromotionResult(applied=False, champion=current, expected=expected)
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS_ALIAS, current)
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
            current = aliases(client, name).get(
                CHAMPION_ALIAS
            )  # read back: a writer outside this lock may have moved it
            if current != version:
                return PromotionResult(applied=False, champion=current, expected=expected)
        # recorded after the aliases moved (a crash in between is repaired by repeating:
        # the candidate is champion by then)
        client.set_model_version_tag(name, version, DECISION_TAG, decision.outcome)
        client.set_model_version_tag(name, version, REASONS_TAG, tag_value(decision.reasons))
        client.set_model_version_tag(name, version, AGAINST_TAG, "none" if expected is None else expected)
        described = client.get_model_version(name, version).description
        client.update_model_version(
            name, version, description=with_gate_section(described, decision.outcome, expected, decision.reasons)
        )
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
    held = aliases(client, name)
    restored, demoted = held.get(PREVIOUS_ALIAS), held.get(CHAMPION_ALIAS)
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


@task(name="download-champion", cache_policy=NONE, **MLFLOW_RETRIES)
def download_champion_task(cfg: RunConfig, destination: str | Path) -> Path | None:
    """Copy the champion's checkpoint folder to `destination` (for re-evaluating it); None without a champion."""
    source = champion_source(mlflow_client(cfg), cfg.tracking.registered_model)
    return None if source is None else download_checkpoint(cfg, source, destination)


@task(name="read-registry-version", cache_policy=NONE, **MLFLOW_RETRIES)
def read_registry_version_task(cfg: RunConfig, version: int | str | None) -> RegistryVersion:
    """Version `version` of `tracking.registered_model`, or the champion when None (PermanentError when missing)."""
    return registry_version(cfg, version)


@task(name="download-registry-version", cache_policy=NONE, **MLFLOW_RETRIES)
def download_registry_version_task(cfg: RunConfig, registered: RegistryVersion, destination: str | Path) -> Path:
    """Copy a registry version's checkpoint folder under `destination`; returns the local folder."""
    return download_checkpoint(cfg, registered.source, destination)
