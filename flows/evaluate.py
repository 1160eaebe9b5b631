"""The evaluate flow: several models scored side by side on the same held-out tasks.

Contract of `evaluate_flow(settings)`:
- What: `settings.models`, each one of `start` (the config's `policy.path`, the starting policy),
  `champion` (the version of `tracking.registered_model` holding the alias `champion`; skipped with
  a logged note when there is none), `version:N` (version N of it) or a checkpoint folder on the
  machine that runs the flow (a relative path is resolved against the repository root, then the
  working directory, to an absolute path; the folder must hold a model a policy loads from:
  `checkpoint_problem`). Empty: `start` and `champion`. `settings.checkpoint` and `settings.version`
  add that one model (given alone, only that model is evaluated, as before `models` existed). A
  model given twice (the same spec, two spellings of one folder, `start` and its own folder,
  `champion` and `version:N` of the champion's version) is evaluated once, under the first spec and
  label; each repeat is listed in `skipped` with the reason "given twice: ..." (logged, and a line of
  the table's notes). Registry versions are downloaded into a temporary folder under the run
  directory (removed afterwards) and read, never changed.
- How: each model on the same tasks, the way the train flow evaluates (`evaluation.*`: greedy
  pass@1, and sampled pass@k / pass^k unless `samples` is off; `part`: all the held-out tasks, or
  only the gate or the selection part of them, `Evaluator.evaluate`). One `Evaluator` (one set of
  environments, one gateway with `rollout.agent`) plays every model, one model at a time.
- Where (MLflow): one run per model in the config's own experiment (`tracking.experiment`), named
  `<run_id>-<model>` and tagged with what was evaluated (`turnstile.evaluated`, the spec as
  `turnstile.model`, the registry version, the task-set hash `turnstile.eval_tasks_hash`, the part),
  with every metric at the checkpoint's step (0 for a model folder without trainer state) and the
  report (per-task outcomes included) as `evaluation/report.json`. The config's experiment rather
  than one of its own, so that an evaluation sits beside the training runs whose checkpoints it
  scores and MLflow's compare view plots their `val/` metrics together; the model runs are nested
  under a parent run `<run_id>` (MLflow's `mlflow.parentRunId` tag), so a job shows as one row
  that opens to its models. The comparison table and the PNG are logged once, on the parent
  (`comparison/comparison.md`, `comparison/comparison.png`): they belong to the job, not to any one
  model, and logging them on every model run would store copies that could disagree after a retry.
- Where (files and Prefect): `<storage.run_dir>/<run_id>/` holds `comparison.md`, `comparison.png`
  and `reports/<model>.json`, each {"model" (the spec), "label", "evaluated", "version" (registry
  version or null), "step", "part", "eval_tasks_hash", "report" (`EvalReport.to_dict()`: read it back
  with `EvalReport.from_dict(data["report"])`)}; `<model>` is the label as a slug (`artifact_slug`,
  made unique with -2, -3 when two labels share one); the table and the PNG are also Prefect
  artifacts (`eval-comparison-<run_id>`, `eval-comparison-plot-<run_id>`), beside each model's
  metric summary (`eval-<run_id>-<model>-step-<step>`).
- `run_id` defaults to `eval-<UTC time>-<6 hex digits>`. A run id already in use is refused
  (`check_run_id_free`): an existing `<storage.run_dir>/<run_id>` folder (an earlier evaluation, or
  a training run), or a run of that Turnstile run id (or of one of this job's model runs) in the
  config's experiment. Reusing it would add a second set of metrics at the same steps to the old
  MLflow runs and mix old and new files in the folder.

Returns {run_id, models: [{model (the spec), label, evaluated, version (registry version or None),
step, run_id, mlflow_run_id, pass_at_1, eval_tasks_hash, metrics, report (`EvalReport.to_dict()`)},
...] in the order given, skipped: [{model, reason}], table (markdown), plot (the PNG's path), folder,
part, samples, mlflow_uri, mlflow_run_id (the parent run)}.

Errors, raised before anything is created (no folder, no MLflow run): ValueError for a malformed
spec (`version:x`), no model left to evaluate, a folder that is not a checkpoint (a run folder, say:
"<path> is not a checkpoint folder (no config.json)") or a run id in use; FileNotFoundError for a
checkpoint folder that does not exist (an unknown word is read as a folder name); PermanentError
(tasks/tracking.py) for a registry version that does not exist.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from pydantic import Field, field_validator

from flows.parameters import RunSettings
from rl_core.atomic import write_text_atomically
from rl_core.comparison import compare
from rl_core.config import RunConfig
from rl_core.evaluation import EvalReport, Evaluator, Part
from rl_core.learner import load_start_policy
from rl_core.runs.checkpoint import STATE_FILE
from tasks.evaluate import evaluate_task, publish_comparison_task, record_evaluation_task, tag_evaluation_task
from tasks.links import flow_run_parameter, mlflow_run_url, mlflow_traces_url, name_flow_run
from tasks.promote import (
    CHAMPION_ALIAS,
    champion_version_task,
    checkpoint_step,
    download_registry_version_task,
    read_registry_version_task,
)
from tasks.registry import RegistryVersion
from tasks.tracking import RUN_ID_TAG, Tracker, end_tracking, mlflow_client, start_tracking, task_set_hash
from tasks.validate import artifact_slug

EVALUATED_TAG = "turnstile.evaluated"
EVALUATED_VERSION_TAG = "turnstile.evaluated_version"
MODEL_TAG = "turnstile.model"
EVAL_TASKS_HASH_TAG = "turnstile.eval_tasks_hash"
EVAL_PART_TAG = "turnstile.eval_part"
EVALUATION_TAG = "turnstile.evaluation"  # the job's run id, on the parent and on every model run
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: nests a run under another in the UI

DEFAULT_MODELS = ("start", "champion")
MODEL_SPEC_HELP = "start, champion, version:N (a registered model version) or a checkpoint folder"


# --------------------------------------------------------------------------- what to evaluate


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: `kind` start, champion, version (`version` N) or checkpoint (`spec` is the folder)."""

    spec: str
    kind: Literal["start", "champion", "version", "checkpoint"]
    version: int | None = None


