"""Guided decoding (VAS, ARGS): exact depth-1 distribution, zero-weight parity with
`generate`, cache reuse vs full re-encoding, batch invariance, composition, bad input."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxreward.models.heads import RewardModel, ValueModel
from jaxreward.sampling import value_guided as vg
from jaxreward.sampling.sampler import generate, sample_keys, two_level_sample
from jaxreward.sampling.value_guided import args_guide, guided_generate, guided_step, vas_guide
from jaxreward.train.step import unbox
from tests.sampling.conftest import CONFIG, make_prompts

V = CONFIG.vocab_size
LENGTHS = [3, 5, 1, 6]  # T = 6, left padded
M = 6
K = 5
STOP = (7, 11, 20, 33, 45)  # with these keys, some rows stop early, others run to M
N = 2  # samples per prompt: the guides' prefilled caches are repeated N times
# One static configuration shared by most runs, so they reuse one compilation.
KW = dict(max_new_tokens=M, temperature=1.0, pad_id=63, stop_ids=STOP, num_samples=N)


@flax.struct.dataclass
class TableGuide:
    """Test-only guide through the same interface: score(a) = β (r[a] − mean_top-k r)."""
    table: jax.Array
    beta: jax.Array

    def check(self, vocab_size):
        assert self.table.shape == (vocab_size,)

    def init(self, prompt_BP, mask_BP, num_samples, max_length, k):
        return None

    def score(self, state, logp_RV, cand_RK):
        r = self.table[cand_RK]
        return self.beta * (r - r.mean(axis=-1, keepdims=True)), None

    def commit(self, state, pending, choice_R, live_R):
        return state


def _head_model_params(decoder_params, seed, outputs=1, scale=0.1):
    """ValueModel/RewardModel params: a perturbed copy of the policy's backbone and a
    random head `[E, outputs]` (numpy random numbers: nothing to compile)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(unbox(decoder_params))
    noisy = [0.6 * np.asarray(x) + 0.05 * rng.standard_normal(x.shape) for x in leaves]
    backbone = jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in noisy])
    head = scale * rng.standard_normal((CONFIG.hidden_size, outputs))
    return {"backbone": backbone, "head": {"kernel": jnp.asarray(head, jnp.float32)}}


@pytest.fixture(scope="module")
def values(params):
    """Two value models with random (non-zero) heads and different backbones."""
    return ValueModel(CONFIG), _head_model_params(params, 11), _head_model_params(params, 13)


def _vas(values, b1, b2):
    vm, p1, p2 = values
    return vas_guide((vm, vm), (p1, p2), (b1, b2))


def _np(x):
    return np.asarray(x)


def test_depth1_guided_distribution_is_exact(model, params):
    """One token, k = V: g(a) = π_ref(a) exp(β r(a)) / Z, from the decoder's own step,
    its reported log-probs and KL, and its empirical frequencies."""
    tokens, mask = make_prompts([4], 6, seed=5)
    table = jax.random.normal(jax.random.key(7), (V,))
    beta, temp = 1.3, 0.8
    guide = TableGuide(table=table, beta=jnp.float32(beta))
    logits = jax.jit(model.apply)({"params": params}, tokens, mask)[:, -1]
    x = np.asarray(logits, np.float64)[0] / temp
    ref_logp = x - x.max() - np.log(np.exp(x - x.max()).sum())
    w = ref_logp + beta * np.asarray(table, np.float64)
    want_logp = w - np.log(np.exp(w - w.max()).sum()) - w.max()
    want = np.exp(want_logp)
    want_kl = float(np.sum(want * (want_logp - ref_logp)))

    step = jax.jit(lambda g, x: guided_step(x, functools.partial(g.score, None), temp, V))(
        guide, logits)
    got = np.zeros(V)
    got[_np(step["cand_RK"])[0]] = np.exp(_np(step["glogp_RK"])[0])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.exp(_np(jax.nn.log_softmax(step["z_RV"]))[0]), want, atol=1e-6)
    np.testing.assert_allclose(float(step["kl_R"][0]), want_kl, atol=1e-5)
    assert want_kl > 0.05  # the guide matters

    n = 4000
    out = guided_generate(model, params, tokens, mask, guide, rng=jax.random.key(8),
                          max_new_tokens=1, k=V, temperature=temp, num_samples=n)
    tok = _np(out.tokens_RM)[:, 0]
    np.testing.assert_allclose(_np(out.logps_RM)[:, 0], want_logp[tok], atol=2e-5)
    np.testing.assert_allclose(_np(out.base_logps_RM)[:, 0], ref_logp[tok], atol=2e-5)
    np.testing.assert_allclose(_np(out.kl_R), want_kl, atol=1e-5)
    freq = np.bincount(tok, minlength=V) / n
    np.testing.assert_array_less(np.abs(freq - want), 5 * np.sqrt(want * (1 - want) / n) + 1e-3)


