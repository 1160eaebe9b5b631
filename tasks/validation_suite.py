"""The validation gate's Great Expectations suite over one iteration's trajectory batch.

Contract: `validate_batch(table, cfg)` turns bad data into failed checks rather than raising,
and returns a `ValidationReport` whose `checks` hold one outcome per name in `CHECK_ORDER` and
whose `reason` is one plain sentence naming the first failed check (or an all-clear). The
share of zero-variance groups (groups whose rewards are all equal) is reported, not gated. Thresholds come from
`ValidationConfig`: the shares of episodes ending at the token cap, in a context overflow, at
max_turns and in a permanent environment failure. `trainable_tokens` fails a batch without a
single token to train on (loss_mask == 1 outside env_error episodes), e.g. one in which every
episode overflowed its context before generating anything.

How it works. GX expects flat columns, so `derive_frame` turns the Arrow table into a pandas
frame in which every list, map or struct column appears under its own name as its length
(null stays null) and a few flag and count columns are added (`DERIVED_COLUMNS`). `build_suite`
writes the expectations over that frame, each tagged with its check name in `meta`, and
`run_suite` runs them in a throwaway ephemeral GX context; `validation_checks.summarize` then
folds the GX results of each check into one `Check` with an observed value and a one-line message.
`column_types` is the one check done in Arrow directly (the frame no longer holds the types).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from great_expectations.data_context.types.base import ProgressBarsConfig

from rl_core.config import ValidationConfig
from rl_core.trajectory import FINISH_REASONS, TRAJECTORY_SCHEMA
from rl_core.validation_report import ValidationReport
from tasks.validation_checks import LENGTH_COLUMNS, RATE_COLUMNS, REQUIRED_COLUMNS, rate_limits, summarize
from tasks.validation_reason import reason_sentence, zero_variance_groups

# -- the public entry point ------------------------------------------------------------


def validate_batch(table: pa.Table, cfg: ValidationConfig) -> ValidationReport:
    """Run the gate's checks over one batch (N rows); returns its validation report (run_id etc. unset).

    Takes any Arrow table: missing columns, wrong types, nulls and bad values become failed
    checks. (List columns must still be lists of numbers for the derived counts.)
    """
    frame = derive_frame(table)
    results = run_suite(frame, build_suite(frame, cfg))
    checks = summarize(results, frame, table, cfg)
    zero_frac, groups = zero_variance_groups(frame)
    passed = all(c.passed for c in checks)
    return ValidationReport(
        passed=passed,
        reason=reason_sentence(checks, frame),
        checks=checks,
        rows=table.num_rows,
        zero_variance_group_frac=zero_frac,
        groups=groups,
    )


# -- 1. flat columns for GX ------------------------------------------------------------


def derive_frame(table: pa.Table) -> pd.DataFrame:
    """Flat pandas frame: scalar columns as-is, nested ones as lengths, plus DERIVED_COLUMNS."""
    data: dict[str, Any] = {}
    for name in table.column_names:
        column = table.column(name)
        if pa.types.is_nested(column.type):
            data[name] = _lengths(column)
        else:
            data[name] = column.to_pandas()
    frame = pd.DataFrame(data, index=pd.RangeIndex(table.num_rows))
    n = table.num_rows
    if "loss_mask" in table.column_names:
        mask = table.column("loss_mask").combine_chunks()
        values = _flat_numbers(mask)
        bad = ~np.isin(values, (0, 1))
        frame["non_binary_mask_values"] = np.bincount(_parent_rows(mask)[bad], minlength=n)
    if {"loss_mask", "behavior_logprobs"} <= set(table.column_names):
        nonfinite, positive = _generated_logprob_problems(table)
        frame["nonfinite_logprobs"] = nonfinite
        frame["positive_logprobs"] = positive
    if "finish_reason" in table.column_names:
        reason = frame["finish_reason"]
        for column, value in RATE_COLUMNS.values():
            frame[column] = (reason == value).astype(float)  # null never equals
    if "loss_mask" in table.column_names:
        frame["trainable_tokens"] = _trainable_tokens(table)
    return frame


def _trainable_tokens(table: pa.Table) -> np.ndarray:
    """Per row: loss_mask == 1 tokens, 0 for env_error episodes (the trainer never trains on them)."""
    mask = table.column("loss_mask").combine_chunks()
    counts = np.bincount(_parent_rows(mask)[_flat_numbers(mask) == 1], minlength=table.num_rows)
    if "finish_reason" in table.column_names:
        env_error = (table.column("finish_reason").to_pandas() == "env_error").to_numpy()
        counts[env_error] = 0
    return counts


def _lengths(column: pa.ChunkedArray) -> pd.Series:
    """Entries per row of a list or map column (1 per struct); null stays null."""
    parts = []
    for chunk in column.chunks:
        if hasattr(chunk, "offsets"):  # lists and maps (maps have no list_value_length kernel)
            counts = np.diff(chunk.offsets.to_numpy()).astype(float)
        else:
            counts = np.ones(len(chunk))
        counts[chunk.is_null().to_numpy(zero_copy_only=False)] = np.nan
        parts.append(counts)
    return pd.Series(np.concatenate(parts) if parts else [], dtype="Int64")


def _flat_numbers(lists: pa.Array) -> np.ndarray:
    """All values of a list array as float64 (nulls as NaN), in row order."""
    flat = pc.list_flatten(lists)
    return flat.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)


def _parent_rows(lists: pa.Array) -> np.ndarray:
    return pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)


def _generated_logprob_problems(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row: non-finite and positive log-probs on tokens with loss_mask == 1.

    Rows whose mask and log-probs differ in length are compared over their common prefix.
    """
    n = table.num_rows
    mask = table.column("loss_mask").combine_chunks()
    logprobs = table.column("behavior_logprobs").combine_chunks()
    same = pc.fill_null(pc.equal(pc.list_value_length(mask), pc.list_value_length(logprobs)), False).to_numpy(
        zero_copy_only=False
    )
    rows = np.flatnonzero(same)
    mask_same, lp_same = mask.take(rows), logprobs.take(rows)
    generated = _flat_numbers(mask_same) == 1
    values = _flat_numbers(lp_same)
    owner = rows[_parent_rows(mask_same)]
    nonfinite = np.bincount(owner[generated & ~np.isfinite(values)], minlength=n)
    positive = np.bincount(owner[generated & np.isfinite(values) & (values > 0)], minlength=n)
    for row in np.flatnonzero(~same):  # rare: already failing lengths_equal
        m, lp = mask[int(row)].values, logprobs[int(row)].values
        if m is None or lp is None:
            continue
        k = min(len(m), len(lp))
        gen = m.cast(pa.float64()).to_numpy(zero_copy_only=False)[:k] == 1
        v = lp.cast(pa.float64()).fill_null(math.nan).to_numpy(zero_copy_only=False)[:k]
        nonfinite[row] = int(np.sum(gen & ~np.isfinite(v)))
        positive[row] = int(np.sum(gen & np.isfinite(v) & (v > 0)))
    return nonfinite, positive


