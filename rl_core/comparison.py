"""Side by side: several policies' held-out evaluations (`EvalReport`s) on the same tasks, as tables.

`compare(reports)` takes label -> report (e.g. {"start": ..., "champion (v3)": ..., "candidate": ...})
and gives a `Comparison`: one table over all tasks and one per environment, a row per model, the
columns below. `Comparison.markdown()` writes them as markdown tables; `Comparison.values` holds the
numbers the cells show (metric name -> value, unrounded), for a plot or a test.

Columns, in order, with the `EvalReport` metric each shows (unprefixed, as `EvalReport.env_metrics`
names them; over all tasks the report's `val/<metric>`):

| header | metric | meaning |
| --- | --- | --- |
| pass@1 (greedy) | `pass_at_1` | greedy (temperature 0) share of tasks solved |
| pass@k (sampled), pass^k (sampled) | `pass_at_k/<k>`, `pass_hat_k/<k>` | per k of `pass_k` (no pass^1: it is pass@1) |
| reward | `reward_mean` | mean greedy reward |
| reward: <name> | `reward_component/<name>` | mean of each reward component any report logged |
| turns | `turns_mean` | mean policy turns of a greedy episode |
| response tokens | `response_tokens_mean` | mean tokens the policy generated in a greedy episode |
| truncated | `truncated_frac` | share of greedy episodes cut off (token_cap, context_overflow, max_turns) |
| max_turns | `finish_frac/max_turns` | share that hit rollout.max_turns without an answer |
| env_error | `env_error_frac` | share that ended in an environment (or agent) failure |
| tasks | (count) | tasks scored |

A metric a report lacks shows as "—": pass@k of a greedy-only evaluation, or a reward component no task of
that scope logged. Shares, pass and reward values are written with 3 decimals, turns and tokens with 1,
tasks as a whole number.

`Comparison.markdown()` says so in words: a caption under the title (`caption()`: pass@1 greedy, pass@k /
pass^k sampled, every other column of the greedy episodes) and a footnote under the table over all
environments (`component_footnote()`). A reward component counts 0 on a task that does not log it (an
environment's own answer fields, or an episode that never answered), exactly as the report's (and
MLflow's) `val/reward_component/<name>` does; so over all environments a component that only some
environments log is diluted by the other environments' tasks. The table keeps that mean rather than one
over the logging tasks only, so that its cells are the numbers MLflow shows, and the footnote names, per
such component, the environments that log it and their share of the tasks (the per-environment tables
hold the undiluted value).

Reports are comparable only when scored on the same tasks: `compare` raises ValueError naming the
models whose task set differs from the first model's (`check_same_tasks`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rl_core.evaluation import EvalReport

MISSING = "—"
ALL = "all environments"
"""The scope name of the table over all tasks (`Comparison.values[ALL]`)."""

TASKS = "tasks"
"""The metric name of the task count column (not an `EvalReport` metric)."""


@dataclass(frozen=True)
class Column:
    """One column of a comparison table: the `EvalReport` metric it shows, its header, its decimals."""

    metric: str
    header: str
    decimals: int

    def cell(self, value: float | None) -> str:
        """The value as the table writes it ("—" for a metric the report lacks)."""
        if value is None:
            return MISSING
        return f"{value:.{self.decimals}f}"


def _ordered_union(lists: list[list]) -> list:
    seen: dict = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)


def columns(reports: Mapping[str, EvalReport]) -> list[Column]:
    """The columns of a comparison of `reports` (module docstring), in table order."""
    ks = _ordered_union([list(r.pass_k) for r in reports.values()])
    components = sorted({name for r in reports.values() for name in _components(r)})
    cols = [Column("pass_at_1", "pass@1 (greedy)", 3)]
    for k in ks:
        cols.append(Column(f"pass_at_k/{k}", f"pass@{k} (sampled)", 3))
        if k > 1:  # pass^1 is pass@1 (both the share of sampled episodes that succeed)
            cols.append(Column(f"pass_hat_k/{k}", f"pass^{k} (sampled)", 3))
    cols.append(Column("reward_mean", "reward", 3))
    cols += [Column(f"reward_component/{name}", f"reward: {name}", 3) for name in components]
    cols += [
        Column("turns_mean", "turns", 1),
        Column("response_tokens_mean", "response tokens", 1),
        Column("truncated_frac", "truncated", 3),
        Column("finish_frac/max_turns", "max_turns", 3),
        Column("env_error_frac", "env_error", 3),
        Column(TASKS, "tasks", 0),
    ]
    return cols


def _components(report: EvalReport) -> set[str]:
    """The reward component names of a report (they may hold "/", e.g. "field/amount"): from its task outcomes,
    or for a record without them, its `val/reward_component/<name>` metrics that end in no environment's name."""
    if report.outcomes:
        return {c for o in report.outcomes.values() for c in o.reward_components}
    prefix = "val/reward_component/"
    names = {n.removeprefix(prefix) for n in report.metrics if n.startswith(prefix)}
    return {n for n in names if not any(n.endswith(f"/{env}") for env in report.environments)}