@pytest.mark.parametrize("k", [V, K])
def test_zero_weights_reproduce_generate(model, params, values, k):
    """β = 0: generate's tokens exactly (top_k = 0 when k = V, top_k = k otherwise)."""
    tokens, mask = make_prompts(LENGTHS, 6)
    out = guided_generate(model, params, tokens, mask, _vas(values, 0.0, 0.0),
                          rng=jax.random.key(3), k=k, **KW)
    ref = generate(model, params, tokens, mask, rng=jax.random.key(3),
                   top_k=0 if k == V else k, **KW)
    np.testing.assert_array_equal(_np(out.tokens_RM), _np(ref.tokens_RM))
    np.testing.assert_array_equal(_np(out.lengths_R), _np(ref.lengths_R))
    np.testing.assert_allclose(_np(out.logps_RM), _np(ref.logps_RM), atol=2e-5)
    m = _np(out.mask_RM)
    assert (m.sum(1) < M).any() and len(np.unique(_np(out.tokens_RM)[m])) > 5
    # KL(g || p) = 0 when k = V; the top-k truncation cost -Σ log p(top-k) otherwise.
    if k == V:
        np.testing.assert_allclose(_np(out.kl_R), 0.0, atol=1e-5)
        np.testing.assert_allclose(_np(out.base_logps_RM), _np(out.logps_RM), atol=2e-5)
        # k > V is clamped (with a warning) to the same decoder.
        traces = vg._TRACE_COUNT[0]
        with pytest.warns(UserWarning, match="exceeds the vocabulary"):
            big = guided_generate(model, params, tokens, mask, _vas(values, 0.0, 0.0),
                                  rng=jax.random.key(3), k=V + 40, **KW)
        assert vg._TRACE_COUNT[0] == traces
        np.testing.assert_array_equal(_np(big.tokens_RM), _np(out.tokens_RM))
    else:
        assert (_np(out.kl_R) > 0).all()


def test_zero_weight_greedy_matches_generate(model, params):
    tokens, mask = make_prompts(LENGTHS, 6)
    guide = TableGuide(table=jnp.arange(V, dtype=jnp.float32), beta=jnp.float32(0.0))
    out = guided_generate(model, params, tokens, mask, guide,
                          rng=jax.random.key(0), k=K, **(KW | dict(temperature=0.0)))
    ref = generate(model, params, tokens, mask, rng=jax.random.key(0), top_k=K,
                   **(KW | dict(temperature=0.0)))
    np.testing.assert_array_equal(_np(out.tokens_RM), _np(ref.tokens_RM))
    np.testing.assert_allclose(_np(out.logps_RM), _np(ref.logps_RM), atol=2e-5)


