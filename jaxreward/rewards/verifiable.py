"""Verifiable rewards: Python checks of a completion against a rule or a reference answer.

Registered on import of `jaxreward.rewards` (signature: `registry.RewardFn`):

- `exact_match`: the completion's final number equals the reference answer's
  (GSM8K style, "Training Verifiers to Solve Math Word Problems", Cobbe et
  al., 2021: a solution ends with "#### <number>").
- `format_regex`: the completion has the required form (by default: it ends
  with a GSM8K "#### <number>" line).
- `length_target`: a penalty growing linearly with the distance of the
  completion's length, in characters, from a target.

All return float32 `[R]`; the reward of an empty completion is 0.0 for
`exact_match` and `format_regex` (it holds no number / matches no sensible
pattern) and -target/scale for `length_target`.
"""
from __future__ import annotations

import decimal
import math
import re
from typing import Mapping, Sequence

import numpy as np

from jaxreward.rewards.registry import register

# A number: an optional minus sign (not when it follows a letter, digit or
# dot, so "5-3" is 5 and 3, while "x = -3" and "####-3" are -3), then either
# digits with thousands commas ("1,234", never "1,2,3") or plain digits, then
# an optional decimal part. "1,234.50" -> 1234.50.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
FINAL_ANSWER_MARK = "####"
FALLBACKS = ("last_number", "none")


def extract_final_number(text: str, *, fallback: str = "last_number") -> decimal.Decimal | None:
    """The final answer of a GSM8K-style text, as an exact decimal, or None.

    With a "####" in the text, the first number after the last "####" (None
    when none follows it: "#### forty-two" has no number and gets no
    fallback). Without one, the last number in the text if
    `fallback="last_number"`, None if `fallback="none"`. Commas are thousands
    separators; "-3.50" and "-3.5" give equal decimals.

    Raises:
      ValueError: `fallback` is not one of "last_number", "none".
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}; got {fallback!r}")
    cut = text.rfind(FINAL_ANSWER_MARK)
    if cut >= 0:
        match = _NUMBER.search(text, cut + len(FINAL_ANSWER_MARK))
    elif fallback == "last_number":
        match = None
        for match in _NUMBER.finditer(text):
            pass
    else:
        match = None
    return None if match is None else decimal.Decimal(match.group().replace(",", ""))


def _check_exact_match(*, fallback: str) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"exact_match: fallback must be one of {', '.join(FALLBACKS)}; got {fallback!r}")


@register("exact_match", check=_check_exact_match)
def exact_match(prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence], *,
                fallback: str = "last_number") -> np.ndarray:
    """1.0 where the completion's final number equals the reference answer, else 0.0 -> float32 `[R]`.

    GSM8K-style answer checking ("Training Verifiers to Solve Math Word
    Problems", Cobbe et al., 2021). Both sides go through
    `extract_final_number`: the completion with `fallback` ("last_number":
    without "####" its last number counts; "none": only a "#### <number>"
    answer counts), the reference `columns["answer"][r]` always with
    "last_number" (so "42" and a full GSM8K solution ending "#### 42" both
    work). Numbers compare exactly as decimals ("1,234" == "1234",
    "-3.50" == "-3.5"). A completion with no number gets 0.0.

    Raises:
      ValueError: no "answer" column, or a row whose answer is missing (None),
        not a string or number, or holds no number; the message names the row.
        (`rewards.call` reports it as a RewardFunctionError.)
    """
    del prompts
    if "answer" not in columns:
        raise ValueError(f"exact_match needs columns['answer'] (the reference answers); "
                         f"columns given: {sorted(columns) or 'none'}")
    answers = columns["answer"]
    if len(answers) != len(completions):
        raise ValueError(f"exact_match: {len(answers)} answers for {len(completions)} completions")
    out = np.zeros(len(completions), np.float32)
    for r, (completion, answer) in enumerate(zip(completions, answers)):
        if answer is None or isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError(f"exact_match: row {r} has no reference answer (answer={answer!r})")
        reference = extract_final_number(str(answer))
        if reference is None:
            raise ValueError(f"exact_match: row {r}: reference answer {str(answer)[:60]!r} holds no number")
        got = extract_final_number(completion, fallback=fallback)
        out[r] = float(got is not None and got == reference)
    return out


DEFAULT_FORMAT = r".*####\s*-?[\d,]+(\.\d+)?"


def _check_format_regex(*, pattern: str, search: bool, dotall: bool) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"format_regex: pattern must be a string, got {pattern!r}")
    try:
        re.compile(pattern, re.DOTALL if dotall else 0)
    except re.error as e:
        raise ValueError(f"format_regex: invalid regular expression {pattern!r}: {e}") from None


@register("format_regex", check=_check_format_regex)
def format_regex(prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence], *,
                 pattern: str = DEFAULT_FORMAT, search: bool = False, dotall: bool = True) -> np.ndarray:
    """1.0 where the completion has the required form, else 0.0 -> float32 `[R]`.

    The completion, stripped of leading and trailing whitespace, must match
    `pattern` in full (`re.fullmatch`), or anywhere with `search=True`
    (`re.search`); `dotall=True` lets "." match newlines. The default
    pattern asks for a GSM8K final answer at the end: "... #### 1,234.5".
    Ignores prompts and columns.

    Raises:
      ValueError: an invalid regular expression (`make` raises it at build time).
    """
    del prompts, columns
    _check_format_regex(pattern=pattern, search=search, dotall=dotall)
    regex = re.compile(pattern, re.DOTALL if dotall else 0)
    match = regex.search if search else regex.fullmatch
    return np.asarray([match(c.strip()) is not None for c in completions], np.float32)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_length_target(*, target: float, scale: float) -> None:
    if not (_is_number(target) and target >= 0):
        raise ValueError(f"length_target: target must be a finite number >= 0 (characters), got {target!r}")
    if not (_is_number(scale) and scale > 0):
        raise ValueError(f"length_target: scale must be a finite number > 0 (characters), got {scale!r}")


@register("length_target", check=_check_length_target)
def length_target(prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence], *,
                  target: float = 200, scale: float = 100) -> np.ndarray:
    """-|len(completion) - target| / scale -> float32 `[R]`, lengths in characters.

    Units: `target` and `scale` are in characters (Unicode code points, as
    Python's `len`), not tokens, so the reward does not depend on the
    tokenizer. 0 at the target, -1 at `scale` characters away; an empty
    completion gets -target/scale (-2.0 by default). Ignores prompts and columns.

    Raises:
      ValueError: target < 0, scale <= 0, or either not finite.
    """
    del prompts, columns
    _check_length_target(target=target, scale=scale)
    return np.asarray([-abs(len(c) - target) / scale for c in completions], np.float32)
