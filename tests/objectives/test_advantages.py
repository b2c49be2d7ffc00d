"""Advantage estimators against hand-computed values and degenerate cases."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import advantages as adv
from jaxreward.objectives import registry


def test_gae_hand_values():
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.4, 0.3]])
    mask = jnp.ones((1, 3), bool)
    a, ret = adv.gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    # t2: δ = 1 + 0 − 0.3 = 0.7;                A = 0.7
    # t1: δ = 0 + 0.9·0.3 − 0.4 = −0.13;        A = −0.13 + 0.72·0.7 = 0.374
    # t0: δ = 0 + 0.9·0.4 − 0.5 = −0.14;        A = −0.14 + 0.72·0.374 = 0.12928
    np.testing.assert_allclose(a, [[0.12928, 0.374, 0.7]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[0.62928, 0.774, 1.0]], rtol=1e-5)


def test_gae_truncated_row_bootstraps():
    r = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.4, 0.3], [0.5, 0.4, 0.3]])
    mask = jnp.ones((2, 3), bool)
    a, _ = adv.gae_advantages(
        r, v, mask, gamma=0.9, lam=0.8, terminated_B=jnp.array([True, False]), bootstrap_values_B=jnp.array([9.0, 2.0])
    )
    # terminated row ignores its bootstrap value: same as before
    np.testing.assert_allclose(a[0], [0.12928, 0.374, 0.7], rtol=1e-5)
    # truncated: t2 δ = 1 + 0.9·2 − 0.3 = 2.5; t1: −0.13 + 0.72·2.5 = 1.67
    np.testing.assert_allclose(a[1, 1:], [1.67, 2.5], rtol=1e-5)


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e9])
def test_gae_masked_slots_have_no_effect(fill):
    # A hole in the middle and right padding; the compressed row is [0, 0, 1].
    mask = jnp.array([[True, False, True, True, False]])
    r = jnp.array([[0.0, fill, 0.0, 1.0, fill]])
    v = jnp.array([[0.5, fill, 0.4, 0.3, -fill]])

    def total(r, v):
        a, ret = adv.gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
        return jnp.sum(a * jnp.arange(1.0, 6.0)) + jnp.sum(ret), (a, ret)

    (_, (a, ret)), (gr, gv) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(r, v)
    np.testing.assert_allclose(a, [[0.12928, 0.0, 0.374, 0.7, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(ret, [[0.62928, 0.0, 0.774, 1.0, 0.0]], rtol=1e-5)
    assert np.isfinite(gr).all() and np.isfinite(gv).all()
    np.testing.assert_array_equal(gr[0, [1, 4]], 0.0)
    np.testing.assert_array_equal(gv[0, [1, 4]], 0.0)
    # the same gradients as the clean compressed row
    clean_mask = jnp.ones((1, 3), bool)

    def total_clean(r, v):
        a, ret = adv.gae_advantages(r, v, clean_mask, gamma=0.9, lam=0.8)
        return jnp.sum(a * jnp.array([1.0, 3.0, 4.0])) + jnp.sum(ret)

    cr, cv = jax.grad(total_clean, argnums=(0, 1))(jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.4, 0.3]]))
    np.testing.assert_allclose(gr[0, [0, 2, 3]], cr[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gv[0, [0, 2, 3]], cv[0], rtol=1e-5, atol=1e-7)


def test_gae_lambda_one_is_monte_carlo_minus_values():
    key1, key2 = jax.random.split(jax.random.PRNGKey(0))
    r = jax.random.normal(key1, (3, 6))
    v = jax.random.normal(key2, (3, 6))
    lengths = jnp.array([6, 3, 1])
    mask = jnp.arange(6)[None] < lengths[:, None]
    a, ret = adv.gae_advantages(r, v, mask, gamma=0.95, lam=1.0)
    mc = np.zeros((3, 6))
    for b in range(3):
        g = 0.0
        for t in reversed(range(int(lengths[b]))):
            g = float(r[b, t]) + 0.95 * g
            mc[b, t] = g
    np.testing.assert_allclose(a, np.where(mask, mc - np.asarray(v), 0.0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, np.where(mask, mc, 0.0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adv.discounted_returns(r, mask, gamma=0.95), np.where(mask, mc, 0.0), rtol=1e-4, atol=1e-5)


def test_gae_all_masked_row():
    mask = jnp.array([[True, True], [False, False]])
    nan = jnp.array([[1.0, 2.0], [np.nan, np.nan]])
    g = jax.grad(lambda v: jnp.sum(adv.gae_advantages(nan, v, mask, gamma=1.0, lam=1.0)[0]))(nan)
    a, ret = adv.gae_advantages(nan, nan, mask, gamma=1.0, lam=1.0)
    np.testing.assert_array_equal(a[1], 0.0)
    np.testing.assert_array_equal(ret[1], 0.0)
    assert np.isfinite(g).all()


def test_gae_jit_and_registry():
    fn = jax.jit(registry.get("token_advantage", "gae"), static_argnames=("gamma", "lam"))
    a, _ = fn(jnp.array([[0.0, 0.0, 1.0]]), jnp.array([[0.5, 0.4, 0.3]]), jnp.ones((1, 3), bool), gamma=0.9, lam=0.8)
    np.testing.assert_allclose(a, [[0.12928, 0.374, 0.7]], rtol=1e-5)


def test_grpo_hand_values_and_degenerate_groups():
    rewards = jnp.array([1.0, 2.0, 3.0, 0.1, 0.1, 0.1, 1.0, 3.0, 100.0, 7.0, 0.0, 0.0])
    valid = jnp.array([True] * 8 + [False, True, False, False])
    a = adv.grpo_advantages(rewards, group_size=3, valid_B=valid)
    # group 0: mean 2, unbiased std 1 → [−1, 0, 1]/(1 + 1e-6)
    # group 1: all equal (0.1 three times, where float32 rounding would leave residue) → exact zeros
    # group 2: third member invalid: mean 2, std sqrt(2) → [−1/√2, 1/√2, 0]
    # group 3: one valid member → zeros
    s2 = 1 / math.sqrt(2)
    expected = [-1, 0, 1, 0, 0, 0, -s2, s2, 0, 0, 0, 0]
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(a)[3:6] == 0.0) and np.all(np.asarray(a)[8:] == 0.0)
    # Dr. GRPO: no std scaling
    a_dr = adv.grpo_advantages(rewards, group_size=3, valid_B=valid, scale_by_std=False)
    np.testing.assert_allclose(a_dr[:3], [-1.0, 0.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(a_dr[6:9], [-1.0, 1.0, 0.0], rtol=1e-6)
    # the invalid member's reward does not move the baseline
    for fill in (-5.0, np.nan, np.inf, 1e9):
        moved = adv.grpo_advantages(rewards.at[8].set(fill), group_size=3, valid_B=valid)
        np.testing.assert_allclose(moved, a, rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(adv.grpo_advantages(x, group_size=3, valid_B=valid) ** 2))(rewards.at[8].set(np.nan))
    assert np.isfinite(g).all() and g[8] == 0.0


def test_grpo_group_of_one_and_gradients_finite():
    a = adv.grpo_advantages(jnp.array([3.0, -1.0]), group_size=1)
    np.testing.assert_array_equal(a, 0.0)
    g = jax.grad(lambda r: jnp.sum(adv.grpo_advantages(r, group_size=3) * jnp.arange(6.0)))(jnp.array([1.0, 1.0, 1.0, 0.0, 1.0, 2.0]))
    assert np.isfinite(g).all()
    with pytest.raises(ValueError):
        adv.grpo_advantages(jnp.zeros(5), group_size=2)


def test_rloo_hand_values():
    rewards = jnp.array([1.0, 2.0, 3.0, 1.0, 3.0, np.nan, 4.0, 4.0, 4.0])
    valid = jnp.array([True, True, True, True, True, False, True, True, True])
    a = adv.rloo_advantages(rewards, group_size=3, valid_B=valid)
    # group 0: baselines (2+3)/2, (1+3)/2, (1+2)/2 → [1 − 2.5, 2 − 2, 3 − 1.5] = [−1.5, 0, 1.5]
    # group 1: [1 − 3, 3 − 1, 0] (invalid member excluded); group 2: all equal → 0
    np.testing.assert_allclose(a, [-1.5, 0.0, 1.5, -2.0, 2.0, 0.0, 0.0, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(adv.rloo_advantages(jnp.array([1.0, 2.0]), group_size=1), 0.0)


def test_reinforce_pp_whitening():
    r = jnp.array([[0.0, 0.0, 1.0], [0.0, 2.0, np.nan]])
    mask = jnp.array([[True, True, True], [True, True, False]])
    a, ret = adv.reinforce_pp_advantages(r, None, mask, gamma=1.0)
    # returns: [1, 1, 1], [2, 2]; mean 1.4, std sqrt((3·0.16 + 2·0.36)/5) = sqrt(0.24)
    np.testing.assert_allclose(ret, [[1, 1, 1], [2, 2, 0]], rtol=1e-6)
    s = math.sqrt(0.24)
    np.testing.assert_allclose(a, [[-0.4 / s] * 3, [0.6 / s, 0.6 / s, 0.0]], rtol=1e-5)


def test_remax():
    a = adv.remax_advantages(jnp.array([1.0, 0.5, np.nan]), jnp.array([0.5, 1.0, 2.0]), valid_B=jnp.array([True, True, False]))
    np.testing.assert_allclose(a, [0.5, -0.5, 0.0])


def test_broadcast_to_tokens():
    out = adv.broadcast_to_tokens(jnp.array([2.0, np.nan]), jnp.array([[True, False], [False, False]]))
    np.testing.assert_array_equal(out, [[2.0, 0.0], [0.0, 0.0]])


# ----------------------------------------------------------------------------
# Hyper-parameters and shapes are checked with errors that name the argument.
# ----------------------------------------------------------------------------


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


@pytest.mark.parametrize("fn", [adv.grpo_advantages, adv.rloo_advantages])
@pytest.mark.parametrize("group_size", [0, -2, 2.0, True, None])
def test_group_size_must_be_a_positive_integer(fn, group_size):
    # 0 used to raise ZeroDivisionError, negative and float sizes raw JAX errors.
    with _raises(f"group_size must be an integer >= 1, got {group_size!r}"):
        fn(jnp.zeros(4), group_size=group_size)


def test_group_shapes_are_checked():
    with _raises("rewards_B has shape (5,): B must be a multiple of group_size=2"):
        adv.grpo_advantages(jnp.zeros(5), group_size=2)
    with _raises("rewards_B must be [B], got shape (2, 2)"):
        adv.rloo_advantages(jnp.zeros((2, 2)), group_size=2)
    with _raises("valid_B has shape (4, 1), expected (4,) to match rewards_B with shape (4,)"):
        adv.grpo_advantages(jnp.zeros(4), group_size=2, valid_B=jnp.ones((4, 1), bool))
    with _raises("greedy_rewards_B has shape (3,), expected (2,)"):
        adv.remax_advantages(jnp.zeros(2), jnp.zeros(3))
    with _raises("eps must be in [0, inf), got -1.0"):
        adv.grpo_advantages(jnp.zeros(4), group_size=2, eps=-1.0)
    # An integer group size of numpy type is fine and gives the hand value:
    # group [1, 3]: mean 2, std (ddof 1) √2 → [−1/√2, 1/√2]
    np.testing.assert_allclose(adv.grpo_advantages(jnp.array([1.0, 3.0]), group_size=np.int64(2), eps=0.0),
                               [-1 / math.sqrt(2), 1 / math.sqrt(2)], rtol=1e-6)


@pytest.mark.parametrize("kw, message", [
    (dict(gamma=2.0), "gamma must be in [0, 1], got 2.0"),
    (dict(gamma=2), "gamma must be in [0, 1], got 2"),
    (dict(gamma=-0.1), "gamma must be in [0, 1], got -0.1"),
    (dict(lam=1.5), "lam must be in [0, 1], got 1.5"),
    (dict(lam=float("nan")), "lam must be in [0, 1], got nan"),
])
def test_gae_gamma_lambda_in_unit_interval(kw, message):
    r = jnp.zeros((1, 3))
    with _raises(message):
        adv.gae_advantages(r, r, jnp.ones((1, 3), bool), **kw)


def test_discounted_returns_and_reinforce_pp_check_gamma_and_shapes():
    r, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with _raises("gamma must be in [0, 1], got 1.01"):
        adv.discounted_returns(r, mask, gamma=1.01)
    with _raises("gamma must be in [0, 1], got 3"):
        adv.reinforce_pp_advantages(r, None, mask, gamma=3)
    with _raises("mask_BT has shape (2, 4), expected (2, 3) to match rewards_BT with shape (2, 3)"):
        adv.reinforce_pp_advantages(r, None, jnp.ones((2, 4), bool))
    with _raises("rewards_BT must be [B, T], got shape (3,)"):
        adv.discounted_returns(jnp.zeros(3), jnp.ones(3, bool))


def test_gae_shapes_are_checked():
    r, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with _raises("values_BT has shape (2, 1), expected (2, 3) to match rewards_BT with shape (2, 3)"):
        adv.gae_advantages(r, jnp.zeros((2, 1)), mask)
    with _raises("mask_BT has shape (3,), expected (2, 3)"):
        adv.gae_advantages(r, r, jnp.ones(3, bool))
    with _raises("bootstrap_values_B has shape (2, 1), expected (2,)"):
        adv.gae_advantages(r, r, mask, bootstrap_values_B=jnp.zeros((2, 1)))
    with _raises("terminated_B has shape (3,), expected (2,)"):
        adv.gae_advantages(r, r, mask, terminated_B=jnp.ones(3, bool), bootstrap_values_B=jnp.zeros(2))
    with _raises("advantages_B has shape (2, 1), expected (2,)"):
        adv.broadcast_to_tokens(jnp.zeros((2, 1)), mask)


def test_traced_hyper_parameters_are_not_checked_under_jit():
    # A traced γ is not static; the check must not try to read it.
    r = jnp.array([[0.0, 1.0]])
    out = jax.jit(lambda g: adv.discounted_returns(r, jnp.ones((1, 2), bool), gamma=g))(0.5)
    np.testing.assert_allclose(out, [[0.5, 1.0]])