def _naive_reference(model, params, values, betas, tokens, mask, keys_R, k):
    """Guided decoding with no cache at all: policy and value models re-encode the
    whole sequence (fixed-shape buffer, later columns masked) at every step."""
    vm, p1, p2 = values
    R, T = tokens.shape
    seq = jnp.concatenate([tokens, jnp.zeros((R, M), jnp.int32)], axis=1)
    smask = jnp.concatenate([mask, jnp.zeros((R, M), bool)], axis=1)

    @jax.jit
    def ref_step(seq, smask, t):
        col = T + t
        logits = model.apply({"params": params}, seq, smask)[:, col - 1]

        def scores_fn(logp_RV, cand_RK):
            s = jnp.repeat(seq, k, 0).at[:, col].set(cand_RK.reshape(-1))
            sm = jnp.repeat(smask, k, 0).at[:, col].set(True)
            vals = [vm.apply({"params": p}, s, sm)[:, col].reshape(R, k) for p in (p1, p2)]
            return sum(b * (v - v.mean(-1, keepdims=True)) for b, v in zip(betas, vals)), None

        st = guided_step(logits, scores_fn, 1.0, k)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_R, t)
        tok = two_level_sample(keys, st["z_RV"])
        choice = jnp.argmax(st["cand_RK"] == tok[:, None], axis=1)
        glp = jnp.take_along_axis(st["glogp_RK"], choice[:, None], axis=1)[:, 0]
        return tok, glp, st["kl_R"]

    toks, lps, kls = [], [], []
    for t in range(M):
        tok, glp, dkl = ref_step(seq, smask, t)
        seq = seq.at[:, T + t].set(tok)
        smask = smask.at[:, T + t].set(True)
        toks.append(tok)
        lps.append(glp)
        kls.append(dkl)
    return tuple(_np(jnp.stack(x, 1)) for x in (toks, lps, kls))


def test_matches_uncached_reference_batch_and_per_row(model, params, values):
    """The jitted loop (shared-prefix candidate forward, commit of the chosen K/V)
    equals decoding with full re-encodings; each row equals its own decode."""
    tokens, mask = make_prompts(LENGTHS, 6)
    betas = (1.5, -0.7)
    guide = _vas(values, *betas)
    out = guided_generate(model, params, tokens, mask, guide, rng=jax.random.key(21), k=K, **KW)
    keys_R = sample_keys(jax.random.key(21), 4, N).reshape(4 * N)
    toks, lps, kls = _naive_reference(model, params, values, betas, jnp.repeat(tokens, N, 0),
                                      jnp.repeat(mask, N, 0), keys_R, K)
    # The reference ignores stop ids: compare each row up to (and with) its stop token.
    m = _np(out.mask_RM)
    assert (m.sum(1) < M).any() and (m.sum(1) == M).any()
    lengths = [M if not set(r) & set(STOP) else 1 + min(i for i, x in enumerate(r) if x in STOP)
               for r in toks]
    np.testing.assert_array_equal(_np(out.lengths_R), lengths)
    np.testing.assert_array_equal(_np(out.tokens_RM)[m], toks[m])
    np.testing.assert_allclose(_np(out.logps_RM)[m], lps[m], atol=1e-4)
    np.testing.assert_allclose(_np(out.kl_R), (kls * m).sum(1), atol=1e-4, rtol=1e-4)
    # The guide changes the samples (same keys as generate top_k = K).
    ref = generate(model, params, tokens, mask, rng=jax.random.key(21), top_k=K, **KW)
    assert not np.array_equal(_np(ref.tokens_RM), _np(out.tokens_RM))
    assert (_np(out.kl_R) > _np(guided_generate(
        model, params, tokens, mask, _vas(values, 0.0, 0.0), rng=jax.random.key(21), k=K,
        **KW).kl_R)).all()

    # Per prompt: B = 1, the row right-padded instead of left-padded, its own keys.
    keys = sample_keys(jax.random.key(21), 4, N)
    for b, n in enumerate(LENGTHS):
        real = _np(tokens[b])[_np(mask[b])]
        row = jnp.asarray(np.r_[real, np.full(6 - n, 9)][None], jnp.int32)
        rmask = jnp.asarray((np.arange(6) < n)[None])
        one = guided_generate(model, params, row, rmask, guide, rng=keys[b:b + 1], k=K, **KW)
        rows = slice(b * N, (b + 1) * N)
        np.testing.assert_array_equal(_np(one.tokens_RM), _np(out.tokens_RM)[rows])
        np.testing.assert_allclose(_np(one.logps_RM), _np(out.logps_RM)[rows], atol=1e-5)
        np.testing.assert_allclose(_np(one.kl_R), _np(out.kl_R)[rows], atol=1e-4, rtol=1e-5)


