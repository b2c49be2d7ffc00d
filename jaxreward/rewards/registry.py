"""Reward functions by name, so a config can pick one (or a weighted sum) with strings.

One signature for every member (`RewardFn`, DESIGN.md "Rewards"):

    fn(prompts: list[str], completions: list[str], columns: dict[str, list], **hparams)
        -> float32[R] or float32[R, K]

R = len(prompts) = len(completions): row r is completion r of prompt r.
`columns` holds per-row extra fields of the prompt records, e.g.
`columns["answer"][r]` the reference answer of row r; it may be empty. A
member runs on the host (pure Python/numpy here) and returns one finite
float per row (K per row for a multi-objective reward), higher = better.
Hyper-parameters are keyword-only with defaults; `make` binds them.

    from jaxreward import rewards

    @rewards.register("shouting")
    def shouting(prompts, completions, columns, *, per_char=1.0):
        return np.asarray([per_char * sum(ch.isupper() for ch in c) for c in completions],
                          np.float32)

    fn = rewards.make("shouting", per_char=0.5)          # refuses unknown kwargs
    rewards_R = rewards.call(fn, prompts, completions)   # checked float32[R]
    total = rewards.combine([("exact_match", 1.0), ("format_regex", 0.1)])
    total_R, per_fn = total(prompts, completions, {"answer": answers})

`call` is the only way a driver should run a member: it checks the shape,
turns an exception inside the function into a `RewardFunctionError` naming
the function, and refuses NaN/inf rows instead of averaging them in.

Built-in members: `length` and `distinct_words` (below), and the verifiable
rewards of `verifiable.py` (`exact_match`, `format_regex`, `length_target`).
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxreward.errors import UserError

RewardFn = Callable[..., np.ndarray]
"""`fn(prompts: list[str], completions: list[str], columns: dict[str, list], **hparams)
-> float32[R] | float32[R, K]`."""

_REGISTRY: dict[str, RewardFn] = {}
_CHECKS: dict[str, Callable[..., None]] = {}
_MAX_SHOWN_ROWS = 3  # bad rows named in a NaN/inf message
_SHOWN_CHARS = 60  # characters of a completion shown in a message


class RewardFunctionError(UserError):
    """A reward function failed on its rows: it raised, returned the wrong
    shape, or returned NaN/inf. The one-line message names the function (and
    the rows, where it is about rows)."""


def register(name: str, *, check: Callable[..., None] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: registers `fn` under `name`.

    Args:
      name: the name configs use.
      check: optional `check(**hparams)` that raises ValueError for bad
        hyper-parameter values; `make` runs it, so a bad value (e.g. an
        invalid regex) fails when the reward is built, not at the first batch.

    Raises:
      ValueError: `name` is already registered (to another function), or `fn`
        cannot be called as `fn(prompts, completions, columns)` (more required
        positional parameters, or fewer than three positional ones).
    """
    def decorator(fn: RewardFn) -> RewardFn:
        if _REGISTRY.get(name, fn) is not fn:
            raise ValueError(f"text reward {name!r} is already registered "
                             f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__})")
        try:
            inspect.signature(fn).bind([], [], {})
            problem = None
        except TypeError as e:
            problem = str(e)
        if problem is not None:  # raised outside the handler: no exception chain behind it (whose first
            # link, a StopIteration inside `bind`, is what a chain-walking report would show)
            raise ValueError(f"reward {name!r} must accept (prompts, completions, columns) and take its "
                             f"hyper-parameters as keywords with defaults; {problem}")
        _REGISTRY[name] = fn
        if check is not None:
            _CHECKS[name] = check
        return fn
    return decorator


