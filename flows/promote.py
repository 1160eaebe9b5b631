"""Registry flows: promote a registry version to champion, or roll the champion back.

`promote_flow` ("turnstile-promote") makes version `settings.version` of
`tracking.registered_model` the `champion` (the old champion becomes `previous`):
- by hand (`gate` off, the default): unconditionally, recorded on the version as the decision
  `promoted` with the reason given;
- gated (`gate` on): the version is evaluated now on the gate part of the config's held-out tasks
  (greedy, as a `turnstile-evaluate` subflow run), and so is the champion (with none yet: the
  config's starting policy); `gate.*` of the config decides (rl_core/gate.py), and the decision,
  its reasons and every number are recorded either way.
Promoting the current champion changes nothing. Either way the promotion is compare-and-set on
the champion the decision was made against (tasks/promote.py): when another promotion or a
rollback changed the champion in between, the version is decided again against the new one
(gated: its evaluation on the same gate tasks; by hand: the same request, now replacing the new
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
from rl_core.evaluation import EvalReport
from rl_core.gate import GateDecision
from tasks.gate import gate_artifact_key, gate_baseline, gate_candidate
from tasks.links import flow_run_parameter
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

    def evaluation(self, model: str) -> EvaluateSettings:
        """Settings for a greedy evaluation of `model` (an evaluate flow model spec: "start", "version:N") on the
        gate part of the config's held-out tasks."""
        return EvaluateSettings(
            config_path=self.config_path,
            run_dir=self.run_dir,
            overrides=list(self.overrides),
            models=[model],
            samples=False,
            part="gate",
        )

    def gate_report(self, model: str) -> EvalReport:
        """`model`'s greedy evaluation of the gate tasks, made now as a `turnstile-evaluate` subflow run."""
        return EvalReport.from_dict(evaluate_flow(self.evaluation(model))["models"][0]["report"])


class PromoteSettings(RegistrySettings):
    """Parameters of the promote flow."""

    version: int = Field(
        ..., ge=1, description="Version of the registered model (tracking.registered_model) to make champion."
    )
    gate: bool = Field(
        False,
        description="Gate it first: evaluate it now and promote only "
        "if it passes the config's gate on the gate tasks (gate.*: the floor, truncation and error limits, no "
        "environment regressing beyond gate.env_tolerance, and an improvement over the champion shown by an exact "
        "McNemar test). Off: promote it unconditionally.",
    )
    reason: str | None = Field(None, description="Why: recorded on the version with the decision.")


class RollbackSettings(RegistrySettings):
    """Parameters of the rollback flow."""

    reason: str | None = Field(None, description="Why: logged and published with the rollback.")


def _gated_decider(
    settings: PromoteSettings, cfg: RunConfig, registered: RegistryVersion
) -> Callable[[], GateDecision]:
    """Evaluate the version once on the gate tasks; return a function that gates it against the champion of the
    moment (evaluated on the same tasks), or the starting policy when there is no champion."""
    candidate = settings.gate_report(f"version:{registered.version}")

    def decide_now() -> GateDecision:
        champion_version, name, baseline = gate_baseline(
            cfg,
            registered.version,
            candidate,
            lambda: settings.gate_report("start"),
            lambda held: settings.gate_report(f"version:{held.version}"),
        )
        decision = gate_candidate(
            candidate,
            baseline,
            cfg.gate,
            baseline_name=name,
            champion_version=champion_version,
            label=f"version {registered.version}",
            key=gate_artifact_key(f"{registered.name}-v{registered.version}"),
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
            key=gate_artifact_key(f"{registered.name}-v{registered.version}"),
            markdown=f"# Promotion: version {registered.version} promoted by hand\n\n{reasons[0]}",
            description=f"Version {registered.version} promoted by hand",
        )
        return decision

    return decide_now


def _registered_model_name(settings: Any) -> str:
    """`tracking.registered_model` of a registry flow's settings (the shipped default when they do not load)."""
    try:
        return settings.load().tracking.registered_model
    except (AttributeError, ValueError, FileNotFoundError):
        return RunConfig().tracking.registered_model


def promote_flow_run_name() -> str:
    """`promote-<registered model>-v<version>-gated` (or `-by-hand`): what the promote flow run acts on."""
    settings = flow_run_parameter("settings")
    version = getattr(settings, "version", None)
    how = "gated" if getattr(settings, "gate", False) else "by-hand"
    return f"promote-{_registered_model_name(settings)}-v{version}-{how}"


def rollback_flow_run_name() -> str:
    """`rollback-<registered model>`: the model whose champion alias the rollback flow run moves back."""
    return f"rollback-{_registered_model_name(flow_run_parameter('settings'))}"


@flow(name="turnstile-promote", flow_run_name=promote_flow_run_name)
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


@flow(name="turnstile-rollback", flow_run_name=rollback_flow_run_name)
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
