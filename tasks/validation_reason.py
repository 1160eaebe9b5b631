"""The validation report's words: the one-sentence reason and the zero-variance group share.

`reason_sentence` names the first failed check (in `CHECK_ORDER`) in plain words and the other
failed checks by name, or gives the all-clear (counting the checks actually run:
`len(CHECK_ORDER)` on a readable batch). `zero_variance_groups` measures the share of
zero-variance groups (groups whose rewards are all equal), which is reported, not gated. The
report itself (`ValidationReport`, `Check`) is the data contract in `rl_core.validation_report`.
"""

from __future__ import annotations

import pandas as pd

from rl_core.validation_report import Check


def episodes_text(n: int) -> str:
    """'1 episode' or 'N episodes'."""
    return f"{n} episode" if n == 1 else f"{n} episodes"


def finish_reason_counts(frame: pd.DataFrame) -> str:
    """'finish reasons: 8 context_overflow, 2 env_error' over the batch (most common first)."""
    if "finish_reason" not in frame.columns or frame.empty:
        return "no finish reasons recorded"
    counts = frame["finish_reason"].fillna("null").value_counts()
    return "finish reasons: " + ", ".join(f"{int(n)} {reason}" for reason, n in counts.items())


# -- the one-sentence reason ---------------------------------------------------------


def reason_sentence(checks: list[Check], frame: pd.DataFrame) -> str:
    """Why the batch failed in one sentence (first failed check, others listed), or all-clear."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return f"All {len(checks)} checks passed on {episodes_text(len(frame))}."
    first, others = failed[0], failed[1:]
    sentence = _failure_sentence(first, frame)
    if others:
        sentence = f"{sentence[:-1]}; also failed: {', '.join(c.name for c in others)}."
    return sentence


def _failure_sentence(check: Check, frame: pd.DataFrame) -> str:
    rates = {
        "token_cap_rate": (
            "Episodes cut off at the per-turn token cap",
            "responses run too long for rollout.max_tokens_per_turn",
        ),
        "context_overflow_rate": (
            "Episodes that overflowed the context window (finish_reason 'context_overflow')",
            "prompts or tool outputs do not fit policy.context_window (check the system prompt's "
            "length, environment.prompt_tokens and environment.expected_tool_output)",
        ),
        "max_turns_rate": (
            "Episodes that hit max_turns without an answer",
            "the policy is not finishing within rollout.max_turns",
        ),
    }
    if check.name == "trainable_tokens" and check.observed is not None:
        return (
            "The batch holds no trainable tokens: no episode outside env_error generated a token "
            "(loss_mask == 1), so a training step would have nothing to learn from "
            f"({episodes_text(len(frame))}; {finish_reason_counts(frame)})."
        )
    if check.name == "env_error_rate":
        return (
            f"Permanent environment failures in {check.observed:.1%} of episodes exceed the "
            f"{check.expected.removeprefix('<= ')} limit: this is an environment bug, not a retry "
            f"problem ({_most_common_env_error(frame)})."
        )
    if check.name in rates:
        what, meaning = rates[check.name]
        return (
            f"{what} make up {check.observed:.1%} of the batch, above the "
            f"{check.expected.removeprefix('<= ')} limit: {meaning}."
        )
    return f"Validation check {check.name} failed: {check.message[:1].lower()}{check.message[1:]}"


def _most_common_env_error(frame: pd.DataFrame) -> str:
    if "env_error" not in frame.columns or "is_env_error" not in frame.columns:
        return "no error text recorded"
    errors = frame.loc[frame["is_env_error"] == 1.0, "env_error"].dropna()
    if errors.empty:
        return "no error text recorded"
    counts = errors.value_counts()
    text, count = str(counts.index[0]), int(counts.iloc[0])
    return f"most common error: {text!r}, {episodes_text(count)}"


# -- zero-variance groups (reported, not gated) ----------------------------------------


def zero_variance_groups(frame: pd.DataFrame) -> tuple[float | None, int]:
    """(share of zero-variance groups, number of groups): a zero-variance group is one whose rewards are
    all equal (every advantage zero, no learning signal). Groups are the rows sharing a `group_id`; the
    share is None (and the count 0) without rows or without a `group_id` or `reward` column."""
    if not {"group_id", "reward"} <= set(frame.columns) or frame.empty:
        return None, 0
    distinct = frame.groupby("group_id", dropna=False)["reward"].nunique(dropna=False)
    return float((distinct <= 1).mean()), int(len(distinct))
