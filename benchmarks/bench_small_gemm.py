"""Small-row GEMMs, the work of a decode step: how fast the weights stream.

A decode step at batch M multiplies `[M, E]` activations by every weight
matrix once. At M = 8 that is far too few FLOPs to be compute-bound, so the
step's floor is the time to read the weights (`common.measure_read_bandwidth`).
This benchmark measures how close the GEMM libraries get to that floor, for
SmolLM2-135M's MLP shape `[M, 576] @ [576, 1536]` by default:

    xla x@W       weights `[K, N]` (our kernels' layout, DenseGeneral)
    xla x@Wt.T    weights `[N, K]` (HF's nn.Linear layout)
    xla Wt@x.T    the same product transposed, `[N, K] @ [K, M]`: the weights
                  are the GEMM's long operand and the activations the small one
    torch linear  `torch.nn.functional.linear`, 2 threads (HF's decode), if torch is installed
    xla read      a jitted sum over the same weights: the read floor

Each row times a chain of `--layers` distinct weight matrices in one call (as
the 30 blocks of a step; together they do not fit in cache) and reports the
time per GEMM and the weight bytes streamed per second. Every output element
is used (summed), so nothing is dead-code eliminated.

    python benchmarks/bench_small_gemm.py [--rows 1,2,4,8,16,32,64] [--k 576] [--n 1536]
        [--layers 30] [--out benchmarks/results]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    K, N, L = args.k, args.n, args.layers
    rng = np.random.default_rng(0)
    w_np = [rng.standard_normal((K, N), dtype=np.float32) for _ in range(L)]
    w_kn = [jnp.asarray(w) for w in w_np]
    w_nk = [jnp.asarray(np.ascontiguousarray(w.T)) for w in w_np]
    weight_bytes = K * N * 4
    chain = lambda f: jax.jit(lambda x, ws: sum(f(x, w).sum() for w in ws))
    xla_kn = chain(lambda x, w: x @ w)
    xla_nk = chain(lambda x, w: x @ w.T)
    xla_nk_t = chain(lambda x, w: w @ x.T)
    read = jax.jit(lambda ws: sum(w.sum() for w in ws))
    t_read = common.time_fn(lambda: read(w_kn), iters=15)[1] / L
    try:
        import torch
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        w_torch = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in w_np]
    except ImportError:
        torch = None
    rows = []
    for M in [int(m) for m in args.rows.split(",")]:
        x_np = rng.standard_normal((M, K), dtype=np.float32)
        x = jnp.asarray(x_np)
        impls = {"xla x@W": lambda: xla_kn(x, w_kn), "xla x@Wt.T": lambda: xla_nk(x, w_nk),
                 "xla Wt@x.T": lambda: xla_nk_t(x, w_nk)}
        if torch is not None:
            xt = torch.from_numpy(x_np)
            impls["torch linear"] = lambda: float(sum(torch.nn.functional.linear(xt, w).sum() for w in w_torch))
        for name, fn in impls.items():
            t = common.time_fn(fn, iters=15)[1] / L
            rows.append({"impl": name, "rows": M, "ms_per_gemm": t * 1e3,
                         "weight_GB_per_s": weight_bytes / t / 1e9, "gflops_per_s": 2 * M * K * N / t / 1e9,
                         "vs_read_floor": t / t_read})
    rows.append({"impl": "xla read (jitted sum)", "rows": 0, "ms_per_gemm": t_read * 1e3,
                 "weight_GB_per_s": weight_bytes / t_read / 1e9, "gflops_per_s": float("nan"),
                 "vs_read_floor": 1.0})
    common.report(f"small_gemm_{K}x{N}", rows, args.out, {"k": K, "n": N, "layers": L})


if __name__ == "__main__":
    main()
