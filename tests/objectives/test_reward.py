"""Reward-model losses and rewards against hand-computed values."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import registry, reward


def log1pexp(x):
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_values():
    rc = jnp.array([1.0, 2.0, 0.0])
    rr = jnp.array([0.0, 2.0, 1.0])
    loss, m = reward.bradley_terry_loss(rc, rr)
    # −log σ(d) = log(1 + e^{−d}); d = [1, 0, −1]
    # (log(1+e^-1) + log 2 + log(1+e)) / 3 = (0.31326 + 0.69315 + 1.31326) / 3
    expected = (log1pexp(-1) + math.log(2) + log1pexp(1)) / 3
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert m["loss"] == loss
    # accuracy, strict as TRL / RewardBench: win 1, tie 0, loss 0 → 1 / 3 (0.5 when a tie counted half)
    np.testing.assert_allclose(m["accuracy"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(m["margin_mean"], 0.0, atol=1e-7)
    np.testing.assert_allclose(m["chosen_reward_mean"], 1.0)
    # population std of [1, 2, 0] = sqrt(2/3)
    np.testing.assert_allclose(m["chosen_reward_std"], math.sqrt(2 / 3), rtol=1e-6)
    np.testing.assert_allclose(m["rejected_reward_mean"], 1.0)
    np.testing.assert_allclose(m["rejected_reward_std"], math.sqrt(2 / 3), rtol=1e-6)


def test_accuracy_counts_a_tie_as_wrong():
    """TRL / RewardBench: correct iff r_c > r_r strictly. A constant reward model
    ties every pair, so it scores 0 (it scored 0.5 when a tie counted half)."""
    _, m = reward.bradley_terry_loss(jnp.full((4,), 0.3), jnp.full((4,), 0.3))
    assert float(m["accuracy"]) == 0.0
    # rc − rr = [2, 0, 0, −1]: 1 win, 2 ties, 1 loss → 1 / 4 = 0.25 (was (1 + 0.5 + 0.5) / 4 = 0.5)
    _, m = reward.bradley_terry_loss(jnp.array([2.0, 1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0, 1.0]))
    assert float(m["accuracy"]) == 0.25


def test_bradley_terry_margin():
    # d − m = (1 − 0.5) = 0.5 → log(1 + e^{−0.5}) = 0.474077
    loss, m = reward.bradley_terry_loss(jnp.array([1.0]), jnp.array([0.0]), margin_B=jnp.array([0.5]))
    np.testing.assert_allclose(loss, log1pexp(-0.5), rtol=1e-6)
    # accuracy ignores the margin
    assert m["accuracy"] == 1.0


def test_bradley_terry_multi_objective_and_weights():
    rc = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    rr = jnp.array([[0.0, 1.0], [0.0, 0.0]])
    loss, m = reward.bradley_terry_loss(rc, rr)
    # entries d = [[1, −1], [0, 0]] → mean of log(1+e^-1), log(1+e), log 2, log 2
    expected = (log1pexp(-1) + log1pexp(1) + 2 * math.log(2)) / 4
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    # strict (a tie counts 0): objective 0: win, tie → (1 + 0) / 2 = 0.5; objective 1: loss, tie → 0
    np.testing.assert_allclose(m["accuracy_k0"], 0.5)
    np.testing.assert_allclose(m["accuracy_k1"], 0.0)
    # pooled over B and K: 1 win of 4 entries → 0.25
    np.testing.assert_allclose(m["accuracy"], 0.25)
    # weighted: 2·mean_b(obj0) + 1·mean_b(obj1)
    wloss, _ = reward.bradley_terry_loss(rc, rr, objective_weights_K=(2.0, 1.0))
    expected_w = 2 * (log1pexp(-1) + math.log(2)) / 2 + (log1pexp(1) + math.log(2)) / 2
    np.testing.assert_allclose(wloss, expected_w, rtol=1e-6)
    # a [B] margin broadcasts over objectives: d − 1 = [[0, −2], [−1, −1]]
    mloss, _ = reward.bradley_terry_loss(rc, rr, margin_B=jnp.array([1.0, 1.0]))
    expected_m = (math.log(2) + log1pexp(2) + 2 * log1pexp(1)) / 4
    np.testing.assert_allclose(mloss, expected_m, rtol=1e-6)


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e9])
def test_bradley_terry_padding_is_inert(fill):
    mask = jnp.array([True, True, False])

    def f(rc, rr):
        return reward.bradley_terry_loss(rc, rr, margin_B=jnp.array([0.1, 0.2, fill]), example_mask_B=mask)

    rc = jnp.array([1.0, -0.5, fill])
    rr = jnp.array([0.5, 0.5, fill])
    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(rc, rr)
    ref, ref_grads = jax.value_and_grad(
        lambda a, b: reward.bradley_terry_loss(a, b, margin_B=jnp.array([0.1, 0.2]))[0], argnums=(0, 1)
    )(rc[:2], rr[:2])
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    for g, rg in zip(grads, ref_grads):
        np.testing.assert_allclose(g[:2], rg, rtol=1e-6)
        assert g[2] == 0.0
    assert all(np.isfinite(v) for v in m.values())


def test_bradley_terry_all_masked_is_zero_with_finite_grads():
    mask = jnp.zeros(2, bool)
    rc = jnp.array([np.nan, 1.0])
    g = jax.grad(lambda a: reward.bradley_terry_loss(a, jnp.zeros(2), example_mask_B=mask)[0])(rc)
    loss, m = reward.bradley_terry_loss(rc, jnp.zeros(2), example_mask_B=mask)
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(v) for v in m.values())


def test_bradley_terry_gradient_hand_value():
    # d/dr_c [−log σ(r_c − r_r)] = −(1 − σ(d)) = −σ(−d); batch of 1, d = 0 → −0.5
    g = jax.grad(lambda a: reward.bradley_terry_loss(a, jnp.zeros(1))[0])(jnp.zeros(1))
    np.testing.assert_allclose(g, [-0.5])


def test_bradley_terry_jit():
    f = jax.jit(reward.bradley_terry_loss)
    loss, _ = f(jnp.array([0.0]), jnp.array([0.0]), None, jnp.array([True]))
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)


def test_scaled_bradley_terry():
    # s = [2, 1], d = [0, 1] → (2·log 2 + log(1+e^-1)) / 2
    loss, m = reward.scaled_bradley_terry_loss(jnp.array([0.0, 1.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, 1.0]))
    np.testing.assert_allclose(loss, (2 * math.log(2) + log1pexp(-1)) / 2, rtol=1e-6)
    # d = [0, 1]: a tie (0) and a win (1) → 1 / 2 (0.75 when a tie counted half)
    np.testing.assert_allclose(m["accuracy"], 0.5)
    # A negative strength would reward the wrong order without bound: m = −1, d = 10
    # gives +log σ(10) → −log σ(−∞)... i.e. the loss falls as the pair is ranked worse.
    with pytest.raises(ValueError, match=r"margin_B must be in \[0, inf\], got -1 at index \(1,\)"):
        reward.scaled_bradley_terry_loss(jnp.array([0.0, 1.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, -1.0]))
    # [B, K] strengths: a masked pair may hold any placeholder.
    loss2, _ = reward.scaled_bradley_terry_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.array([[1.0, 1.0], [-1.0, 0.0]]),
                                                jnp.array([True, False]))
    np.testing.assert_allclose(loss2, math.log(2), rtol=1e-6)


def test_scaled_bradley_terry_checks_shapes_before_values_and_refuses_inf():
    # [B, K] rewards with a [B] margin and a [B, K] mask is a valid call: log 2 at zero rewards.
    rc = jnp.zeros((3, 2))
    loss, _ = reward.scaled_bradley_terry_loss(rc, rc, jnp.ones(3), jnp.ones((3, 2), bool))
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
    with pytest.raises(ValueError, match=r"margin_B must be in \[0, inf\], got -1 at index \(1, 0\)"):
        reward.scaled_bradley_terry_loss(rc, rc, jnp.array([1.0, -1.0, 1.0]), jnp.ones((3, 2), bool))
    # Wrong shapes are named by the shape checks, which run first.
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"example_mask_B has shape \(4,\)"):
        reward.scaled_bradley_terry_loss(z, z, jnp.ones(3), jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"margin_B has shape \(4,\)"):
        reward.scaled_bradley_terry_loss(z, z, jnp.ones(4), jnp.ones(3, bool))
    # An infinite strength gives an infinite loss (and NaN gradients): refused like NaN.
    with pytest.raises(ValueError, match=r"margin_B must be in \[0, inf\], got inf at index \(1,\)"):
        reward.scaled_bradley_terry_loss(z + 1.0, z, jnp.array([1.0, np.inf, 1.0]))
    with pytest.raises(ValueError, match=r"margin_B must be in \[0, inf\], got -2$"):
        reward.scaled_bradley_terry_loss(z, z, -2.0)


def test_regression_loss():
    # errors [1, −2] (third masked) → MSE (1 + 4) / 2 = 2.5, MAE 1.5
    r = jnp.array([1.0, 0.0, np.nan])
    y = jnp.array([0.0, 2.0, 7.0])
    loss, m = reward.regression_loss(r, y, jnp.array([True, True, False]))
    np.testing.assert_allclose(loss, 2.5)
    np.testing.assert_allclose(m["mae"], 1.5)
    np.testing.assert_allclose(m["target_mean"], 1.0)
    g = jax.grad(lambda a: reward.regression_loss(a, y, jnp.array([True, True, False]))[0])(r)
    # d/dr mean (r − y)² = 2 (r − y) / 2 = [1, −2, 0]
    np.testing.assert_allclose(g, [1.0, -2.0, 0.0])


def test_weighted_objective_sum():
    # [1·0.5 + 2·2, 3·0.5 + 4·2] = [4.5, 9.5]
    out = reward.weighted_objective_sum(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([0.5, 2.0]))
    np.testing.assert_allclose(out, [4.5, 9.5])
    with pytest.raises(ValueError):
        reward.weighted_objective_sum(jnp.ones((2, 2)), jnp.ones(3))


def test_ensemble_reward_modes():
    r = jnp.array([[1.0, 0.0], [3.0, 0.0]])  # E = 2 members, B = 2
    np.testing.assert_allclose(reward.ensemble_reward(r, "mean"), [2.0, 0.0])
    np.testing.assert_allclose(reward.ensemble_reward(r, "min"), [1.0, 0.0])
    # std over members (ddof 0): [1, 0] → mean − 0.5·std = [1.5, 0]
    np.testing.assert_allclose(reward.ensemble_reward(r, "mean_minus_std", std_coef=0.5), [1.5, 0.0])
    # equal members: std 0 has a finite gradient
    g = jax.grad(lambda x: reward.ensemble_reward(x, "mean_minus_std").sum())(jnp.ones((2, 2)))
    assert np.isfinite(g).all()
    with pytest.raises(ValueError):
        reward.ensemble_reward(r, "median")


def test_implicit_rewards_sequence_token_prefix():
    logps = jnp.array([[-1.0, -2.0, np.nan], [-0.5, np.inf, -0.5]])
    ref = jnp.array([[-1.5, -1.0, 3.0], [-1.0, 2.0, -1.0]])
    mask = jnp.array([[True, True, False], [True, False, True]])
    beta = 0.5
    tok = reward.implicit_token_rewards(logps, ref, mask, beta=beta)
    # β·(logp − ref): row 0: 0.5·0.5 = 0.25, 0.5·(−1) = −0.5; row 1: 0.25, masked, 0.25
    np.testing.assert_allclose(tok, [[0.25, -0.5, 0.0], [0.25, 0.0, 0.25]])
    np.testing.assert_allclose(reward.implicit_reward(logps, ref, mask, beta=beta), [-0.25, 0.5])
    q = reward.implicit_prefix_rewards(logps, ref, mask, beta=beta)
    # running sums: [0.25, −0.25, ·], [0.25, ·, 0.5]
    np.testing.assert_allclose(q, [[0.25, -0.25, 0.0], [0.25, 0.0, 0.5]])
    g = jax.grad(lambda x: reward.implicit_prefix_rewards(x, ref, mask, beta=beta).sum())(logps)
    # q sums: token 0 appears in 2 prefixes of row 0 → 2β; masked slots 0
    np.testing.assert_allclose(g, [[1.0, 0.5, 0.0], [1.0, 0.0, 0.5]])


def test_registry_lookup_and_error_lists_names():
    assert registry.get("pairwise_reward_loss", "bradley_terry") is reward.bradley_terry_loss
    with pytest.raises(KeyError, match="bradley_terry"):
        registry.get("pairwise_reward_loss", "bradly_terry")
    with pytest.raises(KeyError, match="known kinds"):
        registry.get("no_such_kind", "x")


def test_register_decorator_and_duplicates():
    @registry.register("test_only_kind", "double")
    def double(x):
        return 2 * x

    assert registry.get("test_only_kind", "double")(3) == 6
    assert registry.names("test_only_kind") == ("double",)
    # re-registering the same function is harmless; a different one is an error
    registry.register("test_only_kind", "double")(double)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("test_only_kind", "double")(lambda x: x)


def test_accepted_kwargs_filters_by_signature():
    def f(a, *, beta, gamma=0.0):
        return a

    assert registry.accepted_kwargs(f, {"beta": 1, "gamma": 2, "delta": 3, "a": 0}) == {"beta": 1, "gamma": 2, "a": 0}
    assert registry.accepted_kwargs(lambda **kw: kw, {"x": 1}) == {"x": 1}


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


def test_reward_losses_check_mask_and_margin_shapes():
    rc, rr = jnp.array([1.0, 0.0, 2.0]), jnp.array([0.0, 1.0, 1.0])
    with _raises("example_mask_B has shape (3, 1), expected (3,) to match rewards_chosen_B with shape (3,)"):
        reward.bradley_terry_loss(rc, rr, example_mask_B=jnp.ones((3, 1), bool))
    with _raises("margin_B has shape (2,), expected (3,) or () to match rewards_chosen_B with shape (3,)"):
        reward.bradley_terry_loss(rc, rr, jnp.zeros(2))
    with _raises("example_mask_B has shape (1,), expected (3,)"):
        reward.scaled_bradley_terry_loss(rc, rr, 1.0, example_mask_B=jnp.ones(1, bool))
    with _raises("targets_B has shape (3, 1), expected (3,) to match rewards_B with shape (3,)"):
        reward.regression_loss(rc, rr[:, None])
    with _raises("ref_logps_BT has shape (2, 1), expected (2, 3) to match logps_BT with shape (2, 3)"):
        reward.implicit_reward(jnp.zeros((2, 3)), jnp.zeros((2, 1)), jnp.ones((2, 3), bool), beta=0.1)
    with _raises("std_coef must be in [0, inf), got -1.0"):
        reward.ensemble_reward(jnp.zeros((2, 3)), "mean_minus_std", std_coef=-1.0)
    # [B, K] rewards take a [B] mask and a [B] margin (one per pair), as the trainer passes.
    rc2, rr2 = jnp.stack([rc, rc], 1), jnp.stack([rr, rr], 1)
    loss, _ = reward.bradley_terry_loss(rc2, rr2, jnp.zeros(3), jnp.array([True, True, False]))
    # valid pairs: r_c − r_r = 1, −1 → (−log σ(1) − log σ(−1)) / 2 = (0.313262 + 1.313262) / 2
    np.testing.assert_allclose(loss, (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2,
                               rtol=1e-6)
