"""Measures the float32 matmul throughput of this machine (the MFU denominator).

A square float32 matmul through XLA (jax) and through numpy's BLAS, sizes
1024..4096, best of 5 after a warm-up. The best figure is what
`common.PEAKS["cpu"]` states for CPUs; set JAXREWARD_PEAK_FLOPS to override.

    python benchmarks/bench_matmul_peak.py
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402


def best_seconds(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    rows = []
    for n in (1024, 2048, 4096):
        a = jnp.ones((n, n), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        jax_s = best_seconds(lambda: jax.block_until_ready(mm(a)))
        an = np.ones((n, n), np.float32)
        np_s = best_seconds(lambda: an @ an)
        flops = 2.0 * n ** 3
        rows.append({"n": n, "jax_gflops_per_s": flops / jax_s / 1e9,
                     "numpy_gflops_per_s": flops / np_s / 1e9})
    common.report(f"matmul_peak_{jax.default_backend()}", rows,
                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))


if __name__ == "__main__":
    main()
