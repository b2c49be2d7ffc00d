"""Micro-batch split/merge and gradient accumulation in `jaxreward.train.step`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.train import step as step_lib


def test_split_takes_consecutive_rows_and_merge_inverts_it():
    batch = {"tokens": np.arange(6 * 3).reshape(6, 3), "w": np.arange(6.0)}
    parts = step_lib._split(batch, 3)
    assert parts["tokens"].shape == (3, 2, 3) and parts["w"].shape == (3, 2)
    np.testing.assert_array_equal(parts["tokens"][1], batch["tokens"][2:4])  # rows i*b .. i*b+b-1
    np.testing.assert_array_equal(parts["w"][2], [4.0, 5.0])
    merged = step_lib._merge(parts)
    for k in batch:
        np.testing.assert_array_equal(merged[k], batch[k])


def test_split_rejects_a_batch_that_does_not_divide():
    with pytest.raises(ValueError, match="batch size 6 does not split into 4 micro-batches"):
        step_lib._split({"x": np.zeros((6, 2))}, 4)


def test_micro_batched_gradient_equals_one_shot():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    batch = {"x": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}

    def loss_fn(p, b, r):
        per = jnp.sum((b["x"] @ p["w"] - b["y"]) ** 2, axis=1)
        return per.mean(), {"per": per}

    key = jax.random.PRNGKey(0)
    loss1, out1, g1 = step_lib.loss_and_grad(loss_fn, params, batch, key, 1)
    for k in (2, 4):
        loss, out, g = jax.jit(lambda p, b: step_lib.loss_and_grad(loss_fn, p, b, key, k))(
            params, batch)
        np.testing.assert_allclose(loss, loss1, rtol=1e-6)
        np.testing.assert_allclose(out["per"], out1["per"], rtol=1e-6)  # merged back in order
        np.testing.assert_allclose(g["w"], g1["w"], rtol=1e-5, atol=1e-6)
