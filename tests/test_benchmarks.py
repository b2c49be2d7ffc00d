"""benchmarks/gemm_floor.py counts the step's matrix products right (its sum
is only a floor if every product is counted, each once per execution), and
benchmarks/bench_attention.py counts the FLOPs its attention runs."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_attention  # noqa: E402
import gemm_floor  # noqa: E402
from jaxreward.models import llama  # noqa: E402


def test_products_counts_each_dot_once_per_execution_through_scan_jit_and_grad():
    def f(x, w):
        y = x @ w                                  # 1 product [4, 8] . [8, 8]
        def body(c, _):
            return jnp.tanh(c @ w), None           # 3 iterations of [4, 8] . [8, 8]
        y, _ = jax.lax.scan(body, y, None, length=3)
        return jax.jit(lambda a: (a @ w.T).sum())(y)  # 1 more inside a nested jit
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    found = gemm_floor.products(jax.make_jaxpr(f)(x, w))
    assert sum(found.values()) == 5
    # The gradient in w: the 5 forward products again, one dW product for each of
    # the 5, and one d(input) product for the 4 whose input depends on w (the
    # first one's input is x): 5 + 5 + 4 = 14.
    g = jax.make_jaxpr(jax.grad(f, argnums=1))(x, w)
    assert sum(gemm_floor.products(g).values()) == 14


def test_a_while_loop_is_refused():
    def f(x):
        return jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]
    with pytest.raises(ValueError, match="while loop has no static trip count"):
        gemm_floor.products(jax.make_jaxpr(f)(jnp.ones((2, 2))))


def test_a_cond_is_refused():
    # Only one branch runs, so summing every branch's products is no floor.
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
    f = lambda p, a: jax.lax.cond(p, lambda b: b @ w, lambda b: (b @ w) @ w, a)
    with pytest.raises(ValueError, match="a cond runs one of its branches"):
        gemm_floor.products(jax.make_jaxpr(f)(True, x))


def test_csv_choices_messages():
    import argparse
    import common
    parse = common.csv_choices(("llama4.5m", "smollm2"))
    assert parse(" smollm2,llama4.5m ") == ["smollm2", "llama4.5m"]
    with pytest.raises(argparse.ArgumentTypeError, match="no choice given; pick from llama4.5m, smollm2"):
        parse(",")
    with pytest.raises(argparse.ArgumentTypeError, match="'nope' not among llama4.5m, smollm2"):
        parse("nope,smollm2")


def test_time_product_counts_the_flops_of_a_batched_contraction_by_hand():
    # [2, 3, 4] . [2, 4, 5], batch dim 0, contracting lhs 2 with rhs 1: output
    # [2, 3, 5] = 30 entries, each 4 multiply-adds: 2 * 30 * 4 = 240 FLOPs.
    dims = (((2,), (1,)), ((0,), (0,)))
    sec, flops = gemm_floor.time_product((2, 3, 4), (2, 4, 5), ("float32", "float32", None), dims, iters=1)
    assert flops == 240 and sec > 0
    # bfloat16 operands with a float32 accumulator keep their dtypes in the key and the timing.
    x, y = jnp.ones((3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    found = gemm_floor.products(jax.make_jaxpr(
        lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32))(x, y))
    ((key, count),) = found.items()
    assert key[2] == ("bfloat16", "bfloat16", "float32") and count == 1
    _, flops = gemm_floor.time_product(key[0], key[1], key[2], key[3], iters=1)
    assert flops == 2 * 3 * 5 * 4


def test_attention_flops_by_hand_and_against_the_program():
    # T = 384 in three chunks of 128: chunk i reads keys [0, 128 (i + 1)), so
    # the score pairs are 128 * (128 + 256 + 384) = 98,304, 2/3 of 384^2 =
    # 147,456 ((n + 1) / 2n at n = 3).
    bounds = bench_attention.chunk_bounds(384, 128)
    assert bounds == [0, 128, 256, 384]
    assert bench_attention.chunk_bounds(384, 0) == [0, 384]
    assert bench_attention.chunk_bounds(200, 128) == [0, 200]  # under 2 chunks: one
    # Forward + backward = 3 x (scores + probs @ values) = 3 x 2 x 2.q.k.D per head:
    # B = 1, H = 2, D = 4, one chunk of T = 3: 12 * 1 * 2 * 4 * 9 = 864.
    assert bench_attention.attention_flops(1, 2, 4, [0, 3]) == 864
    # The count equals the FLOPs of the products in the jaxpr of value_and_grad, chunked and not.
    B, T, H, K, D = 2, 8, 4, 2, 3
    q = jnp.ones((B, T, H, D))
    kv = jnp.ones((B, K, T, D))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
    for min_chunk in (0, 2, 4):
        f = jax.value_and_grad(lambda q, k, v: llama.causal_grouped_attention(q, k, v, mask, min_chunk).sum(),
                               argnums=(0, 1, 2))
        found = gemm_floor.products(jax.make_jaxpr(f)(q, kv, kv))
        total = sum(count * gemm_floor.time_product(*key, iters=1)[1] for key, count in found.items())
        assert total == bench_attention.attention_flops(B, H, D, bench_attention.chunk_bounds(T, min_chunk))
