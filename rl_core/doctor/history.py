"""Reading the doctor's metric history: finite (step, value) series, window means, fitted change.

Each history entry is a mapping with "step" (the policy version after the step) and metric
values; NaN, infinities, booleans and missing keys count as missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def latest_step(history: Sequence[Mapping[str, float]]) -> int:
    step = history[-1].get("step")
    return int(step) if is_number(step) else len(history)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_series(history: Sequence[Mapping[str, float]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every entry holding a finite `key` (entries without a step count by position)."""
    out = []
    for position, entry in enumerate(history):
        value, step = entry.get(key), entry.get("step")
        if is_number(value):
            out.append((int(step) if is_number(step) else position, float(value)))
    return out


def series_values(series: list[tuple[int, float]]) -> list[float]:
    return [value for _, value in series]


def mean_of(values: list[float]) -> float:
    return sum(values) / len(values)


def window_mean(history, key: str, window: int) -> float | None:
    """Mean of the last `window` values of `key`; None with fewer."""
    values = series_values(metric_series(history, key)[-window:])
    return mean_of(values) if len(values) == window else None


def best_window(series: list[tuple[int, float]], window: int) -> tuple[int, float] | None:
    """(last step, mean) of the trailing window with the highest mean (the earliest on ties); None
    for an empty series. The first windows are partial (fewer than `window` entries), so a
    collapse within the first window still has a best to compare with."""
    best = None
    for end in range(1, len(series) + 1):
        mean = mean_of(series_values(series[max(0, end - window) : end]))
        if best is None or mean > best[1]:
            best = (series[end - 1][0], mean)
    return best


def fitted_change(series: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line through (step, value): its change from the first to the last step, and
    that change's standard error (from the residual spread, so batch-to-batch noise of any
    origin counts). Needs at least three points."""
    steps, values = [float(s) for s, _ in series], series_values(series)
    step_mean, value_mean = mean_of(steps), mean_of(values)
    spread = sum((x - step_mean) ** 2 for x in steps)
    if spread == 0:
        return 0.0, 0.0
    slope = sum((x - step_mean) * (y - value_mean) for x, y in zip(steps, values)) / spread
    residuals = [y - value_mean - slope * (x - step_mean) for x, y in zip(steps, values)]
    residual_std = math.sqrt(sum(r * r for r in residuals) / (len(values) - 2))
    span = steps[-1] - steps[0]
    return slope * span, residual_std / math.sqrt(spread) * span
