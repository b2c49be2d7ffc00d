"""Policy-gradient losses and aggregation modes."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import kl, policy_gradient as pg, registry, transforms

MODES = pg.AGGREGATION_MODES

# Per-token loss with lengths 3, 1 and an empty row; masked slots hold NaN.
LOSS = jnp.array([[1.0, 2.0, 3.0], [4.0, np.nan, np.inf], [np.nan, 1e9, 5.0]])
MASK = jnp.array([[True, True, True], [True, False, False], [False, False, False]])


@pytest.mark.parametrize(
    "mode,value,weights",
    [
        # N = 4 tokens: (1 + 2 + 3 + 4) / 4 = 2.5; w = 1/4
        ("token-mean", 2.5, [[0.25] * 3, [0.25, 0, 0]]),
        # S = 2 non-empty rows: (6/3 + 4/1) / 2 = 3; w = 1/(S·n_b) = 1/6, 1/2
        ("seq-mean-token-mean", 3.0, [[1 / 6] * 3, [0.5, 0, 0]]),
        # (6 + 4) / 2 = 5; w = 1/S = 1/2
        ("seq-mean-token-sum", 5.0, [[0.5] * 3, [0.5, 0, 0]]),
        # (6 + 4) / (S·L) with L = T = 3 → 10/6; w = 1/6
        ("seq-mean-token-sum-norm", 10 / 6, [[1 / 6] * 3, [1 / 6, 0, 0]]),
    ],
)
def test_aggregation_values_and_gradient_weights(mode, value, weights):
    loss = pg.aggregate_loss(LOSS, MASK, mode)
    np.testing.assert_allclose(loss, value, rtol=1e-6)
    g = jax.grad(lambda l: pg.aggregate_loss(l, MASK, mode))(LOSS)
    expected = np.array(weights + [[0.0, 0.0, 0.0]])
    np.testing.assert_allclose(g, expected, rtol=1e-6)
    np.testing.assert_allclose(pg.aggregation_weights(MASK, mode), expected, rtol=1e-6)


def test_seq_mean_token_sum_norm_fixed_length():
    # L = 5: (6 + 4) / (2·5) = 1
    np.testing.assert_allclose(pg.aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=5), 1.0, rtol=1e-6)


def test_modes_differ_when_lengths_differ_and_agree_when_equal():
    key = jax.random.PRNGKey(0)
    loss = jax.random.normal(key, (3, 4))
    uneven = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    values = [float(pg.aggregate_loss(loss, uneven, m)) for m in MODES]
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(values[i] - values[j]) > 1e-3, (MODES[i], MODES[j], values)
    # equal lengths n and L = n: token-mean = seq-mean-token-mean = seq-mean-token-sum-norm
    even = jnp.ones((3, 4), bool)
    tm, smtm, _, norm = [pg.aggregate_loss(loss, even, m) for m in MODES]
    np.testing.assert_allclose(tm, smtm, rtol=1e-6)
    np.testing.assert_allclose(tm, norm, rtol=1e-6)


def test_all_masked_aggregation_is_zero_with_finite_grads():
    mask = jnp.zeros((2, 3), bool)
    for mode in MODES:
        loss, g = jax.value_and_grad(lambda l: pg.aggregate_loss(l, mask, mode))(jnp.full((2, 3), np.nan))
        assert loss == 0.0
        np.testing.assert_array_equal(g, 0.0)


def test_unknown_mode_lists_known_ones():
    with pytest.raises(KeyError, match="token-mean"):
        pg.aggregate_loss(LOSS, MASK, "tokenmean")


# ----------------------------------------------------------------------------
# Micro-batch accumulation equals one shot, in every mode.
# ----------------------------------------------------------------------------


def test_microbatch_accumulation_matches_one_shot():
    key1, key2, key3 = jax.random.split(jax.random.PRNGKey(1), 3)
    logps = -jax.random.uniform(key1, (4, 5))
    old = logps + 0.1 * jax.random.normal(key2, (4, 5))
    adv = jax.random.normal(key3, (4,))
    lengths = jnp.array([5, 2, 0, 3])
    mask = jnp.arange(5)[None, :] < lengths[:, None]

    @jax.jit
    def one_shot_and_accumulated(logps, old, adv, mask):
        # Normalizers are counted once over the whole batch and given to every micro-batch.
        norms = pg.aggregation_normalizers(mask)
        out = {}
        for mode in MODES:
            def loss_fn(lp, o, a, m):
                return pg.ppo_policy_loss(lp, o, a, m, clip_eps=0.1, loss_agg_mode=mode, max_len=8, **norms)[0]

            vg = jax.value_and_grad(loss_fn)
            out[mode, 1] = vg(logps, old, adv, mask)
            for k in (2, 4):
                size = 4 // k
                parts = [vg(logps[i * size:(i + 1) * size], old[i * size:(i + 1) * size], adv[i * size:(i + 1) * size],
                            mask[i * size:(i + 1) * size]) for i in range(k)]
                out[mode, k] = (sum(p[0] for p in parts), jnp.concatenate([p[1] for p in parts]))
        return out

    out = one_shot_and_accumulated(logps, old, adv, mask)
    for mode in MODES:
        full_loss, full_grad = out[mode, 1]
        assert np.abs(full_grad).max() > 0
        for k in (2, 4):
            acc_loss, acc_grad = out[mode, k]
            np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5, atol=1e-7, err_msg=f"{mode} k={k}")
            np.testing.assert_allclose(acc_grad, full_grad, rtol=1e-5, atol=1e-7, err_msg=f"{mode} k={k}")
    # Different modes give different one-shot losses here (lengths differ).
    assert len({round(float(out[m, 1][0]), 5) for m in MODES}) == 4


# ----------------------------------------------------------------------------
# PPO
# ----------------------------------------------------------------------------


def test_ppo_hand_values_and_gradient():
    # ratios [1.5, 0.5, 1.1], advantages [1, 1, −1], ε = 0.2
    old = jnp.zeros((1, 3))
    logps = jnp.log(jnp.array([[1.5, 0.5, 1.1]]))
    adv = jnp.array([[1.0, 1.0, -1.0]])
    mask = jnp.ones((1, 3), bool)
    loss, m = pg.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    # token 0: max(−1.5, −1.2) = −1.2 (clipped); token 1: max(−0.5, −0.8) = −0.5;
    # token 2: max(1.1, 1.1) = 1.1 → mean (−1.2 − 0.5 + 1.1)/3 = −0.2
    np.testing.assert_allclose(loss, -0.2, rtol=1e-5)
    np.testing.assert_allclose(m["clipfrac"], 1 / 3, rtol=1e-6)
    # ppo_kl = mean(old − new) = −(log 1.5 + log 0.5 + log 1.1)/3
    np.testing.assert_allclose(m["ppo_kl"], -math.log(1.5 * 0.5 * 1.1) / 3, rtol=1e-5)
    # d/dlogp of −A·ρ is −A·ρ; the clipped token has 0; weights 1/3
    g = jax.grad(lambda lp: pg.ppo_policy_loss(lp, old, adv, mask, clip_eps=0.2)[0])(logps)
    np.testing.assert_allclose(g, [[0.0, -0.5 / 3, 1.1 / 3]], rtol=1e-5)
    # clip-higher ε_high = 0.6: 1.5 < 1.6, so token 0 is no longer clipped → −1.5
    loss_h, m_h = pg.ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    np.testing.assert_allclose(loss_h, (-1.5 - 0.5 + 1.1) / 3, rtol=1e-5)
    assert m_h["clipfrac"] == 0.0


def test_ppo_dual_clip():
    # ratio 4, A = −1: standard clip gives max(4, 1.2) = 4; dual clip c = 3 caps it at 3
    logps = jnp.log(jnp.array([[4.0, 0.5]]))
    adv = jnp.array([[-1.0, -1.0]])
    mask = jnp.ones((1, 2), bool)
    loss, m = pg.ppo_policy_loss(logps, jnp.zeros((1, 2)), adv, mask, clip_eps=0.2, dual_clip=3.0)
    # token 1: ratio 0.5, A = −1: max(0.5, 0.8) = 0.8 (< 3, dual inactive)
    np.testing.assert_allclose(loss, (3.0 + 0.8) / 2, rtol=1e-5)
    np.testing.assert_allclose(m["dual_clipfrac"], 0.5)
    g = jax.grad(lambda lp: pg.ppo_policy_loss(lp, jnp.zeros((1, 2)), adv, mask, clip_eps=0.2, dual_clip=3.0)[0])(logps)
    np.testing.assert_allclose(g, [[0.0, 0.0]], atol=1e-7)
    with pytest.raises(ValueError):
        pg.ppo_policy_loss(logps, jnp.zeros((1, 2)), adv, mask, dual_clip=1.0)


def test_ppo_sequence_advantages_broadcast():
    logps = jnp.log(jnp.array([[1.1, 0.9], [1.0, 1.0]]))
    mask = jnp.array([[True, True], [True, False]])
    a, _ = pg.ppo_policy_loss(logps, jnp.zeros((2, 2)), jnp.array([2.0, -1.0]), mask)
    b, _ = pg.ppo_policy_loss(logps, jnp.zeros((2, 2)), jnp.array([[2.0, 2.0], [-1.0, -1.0]]), mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def _fill_masked(x, mask, value):
    return jnp.where(mask, x, value)


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e9])
@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_policy_losses_padding_is_inert(name, fill):
    fn = registry.get("policy_loss", name)
    key1, key2 = jax.random.split(jax.random.PRNGKey(2))
    logps = -jax.random.uniform(key1, (3, 4))
    old = logps + 0.05 * jax.random.normal(key2, (3, 4))
    adv = jnp.array([[1.0, 1.0, 1.0, 1.0], [-0.5, -0.5, -0.5, -0.5], [2.0, 2.0, 2.0, 2.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
    kw = dict(clip_eps=0.02, clip_eps_high=0.03)

    def f(lp, o, a):
        return fn(lp, o, a, mask, **kw)

    clean = jax.value_and_grad(f, has_aux=True)(logps, old, adv)
    dirty = jax.value_and_grad(f, has_aux=True)(_fill_masked(logps, mask, fill), _fill_masked(old, mask, -fill), _fill_masked(adv, mask, fill))
    np.testing.assert_allclose(dirty[0][0], clean[0][0], rtol=1e-6)
    np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-6, atol=1e-8)
    assert np.all(np.asarray(dirty[1])[~np.asarray(mask)] == 0)
    for key in clean[0][1]:
        np.testing.assert_allclose(dirty[0][1][key], clean[0][1][key], rtol=1e-6)


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_policy_losses_all_masked(name):
    fn = registry.get("policy_loss", name)
    nan = jnp.full((2, 3), np.nan)
    (loss, m), g = jax.value_and_grad(lambda lp: fn(lp, nan, nan, jnp.zeros((2, 3), bool)), has_aux=True)(nan)
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(v) for v in m.values())


def test_gspo_matches_sequence_level_objective():
    # Two rows of lengths 3 and 2; sequence ratios s_b = exp(mean_t log-ratio).
    logps = jnp.array([[-1.0, -0.5, -2.0], [-0.3, -0.7, 0.0]])
    old = jnp.array([[-1.1, -0.6, -2.2], [-0.1, -0.5, 0.0]])
    mask = jnp.array([[True, True, True], [True, True, False]])
    adv = jnp.array([1.0, 1.0])
    eps = 0.1
    loss, m = pg.gspo_policy_loss(logps, old, adv, mask, clip_eps=eps, clip_eps_high=eps)
    # row 0: mean log-ratio 0.4/3 → s = 1.142631 > 1.1 → clipped: −1.1
    # row 1: mean log-ratio −0.4/2 → s = 0.818731, A > 0 → max(−0.8187, −0.9) = −0.818731
    s0, s1 = math.exp(0.4 / 3), math.exp(-0.2)
    np.testing.assert_allclose(loss, (-1.1 - s1) / 2, rtol=1e-5)
    np.testing.assert_allclose(m["seq_ratio_mean"], (s0 + s1) / 2, rtol=1e-5)

    def sequence_level(lp):
        s = jnp.exp(jnp.sum(jnp.where(mask, lp - old, 0.0), -1) / jnp.sum(mask, -1))
        return jnp.mean(jnp.maximum(-adv * s, -adv * jnp.clip(s, 1 - eps, 1 + eps)))

    g_token = jax.grad(lambda lp: pg.gspo_policy_loss(lp, old, adv, mask, clip_eps=eps, clip_eps_high=eps)[0])(logps)
    g_seq = jax.grad(sequence_level)(logps)
    np.testing.assert_allclose(g_token, g_seq, rtol=1e-5, atol=1e-7)
    # row 1 gradient by hand: −A·s/(2·n_b) per token = −0.818731/4
    np.testing.assert_allclose(g_token[1, :2], [-s1 / 4, -s1 / 4], rtol=1e-5)


def test_value_loss_hand_values():
    v = jnp.array([[1.0, 2.0, np.nan]])
    old = jnp.array([[0.5, 2.0, 0.0]])
    ret = jnp.array([[2.0, 0.0, np.inf]])
    mask = jnp.array([[True, True, False]])
    loss, m = pg.value_loss(v, old, ret, mask, clip_eps=0.2)
    # token 0: (1−2)² = 1; V_clip = 0.5 + 0.2 = 0.7 → (0.7−2)² = 1.69 → ½·1.69 = 0.845
    # token 1: (2−0)² = 4 both ways → 2;  mean = 1.4225
    np.testing.assert_allclose(loss, (0.845 + 2.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["vf_clipfrac"], 0.5)
    g = jax.grad(lambda x: pg.value_loss(x, old, ret, mask, clip_eps=0.2)[0])(v)
    # token 0: the clipped branch wins and is flat in V → 0; token 1: (V − R)/2 = 1
    np.testing.assert_allclose(g, [[0.0, 1.0, 0.0]], atol=1e-7)
    loss_nc, _ = pg.value_loss(v, old, ret, mask)
    np.testing.assert_allclose(loss_nc, (0.5 + 2.0) / 2, rtol=1e-6)


def test_entropy_hand_values():
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0], [np.nan, 0.0, np.inf, 1.0]]])
    mask = jnp.array([[True, True, False]])
    ent = pg.entropy_from_logits(logits, mask)
    # uniform over 4: log 4; p = [1/2, 1/6, 1/6, 1/6]: −(½ log ½ + ½ log ⅙) = 1.242453
    h1 = -(0.5 * math.log(0.5) + 0.5 * math.log(1 / 6))
    np.testing.assert_allclose(ent, [[math.log(4), h1, 0.0]], rtol=1e-6)
    loss, m = pg.entropy_loss(ent, mask)
    np.testing.assert_allclose(loss, -(math.log(4) + h1) / 2, rtol=1e-6)
    np.testing.assert_allclose(m["entropy"], (math.log(4) + h1) / 2, rtol=1e-6)
    g = jax.grad(lambda z: pg.entropy_loss(pg.entropy_from_logits(z, mask), mask)[0])(logits)
    assert np.isfinite(g).all()
    np.testing.assert_array_equal(g[0, 2], 0.0)
    np.testing.assert_allclose(g[0, 0], 0.0, atol=1e-7)  # uniform is a maximum


# ----------------------------------------------------------------------------
# Bandit: PPO with KL in the reward converges to π_ref·exp(r/β)/Z.
# ----------------------------------------------------------------------------


def test_ppo_with_kl_reward_converges_to_tilted_reference():
    reward_A = jnp.array([1.0, 0.0, 0.5])
    ref_logp = jax.nn.log_softmax(jnp.array([0.5, 0.0, -0.5]))
    beta = 0.5
    mask = jnp.ones((3, 1), bool)  # one row per action, responses of one token

    def surrogate(theta, old_theta):
        logp = jax.nn.log_softmax(theta)[:, None]
        old_logp = jax.nn.log_softmax(old_theta)[:, None]
        token_r = transforms.place_on_last_token(reward_A, mask)
        penalized, _ = kl.apply_kl_penalty(token_r, old_logp, ref_logp[:, None], mask, beta=beta)
        pi = jnp.exp(old_logp[:, 0])
        baseline = jnp.sum(pi * penalized[:, 0])
        # token-mean over the 3 rows is (1/3)·Σ_a; scaling A by 3·π(a) makes it E_{a~π}.
        adv = 3.0 * pi * (penalized[:, 0] - baseline)
        return pg.ppo_policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)[0]

    @jax.jit
    def train(theta):
        def step(_, t):
            return t - 1.0 * jax.grad(surrogate)(t, t)
        return jax.lax.fori_loop(0, 300, step, theta)

    theta = train(jnp.zeros(3))
    target = jax.nn.softmax(ref_logp + reward_A / beta)
    np.testing.assert_allclose(jax.nn.softmax(theta), target, atol=1e-3)


# ----------------------------------------------------------------------------
# Per-token arrays and masks share one [B, T]; no silent broadcasting.
# ----------------------------------------------------------------------------


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


@pytest.mark.parametrize("name", ["ppo", "gspo"])
def test_policy_losses_check_shapes(name):
    fn = registry.get("policy_loss", name)
    lp, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with _raises("old_logps_BT has shape (2, 4), expected (2, 3) to match logps_BT with shape (2, 3)"):
        fn(lp, jnp.zeros((2, 4)), jnp.zeros(2), mask)
    with _raises("mask_BT has shape (2, 1), expected (2, 3) to match logps_BT with shape (2, 3)"):
        fn(lp, lp, jnp.zeros(2), jnp.ones((2, 1), bool))
    with _raises("logps_BT must be [B, T], got shape (2,)"):
        fn(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.ones(2, bool))
    # Advantages are [B, T] or [B]; [B, 1] or another B is refused.
    with _raises("advantages has shape (2, 1), expected (2, 3) or (2,) to match mask_BT with shape (2, 3)"):
        fn(lp, lp, jnp.zeros((2, 1)), mask)
    with _raises("advantages has shape (3,), expected (2, 3) or (2,)"):
        fn(lp, lp, jnp.zeros(3), mask)
    # Equal log-probs: ratio 1, loss = −mean(A) over tokens = −(1·3 + 2·3)/6 = −1.5.
    loss, _ = fn(lp, lp, jnp.array([1.0, 2.0]), mask, loss_agg_mode="token-mean")
    np.testing.assert_allclose(loss, -1.5, rtol=1e-6)


def test_aggregation_value_and_entropy_check_shapes():
    with _raises("mask_BT has shape (3, 2), expected (3, 3) to match loss_BT with shape (3, 3)"):
        pg.aggregate_loss(LOSS, MASK[:, :2])
    with _raises("mask_BT must be [B, T], got shape (3,)"):
        pg.aggregation_weights(MASK[:, 0], "token-mean")
    with _raises("max_len must be an integer >= 1, got 0"):
        pg.aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=0)
    with _raises("num_tokens must be a scalar (a count over the whole batch), got shape (3,)"):
        pg.aggregate_loss(LOSS, MASK, num_tokens=jnp.ones(3))
    v, mask = jnp.zeros((2, 3)), jnp.ones((2, 3), bool)
    with _raises("returns_BT has shape (2,), expected (2, 3) to match values_BT with shape (2, 3)"):
        pg.value_loss(v, v, jnp.zeros(2), mask)
    with _raises("value_loss with clip_eps needs old_values_BT"):
        pg.value_loss(v, None, v, mask, clip_eps=0.2)
    with _raises("clip_eps must be in (0, inf), got -0.2"):
        pg.value_loss(v, v, v, mask, clip_eps=-0.2)
    with _raises("mask_BT has shape (2, 4), expected (2, 3) to match logits_BTV's [B, T] with shape (2, 3)"):
        pg.entropy_from_logits(jnp.zeros((2, 3, 5)), jnp.ones((2, 4), bool))
    with _raises("mask_BT has shape (2, 1), expected (2, 3) to match entropy_BT with shape (2, 3)"):
        pg.entropy_loss(v, jnp.ones((2, 1), bool))
    with _raises("dual_clip must be in (1, inf), got 1.0"):
        pg.ppo_policy_loss(v, v, jnp.zeros(2), mask, dual_clip=1.0)
