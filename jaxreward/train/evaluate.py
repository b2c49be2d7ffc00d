"""One all-rows evaluator for every driver: score a whole array set in
fixed-shape batches, padding the last batch and dropping the padded rows,
so held-out numbers count every row exactly once."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxreward import parallel


def score_all_rows(score_fn: Callable[[Any, dict], Any], params: Any,
                   arrays: dict[str, np.ndarray], batch_size: int, mesh) -> Any:
    """Runs `score_fn(params, batch)` over all rows of `arrays`.

    Args:
      score_fn: jitted `(params, batch) -> pytree of arrays with leading [B]`.
      params: passed through.
      arrays: equal-length numpy arrays `[n, ...]` (a batch dict).
      batch_size: rows per call; rounded up to a multiple of the mesh's
        batch shards so every call has one fixed shape (one compile).
      mesh: the device mesh batches are sharded over.

    Returns:
      The outputs concatenated over batches as numpy arrays `[n, ...]`; the
      padding rows of the last batch (copies of row 0) are dropped.
    """
    n = len(next(iter(arrays.values())))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // shards) * shards
    parts = []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        keep = len(rows)
        rows = np.concatenate([rows, np.zeros(batch_size - keep, rows.dtype)])
        out = score_fn(params, parallel.shard_batch({k: v[rows] for k, v in arrays.items()}, mesh))
        parts.append(jax.tree.map(lambda x: np.asarray(x)[:keep], out))
    if not parts:
        raise ValueError("score_all_rows: no rows to score")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
