"""Registry flows: promote a registry version to champion, or roll the champion back.

`promote_flow` ("turnstile-promote") makes version `settings.version` of
`tracking.registered_model` the `champion` (the old champion becomes `previous`):
- by hand (`gate` off, the default): unconditionally, recorded on the version as the decision
  `promoted` with the reason given;
- gated (`gate` on): the version is evaluated now on the config's held-out tasks (greedy, as a
  `turnstile-evaluate` subflow run) and compared with the champion's pass@1 on the same tasks
  (its recorded score when it was measured on that task set, else re-evaluated the same way);
  `gate.*` of the config decides, and the decision and its reasons are recorded either way.
Promoting the current champion changes nothing. Either way the promotion is compare-and-set on
the champion the decision was made against (tasks/promote.py): when another promotion or a
rollback changed the champion in between, the version is decided again against the new one
(gated: its pass@1 on the same tasks; by hand: the same request, now replacing the new
champion) and the reasons say so.

`rollback_flow` ("turnstile-rollback") makes `previous` the champion again (the demoted
champion becomes `previous`); it refuses when there is no `previous`.

Both publish their outcome as a Prefect markdown artifact and return it as a dict. The
registry logic lives in tasks/promote.py and tasks/gate.py; these flows only choose the inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from flows.evaluate import EvaluateSettings, evaluate_flow
from flows.parameters import RunSettings
from rl_core.config import RunConfig
from rl_core.gate import GateDecision
from tasks.gate import champion_pass_at_1, gate_candidate
from tasks.promote import (
    champion_version_task,
    promote_task,
    read_registry_version_task,
    rollback_task,
    settle_promotion,
)
from tasks.registry import RegistryVersion


class RegistrySettings(RunSettings):
    """The config whose tracking store, registered model and gate a registry flow works on.

    Registry flows make no run of their own, so `run_id` is not a parameter here."""

    run_id: SkipJsonSchema[None] = Field(None, exclude=True)

    def evaluation(self, version: int) -> EvaluateSettings:
        """Settings for a greedy held-out evaluation of registry `version` on the same config."""
        return EvaluateSettings(
            config_path=self.config_path,
            run_dir=self.run_dir,
            overrides=list(self.overrides),
            version=version,
            samples=False,
        )


class PromoteSettings(RegistrySettings):
    """Parameters of the promote flow."""

    version: int = Field(
        ..., ge=1, description="Version of the registered model (tracking.registered_model) to make champion."
    )
    gate: bool = Field(
        False,
        description="Gate it first: evaluate it now and promote only "
        "if it passes the config's gate (gate.min_pass_at_1, "
        "and beating the champion on the same tasks when gate.require_improvement). Off: promote it unconditionally.",
    )
    reason: str | None = Field(None, description="Why: recorded on the version with the decision.")


class RollbackSettings(RegistrySettings):
    """Parameters of the rollback flow."""

    reason: str | None = Field(None, description="Why: logged and published with the rollback.")


def _gated_decider(
    settings: PromoteSettings, cfg: RunConfig, registered: RegistryVersion
) -> Callable[[], GateDecision]:
    """Evaluate the version once; return a function that gates it against the champion of the moment."""
    candidate = evaluate_flow(settings.evaluation(settings.version))

    def decide_now() -> GateDecision:
        champion_version, champion = champion_pass_at_1(
            cfg,
            registered.version,
            candidate["eval_tasks_hash"],
            lambda held: evaluate_flow(settings.evaluation(int(held.version)))["pass_at_1"],
        )
        decision = gate_candidate(
            candidate["pass_at_1"],
            champion,
            cfg.gate,
            champion_version=champion_version,
            label=f"version {registered.version}",
        )
        if not settings.reason:
            return decision
        return replace(decision, reasons=[*decision.reasons, f"requested because: {settings.reason}"])

    return decide_now


def _manual_decider(
    settings: PromoteSettings, cfg: RunConfig, registered: RegistryVersion
) -> Callable[[], GateDecision]:
    """A function that makes the by-hand decision against the champion of the moment."""

    def decide_now() -> GateDecision:
        reasons = [f"promoted by hand without the gate: {settings.reason or 'no reason given'}"]
        recorded = float("nan") if registered.pass_at_1 is None else registered.pass_at_1
        decision = GateDecision(
            True,
            reasons,
            candidate_pass_at_1=recorded,
            floor=cfg.gate.min_pass_at_1,
            champion_version=champion_version_task(cfg),
        )
        create_markdown_artifact(
            key="gate-decision",
            markdown=f"# Promotion: version {registered.version} promoted by hand\n\n{reasons[0]}",
            description=f"Version {registered.version} promoted by hand",
        )
        return decision

    return decide_now


@flow(name="turnstile-promote")
def promote_flow(settings: PromoteSettings) -> dict[str, Any]:
    """Make a registry version the champion, by hand or through the gate; the decision is recorded either way."""
    cfg = settings.load()
    registered = read_registry_version_task(cfg, settings.version)
    outcome = {"registered_model": registered.name, "version": registered.version, "gated": settings.gate}
    if registered.is_champion:
        get_run_logger().info(
            "%s version %s is already the champion; nothing to do", registered.name, registered.version
        )
        return {**outcome, "outcome": "unchanged", "reasons": ["it is already the champion"]}
    decide_now = (_gated_decider if settings.gate else _manual_decider)(settings, cfg, registered)
    decision, result = settle_promotion(
        lambda d: promote_task(cfg, registered.version, d, d.champion_version), decide_now, decide_now()
    )
    return {**outcome, "outcome": decision.outcome, "reasons": decision.reasons, "champion": result.champion}


@flow(name="turnstile-rollback")
def rollback_flow(settings: RollbackSettings = RollbackSettings()) -> dict[str, Any]:
    """Make the previous champion the champion again."""
    cfg = settings.load()
    restored = rollback_task(cfg)
    reason = settings.reason or "no reason given"
    name = cfg.tracking.registered_model
    create_markdown_artifact(
        key="rollback",
        markdown=f"# Rollback: {name} version {restored} is champion again\n\nReason: {reason}",
        description=f"Rollback to version {restored}",
    )
    return {"registered_model": name, "champion": restored, "reason": reason}
