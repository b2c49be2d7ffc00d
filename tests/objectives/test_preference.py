"""Preference losses: hand-computed values, masking, identities, a DPO bandit."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.objectives import preference, registry


def ls(x):  # log σ(x)
    return -math.log1p(math.exp(-x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# A two-pair batch used throughout.
#   ρ_c = chosen − ref_chosen   = [−1 − (−1.5), −2 − (−1.5)] = [0.5, −0.5]
#   ρ_r = rejected − ref_rejected = [−3 − (−2.5), −1 − (−2)] = [−0.5, 1.0]
#   h = ρ_c − ρ_r = [1.0, −1.5]
C = jnp.array([-1.0, -2.0])
R = jnp.array([-3.0, -1.0])
RC = jnp.array([-1.5, -1.5])
RR = jnp.array([-2.5, -2.0])
RHO_C = [0.5, -0.5]
RHO_R = [-0.5, 1.0]
H = [1.0, -1.5]
BETA = 0.5
LEN_C = jnp.array([2.0, 4.0])
LEN_R = jnp.array([3.0, 1.0])


def mean(xs):
    return sum(xs) / len(xs)


def check_reward_metrics(m, reward_c, reward_r):
    """Implicit-reward metrics against python floats."""
    np.testing.assert_allclose(m["chosen_reward_mean"], mean(reward_c), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["rejected_reward_mean"], mean(reward_r), rtol=1e-5, atol=1e-7)
    diffs = [a - b for a, b in zip(reward_c, reward_r)]
    np.testing.assert_allclose(m["margin_mean"], mean(diffs), rtol=1e-5, atol=1e-7)
    acc = mean([1.0 if d > 0 else 0.0 for d in diffs])  # strict: a tie counts 0 (TRL)
    np.testing.assert_allclose(m["accuracy"], acc)


def test_dpo_hand_value_and_gradient():
    loss, m = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    # −log σ(βh) = log(1 + e^{−βh}): βh = [0.5, −0.75] → (0.474077 + 1.136871) / 2 = 0.805474
    expected = mean([-ls(0.5), -ls(-0.75)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(expected, 0.805474, rtol=1e-5)
    # implicit rewards β·ρ: chosen [0.25, −0.25], rejected [−0.25, 0.5]; accuracy 1/2
    check_reward_metrics(m, [0.25, -0.25], [-0.25, 0.5])
    np.testing.assert_allclose(m["accuracy"], 0.5)
    # ∂loss/∂chosen_b = −β·σ(−βh_b)/B = −0.5·[σ(−0.5), σ(0.75)]/2 = [−0.093873, −0.169130]
    g = jax.grad(lambda c: preference.dpo_loss(c, R, RC, RR, beta=BETA)[0])(C)
    np.testing.assert_allclose(g, [-BETA * sig(-0.5) / 2, -BETA * sig(0.75) / 2], rtol=1e-5)


def test_cdpo_and_robust_hand_values():
    eps = 0.1
    loss, m = preference.cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=eps)
    # −0.9·log σ(βh) − 0.1·log σ(−βh)
    expected = mean([-(1 - eps) * ls(z) - eps * ls(-z) for z in (0.5, -0.75)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    check_reward_metrics(m, [0.25, -0.25], [-0.25, 0.5])
    loss, _ = preference.robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=eps)
    # [−0.9·log σ(βh) + 0.1·log σ(−βh)] / 0.8
    expected = mean([(-(1 - eps) * ls(z) + eps * ls(-z)) / (1 - 2 * eps) for z in (0.5, -0.75)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    with pytest.raises(ValueError):
        preference.robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.5)
    with pytest.raises(ValueError):
        preference.cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.6)


def test_robust_dpo_is_unbiased_under_label_noise():
    # With labels flipped at rate ε: (1 − ε)·L(h) + ε·L(−h) == DPO(h).
    eps = 0.2
    clean, _ = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    kept, _ = preference.robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=eps)
    flipped, _ = preference.robust_dpo_loss(R, C, RR, RC, beta=BETA, label_smoothing=eps)
    np.testing.assert_allclose((1 - eps) * kept + eps * flipped, clean, rtol=1e-5)


def test_ipo_hand_value_and_length_normalized():
    loss, _ = preference.ipo_loss(C, R, RC, RR, beta=BETA)
    # (h − 1/(2β))² = (1 − 1)², (−1.5 − 1)² = 0, 6.25 → 3.125
    np.testing.assert_allclose(loss, 3.125, rtol=1e-6)
    loss, m = preference.ipo_loss(C, R, RC, RR, beta=BETA, length_normalize=True, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    # ρ_c/|y_c| = [0.25, −0.125], ρ_r/|y_r| = [−1/6, 1.0] → h = [0.416667, −1.125]
    expected = mean([(0.25 + 1 / 6 - 1) ** 2, (-0.125 - 1.0 - 1) ** 2])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError):
        preference.ipo_loss(C, R, RC, RR, beta=BETA, length_normalize=True)


def test_hinge_hand_value():
    loss, m = preference.hinge_loss(C, R, RC, RR, beta=BETA)
    # max(0, 1 − βh) = max(0, 0.5), max(0, 1.75) → 1.125
    np.testing.assert_allclose(loss, 1.125, rtol=1e-6)
    check_reward_metrics(m, [0.25, -0.25], [-0.25, 0.5])


def test_simpo_hand_value_ignores_reference():
    gamma = 0.3
    loss, m = preference.simpo_loss(C, R, None, None, beta=2.0, gamma=gamma, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    # r_c = 2·[−1/2, −2/4] = [−1, −1]; r_r = 2·[−3/3, −1/1] = [−2, −2]
    # −log σ(r_c − r_r − γ) = −log σ(0.7) for both
    np.testing.assert_allclose(loss, -ls(0.7), rtol=1e-6)
    check_reward_metrics(m, [-1.0, -1.0], [-2.0, -2.0])
    assert preference.simpo_loss.uses_reference is False
    # reference arrays are ignored
    loss2, _ = preference.simpo_loss(C, R, RC, RR, beta=2.0, gamma=gamma, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    assert loss2 == loss


def test_orpo_hand_value():
    loss, m = preference.orpo_loss(C, R, None, None, beta=0.1, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    # mean log-probs: chosen [−0.5, −0.5], rejected [−1, −1]
    # log odds(p) = p − log(1 − e^p): log odds(−0.5) = −0.5 − log(0.393469) = 0.432752
    #                                 log odds(−1)   = −1 − log(0.632121) = −0.541325
    lo = lambda p: p - math.log(1 - math.exp(p))
    ratio = lo(-0.5) - lo(-1.0)
    # loss = NLL + λ·(−log σ(ratio)) = 0.5 − 0.1·log σ(0.974077)
    expected = 0.5 - 0.1 * ls(ratio)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["nll"], 0.5, rtol=1e-6)
    # TRL's ORPO metric names: log_odds_chosen is the ratio, log_odds_ratio its log σ.
    np.testing.assert_allclose(m["log_odds_chosen"], ratio, rtol=1e-5)
    np.testing.assert_allclose(m["log_odds_ratio"], ls(ratio), rtol=1e-5)
    check_reward_metrics(m, [-0.05, -0.05], [-0.1, -0.1])


def test_nca_apo_hand_values():
    rc = [BETA * x for x in RHO_C]  # [0.25, −0.25]
    rr = [BETA * x for x in RHO_R]  # [−0.25, 0.5]
    loss, m = preference.nca_loss(C, R, RC, RR, beta=BETA)
    # −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r)
    expected = mean([-ls(a) - 0.5 * ls(-a) - 0.5 * ls(-b) for a, b in zip(rc, rr)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    check_reward_metrics(m, rc, rr)
    loss, _ = preference.apo_zero_loss(C, R, RC, RR, beta=BETA)
    # (1 − σ(r_c)) + σ(r_r)
    expected = mean([(1 - sig(a)) + sig(b) for a, b in zip(rc, rr)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    loss, _ = preference.apo_down_loss(C, R, RC, RR, beta=BETA)
    # σ(r_c) + (1 − σ(r_c − r_r))
    expected = mean([sig(a) + (1 - sig(a - b)) for a, b in zip(rc, rr)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_bco_pair_hand_value():
    rc = [0.25, -0.25]
    rr = [-0.25, 0.5]
    loss, m = preference.bco_pair_loss(C, R, RC, RR, beta=BETA)
    # δ = mean of all four rewards = 0.25 / 4 = 0.0625
    d = mean(rc + rr)
    expected = mean([-ls(a - d) - ls(-(b - d)) for a, b in zip(rc, rr)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["reference_point"], 0.0625, rtol=1e-6)
    loss, m = preference.bco_pair_loss(C, R, RC, RR, beta=BETA, reference_point=jnp.float32(0.0))
    expected = mean([-ls(a) - ls(-b) for a, b in zip(rc, rr)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_exo_hand_value():
    eps = 1e-3
    loss, _ = preference.exo_loss(C, R, RC, RR, beta=BETA, epsilon=eps)
    # p = σ(βh); p(log p − log(1−ε)) + (1−p)(log(1−p) − log ε)
    expected = mean([sig(z) * (ls(z) - math.log(1 - eps)) + sig(-z) * (ls(-z) - math.log(eps)) for z in (0.5, -0.75)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # a KL is ≥ 0 and is 0 when p = 1 − ε: βh = logit(0.999)
    z = math.log(0.999 / 0.001)
    zero, _ = preference.exo_loss(jnp.array([z / BETA]), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=BETA, epsilon=eps)
    np.testing.assert_allclose(zero, 0.0, atol=1e-5)


def test_beta_dpo_per_pair_beta():
    # margins m = [1, 3], m0 = mean = 2, α = 0.5: β_i = 0.5·(1 + 0.5·[−1, 1]) = [0.25, 0.75]
    loss, m = preference.beta_dpo_loss(C, R, RC, RR, beta=BETA, alpha=0.5, reward_margin_B=jnp.array([1.0, 3.0]))
    expected = mean([-ls(0.25 * 1.0), -ls(0.75 * -1.5)])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["beta_mean"], 0.5, rtol=1e-6)
    # α = 0 is DPO
    dpo, _ = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    loss0, _ = preference.beta_dpo_loss(C, R, RC, RR, beta=BETA, alpha=0.0)
    np.testing.assert_allclose(loss0, dpo, rtol=1e-6)
    # the floor: m = [−100, 100] with α = 1 → β_0 = max(0.5·(1 − 100), 1e-3)
    lossf, _ = preference.beta_dpo_loss(C, R, RC, RR, beta=BETA, alpha=1.0, reward_margin_B=jnp.array([-100.0, 100.0]))
    expected = mean([-ls(1e-3 * 1.0), -ls(0.5 * 101 * -1.5)])
    np.testing.assert_allclose(lossf, expected, rtol=1e-5)


def test_cream_matches_dpo_and_cdpo():
    dpo, _ = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    c1, _ = preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=1.0)
    np.testing.assert_allclose(c1, dpo, rtol=1e-6)
    cd, _ = preference.cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.25)
    c75, _ = preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=jnp.array([0.75, 0.75]))
    np.testing.assert_allclose(c75, cd, rtol=1e-6)


def test_cream_refuses_a_consistency_outside_0_1():
    # For C in [0, 1] the loss −C·log σ(βh) − (1 − C)·log σ(−βh) is a cross-entropy
    # (≥ 0). C = 1.5, β = 1, h = 10 would give −1.5·log σ(10) + 0.5·log σ(−10)
    # = 1.5·4.54e-5 − 0.5·10.0000454 ≈ −4.99995, falling without bound as h grows.
    c, r, z = jnp.array([0.0]), jnp.array([-10.0]), jnp.array([0.0])
    loss, _ = preference.cream_loss(c, r, z, z, beta=1.0, consistency=0.5)
    assert float(loss) > 0
    with pytest.raises(ValueError, match=r"consistency must be in \[0, 1\], got 1.5"):
        preference.cream_loss(c, r, z, z, beta=1.0, consistency=1.5)
    with pytest.raises(ValueError, match=r"consistency must be in \[0, 1\], got -0.2 at index \(1,\)"):
        preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=jnp.array([0.5, -0.2]))
    with pytest.raises(ValueError, match=r"consistency must be in \[0, 1\], got nan"):
        preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=float("nan"))
    # A masked pair may hold any placeholder; under jit the value is data and not checked.
    masked, _ = preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=jnp.array([0.75, -1.0]),
                                      example_mask_B=jnp.array([True, False]))
    alone, _ = preference.cream_loss(C[:1], R[:1], RC[:1], RR[:1], beta=BETA, consistency=0.75)
    np.testing.assert_allclose(masked, alone, rtol=1e-6)
    jax.jit(lambda k: preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=k)[0])(jnp.array([0.5, 2.0]))


def test_a_scalar_consistency_is_checked_eagerly_and_under_jit_alike():
    # A scalar applies to every pair, so it is checked even when every pair is masked.
    from jaxreward.objectives import checks
    z, mask = jnp.zeros(3), jnp.zeros(3, bool)
    f = lambda m: preference.cream_loss(z, z, z, z, beta=0.1, consistency=1.5, example_mask_B=m)[0]
    for g in (f, jax.jit(f)):
        with pytest.raises(ValueError, match=r"consistency must be in \[0, 1\], got 1.5"):
            g(mask)
    assert "check_values_in_range" in checks.__all__


def test_the_dpo_config_refuses_a_cream_consistency_outside_0_1():
    from jaxreward.train import preference as pref
    pref.resolve_loss({"name": "cream", "beta": 0.1, "consistency": 0.8})
    with pytest.raises(ValueError, match="consistency must be in"):
        pref.resolve_loss({"name": "cream", "beta": 0.1, "consistency": 1.5})


def test_mixture_refuses_a_negative_weight_and_a_nested_mixture():
    # −1 · DPO is unbounded below; a weight of 0 switches a component off.
    with pytest.raises(ValueError, match=r"weight of mixture component 0 \('dpo'\) must be in \[0, inf\), got -1.0"):
        preference.mixture_loss(C, R, RC, RR, beta=BETA, components=(("dpo", -1.0),))
    off, _ = preference.mixture_loss(C, R, RC, RR, beta=BETA, components=(("dpo", 1.0), ("ipo", 0.0)))
    dpo, _ = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    np.testing.assert_allclose(off, dpo, rtol=1e-6)
    with pytest.raises(ValueError, match="mixture component 0 is itself a mixture; list its components"):
        preference.mixture_loss(C, R, RC, RR, beta=BETA, components=(("mixture", 1.0),))
    from jaxreward.train import preference as pref
    with pytest.raises(ValueError, match=r"config.loss \('mixture'\): weight of mixture component 0"):
        pref.resolve_loss({"name": "mixture", "beta": 0.1, "components": (("dpo", -1.0),)})
    with pytest.raises(ValueError, match="is itself a mixture"):
        pref.resolve_loss({"name": "mixture", "beta": 0.1, "components": (("mixture", 1.0),)})


def test_cream_consistency_kendall():
    now = jnp.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    prev = jnp.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0]])
    # row 0: identical → τ = 1 → C = 1
    # row 1: pairs (0,1) discordant, (0,2) and (1,2) concordant → τ = (2 − 1)/3 → C = 2/3
    np.testing.assert_allclose(preference.cream_consistency(now, prev), (1 + 2 / 3) / 2, rtol=1e-6)
    # a masked third response leaves row 1 with one discordant pair → C = 0
    mask = jnp.array([[True, True, True], [True, True, False]])
    np.testing.assert_allclose(preference.cream_consistency(now, prev, mask), (1 + 0) / 2, rtol=1e-6)


def test_tgdpo_alpha_zero_is_dpo_and_hand_value():
    lp_c = jnp.array([[-0.5, -0.5, np.nan], [-1.0, -1.0, np.inf]])  # NaN/inf in masked slots
    lp_r = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
    ref_c = jnp.array([[-0.75, -0.75, 0.0], [-0.75, -0.75, 0.0]])
    ref_r = jnp.array([[-1.0, -1.5], [-1.0, -1.0]])
    mc = jnp.array([[True, True, False], [True, True, False]])
    mr = jnp.ones((2, 2), bool)
    guide_c = jnp.array([[1.0, -1.0, 0.0], [2.0, 0.0, 0.0]])
    guide_r = jnp.array([[0.5, 0.5], [-1.0, 1.0]])
    kw = dict(chosen_mask_BT=mc, rejected_mask_BT=mr, chosen_token_rewards_BT=guide_c, rejected_token_rewards_BT=guide_r)
    loss0, m0 = preference.tgdpo_loss(lp_c, lp_r, ref_c, ref_r, beta=BETA, alpha=0.0, **kw)
    seq = preference.sequence_logps
    dpo, md = preference.dpo_loss(seq(lp_c, mc), seq(lp_r, mr), seq(ref_c, mc), seq(ref_r, mr), beta=BETA)
    np.testing.assert_allclose(loss0, dpo, rtol=1e-6)
    np.testing.assert_allclose(m0["chosen_reward_mean"], md["chosen_reward_mean"], rtol=1e-6)
    loss, _ = preference.tgdpo_loss(lp_c, lp_r, ref_c, ref_r, beta=BETA, alpha=0.5, **kw)
    g = jax.grad(lambda x: preference.tgdpo_loss(x, lp_r, ref_c, ref_r, beta=BETA, alpha=0.5, **kw)[0])(lp_c)
    assert np.isfinite(g).all() and np.all(g[:, 2] == 0.0)
    # token log-ratios: chosen [[0.25, 0.25], [−0.25, −0.25]], rejected [[0, −0.5], [0.5, 0.5]]
    # u_c = Σ β(1 + α r̂)ρ: row 0: 0.5·(1.5·0.25 + 0.5·0.25) = 0.25; row 1: 0.5·(2·−0.25 + 1·−0.25) = −0.375
    # u_r = Σ β(1 − α r̂)ρ: row 0: 0.5·(0.75·0 + 0.75·−0.5) = −0.1875; row 1: 0.5·(1.5·0.5 + 0.5·0.5) = 0.5
    expected = mean([-ls(0.25 + 0.1875), -ls(-0.375 - 0.5)])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_dpo_accuracy_counts_a_tie_as_wrong():
    """Policy == reference (step 0 of DPO): every implicit reward is 0, every pair
    a tie, so `accuracy` is 0.0 as TRL's (chosen_rewards > rejected_rewards).float()
    (it read 0.5 when a tie counted half)."""
    _, m = preference.dpo_loss(C, R, C, R, beta=BETA)
    assert float(m["accuracy"]) == 0.0
    # One tie (ρ_c = ρ_r = 0) and one win (βρ_c = 0.5·1 > βρ_r = 0): (0 + 1) / 2 = 0.5 (was 0.75)
    _, m = preference.dpo_loss(jnp.array([-1.0, 0.0]), jnp.array([-2.0, -1.0]), jnp.array([-1.0, -1.0]),
                               jnp.array([-2.0, -1.0]), beta=BETA)
    assert float(m["accuracy"]) == 0.5


def test_kto_accuracy_counts_a_row_at_z0_as_wrong():
    # No mismatched log-probs → z_0 = 0. ρ = [0.5, 0, −0.5], desirable [T, T, F]:
    # row 0 desirable, z > 0: right (1); row 1 at z_0: tie, wrong (0); row 2 undesirable, z < 0: right (1)
    # → 2 / 3 (was (1 + 0.5 + 1) / 3 = 0.8333 when a tie counted half)
    logps = jnp.array([-1.0, -1.0, -1.5])
    ref = jnp.array([-1.5, -1.0, -1.0])
    _, m = preference.kto_loss(logps, ref, jnp.array([True, True, False]), beta=0.5)
    np.testing.assert_allclose(m["accuracy"], 2 / 3, rtol=1e-6)


def test_mixture_is_weighted_sum():
    comps = (("dpo", 1.0), ("ipo", 0.5, {"beta": 0.25}), ("simpo", 2.0, {"beta": 2.0}))
    loss, m = preference.mixture_loss(
        C, R, RC, RR, components=comps, beta=BETA, gamma=0.3, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R
    )
    dpo, md = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    ipo, _ = preference.ipo_loss(C, R, RC, RR, beta=0.25)
    simpo, _ = preference.simpo_loss(C, R, None, None, beta=2.0, gamma=0.3, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    np.testing.assert_allclose(loss, dpo + 0.5 * ipo + 2.0 * simpo, rtol=1e-6)
    np.testing.assert_allclose(m["ipo/loss"], ipo, rtol=1e-6)
    assert m["accuracy"] == md["accuracy"]
    # via the registry by name
    fn = registry.get("preference", "mixture")
    loss2, _ = fn(C, R, RC, RR, components=(("dpo", 1.0),), beta=BETA)
    np.testing.assert_allclose(loss2, dpo, rtol=1e-6)


def test_kto_hand_value():
    logps = jnp.array([-1.0, -2.0, -1.0])
    ref = jnp.array([-1.5, -1.5, 0.0])
    desirable = jnp.array([True, False, False])
    kl_logps = jnp.array([-3.0, -3.0, -3.0])
    ref_kl = jnp.array([-3.5, -3.0, -3.3])
    beta = 0.5
    loss, m = preference.kto_loss(logps, ref, desirable, kl_logps, ref_kl, beta=beta, desirable_weight=0.7,
                                  undesirable_weight=2.0)
    # ρ = [0.5, −0.5, −1.0]; z0 = max(0, mean[0.5, 0, 0.3]) = 0.266667
    z0 = 0.8 / 3
    # desirable:   λ_D·(1 − σ(0.5·(0.5 − z0)))  = 0.7·0.4708664 = 0.3296065
    # undesirable: λ_U·(1 − σ(0.5·(z0 − ρ)))    = 2·0.4053232, 2·0.3467551
    # mean over the 3 examples (weights inside the mean, as TRL): 0.6112543
    losses = [0.7 * (1 - sig(0.5 * (0.5 - z0))), 2 * (1 - sig(0.5 * (z0 + 0.5))), 2 * (1 - sig(0.5 * (z0 + 1.0)))]
    np.testing.assert_allclose(mean(losses), 0.6112543, rtol=1e-6)
    np.testing.assert_allclose(loss, mean(losses), rtol=1e-5)
    np.testing.assert_allclose(m["kl"], z0, rtol=1e-5)
    np.testing.assert_allclose(m["chosen_reward_mean"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(m["rejected_reward_mean"], -0.375, rtol=1e-6)
    np.testing.assert_allclose(m["margin_mean"], 0.625, rtol=1e-6)
    # all three rows on the right side of z0
    np.testing.assert_allclose(m["accuracy"], 1.0)
    # z0 is a constant: no gradient flows into the mismatched log-probs
    g = jax.grad(lambda x: preference.kto_loss(logps, ref, desirable, x, ref_kl, beta=beta)[0])(kl_logps)
    np.testing.assert_array_equal(g, 0.0)
    # a negative KL estimate is clipped to 0
    _, m = preference.kto_loss(logps, ref, desirable, kl_logps, ref_kl + 1.0, beta=beta)
    assert m["kl"] == 0.0
    # A given reference_point is z0 as it is (not clipped), the mismatched log-probs unread:
    # z0 = −0.5: 1 − σ(0.5·(0.5 + 0.5)) = 0.3775407, 1 − σ(0.5·(−0.5 + 0.5)) = 0.5,
    # 1 − σ(0.5·(−0.5 + 1.0)) = 0.4378235; mean 0.4384547.
    fixed, m = preference.kto_loss(logps, ref, desirable, kl_logps * jnp.nan, ref_kl, beta=beta,
                                   reference_point=jnp.float32(-0.5))
    np.testing.assert_allclose(fixed, (0.3775407 + 0.5 + 0.4378235) / 3, rtol=1e-6)
    assert m["kl"] == -0.5
    with pytest.raises(ValueError, match="reference_point"):
        preference.kto_loss(logps, ref, desirable, beta=beta, reference_point=jnp.zeros(2))


def test_kto_padding_is_inert_and_all_masked_is_zero():
    logps = jnp.array([-1.0, -2.0, -1.0, 0.0])
    ref = jnp.array([-1.5, -1.5, 0.0, 0.0])
    desirable = jnp.array([True, False, False, True])
    kl_logps = jnp.array([-3.0, -3.0, -3.0, 0.0])
    ref_kl = jnp.array([-3.5, -3.0, -3.3, 0.0])
    mask = jnp.array([True, True, True, False])

    def run(lp, rf, kl_lp, rkl, m):
        return jax.value_and_grad(
            lambda x: preference.kto_loss(x, rf, desirable, kl_lp, rkl, beta=0.5, example_mask_B=m), has_aux=True
        )(lp)

    (loss0, m0), g0 = run(logps, ref, kl_logps, ref_kl, mask)
    # the padded row behaves as if absent: compare with the 3-row batch
    loss3, _ = preference.kto_loss(logps[:3], ref[:3], desirable[:3], kl_logps[:3], ref_kl[:3], beta=0.5)
    np.testing.assert_allclose(loss0, loss3, rtol=1e-6)
    for fill in (np.nan, np.inf, 1e9):
        pad = lambda x: x.at[3].set(fill)
        (loss, m), g = run(pad(logps), pad(ref), pad(kl_logps), pad(ref_kl), mask)
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        np.testing.assert_allclose(g, g0, rtol=1e-6, atol=1e-8)
        for key in m0:
            np.testing.assert_allclose(m[key], m0[key], rtol=1e-6, atol=1e-8)
    nan = jnp.full(4, np.nan)
    (loss, m), g = run(nan, nan, nan, nan, jnp.zeros(4, bool))
    assert loss == 0.0
    np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(v) for v in m.values())


# ----------------------------------------------------------------------------
# Every registered pairwise loss: padding is inert, all-masked is 0.
# ----------------------------------------------------------------------------

EXTRA_KWARGS = {
    "cdpo": {"label_smoothing": 0.1},
    "robust_dpo": {"label_smoothing": 0.1},
    "simpo": {"gamma": 0.3},
    "beta_dpo": {"alpha": 0.5},
    "cream": {"consistency": 0.8},
    "mixture": {"components": (("dpo", 1.0), ("ipo", 0.5), ("orpo", 0.25))},
}
PAIRWISE = list(registry.names("preference"))   # tgdpo is a "token_preference"


def _call(name, c, r, rc, rr, mask, lengths):
    fn = registry.get("preference", name)
    available = dict(
        beta=BETA, example_mask_B=mask, chosen_lengths_B=lengths[0], rejected_lengths_B=lengths[1], **EXTRA_KWARGS.get(name, {})
    )
    return fn(c, r, rc, rr, **registry.accepted_kwargs(fn, available))


def test_every_pairwise_loss_is_registered():
    expected = {"dpo", "cdpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "nca", "apo_zero", "apo_down",
                "bco_pair", "exo", "beta_dpo", "cream", "mixture"}
    assert expected == set(registry.names("preference"))
    assert registry.names("token_preference") == ("tgdpo",)
    assert registry.names("unpaired_preference") == ("kto",)


def _pad(x, v):
    return jnp.concatenate([x, jnp.array([v], jnp.float32)])


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_padding_is_inert_and_all_masked_is_zero(name):
    mask = jnp.array([True, True, False])

    def f(c, r, rc, rr, mask, len_c, len_r):
        return _call(name, c, r, rc, rr, mask, (len_c, len_r))

    run = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    def padded(fill):
        return run(_pad(C, fill), _pad(R, fill), _pad(RC, fill), _pad(RR, -fill), mask, _pad(LEN_C, 0.0), _pad(LEN_R, fill))

    # Padding with a benign value is the same as not having the row.
    (loss0, m0), (gc0, gr0) = padded(0.0)
    (ref_loss, ref_m), (rgc, rgr) = run(C, R, RC, RR, None, LEN_C, LEN_R)
    np.testing.assert_allclose(loss0, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(gc0, _pad(rgc, 0.0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gr0, _pad(rgr, 0.0), rtol=1e-5, atol=1e-8)
    for key in ("accuracy", "margin_mean", "chosen_reward_mean", "rejected_reward_mean"):
        np.testing.assert_allclose(m0[key], ref_m[key], rtol=1e-5, atol=1e-7)
    # NaN, inf or 1e9 in the masked row change neither values nor gradients.
    for fill in (np.nan, np.inf, 1e9):
        (loss, m), (gc, gr) = padded(fill)
        np.testing.assert_allclose(loss, loss0, rtol=1e-6)
        np.testing.assert_allclose(gc, gc0, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(gr, gr0, rtol=1e-6, atol=1e-8)
        for key in m0:
            np.testing.assert_allclose(m[key], m0[key], rtol=1e-6, atol=1e-8)
    # All rows masked: loss 0, zero gradients, finite metrics.
    nan = jnp.full(3, np.nan)
    (loss, m), grads = run(nan, nan, nan, nan, jnp.zeros(3, bool), nan, nan)
    assert loss == 0.0
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)
    assert all(np.isfinite(v) for v in m.values()), m
    # Jittable with the hyper-parameters static, and equal to eager.
    jitted = jax.jit(lambda c, r, rc, rr: f(c, r, rc, rr, None, LEN_C, LEN_R)[0])(C, R, RC, RR)
    np.testing.assert_allclose(jitted, ref_loss, rtol=1e-6)


# ----------------------------------------------------------------------------
# Tabular bandit: DPO recovers β·log(π/π_ref) differences = reward differences.
# ----------------------------------------------------------------------------


def test_dpo_bandit_recovers_reward_differences():
    reward_A = np.array([1.0, 0.0, -0.5])
    ref_logits = jnp.array([0.3, -0.2, 0.1])
    ref_logp = jax.nn.log_softmax(ref_logits)
    beta = 0.5
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    # Preferences follow Bradley–Terry with the true reward: P(i ≻ j) = σ(r_i − r_j).
    # The expected DPO loss weights the ordered pair (i ≻ j) by that probability.
    win = jnp.array([1 / (1 + math.exp(-(reward_A[i] - reward_A[j]))) for i, j in pairs])
    ci = jnp.array([i for i, _ in pairs])
    ri = jnp.array([j for _, j in pairs])

    def expected_loss(theta):
        logp = jax.nn.log_softmax(theta)
        losses = []
        for k in range(len(pairs)):
            loss_k, _ = preference.dpo_loss(logp[ci[k]][None], logp[ri[k]][None], ref_logp[ci[k]][None], ref_logp[ri[k]][None], beta=beta)
            losses.append(win[k] * loss_k)
        return sum(losses)

    @jax.jit
    def run(theta):
        step = lambda _, t: t - 2.0 * jax.grad(expected_loss)(t)
        return jax.lax.fori_loop(0, 400, step, theta)

    theta = run(ref_logits)
    implicit = beta * (jax.nn.log_softmax(theta) - ref_logp)
    np.testing.assert_allclose(implicit - implicit[1], reward_A - reward_A[1], atol=2e-3)


# ----------------------------------------------------------------------------
# Shapes are checked exactly: no silent broadcasting.
# ----------------------------------------------------------------------------


def _raises(message):
    return pytest.raises(ValueError, match=re.escape(message))


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_shape_mismatch_names_argument_and_shapes(name):
    lengths = (LEN_C, LEN_R)
    # A [B, 1] mask used to broadcast against [B] log-probs into a [B, B] loss.
    with _raises("example_mask_B has shape (2, 1), expected (2,) to match chosen_logps_B with shape (2,)"):
        _call(name, C, R, RC, RR, jnp.ones((2, 1), bool), lengths)
    # Per-token [B, T] log-probs where summed [B] ones are expected.
    with _raises("chosen_logps_B must be [B] (one summed log-prob per response), got shape (2, 4)"):
        _call(name, jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.zeros((2, 4)), None, lengths)
    # Mismatched B used to give a bare JAX broadcasting error (or broadcast a length-1 array).
    with _raises("rejected_logps_B has shape (3,), expected (2,) to match chosen_logps_B with shape (2,)"):
        _call(name, C, _pad(R, 0.0), RC, RR, None, lengths)
    with _raises("rejected_logps_B has shape (1,), expected (2,)"):
        _call(name, C, R[:1], RC, RR, None, lengths)


def test_reference_shapes_and_per_pair_arrays_are_checked():
    with _raises("ref_rejected_logps_B has shape (2, 1), expected (2,) to match chosen_logps_B with shape (2,)"):
        preference.dpo_loss(C, R, RC, RR[:, None], beta=BETA)
    # [B, 1] lengths used to broadcast into a [B, B] reward for SimPO / ORPO / IPO.
    col = LEN_C[:, None]
    with _raises("chosen_lengths_B has shape (2, 1), expected (2,) to match chosen_logps_B with shape (2,)"):
        preference.simpo_loss(C, R, beta=BETA, gamma=0.3, chosen_lengths_B=col, rejected_lengths_B=LEN_R)
    with _raises("rejected_lengths_B has shape (2, 1), expected (2,)"):
        preference.orpo_loss(C, R, beta=BETA, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R[:, None])
    with _raises("chosen_lengths_B has shape (2, 1), expected (2,)"):
        preference.ipo_loss(C, R, RC, RR, beta=BETA, length_normalize=True, chosen_lengths_B=col, rejected_lengths_B=LEN_R)
    with _raises("reward_margin_B has shape (3,), expected (2,)"):
        preference.beta_dpo_loss(C, R, RC, RR, beta=BETA, alpha=0.5, reward_margin_B=jnp.zeros(3))
    with _raises("consistency has shape (2, 1), expected (2,) or ()"):
        preference.cream_loss(C, R, RC, RR, beta=BETA, consistency=jnp.ones((2, 1)))
    with _raises("reference_point must be a scalar, got shape (2,)"):
        preference.bco_pair_loss(C, R, RC, RR, beta=BETA, reference_point=jnp.zeros(2))


def test_correct_mask_gives_the_hand_value_that_a_column_mask_got_wrong():
    c, r, z = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -2.5, 0.0]), jnp.zeros(3)
    dpo = registry.get("preference", "dpo")
    loss, _ = dpo(c, r, z, z, beta=1.0, example_mask_B=np.array([True, True, False]))
    # h = c − r = [1, 0.5] on the valid rows: mean(−log σ(1), −log σ(0.5)) = (0.313262 + 0.474077) / 2
    np.testing.assert_allclose(loss, mean([-ls(1.0), -ls(0.5)]), rtol=1e-6)
    np.testing.assert_allclose(loss, 0.3936693, rtol=1e-5)
    with _raises("example_mask_B has shape (3, 1), expected (3,)"):
        dpo(c, r, z, z, beta=1.0, example_mask_B=np.array([[1], [1], [0]], bool))


def test_tgdpo_shapes_are_checked():
    lp_c, lp_r = jnp.zeros((2, 3)), jnp.zeros((2, 4))
    kw = dict(chosen_mask_BT=jnp.ones((2, 3), bool), rejected_mask_BT=jnp.ones((2, 4), bool),
              chosen_token_rewards_BT=jnp.zeros((2, 3)), rejected_token_rewards_BT=jnp.zeros((2, 4)))
    loss, _ = preference.tgdpo_loss(lp_c, lp_r, lp_c, lp_r, beta=BETA, alpha=0.5, **kw)
    np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)   # all log-ratios 0: −log σ(0)
    with _raises("chosen_mask_BT has shape (2, 4), expected (2, 3) to match chosen_logps_BT with shape (2, 3)"):
        preference.tgdpo_loss(lp_c, lp_r, lp_c, lp_r, beta=BETA, alpha=0.5, **{**kw, "chosen_mask_BT": jnp.ones((2, 4), bool)})
    with _raises("rejected_logps_BT has shape (3, 4) but chosen_logps_BT has shape (2, 3); the batch sizes B must match"):
        preference.tgdpo_loss(lp_c, jnp.zeros((3, 4)), lp_c, jnp.zeros((3, 4)), beta=BETA, alpha=0.5, **kw)
    with _raises("chosen_logps_BT must be [B, T_c] (per-token log-probs), got shape (2,)"):
        preference.tgdpo_loss(C, lp_r, C, lp_r, beta=BETA, alpha=0.5, **kw)
    with _raises("example_mask_B has shape (2, 1), expected (2,)"):
        preference.tgdpo_loss(lp_c, lp_r, lp_c, lp_r, beta=BETA, alpha=0.5, example_mask_B=jnp.ones((2, 1), bool), **kw)


def test_kto_shapes_are_checked():
    lp, ref, des = jnp.array([-1.0, -2.0, -1.0]), jnp.array([-1.5, -1.5, 0.0]), jnp.array([True, False, False])
    with _raises("example_mask_B has shape (3, 1), expected (3,) to match logps_B with shape (3,)"):
        preference.kto_loss(lp, ref, des, beta=0.5, example_mask_B=jnp.ones((3, 1), bool))
    with _raises("desirable_B has shape (1,), expected (3,)"):
        preference.kto_loss(lp, ref, des[:1], beta=0.5)
    with _raises("logps_B must be [B] (one summed log-prob per completion), got shape (3, 2)"):
        preference.kto_loss(jnp.zeros((3, 2)), jnp.zeros((3, 2)), des, beta=0.5)
    with _raises("kl_logps_B and ref_kl_logps_B must be given together"):
        preference.kto_loss(lp, ref, des, lp, beta=0.5)
    with _raises("undesirable_weight must be in (0, inf), got 0.0"):
        preference.kto_loss(lp, ref, des, beta=0.5, undesirable_weight=0.0)


def test_hyper_parameters_are_checked():
    with _raises("beta must be in (0, inf), got 0.0"):
        preference.dpo_loss(C, R, RC, RR, beta=0.0)
    with _raises("beta must be in (0, inf), got nan"):
        preference.dpo_loss(C, R, RC, RR, beta=float("nan"))
    with _raises("gamma must be in [0, inf), got -0.1"):
        preference.simpo_loss(C, R, beta=BETA, gamma=-0.1, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    with _raises("label_smoothing must be in [0, 0.5), got 0.5"):
        preference.robust_dpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.5)
    # cDPO at ε = 0.5 is symmetric in the margin (minimum at the reference): it trained nothing.
    with _raises("label_smoothing must be in [0, 0.5), got 0.5"):
        preference.cdpo_loss(C, R, RC, RR, beta=BETA, label_smoothing=0.5)
    with _raises("alpha must be in [0, inf), got -1.0"):
        preference.beta_dpo_loss(C, R, RC, RR, beta=BETA, alpha=-1.0)


# ----------------------------------------------------------------------------
# Mixture: override typos raise; a tuple of components is a static jit argument.
# ----------------------------------------------------------------------------


def test_mixture_override_typo_raises():
    mix = registry.get("preference", "mixture")
    with _raises("mixture component 0 ('dpo') overrides: unknown keyword argument(s) ['bta']"):
        mix(C, R, RC, RR, components=[("dpo", 1.0, {"bta": 5.0})], beta=0.1)
    with _raises("mixture component 1 ('ipo') overrides: unknown keyword argument(s) ['gama']"):
        mix(C, R, RC, RR, components=(("dpo", 1.0), ("ipo", 0.5, (("gama", 1.0),))), beta=0.1)
    # Shared kwargs are still filtered per loss: dpo ignores gamma and the lengths.
    loss, _ = mix(C, R, RC, RR, components=(("dpo", 1.0),), beta=BETA, gamma=0.3,
                  chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    np.testing.assert_allclose(loss, preference.dpo_loss(C, R, RC, RR, beta=BETA)[0], rtol=1e-6)
    # A correct override is applied.
    loss, _ = mix(C, R, RC, RR, components=[("dpo", 1.0, {"beta": 5.0})], beta=0.1)
    np.testing.assert_allclose(loss, preference.dpo_loss(C, R, RC, RR, beta=5.0)[0], rtol=1e-6)


def test_mixture_malformed_components_raise():
    mix = registry.get("preference", "mixture")
    with _raises("components must be a tuple (or list)"):
        mix(C, R, RC, RR, components={"dpo": 1.0}, beta=BETA)
    with _raises("mixture component 0 must be (name, weight) or (name, weight, overrides), got ('dpo',)"):
        mix(C, R, RC, RR, components=(("dpo",),), beta=BETA)
    with _raises("mixture_loss needs at least one component"):
        mix(C, R, RC, RR, components=(), beta=BETA)
    with _raises("overrides must be a dict or a tuple of (key, value) pairs"):
        mix(C, R, RC, RR, components=(("dpo", 1.0, 3),), beta=BETA)


def test_mixture_tuple_components_are_static_under_jit():
    comps = (("dpo", 1.0), ("ipo", 0.5, (("beta", 0.25),)))
    hash(comps)   # hashable: usable as a static argument
    jitted = jax.jit(preference.mixture_loss, static_argnames=("components", "beta"))
    loss, m = jitted(C, R, RC, RR, components=comps, beta=BETA)
    dpo, _ = preference.dpo_loss(C, R, RC, RR, beta=BETA)
    ipo, _ = preference.ipo_loss(C, R, RC, RR, beta=0.25)
    np.testing.assert_allclose(loss, dpo + 0.5 * ipo, rtol=1e-6)
    np.testing.assert_allclose(m["ipo/loss"], ipo, rtol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e39])
@pytest.mark.parametrize("loss,field,kw", [("kto", "reference_point", {}), ("bco_pair", "reference_point", {}),
                                           ("beta_dpo", "margin_reference", {"alpha": 0.5})])
def test_a_given_batch_statistic_must_be_finite(loss, field, kw, value):
    # A fixed z_0 / δ / margin reference of inf trained with zero gradients (σ saturates) and
    # NaN made every loss NaN, which the driver then blamed on the learning rate. 1e39 is finite
    # in Python but inf once cast to float32, as the losses do.
    fn = registry.get("unpaired_preference" if loss == "kto" else "preference", loss)
    logps = jnp.array([-1.0, -2.0])
    args = (logps, logps - 0.5, jnp.array([True, False])) if loss == "kto" else (logps, logps - 1, logps, logps)
    with pytest.raises(ValueError, match=rf"^{field} must be in \[-3.40282e\+38, 3.40282e\+38\], got -?(nan|inf|1e\+39)"):
        fn(*args, beta=0.5, **{field: value}, **kw)
    fn(*args, beta=0.5, **{field: 0.25}, **kw)  # a finite value is taken
