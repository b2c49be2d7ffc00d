"""jaxreward/data/arithmetic.py: seeded two-operand prompts with exact answers."""
import re

import pytest

from jaxreward.data.arithmetic import arithmetic_prompts
from jaxreward.data.records import PromptRecord


def test_prompts_and_answers_are_exact_and_in_range():
    records = arithmetic_prompts(300, seed=0, low=-5, high=5, ops=("+", "-", "*"))
    seen_ops = set()
    for i, r in enumerate(records):
        assert isinstance(r, PromptRecord) and r.source == f"arithmetic:0:{i}"
        m = re.fullmatch(r"What is (-?\d+) ([-+*]) (-?\d+)\? End your answer with '#### <number>'\.", r.prompt)
        a, op, b = int(m[1]), m[2], int(m[3])
        assert -5 <= a <= 5 and -5 <= b <= 5
        assert r.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
        seen_ops.add(op)
    assert seen_ops == {"+", "-", "*"}
    # Both ends of [low, high] occur (11 values, 600 draws).
    operands = {int(x) for r in records for x in re.findall(r"-?\d+", r.prompt.split("?")[0])}
    assert {-5, 5} <= operands


def test_example_and_determinism():
    first = arithmetic_prompts(5, seed=7)
    assert first == arithmetic_prompts(5, seed=7)
    assert first != arithmetic_prompts(5, seed=8)
    assert arithmetic_prompts(3, seed=7) == first[:3]  # a prefix does not depend on n
    r = first[0]
    a, b = map(int, re.findall(r"\d+", r.prompt)[:2])
    assert r.prompt == f"What is {a} + {b}? End your answer with '#### <number>'." and r.answer == str(a + b)
    assert 10 <= a <= 99 and 10 <= b <= 99
    assert arithmetic_prompts(0, seed=1) == []
    one = arithmetic_prompts(4, seed=1, low=3, high=3, ops=("-",))
    assert {x.answer for x in one} == {"0"} and one[0].prompt.startswith("What is 3 - 3?")


@pytest.mark.parametrize("kwargs, message", [
    ({"n": -1}, "n must be an integer >= 0"),
    ({"n": 2.0}, "n must be an integer >= 0"),
    ({"low": 5, "high": 4}, "low=5 must be <= high=4"),
    ({"low": 1.5}, "low must be an integer"),
    ({"ops": ()}, r"ops must be a non-empty subset of \+, -, \*; got \(\)"),
    ({"ops": ("/",)}, "ops must be a non-empty subset"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        arithmetic_prompts(**{"n": 3, "seed": 0, **kwargs})