# -- 2. the suite ----------------------------------------------------------------------


def build_suite(frame: pd.DataFrame, cfg: ValidationConfig) -> gx.ExpectationSuite:
    """Expectations over `frame`, each tagged `meta={"check": name[, "column": column]}`.

    Expectations on a column the batch lacks are left out (that is `columns_present`'s
    failure); their check then reports itself as not evaluated.
    """
    present = set(frame.columns)
    expectations: list = []

    def add(check: str, expectation_cls: type, **kwargs: Any) -> None:
        meta = {"check": check}
        if "column" in kwargs:
            meta["column"] = kwargs["column"]
        expectations.append(expectation_cls(meta=meta, **kwargs))

    add("batch_not_empty", gxe.ExpectTableRowCountToBeBetween, min_value=1)
    for f in TRAJECTORY_SCHEMA:
        add("columns_present", gxe.ExpectColumnToExist, column=f.name)
    for name in REQUIRED_COLUMNS:
        if name in present:
            add("required_not_null", gxe.ExpectColumnValuesToNotBeNull, column=name)
    for i, a in enumerate(LENGTH_COLUMNS):
        for b in LENGTH_COLUMNS[i + 1 :]:
            if {a, b} <= present:
                add(
                    "lengths_equal",
                    gxe.ExpectColumnPairValuesToBeEqual,
                    column_A=a,
                    column_B=b,
                    ignore_row_if="either_value_is_missing",  # a null list is required_not_null's
                )
    for check, column in (
        ("loss_mask_binary", "non_binary_mask_values"),
        ("logprobs_finite", "nonfinite_logprobs"),
        ("logprobs_nonpositive", "positive_logprobs"),
    ):
        if column in present:
            add(check, gxe.ExpectColumnValuesToBeBetween, column=column, min_value=0, max_value=0)
    if "reward" in present:
        add(
            "reward_in_range",
            gxe.ExpectColumnValuesToBeBetween,
            column="reward",
            min_value=cfg.reward_min,
            max_value=cfg.reward_max,
        )
    if "finish_reason" in present:
        add(
            "finish_reason_known",
            gxe.ExpectColumnValuesToBeInSet,
            column="finish_reason",
            value_set=list(FINISH_REASONS),
        )
    limits = rate_limits(cfg)
    for check, (column, _) in RATE_COLUMNS.items():
        if column in present:
            add(check, gxe.ExpectColumnMeanToBeBetween, column=column, max_value=limits[check])
    if "trainable_tokens" in present:
        add("trainable_tokens", gxe.ExpectColumnSumToBeBetween, column="trainable_tokens", min_value=1)
    # Given to the constructor: `suite.add_expectation` looks up a GX store, which needs a
    # current context; `run_suite` binds the suite to its own context.
    return gx.ExpectationSuite(name="turnstile-trajectories", expectations=expectations)


def run_suite(frame: pd.DataFrame, suite: gx.ExpectationSuite) -> list:
    """Per-expectation GX results of `suite` on `frame`, run in a fresh ephemeral context."""
    _quiet_gx_logging()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    suite = context.suites.add(suite)  # bind the suite to this context, not the process-wide one
    asset = context.data_sources.add_pandas("turnstile").add_dataframe_asset("trajectories")
    batch = asset.add_batch_definition_whole_dataframe("batch").get_batch(batch_parameters={"dataframe": frame})
    return list(batch.validate(suite, result_format="COMPLETE").results)


def _quiet_gx_logging() -> None:
    """Only errors from GX. Some GX modules pin their own logger to INFO (e.g. the ephemeral
    context's 'Created temporary directory ... for ephemeral docs site'), so lift those too."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
            if logger.level and logger.level < logging.ERROR:
                logger.setLevel(logging.ERROR)
