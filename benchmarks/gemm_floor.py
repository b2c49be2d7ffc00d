"""The GEMM floor of the DPO train step: every matrix product of the step,
timed alone.

Traces the step of `bench_dpo_step.py` (the driver's loss on the 4.5M Llama,
8 pairs x (32 + 32) tokens, float32, AdamW), collects every `dot_general` of
its jaxpr (forward, backward and the reference forward; a product inside a
`scan` counts once per iteration), times each distinct one as its own jitted
program on this machine, and sums. The sum is what the step's products cost
when each runs at its standalone speed: the step itself can only beat it by
running products faster inside the step than alone. What the step takes
beyond the floor is everything else (softmax, norms, RoPE, SiLU, the loss,
AdamW) plus overheads.

Why it exists: it sets a ceiling on speed-ups that do not cut FLOPs. On
2026-12-04 the floor of the in-step DPO step was 125.5 ms, while 2x the
torch library's step measured in the same hour needed 132 ms (see
benchmarks/README.md).

    python benchmarks/gemm_floor.py [--models llama4.5m] [--reference in-step|precomputed]
        [--prefix-sharing on|off] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import bench_dpo_step  # noqa: E402
import common  # noqa: E402


def products(jaxpr) -> collections.Counter:
    """{(lhs shape, rhs shape, (lhs dtype, rhs dtype, preferred dtype), dimension numbers): count}
    over a closed jaxpr and its sub-jaxprs."""
    found = collections.Counter()

    def walk(j, times):
        for eq in j.eqns:
            if eq.primitive.name == "dot_general":
                lhs, rhs = eq.invars[0].aval, eq.invars[1].aval
                pet = eq.params.get("preferred_element_type")
                dtypes = (str(lhs.dtype), str(rhs.dtype), None if pet is None else str(pet))
                found[(lhs.shape, rhs.shape, dtypes, eq.params["dimension_numbers"])] += times
            if eq.primitive.name == "while":
                raise ValueError("a while loop has no static trip count; the floor would be wrong")
            if eq.primitive.name == "cond":  # one branch runs: summing them all is no floor
                raise ValueError("a cond runs one of its branches; the floor would count them all")
            inner = times * (eq.params["length"] if eq.primitive.name == "scan" else 1)
            for value in eq.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr, inner)
                    elif hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(jaxpr.jaxpr, 1)
    return found


def time_product(lhs_shape, rhs_shape, dtypes, dims, iters: int) -> tuple[float, float]:
    """(median seconds, FLOPs) of one `dot_general` on ones, jitted alone."""
    x, y = jnp.ones(lhs_shape, dtypes[0]), jnp.ones(rhs_shape, dtypes[1])
    f = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=dtypes[2]))
    (contract, _), _ = dims
    flops = 2.0 * np.prod(jax.eval_shape(f, x, y).shape) * np.prod([lhs_shape[i] for i in contract])
    _, sec = common.time_fn(lambda: f(x, y), warmup=3, iters=iters)
    return sec, flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama4.5m", type=common.csv_choices(tuple(bench_dpo_step.MODELS)))
    ap.add_argument("--reference", default="in-step", choices=("in-step", "precomputed"))
    ap.add_argument("--prefix-sharing", default="on", choices=("on", "off"))
    ap.add_argument("--iters", type=int, default=30, help="timed runs per product (median)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.iters < 1:
        ap.error(f"--iters must be at least 1 (got {args.iters})")
    common.peak_flops("float32")
    rows = []
    for name in args.models:
        run, info = bench_dpo_step.make_step(name, "float32", args.reference == "precomputed",
                                             args.prefix_sharing == "on")
        _, step_s = common.time_fn(lambda: run()["loss"], warmup=2, iters=5)
        found = products(jax.make_jaxpr(info["train_step"])(info["state"](), info["device_batch"]))
        floor = flops = 0.0
        for (ls, rs, dtypes, dims), count in sorted(found.items(), key=str):
            sec, f = time_product(ls, rs, dtypes, dims, args.iters)
            floor, flops = floor + count * sec, flops + count * f
            print(f"  {count:3d} x {ls} . {rs} {dims[0]}: {sec * 1e3:.3f} ms, {f / sec / 1e9:.0f} GFLOP/s")
        rows.append({"model": name, "reference": args.reference, "prefix_sharing": args.prefix_sharing == "on",
                     "distinct_products": len(found), "products": sum(found.values()),
                     "gemm_gflop": flops / 1e9, "gemm_floor_s": floor,
                     "step_s": step_s, "step_over_floor": step_s / floor,
                     **common.mfu_fields(flops / floor, "float32")})
    common.report(f"gemm_floor_{jax.default_backend()}", rows, args.out)


if __name__ == "__main__":
    main()
