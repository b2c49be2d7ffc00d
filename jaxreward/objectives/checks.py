"""Argument checks shared by every objective: array shapes and static hyper-parameters.

JAX broadcasts silently: a `[B, 1]` mask against `[B]` log-probs gives a
`[B, B]` loss whose mean is a wrong number, not an error. So every objective
states the exact shape of each array argument and checks it here before any
arithmetic. Shapes are static under `jit`, so the checks run once at trace
time and cost nothing afterwards.

Every failure is a `ValueError` whose message names the argument, its shape
and the shape it had to have (and which argument fixed that shape), e.g.

    example_mask_B has shape (3, 1), expected (3,) to match chosen_logps_B with shape (3,)

Hyper-parameters (β, γ, λ, group sizes, ...) are Python numbers fixed at trace
time; `check_range` and `check_int` reject values outside the documented
domain (NaN included) with the parameter's name and the allowed range.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import jax
import numpy as np


def shape_of(x) -> tuple[int, ...]:
    """Shape of an array, a Python scalar (`()`), or a nested sequence."""
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(x))


def check_ndim(name: str, x, ndim: int | Sequence[int], layout: str, hint: str = "") -> tuple[int, ...]:
    """Checks that `x` has rank `ndim` (or one of several ranks).

    Args:
      name: argument name used in the message.
      x: the array.
      ndim: required rank, or a sequence of allowed ranks.
      layout: the documented layout, e.g. "[B]" or "[B, T]".
      hint: optional sentence appended to the message.

    Returns:
      The shape of `x`.

    Raises:
      ValueError: "{name} must be {layout}, got shape {shape}".
    """
    shape = shape_of(x)
    allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if len(shape) not in allowed:
        raise ValueError(f"{name} must be {layout}, got shape {shape}" + (f"; {hint}" if hint else ""))
    return shape


def check_shape(
    name: str,
    x,
    expected: Sequence[int],
    ref_name: str,
    *,
    allow_scalar: bool = False,
    allow_prefix: bool = False,
) -> None:
    """Checks that `x` (skipped when None) has exactly the shape `expected`.

    Args:
      name: argument name used in the message.
      x: the array, or None (nothing to check).
      expected: the required shape, that of the argument `ref_name`.
      ref_name: the argument whose shape `expected` is.
      allow_scalar: a 0-d `x` also passes (a value shared by every row).
      allow_prefix: `x` may also have the shape of a leading part of
        `expected` (e.g. one value per row, `[B]`, for a `[B, K]` reference).

    Raises:
      ValueError: naming `name`, its shape, the accepted shapes and `ref_name`.
    """
    if x is None:
        return
    expected = tuple(int(n) for n in expected)
    accepted = [expected]
    if allow_prefix:
        accepted += [expected[:k] for k in range(len(expected) - 1, 0, -1)]
    if allow_scalar:
        accepted.append(())
    shape = shape_of(x)
    if shape not in accepted:
        options = " or ".join(str(s) for s in accepted)
        raise ValueError(f"{name} has shape {shape}, expected {options} "
                         f"to match {ref_name} with shape {expected}")


def check_same_shape(ref_name: str, ref, **others) -> tuple[int, ...]:
    """Checks that every non-None array in `others` has the shape of `ref`.

    Returns:
      The shape of `ref`.

    Raises:
      ValueError: for the first argument whose shape differs (see `check_shape`).
    """
    expected = shape_of(ref)
    for name, x in others.items():
        check_shape(name, x, expected, ref_name)
    return expected


def check_token_arrays(ref_name: str, ref, **others) -> tuple[int, int]:
    """Checks that `ref` is `[B, T]` and every non-None array in `others` is the same `[B, T]`.

    The per-token convention of the policy-gradient, advantage and KL
    functions: values and their `mask_BT` share one `[B, T]` shape.

    Returns:
      `(B, T)`.
    """
    check_ndim(ref_name, ref, 2, "[B, T]")
    return check_same_shape(ref_name, ref, **others)


def _concrete_number(name: str, value) -> Optional[float]:
    """`value` as a float, or None for a traced value (checked nowhere: it is not static)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    return float(value)


def check_range(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """Checks that the hyper-parameter `value` lies in the interval given.

    Args:
      name: parameter name used in the message.
      value: a Python (or 0-d numpy/JAX) real number. A traced value is not
        checked (its value is unknown at trace time).
      low, high: bounds (None: unbounded on that side).
      low_open, high_open: exclude the bound itself.
      allow_inf: an unbounded side includes ±inf (e.g. a one-sided clip);
        by default it is open, as the message prints it: "(0, inf)" refuses inf.

    Raises:
      ValueError: "{name} must be in {interval}, got {value}" (also for NaN
        and for a non-number).
    """
    v = _concrete_number(name, value)
    if v is None:
        return
    ok = not math.isnan(v) and (allow_inf or not math.isinf(v))
    if low is not None:
        ok = ok and (v > low if low_open else v >= low)
    if high is not None:
        ok = ok and (v < high if high_open else v <= high)
    if not ok:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")


def check_values_in_range(name: str, values: Any, *, low: Optional[float] = None,
                          high: Optional[float] = None, where: Any = None) -> None:
    """Checks that every entry of a concrete array (or scalar) lies in [low, high].

    For data-valued arguments with a documented domain (CREAM's consistency
    C in [0, 1], scaled Bradley–Terry's strengths m >= 0), where a value
    outside it makes the loss unbounded below. A traced array is not checked
    (its values are unknown at trace time); an eager call and a config value
    are. `where` (bool `[B]` against `[B]` values; default all): only
    these entries are checked, so a masked-out example may hold any
    placeholder. A scalar applies to every example and is always checked,
    eagerly and under jit alike. Infinite values are refused.

    Raises:
      ValueError: "{name} must be in [low, high], got {value} at index {i}"
        for the first offending entry (NaN and ±inf included).
    """
    if isinstance(values, jax.core.Tracer):
        return
    v = np.asarray(values, np.float64)
    if v.ndim == 0:
        where = None  # one value for every example (a config scalar): always checked
    elif isinstance(where, jax.core.Tracer):
        return  # which entries are valid is unknown at trace time
    ok = np.isfinite(v)
    if low is not None:
        ok &= v >= low
    if high is not None:
        ok &= v <= high
    if where is not None:
        ok = ok | ~np.broadcast_to(np.asarray(where, bool), v.shape)
    if not ok.all():
        i = np.unravel_index(int(np.flatnonzero(~ok)[0]), v.shape)
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        at = f" at index {tuple(int(j) for j in i)}" if v.ndim else ""
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {float(v[i]):.6g}{at}")


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Checks that `value` is an integer (Python or numpy, not bool) >= `minimum`.

    Returns:
      `value` as a Python int.

    Raises:
      ValueError: "{name} must be an integer >= {minimum}, got {value}".
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


__all__ = [
    "check_int",
    "check_ndim",
    "check_range",
    "check_same_shape",
    "check_shape",
    "check_token_arrays",
    "check_values_in_range",
    "shape_of",
]