def _replay(guide, method, tokens, mask, full_fn, n_steps=4):
    """Scores candidates with the guide's cache, commits random choices (row 2 not
    live at step 1), and compares with `full_fn(seq, seq_mask, col)`, the scores of
    full re-encodings `[.., R*k]` of prefix + candidate (candidate at column col; a
    fixed-width buffer with later columns masked, so full_fn compiles once)."""
    R, T = tokens.shape
    tokens, mask = vg._left_align(tokens, mask)
    # The guide is an argument (a pytree), not a closure: its params stay inputs.
    state = jax.jit(lambda g, x, m: g.init(x, m, 1, T + n_steps, K))(guide, tokens, mask)
    cached = functools.partial(jax.jit(lambda g, *a: getattr(g, method)(*a)), guide)
    commit = functools.partial(jax.jit(lambda g, *a: g.commit(*a)), guide)
    seq = np.concatenate([_np(tokens), np.zeros((R, n_steps), np.int32)], 1)
    smask = np.concatenate([_np(mask), np.zeros((R, n_steps), bool)], 1)
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in range(n_steps):
        cand = jnp.asarray(rng.integers(0, V, (R, K)), jnp.int32)
        got, pending = cached(state, cand)
        s, sm = np.repeat(seq, K, 0), np.repeat(smask, K, 0)
        s[:, T + t], sm[:, T + t] = _np(cand).reshape(-1), True
        want = _np(full_fn(jnp.asarray(s), jnp.asarray(sm), T + t)).reshape(-1, R, K)
        got = _np(got).reshape(-1, R, K)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        worst = max(worst, np.abs(want).max())
        choice = rng.integers(0, K, R)
        live = np.ones(R, bool)
        if t == 1:
            live[2] = False
        state = commit(state, pending, jnp.asarray(choice, jnp.int32), jnp.asarray(live))
        seq[:, T + t], smask[:, T + t] = _np(cand)[np.arange(R), choice], live
    assert worst > 0.1  # values are not trivially zero


def test_value_cache_reuse_matches_full_reencoding(values):
    # Heads scaled down so values are O(1) and 1e-5 is a relative test too.
    vm, p1, p2 = (values[0],) + tuple(
        {"backbone": p["backbone"], "head": {"kernel": 0.3 * p["head"]["kernel"]}}
        for p in values[1:])
    tokens, mask = make_prompts(LENGTHS, 6, left=False)
    full = jax.jit(lambda s, m, col: jnp.stack([vm.apply({"params": p}, s, m)[:, col]
                                                for p in (p1, p2)]))
    _replay(_vas((vm, p1, p2), 1.0, 1.0), "values", tokens, mask, full)


def test_args_reward_cache_matches_full_reencoding(params):
    rm = RewardModel(CONFIG, num_objectives=2)
    rp = _head_model_params(params, 31, outputs=2)
    tokens, mask = make_prompts(LENGTHS, 6)
    # "last" pooling reads the last attended token: the candidate.
    full = jax.jit(lambda s, m, col: rm.apply({"params": rp}, s, m)[:, 1])
    _replay(args_guide(rm, rp, weight=2.0, objective=1), "rewards", tokens, mask, full)


def test_args_greedy_picks_best_logp_plus_reward(model, params):
    """ARGS-greedy, depth 1: argmax over the top-k of log p(a) + w r(prompt + a)."""
    rm = RewardModel(CONFIG)
    rp = _head_model_params(params, 32, scale=1.0)
    tokens, mask = make_prompts(LENGTHS, 6)
    out = guided_generate(model, params, tokens, mask, args_guide(rm, rp, 1.0),
                          rng=jax.random.key(0), max_new_tokens=1, k=K, temperature=0.0)
    logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, tokens, mask)[:, -1])
    cand = _np(jax.lax.top_k(logp, K)[1])
    seq = np.concatenate([np.repeat(_np(tokens), K, 0), cand.reshape(-1, 1)], 1)
    sm = np.concatenate([np.repeat(_np(mask), K, 0), np.ones((4 * K, 1), bool)], 1)
    r = _np(jax.jit(rm.apply)({"params": rp}, seq, sm))[:, 0].reshape(4, K)
    total = np.take_along_axis(_np(logp), cand, 1) + r
    want = cand[np.arange(4), total.argmax(1)]
    np.testing.assert_array_equal(_np(out.tokens_RM)[:, 0], want)
    assert (want != cand[:, 0]).any()  # the reward changed some choice