def parse_model_spec(spec: str) -> ModelSpec:
    """`start`, `champion`, `version:N` (N a whole number >= 1) or else a checkpoint folder path.

    Raises ValueError for an empty spec or a `version:` without a whole number >= 1."""
    text = spec.strip()
    if not text:
        raise ValueError(f"a model spec is empty; give one of: {MODEL_SPEC_HELP}")
    if text in ("start", "champion"):
        return ModelSpec(text, text)
    if text.startswith("version:"):
        number = text.removeprefix("version:").strip()
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"model {spec!r}: a registry version is written version:N with N a whole number >= 1")
        return ModelSpec(text, "version", int(number))
    return ModelSpec(text, "checkpoint")


@dataclass(frozen=True)
class Target:
    """A model resolved to something loadable: a local `path` (the starting policy's path or a checkpoint
    folder) or a `registered` version to download. `label` names it in tables; `slug` (the label as
    `artifact_slug`, unique among the targets) names its report file and MLflow run; `evaluated` is the
    `turnstile.evaluated` tag; `identity` is the same for two specs naming one model (an absolute folder,
    a hub id, or the registry version)."""

    spec: str
    label: str
    evaluated: str
    identity: str
    slug: str = ""
    path: str | None = None
    registered: RegistryVersion | None = None


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def checkpoint_problem(folder: Path) -> str | None:
    """What keeps `folder` from loading as a policy (`rl_core.model.policy.load_policy`), in a few words, or None.

    A checkpoint (rl_core/runs/checkpoint.py) or model folder holds `config.json`, weights (one of
    `WEIGHT_FILES`) and a tokenizer (one of `TOKENIZER_FILES`); a LoRA checkpoint holds `adapter_config.json`
    and the adapter weights (one of `ADAPTER_FILES`; its tokenizer may be its base's). A GGUF file is not
    loaded directly: rl_core/model/gguf.py `convert_gguf` turns it into a model folder first."""

    def has(*names: str) -> bool:
        return any((folder / n).is_file() for n in names)

    if has("adapter_config.json"):
        return None if has(*ADAPTER_FILES) else f"no adapter weights ({' or '.join(ADAPTER_FILES)})"
    if not has("config.json"):
        if any(folder.glob("*.gguf")):
            return "no config.json; a GGUF file loads only once rl_core/model/gguf.py convert_gguf made a folder of it"
        return "no config.json"
    if not has(*WEIGHT_FILES):
        return f"no model weights ({' or '.join(WEIGHT_FILES)})"
    if not has(*TOKENIZER_FILES):
        return f"no tokenizer ({' or '.join(TOKENIZER_FILES)})"
    return None


