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
    assert EvaluateSettings(models=["start", "version:2"], version=2, checkpoint="c").model_specs() == [
        "start",
        "version:2",
        "c",
    ]
    with pytest.raises(ValueError, match="version:N"):
        EvaluateSettings(models=["version:two"])


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
    settings = EvaluateSettings(
        overrides=SMALL, run_dir=str(run_dir), run_id="eval-two", models=["start", str(checkpoint)]
    )
    result = evaluate_flow(settings)

    assert [m["label"] for m in result["models"]] == ["start", str(checkpoint)]
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
    children = {r.data.tags["turnstile.model"]: r for r in runs if r.info.run_id != result["mlflow_run_id"]}
    assert set(children) == {"start", str(checkpoint)}
    for model in result["models"]:
        run = children[model["model"]]
        assert run.info.run_id == model["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["turnstile.eval_tasks_hash"] == model["eval_tasks_hash"]
        [point] = client.get_metric_history(run.info.run_id, "val/pass_at_1")
        assert (point.step, point.value) == (model["step"], model["pass_at_1"])
        assert run.data.metrics["val/pass_at_k/2"] == model["metrics"]["val/pass_at_k/2"]
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
    assert json.loads((folder / "reports" / "start.json").read_text()) == result["models"][0]["report"]
    table_artifact = Artifact.get("eval-comparison-eval-two")
    assert table_artifact is not None and table_artifact.type == "markdown"
    assert "## refunds" in str(table_artifact.data)
    image = Artifact.get("eval-comparison-plot-eval-two")
    assert image is not None and image.type == "image" and "data:image/png;base64," in str(image.data)


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
