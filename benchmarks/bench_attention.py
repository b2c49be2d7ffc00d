"""Causal attention alone, forward + backward, in 1..n query chunks.

Times `llama.causal_grouped_attention` (the attention of every cache-free
forward: training steps, reference passes, reward models) at one shape,
with the queries split into n chunks for each n asked. Chunk [lo, hi) reads
keys [0, hi) only; the function is the same for every n (tests check it),
only the work differs: the score matrix shrinks from T² to (n + 1) / 2n of
it. The default shape is SmolLM2-135M's attention in the DPO step at
length 256 (8 packed rows of 384 tokens, 9 query heads on 3 kv heads, head
dim 64, float32), where the model's default (`attention_query_chunk=128`)
gives three chunks.

Each row is the median of `--reps` calls of one jitted program computing the
output and the gradients of `sum(out * g)` for a fixed random g with
respect to q, k and v. GFLOP/s counts the two products that are computed
(scores and probabilities @ values, forward and backward: 3 x forward),
chunks included, so a row with fewer FLOPs can run faster at a lower
GFLOP/s. MFU is against the float32 matmul peak measured in this process.

    python benchmarks/bench_attention.py [--rows 8] [--seq-len 384] [--heads 9] [--kv-heads 3]
        [--head-dim 64] [--chunks 1,2,3,4,8] [--reps 7] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from jaxreward.models import llama  # noqa: E402


def chunk_bounds(T: int, min_chunk: int) -> list[int]:
    """The chunk bounds `causal_grouped_attention` uses for T queries and `min_chunk`."""
    n = min(T // min_chunk, llama.MAX_QUERY_CHUNKS) if min_chunk > 0 else 1
    n = max(n, 1)
    return [round(T * i / n) for i in range(n + 1)]


def attention_flops(B: int, H: int, D: int, bounds: list[int]) -> float:
    """Forward + backward FLOPs of the two products over the chunks: 3 x 2 products x 2·q·k·D."""
    pairs = sum((hi - lo) * hi for lo, hi in zip(bounds[:-1], bounds[1:]))
    return 3 * 2 * 2 * B * H * D * pairs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--chunks", default="1,2,3,4,8",
                    help="query chunk counts, comma-separated; each sets attention_query_chunk = T // n")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    B, T, H, K, D = args.rows, args.seq_len, args.heads, args.kv_heads, args.head_dim
    for name, value in (("--rows", B), ("--seq-len", T), ("--heads", H), ("--kv-heads", K),
                        ("--head-dim", D), ("--reps", args.reps)):
        if value < 1:
            ap.error(f"{name} must be at least 1, got {value}")
    if H % K:
        ap.error(f"--kv-heads ({K}) must divide --heads ({H})")
    try:
        counts = [int(c) for c in args.chunks.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--chunks must be comma-separated integers, got {args.chunks!r}")
    bad = [n for n in counts if not 1 <= n <= min(T, llama.MAX_QUERY_CHUNKS)]
    if not counts or bad:
        ap.error(f"--chunks must be between 1 and {min(T, llama.MAX_QUERY_CHUNKS)} "
                 f"(at most T and MAX_QUERY_CHUNKS), got {args.chunks!r}")

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, T, H, D), dtype=np.float32))
    k, v = (jnp.asarray(rng.standard_normal((B, K, T, D), dtype=np.float32)) for _ in range(2))
    g = jnp.asarray(rng.standard_normal((B, T, H, D), dtype=np.float32))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    common.peak_flops("float32")  # measured before the rows, not between them
    rows, base = [], None
    for n in counts:
        min_chunk = 0 if n == 1 else T // n
        bounds = chunk_bounds(T, min_chunk)

        def loss(q, k, v, min_chunk=min_chunk):
            return jnp.sum(llama.causal_grouped_attention(q, k, v, mask, min_chunk) * g)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        seconds = common.time_fn(lambda: step(q, k, v), iters=args.reps)[1]
        base = seconds if base is None else base
        flops = attention_flops(B, H, D, bounds)
        rows.append({"query_chunks": len(bounds) - 1, "attention_query_chunk": min_chunk,
                     "ms": seconds * 1e3, "vs_first_row": seconds / base,
                     "gflop": flops / 1e9,
                     **common.mfu_fields(flops / seconds, "float32")})
    mem, mem_source = common.peak_memory_bytes()
    common.report(f"attention_B{B}_T{T}_H{H}_K{K}_D{D}", rows, args.out,
                  {"batch_rows": B, "seq_len": T, "heads": H, "kv_heads": K, "head_dim": D, "reps": args.reps,
                   "peak_memory_bytes": mem, "peak_memory_source": mem_source})


if __name__ == "__main__":
    main()
