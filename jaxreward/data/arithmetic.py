"""A synthetic prompt set with verifiable answers: two-operand arithmetic.

For RL drivers' tests and tiny variants (no files): every prompt asks for a
GSM8K-style final line, so the `exact_match` and `format_regex` rewards of
`jaxreward.rewards` score the completions.

    records = arithmetic_prompts(64, seed=0, ops=("+", "-"))
    records[0].prompt   # "What is 23 + 58? End your answer with '#### <number>'."
    records[0].answer   # "81"
"""
from __future__ import annotations

import operator

import numpy as np

from jaxreward.data.records import PromptRecord

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
TEMPLATE = "What is {a} {op} {b}? End your answer with '#### <number>'."


def arithmetic_prompts(n: int, seed: int, *, low: int = 10, high: int = 99,
                       ops: tuple[str, ...] = ("+",)) -> list[PromptRecord]:
    """`n` prompts "What is a op b? ..." with their integer answers, deterministic by `seed`.

    Operands are drawn uniformly from [low, high] (both ends included), the
    operator uniformly from `ops`, with `np.random.default_rng(seed)`. The
    answer is the exact integer result as a string ("-35" for 23 - 58); the
    source is "arithmetic:<seed>:<i>".

    Args:
      n: number of prompts (0 gives an empty list).
      seed: the generator seed; the same (n, seed, low, high, ops) give the
        same records, and the first m of n are the records of n=m.
      low, high: operand range, integers with low <= high.
      ops: operators, a non-empty subset of "+", "-", "*".

    Raises:
      ValueError: n < 0, low > high, non-integer bounds, or an empty or unknown operator.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if low > high:
        raise ValueError(f"low={low} must be <= high={high}")
    ops = tuple(ops)
    unknown = [op for op in ops if op not in OPS]
    if not ops or unknown:
        raise ValueError(f"ops must be a non-empty subset of {', '.join(OPS)}; got {ops!r}")
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):  # one draw per record, so the first m records do not depend on n
        a, b = (int(x) for x in rng.integers(low, high, size=2, endpoint=True))
        op = ops[int(rng.integers(len(ops)))]
        records.append(PromptRecord(prompt=TEMPLATE.format(a=a, op=op, b=b), answer=str(OPS[op](a, b)),
                                    source=f"arithmetic:{seed}:{i}"))
    return records
