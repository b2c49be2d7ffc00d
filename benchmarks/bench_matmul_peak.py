"""Measures the square-matmul throughput of this machine (the MFU denominator).

Square matmuls through XLA (`common.measure_matmul_flops`, the function every
benchmark calls for its own peak) and, for float32 on CPU, through numpy's
BLAS; sizes 1024..4096, best repetition within about two seconds per size.
Also prints `common.peak_flops`: the figure the other benchmarks divide by
(measured at n = 2048 on CPU; a GPU's stated peak where `STATED_PEAKS` knows
the chip).

    python benchmarks/bench_matmul_peak.py [--dtypes float32,bfloat16] [--sizes 1024,2048,4096]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402


def numpy_flops(n: int, seconds: float = 2.0) -> float:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--sizes", default="1024,2048,4096")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results"))
    args = ap.parse_args()
    rows = []
    for dtype in args.dtypes.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            m = common.measure_matmul_flops(n, dtype)
            row = {"n": n, "dtype": dtype, "reps": m["reps"],
                   "jax_best_gflops_per_s": m["flops_per_s"] / 1e9,
                   "jax_median_gflops_per_s": 2.0 * n ** 3 / m["median_s"] / 1e9}
            if dtype == "float32" and jax.default_backend() == "cpu":
                row["numpy_best_gflops_per_s"] = numpy_flops(n) / 1e9
            rows.append(row)
        common.peak_flops(dtype)  # the denominator the other benchmarks use, printed by report
    common.report(f"matmul_peak_{jax.default_backend()}", rows, args.out)


if __name__ == "__main__":
    main()
