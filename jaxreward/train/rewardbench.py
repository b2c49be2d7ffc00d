"""RewardBench-style report arithmetic: pure numpy, no models, no files.

Rows are of two kinds:

- a pair (one chosen, one rejected response): credit 1 when the chosen
  score is STRICTLY higher, else 0, so a tie counts as wrong
  ("RewardBench: Evaluating Reward Models for Language Modeling",
  Lambert et al., 2024);
- a best-of-(J+1) row (one chosen, J rejected; RewardBench 2 uses J = 3):
  credit 1/k when the chosen score is among the k responses tied at the
  top, else 0 ("RewardBench 2", Malik et al., 2025). A random scorer
  without ties earns 1/(J+1) in expectation.

A subset's accuracy is its mean credit; a section's score is its subsets'
accuracies weighted by their example counts (= the pooled mean credit of
the section's rows); the overall score is the unweighted mean over
sections. Every proportion comes with a 95% Wilson interval
(`evaluate.wilson_interval`, which takes fractional successes). For the
mean over sections, whose rows carry unequal weights, the interval is
Wilson's at Kish's effective sample size n_eff = S² / Σ_s 1/n_s (S
sections of n_s rows); with one section it is that section's interval.

A stat is a JSON-able dict: `{"n", "correct", "accuracy", "ci_low", "ci_high"}`
(`correct` is the sum of credits, fractional for best-of rows).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxreward.train.evaluate import wilson_interval


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} non-finite score(s)")
    return x


def pair_credit(chosen_B: np.ndarray, rejected_B: np.ndarray) -> np.ndarray:
    """float64 `[B]`: 1 where chosen > rejected strictly, else 0 (ties are wrong).

    Raises:
      ValueError: shapes differ or a score is not finite.
    """
    c, r = _finite("chosen", chosen_B), _finite("rejected", rejected_B)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"chosen {c.shape} and rejected {r.shape} must both be [B]")
    return (c > r).astype(np.float64)


def best_of_credit(chosen_B: np.ndarray, rejected_BJ: np.ndarray) -> np.ndarray:
    """float64 `[B]`: 1/k where the chosen score ties k responses at the top
    (k = 1: it alone is highest), 0 where some rejected score is higher.

    Raises:
      ValueError: shapes do not match `[B]` and `[B, J]`, or a score is not finite.
    """
    c, r = _finite("chosen", chosen_B), _finite("rejected", rejected_BJ)
    if c.ndim != 1 or r.ndim != 2 or r.shape[0] != c.shape[0] or r.shape[1] < 1:
        raise ValueError(f"chosen {c.shape} and rejected {r.shape} must be [B] and [B, J >= 1]")
    top = np.maximum(c, r.max(axis=1))
    tied = 1 + (r == top[:, None]).sum(axis=1)  # the chosen plus the rejected at the top
    return np.where(c == top, 1.0 / tied, 0.0)


def stat(correct: float, n: float) -> dict:
    """A proportion `correct / n` with its 95% Wilson interval (n = 0: nan, [0, 1])."""
    low, high = wilson_interval(float(correct), n)
    accuracy = float(correct) / n if n > 0 else float("nan")
    return {"n": n, "correct": float(correct), "accuracy": accuracy, "ci_low": low, "ci_high": high}


def chance(num_rejected_R: np.ndarray) -> np.ndarray:
    """float64 `[R]`: the expected credit of a random scorer without ties,
    1/(J+1) for J rejected responses (1/2 for a pair, 1/4 for best-of-4)."""
    return 1.0 / (1.0 + np.asarray(num_rejected_R, np.float64))


def subset_stats(subsets_R: Sequence[str], credit_R: np.ndarray,
                 chance_R: np.ndarray | None = None) -> dict[str, dict]:
    """Per subset (in first-seen order): the stat of its rows' credits, and
    with `chance_R` the subset's mean chance level as `chance`."""
    credit_R = np.asarray(credit_R, np.float64)
    chance_R = np.full(len(credit_R), np.nan) if chance_R is None else np.asarray(chance_R, np.float64)
    if not len(subsets_R) == len(credit_R) == len(chance_R):
        raise ValueError(f"{len(subsets_R)} subset names for {len(credit_R)} credits "
                         f"and {len(chance_R)} chance levels")
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(subsets_R):
        rows.setdefault(name, []).append(i)
    out = {}
    for name, idx in rows.items():
        out[name] = stat(credit_R[idx].sum(), len(idx))
        if not np.isnan(chance_R[idx]).any():
            out[name]["chance"] = float(chance_R[idx].mean())
    return out


def section_stats(subsets: Mapping[str, dict], sections: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Per section: its subsets' accuracies weighted by their example counts,

        score = Σ_s n_s · accuracy_s / Σ_s n_s = Σ_s correct_s / Σ_s n_s,

    with the Wilson interval of that pooled proportion; each stat also lists
    its `subsets`.

    Raises:
      ValueError: a section with no subsets, or naming a subset absent from
        `subsets` (the message lists the missing and the known ones).
    """
    out = {}
    for section, names in sections.items():
        names = list(names)
        missing = [s for s in names if s not in subsets]
        if not names or missing:
            raise ValueError(f"section {section!r} names subsets with no rows: "
                             f"{', '.join(missing) or '(none listed)'}; subsets found: "
                             f"{', '.join(subsets)}")
        correct = sum(subsets[s]["correct"] for s in names)
        n = sum(subsets[s]["n"] for s in names)
        out[section] = {**stat(correct, n), "subsets": names}
    return out


def mean_of_sections(sections: Mapping[str, dict]) -> dict:
    """The unweighted mean of the section scores, with a 95% Wilson interval
    at Kish's effective sample size n_eff = S² / Σ_s 1/n_s (see module doc).

    Returns a stat whose `n` is n_eff (a float) and `correct` is mean · n_eff,
    plus `num_sections`.
    """
    if not sections:
        raise ValueError("no sections to average")
    scores = [s["accuracy"] for s in sections.values()]
    counts = [s["n"] for s in sections.values()]
    if min(counts) <= 0:
        raise ValueError("a section has no rows")
    mean = float(np.mean(scores))
    n_eff = len(counts) ** 2 / sum(1.0 / n for n in counts)
    out = stat(mean * n_eff, n_eff)
    out["accuracy"] = mean  # exactly the mean (not mean·n_eff/n_eff after round-off)
    out["num_sections"] = len(counts)
    return out
