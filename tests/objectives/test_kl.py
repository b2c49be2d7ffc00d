"""KL estimators: values, exact expected gradients on a 3-action policy, KL steps."""
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import kl, policy_gradient as pg

REF_LOGP = jnp.log(jnp.array([0.2, 0.3, 0.5]))
THETA = jnp.array([1.0, -0.5, 0.2])


def test_estimator_hand_values():
    logp = jnp.array([[math.log(0.5)]])
    ref = jnp.array([[math.log(0.25)]])
    mask = jnp.ones((1, 1), bool)
    x = math.log(2.0)  # log-ratio 0.693147
    np.testing.assert_allclose(kl.kl_per_token(logp, ref, mask, "k1"), [[x]], rtol=1e-6)
    # ½ x² = 0.240227
    np.testing.assert_allclose(kl.kl_per_token(logp, ref, mask, "k2"), [[0.5 * x * x]], rtol=1e-6)
    # e^{−x} − 1 + x = 0.5 − 1 + 0.693147 = 0.193147
    np.testing.assert_allclose(kl.kl_per_token(logp, ref, mask, "k3"), [[0.5 - 1 + x]], rtol=1e-5)
    with pytest.raises(KeyError, match="k3"):
        kl.kl_per_token(logp, ref, mask, "k4")


def _tabular_kls(theta):
    logp = jax.nn.log_softmax(theta)
    p, q = jnp.exp(logp), jnp.exp(REF_LOGP)
    reverse = jnp.sum(p * (logp - REF_LOGP))  # KL(π‖π_ref)
    forward = jnp.sum(q * (REF_LOGP - logp))  # KL(π_ref‖π)
    return reverse, forward


def _expected_estimator(theta, estimator):
    """E_{a~π}[k(a)] with the sampling distribution held fixed (no reparameterization)."""
    logp = jax.nn.log_softmax(theta)
    k = kl.kl_per_token(logp[:, None], REF_LOGP[:, None], jnp.ones((3, 1), bool), estimator)[:, 0]
    return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * k)


def test_expected_gradients_of_estimators_enumerated():
    grad_reverse = jax.grad(lambda t: _tabular_kls(t)[0])(THETA)
    grad_forward = jax.grad(lambda t: _tabular_kls(t)[1])(THETA)
    g1, g2, g3 = [jax.grad(functools.partial(_expected_estimator, estimator=e))(THETA) for e in ("k1", "k2", "k3")]
    # k1: E[∇ log π] = Σ ∇π = 0
    np.testing.assert_allclose(g1, 0.0, atol=1e-6)
    # k2: E[x ∇ log π] = ∇ KL(π‖π_ref)
    np.testing.assert_allclose(g2, grad_reverse, rtol=1e-5, atol=1e-6)
    # k3: E[(1 − π_ref/π) ∇ log π] = ∇ KL(π_ref‖π), which is not ∇ KL(π‖π_ref)
    np.testing.assert_allclose(g3, grad_forward, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(g3 - grad_reverse)) > 1e-2
    assert np.max(np.abs(g2 - grad_forward)) > 1e-2


def test_expected_values_of_estimators():
    reverse, _ = _tabular_kls(THETA)
    # k1 and k3 are unbiased for KL(π‖π_ref); k2 is not
    np.testing.assert_allclose(_expected_estimator(THETA, "k1"), reverse, rtol=1e-5)
    np.testing.assert_allclose(_expected_estimator(THETA, "k3"), reverse, rtol=1e-5)
    assert abs(float(_expected_estimator(THETA, "k2")) - float(reverse)) > 1e-3


# A batch of one-token responses whose empirical distribution is exactly π:
# π = [1/2, 1/4, 1/4] and the batch holds actions [0, 0, 1, 2], so a token
# mean over it is the exact expectation under π (no sampling noise).
THETA_Q = jnp.log(jnp.array([0.5, 0.25, 0.25]))
ACTIONS = jnp.array([0, 0, 1, 2])
MASK = jnp.ones((4, 1), bool)


def _batch_logps(theta):
    return jax.nn.log_softmax(theta)[ACTIONS][:, None]


