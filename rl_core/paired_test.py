"""The paired test the promotion gate uses: does the candidate solve more of the same tasks than the champion?

Both models are scored on the same gate tasks, one greedy episode per task, so each task gives a pair of
binary outcomes. Only the discordant tasks carry evidence: `b` tasks the candidate solves and the champion does
not, `c` tasks the champion solves and the candidate does not. Under the null hypothesis (neither is better)
each discordant task goes either way with probability 1/2, so `b` ~ Binomial(b + c, 1/2): the exact
(conditional) McNemar test. Source: McNemar (1947), "Note on the sampling error of the difference between
correlated proportions or percentages", Psychometrika 12(2); the exact binomial form as in Fagerland, Lydersen
and Laake (2013), "The McNemar test for binary matched-pairs data", BMC Medical Research Methodology 13:91.

Why this test and not a paired bootstrap: the outcomes are binary and paired, the exact test needs no
resampling (the same inputs always give the same decision, which a gate should) and stays valid for the few
discordant tasks a small gate set gives, where a bootstrap interval is too narrow. The binomial tail is
`scipy.stats.binomtest`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from scipy.stats import binomtest


@dataclass(frozen=True)
class PairedOutcome:
    """The exact McNemar test of a candidate against a champion on the same tasks.

    tasks: tasks both were scored on. candidate_only (b): solved by the candidate alone. champion_only (c):
    solved by the champion alone. p_value: one-sided, P(X >= b) for X ~ Binomial(b + c, 1/2), the chance of
    an improvement this large or larger when neither model is better (1.0 when no task is discordant).
    difference: the candidate's pass@1 minus the champion's on these tasks, (b - c) / tasks.
    """

    tasks: int
    candidate_only: int
    champion_only: int
    p_value: float
    difference: float

    def shows_improvement(self, confidence: float, min_effect: float = 0.0) -> bool:
        """Whether the candidate is better at `confidence` (p_value <= 1 - confidence) by at least
        `min_effect` of pass@1. Raises ValueError for a confidence outside (0, 1) or a negative min_effect."""
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        if min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {min_effect}")
        return self.p_value <= 1.0 - confidence and self.difference >= min_effect


def mcnemar_exact(candidate: Mapping[str, bool], champion: Mapping[str, bool]) -> PairedOutcome:
    """The exact McNemar test on per-task outcomes (task id -> solved), candidate against champion.

    Raises ValueError when the two were not scored on the same tasks (naming a few that differ) or on none."""
    if set(candidate) != set(champion):
        only = sorted(set(candidate) ^ set(champion))
        raise ValueError(
            f"the candidate and the champion were scored on different tasks ({len(only)} differ, e.g. {only[:3]})"
        )
    if not candidate:
        raise ValueError("no tasks to compare the candidate and the champion on")
    b = sum(1 for task, solved in candidate.items() if solved and not champion[task])
    c = sum(1 for task, solved in candidate.items() if not solved and champion[task])
    p_value = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return PairedOutcome(len(candidate), b, c, float(p_value), (b - c) / len(candidate))
