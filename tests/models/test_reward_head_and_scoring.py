"""RewardModel invariances and the shared log-prob helper (hand-computed values)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import Decoder, LlamaConfig, last_token_index
from jaxreward.models.scoring import (logps_from_hidden, process_logits, sequence_logps, target_logps,
                                      shift_mask, token_logps)
from jaxreward.train.step import unbox

CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=1000.0)


@pytest.fixture(scope="module")
def rm_and_params():
    rm = RewardModel(CFG, num_objectives=3)
    params = unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return rm, params


def _pad(rows, T, side, pad_id=0):
    tokens = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        if side == "right":
            tokens[i, :len(r)], mask[i, :len(r)] = r, True
        else:
            tokens[i, T - len(r):], mask[i, T - len(r):] = r, True
    return tokens, mask


def test_reward_ignores_padding_side_amount_and_batch_companions(rm_and_params):
    rm, params = rm_and_params
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 50, n).tolist() for n in (7, 3, 11, 1)]
    apply = jax.jit(lambda t, m: rm.apply({"params": params}, t, m))
    ref = np.stack([np.asarray(apply(*_pad([r], len(r), "right")))[0] for r in rows])  # alone, no padding
    assert ref.shape == (4, 3)
    for side in ("right", "left"):
        for T in (11, 16):
            # pad ids that are real tokens (7), so only the mask can tell padding apart
            got = np.asarray(apply(*_pad(rows, T, side, pad_id=7)))
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{side} T={T}")
    # A different companion in the batch changes nothing for row 0.
    other = np.asarray(apply(*_pad([rows[0], [5] * 11], 11, "left")))[0]
    np.testing.assert_allclose(other, ref[0], rtol=1e-5, atol=1e-5)


def test_last_token_index_comes_from_the_mask():
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(last_token_index(jnp.asarray(mask)), [1, 3, 0, 2])


def test_process_logits_hand_values():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125]]))
    # temperature 1: unchanged distribution
    np.testing.assert_allclose(jnp.exp(process_logits(logits)), [[0.5, 0.25, 0.125, 0.125]], rtol=1e-6)
    # temperature 0.5 squares the probabilities: (.25, .0625, .015625, .015625) / 0.34375
    np.testing.assert_allclose(jnp.exp(process_logits(logits, temperature=0.5)),
                               np.array([[0.25, 0.0625, 0.015625, 0.015625]]) / 0.34375, rtol=1e-5)
    # top_k=2 keeps 0.5 and 0.25 -> (2/3, 1/3)
    np.testing.assert_allclose(jnp.exp(process_logits(logits, top_k=2)),
                               [[2 / 3, 1 / 3, 0, 0]], atol=1e-6)
    # top_p=0.6: mass before each sorted token is 0, .5, .75, .875 -> keep the first two
    np.testing.assert_allclose(jnp.exp(process_logits(logits, top_p=0.6)),
                               [[2 / 3, 1 / 3, 0, 0]], atol=1e-6)
    # top_p=0.5: mass before token 2 is exactly 0.5, not < 0.5 -> only the top token
    np.testing.assert_allclose(jnp.exp(process_logits(logits, top_p=0.5)), [[1, 0, 0, 0]], atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(logits, top_p=0.0)


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_chunked_logps_equal_full_log_softmax(chunk):
    model = Decoder(CFG)
    params = unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32))["params"])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 50, (2, 9)), jnp.int32)
    mask = jnp.ones((2, 9), bool)
    logits = model.apply({"params": params}, tokens, attention_mask=mask)
    full = jax.nn.log_softmax(logits / 0.7, axis=-1)
    expect = jnp.take_along_axis(full[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
    got = token_logps(model, params, tokens, mask, temperature=0.7, chunk_size=chunk)
    np.testing.assert_allclose(got[:, :-1], expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[:, -1], 0.0)


def test_sequence_logps_hand_values_and_nan_in_masked_slots():
    # tokens t0..t4; response = tokens 2,3 -> their log-probs live at columns 1, 2.
    loss_mask = jnp.array([[0, 0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(shift_mask(loss_mask), [[0, 1, 1, 0, 0]])
    logps = jnp.array([[jnp.nan, -1.0, -2.0, jnp.inf, -jnp.inf]])
    # sum = -1 + -2 = -3; average = -3 / 2 = -1.5
    np.testing.assert_allclose(sequence_logps(logps, loss_mask), [-3.0])
    np.testing.assert_allclose(sequence_logps(logps, loss_mask, average=True), [-1.5])
    g = jax.grad(lambda x: sequence_logps(x, loss_mask, average=True).sum())(logps)
    np.testing.assert_array_equal(g, [[0, 0.5, 0.5, 0, 0]])  # finite, zero at masked slots
    empty = jnp.zeros((1, 5), bool)
    assert float(sequence_logps(logps, empty, average=True)[0]) == 0.0
    assert np.isfinite(jax.grad(lambda x: sequence_logps(x, empty, average=True).sum())(logps)).all()


def test_chunked_logps_gradient_matches_unchunked():
    """Backward through the checkpointed chunks equals the plain gradient."""
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 8))
    w = jax.random.normal(jax.random.PRNGKey(3), (8, 11))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 7), 0, 11)

    def plain(w):
        lp = jax.nn.log_softmax(h @ w, axis=-1)[:, :-1]
        return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1).sum()

    def chunked(w):
        return logps_from_hidden(lambda x: x @ w, h, tokens, chunk_size=3).sum()

    np.testing.assert_allclose(chunked(w), plain(w), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(chunked)(w), jax.grad(plain)(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-30])
def test_untruncated_logps_equal_process_logits_in_value_and_gradient(temperature):
    """Without top-k/top-p, `target_logps` takes z_y - logsumexp(z) instead of
    the whole log-softmax: same value and gradient as picking the target from
    `process_logits`, also for a tiny temperature (finite, greedy-like)."""
    h = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 8)) * 4.0   # logits of size ~±40
    w = jax.random.normal(jax.random.PRNGKey(6), (8, 13))
    tgt = jax.random.randint(jax.random.PRNGKey(7), (2, 6), 0, 13)
    cot = jax.random.normal(jax.random.PRNGKey(8), (2, 6))

    def picked(w):
        lp = process_logits(h @ w, temperature)
        return jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0]

    fast = lambda w: target_logps(lambda x: x @ w, h, tgt, temperature=temperature, chunk_size=4)
    got, want = fast(w), picked(w)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 if temperature < 1e-3 else 1e-5)
    g_fast = jax.grad(lambda w: jnp.sum(cot * fast(w)))(w)
    g_full = jax.grad(lambda w: jnp.sum(cot * picked(w)))(w)
    np.testing.assert_allclose(g_fast, g_full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        target_logps(lambda x: x @ w, h, tgt, temperature=0.0)


def test_any_id_in_masked_slots_changes_nothing(rm_and_params):
    """pad_id = vocab_size (or -1) at masked slots must not reach real positions."""
    rm, params = rm_and_params
    rows = [[3, 4, 5], [6, 7, 8, 9, 10]]
    tokens, mask = _pad(rows, 6, "left")
    ref = rm.apply({"params": params}, tokens, mask)
    for pad in (CFG.vocab_size, CFG.vocab_size + 100, -1):
        got = rm.apply({"params": params}, np.where(mask, tokens, pad), mask)
        np.testing.assert_array_equal(got, ref)
        logps = token_logps(Decoder(CFG), params["backbone"], np.where(mask, tokens, pad), mask)
        assert np.isfinite(np.asarray(logps)).all()


def test_all_masked_row_has_zero_reward(rm_and_params):
    rm, params = rm_and_params
    tokens = np.array([[3, 4, 5], [1, 2, 3]], np.int32)
    mask = np.array([[True, True, True], [False, False, False]])
    out = np.asarray(rm.apply({"params": params}, tokens, mask))
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.abs(out[0]).sum() > 0


@pytest.mark.parametrize("temperature", [1e-4, 1e-30, 1e-38])
def test_tiny_temperature_is_finite_and_greedy_like(temperature):
    logits = jnp.array([[1.0, 3.0, 2.0, -5.0]])
    logp = process_logits(logits, temperature=temperature)
    assert np.isfinite(np.asarray(logp)).all()
    # All mass on the argmax: log-prob 0 there, effectively -inf elsewhere.
    np.testing.assert_allclose(logp[0, 1], 0.0, atol=1e-6)
    assert float(jnp.max(logp[0, jnp.array([0, 2, 3])])) < -1e3


def test_sequence_logps_never_scores_a_token_that_follows_padding():
    # One left-padded row with no prompt: pad r1 r2 r3. Grid column t scores
    # token t + 1, so r1's log-prob (column 0) comes from the padding slot:
    # with the attention mask it is not counted, 2 + 3 = 5 (mean 2.5);
    # without it, 1 + 2 + 3 = 6.
    logps = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    loss = jnp.array([[False, True, True, True]])
    attention = jnp.array([[False, True, True, True]])
    assert float(sequence_logps(logps, loss)[0]) == 6.0
    assert float(sequence_logps(logps, loss, attention_mask_BT=attention)[0]) == 5.0
    assert float(sequence_logps(logps, loss, average=True, attention_mask_BT=attention)[0]) == 2.5


def test_a_target_outside_the_top_k_stays_in_the_support():
    """Scoring keeps the target token in the top-k / top-p set.

    Logits [3, 2, 1, 0.5, 0], top_k = 2 keeps {3, 2}. Target 0 (inside):
    log p = 3 − log(e³ + e²) = −log(1 + e⁻¹) = −log 1.367879 = −0.313262.
    Target 2 (just outside, as a sampled token can be when the recomputed
    forward rounds differently from the sampler's): scored over the set plus
    itself, {3, 2, 1}: 1 − (3 + log(1 + e⁻¹ + e⁻²)) = −2 − log 1.503215 =
    −2.407606, not −1e30. With top_p = 0.6 the kept set is {3} (p = 0.616),
    and target 1 gives 2 − (3 + log(1 + e⁻¹)) = −1.313262.
    """
    logits = jnp.array([[[3.0, 2.0, 1.0, 0.5, 0.0]] * 3])  # [1, 3, V]: 3 positions
    identity = lambda h: h  # the "hidden states" are the logits
    lp = target_logps(identity, logits, jnp.array([[0, 2, 4]]), top_k=2)
    np.testing.assert_allclose(lp[0, :2], [-0.313262, -2.407606], atol=1e-5)
    # Target 4 too: {3, 2, 0}: 0 − (3 + log(1 + e⁻¹ + e⁻³)) = −3 − log 1.417666 = −3.349006.
    np.testing.assert_allclose(lp[0, 2], -3.349006, atol=1e-5)
    lp = target_logps(identity, logits, jnp.array([[0, 1, 0]]), top_p=0.6)
    np.testing.assert_allclose(lp[0, :2], [0.0, -1.313262], atol=1e-5)
    # The sampler's own distribution is unchanged: the outside token has -1e30 there.
    assert process_logits(logits[0, 0], top_k=2)[2] < -1e29


def test_bfloat16_recomputed_logps_of_top_k_samples_are_finite():
    """A bfloat16 policy sampled with top-k / top-p: the recomputed log-prob
    of every sampled token is finite and near the sampler's (a reviewer
    found tokens on the top-k boundary recomputed as −1e30)."""
    from jaxreward.models.scoring import shift_mask, token_logps
    from jaxreward.sampling.sampler import generate
    T, V = 6, 64
    toks = jax.random.randint(jax.random.PRNGKey(1), (4, T), 1, V)
    mask = jnp.arange(T)[None] >= T - jnp.asarray([3, 5, 1, 6])[:, None]
    prompts = jnp.where(mask, toks, 0).astype(jnp.int32)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64, dtype="bfloat16")
    model = Decoder(cfg)
    params = jax.tree.map(lambda x: x * 5.0, unbox(model.init(jax.random.PRNGKey(0),
                                                              jnp.zeros((1, 4), jnp.int32))["params"]))
    for kw in (dict(top_k=5), dict(top_p=0.8)):
        out = generate(model, params, prompts, mask, rng=jax.random.PRNGKey(3), max_new_tokens=7,
                       num_samples=3, stop_ids=(7,), pad_id=63, **kw)
        s = out.sequences()
        lp = token_logps(model, params, s.tokens_RL, s.attention_mask_RL, s.positions_RL, **kw)
        scored = np.asarray(shift_mask(s.loss_mask_RL))
        gap = np.abs(np.asarray(lp) - np.asarray(s.sample_logps_RL))[scored]
        assert gap.max() < 2.0, (kw, gap.max())  # bfloat16 rounding, never −1e30
