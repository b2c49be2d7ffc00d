"""Tests for best-of-N selection, its reward adapters and the KL bound."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models.heads import RewardModel
from jaxreward.sampling.best_of_n import (best_of_n, best_of_n_kl_bound, proxy_gold_curve, reward_model_fn,
                                          text_reward_fn)
from tests.sampling.conftest import CONFIG, make_prompts

LENGTHS = [3, 5, 1, 6]
KW = dict(max_new_tokens=6, temperature=1.0, pad_id=63)
FAVOURED = 46  # the token the count reward favours (in ~20% of samples here)


def _decode(ids):
    return " ".join(str(i) for i in ids)


def _count_reward(prompt_text, response_text):
    return float(response_text.split().count(str(FAVOURED)))


def test_kl_bound_values():
    # log N - (N - 1) / N:
    #   N = 1: log 1 - 0   = 0
    #   N = 2: log 2 - 1/2 = 0.693147 - 0.5  = 0.193147
    #   N = 4: log 4 - 3/4 = 1.386294 - 0.75 = 0.636294
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(0.1931472, abs=1e-7)
    assert best_of_n_kl_bound(4) == pytest.approx(0.6362944, abs=1e-7)
    with pytest.raises(ValueError):
        best_of_n_kl_bound(0)


def test_argmax_ties_go_to_lowest_index(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    # Per prompt (N = 4): a tie between samples 1 and 3, all equal, a tie
    # between 0 and 2 at -inf-free negatives, a unique max at 3.
    fixed = jnp.asarray([[1., 3., 2., 3.],
                         [5., 5., 5., 5.],
                         [-1., -2., -1., -3.],
                         [0., 0., 0., 0.5]], jnp.float32)
    out = best_of_n(model, params, tokens, mask, lambda batch: fixed.reshape(-1),
                    n=4, rng=jax.random.key(0), **KW)
    np.testing.assert_array_equal(np.asarray(out.best_index_B), [1, 0, 0, 3])
    np.testing.assert_array_equal(np.asarray(out.best_reward_B), [3., 5., -1., 0.5])
    np.testing.assert_array_equal(np.asarray(out.rewards_BN), np.asarray(fixed))
    # `best` holds exactly those rows of `samples`.
    rows = np.arange(4) * 4 + np.array([1, 0, 0, 3])
    np.testing.assert_array_equal(np.asarray(out.best.tokens_RM),
                                  np.asarray(out.samples.tokens_RM)[rows])
    assert out.kl_bound == pytest.approx(math.log(4) - 0.75)


def test_text_reward_picks_the_sample_with_most_favoured_tokens(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    seen = []

    def fn(p, r):
        seen.append((p, r))
        return _count_reward(p, r)

    out = best_of_n(model, params, tokens, mask, text_reward_fn(_decode, fn), n=8,
                    rng=jax.random.key(1), stop_ids=(52,), **KW)
    toks = np.asarray(out.samples.tokens_RM).reshape(4, 8, -1)
    m = np.asarray(out.samples.mask_RM).reshape(4, 8, -1)
    counts = ((toks == FAVOURED) & m).sum(-1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out.rewards_BN), counts)
    assert counts.max() >= 1 and len(np.unique(counts)) > 1  # a non-trivial choice
    np.testing.assert_array_equal(np.asarray(out.best_index_B), counts.argmax(1))
    assert (np.asarray(out.samples.lengths_R) < 6).any()  # stops fired: masks matter
    # The text fn saw the real prompt tokens (no padding) and the masked response.
    p0 = np.asarray(tokens[0])[np.asarray(mask[0])]
    assert seen[0][0] == _decode(p0.tolist())
    assert seen[0][1] == _decode(toks[0, 0][m[0, 0]].tolist())


def test_reward_model_adapter_and_chunking(model, params):
    rm = RewardModel(CONFIG, num_objectives=2)
    rm_params = jax.jit(rm.init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
    tokens, mask = make_prompts(LENGTHS, 6)
    fn = reward_model_fn(rm, rm_params, objective=1)
    out = best_of_n(model, params, tokens, mask, fn, n=4, rng=jax.random.key(3), **KW)
    batch = out.samples.sequences()
    direct = rm.apply({"params": rm_params}, batch.tokens_RL, batch.attention_mask_RL,
                      batch.positions_RL)[:, 1]
    np.testing.assert_allclose(np.asarray(out.rewards_BN).ravel(), np.asarray(direct),
                               atol=1e-5)
    # Chunks of 5 rows (16 = 5 + 5 + 5 + 1, the last padded): same rewards.
    chunked = best_of_n(model, params, tokens, mask, fn, n=4, rng=jax.random.key(3),
                        reward_chunk_size=5, **KW)
    np.testing.assert_allclose(np.asarray(chunked.rewards_BN), np.asarray(out.rewards_BN),
                               atol=1e-5)
    with pytest.raises(ValueError):
        reward_model_fn(rm, rm_params, objective=2)


def test_mean_best_reward_grows_with_n(model, params):
    B = 4
    tokens, mask = make_prompts(LENGTHS, 6)
    reward = text_reward_fn(_decode, _count_reward)
    means, outs = [], {}
    for n in (1, 4, 16):
        outs[n] = best_of_n(model, params, tokens, mask, reward, n=n, rng=jax.random.key(5), **KW)
        means.append(float(outs[n].best_reward_B.mean()))
    # Nested samples make the mean non-decreasing; over 16 samples it must rise.
    assert means[0] <= means[1] <= means[2] and means[0] < means[2], means
    # Key scheme: sample j of prompt b does not depend on n, so the n = 4
    # samples are the first 4 of the n = 16 ones and the best reward can only
    # grow, prompt by prompt.
    t4 = np.asarray(outs[4].samples.tokens_RM).reshape(B, 4, -1)
    t16 = np.asarray(outs[16].samples.tokens_RM).reshape(B, 16, -1)
    np.testing.assert_array_equal(t4, t16[:, :4])
    assert np.all(np.asarray(outs[16].best_reward_B) >= np.asarray(outs[4].best_reward_B))


def test_bad_rewards_raise(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    with pytest.raises(ValueError, match="NaN"):
        best_of_n(model, params, tokens, mask, lambda b: jnp.full((16,), jnp.nan), n=4,
                  rng=jax.random.key(0), **KW)
    with pytest.raises(ValueError, match="shape"):
        best_of_n(model, params, tokens, mask, lambda b: jnp.zeros((4,)), n=4,
                  rng=jax.random.key(0), **KW)
    with pytest.raises(TypeError):
        best_of_n(model, params, tokens, mask, lambda b: jnp.zeros((16,)), n=4,
                  rng=jax.random.key(0), num_samples=4, **KW)


def test_chunked_rewards_are_shape_checked(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)   # 4 prompts x n = 4: 16 rows, chunks of 5
    run = lambda fn, **kw: best_of_n(model, params, tokens, mask, fn, n=4, rng=jax.random.key(0), **KW, **kw)
    # One reward too many per chunk used to be cut silently.
    with pytest.raises(ValueError, match=re.escape(
            "reward_fn must return float32 [5] (one reward per row) for the chunk of 5 rows starting at "
            "row 0 (reward_chunk_size=5), got shape (6,)")):
        run(lambda b: jnp.zeros((b.num_rows + 1,)), reward_chunk_size=5)
    # A scalar used to raise a bare IndexError.
    with pytest.raises(ValueError, match=re.escape("got shape ()")):
        run(lambda b: jnp.float32(1.0), reward_chunk_size=5)
    # [rows, 1] (a reward model's K = 1 column) is refused too, chunked or not.
    with pytest.raises(ValueError, match=re.escape("got shape (5, 1)")):
        run(lambda b: jnp.zeros((b.num_rows, 1)), reward_chunk_size=5)
    with pytest.raises(ValueError, match=re.escape("for the batch of 16 rows, got shape (16, 1)")):
        run(lambda b: jnp.zeros((b.num_rows, 1)))
    # Correctly shaped rewards: chunks of 3 (16 = 5 x 3 + 1, the last padded) give every row its own reward.
    def token_sum(b):
        return jnp.sum(jnp.where(b.response_mask_RM, b.response_tokens_RM, 0), axis=1).astype(jnp.float32)
    whole = run(token_sum)
    chunked = run(token_sum, reward_chunk_size=3)
    assert len(np.unique(np.asarray(whole.rewards_BN))) > 4
    np.testing.assert_array_equal(np.asarray(chunked.rewards_BN), np.asarray(whole.rewards_BN))


@pytest.mark.parametrize("size", [-3, 0, 2.5, True])
def test_reward_chunk_size_must_be_a_positive_integer(model, params, size):
    tokens, mask = make_prompts(LENGTHS, 6)
    with pytest.raises(ValueError, match=re.escape(f"reward_chunk_size must be an integer >= 1 or None, got {size!r}")):
        best_of_n(model, params, tokens, mask, lambda b: jnp.zeros((b.num_rows,)), n=4,
                  rng=jax.random.key(0), reward_chunk_size=size, **KW)


@pytest.mark.parametrize("n", [2.5, 2.0, True])
def test_n_must_be_an_integer_named_n(model, params, n):
    """best_of_n(n=2.5) failed with "reward_fn must return float32 [2.5], got
    shape (4,)", blaming the reward function for a bad n."""
    tokens, mask = make_prompts(LENGTHS, 6)
    with pytest.raises(ValueError, match=re.escape(f"n must be an integer >= 1, got {n!r}")):
        best_of_n(model, params, tokens, mask, lambda b: jnp.zeros((b.num_rows,)), n=n,
                  rng=jax.random.key(0), **KW)


def test_proxy_gold_curve_refuses_n_beyond_the_samples_given():
    """With 4 samples per prompt and max_n=16, rows for N = 8 and 16 were
    reported (with their KL bounds) from the same 4 samples."""
    rng = np.random.default_rng(0)
    proxy, gold = rng.random((3, 4)), rng.random((3, 4))
    with pytest.raises(ValueError, match=re.escape("max_n=16 exceeds the 4 samples per prompt (columns)")):
        proxy_gold_curve(proxy, gold, 16)
    with pytest.raises(ValueError, match="one \\[B, N\\] shape"):
        proxy_gold_curve(proxy, gold[:, :2], 2)
    assert [r["N"] for r in proxy_gold_curve(proxy, gold, 4)] == [1, 2, 4]