def _env_of(report: EvalReport, key: str) -> str | None:
    """The environment of task `key` ("<env>/<task id>"; env names may not hold "/")."""
    if key in report.outcomes:
        return report.outcomes[key].env_name
    return next((env for env in report.environments if key.startswith(f"{env}/")), None)


def _component_environments(report: EvalReport, name: str) -> set[str]:
    """The environments in which some task of `report` logged reward component `name` (for a record without
    per-task outcomes: those with a `val/reward_component/<name>/<env>` metric)."""
    if report.outcomes:
        return {o.env_name for o in report.outcomes.values() if name in o.reward_components}
    return {env for env in report.environments if f"val/reward_component/{name}/{env}" in report.metrics}


def check_same_tasks(reports: Mapping[str, EvalReport]) -> None:
    """Raise ValueError unless every report was scored on the first report's task set (`task_success` keys).

    The message names each model whose tasks differ, with how many of its tasks the first lacks and
    how many of the first's it lacks, and one example of each."""
    if not reports:
        raise ValueError("no evaluations to compare")
    (first_label, first), *rest = reports.items()
    reference = set(first.task_success)
    differing = []
    for label, report in rest:
        tasks = set(report.task_success)
        if tasks == reference:
            continue
        extra, missing = sorted(tasks - reference), sorted(reference - tasks)
        parts = []
        if extra:
            parts.append(f"{len(extra)} task(s) {first_label!r} was not scored on (e.g. {extra[0]})")
        if missing:
            parts.append(f"{len(missing)} of {first_label!r}'s task(s) missing (e.g. {missing[0]})")
        differing.append(f"{label!r}: {', '.join(parts)}")
    if differing:
        raise ValueError(
            f"evaluations scored on different task sets cannot be compared; compared with {first_label!r} "
            f"({len(reference)} tasks): " + "; ".join(differing)
        )


def _task_count(report: EvalReport, env: str | None) -> float:
    if env is None:
        return float(len(report.task_success))
    if report.outcomes:
        return float(sum(1 for o in report.outcomes.values() if o.env_name == env))
    return float(sum(1 for key in report.task_success if key.startswith(f"{env}/")))


def scope_metrics(report: EvalReport, env: str | None) -> dict[str, float]:
    """One report's unprefixed metrics over all its tasks (`env` None: its `val/<metric>` values) or of
    one environment (`EvalReport.env_metrics`), plus the task count under `TASKS`. Raises KeyError for
    an environment the report does not hold."""
    if env is None:
        metrics = {name.removeprefix("val/"): value for name, value in report.metrics.items()}
    else:
        metrics = dict(report.env_metrics(env))
    metrics[TASKS] = _task_count(report, env)
    return metrics


