"""One all-rows evaluator for every driver: score a whole array set in
fixed-shape batches, padding the last batch and dropping the padded rows,
so held-out numbers count every row exactly once."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

from jaxreward import parallel


def score_all_rows(score_fn: Callable[[Any, dict], Any], params: Any,
                   arrays: dict[str, np.ndarray], batch_size: int, mesh, multiple_of: int = 1) -> Any:
    """Runs `score_fn(params, batch)` over all rows of `arrays`.

    Args:
      score_fn: jitted `(params, batch) -> pytree of arrays with leading [B]`.
      params: passed through.
      arrays: equal-length numpy arrays `[n, ...]` (a batch dict).
      batch_size: rows per call; rounded up to a multiple of the mesh's
        batch shards (and of `multiple_of`) so every call has one fixed
        shape (one compile) that shards evenly.
      mesh: the device mesh batches are sharded over.
      multiple_of: rows that must stay in one call, e.g. G for groups of
        G completions packed into one row (`scoring.group_token_logps`);
        the row count must then be a multiple of it too, and the padding
        (copies of row 0, i.e. groups of one repeated prompt) is whole
        groups.

    Returns:
      The outputs concatenated over batches as numpy arrays `[n, ...]`; the
      padding rows of the last batch (copies of row 0) are dropped.
    """
    n = len(next(iter(arrays.values())))
    if n % multiple_of:
        raise ValueError(f"score_all_rows: {n} rows are not whole groups of {multiple_of}")
    step = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], multiple_of)
    batch_size = -(-batch_size // step) * step
    parts = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        keep = len(rows)
        rows = np.concatenate([rows, np.zeros(batch_size - keep, rows.dtype)])
        out = score_fn(params, parallel.shard_global_batch({k: v[rows] for k, v in arrays.items()}, mesh))
        parts.append(jax.tree.map(lambda x: x[:keep], parallel.to_host(out)))
    if not parts:
        raise ValueError("score_all_rows: no rows to score")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (z = 1.96 by default).

    "Probable Inference, the Law of Succession, and Statistical Inference"
    (Wilson, 1927). With p = successes / n:

        center = (p + z²/2n) / (1 + z²/n)
        half   = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n)

    `successes` may be fractional (RewardBench best-of rows credit a top
    tie 1/k); pairwise accuracies pass an integer count. Returns
    `(low, high)`, with low <= p <= high always; `(0.0, 1.0)` when n = 0.
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # The interval always holds p; at p = 0 or 1 its end is p exactly, which
    # float rounding misses (n = 4, p = 1 gave a high of 0.9999999999999999).
    return float(min(max(center - half, 0.0), p)), float(max(min(center + half, 1.0), p))
