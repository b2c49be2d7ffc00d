"""`llama.grouped_attention` against `jax.nn.dot_product_attention` (the trusted reference)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models import llama
from jaxreward.models.llama import Decoder, LlamaConfig, causal_grouped_attention, grouped_attention

hm = lambda x_BSKD: jnp.swapaxes(x_BSKD, 1, 2)  # head-major [B, K, S, D], the cache layout


@pytest.mark.parametrize("heads,kv_heads", [(8, 4), (6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("T,S", [(7, 7), (1, 11), (3, 9)])
def test_grouped_attention_equals_the_library(heads, kv_heads, T, S):
    ks = jax.random.split(jax.random.PRNGKey(heads * 100 + T), 4)
    q = jax.random.normal(ks[0], (2, T, heads, 16))
    k = jax.random.normal(ks[1], (2, S, kv_heads, 16))
    v = jax.random.normal(ks[2], (2, S, kv_heads, 16))
    # A random mask where every query row sees at least key 0.
    mask = jax.random.bernoulli(ks[3], 0.6, (2, T, S)).at[:, :, 0].set(True)
    ours = grouped_attention(q, hm(k), hm(v), mask)
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # Query head i reads kv head i // (heads // kv_heads): changing kv head 0's
    # values moves exactly the first heads // kv_heads query heads.
    g = heads // kv_heads
    moved = grouped_attention(q, hm(k), hm(v.at[:, :, 0].add(1.0)), mask) - ours
    assert np.abs(np.asarray(moved[:, :, :g])).min() > 0.5
    np.testing.assert_array_equal(np.asarray(moved[:, :, g:]), 0.0)


def test_gradients_equal_the_library():
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (2, 5, 4, 8))
    k, v = (jax.random.normal(kk, (2, 5, 2, 8)) for kk in ks[1:3])
    mask = jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    ours = jax.grad(loss(lambda q, k, v: grouped_attention(q, hm(k), hm(v), mask)), (0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])),
                   (0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_matches_the_library_and_keeps_the_dtype():
    ks = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(ks[0], (2, 6, 4, 16), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (2, 6, 2, 16), jnp.bfloat16) for kk in ks[1:])
    mask = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0)
    ours = grouped_attention(q, hm(k), hm(v), mask)
    assert ours.dtype == jnp.bfloat16
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               atol=2e-2)


def test_decoder_gives_the_same_logits_with_either_implementation():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 64)
    mask = jnp.arange(9)[None] >= jnp.array([[0], [3]])  # the second row left-padded
    params = Decoder(cfg).init(jax.random.PRNGKey(1), tokens)["params"]
    ours = Decoder(cfg).apply({"params": params}, tokens, mask)
    lib = Decoder(dataclasses.replace(cfg, attention_impl="xla")).apply({"params": params},
                                                                         tokens, mask)
    np.testing.assert_allclose(np.asarray(ours)[np.asarray(mask)], np.asarray(lib)[np.asarray(mask)],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_cached_decoding_equals_the_full_forward(impl):
    """Prefill 5 tokens into the head-major cache, then feed 3 more one at a
    time: each step's logits equal the full forward's at that position."""
    from jaxreward.models.llama import KVCache
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=8, attention_impl=impl)
    model = Decoder(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 64)
    params = {"params": model.init(jax.random.PRNGKey(1), tokens)["params"]}
    full = model.apply(params, tokens)
    cache = KVCache.init(cfg, 2, 8)
    assert cache.k[0].shape == (2, 2, 8, 8)  # [B, KV, S, D]
    logits, cache = model.apply(params, tokens[:, :5], None, None, cache)
    np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
    for t in range(5, 8):
        logits, cache = model.apply(params, tokens[:, t:t + 1], None, None, cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=6,
                    num_kv_heads=4)


@pytest.mark.parametrize("T,min_chunk", [(16, 8), (37, 8), (37, 12), (64, 16), (64, 8), (90, 10)])
def test_causal_query_chunks_equal_one_chunk_in_value_and_gradient(T, min_chunk):
    """Chunk [lo, hi) reads keys [0, hi) only; under a causal mask that drops
    only masked keys, so value and gradients equal the unchunked ones. The
    mask is causal with random holes below the diagonal (padding, branches
    of a packed row), the diagonal always visible. (T, min_chunk) = (37, 12)
    is 3 chunks with bounds [0, 12, 25, 37]; (90, 10) is capped at 8."""
    ks = jax.random.split(jax.random.PRNGKey(T * 10 + min_chunk), 4)
    q = jax.random.normal(ks[0], (2, T, 6, 8))
    k, v = (jax.random.normal(kk, (2, 2, T, 8)) for kk in ks[1:3])
    causal = jnp.tril(jnp.ones((T, T), bool))
    mask = (jax.random.bernoulli(ks[3], 0.7, (2, T, T)) & causal) | jnp.eye(T, dtype=bool)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    one = lambda q, k, v: grouped_attention(q, k, v, mask)
    many = lambda q, k, v: causal_grouped_attention(q, k, v, mask, min_chunk)
    np.testing.assert_allclose(many(q, k, v), one(q, k, v), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.grad(loss(many), (0, 1, 2))(q, k, v), jax.grad(loss(one), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_query_chunk_count_and_bounds(monkeypatch):
    """n = min(T // min_chunk, 8) chunks with bounds round(T·i/n): T = 37 at 12
    gives 3 chunks [0, 12), [12, 25), [25, 37); T = 23 at 12 gives one (no
    split); min_chunk 0 gives one; T = 1000 at 10 is capped at 8 chunks."""
    seen = []
    real = llama.grouped_attention
    monkeypatch.setattr(llama, "grouped_attention",
                        lambda q, k, v, m: seen.append((q.shape[1], k.shape[2])) or real(q, k, v, m))
    def run(T, min_chunk):
        seen.clear()
        q, k = jnp.zeros((1, T, 2, 4)), jnp.zeros((1, 1, T, 4))
        llama.causal_grouped_attention(q, k, k, jnp.tril(jnp.ones((1, T, T), bool)), min_chunk)
        return list(seen)
    assert run(37, 12) == [(12, 12), (13, 25), (12, 37)]
    assert run(23, 12) == [(23, 23)]
    assert run(64, 0) == [(64, 64)]
    assert len(run(1000, 10)) == 8


def test_decoder_logits_do_not_depend_on_the_query_chunk():
    """A whole forward (padding and the prefix-sharing branch mask) in one
    query chunk and in chunks of 8 (5 chunks of 40 positions)."""
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64, attention_query_chunk=0)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 40), 0, 40)
    mask = jnp.ones((2, 40), bool).at[0, :7].set(False)
    branch = jnp.concatenate([jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 12), jnp.int32),
                              jnp.full((2, 12), 2, jnp.int32)], axis=1)
    params = Decoder(cfg).init(jax.random.PRNGKey(1), tokens)["params"]
    run = lambda c: Decoder(dataclasses.replace(cfg, attention_query_chunk=c)).apply(
        {"params": params}, tokens, mask, None, None, branch, method=Decoder.hidden_states)
    one = run(0)
    np.testing.assert_allclose(run(8), one, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(np.asarray(one), np.zeros_like(one))


def test_a_numpy_integer_query_chunk_is_an_integer():
    # It was refused as "attention_query_chunk=np.int64(128) must be an integer >= 0".
    cfg = LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=6,
                      num_kv_heads=2, attention_query_chunk=np.int64(64))
    assert cfg.attention_query_chunk == 64 and type(cfg.attention_query_chunk) is int


@pytest.mark.parametrize("bad", [-1, 1.5, "128", True, np.bool_(True), None])
def test_attention_query_chunk_is_checked(bad):
    with pytest.raises(ValueError, match="attention_query_chunk=.* must be an integer >= 0"):
        LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_layers=1, num_heads=6,
                    num_kv_heads=2, attention_query_chunk=bad)


def test_query_chunks_on_a_2x2x2_mesh_equal_one_device():
    """Forward and parameter gradients with 5 query chunks (T = 40, chunk 8):
    params sharded over (data, fsdp, tensor) = (2, 2, 2) with 8 rows split
    over data x fsdp, against one device in one chunk (1e-5)."""
    from jax.sharding import NamedSharding, PartitionSpec
    from jaxreward import parallel
    from jaxreward.train import step as step_lib
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64, attention_query_chunk=8)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 40), 0, 40)
    mask = jnp.ones((8, 40), bool).at[::3, :5].set(False)
    boxed = Decoder(cfg).init(jax.random.PRNGKey(3), tokens)["params"]
    params = step_lib.unbox(boxed)

    def loss(c):
        return lambda p, t, m: jnp.mean(jnp.sin(Decoder(c).apply({"params": p}, t, attention_mask=m)))

    one_value, one_grad = jax.value_and_grad(loss(dataclasses.replace(cfg, attention_query_chunk=0)))(
        params, tokens, mask)
    mesh = parallel.make_mesh(2, 2, 2, devices=jax.devices()[:8])
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    sharded = jax.device_put(params, parallel.param_shardings(mesh, boxed))
    value, grad = jax.jit(jax.value_and_grad(loss(cfg)))(
        sharded, jax.device_put(tokens, rows), jax.device_put(mask, rows))
    np.testing.assert_allclose(value, one_value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(one_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert "tensor" in str(sharded["layers_0"]["mlp"]["up_proj"]["kernel"].sharding.spec)
