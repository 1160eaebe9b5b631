"""The validation gate's checks: their names and order, and what each one's GX results mean.

`CHECK_ORDER` lists the checks in the order a reader should hear about them (the reason names
the first failure). `summarize` folds the Great Expectations results of each check (run by
`validation_suite.py` over the flat frame, tagged with the check's name) into one `Check` with
an observed value, what passes, and a one-line message; a check that could not run fails
("Not evaluated: ..."). `column_types` is checked in Arrow directly. Thresholds of the rate
checks come from `ValidationConfig` (`rate_limits`).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pyarrow as pa

from rl_core.config import ValidationConfig
from rl_core.trajectory import FINISH_REASONS, TRAJECTORY_SCHEMA
from rl_core.validation_report import Check
from tasks.validation_reason import episodes_text, finish_reason_counts

# Checks in the order a reader should hear about them: the reason names the first failure.
CHECK_ORDER = (
    "batch_not_empty",
    "columns_present",
    "column_types",
    "required_not_null",
    "lengths_equal",
    "loss_mask_binary",
    "logprobs_finite",
    "logprobs_nonpositive",
    "reward_in_range",
    "finish_reason_known",
    "env_error_rate",
    "token_cap_rate",
    "context_overflow_rate",
    "max_turns_rate",
    "trainable_tokens",
)

NESTED_COLUMNS = tuple(
    f.name for f in TRAJECTORY_SCHEMA if pa.types.is_nested(f.type)
)  # tokens, loss_mask, behavior_logprobs, turns, reward_components
REQUIRED_COLUMNS = tuple(f.name for f in TRAJECTORY_SCHEMA if not f.nullable)
LENGTH_COLUMNS = ("tokens", "loss_mask", "behavior_logprobs")

# Flat columns added by `derive_frame`, with what each one means.
DERIVED_COLUMNS = {
    "non_binary_mask_values": "loss_mask entries other than 0 and 1",
    "nonfinite_logprobs": "NaN, infinite or null behavior_logprobs where loss_mask == 1",
    "positive_logprobs": "finite behavior_logprobs > 0 where loss_mask == 1",
    "is_token_cap": "1.0 if finish_reason == 'token_cap'",
    "is_max_turns_unanswered": "1.0 if finish_reason == 'max_turns'",
    "is_env_error": "1.0 if finish_reason == 'env_error'",
    "is_context_overflow": "1.0 if finish_reason == 'context_overflow'",
    "trainable_tokens": "loss_mask == 1 tokens of the episode, 0 for env_error episodes (never trained on)",
}
RATE_COLUMNS = {
    "token_cap_rate": ("is_token_cap", "token_cap"),
    "context_overflow_rate": ("is_context_overflow", "context_overflow"),
    "max_turns_rate": ("is_max_turns_unanswered", "max_turns"),
    "env_error_rate": ("is_env_error", "env_error"),
}


def rate_limits(cfg: ValidationConfig) -> dict[str, float]:
    """Rate check name -> its largest allowed share of episodes, from the config."""
    return {
        "token_cap_rate": cfg.max_token_cap_frac,
        "context_overflow_rate": cfg.max_context_overflow_frac,
        "max_turns_rate": cfg.max_turns_unanswered_frac,
        "env_error_rate": cfg.max_env_error_frac,
    }


# -- GX results -> checks -----------------------------------------------------------


def summarize(results: list, frame: pd.DataFrame, table: pa.Table, cfg: ValidationConfig) -> list[Check]:
    """One `Check` per name in CHECK_ORDER from the GX results tagged with it."""
    by_check: dict[str, list] = {name: [] for name in CHECK_ORDER}
    for result in results:
        by_check[result.expectation_config.meta["check"]].append(result)
    checks = []
    for name in CHECK_ORDER:
        if name == "column_types":
            checks.append(_column_types(table))
            continue
        tagged = by_check[name]
        errors = [_exception_text(r) for r in tagged if _exception_text(r)]
        if not tagged:
            checks.append(_not_evaluated(name, frame))
        elif frame.empty and (name in RATE_COLUMNS or name == "trainable_tokens"):
            checks.append(_unevaluated(name, "the batch is empty"))
        elif errors:
            checks.append(_unevaluated(name, f"GX raised {errors[0]}"))
        else:
            checks.append(_SUMMARIZERS[name](tagged, frame, cfg))
    return checks


def _exception_text(result) -> str | None:
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    for value in info.values():  # multi-metric form: {metric_id: {...}}
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "unknown error")
    return None


def _not_evaluated(name: str, frame: pd.DataFrame) -> Check:
    needs = {
        "required_not_null": list(REQUIRED_COLUMNS),
        "lengths_equal": list(LENGTH_COLUMNS),
        "loss_mask_binary": ["loss_mask"],
        "logprobs_finite": ["loss_mask", "behavior_logprobs"],
        "logprobs_nonpositive": ["loss_mask", "behavior_logprobs"],
        "reward_in_range": ["reward"],
        "trainable_tokens": ["loss_mask"],
    }.get(name, ["finish_reason"])
    missing = [c for c in needs if c not in frame.columns]
    return _unevaluated(name, f"column(s) {', '.join(missing)} missing")


def _unevaluated(name: str, why: str) -> Check:
    """A check that could not run counts as failed."""
    return Check(name, False, None, "evaluable", f"Not evaluated: {why}.")


def _where(frame: pd.DataFrame, rows: list[int], limit: int = 3) -> str:
    """'group g0 sample 2, ...' for the first few offending rows (row numbers if unnamed)."""
    labels = []
    for row in sorted(rows)[:limit]:
        if {"group_id", "sample_index"} <= set(frame.columns):
            labels.append(f"group {frame.at[row, 'group_id']} sample {frame.at[row, 'sample_index']}")
        else:
            labels.append(f"row {row}")
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(labels) + more


def _unexpected_rows(results: list) -> list[int]:
    rows: set[int] = set()
    for r in results:
        rows.update(int(i) for i in r.result.get("unexpected_index_list") or [])
    return sorted(rows)


def _batch_not_empty(results, frame, cfg) -> Check:
    rows = int(results[0].result.get("observed_value") or 0)
    ok = results[0].success
    return Check(
        "batch_not_empty",
        ok,
        rows,
        "at least 1 row",
        f"{rows} episodes in the batch." if ok else "The batch holds no episodes.",
    )


def _columns_present(results, frame, cfg) -> Check:
    missing = [r.expectation_config.meta["column"] for r in results if not r.success]
    ok = not missing
    return Check(
        "columns_present",
        ok,
        missing,
        f"all {len(TRAJECTORY_SCHEMA)} schema columns",
        "All schema columns are present." if ok else f"Missing column(s): {', '.join(missing)}.",
    )


def _column_types(table: pa.Table) -> Check:
    wrong = [
        f"{f.name}: {table.schema.field(f.name).type} (expected {f.type})"
        for f in TRAJECTORY_SCHEMA
        if f.name in table.column_names and not table.schema.field(f.name).type.equals(f.type)
    ]
    ok = not wrong
    return Check(
        "column_types",
        ok,
        wrong,
        "TRAJECTORY_SCHEMA types",
        "Column types match the trajectory schema." if ok else f"Wrong type(s): {'; '.join(wrong)}.",
    )


def _required_not_null(results, frame, cfg) -> Check:
    nulls = {
        r.expectation_config.meta["column"]: int(r.result.get("unexpected_count") or 0)
        for r in results
        if not r.success
    }
    ok = not nulls
    listed = ", ".join(f"{c} ({n} null)" for c, n in nulls.items())
    return Check(
        "required_not_null",
        ok,
        nulls,
        "no nulls (env_error may be null)",
        "Required columns hold no nulls." if ok else f"Nulls in required column(s): {listed}.",
    )


def _lengths_equal(results, frame, cfg) -> Check:
    rows = _unexpected_rows(results)
    ok = all(r.success for r in results)
    return Check(
        "lengths_equal",
        ok,
        len(rows),
        "0 episodes with unequal lengths",
        "tokens, loss_mask and behavior_logprobs have equal lengths."
        if ok
        else f"Unequal lengths of tokens, loss_mask and behavior_logprobs in {episodes_text(len(rows))} "
        f"({_where(frame, rows)}).",
    )


def _count_check(name: str, what: str) -> Callable:
    def summarize_one(results, frame, cfg) -> Check:
        (result,) = results
        rows = _unexpected_rows(results)
        column = result.expectation_config.meta["column"]
        total = int(frame[column].sum())
        ok = result.success
        return Check(
            name,
            ok,
            total,
            f"0 {what}",
            f"No {what}." if ok else f"{total} {what} in {episodes_text(len(rows))} ({_where(frame, rows)}).",
        )

    return summarize_one


def _reward_in_range(results, frame, cfg) -> Check:
    (result,) = results
    rows = _unexpected_rows(results)
    bad = sorted({float(v) for v in result.result.get("partial_unexpected_list") or []})
    ok = result.success
    return Check(
        "reward_in_range",
        ok,
        bad,
        f"[{cfg.reward_min}, {cfg.reward_max}]",
        "All rewards are within range."
        if ok
        else f"{episodes_text(len(rows)).capitalize()} with reward outside [{cfg.reward_min}, "
        f"{cfg.reward_max}] (e.g. {', '.join(f'{v:g}' for v in bad[:3])}).",
    )


def _finish_reason_known(results, frame, cfg) -> Check:
    (result,) = results
    unknown = sorted({str(v) for v in result.result.get("partial_unexpected_list") or []})
    count = int(result.result.get("unexpected_count") or 0)
    ok = result.success
    return Check(
        "finish_reason_known",
        ok,
        unknown,
        f"one of {', '.join(FINISH_REASONS)}",
        "All finish reasons are known."
        if ok
        else f"Unknown finish_reason {', '.join(repr(v) for v in unknown)} in {episodes_text(count)}.",
    )


def _rate_check(name: str) -> Callable:
    def summarize_one(results, frame, cfg) -> Check:
        (result,) = results
        observed = float(result.result.get("observed_value") or 0.0)
        limit = rate_limits(cfg)[name]
        _, value = RATE_COLUMNS[name]
        return Check(
            name,
            bool(result.success),
            observed,
            f"<= {limit:.1%}",
            f"{observed:.1%} of episodes ended with finish_reason {value!r} (limit {limit:.1%}).",
        )

    return summarize_one


def _trainable_tokens(results, frame, cfg) -> Check:
    (result,) = results
    total = int(frame["trainable_tokens"].sum())
    ok = bool(result.success)
    return Check(
        "trainable_tokens",
        ok,
        total,
        "at least 1 loss_mask token outside env_error episodes",
        f"{total} trainable tokens (loss_mask == 1, env_error episodes left out)."
        if ok
        else f"No trainable tokens: no episode outside env_error holds a generated token (loss_mask == 1); "
        f"{finish_reason_counts(frame)}.",
    )


_SUMMARIZERS: dict[str, Callable] = {
    "batch_not_empty": _batch_not_empty,
    "columns_present": _columns_present,
    "required_not_null": _required_not_null,
    "lengths_equal": _lengths_equal,
    "loss_mask_binary": _count_check("loss_mask_binary", "loss_mask values other than 0 and 1"),
    "logprobs_finite": _count_check("logprobs_finite", "non-finite log-probs on generated tokens"),
    "logprobs_nonpositive": _count_check("logprobs_nonpositive", "positive log-probs on generated tokens"),
    "reward_in_range": _reward_in_range,
    "finish_reason_known": _finish_reason_known,
    "token_cap_rate": _rate_check("token_cap_rate"),
    "context_overflow_rate": _rate_check("context_overflow_rate"),
    "max_turns_rate": _rate_check("max_turns_rate"),
    "env_error_rate": _rate_check("env_error_rate"),
    "trainable_tokens": _trainable_tokens,
}