def _ref_batch():
    return REF_LOGP[ACTIONS][:, None]


def test_kl_loss_gradients_on_exact_batch():
    grad_reverse = jax.grad(lambda t: _tabular_kls(t)[0])(THETA_Q)
    grad_forward = jax.grad(lambda t: _tabular_kls(t)[1])(THETA_Q)
    grads = {
        e: jax.grad(lambda t: kl.kl_loss(_batch_logps(t), _ref_batch(), MASK, estimator=e)[0])(THETA_Q)
        for e in kl.ESTIMATORS
    }
    np.testing.assert_allclose(grads["k1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(grads["k2"], grad_reverse, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["k3"], grad_forward, rtol=1e-5, atol=1e-6)


# Off-policy: samples from π_old = softmax(THETA_OLD) ≠ π = softmax(THETA).
THETA_OLD = jnp.array([-0.3, 0.8, 0.1])


def _off_policy_expected_grad(theta, estimator, weighted):
    """Σ_a π_old(a)·∇_θ[ρ(a)·k(a)] by enumeration: one kl_loss call per action (a 1-token batch)."""
    logp_old = jax.nn.log_softmax(THETA_OLD)
    total = jnp.zeros(3)
    for a in range(3):
        def loss(t, a=a):
            lp = jax.nn.log_softmax(t)[a].reshape(1, 1)
            old = logp_old[a].reshape(1, 1) if weighted else None
            return kl.kl_loss(lp, REF_LOGP[a].reshape(1, 1), jnp.ones((1, 1), bool), estimator=estimator,
                              old_logps_BT=old)[0]
        total = total + jnp.exp(logp_old[a]) * jax.grad(loss)(theta)
    return total


def test_off_policy_kl_loss_has_the_on_policy_expected_gradient():
    grad_reverse = jax.grad(lambda t: _tabular_kls(t)[0])(THETA)  # ∇ KL(π‖π_ref), exact
    grad_forward = jax.grad(lambda t: _tabular_kls(t)[1])(THETA)  # ∇ KL(π_ref‖π), exact
    want = {"k1": jnp.zeros(3), "k2": grad_reverse, "k3": grad_forward}
    for e in kl.ESTIMATORS:
        # ρ-weighted on π_old's samples = on-policy: Σ π_old·(π/π_old)·∇k = Σ π ∇k
        got = _off_policy_expected_grad(THETA, e, weighted=True)
        np.testing.assert_allclose(got, want[e], rtol=1e-5, atol=1e-6, err_msg=e)
        # the same thing the on-policy enumeration gives
        np.testing.assert_allclose(got, jax.grad(functools.partial(_expected_estimator, estimator=e))(THETA),
                                   rtol=1e-5, atol=1e-6, err_msg=e)
        # unweighted, the gradient is off (k1: Σ π_old ∇log π = π_old − π ≠ 0)
        unweighted = _off_policy_expected_grad(THETA, e, weighted=False)
        assert np.max(np.abs(unweighted - want[e])) > 1e-2, e
    p, p_old = jax.nn.softmax(THETA), jax.nn.softmax(THETA_OLD)
    np.testing.assert_allclose(_off_policy_expected_grad(THETA, "k1", weighted=False), p_old - p,
                               rtol=1e-5, atol=1e-6)


def test_off_policy_kl_loss_on_exact_batch_and_importance_weight_metric():
    """π_old = [1/2, 1/4, 1/4] (THETA_Q): the token mean over actions [0, 0, 1, 2] is the exact
    expectation under π_old, and with the weights the k2 gradient is ∇KL(π‖π_ref) at π = THETA."""
    old = _batch_logps(THETA_Q)
    loss_fn = lambda t: kl.kl_loss(_batch_logps(t), _ref_batch(), MASK, estimator="k2", old_logps_BT=old)
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(THETA)
    np.testing.assert_allclose(g, jax.grad(lambda t: _tabular_kls(t)[0])(THETA), rtol=1e-5, atol=1e-6)
    # mean ρ over the 4 tokens = (2·π(0)/0.5 + π(1)/0.25 + π(2)/0.25) / 4 = Σ π = 1 (= E_{π_old}[ρ])
    np.testing.assert_allclose(m["kl_importance_weight_mean"], 1.0, rtol=1e-5)
    # π = π_old: every ρ is 1 and the loss equals the on-policy one
    (l_on, _), (l_off, m_off) = (kl.kl_loss(old, _ref_batch(), MASK, estimator="k3"),
                                 kl.kl_loss(old, _ref_batch(), MASK, estimator="k3", old_logps_BT=old))
    np.testing.assert_allclose(l_off, l_on, rtol=1e-6)
    np.testing.assert_allclose(m_off["kl_importance_weight_mean"], 1.0, rtol=1e-6)
    assert "kl_importance_weight_mean" not in kl.kl_loss(old, _ref_batch(), MASK, estimator="k3")[1]


def test_off_policy_weights_hand_values_clamp_and_padding():
    # token 0: log π = log .5, log π_old = log .25 → ρ = 2; k1 = log π − log π_ref = log .5 − log .5 = 0
    # token 1: log π = 0, log π_old = −30 → log-ratio clamped to 20, ρ = e^20; k1 = 0 − log .5 = log 2
    # token 2: masked, NaN everywhere
    logp = jnp.array([[math.log(0.5), 0.0, np.nan]])
    old = jnp.array([[math.log(0.25), -30.0, np.nan]])
    ref = jnp.array([[math.log(0.5), math.log(0.5), np.nan]])
    mask = jnp.array([[True, True, False]])
    loss, m = kl.kl_loss(logp, ref, mask, estimator="k1", old_logps_BT=old, loss_agg_mode="seq-mean-token-sum")
    # sum over the row: 2·0 + e^20·log 2
    np.testing.assert_allclose(loss, math.exp(20.0) * math.log(2.0), rtol=1e-5)
    np.testing.assert_allclose(m["kl_importance_weight_mean"], (2.0 + math.exp(20.0)) / 2, rtol=1e-5)
    g = jax.grad(lambda l: kl.kl_loss(l, ref, mask, estimator="k1", old_logps_BT=old)[0])(logp)
    # ρ is constant: d/dlogπ of token-mean ρ·k1 = ρ/2 at each valid token, 0 at the masked one
    np.testing.assert_allclose(g, [[1.0, math.exp(20.0) / 2, 0.0]], rtol=1e-5)
    with _raises("old_logps_BT has shape (1, 2), expected (1, 3)"):
        kl.kl_loss(logp, ref, mask, estimator="k1", old_logps_BT=old[:, :2])


def test_one_step_on_kl_in_loss_lowers_kl():
    before, _ = _tabular_kls(THETA_Q)
    g = jax.grad(lambda t: kl.kl_loss(_batch_logps(t), _ref_batch(), MASK, estimator="k2")[0])(THETA_Q)
    after, _ = _tabular_kls(THETA_Q - 0.1 * g)
    assert after < before - 1e-4, (before, after)


def test_one_step_on_kl_in_reward_lowers_kl():
    before, _ = _tabular_kls(THETA_Q)
    old = _batch_logps(THETA_Q)
    rewards, m = kl.apply_kl_penalty(jnp.zeros((4, 1)), old, _ref_batch(), MASK, beta=1.0)
    # the penalty is −β·k1 at every token and carries no gradient
    np.testing.assert_allclose(rewards, -(old - _ref_batch()), rtol=1e-6)
    g = jax.grad(lambda t: pg.ppo_policy_loss(_batch_logps(t), old, rewards, MASK)[0])(THETA_Q)
    # REINFORCE with reward −k1 is exactly −∇KL(π‖π_ref) in expectation → descent direction ∇KL
    grad_reverse = jax.grad(lambda t: _tabular_kls(t)[0])(THETA_Q)
    np.testing.assert_allclose(g, grad_reverse, rtol=1e-5, atol=1e-6)
    after, _ = _tabular_kls(THETA_Q - 0.1 * g)
    assert after < before - 1e-4, (before, after)


def test_metrics_report_all_estimators_and_ignore_padding():
    logp = jnp.array([[math.log(0.5), np.nan], [math.log(0.25), 1e9]])
    ref = jnp.array([[math.log(0.25), np.inf], [math.log(0.5), -1e9]])
    mask = jnp.array([[True, False], [True, False]])
    loss, m = kl.kl_loss(logp, ref, mask, estimator="k3")
    x = math.log(2.0)
    # tokens: x and −x. k1 mean 0; k2 mean ½x²; k3 mean ((e^{−x} − 1 + x) + (e^{x} − 1 − x))/2 = (0.5 + 2)/2 − 1 = 0.25
    np.testing.assert_allclose(m["kl_k1"], 0.0, atol=1e-6)
    np.testing.assert_allclose(m["kl_k2"], 0.5 * x * x, rtol=1e-5)
    np.testing.assert_allclose(m["kl_k3"], 0.25, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.25, rtol=1e-5)
    assert {"kl_k1_seq", "kl_k2_seq", "kl_k3_seq"} <= set(m)
    g = jax.grad(lambda l: kl.kl_loss(l, ref, mask, estimator="k3")[0])(logp)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[:, 1], 0.0)
    _, mr = kl.apply_kl_penalty(jnp.zeros((2, 2)), logp, ref, mask, beta=0.1)
    for key in ("kl_k1", "kl_k2", "kl_k3", "kl_penalty_mean"):
        assert np.isfinite(mr[key])


def test_all_masked_kl_is_zero():
    nan = jnp.full((2, 2), np.nan)
    mask = jnp.zeros((2, 2), bool)
    (loss, m), g = jax.value_and_grad(lambda l: kl.kl_loss(l, nan, mask, estimator="k2"), has_aux=True)(nan)
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(v == 0.0 for v in m.values())


def test_adaptive_kl_controller():
    # KL 12 vs target 6: error clip(1, ±0.2) = 0.2; β·(1 + 0.2·256/10000) = 0.1·1.00512
    np.testing.assert_allclose(kl.adaptive_kl_coef(0.1, 12.0, 256, target=6.0, horizon=10000), 0.100512, rtol=1e-6)
    # KL 5.7: error −0.05 → 0.1·(1 − 0.05·0.0256) = 0.099872
    np.testing.assert_allclose(kl.adaptive_kl_coef(0.1, 5.7, 256, target=6.0, horizon=10000), 0.099872, rtol=1e-6)
    with pytest.raises(ValueError):
        kl.adaptive_kl_coef(0.1, 1.0, 1, target=0.0, horizon=1.0)


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


def test_kl_functions_check_shapes_and_parameters():
    lp, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with _raises("ref_logps has shape (2, 1), expected (2, 3) to match logps with shape (2, 3)"):
        kl.kl_k3(lp, jnp.zeros((2, 1)))
    with _raises("mask_BT has shape (3,), expected (2, 3) to match logps_BT with shape (2, 3)"):
        kl.kl_per_token(lp, lp, jnp.ones(3, bool), "k1")
    with _raises("ref_logps_BT has shape (2, 4), expected (2, 3)"):
        kl.kl_loss(lp, jnp.zeros((2, 4)), mask, estimator="k2")
    with _raises("ref_logps_BT has shape (1, 3), expected (2, 3)"):
        kl.kl_metrics(lp, jnp.zeros((1, 3)), mask)
    with _raises("logps_BT has shape (2, 4), expected (2, 3) to match token_rewards_BT with shape (2, 3)"):
        kl.apply_kl_penalty(lp, jnp.zeros((2, 4)), lp, mask, beta=0.1)
    with _raises("beta must be in [0, inf), got -0.1"):
        kl.apply_kl_penalty(lp, lp, lp, mask, beta=-0.1)
    with _raises("max_error must be in (0, inf), got 0.0"):
        kl.adaptive_kl_coef(0.1, 1.0, 10, target=1.0, horizon=100.0, max_error=0.0)
    # k1 of log-ratio 1 on the valid tokens; the penalized reward is r − β·k1.
    rewards, _ = kl.apply_kl_penalty(jnp.ones((2, 3)), lp + 1.0, lp, mask, beta=0.5)
    np.testing.assert_allclose(rewards, 0.5)
