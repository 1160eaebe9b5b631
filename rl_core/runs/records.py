"""What a run has completed, as small JSON records in its folder; the memory a resumed run reads.

Layout under `<storage.run_dir>/<run_id>/`:
- `history/iteration-000003.json`: one record per finished iteration: "iteration", "step"
  (policy version after it), "trained" (False when the iteration took no optimizer step),
  "skipped_by" (why not: "validation" when its batch failed validation, "trainer" when the
  batch left nothing to train on or the step was not finite; absent in records of runs older
  than this field, which only validation skipped), "reason" (the validation verdict's
  sentence, or the trainer's reason for skipping), the rollout and train metrics, and
  "rollback_to" when the training doctor rolled the policy back after it. An iteration that
  took no step has no checkpoint: its record and sampling state are what a resume reads;
- `evaluations/step-000010.json`: one held-out evaluation per evaluated step, with the
  registry version once the step's checkpoint is registered;
- `gate.json`: the gate's decision for the run's candidate ("version", "step", "decision"), with
  the champion version it was made against (`decision.champion_version`), so that a re-run
  re-applying it promotes only by compare-and-set on that champion (tasks/promote.py);
- `sampling/iteration-000003.pt`: where sampling stood (random generators, task sampler) right
  after the iteration's batch was collected, saved before the batch is committed, so that a
  re-run reusing the batch continues exactly as if it had collected it, and a resumed run goes
  on after an iteration that took no optimizer step (which has no checkpoint) from there. An
  iteration recorded without a step by `TrainingRun.save_checkpoint` outside the flow gets
  its state saved when it is recorded.

Every record is written atomically (rl_core/atomic.py), after the work it records: a record
that exists describes work that is done; a crash leaves the record missing, never half-written.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from rl_core.atomic import write_bytes_atomically, write_text_atomically
from rl_core.evaluation import EvalReport

HISTORY_DIR = "history"
EVALUATIONS_DIR = "evaluations"
GATE_FILE = "gate.json"
SAMPLING_DIR = "sampling"


def _write_json(path: Path, data: dict[str, Any]) -> Path:
    return write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# -- iteration history -------------------------------------------------------------------


def history_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / HISTORY_DIR / f"iteration-{iteration:06d}.json"


def save_iteration(run_dir: Path, record: dict[str, Any]) -> Path:
    """Record a finished iteration (`record` needs "iteration", "step" and "trained")."""
    return _write_json(history_path(run_dir, int(record["iteration"])), record)


def load_iteration(run_dir: Path, iteration: int) -> dict[str, Any] | None:
    """The record of `iteration`, or None if it has not finished."""
    return _read_json(history_path(run_dir, iteration))


def skip_kind(record: dict[str, Any]) -> str | None:
    """Why an iteration took no optimizer step: "validation" or "trainer"; None when it trained."""
    if record["trained"]:
        return None
    return record.get("skipped_by") or "validation"


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """Every finished iteration's record, in iteration order."""
    folder = Path(run_dir) / HISTORY_DIR
    return [json.loads(p.read_text()) for p in sorted(folder.glob("iteration-[0-9]*.json"))] if folder.is_dir() else []


# -- evaluations -------------------------------------------------------------------------


def evaluation_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / EVALUATIONS_DIR / f"step-{step:06d}.json"


def save_evaluation(run_dir: Path, step: int, report: EvalReport, version: str | None = None) -> Path:
    """Record the held-out evaluation of `step` (and its registry version, once registered)."""
    data = {
        "step": step,
        "metrics": report.metrics,
        "per_env": report.per_env,
        "task_success": report.task_success,
        "version": version,
    }
    return _write_json(evaluation_path(run_dir, step), data)


def load_evaluation(run_dir: Path, step: int) -> tuple[EvalReport, str | None] | None:
    """The recorded evaluation of `step` and its registry version, or None if it never finished."""
    data = _read_json(evaluation_path(run_dir, step))
    if data is None:
        return None
    return EvalReport(metrics=data["metrics"], per_env=data["per_env"], task_success=data["task_success"]), data[
        "version"
    ]


def evaluated_steps(run_dir: Path) -> list[int]:
    folder = Path(run_dir) / EVALUATIONS_DIR
    return sorted(int(p.stem.removeprefix("step-")) for p in folder.glob("step-[0-9]*.json")) if folder.is_dir() else []


# -- gate --------------------------------------------------------------------------------


def save_gate(run_dir: Path, data: dict[str, Any]) -> Path:
    return _write_json(Path(run_dir) / GATE_FILE, data)


def load_gate(run_dir: Path) -> dict[str, Any] | None:
    return _read_json(Path(run_dir) / GATE_FILE)


# -- sampling state ----------------------------------------------------------------------


def sampling_path(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / SAMPLING_DIR / f"iteration-{iteration:06d}.pt"


def save_sampling_state(run_dir: Path, iteration: int, state: dict[str, Any]) -> Path:
    """Record where sampling stood after collecting `iteration` (TrainingRun.sampling_state)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes_atomically(sampling_path(run_dir, iteration), buffer.getvalue())


def load_sampling_state(run_dir: Path, iteration: int) -> dict[str, Any] | None:
    path = sampling_path(run_dir, iteration)
    return torch.load(path, weights_only=True) if path.is_file() else None
