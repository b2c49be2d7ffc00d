"""Tests for the KV-cache sampler against the training path and invariances."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models import scoring
from jaxreward.sampling import sampler
from jaxreward.sampling.sampler import generate, sample_keys
from tests.sampling.conftest import make_prompts

LENGTHS = [3, 5, 1, 6]  # mixed prompt lengths, T = 6
M = 8
# One shared static configuration, so most tests reuse one compilation.
BASE = dict(max_new_tokens=M, temperature=1.0, pad_id=63)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("temperature", "top_k", "top_p"))
def _token_logps(model, params, tokens, mask, positions, **kw):
    return scoring.token_logps(model, params, tokens, mask, positions, **kw)


def _training_logps(model, params, out, **kw):
    """Training-path log-probs of the sampled tokens, `[R, M]`, via token_logps."""
    batch = out.sequences()
    lp_BL = _token_logps(model, params, batch.tokens_RL, batch.attention_mask_RL,
                         batch.positions_RL, **kw)
    T = batch.prompt_length
    return np.asarray(lp_BL[:, T - 1:T - 1 + out.tokens_RM.shape[1]]), batch


def _check_against_training_path(model, params, out, **kw):
    lp, batch = _training_logps(model, params, out, **kw)
    mask = np.asarray(out.mask_RM)
    # The grid copy in the batch is the same numbers at the shifted loss mask.
    grid_mask = np.asarray(scoring.shift_mask(batch.loss_mask_RL))
    np.testing.assert_array_equal(np.asarray(batch.sample_logps_RL)[grid_mask],
                                  np.asarray(out.logps_RM)[mask])
    assert np.all(lp[mask] > -1e29), "a drawn token is outside the processed support"
    np.testing.assert_allclose(np.asarray(out.logps_RM)[mask], lp[mask], atol=2e-5, rtol=0)
    assert np.all(np.asarray(out.logps_RM)[~mask] == 0.0)


def test_logps_match_training_path_top_p_with_stops(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    # Stop ids chosen (with this fixed rng) so that some rows stop early and
    # others run to M; asserted below so the test keeps covering both cases.
    out = generate(model, params, tokens, mask, rng=jax.random.key(3), max_new_tokens=M,
                   temperature=0.7, top_p=0.9, stop_ids=(7, 11, 20, 33, 45))
    lengths = np.asarray(out.lengths_R)
    assert (lengths < M).any() and (lengths == M).any(), lengths
    _check_against_training_path(model, params, out, temperature=0.7, top_p=0.9)
    # top_p actually truncated something: some drawn token's processed log-prob
    # differs from its untruncated temperature-0.7 log-prob.
    plain, _ = _training_logps(model, params, out, temperature=0.7)
    m = np.asarray(out.mask_RM)
    assert np.abs(plain[m] - np.asarray(out.logps_RM)[m]).max() > 1e-3


def test_logps_match_training_path_top_k(model, params):
    tokens, mask = make_prompts(LENGTHS, 6, left=False)
    out = generate(model, params, tokens, mask, rng=jax.random.key(4), max_new_tokens=M,
                   temperature=1.3, top_k=5)
    # Also checks every drawn token is among the 5 largest logits (its
    # training-path log-prob is finite).
    _check_against_training_path(model, params, out, temperature=1.3, top_k=5)


def test_greedy_matches_naive_full_forward_loop(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    out = generate(model, params, tokens, mask, rng=jax.random.key(0), max_new_tokens=M,
                   temperature=0.0)
    # Naive reference: a full forward (no cache) over the whole sequence at
    # every step. The sequence buffer has a fixed shape [B, 6 + M] (one
    # compilation); columns not generated yet are masked out and, being later
    # in a causal model, cannot affect the logits read at column 6 + t - 1.
    forward = jax.jit(lambda p, s, m: model.apply({"params": p}, s, m))
    seq = jnp.concatenate([tokens, jnp.zeros((4, M), jnp.int32)], axis=1)
    seq_mask = jnp.concatenate([mask, jnp.zeros((4, M), bool)], axis=1)
    for t in range(M):
        logits = forward(params, seq, seq_mask)
        nxt = jnp.argmax(logits[:, 6 + t - 1], axis=-1).astype(jnp.int32)
        seq = seq.at[:, 6 + t].set(nxt)
        seq_mask = seq_mask.at[:, 6 + t].set(True)
    np.testing.assert_array_equal(np.asarray(out.tokens_RM), np.asarray(seq[:, 6:]))
    assert len(np.unique(np.asarray(out.tokens_RM))) > 3  # not a degenerate model
    # Greedy reports log-probs under temperature 1 (documented choice).
    _check_against_training_path(model, params, out, temperature=1.0)


def test_left_right_and_irregular_padding_give_identical_samples(model, params):
    left, lmask = make_prompts(LENGTHS, 6, left=True)
    right, rmask = make_prompts(LENGTHS, 6, left=False)
    # Same real tokens in the same order, whatever the padding side.
    real = [np.asarray(left[b])[np.asarray(lmask[b])] for b in range(4)]
    right = jnp.asarray(np.stack([np.r_[r, np.full(6 - len(r), 9)] for r in real]), jnp.int32)
    # Irregular: padding on both sides where the row has room (pad id 5, not 0,
    # to show padding ids don't matter).
    irr_mask = np.zeros((4, 6), bool)
    irr = np.full((4, 6), 5, np.int32)
    for b, r in enumerate(real):
        start = min(1, 6 - len(r))
        irr[b, start:start + len(r)] = r
        irr_mask[b, start:start + len(r)] = True
    assert irr_mask[0, 0] == 0 and irr_mask[0, -1] == 0
    kw = dict(rng=jax.random.key(5), **BASE)
    a = generate(model, params, left, lmask, **kw)
    b = generate(model, params, right, rmask, **kw)
    c = generate(model, params, jnp.asarray(irr), jnp.asarray(irr_mask), **kw)
    # The left-aligned inputs are identical, so is every number.
    for other in (b, c):
        np.testing.assert_array_equal(np.asarray(a.tokens_RM), np.asarray(other.tokens_RM))
        np.testing.assert_array_equal(np.asarray(a.logps_RM), np.asarray(other.logps_RM))
    # The returned prompts are left-aligned.
    np.testing.assert_array_equal(np.asarray(b.prompt_mask_RP), np.asarray(lmask))


def test_samples_do_not_depend_on_batch_companions(model, params):
    tokens, mask = make_prompts(LENGTHS, 6, seed=1)
    others, omask = make_prompts([6, 2, 4, 2], 6, seed=2)
    # Same prompt in row 1, different companions in rows 0, 2, 3.
    mixed = others.at[1].set(tokens[1])
    mixed_mask = omask.at[1].set(mask[1])
    kw = dict(rng=jax.random.key(6), **BASE)
    a = generate(model, params, tokens, mask, **kw)
    b = generate(model, params, mixed, mixed_mask, **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens_RM[1]), np.asarray(b.tokens_RM[1]))
    assert not np.array_equal(np.asarray(a.tokens_RM[0]), np.asarray(b.tokens_RM[0]))
    # With explicit per-sample keys, permuting the batch permutes the samples.
    keys = sample_keys(jax.random.key(6), 4, 1)
    perm = np.array([2, 0, 3, 1])
    c = generate(model, params, tokens[perm], mask[perm], rng=keys[perm], **BASE)
    np.testing.assert_array_equal(np.asarray(c.tokens_RM), np.asarray(a.tokens_RM)[perm])


@pytest.mark.parametrize("n_new", [0, 1, 2])
def test_short_outputs_are_prefixes(model, params, n_new):
    tokens, mask = make_prompts(LENGTHS, 6)
    long = generate(model, params, tokens, mask, rng=jax.random.key(7), **BASE)
    out = generate(model, params, tokens, mask, rng=jax.random.key(7),
                   **(BASE | dict(max_new_tokens=n_new)))
    assert out.tokens_RM.shape == (4, n_new) and out.tokens_RM.dtype == jnp.int32
    assert out.logps_RM.shape == (4, n_new) and out.logps_RM.dtype == jnp.float32
    assert out.mask_RM.shape == (4, n_new) and out.mask_RM.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(out.lengths_R), [n_new] * 4)
    np.testing.assert_array_equal(np.asarray(out.tokens_RM), np.asarray(long.tokens_RM[:, :n_new]))
    # Different cache lengths: equal up to float rounding.
    np.testing.assert_allclose(np.asarray(out.logps_RM), np.asarray(long.logps_RM[:, :n_new]),
                               atol=2e-5)
    batch = out.sequences()
    assert batch.tokens_RL.shape == (4, 6 + n_new)
    np.testing.assert_array_equal(np.asarray(batch.loss_mask_RL[:, 6:]), np.ones((4, n_new), bool))
    assert not np.asarray(batch.loss_mask_RL[:, :6]).any()


def test_stop_tokens_truncate_rows(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    kw = dict(rng=jax.random.key(8), **BASE)
    free = np.asarray(generate(model, params, tokens, mask, **kw).tokens_RM)
    # Stop on two ids that appear in some rows of the free run (picked from it).
    stop = (int(free[0, 2]), int(free[2, 4]))
    out = generate(model, params, tokens, mask, stop_ids=stop, **kw)
    toks, m, lengths = map(np.asarray, (out.tokens_RM, out.mask_RM, out.lengths_R))
    for b in range(4):
        hits = [t for t in range(M) if free[b, t] in stop]
        want = hits[0] + 1 if hits else M  # the stop token counts
        assert lengths[b] == want
        np.testing.assert_array_equal(toks[b, :want], free[b, :want])
        np.testing.assert_array_equal(m[b], np.arange(M) < want)
        assert np.all(toks[b, want:] == 63)
    assert (lengths < M).any() and (lengths <= 3).any()
    # Every row stops at its first token: the loop exits early, all lengths 1.
    all_stop = generate(model, params, tokens, mask, stop_ids=tuple(range(64)), **kw)
    np.testing.assert_array_equal(np.asarray(all_stop.lengths_R), [1] * 4)
    np.testing.assert_array_equal(np.asarray(all_stop.tokens_RM[:, 0]), free[:, 0])
    assert np.all(np.asarray(all_stop.tokens_RM[:, 1:]) == 63)
    assert np.all(np.asarray(all_stop.logps_RM[:, 1:]) == 0.0)


def test_num_samples_equals_repeated_prompts(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    N = 3
    kw = BASE | dict(stop_ids=(7, 11))
    shared = generate(model, params, tokens, mask, rng=jax.random.key(9), num_samples=N, **kw)
    keys = sample_keys(jax.random.key(9), 4, N).reshape(4 * N, 1)
    rep = generate(model, params, jnp.repeat(tokens, N, 0), jnp.repeat(mask, N, 0), rng=keys,
                   **kw)
    assert shared.tokens_RM.shape == (4 * N, M)
    for f in ("tokens_RM", "mask_RM", "lengths_R"):
        np.testing.assert_array_equal(np.asarray(getattr(shared, f)), np.asarray(getattr(rep, f)))
    np.testing.assert_allclose(np.asarray(shared.logps_RM), np.asarray(rep.logps_RM), atol=1e-5)
    # The N samples of a prompt are different draws.
    t = np.asarray(shared.tokens_RM).reshape(4, N, M)
    assert all(len({tuple(t[b, j]) for j in range(N)}) > 1 for b in range(4))
    _check_against_training_path(model, params, shared, temperature=1.0)


def test_reproducible_and_compiled_once(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    kw = BASE
    a = generate(model, params, tokens, mask, rng=jax.random.key(10), **kw)
    traces = sampler._TRACE_COUNT[0]
    b = generate(model, params, tokens, mask, rng=jax.random.key(10), **kw)
    other_params = jax.tree.map(lambda x: x * 1.01, params)
    tokens2, mask2 = make_prompts([1, 2, 3, 4], 6, seed=3)
    d = generate(model, other_params, tokens2, mask2, rng=jax.random.key(11), **kw)
    c = generate(model, params, tokens, mask, rng=jax.random.key(11), **kw)
    # New values of params, prompts and rng: no re-trace (hence no re-compile).
    assert sampler._TRACE_COUNT[0] == traces
    assert not np.array_equal(np.asarray(c.tokens_RM), np.asarray(d.tokens_RM))
    np.testing.assert_array_equal(np.asarray(a.tokens_RM), np.asarray(b.tokens_RM))
    assert not np.array_equal(np.asarray(a.tokens_RM), np.asarray(c.tokens_RM))


def test_raw_and_typed_keys_agree(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    kw = BASE
    a = generate(model, params, tokens, mask, rng=jax.random.PRNGKey(12), **kw)
    b = generate(model, params, tokens, mask,
                 rng=jax.random.wrap_key_data(jax.random.PRNGKey(12)), **kw)
    np.testing.assert_array_equal(np.asarray(a.tokens_RM), np.asarray(b.tokens_RM))


@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=-1), dict(temperature=-0.5), dict(temperature=float("nan")),
    dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(num_samples=0),
    dict(max_new_tokens=59),  # 6 + 59 > max_position_embeddings 64
    dict(rng=jax.random.split(jax.random.key(0), 3)),  # neither one key nor [B, N]
])
def test_bad_arguments_raise(model, params, kw):
    tokens, mask = make_prompts(LENGTHS, 6)
    args = dict(rng=jax.random.key(0), max_new_tokens=2) | kw
    with pytest.raises(ValueError):
        generate(model, params, tokens, mask, **args)


@pytest.mark.parametrize("name, value", [("num_samples", 2.0), ("num_samples", True), ("max_new_tokens", 2.0),
                                         ("top_k", 1.5), ("top_k", False)])
def test_integer_arguments_must_be_integers_named(model, params, name, value):
    """`generate(num_samples=2.0)` was accepted (and max_new_tokens=2.0, or a
    bool): an integer argument is now an int, refused naming the argument."""
    tokens, mask = make_prompts(LENGTHS, 6)
    args = dict(rng=jax.random.key(0), max_new_tokens=2) | {name: value}
    with pytest.raises(ValueError, match=f"{name} must be an integer >= ., got {value!r}"):
        generate(model, params, tokens, mask, **args)


@pytest.mark.parametrize("V,block", [(5, 256), (10, 4), (1000, 64)])
def test_two_level_sample_frequencies_and_zero_mass(V, block):
    """P(token) = P(block) * p_i / P(block) = p_i: check empirical frequencies."""
    from jaxreward.sampling.sampler import two_level_sample
    rng = np.random.default_rng(V)
    p = rng.dirichlet(np.full(V, 0.3))
    p[rng.random(V) < 0.3] = 0.0  # removed tokens (top-k/top-p)
    p[int(np.argmax(p))] += 1e-3
    p /= p.sum()
    logp = jnp.asarray(np.where(p > 0, np.log(np.maximum(p, 1e-300)), -1e30), jnp.float32)
    n = 40_000
    keys = jax.random.split(jax.random.PRNGKey(V), n)
    tok = np.asarray(jax.jit(functools.partial(two_level_sample, block=block))(
        keys, jnp.tile(logp, (n, 1))))
    freq = np.bincount(tok, minlength=V) / n
    assert freq[p == 0].sum() == 0  # removed tokens are never drawn
    # Binomial std sqrt(p(1-p)/n) <= 0.0025; allow 5 sigma per token.
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-4)
    # Total variation distance, expected ~ sqrt(V / n) / 2 at most.
    assert 0.5 * np.abs(freq - p).sum() < max(0.02, np.sqrt(V / n))


def test_prompts_are_validated(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    m = np.array(mask)
    empty_row = m.copy()
    empty_row[1] = False
    with pytest.raises(ValueError, match="row 1 has no attended token"):
        generate(model, params, tokens, empty_row, rng=jax.random.PRNGKey(0), max_new_tokens=2)
    bad = np.array(tokens)
    b, t = np.argwhere(m)[0]
    bad[b, t] = model.config.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, params, bad, m, rng=jax.random.PRNGKey(0), max_new_tokens=2)
    # Any id at a masked slot is fine, even out of range: same samples.
    padded = np.where(m, np.array(tokens), model.config.vocab_size + 7)
    a = generate(model, params, padded, m, rng=jax.random.PRNGKey(0), max_new_tokens=3)
    b_ = generate(model, params, tokens, m, rng=jax.random.PRNGKey(0), max_new_tokens=3)
    np.testing.assert_array_equal(a.tokens_RM, b_.tokens_RM)
    np.testing.assert_array_equal(a.logps_RM, b_.logps_RM)