def names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> RewardFn:
    """The function registered as `name` (its hyper-parameters at their defaults).

    Raises:
      KeyError: an unknown name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no text reward named {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


class BoundReward:
    """A registered reward with its hyper-parameters bound (what `make` returns).

    Calling it is calling the registered function with `**kwargs` added;
    `name` and `kwargs` say which, for messages and logs.
    """

    def __init__(self, name: str, fn: RewardFn, kwargs: Mapping[str, Any]):
        self.name, self.fn, self.kwargs = name, fn, dict(kwargs)

    def __call__(self, prompts, completions, columns):
        return self.fn(prompts, completions, columns, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of reward `name` and their defaults (every
    parameter after prompts, completions, columns).

    Raises:
      KeyError: an unknown name.
    """
    params = list(inspect.signature(get(name)).parameters.values())[3:]
    return {p.name: p.default for p in params
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def make(name: str, **kwargs) -> BoundReward:
    """Reward `name` with hyper-parameters `kwargs` bound, their values checked.

    Example: `make("length_target", target=300)`.

    Raises:
      KeyError: an unknown name; the message lists the registered ones.
      ValueError: a keyword the function does not take (the message names the
        function and its parameters), or a value its `check` refuses.
    """
    fn = get(name)
    allowed = hyperparameters(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"reward {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(allowed) or '(none)'}")
    if name in _CHECKS:
        _CHECKS[name](**{**allowed, **kwargs})
    return BoundReward(name, fn, kwargs)


def _display_name(fn) -> str:
    if isinstance(fn, BoundReward):
        return repr(fn)
    for name, member in _REGISTRY.items():
        if member is fn:
            return name
    return getattr(fn, "__qualname__", None) or repr(fn)


def _shorten(text: str) -> str:
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _first_raising_row(fn, prompts, completions, columns) -> int | None:
    """The first row r on which `fn` raises when called on row r alone, or
    None when every row alone scores (the failure needs the whole batch)."""
    for r in range(len(completions)):
        try:
            fn(prompts[r:r + 1], completions[r:r + 1], {k: v[r:r + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001 - only locating the row of a failure already reported
            return r
    return None


def call(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str],
         columns: Mapping[str, Sequence] | None = None) -> np.ndarray:
    """`fn(prompts, completions, columns)` as checked float32 `[R]` or `[R, K]`.

    Args:
      fn: a `RewardFn` (`get(name)`, `make(name, ...)` or any callable of
        that signature).
      prompts, completions: R strings each; row r is completion r of prompt r.
      columns: per-row extra fields, each a sequence of R values
        (`columns["answer"][r]`); default: none.

    Returns:
      float32 `[R]` (or `[R, K]` when `fn` returns K rewards per row), all finite.

    Raises:
      ValueError: prompts and completions differ in length, or a column does
        not hold R values.
      RewardFunctionError (a `UserError`, so a `ValueError`): `fn` raised
        (the message names the function and the exception, and the first row
        it raises on when called on that row alone), returned something
        that is not R numbers or R rows of K numbers, or returned NaN/inf for
        some rows (the message gives how many and the first few rows with
        their completions).
    """
    prompts, completions = list(prompts), list(completions)
    R = len(completions)
    if len(prompts) != R:
        raise ValueError(f"{len(prompts)} prompts but {R} completions")
    columns = {} if columns is None else {key: list(values) for key, values in columns.items()}
    for key, values in columns.items():
        if len(values) != R:
            raise ValueError(f"column {key!r} holds {len(values)} values for {R} completions")
    name = _display_name(fn)
    try:
        result = fn(prompts, completions, columns)
    except Exception as e:  # the user's function: any failure is reported as its own
        detail = " ".join(str(e).split()) or "(no message)"
        row = _first_raising_row(fn, prompts, completions, columns) if R > 1 else None
        where = "" if row is None else f" (it raises on row {row} {_shorten(completions[row])})"
        raise RewardFunctionError(f"text reward {name!r} raised {type(e).__name__}: {detail}{where}") from e
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            out = np.asarray(result, np.float32)
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"text reward {name!r} returned something that is not numbers: "
                                  f"{type(result).__name__} ({' '.join(str(e).split())})") from e
    if out.ndim not in (1, 2) or out.shape[0] != R or (out.ndim == 2 and out.shape[1] == 0):
        raise RewardFunctionError(f"text reward {name!r} returned shape {out.shape} for {R} "
                                  f"completions; expected ({R},) or ({R}, K)")
    finite_R = np.isfinite(out) if out.ndim == 1 else np.isfinite(out).all(axis=1)
    bad = np.flatnonzero(~finite_R)
    if bad.size:
        shown = ", ".join(f"row {r} {_shorten(completions[r])}" for r in bad[:_MAX_SHOWN_ROWS])
        more = ", ..." if bad.size > _MAX_SHOWN_ROWS else ""
        raise RewardFunctionError(f"text reward {name!r} returned NaN/inf for {bad.size} of {R} "
                                  f"rows: {shown}{more}")
    return out


class Combined:
    """A weighted sum of registered rewards (what `combine` returns).

    `combined(prompts, completions, columns=None) -> (total_R, per_function)`:
    total_R float32 `[R]` = Σ_i weight_i · reward_i, per_function a dict
    key -> float32 `[R]` of each unweighted reward, keyed by its name (a name
    given more than once gets keys "name#1", "name#2", ... in spec order).
    `keys`, `weights` and `rewards` (the `BoundReward`s) list the terms.
    """

    def __init__(self, keys: list[str], weights: list[float], bound: list[BoundReward]):
        self.keys, self.weights, self.rewards = keys, weights, bound

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 columns: Mapping[str, Sequence] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Runs every term through `call` -> (total float32 `[R]`, {key: float32 `[R]`}).

        Raises:
          RewardFunctionError: a term failed (see `call`), returned `[R, K]`
            (a sum needs one reward per row), or the weighted sum overflowed.
          ValueError: inputs of mismatched lengths (see `call`).
        """
        per_function = {}
        total = np.zeros(len(completions), np.float32)
        for key, weight, fn in zip(self.keys, self.weights, self.rewards):
            r = call(fn, prompts, completions, columns)
            if r.ndim != 1:
                raise RewardFunctionError(f"text reward {fn!r} returned shape {r.shape}; a combined "
                                          f"reward needs one reward per row, shape ({r.shape[0]},)")
            per_function[key] = r
            total = total + np.float32(weight) * r
        if not np.isfinite(total).all():
            raise RewardFunctionError(f"the weighted sum of {', '.join(map(repr, self.rewards))} "
                                      f"overflowed float32")
        return total, per_function

    def __repr__(self) -> str:
        return " + ".join(f"{w:g}*{fn!r}" for w, fn in zip(self.weights, self.rewards))


def combine(specs: Sequence[tuple]) -> Combined:
    """A weighted sum of registered rewards, for an RL driver's reward.

    Args:
      specs: `(name, weight)` or `(name, weight, kwargs_dict)` tuples; each
        term is `make(name, **kwargs)`, weighted by the finite number
        `weight` (0 logs a reward without training on it; negative is a penalty).

    Returns:
      `Combined`: `combined(prompts, completions, columns) -> (total_R, per_function)`.

    Raises:
      ValueError: no specs, a malformed spec, an unknown name (the message
        lists the registered ones), a non-finite or non-numeric weight, or a
        bad hyper-parameter (see `make`).
    """
    specs = list(specs)
    if not specs:
        raise ValueError("combine needs at least one (name, weight) reward spec; got none")
    terms = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, (tuple, list)) or len(spec) not in (2, 3):
            raise ValueError(f"reward spec {i} must be (name, weight) or (name, weight, kwargs); got {spec!r}")
        name, weight, kwargs = (*spec, {}) if len(spec) == 2 else spec
        if not isinstance(name, str):
            raise ValueError(f"reward spec {i}: name must be a string, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"reward spec {i} ({name!r}): weight must be a finite number, got {weight!r}")
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"reward spec {i} ({name!r}): kwargs must be a dict, got {kwargs!r}")
        if name not in _REGISTRY:
            raise ValueError(f"reward spec {i}: no text reward named {name!r}; registered: {', '.join(names())}")
        terms.append((name, float(weight), make(name, **kwargs)))
    counts = {}
    for name, _, _ in terms:
        counts[name] = counts.get(name, 0) + 1
    seen, keys = {}, []
    for name, _, _ in terms:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if counts[name] == 1 else f"{name}#{seen[name]}")
    return Combined(keys, [w for _, w, _ in terms], [b for _, _, b in terms])


# ------------------------------------------------------------------ members


@register("length")
def length(prompts: Sequence[str], completions: Sequence[str], columns: Mapping[str, Sequence]) -> np.ndarray:
    """Completion length in characters / 100 -> float32 `[R]` (a verbosity
    baseline: how much of a preference set "longer is better" explains).
    Ignores prompts and columns."""
    del prompts, columns
    return np.asarray([len(c) / 100.0 for c in completions], np.float32)


@register("distinct_words")
def distinct_words(prompts: Sequence[str], completions: Sequence[str],
                   columns: Mapping[str, Sequence]) -> np.ndarray:
    """Fraction of distinct whitespace-separated words in the completion ->
    float32 `[R]` (1 = no repeated word; 0 for a completion with no word):
    penalizes repetition. Ignores prompts and columns."""
    del prompts, columns
    out = []
    for c in completions:
        words = c.split()
        out.append(len(set(words)) / len(words) if words else 0.0)
    return np.asarray(out, np.float32)
