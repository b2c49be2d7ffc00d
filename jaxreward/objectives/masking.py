"""Masked reductions that are safe for padding.

Every objective in this package reduces over a boolean mask. The rules here
are the ones the whole package relies on:

* Values at masked slots are replaced with `where` *before* any arithmetic,
  so NaN, inf or 1e9 in padding never reach a value or a gradient. (A `where`
  applied after a division or a log still sends NaN into the gradient, because
  the backward pass multiplies a zero cotangent by an inf/NaN partial.)
* Denominators are made safe (a zero count becomes 1 before dividing), so an
  all-masked reduction returns exactly 0 with finite (zero) gradients.

Masks are `bool` arrays broadcastable to the values; float masks are accepted
and treated as `mask > 0`.
"""
from __future__ import annotations

import jax.numpy as jnp


def as_bool(mask) -> jnp.ndarray:
    """Returns `mask` as a bool array (`mask > 0` for numeric masks)."""
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return mask
    return mask > 0


def select(x, mask, fill=0.0) -> jnp.ndarray:
    """`x` where `mask` is true, `fill` elsewhere (the first step of every reduction)."""
    x = jnp.asarray(x)
    return jnp.where(as_bool(mask), x, jnp.asarray(fill, x.dtype))


def safe_divide(num, den) -> jnp.ndarray:
    """`num / den`, and 0 (with zero, finite gradients) wherever `den == 0`."""
    num = jnp.asarray(num)
    den = jnp.asarray(den, num.dtype)
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1.0), 0.0)


def safe_sqrt(x) -> jnp.ndarray:
    """`sqrt(x)` for x > 0 and 0 for x <= 0, with a finite gradient at 0."""
    x = jnp.asarray(x)
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def masked_count(mask, axis=None, dtype=jnp.float32) -> jnp.ndarray:
    """Number of true entries of `mask` along `axis`, as `dtype` (float32)."""
    return jnp.sum(as_bool(mask), axis=axis).astype(dtype)


def masked_sum(x, mask, axis=None) -> jnp.ndarray:
    """Sum of `x` over the true entries of `mask` along `axis`.

    Args:
      x: float array.
      mask: bool array broadcastable to `x`.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      The masked sum; 0 where nothing is selected. Gradients at masked slots
      are exactly 0 even when `x` holds NaN or inf there.
    """
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    return jnp.sum(select(x, mask), axis=axis)


def masked_cumsum(x, mask, axis=-1) -> jnp.ndarray:
    """Running sum of `x` over the true entries of `mask` along `axis`; 0 at masked slots."""
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    return select(jnp.cumsum(select(x, mask), axis=axis), mask)


def masked_mean(x, mask, axis=None) -> jnp.ndarray:
    """Mean of `x` over the true entries of `mask`; 0 (finite grads) if none."""
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    return safe_divide(masked_sum(x, mask, axis), masked_count(mask, axis, x.dtype))


def masked_var(x, mask, axis=None, ddof: int = 0) -> jnp.ndarray:
    """Variance of `x` over the true entries of `mask`.

    Args:
      x: float array.
      mask: bool array broadcastable to `x`.
      axis: axis or axes to reduce.
      ddof: 0 for the population variance, 1 for the unbiased estimate.

    Returns:
      The masked variance; 0 where fewer than `ddof + 1` entries are selected.
    """
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    mean = masked_mean(x, mask, axis)
    mean_b = mean if axis is None else jnp.expand_dims(mean, axis)
    sq = jnp.square(select(x, mask) - mean_b)
    count = masked_count(mask, axis, x.dtype)
    return safe_divide(masked_sum(sq, mask, axis), jnp.maximum(count - ddof, 0.0))


def masked_std(x, mask, axis=None, ddof: int = 0) -> jnp.ndarray:
    """Standard deviation of `x` over the true entries of `mask` (0 if degenerate)."""
    return safe_sqrt(masked_var(x, mask, axis, ddof))


def masked_max(x, mask, axis=None) -> jnp.ndarray:
    """Max of `x` over the true entries of `mask`; -inf where nothing is selected."""
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    return jnp.max(select(x, mask, -jnp.inf), axis=axis)


def masked_min(x, mask, axis=None) -> jnp.ndarray:
    """Min of `x` over the true entries of `mask`; +inf where nothing is selected."""
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    return jnp.min(select(x, mask, jnp.inf), axis=axis)


def masked_all_equal(x, mask, axis=None) -> jnp.ndarray:
    """True where the selected entries are all equal (or fewer than two are selected).

    Used to return exact zeros when standardizing a constant set: in float32
    `x - mean(x)` of equal values can be a rounding residue, and dividing it
    by a tiny std would blow it up.
    """
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    hi = masked_max(x, mask, axis)
    lo = masked_min(x, mask, axis)
    return jnp.logical_or(hi <= lo, masked_count(mask, axis) < 2)


def masked_whiten(x, mask, axis=None, shift_mean: bool = True, eps: float = 1e-8) -> jnp.ndarray:
    """Standardizes `x` over the true entries of `mask`: (x - mean) / (std + eps).

    Args:
      x: float array.
      mask: bool array broadcastable to `x`.
      axis: axis or axes the statistics are taken over (None: all).
      shift_mean: if False the mean is added back, so only the scale changes.
      eps: added to the (population) standard deviation.

    Returns:
      An array shaped like `x`, 0 at masked slots. Where every selected value
      is equal (or fewer than two are selected) the centred part is exactly 0.
    """
    x = jnp.asarray(x)
    mask = jnp.broadcast_to(as_bool(mask), x.shape)
    mean = masked_mean(x, mask, axis)
    std = masked_std(x, mask, axis)
    constant = masked_all_equal(x, mask, axis)
    if axis is not None:
        mean = jnp.expand_dims(mean, axis)
        std = jnp.expand_dims(std, axis)
        constant = jnp.expand_dims(constant, axis)
    out = jnp.where(constant, 0.0, (select(x, mask) - mean) / (std + eps))
    if not shift_mean:
        out = out + mean
    return select(out, mask)