def local_checkpoint(cfg: RunConfig, checkpoint: str) -> Path:
    """The absolute folder `checkpoint` names (relative: against the repository root, then the working directory).

    Raises FileNotFoundError, naming the spec, when there is no such folder, and ValueError when the folder
    holds no model (`checkpoint_problem`: "<folder> is not a checkpoint folder (no config.json)")."""
    folder = Path(_policy_config(cfg, checkpoint, "probe").resolved_policy_path())
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model {checkpoint!r} is neither start, champion nor version:N, and no checkpoint folder "
            f"{checkpoint!r} exists on this machine (a relative path is read against the repository root, then "
            f"the working directory {Path.cwd()})"
        )
    folder = folder.resolve()
    problem = checkpoint_problem(folder)
    if problem:
        raise ValueError(f"model {checkpoint!r}: {folder} is not a checkpoint folder ({problem})")
    return folder


def _start_identity(cfg: RunConfig) -> str:
    """The starting policy as a `Target.identity`: its absolute folder, or the hub id as given."""
    path = Path(cfg.resolved_policy_path())
    return str(path.resolve()) if path.is_dir() else cfg.policy.path


def _unique_slugs(labels: list[str]) -> list[str]:
    """`artifact_slug` of each label, with -2, -3, ... added to a slug an earlier label already has."""
    slugs: list[str] = []
    for label in labels:
        base = slug = artifact_slug(label)
        n = 1
        while slug in slugs:
            n += 1
            slug = f"{base}-{n}"
        slugs.append(slug)
    return slugs


def resolve_models(
    cfg: RunConfig,
    specs: list[str],
    read_version: Callable[[RunConfig, int | str | None], RegistryVersion],
    read_champion: Callable[[RunConfig], str | None],
) -> tuple[list[Target], list[dict[str, str]]]:
    """The targets of `specs` (each parsed by `parse_model_spec`) and the skipped ones ({"model", "reason"}:
    `champion` when `read_champion` finds none; a spec naming a model an earlier spec names, "given twice").

    `read_version(cfg, n)` reads version n of `tracking.registered_model` (tasks.registry.registry_version,
    or its Prefect task); `read_champion(cfg)` the version holding `champion` (None: none). Raises
    ValueError (malformed spec, nothing left, a folder that is not a checkpoint), FileNotFoundError (no such
    checkpoint folder) or what `read_version` raises for a missing version (PermanentError)."""
    parsed = [parse_model_spec(s) for s in specs]
    found: list[Target] = []
    skipped: list[dict[str, str]] = []
    name = cfg.tracking.registered_model
    for spec in parsed:
        if spec.kind == "start":
            target = Target(
                spec.spec, "start", f"starting policy {cfg.policy.path}", _start_identity(cfg), path=cfg.policy.path
            )
        elif spec.kind == "checkpoint":
            folder = local_checkpoint(cfg, spec.spec)
            target = Target(spec.spec, spec.spec, f"checkpoint {folder}", str(folder), path=str(folder))
        elif spec.kind == "champion":
            held = read_champion(cfg)
            if held is None:
                skipped.append(
                    {"model": "champion", "reason": f"registered model {name!r} has no {CHAMPION_ALIAS!r} yet"}
                )
                continue
            registered = read_version(cfg, held)
            label = f"champion (v{registered.version})"
            evaluated = f"{name} champion version {registered.version}"
            target = Target(spec.spec, label, evaluated, f"{name} version {registered.version}", registered=registered)
        else:
            registered = read_version(cfg, spec.version)
            label = f"version {registered.version}"
            evaluated = f"{name} version {registered.version}"
            target = Target(spec.spec, label, evaluated, evaluated, registered=registered)
        first = next((t for t in found if t.identity == target.identity), None)
        if first is None:
            found.append(target)
        else:
            same = "" if first.spec == spec.spec else f"the same model as {first.spec!r}, "
            skipped.append({"model": spec.spec, "reason": f"given twice: {same}evaluated once as {first.label!r}"})
    targets = [replace(t, slug=slug) for t, slug in zip(found, _unique_slugs([t.label for t in found]))]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models would share a name in the comparison: {labels}")
    if not targets:
        raise ValueError(
            "nothing to evaluate: "
            + "; ".join(f"{s['model']} skipped ({s['reason']})" for s in skipped)
            + f"; give models ({MODEL_SPEC_HELP})"
        )
    return targets, skipped


