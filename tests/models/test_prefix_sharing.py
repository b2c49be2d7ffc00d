"""Prefix sharing: a prompt encoded once for several continuations gives the
log-probs of encoding each continuation alone (DPO pairs and rollout groups)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.errors import UserError
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.models.heads import ValueModel, group_values
from jaxreward.models.scoring import branch_logps, group_token_logps, pack_groups, token_logps, unpack_groups
from jaxreward.sampling.sampler import generate
from jaxreward.train import preference as pref
from jaxreward.train.step import unbox

CFG = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, rope_theta=1000.0, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model_and_params():
    model = Decoder(CFG)
    return model, unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])


def _pairs(prompts, chosen, rejected, T, side):
    """Pair arrays in the data pipeline's layout (prompt then response, one side's padding)."""
    out = {}
    for name, responses in (("chosen", chosen), ("rejected", rejected)):
        tok = np.zeros((len(prompts), T), np.int32)
        att = np.zeros((len(prompts), T), bool)
        loss = np.zeros_like(att)
        pos = np.zeros_like(tok)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            n = len(p) + len(r)
            lo = 0 if side == "right" else T - n
            tok[i, lo:lo + n] = p + r
            att[i, lo:lo + n] = True
            loss[i, lo + len(p):lo + n] = True
            pos[i, lo:lo + n] = np.arange(n)
        out.update({f"{name}_tokens": tok, f"{name}_attention_mask": att,
                    f"{name}_loss_mask": loss, f"{name}_positions": pos})
    return out


def _random_pairs(seed, n=6):
    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: [rng.integers(1, 50, rng.integers(lo, hi)).tolist() for _ in range(n)]
    return draw(1, 9), draw(1, 11), draw(1, 11)


@pytest.mark.parametrize("windowed", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_pair_logps_equal_two_rows_per_pair(model_and_params, side, windowed):
    """Also with the output layer run over the responses' window only
    (`response_length`): the prompt columns it skips are never read."""
    model, params = model_and_params
    prompts, chosen, rejected = _random_pairs(0)
    prompts[0] = []  # no prompt: each response's first token has no predictor
    batch = _pairs(prompts, chosen, rejected, 24, side)
    S = pref.shared_prefix_length({"train": batch})
    W = pref.shared_response_length({"train": batch}, multiple=1) if windowed else 0
    assert W == 0 or W < S   # a real window: some columns are not scored
    plain = pref.pair_logps(pref.decoder_logps_fn(model), params, batch)
    packed = pref.pair_logps(pref.decoder_logps_fn(model, S, W), params, batch)
    for a, b in zip(plain, packed):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # Lengths count each response's tokens (but the first token of a row is never scored).
    np.testing.assert_array_equal(np.asarray(packed[2]), [len(c) - (i == 0) for i, c in enumerate(chosen)])
    np.testing.assert_array_equal(np.asarray(packed[3]), [len(r) - (i == 0) for i, r in enumerate(rejected)])
    # Padding side and amount, and a longer packed row, change nothing.
    wider = _pairs(prompts, chosen, rejected, 31, "left" if side == "right" else "right")
    again = pref.pair_logps(pref.decoder_logps_fn(model, S + 16, W), params, wider)
    for a, b in zip(packed, again):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("windowed", [False, True])
def test_packed_gradients_equal_two_rows_per_pair(model_and_params, windowed):
    model, params = model_and_params
    batch = _pairs(*_random_pairs(1, n=4), 24, "right")
    S = pref.shared_prefix_length({"train": batch})
    W = pref.shared_response_length({"train": batch}, multiple=1) if windowed else 0

    def objective(fn, p):  # a DPO-like mix of both sides, so both gradients count
        c, r, _, _ = pref.pair_logps(fn, p, batch)
        return jnp.sum(c - 0.5 * r)
    plain, packed = (jax.tree.leaves(jax.grad(lambda p: objective(fn, p))(params))
                     for fn in (pref.decoder_logps_fn(model), pref.decoder_logps_fn(model, S, W)))
    for a, b in zip(plain, packed):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_rejected_response_never_sees_the_chosen_one(model_and_params):
    model, params = model_and_params
    prompts, chosen, rejected = _random_pairs(2, n=3)
    S = 32
    fn = pref.decoder_logps_fn(model, S)
    base = pref.pair_logps(fn, params, _pairs(prompts, chosen, rejected, 24, "right"))
    other = [[(t + 7) % 49 + 1 for t in c] for c in chosen]  # same lengths, other tokens
    moved = pref.pair_logps(fn, params, _pairs(prompts, other, rejected, 24, "right"))
    np.testing.assert_allclose(np.asarray(moved[1]), np.asarray(base[1]), rtol=1e-6)
    assert np.all(np.abs(np.asarray(moved[0]) - np.asarray(base[0])) > 1e-3)


def test_packed_row_layout_by_hand():
    # Prompt [11, 12], chosen [21, 22, 23], rejected [31]: the row is
    # 11 12 21 22 23 31 pad pad; positions 0 1 2 3 4 2; branches 0 0 1 1 1 2.
    # Token 31 (column 5) is scored from the prompt's last token (column 1).
    batch = _pairs([[11, 12]], [[21, 22, 23]], [[31]], 6, "left")
    p = jax.tree.map(np.asarray, pref.pack_pairs(batch, 8))
    np.testing.assert_array_equal(p["tokens"][0], [11, 12, 21, 22, 23, 31, 0, 0])
    np.testing.assert_array_equal(p["positions"][0], [0, 1, 2, 3, 4, 2, 0, 0])
    np.testing.assert_array_equal(p["branch_ids"][0], [0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(p["attention_mask"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    assert int(p["prefix_last"][0]) == 1
    np.testing.assert_array_equal(p["chosen"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(p["rejected"][0], [0, 0, 0, 0, 0, 1, 0, 0])


def test_a_pair_whose_responses_overrun_the_window_gives_nan(model_and_params):
    """Responses of 3 + 1 = 4 tokens (pair 0) and 1 + 2 = 3 (pair 1), so
    `shared_response_length` is 4 (8 rounded). A window of 3 cannot hold
    pair 0's: NaN, never a sum that silently lost a token; pair 1 keeps the
    unwindowed value."""
    model, params = model_and_params
    batch = _pairs([[11, 12], [5]], [[21, 22, 23], [6]], [[31], [7, 8]], 6, "right")
    assert pref.shared_response_length({"train": batch}, multiple=1) == 4
    assert pref.shared_response_length({"train": batch}) == 8
    p = jax.tree.map(np.asarray, pref.pack_pairs(batch, 8))
    np.testing.assert_array_equal(p["response_start"], [2, 1])
    np.testing.assert_array_equal(p["response_tokens"], [4, 3])
    c, r, _, _ = map(np.asarray, pref.pair_logps(pref.decoder_logps_fn(model, 8, 3), params, batch))
    assert np.isnan(c[0]) and np.isnan(r[0])
    full = np.asarray(pref.pair_logps(pref.decoder_logps_fn(model, 8), params, batch))
    np.testing.assert_allclose([c[1], r[1]], full[:2, 1], rtol=1e-6)
    # The gradient is NaN too, even where the loss masks pair 0 out: a step
    # cannot quietly train on pair 1 alone.
    grads = jax.grad(lambda q: sum(jnp.where(jnp.array([False, True]), x, 0.0).sum() for x in pref.pair_logps(
        pref.decoder_logps_fn(model, 8, 3), q, batch)[:2]))(params)
    assert all(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(grads))


def test_branch_logps_refuses_a_window_start_without_a_window(model_and_params):
    model, params = model_and_params
    batch = _pairs([[11, 12]], [[21, 22, 23]], [[31]], 6, "right")
    p = pref.pack_pairs(batch, 8)
    args = (model, params, p["tokens"], p["attention_mask"], p["positions"], p["branch_ids"], p["prefix_last"])
    for window in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"window_start_B needs window, the static number of columns"):
            branch_logps(*args, window_start_B=p["response_start"], window=window)
    ok = branch_logps(*args, window_start_B=p["response_start"], window=np.int64(4))
    np.testing.assert_allclose(np.asarray(ok)[0, 2:6], np.asarray(branch_logps(*args))[0, 2:6],
                               rtol=1e-6)


def test_shared_prefix_length_and_refusals():
    # Totals: (2 + 3 + 1) = 6 and (1 + 1 + 4) = 6 -> 6, rounded up to 8.
    batch = _pairs([[11, 12], [5]], [[21, 22, 23], [6]], [[31], [7, 8, 9, 10]], 6, "right")
    assert pref.shared_prefix_length({"train": batch}) == 8
    assert pref.shared_prefix_length({"train": batch}, multiple=1) == 6
    bad = dict(batch)
    bad["rejected_tokens"] = batch["rejected_tokens"].copy()
    bad["rejected_tokens"][1, 0] = 9  # pair 1's rejected side has another prompt
    with pytest.raises(UserError, match=r"eval pair 1: chosen and rejected have different prompt"):
        pref.shared_prefix_length({"train": batch, "eval": bad})
    holes = dict(batch)
    holes["chosen_loss_mask"] = batch["chosen_loss_mask"].copy()
    holes["chosen_loss_mask"][0, 3] = False  # a prompt token inside the chosen response
    with pytest.raises(UserError, match=r"train pair 0: the chosen response is not one block"):
        pref.shared_prefix_length({"train": holes})
    shifted = dict(batch)
    shifted["rejected_positions"] = batch["rejected_positions"] + 1  # prompt at other positions
    with pytest.raises(UserError, match=r"train pair 0: chosen and rejected give the prompt different "
                                        r"positions"):
        pref.shared_prefix_length({"train": shifted})


def test_a_pair_longer_than_the_packed_length_gives_nan(model_and_params):
    """A packed length of 5 fits pair 1 (1 + 1 + 2 = 4 tokens) but would cut
    pair 0 (2 + 3 + 1 = 6): pair 0 gets NaN, never the log-probs of a cut
    pair, and pair 1 keeps its value."""
    model, params = model_and_params
    batch = _pairs([[11, 12], [5]], [[21, 22, 23], [6]], [[31], [7, 8]], 6, "right")
    # Totals: pair 0: 2 + 3 + 1 = 6; pair 1: 1 + 1 + 2 = 4.
    np.testing.assert_array_equal(np.asarray(pref.pack_pairs(batch, 5)["fits"]), [False, True])
    c, r, lc, lr = map(np.asarray, pref.pair_logps(pref.decoder_logps_fn(model, 5), params, batch))
    assert np.isnan(c[0]) and np.isnan(r[0])
    assert np.isfinite(c[1]) and np.isfinite(r[1])
    full = pref.pair_logps(pref.decoder_logps_fn(model, 8), params, batch)
    np.testing.assert_allclose([c[1], r[1]], np.asarray(full)[:2, 1], rtol=1e-6)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5)])
def test_group_logps_equal_one_row_per_sample(model_and_params, kw):
    model, params = model_and_params
    rng = np.random.default_rng(3)
    prompts = rng.integers(1, 50, (3, 7)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    mask[0, :3] = False  # left padding
    mask[1, 5:] = False  # right padding (the sampler left-aligns it)
    out = generate(model, params, prompts, mask, rng=jax.random.PRNGKey(1), max_new_tokens=9,
                   num_samples=4, stop_ids=(5, 7, 9), **kw)
    s = out.sequences()
    assert np.asarray(out.lengths_R).min() < 9  # some rows stopped early: padded responses
    plain = np.asarray(token_logps(model, params, s.tokens_RL, s.attention_mask_RL, s.positions_RL, **kw))
    grouped = np.asarray(group_token_logps(model, params, s.tokens_RL, s.attention_mask_RL,
                                           s.positions_RL, s.prompt_length, 4, **kw))
    P = s.prompt_length
    np.testing.assert_allclose(grouped[:, P - 1:], plain[:, P - 1:], rtol=1e-5, atol=1e-5)
    assert np.all(grouped[:, :P - 1] == 0.0)
    # And they are the sampler's own log-probs of the drawn tokens.
    np.testing.assert_allclose(grouped, np.asarray(s.sample_logps_RL), rtol=1e-4, atol=1e-4)


def _sampled_groups(model, params, G=4):
    """Rollout rows of 3 prompts × G samples: left-padded prompts (one of them
    right-padded on input, which the sampler left-aligns) and stop tokens, so
    some responses end early and are padded."""
    rng = np.random.default_rng(3)
    prompts = rng.integers(1, 50, (3, 7)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    mask[0, :3] = False
    mask[1, 5:] = False
    out = generate(model, params, prompts, mask, rng=jax.random.PRNGKey(1), max_new_tokens=9,
                   num_samples=G, stop_ids=(5, 7, 9))
    assert np.asarray(out.lengths_R).min() < 9
    return out.sequences()


def test_pack_groups_by_hand_and_unpack_inverts_it():
    # 2 groups of G = 2 rows, P = 2, M = 2: row r = [prompt of its group | 100·(r+1)+1, 100·(r+1)+2].
    tokens = np.array([[1, 2, 101, 102], [1, 2, 201, 202], [11, 12, 301, 302], [11, 12, 401, 402]], np.int32)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False                                   # group 0's prompt is left-padded by one
    mask[1, 0] = False
    mask[3, 3] = False                                   # row 3's response stopped after one token
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    packed = pack_groups(tokens, mask, positions, 2, 2)
    # Masked slots hold 0; positions restart after the prompt for each response.
    np.testing.assert_array_equal(packed["tokens"], [[0, 2, 101, 102, 201, 202], [11, 12, 301, 302, 401, 0]])
    np.testing.assert_array_equal(packed["attention_mask"], [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(packed["positions"], [[0, 0, 1, 2, 1, 2], [0, 1, 2, 3, 2, 0]])
    np.testing.assert_array_equal(packed["branch_ids"], [[0, 0, 1, 1, 2, 2]] * 2)
    np.testing.assert_array_equal(packed["prefix_last"], [1, 1])
    x = np.arange(4 * 4).reshape(4, 4)
    x[1, :2] = x[0, :2]                                  # rows of a group share their prompt columns
    x[3, :2] = x[2, :2]
    np.testing.assert_array_equal(unpack_groups(pack_groups(x, np.ones((4, 4), bool), x, 2, 2)["tokens"], 2, 2), x)


def test_group_values_equal_one_row_per_sample(model_and_params):
    """The critic on packed groups gives each row's own values (and their
    gradients) wherever the row is attended; 0 at padding, as unpacked."""
    model, params = model_and_params
    s = _sampled_groups(model, params)
    value_model = ValueModel(CFG)
    vparams = unbox(value_model.init(jax.random.PRNGKey(2), jnp.zeros((1, 2), jnp.int32))["params"])
    vparams["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(3), (CFG.hidden_size, 1))  # not 0
    vparams = {"backbone": params, "head": vparams["head"]}
    P = s.prompt_length
    plain_fn = lambda p: value_model.apply({"params": p}, s.tokens_RL, s.attention_mask_RL, s.positions_RL)
    group_fn = lambda p: group_values(value_model, p, s.tokens_RL, s.attention_mask_RL, s.positions_RL, P, 4)
    plain, grouped = np.asarray(plain_fn(vparams)), np.asarray(group_fn(vparams))
    attended = np.asarray(s.attention_mask_RL)
    assert np.abs(plain[attended]).min() > 0 and np.all(plain[~attended] == 0)
    np.testing.assert_allclose(grouped, plain, rtol=1e-5, atol=1e-6)
    # Gradients of a loss over the response states (the PPO value loss reads columns >= P − 1).
    w = np.where(attended & (np.arange(attended.shape[1]) >= P - 1), 1.0, 0.0).astype(np.float32)
    g_plain = jax.grad(lambda p: jnp.sum(jnp.square(plain_fn(p)) * w))(vparams)
    g_group = jax.grad(lambda p: jnp.sum(jnp.square(group_fn(p)) * w))(vparams)
    for a, b in zip(jax.tree.leaves(g_group), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_branch_ids_need_a_cache_free_forward(model_and_params):
    model, params = model_and_params
    from jaxreward.models.llama import KVCache
    tokens = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="cache-free"):
        model.apply({"params": params}, tokens, None, None, KVCache.init(CFG, 1, 4),
                    jnp.zeros((1, 3), jnp.int32), method=model.hidden_states)
    # One branch over the whole row is the plain causal forward, token-aligned.
    lp = branch_logps(model, params, tokens, jnp.ones((1, 3), bool), jnp.arange(3)[None],
                      jnp.zeros((1, 3), jnp.int32), jnp.array([0]))
    plain = token_logps(model, params, tokens, jnp.ones((1, 3), bool))
    np.testing.assert_allclose(np.asarray(lp)[0], [0.0, *np.asarray(plain)[0, :2]], rtol=1e-6)


def test_identical_responses_stay_an_exact_tie(model_and_params, monkeypatch):
    """A pair whose two sides are the same sequence scores both sides alike.

    Packed, the rejected copy sits at other columns than the chosen one, and
    on SmolLM2 the rounding there moved its log-prob by ~1e-5 nats, so the
    tie (a wrong pair for the strict accuracy) became a win or a loss. To make that drift certain here, the
    packed scorer adds 1e-3 × column to every log-prob: an identical pair
    must still come out equal, and a different pair must keep the drift.
    """
    model, params = model_and_params
    real = pref.branch_logps
    drift = lambda *a, **k: real(*a, **k) + 1e-3 * jnp.arange(a[2].shape[1])[None]
    monkeypatch.setattr(pref, "branch_logps", drift)
    prompts, chosen, rejected = [[3, 4], [5]], [[7, 8, 9], [6, 6]], [[7, 8, 9], [6, 2]]
    for side in ("right", "left"):
        batch = _pairs(prompts, chosen, rejected, 8, side)
        fn = pref.decoder_logps_fn(model, pref.shared_prefix_length({"train": batch}))
        c, r, lc, lr = map(np.asarray, pref.pair_logps(fn, params, batch))
        assert c[0] == r[0] and lc[0] == lr[0] == 3           # the identical pair: exact tie
        assert abs(c[1] - r[1]) > 1e-4 and lc[1] == lr[1] == 2  # the other pair is untouched
        np.testing.assert_array_equal(np.asarray(pref.identical_sides(batch)), [True, False])