def test_composition_is_the_weighted_sum_of_advantages(values):
    """Two value models: score = β1 ΔV1 + β2 ΔV2 with ΔV = V − mean over the k candidates."""
    vm, p1, p2 = values
    tokens, mask = make_prompts(LENGTHS, 6)
    left, lmask = vg._left_align(tokens, mask)
    cand = jnp.asarray(np.random.default_rng(1).integers(0, V, (4, K)), jnp.int32)
    seq = np.concatenate([np.repeat(_np(left), K, 0), _np(cand).reshape(-1, 1)], 1)
    sm = np.concatenate([np.repeat(_np(lmask), K, 0), np.ones((4 * K, 1), bool)], 1)
    dv = []
    for p in (p1, p2):
        v = _np(jax.jit(vm.apply)({"params": p}, seq, sm))[:, -1].reshape(4, K)
        dv.append(v - v.mean(1, keepdims=True))
    score = jax.jit(lambda g: g.score(g.init(left, lmask, 1, 8, K), None, cand)[0])
    for b1, b2 in [(1.0, 0.0), (0.0, 1.0), (0.7, -2.0)]:
        np.testing.assert_allclose(_np(score(_vas(values, b1, b2))), b1 * dv[0] + b2 * dv[1],
                                   atol=1e-5)


def test_new_weights_do_not_recompile(model, params, values):
    tokens, mask = make_prompts(LENGTHS, 6)
    a = guided_generate(model, params, tokens, mask, _vas(values, 2.0, 0.5),
                        rng=jax.random.key(21), k=K, **KW)
    traces = vg._TRACE_COUNT[0]
    b = guided_generate(model, params, tokens, mask, _vas(values, -3.0, 1.0),
                        rng=jax.random.key(21), k=K, **KW)
    assert vg._TRACE_COUNT[0] == traces
    assert not np.array_equal(_np(a.tokens_RM), _np(b.tokens_RM))


def test_bad_input_is_refused(model, params, values):
    tokens, mask = make_prompts(LENGTHS, 6)
    other = ValueModel(dataclasses.replace(CONFIG, vocab_size=V + 1))
    guide = vas_guide(other, values[1], 1.0)  # params never read: refused first
    with pytest.raises(ValueError, match="vocab_size 65 but the policy has 64"):
        guided_generate(model, params, tokens, mask, guide, rng=jax.random.key(0),
                        max_new_tokens=2, k=K)
    rm = RewardModel(dataclasses.replace(CONFIG, vocab_size=32))
    with pytest.raises(ValueError, match="vocab_size 32"):
        guided_generate(model, params, tokens, mask, args_guide(rm, None, 1.0),
                        rng=jax.random.key(0), max_new_tokens=2, k=K)
    with pytest.raises(ValueError, match="pooling"):
        guided_generate(model, params, tokens, mask,
                        args_guide(RewardModel(CONFIG, pooling="mean"), None, 1.0),
                        rng=jax.random.key(0), max_new_tokens=2, k=K)
    with pytest.raises(ValueError, match="k must be"):
        guided_generate(model, params, tokens, mask, _vas(values, 1.0, 1.0),
                        rng=jax.random.key(0), max_new_tokens=2, k=0)
    with pytest.raises(ValueError, match="betas"):
        vas_guide((values[0], values[0]), (values[1], values[2]), (1.0,))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        guided_generate(model, params, tokens, mask, _vas(values, 1.0, 1.0),
                        rng=jax.random.key(0), max_new_tokens=60, k=K)


