"""A tiny random Llama decoder shared by the sampling tests."""
import jax
import jax.numpy as jnp
import pytest

from jaxreward.models.llama import Decoder, LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="session")
def model():
    return Decoder(CONFIG)


@pytest.fixture(scope="session")
def params(model):
    p = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    # The init (stddev 0.02) gives near-uniform next-token distributions; scale
    # the weights so the distributions are peaked but not one-hot (logit std ~3),
    # which makes top-p/top-k and greedy decisions non-trivial.
    return jax.tree.map(lambda x: x * 5.0, p)


def make_prompts(lengths, T, seed=1, left=True):
    """Random prompts (ids 1..63) of the given lengths padded to T with id 0."""
    B = len(lengths)
    toks = jax.random.randint(jax.random.key(seed), (B, T), 1, CONFIG.vocab_size)
    col = jnp.arange(T)[None, :]
    lens = jnp.asarray(lengths)[:, None]
    mask = (col >= T - lens) if left else (col < lens)
    return jnp.where(mask, toks, 0).astype(jnp.int32), mask
