"""Evaluation as a job of its own: `turnstile evaluate` and the evaluate flow (flows/evaluate.py).

The flow tests score the shipped reference checkpoint and a copy of it with perturbed weights (a
checkpoint at step 5) on 2 held-out tasks per environment, with 2 samples per task, in a temporary
Prefect server and a fresh MLflow store under tmp_path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file

import flows.cli
from flows.evaluate import DEFAULT_MODELS, EvaluateSettings, parse_model_spec
from rl_core.comparison import ALL, compare
from rl_core.evaluation import EvalReport
from tasks.tracking import readable_value
from tasks.validate import artifact_slug

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "data" / "checkpoints" / "reference"
SMALL = ["evaluation.max_tasks=2", "evaluation.num_samples=2", "evaluation.pass_k=[1,2]", "rollout.max_turns=4"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- model specs and settings


def test_model_specs_parse_and_default_to_start_and_champion():
    assert [parse_model_spec(s).kind for s in ("start", "champion", "version:3", "runs/x/step-000010")] == [
        "start",
        "champion",
        "version",
        "checkpoint",
    ]
    assert parse_model_spec("version:3").version == 3
    for bad in ("version:x", "version:0", "version:", " "):
        with pytest.raises(ValueError):
            parse_model_spec(bad)
    assert EvaluateSettings().model_specs() == list(DEFAULT_MODELS) == ["start", "champion"]
    # checkpoint and version keep working: alone they are the one model; with models they are added
    assert EvaluateSettings(checkpoint="runs/a/step-1").model_specs() == ["runs/a/step-1"]
    assert EvaluateSettings(version=2).model_specs() == ["version:2"]
    # a repeat stays in the specs: resolve_models evaluates it once and notes it
    assert EvaluateSettings(models=["start", "version:2"], version=2, checkpoint="c").model_specs() == [
        "start",
        "version:2",
        "c",
        "version:2",
    ]
    with pytest.raises(ValueError, match="version:N"):
        EvaluateSettings(models=["version:two"])


# --------------------------------------------------------------------------- resolving specs to models


def fake_registry(champion: str | None = "3"):
    """`read_version` and `read_champion` for resolve_models over a registry whose versions all exist."""
    from tasks.registry import RegistryVersion

    def read_version(cfg, version):
        return RegistryVersion("turnstile-policy", str(version), f"file:///v{version}", None, str(version) == champion)

    return read_version, lambda cfg: champion


def test_one_model_named_twice_is_evaluated_once_with_a_note(tmp_path, monkeypatch):
    from flows.evaluate import resolve_models
    from rl_core.config import load_config

    cfg = load_config(None)
    checkpoint = perturbed_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    specs = [
        "start",
        "checkpoints/step-000005",
        "./checkpoints/step-000005/",  # the same folder, spelled differently
        str(checkpoint),
        "start",
        str(REFERENCE),  # the starting policy's own folder
        "champion",
        "version:3",  # the champion's version
        "version:4",
    ]
    targets, skipped = resolve_models(cfg, specs, *fake_registry("3"))
    assert [(t.spec, t.label, t.slug) for t in targets] == [
        ("start", "start", "start"),
        ("checkpoints/step-000005", "checkpoints/step-000005", "checkpoints-step-000005"),
        ("champion", "champion (v3)", "champion-v3"),
        ("version:4", "version 4", "version-4"),
    ]
    assert targets[1].path == str(checkpoint) and Path(targets[1].path).is_absolute()
    assert skipped == [
        {"model": "./checkpoints/step-000005/", "reason": "given twice: the same model as "
         "'checkpoints/step-000005', evaluated once as 'checkpoints/step-000005'"},
        {"model": str(checkpoint), "reason": "given twice: the same model as 'checkpoints/step-000005', "
         "evaluated once as 'checkpoints/step-000005'"},
        {"model": "start", "reason": "given twice: evaluated once as 'start'"},
        {"model": str(REFERENCE), "reason": "given twice: the same model as 'start', evaluated once as 'start'"},
        {"model": "version:3", "reason": "given twice: the same model as 'champion', evaluated once as "
         "'champion (v3)'"},
    ]  # fmt: skip


def test_two_models_whose_names_make_one_slug_get_files_and_runs_of_their_own(tmp_path, monkeypatch):
    from flows.evaluate import resolve_models
    from rl_core.config import load_config

    for name in ("a b", "a_b"):
        shutil.copytree(REFERENCE, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    targets, _ = resolve_models(load_config(None), ["a b", "a_b"], *fake_registry(None))
    assert [t.slug for t in targets] == ["a-b", "a-b-2"]


def test_a_folder_without_a_model_is_not_a_checkpoint(tmp_path):
    from flows.evaluate import checkpoint_problem

    run_folder = tmp_path / "run"
    (run_folder / "checkpoints").mkdir(parents=True)
    (run_folder / "config.yaml").write_text("iterations: 2\n")
    assert checkpoint_problem(run_folder) == "no config.json"
    assert checkpoint_problem(REFERENCE) is None
    no_weights = tmp_path / "no-weights"
    shutil.copytree(REFERENCE, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    assert checkpoint_problem(no_weights).startswith("no model weights (model.safetensors or ")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(REFERENCE, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert checkpoint_problem(no_tokenizer).startswith("no tokenizer (tokenizer.json or ")
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "model.Q4_1.gguf").write_bytes(b"GGUF")
    assert "convert_gguf" in checkpoint_problem(gguf)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert checkpoint_problem(adapter) == "no adapter weights (adapter_model.safetensors or adapter_model.bin)"
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    assert checkpoint_problem(adapter) is None


# --------------------------------------------------------------------------- the command line's errors


@pytest.fixture()
def run_dir(tmp_path, empty_store, monkeypatch) -> Path:
    """A run folder with an empty, migrated MLflow store; the command line leaves the process environment alone."""
    folder = tmp_path / "runs"
    folder.mkdir()
    shutil.copy(empty_store, folder / "mlflow.db")
    monkeypatch.setattr("flows.evaluate_cli.prepare_environment", lambda cfg: None)
    return folder


def cli_error(capsys, run_dir: Path, *args: str) -> str:
    assert flows.cli.main(["evaluate", "--set", f"storage.run_dir={run_dir}", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    [line] = [x for x in lines if x.startswith("turnstile:")]
    return line


def test_cli_refuses_a_malformed_version_spec_in_one_line(capsys, run_dir):
    line = cli_error(capsys, run_dir, "--model", "start", "--model", "version:two")
    assert line.startswith("turnstile: ") and "'version:two'" in line and "version:N" in line


def test_cli_refuses_a_missing_checkpoint_folder_in_one_line(capsys, run_dir):
    line = cli_error(capsys, run_dir, "--model", "no/such/checkpoint")
    assert "no checkpoint folder 'no/such/checkpoint' exists" in line
    assert line.startswith("turnstile: model 'no/such/checkpoint' is neither start, champion nor version:N")


def test_cli_refuses_a_folder_that_is_not_a_checkpoint_before_anything_is_created(capsys, run_dir):
    run_folder = run_dir / "trained"  # a training run's folder, not one of its checkpoints
    (run_folder / "checkpoints").mkdir(parents=True)
    line = cli_error(capsys, run_dir, "--model", str(run_folder), "--run-id", "eval-x")
    assert line == f"turnstile: model {str(run_folder)!r}: {run_folder} is not a checkpoint folder (no config.json)"
    assert not (run_dir / "eval-x").exists()


def test_cli_refuses_a_run_id_already_used_before_anything_is_created(capsys, run_dir):
    (run_dir / "eval-a" / "reports").mkdir(parents=True)  # an earlier evaluation's folder
    line = cli_error(capsys, run_dir, "--model", "start", "--run-id", "eval-a")
    assert line == (
        f"turnstile: run id 'eval-a' is already used: {run_dir / 'eval-a'} exists; choose another run id (or give "
        "none for a fresh eval-<UTC time>-<hex>)"
    )
    # no folder, but an MLflow run of that name in the config's experiment (the folder was removed)
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.create_experiment("turnstile")
    client.create_run(experiment, run_name="eval-b", tags={"turnstile.run_id": "eval-b"})
    line = cli_error(capsys, run_dir, "--model", "start", "--run-id", "eval-b")
    assert line.startswith("turnstile: run id 'eval-b' is already used: MLflow experiment 'turnstile' has a run")
    # ... or a model run the job would make
    client.create_run(experiment, run_name="eval-c-start", tags={"turnstile.run_id": "eval-c-start"})
    line = cli_error(capsys, run_dir, "--model", "start", "--run-id", "eval-c")
    assert "has a run 'eval-c-start'; choose another run id" in line
    assert not (run_dir / "eval-b").exists() and not (run_dir / "eval-c").exists()
    assert len(client.search_runs([experiment])) == 2  # none made


def test_cli_refuses_a_registry_version_that_does_not_exist_in_one_line(capsys, run_dir):
    line = cli_error(capsys, run_dir, "--model", "version:7")
    assert "has no version 7" in line and "turnstile-policy" in line


def test_cli_refuses_a_bad_config_value_in_one_line(capsys, run_dir):
    line = cli_error(capsys, run_dir, "--set", "evaluation.num_samples=-1")
    assert line.startswith("turnstile: bad config: evaluation.num_samples")


def test_cli_with_only_a_missing_champion_has_nothing_to_evaluate(capsys, run_dir):
    line = cli_error(capsys, run_dir, "--model", "champion")
    assert line == (
        "turnstile: nothing to evaluate: champion skipped (registered model 'turnstile-policy' has no 'champion' "
        "yet); give models (start, champion, version:N (a registered model version) or a checkpoint folder)"
    )


# --------------------------------------------------------------------------- the flow


def perturbed_checkpoint(root: Path, step: int = 5, scale: float = 0.05) -> Path:
    """The reference policy with every weight moved by `scale` * N(0, 1) noise, saved as a checkpoint at `step`."""
    folder = root / "checkpoints" / f"step-{step:06d}"
    shutil.copytree(REFERENCE, folder)
    weights = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    noisy = {k: v + scale * torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in weights.items()}
    save_file(noisy, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def table_rows(markdown: str, scope: str) -> dict[str, list[str]]:
    """The rows (label -> cells after the label) of the table under `## <scope>`."""
    lines = markdown.splitlines()
    start = lines.index(f"## {scope}") + 2
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        label, *cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[label] = cells
    return rows


def test_evaluate_flow_scores_two_models_side_by_side(prefect_harness, tmp_path, empty_store):
    from prefect.artifacts import Artifact

    from flows.evaluate import evaluate_flow

    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    shutil.copy(empty_store, run_dir / "mlflow.db")
    checkpoint = perturbed_checkpoint(tmp_path)
    models = ["start", str(checkpoint), f"{checkpoint}/"]  # the checkpoint twice: evaluated once
    settings = EvaluateSettings(overrides=SMALL, run_dir=str(run_dir), run_id="eval-two", models=models)
    result = evaluate_flow(settings)

    assert [m["label"] for m in result["models"]] == ["start", str(checkpoint)]
    note = f"given twice: the same model as {str(checkpoint)!r}, evaluated once as {str(checkpoint)!r}"
    assert result["skipped"] == [{"model": f"{checkpoint}/", "reason": note}]
    assert f"- {checkpoint}/: skipped ({note})" in result["table"]
    assert [m["step"] for m in result["models"]] == [0, 5]
    reports = {m["label"]: EvalReport.from_dict(m["report"]) for m in result["models"]}
    assert all(len(r.task_success) == 6 and r.pass_k == (1, 2) for r in reports.values())  # 3 envs x 2 tasks
    assert len({m["eval_tasks_hash"] for m in result["models"]}) == 1

    # one MLflow run per model, nested under the job's run, in the config's experiment
    client = MlflowClient(result["mlflow_uri"])
    experiment = client.get_experiment_by_name("turnstile")
    runs = client.search_runs([experiment.experiment_id], "tags.`turnstile.evaluation` = 'eval-two'")
    assert len(runs) == 3
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    assert result["mlflow_run_url"] == (
        f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/runs/{result['mlflow_run_id']}"
    )  # the address the evaluate command prints, as the train flow's closing summary does
    children = {r.data.tags["turnstile.model"]: r for r in runs if r.info.run_id != result["mlflow_run_id"]}
    assert set(children) == {"start", str(checkpoint)}
    for model in result["models"]:
        run = children[model["model"]]
        assert run.info.run_id == model["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["turnstile.eval_tasks_hash"] == model["eval_tasks_hash"]
        [point] = client.get_metric_history(run.info.run_id, "val/pass_at_1")
        assert (point.step, point.value) == (model["step"], readable_value(model["pass_at_1"]))
        assert run.data.metrics["val/pass_at_k/2"] == readable_value(model["metrics"]["val/pass_at_k/2"])
    assert parent.info.status == "FINISHED"
    assert sorted(a.path for a in client.list_artifacts(parent.info.run_id, "comparison")) == [
        "comparison/comparison.md",
        "comparison/comparison.png",
    ]
    stored = client.download_artifacts(parent.info.run_id, "comparison/comparison.md", str(tmp_path))
    assert Path(stored).read_text() == result["table"]

    # the table: a row per model in every scope, the cells the reports' own metrics
    folder = run_dir / "eval-two"
    assert (folder / "comparison.md").read_text() == result["table"]
    comparison = compare(reports)
    assert comparison.scopes == [ALL, "refunds", "inventory", "access"]
    for scope in comparison.scopes:
        rows = table_rows(result["table"], scope)
        assert list(rows) == list(reports)
        for label, report in reports.items():
            metrics = report.metrics if scope == ALL else {f"val/{k}": v for k, v in report.env_metrics(scope).items()}
            pass_at_1, _, pass_at_2, pass_hat_2, reward = rows[label][:5]
            assert pass_at_1 == f"{metrics['val/pass_at_1']:.3f}"
            assert pass_at_2 == f"{metrics['val/pass_at_k/2']:.3f}"
            assert pass_hat_2 == f"{metrics['val/pass_hat_k/2']:.3f}"
            assert reward == f"{metrics['val/reward_mean']:.3f}"
            assert rows[label][-1] == ("6" if scope == ALL else "2")
        if scope != ALL:
            assert {label: r.per_env[scope] for label, r in reports.items()} == {
                label: comparison.values[scope][label]["pass_at_1"] for label in reports
            }

    # the PNG, on disk and in Prefect; the table in Prefect
    plot = Path(result["plot"])
    assert plot == folder / "comparison.png" and plot.read_bytes()[:8] == PNG_MAGIC
    start = result["models"][0]
    assert json.loads((folder / "reports" / "start.json").read_text()) == {
        "model": "start",
        "label": "start",
        "evaluated": start["evaluated"],
        "version": None,
        "step": 0,
        "part": "all",
        "eval_tasks_hash": start["eval_tasks_hash"],
        "report": start["report"],
    }
    stored = json.loads((folder / "reports" / f"{artifact_slug(str(checkpoint))}.json").read_text())
    assert (stored["model"], stored["step"]) == (str(checkpoint), 5)
    assert EvalReport.from_dict(stored["report"]).task_success == reports[str(checkpoint)].task_success
    assert sorted(p.name for p in (folder / "reports").iterdir()) == sorted(
        ["start.json", f"{artifact_slug(str(checkpoint))}.json"]
    )
    table_artifact = Artifact.get("eval-comparison-eval-two")
    assert table_artifact is not None and table_artifact.type == "markdown"
    assert "## refunds" in str(table_artifact.data) and "![models per environment](data:image/png;base64," in str(
        table_artifact.data
    )  # the picture inside the card, no separate image card printing its data URL
    assert table_artifact.flow_run_id is not None and table_artifact.task_run_id is None  # on the flow run
    assert Artifact.get("eval-comparison-plot-eval-two") is None


def test_evaluate_flow_defaults_to_start_and_champion(prefect_harness, tmp_path, empty_store):
    """No champion: only the starting policy, the champion skipped with a note. A registered champion: both,
    the champion's row named by its version and its run tagged with it."""
    from flows.evaluate import evaluate_flow
    from rl_core.config import load_config
    from tasks.registry import CHAMPION_ALIAS, register_checkpoint
    from tasks.tracking import Tracker

    run_dir = tmp_path / "runs"
    run_dir.mkdir()
    shutil.copy(empty_store, run_dir / "mlflow.db")
    common = {"overrides": SMALL, "run_dir": str(run_dir), "samples": False}

    alone = evaluate_flow(EvaluateSettings(run_id="eval-alone", **common))
    assert [m["label"] for m in alone["models"]] == ["start"]
    assert alone["skipped"] == [
        {"model": "champion", "reason": "registered model 'turnstile-policy' has no 'champion' yet"}
    ]
    assert "- champion: skipped (registered model 'turnstile-policy' has no 'champion' yet)" in alone["table"]
    assert "pass@2" not in alone["table"]  # greedy only

    cfg = load_config(None, SMALL, {"storage.run_dir": str(run_dir), "storage.run_id": "trained"})
    tracker = Tracker.start(cfg, "trained")
    version = register_checkpoint(tracker.client, cfg, perturbed_checkpoint(tmp_path), tracker.mlflow_run_id, {})
    tracker.client.set_registered_model_alias(cfg.tracking.registered_model, CHAMPION_ALIAS, version)

    both = evaluate_flow(EvaluateSettings(run_id="eval-both", part="gate", **common))
    assert [m["label"] for m in both["models"]] == ["start", f"champion (v{version})"]
    assert [(m["version"], m["step"]) for m in both["models"]] == [(None, 0), (version, 5)]
    assert both["skipped"] == []
    champion_run = MlflowClient(both["mlflow_uri"]).get_run(both["models"][1]["mlflow_run_id"])
    assert champion_run.data.tags["turnstile.evaluated_version"] == version
    assert champion_run.data.tags["turnstile.eval_part"] == "gate"
    gate = EvalReport.from_dict(both["models"][0]["report"])
    assert set(gate.task_success) < set(EvalReport.from_dict(alone["models"][0]["report"]).task_success)
    assert not list(run_dir.glob("eval-both/.download-*"))  # the downloaded champion is removed

    # the same run id again: refused before anything is created, the first job's runs untouched
    client = MlflowClient(both["mlflow_uri"])
    experiment = client.get_experiment_by_name("turnstile").experiment_id
    before = {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])}
    with pytest.raises(ValueError, match="run id 'eval-both' is already used: .* exists; choose another run id"):
        evaluate_flow(EvaluateSettings(run_id="eval-both", **common))
    assert {r.info.run_id: r.data.metrics for r in client.search_runs([experiment])} == before
    [point] = client.get_metric_history(both["models"][0]["mlflow_run_id"], "val/pass_at_1")
    assert point.value == readable_value(both["models"][0]["pass_at_1"])
