"""jaxreward/rewards/verifiable.py: exact_match, format_regex and length_target on
hand-made completions (truncated, empty, malformed, commas, negatives, decimals)."""
from decimal import Decimal

import numpy as np
import pytest

from jaxreward import rewards
from jaxreward.data.arithmetic import arithmetic_prompts
from jaxreward.rewards.verifiable import extract_final_number


def score(name, completions, answers=None, **kwargs):
    columns = {} if answers is None else {"answer": answers}
    return rewards.call(rewards.make(name, **kwargs), ["prompt"] * len(completions), completions,
                        columns).tolist()


@pytest.mark.parametrize("text, number", [
    ("So 40 + 2 = 42.\n#### 42", Decimal(42)),
    ("#### 1,234", Decimal(1234)),
    ("#### -3.50", Decimal("-3.5")),
    ("first 7 #### 8 then 9 #### 10 apples, check 5", Decimal(10)),  # first number after the LAST ####
    ("####-3", Decimal(-3)),
    ("#### forty-two", None),  # a #### without a number: no fallback to earlier numbers
    ("It is 12 or 13", Decimal(13)),  # no ####: the last number
    ("The answer is 4", Decimal(4)),  # truncated before ####
    ("from 5-3 we get", Decimal(3)),  # a minus after a digit is not a sign
    ("x = -17.", Decimal(-17)),  # the sentence's full stop is not a decimal point
    ("costs $1,234.50 total", Decimal("1234.5")),
    ("the list 1,2,3", Decimal(3)),  # not thousands separators
    ("", None),
    ("no digits here", None),
])
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


def test_extract_final_number_without_fallback_needs_the_mark():
    assert extract_final_number("The answer is 4", fallback="none") is None
    assert extract_final_number("The answer is 4 #### 4", fallback="none") == 4
    with pytest.raises(ValueError, match="fallback must be one of last_number, none; got 'first'"):
        extract_final_number("4", fallback="first")


def test_exact_match_compares_numbers_not_strings():
    completions = [
        "40 + 2 = 42\n#### 42",      # right
        "#### 1234",                 # right: "1,234" == "1234"
        "#### -3.50",                # right: -3.50 == -3.5
        "The answer is 4",           # truncated, no ####: the last number counts (right)
        "#### forty-two",            # malformed: no number
        "",                          # empty: no number
        "#### 43",                   # wrong
        "#### 3.5",                  # wrong sign
        "#### 42.0001",              # close is not equal
    ]
    answers = ["Janet has... #### 42", "#### 1,234", "-3.5", "4", "42", "42", "42", "-3.5", "42"]
    assert score("exact_match", completions, answers) == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    # fallback="none": only a "#### <number>" answer counts.
    assert score("exact_match", completions, answers, fallback="none") == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    # Numeric answers in the column work too.
    assert score("exact_match", ["#### 7", "#### 2.5"], [7, 2.5]) == [1, 1]


def test_exact_match_on_arithmetic_prompts():
    records = arithmetic_prompts(8, seed=3, ops=("+", "-", "*"))
    right = [f"Let me compute.\n#### {r.answer}" for r in records]
    wrong = [f"#### {int(r.answer) + 1}" for r in records]
    answers = [r.answer for r in records]
    assert score("exact_match", right, answers) == [1.0] * 8
    assert score("exact_match", wrong, answers) == [0.0] * 8


def test_exact_match_refuses_missing_answers_naming_the_row():
    with pytest.raises(rewards.RewardFunctionError, match=r"exact_match needs columns\['answer'\].*none"):
        score("exact_match", ["#### 1"])
    with pytest.raises(rewards.RewardFunctionError, match="exact_match: row 2 has no reference answer"):
        score("exact_match", ["#### 1", "#### 2", "#### 3"], ["1", "2", None])
    with pytest.raises(rewards.RewardFunctionError, match="exact_match: row 1: reference answer 'n/a' holds no number"):
        score("exact_match", ["#### 1", "#### 2"], ["1", "n/a"])
    with pytest.raises(ValueError, match="exact_match: fallback must be one of last_number, none; got 'x'"):
        rewards.make("exact_match", fallback="x")


def test_format_regex_default_wants_a_final_gsm8k_line():
    completions = [
        "Step 1: 2 + 2 = 4.\n#### 4",   # yes, across lines (DOTALL)
        "#### 1,234.5  \n",              # yes: stripped
        "#### -7",                        # yes
        "The answer is 4",                # truncated: no
        "#### forty-two",                 # malformed: no
        "#### 4 because 2 + 2",           # text after the answer: no (fullmatch)
        "",                               # empty: no
    ]
    assert score("format_regex", completions) == [1, 1, 1, 0, 0, 0, 0]


def test_format_regex_options():
    completions = ["<think>a\nb</think> 5", "says <think>x</think>", ""]
    think = r"<think>.*</think>.*"
    assert score("format_regex", completions, pattern=think) == [1, 0, 0]
    assert score("format_regex", completions, pattern=think, search=True) == [1, 1, 0]
    assert score("format_regex", completions, pattern=think, dotall=False) == [0, 0, 0]  # "." stops at \n
    assert score("format_regex", completions, pattern=r".*") == [1, 1, 1]  # the empty completion matches ".*"
    with pytest.raises(ValueError, match=r"format_regex: invalid regular expression '\(unclosed': "
                                         r"missing \), unterminated subpattern"):
        rewards.make("format_regex", pattern="(unclosed")
    with pytest.raises(ValueError, match="format_regex: pattern must be a string, got 3"):
        rewards.make("format_regex", pattern=3)


def test_length_target_counts_characters():
    completions = ["", "x" * 200, "x" * 150, "x" * 450, "é" * 200]
    # -|len - 200| / 100: empty -2; at target 0; 50 short -0.5; 250 long -2.5;
    # 200 "é" are 200 characters (400 UTF-8 bytes): 0.
    assert score("length_target", completions) == [-2.0, 0.0, -0.5, -2.5, 0.0]
    # target 10, scale 4: empty -10/4 = -2.5; 200 chars -190/4 = -47.5; 150 -> -35; 450 -> -110; 200 -> -47.5
    assert score("length_target", completions, target=10, scale=4) == [-2.5, -47.5, -35.0, -110.0, -47.5]
    for bad in ({"scale": 0}, {"scale": float("inf")}, {"target": -1}, {"target": "200"}):
        with pytest.raises(ValueError, match="length_target: (scale|target) must be a finite number"):
            rewards.make("length_target", **bad)


def test_empty_completion_reward_of_every_builtin():
    builtins = ("length", "distinct_words", "exact_match", "format_regex", "length_target")
    got = {name: score(name, [""], ["1"])[0] for name in builtins}
    assert got == {"length": 0.0, "distinct_words": 0.0, "exact_match": 0.0, "format_regex": 0.0,
                   "length_target": -2.0}
    assert all(isinstance(v, float) and np.isfinite(v) for v in got.values())
