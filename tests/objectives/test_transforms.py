"""Reward transforms and masking helpers against hand-computed values."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import masking, transforms


def test_masked_reductions_ignore_padding():
    x = jnp.array([[1.0, 3.0, np.nan], [np.inf, 2.0, 1e9]])
    mask = jnp.array([[True, True, False], [False, True, False]])
    np.testing.assert_allclose(masking.masked_sum(x, mask), 6.0)
    np.testing.assert_allclose(masking.masked_mean(x, mask, axis=-1), [2.0, 2.0])
    # population variance of [1, 3, 2] = 2/3; unbiased = 1
    np.testing.assert_allclose(masking.masked_var(x, mask), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(masking.masked_var(x, mask, ddof=1), 1.0, rtol=1e-6)
    g = jax.grad(lambda y: masking.masked_mean(y, mask) + masking.masked_std(y, mask))(x)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(np.asarray(g)[~np.asarray(mask)], 0.0)


def test_all_masked_reductions_are_zero_with_finite_grads():
    x = jnp.full((2, 2), np.nan)
    mask = jnp.zeros((2, 2), bool)
    for fn in (masking.masked_mean, masking.masked_std, lambda a, m: jnp.sum(masking.masked_whiten(a, m))):
        val, g = jax.value_and_grad(lambda a: fn(a, mask))(x)
        assert val == 0.0
        np.testing.assert_array_equal(g, 0.0)


def test_whiten_rewards():
    r = jnp.array([1.0, 3.0, np.nan])
    out = transforms.whiten_rewards(r, jnp.array([True, True, False]))
    # mean 2, population std 1 → [−1, 1, 0]
    np.testing.assert_allclose(out, [-1.0, 1.0, 0.0], rtol=1e-6)
    kept = transforms.whiten_rewards(r, jnp.array([True, True, False]), shift_mean=False)
    np.testing.assert_allclose(kept, [1.0, 3.0, 0.0], rtol=1e-6)
    # all equal (0.1 has a float32 rounding residue after averaging) → exact zeros
    np.testing.assert_array_equal(transforms.whiten_rewards(jnp.full(3, 0.1)), 0.0)


def test_clip_and_length_penalties():
    np.testing.assert_allclose(transforms.clip_rewards(jnp.array([-5.0, 0.5, 5.0]), low=-1.0, high=1.0), [-1.0, 0.5, 1.0])
    with pytest.raises(ValueError):
        transforms.clip_rewards(jnp.zeros(1), low=1.0, high=0.0)
    # r − 0.01·max(L − 10, 0): [1 − 0, 1 − 0.1]
    np.testing.assert_allclose(
        transforms.length_penalty(jnp.array([1.0, 1.0]), jnp.array([5, 20]), coef=0.01, free_length=10), [1.0, 0.9], rtol=1e-6
    )
    # DAPO: L_max 100, L_cache 20: L ≤ 80 → 0; L = 90 → (80 − 90)/20 = −0.5; L > 100 → −1
    np.testing.assert_allclose(
        transforms.overlong_penalty(jnp.array([50, 80, 90, 100, 130]), max_length=100, cache_length=20),
        [0.0, 0.0, -0.5, -1.0, -1.0],
    )


def test_par_reward():
    r = jnp.array([1.0, 0.0])
    ref = jnp.array([[1.0, 0.0], [0.0, np.nan]])
    mask = jnp.array([[True, True], [True, False]])
    # row 0: (σ(0) + σ(1))/2 = (0.5 + 0.731059)/2; row 1: σ(0) = 0.5
    out = transforms.par_reward(r, ref, mask)
    np.testing.assert_allclose(out, [(0.5 + 1 / (1 + math.exp(-1))) / 2, 0.5], rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(transforms.par_reward(r, x, mask)))(ref)
    assert np.isfinite(g).all() and g[1, 1] == 0.0


def test_log_sigmoid_centering_and_combination():
    r = jnp.array([[1.0, 0.0]])  # B = 1, K = 2 aspects
    base = jnp.array([[[0.0, 0.0], [1.0, -1.0], [2.0, 1.0]]])  # M = 3 base samples
    # median per aspect: [1, 0] → log σ(1 − 1) = log 0.5, log σ(0 − 0) = log 0.5
    out = transforms.log_sigmoid_centered(r, base, quantile=0.5)
    np.testing.assert_allclose(out, [[math.log(0.5), math.log(0.5)]], rtol=1e-6)
    np.testing.assert_allclose(transforms.combine_log_sigmoid(r, base, quantile=0.5), [2 * math.log(0.5)], rtol=1e-6)
    # quantile 1.0 (max) of aspect 0 is 2: log σ(−1) = −1.313262
    out = transforms.log_sigmoid_centered(r[:, 0], base[..., 0], quantile=1.0)
    np.testing.assert_allclose(out, [-math.log1p(math.e)], rtol=1e-6)


def test_pure_min_form():
    r = jnp.array([[1.0, 0.0, np.nan], [0.5, 0.5, 0.5], [np.nan, np.nan, np.nan]])
    mask = jnp.array([[True, True, False], [True, True, True], [False, False, False]])
    out = transforms.pure_min_form(r, mask, temperature=1.0)
    # row 0: w = softmax([−1, 0]) = [e^{−1}, 1]/(1 + e^{−1}) = [0.268941, 0.731059] → [0.268941, 0]
    w0 = math.exp(-1) / (1 + math.exp(-1))
    np.testing.assert_allclose(out[0], [w0, 0.0, 0.0], rtol=1e-6)
    # row 1: equal weights 1/3 → 0.5/3 each, summing to 0.5 = min
    np.testing.assert_allclose(out[1], [0.5 / 3] * 3, rtol=1e-6)
    np.testing.assert_array_equal(out[2], 0.0)
    # T → 0: the sum approaches the minimum
    cold = transforms.pure_min_form(jnp.array([[0.9, 0.2, 0.7]]), jnp.ones((1, 3), bool), temperature=0.01)
    np.testing.assert_allclose(jnp.sum(cold), 0.2, atol=1e-6)


def test_clip_and_delta_process_rewards():
    r = jnp.array([[0.9, 0.3, 0.6, np.nan], [0.2, np.nan, 0.7, 0.4]])
    mask = jnp.array([[True, True, True, False], [True, False, True, True]])
    # Clip, η = 0.5: min(r − 0.5, 0) = [0, −0.2, 0], [−0.3, ·, 0, −0.1]
    clip = transforms.clip_process_rewards(r, mask, threshold=0.5)
    np.testing.assert_allclose(clip, [[0.0, -0.2, 0.0, 0.0], [-0.3, 0.0, 0.0, -0.1]], atol=1e-6)
    # Delta: r_k − r_next, last kept: [0.9 − 0.3, 0.3 − 0.6, 0.6], [0.2 − 0.7, ·, 0.7 − 0.4, 0.4]
    delta = transforms.delta_process_rewards(r, mask)
    np.testing.assert_allclose(delta, [[0.6, -0.3, 0.6, 0.0], [-0.5, 0.0, 0.3, 0.4]], atol=1e-6)
    # the return from each valid step telescopes to that step's reward
    returns = jnp.cumsum(delta[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(returns[0, :3], [0.9, 0.3, 0.6], atol=1e-6)
    np.testing.assert_allclose(returns[1, [0, 2, 3]], [0.2, 0.7, 0.4], atol=1e-6)


def test_place_on_last_token():
    mask = jnp.array([[True, True, False], [True, False, True], [False, False, False]])
    r = jnp.array([1.0, 2.0, np.nan])
    out = transforms.place_on_last_token(r, mask)
    np.testing.assert_array_equal(out, [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    g = jax.grad(lambda x: jnp.sum(transforms.place_on_last_token(x, mask)))(r)
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0])


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


def test_transforms_check_shapes():
    with _raises("mask has shape (3, 1), expected (3,) to match rewards with shape (3,)"):
        transforms.whiten_rewards(jnp.zeros(3), jnp.ones((3, 1), bool))
    with _raises("rewards_B has shape (3,), expected (2,) to match mask_BT's batch axis with shape (2,)"):
        transforms.place_on_last_token(jnp.zeros(3), jnp.ones((2, 4), bool))
    with _raises("ref_mask_BM has shape (2, 1), expected (2, 3) to match ref_rewards_BM with shape (2, 3)"):
        transforms.par_reward(jnp.zeros(2), jnp.zeros((2, 3)), jnp.ones((2, 1), bool))
    with _raises("lengths_B has shape (2, 1), expected (2,) to match rewards_B with shape (2,)"):
        transforms.length_penalty(jnp.zeros(2), jnp.ones((2, 1)), coef=0.1)
    with _raises("step_mask_BK has shape (2, 2), expected (2, 3)"):
        transforms.delta_process_rewards(jnp.zeros((2, 3)), jnp.ones((2, 2), bool))
    with _raises("base_rewards has shape (3, 4), expected [B, M] with the B (and K) of rewards, whose shape is (2,)"):
        transforms.log_sigmoid_centered(jnp.zeros(2), jnp.zeros((3, 4)), quantile=0.5)
    with _raises("cache_length must be an integer >= 1, got 0"):
        transforms.overlong_penalty(jnp.zeros(2), max_length=10, cache_length=0)