def model_run_id(run_id: str, target: Target) -> str:
    """The Turnstile run id (and MLflow run name) of one model's evaluation in job `run_id`: `<run_id>-<slug>`."""
    return f"{run_id}-{target.slug}"


def check_run_id_free(cfg: RunConfig, run_id: str, targets: list[Target]) -> None:
    """Raise ValueError, naming `run_id` and saying to choose another, when an evaluation job `run_id` of
    `targets` would reuse something: the folder `<storage.run_dir>/<run_id>` exists, or the config's
    experiment (`tracking.experiment`) holds a run tagged `turnstile.run_id` `run_id` (the job's parent run)
    or `model_run_id(run_id, target)` of a target. Reads only: creates no folder, experiment or run (the
    run directory itself is made if missing, for the SQLite store)."""
    folder = Path(cfg.storage.run_dir) / run_id
    again = "choose another run id (or give none for a fresh eval-<UTC time>-<hex>)"
    if folder.exists():
        raise ValueError(f"run id {run_id!r} is already used: {folder} exists; {again}")
    client = mlflow_client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is None:
        return
    for name in (run_id, *(model_run_id(run_id, t) for t in targets)):
        if client.search_runs([experiment.experiment_id], f"tags.`{RUN_ID_TAG}` = '{name}'", max_results=1):
            raise ValueError(
                f"run id {run_id!r} is already used: MLflow experiment {cfg.tracking.experiment!r} has a run "
                f"{name!r}; {again}"
            )


# --------------------------------------------------------------------------- the flow's parameters


class EvaluateSettings(RunSettings):
    """Parameters of the evaluate flow: which models to score side by side on the config's held-out tasks."""

    models: list[str] | None = Field(
        None,
        description="Models to evaluate side by side, each one of: start (the config's policy.path), champion "
        "(skipped with a note when there is none), version:N (a registered model version), or a checkpoint folder "
        "on the machine that runs the flow, e.g. runs/<run_id>/checkpoints/step-000010. Empty: start and champion "
        "(or only the checkpoint / version below when one is given).",
    )
    checkpoint: str | None = Field(
        None,
        description="A checkpoint folder to evaluate too, e.g. runs/<run_id>/checkpoints/step-000010, on the "
        "machine that runs the flow.",
    )
    version: int | None = Field(
        None,
        ge=1,
        description="A version of the registered model (tracking.registered_model) to evaluate too.",
    )
    samples: bool = Field(
        True,
        description="Also sample evaluation.num_samples episodes per task for pass@k and pass^k (slower); off: "
        "greedy pass@1 only.",
    )
    max_tasks: int | None = Field(
        None, ge=1, description="Held-out tasks per environment (evaluation.max_tasks; empty: the config's)."
    )
    part: Part = Field(
        "all",
        description="Which held-out tasks: all, or only the gate or the selection part of them (the split by "
        "evaluation.gate_fraction).",
    )

    @field_validator("models")
    @classmethod
    def _specs_parse(cls, models: list[str] | None) -> list[str] | None:
        for spec in models or []:
            parse_model_spec(spec)  # raises ValueError naming the spec
        return models

    def model_specs(self) -> list[str]:
        """The specs to evaluate, in order: `models` (default `start`, `champion` unless a checkpoint or
        version is given), then `checkpoint` and `version:<version>`. A repeat stays (`resolve_models`
        evaluates it once and notes it)."""
        specs = list(self.models or ([] if self.checkpoint or self.version is not None else DEFAULT_MODELS))
        if self.checkpoint:
            specs.append(self.checkpoint)
        if self.version is not None:
            specs.append(f"version:{self.version}")
        return [s.strip() for s in specs]

    def typed_values(self) -> dict[str, Any]:
        extra = {} if self.max_tasks is None else {"evaluation.max_tasks": self.max_tasks}
        return {**extra, **super().typed_values()}


# --------------------------------------------------------------------------- the flow


def _policy_config(cfg: RunConfig, policy_path: str, run_id: str) -> RunConfig:
    """`cfg` evaluating the policy at `policy_path` as run `run_id`."""
    return cfg.model_copy(
        update={
            "policy": cfg.policy.model_copy(update={"path": policy_path}),
            "storage": cfg.storage.model_copy(update={"run_id": run_id}),
        }
    )


