"""Python text reward functions by name, so a config can pick one with a string.

One signature for every member (`TextRewardFn`):

    fn(prompts: list[str], completions: list[str]) -> float32[R]

R = len(prompts) = len(completions): row r is completion r of prompt r.
A member is pure Python/numpy (no model, no JAX), runs on the host and
returns one finite float per row, higher = better.

    from jaxreward import rewards

    @rewards.register("shouting")
    def shouting(prompts, completions):
        return np.asarray([sum(c.isupper() for c in s) / max(len(s), 1) for s in completions],
                          np.float32)

    fn = rewards.get(config.scorer.text_reward)
    rewards_R = rewards.call(fn, prompts, completions)   # checked float32[R]

Built-in members (below): `length` and `distinct_words`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

TextRewardFn = Callable[[Sequence[str], Sequence[str]], np.ndarray]

_REGISTRY: dict[str, TextRewardFn] = {}


def register(name: str) -> Callable[[TextRewardFn], TextRewardFn]:
    """Decorator: registers `fn` under `name`.

    Raises:
      ValueError: `name` is already registered (to another function).
    """
    def decorator(fn: TextRewardFn) -> TextRewardFn:
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(f"text reward {name!r} is already registered "
                             f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = fn
        return fn
    return decorator


def names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> TextRewardFn:
    """The function registered as `name`.

    Raises:
      KeyError: an unknown name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no text reward named {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def call(fn: TextRewardFn, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """`fn(prompts, completions)` as float32 `[R]`, its shape checked.

    Raises:
      ValueError: prompts and completions differ in length, or `fn` returned
        something that is not R numbers (the message names the function).
    """
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    out = np.asarray(fn(prompts, completions), np.float32)
    if out.shape != (len(completions),):
        raise ValueError(f"text reward {getattr(fn, '__qualname__', fn)!r} returned shape "
                         f"{out.shape} for {len(completions)} completions; expected "
                         f"({len(completions)},)")
    return out


# ------------------------------------------------------------------ members


@register("length")
def length(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """Completion length in characters / 100 (a verbosity baseline: how much
    of a preference set "longer is better" explains)."""
    del prompts
    return np.asarray([len(c) / 100.0 for c in completions], np.float32)


@register("distinct_words")
def distinct_words(prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
    """Fraction of distinct whitespace-separated words in the completion (1 =
    no repeated word; 0 for a completion with no word): penalizes repetition."""
    del prompts
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return np.asarray(out, np.float32)
