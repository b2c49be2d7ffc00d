"""Is a row's result independent of the batch it was computed in? A numerics probe, not a timing.

Some tests assert exact equalities between two passes of the same model
over different batch shapes: RL's "KL is exactly 0 when the policy equals
the reference" compares the reference pass (its own batch size) with the
update pass (a minibatch). Those hold only if XLA computes each row the
same whatever the batch around it. This probe measures it, op by op, for
the pieces of `llama.grouped_attention`: for each per-head shape
`[Q queries, S keys, D]` it computes a batch of 8 rows under `jax.jit`,
then rows 0..b-1 alone for b = 1..7, and reports the largest absolute
difference (0 = bit for bit).

On XLA CPU, 2026-12-03 (jax 0.10.2): both einsums were batch-invariant
at every shape; the masked softmax was not, at short rows (S <= 48) and
at 8 query rows per head (up to 3e-7). See benchmarks/README.md.

    python benchmarks/probe_batch_invariance.py [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxreward.models import llama  # noqa: E402

B, K, G = 8, 3, 3   # rows, kv heads, query heads per kv head (SmolLM2: 3 kv heads, 9 query heads)
SHAPES = [(8, 12, 16), (24, 12, 16), (24, 48, 16), (8, 96, 64), (24, 96, 64), (96, 96, 64),
          (96, 384, 64), (288, 384, 64),
          (384, 128, 64), (384, 256, 64), (384, 384, 64)]  # SmolLM2 at T = 384 in query chunks of 128
# (Q, S, D) per kv head; Q = G · query positions


def _ops():
    scale = 0.125
    return {
        "scores einsum": lambda q, k, v, m: jnp.einsum("bkqd,bksd->bkqs", q, k),
        "probs @ values": lambda q, k, v, m: jnp.einsum(
            "bkqs,bksd->bkqd", jax.nn.sigmoid(jnp.einsum("bkqd,bksd->bkqs", q, k)), v),
        "masked softmax": lambda q, k, v, m: jax.nn.softmax(
            jnp.where(m[:, None], jnp.einsum("bkqd,bksd->bkqs", q, k) * scale,
                      jnp.finfo(jnp.float32).min), axis=-1),
    }


def _row_drift(fn, *args) -> float:
    """Largest |fn(args)[:b] - fn(args[:b])| over b = 1..B-1."""
    full = np.asarray(fn(*args))
    return max(float(np.abs(full[:b] - np.asarray(fn(*(a[:b] for a in args)))).max())
               for b in range(1, B))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    rows = []
    for Q, S, D in SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        q = jax.random.normal(keys[0], (B, K, Q, D))
        k = jax.random.normal(keys[1], (B, K, S, D))
        v = jax.random.normal(keys[2], (B, K, S, D))
        m = jax.random.uniform(keys[3], (B, Q, S)) > 0.3
        m = m.at[..., 0].set(True)   # every row sees a key
        row = {"Q": Q, "S": S, "D": D}
        for name, op in _ops().items():
            row[name] = _row_drift(jax.jit(op), q, k, v, m)
        # The whole attention, as the model calls it: queries [B, T, H, D], T = Q / G.
        T = Q // G
        q_BTHD = q[:, :, :T].reshape(B, T, K, D).repeat(G, axis=2)
        row["grouped_attention"] = _row_drift(jax.jit(llama.grouped_attention), q_BTHD, k, v, m[:, :T])
        rows.append(row)
    common.report("batch_invariance", rows, args.out,
                  extra={"note": "max |row computed in a batch of 8 - the same row in a batch of b|, "
                                 "b = 1..7; 0 means bit for bit"})


if __name__ == "__main__":
    main()