@dataclass(frozen=True)
class Comparison:
    """Several reports side by side (`compare`).

    `labels`: the models, in row order. `environments`: in the order first seen. `columns`: the table
    columns. `values[scope][label][metric]`: the number a cell shows, `scope` `ALL` or an environment
    (metrics a report lacks are absent).
    """

    labels: list[str]
    environments: list[str]
    columns: list[Column]
    values: dict[str, dict[str, dict[str, float]]]
    component_envs: dict[str, list[str]] = field(default_factory=dict)
    """Reward component name -> the environments where some report logged it (in `environments` order)."""
    env_tasks: dict[str, int] = field(default_factory=dict)
    """Environment -> how many tasks of it were scored (the same for every report)."""

    @property
    def scopes(self) -> list[str]:
        """`ALL`, then the environments: the tables in order."""
        return [ALL, *self.environments]

    def rows(self, scope: str) -> list[list[str]]:
        """The cells of one table (scope `ALL` or an environment): a row per model, its label first."""
        table = self.values[scope]
        return [[label, *(c.cell(table[label].get(c.metric)) for c in self.columns)] for label in self.labels]

    def table(self, scope: str) -> str:
        """One markdown table (header, separator, a row per model)."""
        header = ["model", *(c.header for c in self.columns)]
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * len(self.columns)) + "|"]
        lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in self.rows(scope)]
        return "\n".join(lines)

    @property
    def sampled(self) -> bool:
        """Whether some report has sampled metrics (pass@k / pass^k cells that are not "—")."""
        sampled = [c.metric for c in self.columns if c.metric.startswith("pass_at_k/")]
        return any(metric in row for metric in sampled for row in self.values[ALL].values())

    def caption(self) -> str:
        """The line under the title that says which episodes each column is of."""
        sampled = "; pass@k / pass^k (sampled): from the sampled episodes of each task" if self.sampled else ""
        return (
            f"pass@1 (greedy): share of tasks the greedy (temperature 0) episode solved{sampled}; reward, its "
            "components, turns, response tokens, truncated, max_turns and env_error: means and shares of the greedy "
            "episodes (one per task)."
        )

    def component_footnote(self) -> str | None:
        """The note under the table over all environments on how reward components are averaged (module
        docstring), naming each component only some environments log; None without reward components."""
        if not self.component_envs:
            return None
        total = sum(self.env_tasks.values())
        partial = [
            f"`{name}` in {', '.join(envs)} only ({sum(self.env_tasks.get(e, 0) for e in envs)} of {total} tasks)"
            for name, envs in sorted(self.component_envs.items())
            if set(envs) != set(self.environments)
        ]
        note = (
            "Reward components: a task that does not log a component counts 0 in its mean (as MLflow's "
            "`val/reward_component/<name>`)"
        )
        if not partial:
            return note + "."
        return (
            f"{note}, so over all environments a component some environments lack is diluted by their tasks: "
            + "; ".join(partial)
            + ". The environment tables show it undiluted."
        )

    def markdown(self, title: str = "Evaluation comparison", notes: list[str] | tuple[str, ...] = ()) -> str:
        """The whole comparison: a `# title`, the `caption()` and `notes` as lines under it, then a `## <scope>`
        section with its table for all environments (and `component_footnote()` under it) and for each
        environment."""
        lines = [f"# {title}", "", self.caption(), ""]
        if notes:
            lines += [*notes, ""]
        for scope in self.scopes:
            lines += [f"## {scope}", "", self.table(scope), ""]
            footnote = self.component_footnote() if scope == ALL else None
            if footnote:
                lines += [footnote, ""]
        return "\n".join(lines)


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


def compare(reports: Mapping[str, EvalReport]) -> Comparison:
    """The comparison of `reports` (label -> report, in row order). Raises ValueError for no reports or
    reports scored on different task sets (`check_same_tasks`)."""
    check_same_tasks(reports)
    environments = _ordered_union([r.environments for r in reports.values()])
    values = {ALL: {label: scope_metrics(r, None) for label, r in reports.items()}}
    for env in environments:
        values[env] = {label: scope_metrics(r, env) for label, r in reports.items()}
    cols = columns(reports)
    component_envs = {}
    for c in cols:
        if c.metric.startswith("reward_component/"):
            name = c.metric.removeprefix("reward_component/")
            logged = set().union(*(_component_environments(r, name) for r in reports.values()))
            component_envs[name] = [env for env in environments if env in logged]
    first = next(iter(reports.values()))
    env_tasks = {env: 0 for env in environments}
    for key in first.task_success:
        env = _env_of(first, key)
        if env is not None:
            env_tasks[env] += 1
    return Comparison(list(reports), environments, cols, values, component_envs, env_tasks)