def test_prompts_sharded_over_devices_give_the_same_samples(model, params, values):
    """The decoder under jit follows its inputs' sharding: prompts split over a
    4-device data axis decode to the same tokens, log-probs and KL as on one device."""
    from jaxreward import parallel
    tokens, mask = make_prompts(LENGTHS, 6)
    guide = _vas(values, 1.5, -0.7)
    want = guided_generate(model, params, tokens, mask, guide, rng=jax.random.key(21), k=K, **KW)
    mesh = parallel.make_mesh(4, 1, 1, devices=jax.devices()[:4])
    batch = parallel.shard_batch({"tokens": _np(tokens), "mask": _np(mask)}, mesh)
    assert len(batch["tokens"].sharding.device_set) == 4
    got = guided_generate(model, params, batch["tokens"], batch["mask"], guide, rng=jax.random.key(21), k=K,
                          **KW)
    np.testing.assert_array_equal(_np(got.tokens_RM), _np(want.tokens_RM))
    np.testing.assert_allclose(_np(got.logps_RM), _np(want.logps_RM), atol=1e-5)
    np.testing.assert_allclose(_np(got.kl_R), _np(want.kl_R), atol=1e-5, rtol=1e-5)


def test_tie_at_the_kth_value_keeps_exactly_k_candidates_and_reports_what_is_sampled():
    """The module docstring said that with k < V and zero scores `z` is
    exactly `process_logits(logits, temperature, k)`, which keeps every token
    tied at the k-th value (as HF's top-k); guided decoding keeps exactly k
    (static shapes). Now documented: the k lowest ids among the tied; g is p
    renormalized over those k, and the KL is that of the sampled g."""
    from jaxreward.models.scoring import process_logits
    logits = jnp.array([[3.0, 2.0, 2.0, 1.0, 0.0, -1.0]])
    s = guided_step(logits, lambda lp, c: (jnp.zeros(c.shape), None), 1.0, 2)
    np.testing.assert_array_equal(_np(s["z_RV"]) > -1e29, [[True, True, False, False, False, False]])
    top_k = _np(process_logits(logits, 1.0, 2))
    np.testing.assert_array_equal(top_k > -1e29, [[True, True, True, False, False, False]])
    np.testing.assert_allclose(_np(s["z_RV"])[0, :2], top_k[0, :2])  # the candidates keep z's values
    p = _np(jax.nn.softmax(logits[0]))
    g = p[:2] / p[:2].sum()  # what is drawn: softmax(z) over the 2 candidates
    np.testing.assert_allclose(np.exp(_np(s["glogp_RK"])[0]), g, rtol=1e-6)
    np.testing.assert_allclose(_np(jax.nn.softmax(s["z_RV"][0]))[:2], g, rtol=1e-6)
    np.testing.assert_allclose(_np(s["kl_R"])[0], -np.log(p[:2].sum()), rtol=1e-5)


def test_kl_is_never_negative_and_a_beta_must_be_finite(model, params, values):
    """KL(g ‖ p) >= 0, but at β = 0, k = V the float32 sum came out at about
    −3e-7 on some rows (the VAS table printed a KL of -0.0000); each step's KL
    is now clamped at 0. And `vas_guide(vm, vp, nan)` decoded silently (every
    row became token 1 at every step); a non-finite β (or ARGS weight) is refused."""
    tokens, mask = make_prompts(LENGTHS, 6)
    out = guided_generate(model, params, tokens, mask, _vas(values, 0.0, 0.0), rng=jax.random.key(1),
                          max_new_tokens=5, k=V, num_samples=8)
    assert (_np(out.kl_R) >= 0).all(), _np(out.kl_R)
    np.testing.assert_allclose(_np(out.kl_R), 0.0, atol=1e-5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="betas must be finite"):
            vas_guide(values[0], values[1], bad)
        with pytest.raises(ValueError, match="weight must be a finite number"):
            args_guide(RewardModel(CONFIG), None, bad)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1, got 2\.0"):
        guided_generate(model, params, tokens, mask, _vas(values, 1.0, 1.0), rng=jax.random.key(0),
                        max_new_tokens=2, k=2.0)