def _step_of(folder: Path) -> int:
    """The training step a checkpoint folder holds (0 for a plain model folder or a hub id)."""
    return checkpoint_step(folder) if (folder / STATE_FILE).is_file() else 0


def _default_run_id() -> str:
    """`eval-<UTC time>-<6 hex digits>`: in a flow run, its creation time and the start of its id (what
    `evaluate_flow_run_name` names the flow run before the body starts; `-attempt-<n>` added when the flow
    run is run again, whose first attempt's folder exists), else the time now and random digits. Two
    evaluations started in the same second (the promote flow's candidate and champion) get runs and
    folders of their own."""
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    if flow_run is None:
        return f"eval-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    created = flow_run.created or datetime.now(timezone.utc)
    attempt = f"-attempt-{flow_run.run_count}" if flow_run.run_count > 1 else ""
    return f"eval-{created:%Y%m%d-%H%M%S}-{flow_run.id.hex[:6]}{attempt}"


def evaluate_flow_run_name() -> str:
    """The evaluate flow run's name: its evaluation run id (`run_id`, else `_default_run_id()`), known before
    the flow's body starts; settings that do not load fall back to the default id."""
    settings = flow_run_parameter("settings")
    try:
        if not isinstance(settings, EvaluateSettings):
            settings = EvaluateSettings.model_validate(settings or {})
        return settings.load().storage.run_id or _default_run_id()
    except (ValueError, FileNotFoundError):
        return _default_run_id()


def _evaluate_target(
    cfg: RunConfig,
    evaluator: Evaluator,
    target: Target,
    folder: Path,
    run_id: str,
    parent: Tracker,
    job_run_id: str,
    settings: EvaluateSettings,
) -> dict[str, Any]:
    """Evaluate the policy at `folder` (the target's local path or download) as MLflow run `run_id` nested
    under the job's run `parent`; returns the model's entry of the flow's result."""
    run_cfg = _policy_config(cfg, str(folder), run_id)
    policy = load_start_policy(run_cfg)
    policy.version = _step_of(Path(run_cfg.resolved_policy_path()))
    tracker = start_tracking(run_cfg, run_id)
    try:
        evaluate = evaluate_task.with_options(task_run_name=f"evaluate-{target.slug}")
        report = evaluate(evaluator, policy, run_id, samples=settings.samples, part=settings.part, tracker=tracker)
        tasks_hash = task_set_hash(report.task_success)
        tags = {
            EVALUATED_TAG: target.evaluated,
            MODEL_TAG: target.spec,
            EVAL_TASKS_HASH_TAG: tasks_hash,
            EVAL_PART_TAG: settings.part,
            EVALUATION_TAG: job_run_id,
            PARENT_RUN_TAG: parent.mlflow_run_id,
        }
        if target.registered is not None:
            tags[EVALUATED_VERSION_TAG] = target.registered.version
        record = record_evaluation_task.with_options(task_run_name=f"record-evaluation-{target.slug}")
        record(tracker, report, policy.version, tags)
    except BaseException:
        end_tracking(tracker, "FAILED")
        raise
    end_tracking(tracker, "FINISHED")
    return {
        "model": target.spec,
        "label": target.label,
        "evaluated": target.evaluated,
        "version": None if target.registered is None else target.registered.version,
        "step": policy.version,
        "run_id": run_id,
        "mlflow_run_id": tracker.mlflow_run_id,
        "pass_at_1": report.pass_at_1,
        "eval_tasks_hash": tasks_hash,
        "metrics": dict(report.metrics),
        "report": report.to_dict(),
    }


