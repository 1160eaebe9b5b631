"""The stages of an iteration, as the loop (rl_core/loop.py) calls them, and their plain-Python form.

`Stages` is what differs between the Prefect flow and the Python API: the flow's stages are
Prefect tasks with retries, artifacts and MLflow tracking (`flows/train.py`); `LocalStages`
calls the same rl_core functions directly. The loop's logic (what is left to do, reuse after a
crash, overlapped collection, the doctor's actions, when to evaluate) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from rl_core.doctor import DoctorDecision, decide_after_step
from rl_core.evaluation import EvalReport
from rl_core.model.policy import Policy
from rl_core.runs.records import IterationRecord
from rl_core.store import CommittedBatch, Manifest
from rl_core.store.validation import settle_validation
from rl_core.trainer import StepMetrics
from rl_core.trajectory import Episode
from rl_core.validation_report import ValidationReport

if TYPE_CHECKING:
    from rl_core.run import TrainingRun


class Pending(Protocol):
    """A collection running in the background (a Prefect future or a concurrent.futures.Future)."""

    def result(self) -> list[Episode]: ...


class Stages(Protocol):
    """The stages of one iteration. `batch` is None when the iteration's batch was committed by an
    earlier attempt (the stage then reads what it needs from the store)."""

    def collect(self, iteration: int) -> list[Episode]:
        """The iteration's episodes, sampled by the run's policy."""

    def collect_ahead(self, iteration: int, policy: Policy) -> Pending:
        """Start collecting `iteration` in the background, sampled by `policy` (a frozen snapshot)."""

    def write(self, iteration: int, episodes: list[Episode]) -> CommittedBatch:
        """Commit the batch (Parquet + manifest); returns what was written."""

    def validate(self, iteration: int, batch: CommittedBatch | None) -> ValidationReport:
        """The committed batch's validation report (`settle_validation`: a failed batch is quarantined)."""

    def train(self, iteration: int, episodes: list[Episode]) -> StepMetrics:
        """One training step, then the iteration's checkpoint (none when the step was skipped)."""

    def examine(
        self,
        records: Sequence[IterationRecord],
        pass_at_1: Mapping[int, float],
        reported: Collection[str],
        rollback_targets: Collection[int],
    ) -> DoctorDecision:
        """The training doctor's decision after `records[-1]` (`decide_after_step`)."""

    def evaluate(self, policy: Policy) -> EvalReport:
        """Held-out evaluation of `policy`."""

    def register(self, step: int, report: EvalReport, manifests: list[Manifest], validation: list[dict]) -> str | None:
        """Register the checkpoint of `step` with its lineage; its registry version (None: no registry)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics at iteration/step `step`."""

    def log(self, message: str, *, warning: bool = False) -> None:
        """Tell the user what happened, in one line."""


NOT_VALIDATED = "not validated (no validator was given to LocalStages)"


class LocalStages:
    """The stages as plain calls into the run: no orchestrator, no tracking server, no registry.

    validator: optional `(table) -> ValidationReport` for a committed Arrow table (e.g.
    `lambda table: tasks.validation_suite.validate_batch(table, cfg.validation)`): the batch's report is
    then reached and saved, and a failed batch quarantined, as in the flow (`settle_validation`);
    without one every batch is trained on (its report, not saved, says it was not validated).
    samples: whether evaluations also sample pass@k (`evaluation.num_samples` episodes per task; off
    by default: greedy pass@1 only, a quick check from Python). Metrics are kept in `metrics`
    ([(iteration, {name: value})]) and messages go to `log`."""

    def __init__(
        self,
        run: TrainingRun,
        log: Callable[[str], None] = print,
        validator: Callable[[pa.Table], ValidationReport] | None = None,
        samples: bool = False,
    ):
        self.run, self._log, self.validator, self.samples = run, log, validator, samples
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self._pool: ThreadPoolExecutor | None = None

    def collect(self, iteration: int) -> list[Episode]:
        return self.run.collect(iteration)

    def collect_ahead(self, iteration: int, policy: Policy) -> Pending:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect")
        return self._pool.submit(self.run.collect, iteration, policy)

    def write(self, iteration: int, episodes: list[Episode]) -> CommittedBatch:
        return self.run.commit(iteration, episodes)

    def validate(self, iteration: int, batch: CommittedBatch | None) -> ValidationReport:
        run = self.run
        if self.validator is None:
            rows = batch.manifest.rows if batch is not None else run.store.manifest(run.run_id, iteration).rows
            return ValidationReport(True, NOT_VALIDATED, [], rows, None, run_id=run.run_id, iteration=iteration)
        validator = self.validator

        def check(table: pa.Table) -> ValidationReport:
            try:
                return validator(table)
            except Exception as err:
                raise RuntimeError(
                    f"iteration {iteration}: the validator raised {type(err).__name__}: {err}; the batch stays "
                    "committed without a validation report and is validated again when the run is continued"
                ) from err

        return settle_validation(run.store, run.run_id, iteration, check, None if batch is None else batch.table)

    def train(self, iteration: int, episodes: list[Episode]) -> StepMetrics:
        metrics = self.run.train(episodes)
        self.run.save_checkpoint(iteration, metrics.as_dict(), record_skipped=False)
        if metrics.skipped:
            self.log(f"iteration {iteration}: no optimizer step ({metrics.skipped})", warning=True)
        else:
            self.log(
                f"iteration {iteration}: loss {metrics.loss:.4f}, grad norm {metrics.grad_norm:.3f} "
                f"-> step {metrics.step}"
            )
        return metrics

    def examine(self, records, pass_at_1, reported, rollback_targets) -> DoctorDecision:
        decision = decide_after_step(records, pass_at_1, reported, rollback_targets, self.run.cfg)
        for finding in decision.new_findings:
            self.log(f"doctor: {finding.describe()}", warning=True)
        return decision

    def evaluate(self, policy: Policy) -> EvalReport:
        report = self.run.evaluator.evaluate(policy, samples=self.samples)
        self.log(f"step {policy.version}: held-out pass@1 {report.pass_at_1:.3f}")
        return report

    def register(self, step: int, report: EvalReport, manifests: list[Manifest], validation: list[dict]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log(self, message: str, *, warning: bool = False) -> None:
        self._log(f"[{self.run.run_id}] {'warning: ' if warning else ''}{message}")

    def close(self) -> None:
        """Stop the background collection thread (if one was started)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def describe_batch(iteration: int, rollout: Mapping[str, Any], rows: int) -> str:
    """One line about a collected batch: episodes, mean reward, success and turns."""
    return (
        f"iteration {iteration}: {rows} episodes, reward {rollout['rollout/reward/mean']:.3f}, "
        f"success {rollout['rollout/success/mean']:.3f}, turns {rollout['rollout/turns/mean']:.2f}"
    )