@flow(name="turnstile-evaluate", flow_run_name=evaluate_flow_run_name)
def evaluate_flow(settings: EvaluateSettings = EvaluateSettings()) -> dict[str, Any]:
    """Evaluate several models (the starting policy, the champion, registry versions, checkpoint folders) side
    by side on the same held-out tasks: an MLflow run each, and one comparison table and PNG."""
    logger = get_run_logger()
    cfg = settings.load()
    run_id = cfg.storage.run_id or _default_run_id()
    name_flow_run(run_id)  # a no-op but for a flow run run again (its run id gets -attempt-<n>)
    cfg = cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"run_id": run_id})})
    targets, skipped = resolve_models(cfg, settings.model_specs(), read_registry_version_task, champion_version_task)
    for s in skipped:
        logger.info("%s skipped: %s", s["model"], s["reason"])
    check_run_id_free(cfg, run_id, targets)
    which = "all the" if settings.part == "all" else f"the {settings.part} part of the"
    logger.info("evaluating %s on %s held-out tasks", ", ".join(t.label for t in targets), which)

    folder = Path(cfg.storage.run_dir) / run_id
    try:
        folder.mkdir(parents=True)  # not exist_ok: of two jobs started with one run id, the second stops here
    except FileExistsError:
        raise ValueError(f"run id {run_id!r} is already used: {folder} exists; choose another run id") from None
    (folder / "reports").mkdir()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars per registry download
    parent = start_tracking(cfg, run_id)
    evaluator = Evaluator.from_config(cfg)
    models: list[dict[str, Any]] = []
    try:
        for target in targets:
            with contextlib.ExitStack() as scratch:
                if target.registered is not None:
                    download = scratch.enter_context(tempfile.TemporaryDirectory(dir=folder, prefix=".download-"))
                    download_version = download_registry_version_task.with_options(
                        task_run_name=f"download-{target.slug}"
                    )
                    local = download_version(cfg, target.registered, download)
                else:
                    local = Path(target.path)
                entry = _evaluate_target(
                    cfg, evaluator, target, local, model_run_id(run_id, target), parent, run_id, settings
                )
            write_text_atomically(
                folder / "reports" / f"{target.slug}.json", json.dumps(report_file(entry, settings.part), indent=1)
            )
            models.append(entry)
        reports = {m["label"]: EvalReport.from_dict(m["report"]) for m in models}
        notes = _notes(cfg, settings, models, skipped)
        comparison = compare(reports)
        table = comparison.markdown(f"Held-out evaluation {run_id}", notes)
        tag_evaluation_task(
            parent,
            {
                EVALUATION_TAG: run_id,
                EVAL_TASKS_HASH_TAG: models[0]["eval_tasks_hash"],
                EVAL_PART_TAG: settings.part,
                EVALUATED_TAG: ", ".join(m["label"] for m in models),
            },
        )
        _, plot = publish_comparison_task(run_id, comparison, table, folder, parent)
    except BaseException:
        end_tracking(parent, "FAILED")
        raise
    finally:
        evaluator.close()
    end_tracking(parent, "FINISHED")
    run_url = mlflow_run_url(cfg, parent.experiment_id, parent.mlflow_run_id)
    traces_url = mlflow_traces_url(cfg, parent.experiment_id)
    get_run_logger().info(
        "MLflow run of %s (the models' runs nested under it): %s; traces: %s", run_id, run_url, traces_url
    )
    return {
        "run_id": run_id,
        "models": models,
        "skipped": skipped,
        "table": table,
        "plot": str(plot),
        "folder": str(folder),
        "part": settings.part,
        "samples": settings.samples,
        "mlflow_uri": parent.uri,
        "mlflow_run_id": parent.mlflow_run_id,
        "mlflow_run_url": run_url,
        "mlflow_traces_url": traces_url,
    }


def report_file(entry: dict[str, Any], part: str) -> dict[str, Any]:
    """The content of `reports/<model>.json` for one model's entry of the flow's result: which model, step,
    part and task set, and the report (`EvalReport.from_dict(data["report"])` reads it back)."""
    keys = ("model", "label", "evaluated", "version", "step")
    return {
        **{k: entry[k] for k in keys},
        "part": part,
        "eval_tasks_hash": entry["eval_tasks_hash"],
        "report": entry["report"],
    }


def _notes(
    cfg: RunConfig, settings: EvaluateSettings, models: list[dict[str, Any]], skipped: list[dict[str, str]]
) -> list[str]:
    """The lines under the comparison's title: what was evaluated on which tasks, and what was skipped."""
    e = cfg.evaluation
    sampled = (
        f"{e.num_samples} sampled episodes per task at temperature {e.sample_temperature}"
        if settings.samples
        else "greedy only (no samples)"
    )
    lines = [
        f"Tasks: {e.split} split, {settings.part} part, task-set hash {models[0]['eval_tasks_hash']}; {sampled}.",
        "",
        *(f"- {m['label']}: {m['evaluated']}, step {m['step']}" for m in models),
    ]
    lines += [f"- {s['model']}: skipped ({s['reason']})" for s in skipped]
    return lines
