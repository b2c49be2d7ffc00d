"""Guided decoding: top-k of the base policy re-weighted by a guide's scores.

One decoder, `guided_generate`, and one interface, `Guide`, so that related
inference-time alignment methods are one small class each:

- `ValueGuide`: Value Augmented Sampling ("Value Augmented Sampling for
  Language Model Alignment and Personalization", Han et al., 2024). One or
  several token value models `V_i` (`heads.ValueModel`), combined with
  weights β_i chosen at decode time (composition without retraining):
  `score(a) = Σ_i β_i (V_i(s, a) − mean_{a' in top-k} V_i(s, a'))`.
- `RewardGuide`: ARGS ("ARGS: Alignment as Reward-Guided Search", Khanov et
  al., 2024): `score(a) = w · r(s + a)`, the last-token reward of a
  `heads.RewardModel` ("last" pooling) on prefix + candidate.

At each decode step, for each row:

    p      = process_logits(logits, temperature)           # base, all V tokens
    C      = the k most likely tokens under p                (cand_RK)
    z(a)   = log p_k(a) + score(a) for a in C, -inf outside  (p_k: p truncated
                                                               to top-k, renormalized)
    g      = softmax(z)                                      # guided policy
    token  ~ g   (argmax of z at temperature 0)

so g(a) ∝ p(a) exp(score(a)) on the top-k. Scores are added to the
temperature-scaled log-probs: β (or w) is not divided by the temperature.
The draw uses the key scheme and the exact two-level draw of `sampler.generate`
on the vocabulary-ordered `z`, so with zero scores the guided decoder
reproduces `generate`'s tokens bit for bit: `top_k=0` when k = V, `top_k=k`
when k < V and no other token ties with the k-th most likely one (then `z`
is exactly `process_logits(logits, temperature, k)`).

Ties at the k-th value. The candidates are exactly k tokens (static shapes):
`lax.top_k` keeps, among tokens tied with the k-th most likely one, those
with the lowest ids. `process_logits(..., k)` (and so `generate(top_k=k)`,
as Hugging Face's top-k) keeps every tied token. Under such a tie the guided
policy is p renormalized over its k candidates (times exp(score)), not over
all tied tokens: `z` keeps the values of `process_logits(logits,
temperature, k)` on the k candidates and NEG_INF on the tied tokens left
out, and the reported `logps_RM` and KL are those of softmax(z), the
distribution the token is drawn from.

Diagnostics per token: the guided log-prob `log g(token)` (`logps_RM`), the
base log-prob `log p(token)` (`base_logps_RM`), and per row the exact KL of
the guided policy from the base, `Σ_t Σ_a g(a) (log g(a) − log p(a))` summed
over the row's steps (`kl_R`). p is the full-vocabulary base distribution, so
the KL includes the cost of the top-k truncation (with zero scores it is
`−Σ_t log p(C_t)`). KL(g ‖ p) >= 0 always; each step's float32 sum is
clamped at 0, since with g = p (zero scores, k = V) round-off would leave
about −1e-8 per step. At temperature 0 the token is the argmax of z built
from temperature-1 log-probs, and logps/KL are those of that temperature-1
guided distribution (the convention `generate` uses for greedy log-probs).

Guide caches. A model guide keeps its own KV cache: the prompt is prefilled
once (batch B, repeated N times), then at every step the k candidates of all
R rows are scored in ONE forward of `[R, k]` new tokens that attend to the
shared cached prefix and to themselves only (k queries per row, not k copies
of the cache): the k candidate K/V are written to the k scratch slots after
the cache's next slot, each candidate at the same position. After the token
is chosen, `commit` copies the chosen candidate's K/V (already computed) into
the next slot, so the cache advances by the chosen token only and no second
forward is needed. Cost per guide model per step: attention of R·k queries
over S slots (the same FLOPs as repeating the cache k times, without the
k-fold copy of the cache), k MLP/projection rows per row, plus one copy of
the cache per layer for the scratch write (XLA cannot update in place the
cache it still needs). The cache holds S = P + M − 1 + k slots.

Interface (`Guide`): `check(vocab_size)`, `init(prompt_BP, mask_BP,
num_samples, max_length, k) -> state`, `score(state, logp_RV, cand_RK) ->
(scores_RK, pending)`, `commit(state, pending, choice_R, live_R) -> state`.
A guide is a pytree (`flax.struct.dataclass`) whose modules are static and
whose params and weights are leaves, so a new β (or new params) reuses the
compiled decoder.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxreward.models.heads import RewardModel, ValueModel
from jaxreward.models.llama import Decoder, KVCache
from jaxreward.models.scoring import NEG_INF, process_logits
from jaxreward.sampling.sampler import (SampleOutput, _left_align, check_decode_args, check_integer,
                                        sample_keys, two_level_sample)

Array = jax.Array

# Incremented each time the guided decoder is traced (tests check re-use).
_TRACE_COUNT = [0]


class Guide(Protocol):
    """What `guided_generate` needs from a guide (see the module docstring).

    R = B·N rows (row b·N + j is sample j of prompt b), k candidates per row.
    """

    def check(self, vocab_size: int) -> None:
        """Raises ValueError if the guide cannot score this policy's tokens."""

    def init(self, prompt_BP: Array, mask_BP: Array, num_samples: int, max_length: int,
             k: int) -> Any:
        """State after reading the (left-aligned) prompts, repeated to R rows.
        `max_length` = P + M − 1; the guide then sees up to M commits, and a
        KV cache that scores k candidates in scratch slots after the next one
        needs max_length + k slots."""

    def score(self, state: Any, logp_RV: Array, cand_RK: Array) -> tuple[Array, Any]:
        """Additive scores float32 `[R, k]` for candidates `cand_RK` given the
        base log-probs `logp_RV`, and whatever `commit` needs (e.g. the
        candidates' K/V)."""

    def commit(self, state: Any, pending: Any, choice_R: Array, live_R: Array) -> Any:
        """State after appending candidate `choice_R` (an index in [0, k)) to
        the rows where `live_R`; other rows are unchanged (as attended)."""


# ----------------------------------------------------------------------------
# Cached candidate scoring on a Decoder backbone.


def _repeat_rows(cache: KVCache, n: int) -> KVCache:
    if n == 1:
        return cache
    rep = lambda x: jnp.repeat(x, n, axis=0)
    return KVCache(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
                   mask_BS=rep(cache.mask_BS), index=cache.index)


def _prefill(module, prompt_BT, mask_BT, cache):
    """Method for a model with a `backbone` Decoder: the cache after the prompt."""
    _, cache = module.backbone.hidden_states(prompt_BT, mask_BT, None, cache)
    return cache


def _candidates_forward(decoder: Decoder, cache: KVCache, cand_RK: Array):
    """Hidden states of k one-token continuations of every cached row.

    Candidate j of row r sits at position `cache.lengths_B[r]` and attends to
    the row's valid cache slots and to itself only: its hidden state equals a
    one-token decode of `cand_RK[r, j]` with that cache. The candidates' K/V
    are written to scratch slots `index .. index + k − 1` of a throw-away
    copy of the cache (needs index + k <= S).

    Returns:
      (float32 `[R, k, E]` final hidden states, (k_L, v_L): per layer
      `[R, KV, k, D]` K/V of the candidates, the cache's head-major layout).
    """
    R, k = cand_RK.shape
    S = cache.mask_BS.shape[1]
    idx = cache.index
    pos_RK = jnp.broadcast_to(cache.lengths_B[:, None], (R, k))
    self_KS = jnp.arange(S)[None, :] == idx + jnp.arange(k)[:, None]
    mask_RKS = cache.mask_BS[:, None, :] | self_KS[None]
    x = decoder.embed_tokens(cand_RK)
    ks, vs = [], []
    for i, layer in enumerate(decoder.layers):
        x, (ck, cv) = layer(x, pos_RK, mask_RKS, (cache.k[i], cache.v[i]), idx)
        ks.append(jax.lax.dynamic_slice_in_dim(ck, idx, k, axis=2))
        vs.append(jax.lax.dynamic_slice_in_dim(cv, idx, k, axis=2))
    return decoder.norm(x).astype(jnp.float32), (tuple(ks), tuple(vs))


def _value_candidates(module: ValueModel, cache, cand_RK):
    h_RKE, kv = _candidates_forward(module.backbone, cache, cand_RK)
    return module.score_features(h_RKE), kv


def _reward_candidates(module: RewardModel, cache, cand_RK):
    h_RKE, kv = _candidates_forward(module.backbone, cache, cand_RK)
    R, k, E = h_RKE.shape
    return module.score_features(h_RKE.reshape(R * k, E)).reshape(R, k, -1), kv


def _commit_cache(cache: KVCache, kv, choice_R: Array, live_R: Array) -> KVCache:
    """Writes the chosen candidate's K/V at the next slot (attended where live)."""
    pick = lambda a: jnp.take_along_axis(a, choice_R[:, None, None, None], axis=2)
    put = lambda c, a: jax.lax.dynamic_update_slice_in_dim(c, pick(a).astype(c.dtype),
                                                          cache.index, axis=2)
    return KVCache(k=tuple(map(put, cache.k, kv[0])), v=tuple(map(put, cache.v, kv[1])),
                   mask_BS=jax.lax.dynamic_update_slice_in_dim(
                       cache.mask_BS, live_R[:, None], cache.index, axis=1),
                   index=cache.index + 1)


def _init_cache(model, params, prompt_BT, mask_BT, n, max_length, k) -> KVCache:
    B = prompt_BT.shape[0]
    cache = KVCache.init(model.config, B, max_length + k)
    cache = model.apply({"params": params}, prompt_BT, mask_BT, cache, method=_prefill)
    return _repeat_rows(cache, n)


def _check_vocab(what: str, model, vocab_size: int) -> None:
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"{what} has vocab_size {model.config.vocab_size} but the policy has "
                         f"{vocab_size}: a guide must score the policy's own token ids "
                         "(same tokenizer)")


# ----------------------------------------------------------------------------
# Members.


@flax.struct.dataclass
class ValueGuide:
    """VAS (Han et al., 2024): `Σ_i β_i (V_i(s, a) − mean_top-k V_i(s, ·))`.

    Build with `vas_guide(models, params, betas)`. Each value model keeps its
    own KV cache (state: a tuple of `KVCache`, one per model).

    Attributes:
      models: tuple of `ValueModel` (static).
      params: tuple of their params.
      betas: float32 `[n_models]` weights (a leaf: changing β does not recompile).
    """
    models: tuple = flax.struct.field(pytree_node=False)
    params: tuple
    betas: Array

    def check(self, vocab_size: int) -> None:
        for i, m in enumerate(self.models):
            if not isinstance(m, ValueModel):
                raise ValueError(f"value model {i} must be a ValueModel, got {type(m).__name__}")
            _check_vocab(f"value model {i}", m, vocab_size)

    def init(self, prompt_BP, mask_BP, num_samples, max_length, k):
        return tuple(_init_cache(m, p, prompt_BP, mask_BP, num_samples, max_length, k)
                     for m, p in zip(self.models, self.params))

    def values(self, state, cand_RK):
        """Per-model values float32 `[n_models, R, k]` of prefix + candidate,
        and the candidates' K/V per model."""
        out = [m.apply({"params": p}, c, cand_RK, method=_value_candidates)
               for m, p, c in zip(self.models, self.params, state)]
        return jnp.stack([v for v, _ in out]), tuple(kv for _, kv in out)

    def score(self, state, logp_RV, cand_RK):
        values_NRK, pending = self.values(state, cand_RK)
        adv_NRK = values_NRK - values_NRK.mean(axis=-1, keepdims=True)
        return jnp.einsum("n,nrk->rk", self.betas, adv_NRK), pending

    def commit(self, state, pending, choice_R, live_R):
        return tuple(_commit_cache(c, kv, choice_R, live_R) for c, kv in zip(state, pending))


def vas_guide(models, params, betas) -> ValueGuide:
    """A `ValueGuide` from one `ValueModel` (or a sequence) and its β (or βs).

    Raises:
      ValueError: not one β per model, or a β that is NaN or infinite (it
        would turn every guided weight into NaN).
    """
    if isinstance(models, ValueModel):
        models, params = (models,), (params,)
    models, params = tuple(models), tuple(params)
    betas = np.atleast_1d(np.asarray(betas, np.float32))
    if not (len(models) == len(params) == betas.shape[0]) or betas.ndim != 1:
        raise ValueError(f"got {len(models)} value models, {len(params)} param trees and "
                         f"betas of shape {betas.shape}: need one of each per model")
    if not np.isfinite(betas).all():
        raise ValueError(f"betas must be finite numbers, got {betas.tolist()}")
    return ValueGuide(models=models, params=params, betas=jnp.asarray(betas))


@flax.struct.dataclass
class RewardGuide:
    """ARGS (Khanov et al., 2024): `w · r(prefix + a)` from a last-token RewardModel.

    State: the reward model's `KVCache`.

    Attributes:
      model: a `RewardModel` with "last" pooling (static).
      params: its params.
      weight: float32 scalar w (a leaf).
      objective: which of the K reward outputs (static).
    """
    model: RewardModel = flax.struct.field(pytree_node=False)
    params: Any
    weight: Array
    objective: int = flax.struct.field(pytree_node=False, default=0)

    def check(self, vocab_size: int) -> None:
        if not isinstance(self.model, RewardModel):
            raise ValueError(f"ARGS needs a RewardModel, got {type(self.model).__name__}")
        if self.model.pooling != "last":
            raise ValueError("ARGS scores prefix + candidate with the last token's reward; "
                             f"pooling={self.model.pooling!r} is not supported")
        if not 0 <= self.objective < self.model.num_objectives:
            raise ValueError(f"objective must be in [0, {self.model.num_objectives}), "
                             f"got {self.objective}")
        _check_vocab("the reward model", self.model, vocab_size)

    def init(self, prompt_BP, mask_BP, num_samples, max_length, k):
        return _init_cache(self.model, self.params, prompt_BP, mask_BP, num_samples,
                           max_length, k)

    def rewards(self, state, cand_RK):
        """Rewards float32 `[R, k]` of prefix + candidate, and the candidates' K/V."""
        r_RKK, kv = self.model.apply({"params": self.params}, state, cand_RK,
                                     method=_reward_candidates)
        return r_RKK[..., self.objective], kv

    def score(self, state, logp_RV, cand_RK):
        r_RK, kv = self.rewards(state, cand_RK)
        return self.weight * r_RK, kv

    def commit(self, state, pending, choice_R, live_R):
        return _commit_cache(state, pending, choice_R, live_R)


def args_guide(model: RewardModel, params, weight: float, objective: int = 0) -> RewardGuide:
    """A `RewardGuide` (ARGS) with reward weight w.

    Raises:
      ValueError: a concrete w that is NaN or infinite.
    """
    if not isinstance(weight, jax.core.Tracer) and not np.isfinite(np.asarray(weight, np.float64)).all():
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    return RewardGuide(model=model, params=params, weight=jnp.asarray(weight, jnp.float32),
                       objective=int(objective))


# ----------------------------------------------------------------------------
# The decoder.


@flax.struct.dataclass
class GuidedOutput:
    """What `guided_generate` returns; R = B·N rows, M = max_new_tokens.

    Attributes:
      tokens_RM: int32 `[R, M]`; stop token included, pad_id after it.
      logps_RM: float32 `[R, M]`, log g(token) under the guided distribution
        it was drawn from; 0 at masked slots.
      base_logps_RM: float32 `[R, M]`, log p(token) under the base processed
        (temperature-only, full-vocabulary) distribution; 0 at masked slots.
      kl_R: float32 `[R]`, Σ over the row's steps of the exact
        KL(g_t ‖ p_t) = Σ_a g_t(a) (log g_t(a) − log p_t(a)).
      mask_RM, lengths_R, prompt_tokens_RP, prompt_mask_RP: as `SampleOutput`.
    """
    tokens_RM: Array
    logps_RM: Array
    base_logps_RM: Array
    kl_R: Array
    mask_RM: Array
    lengths_R: Array
    prompt_tokens_RP: Array
    prompt_mask_RP: Array

    def sample_output(self) -> SampleOutput:
        """As a `SampleOutput` (logps = the guided ones); `.sequences()` gives
        the training-path arrays."""
        return SampleOutput(self.tokens_RM, self.logps_RM, self.mask_RM, self.lengths_R,
                            self.prompt_tokens_RP, self.prompt_mask_RP)


def guided_step(logits_RV: Array, scores_fn, temperature: float, k: int):
    """The guided distribution of one step (the decoder's own arithmetic).

    Args:
      logits_RV: the policy's next-token logits.
      scores_fn: `(logp_RV, cand_RK) -> (scores_RK, aux)`, e.g. a bound
        `guide.score`.
      temperature: > 0, or 0 (then built at temperature 1; see module doc).
      k: candidates, 1 <= k <= V (static).

    Returns:
      dict with `logp_RV` (base p), `cand_RK`, `scores_RK`, `z_RV` (the
      unnormalized guided log-weights over the vocabulary that are drawn
      from; NEG_INF outside the candidates), `glogp_RK` (log g on the
      candidates), `kl_R` (KL(g ‖ p) of g = softmax(z), clamped at 0 against
      round-off), and `aux`. The candidates are exactly k tokens: under a tie
      at the k-th value the lowest ids (module docstring, "Ties").
    """
    V = logits_RV.shape[-1]
    t = 1.0 if temperature == 0.0 else temperature
    logp_RV = process_logits(logits_RV, t)
    # With k < V, the truncated processed distribution is used as is, so zero
    # scores give exactly generate(top_k=k)'s log-probs.
    logp_k_RV = logp_RV if k >= V else process_logits(logits_RV, t, k)
    cand_RK = jax.lax.top_k(logp_RV, k)[1].astype(jnp.int32)
    scores_RK, aux = scores_fn(logp_RV, cand_RK)
    z_RK = jnp.take_along_axis(logp_k_RV, cand_RK, axis=1) + scores_RK.astype(jnp.float32)
    rows = jnp.arange(logits_RV.shape[0])[:, None]
    z_RV = jnp.full(logp_RV.shape, NEG_INF, jnp.float32).at[rows, cand_RK].set(z_RK)
    glogp_RK = jax.nn.log_softmax(z_RK, axis=-1)
    base_RK = jnp.take_along_axis(logp_RV, cand_RK, axis=1)
    # KL(g ‖ p) >= 0; the float32 sum of g·(log g − log p) can round to about −1e-8 when g = p.
    kl_R = jnp.maximum(jnp.sum(jnp.exp(glogp_RK) * (glogp_RK - base_RK), axis=-1), 0.0)
    return dict(logp_RV=logp_RV, cand_RK=cand_RK, scores_RK=scores_RK, z_RV=z_RV,
                glogp_RK=glogp_RK, kl_R=kl_R, aux=aux)


@functools.lru_cache(maxsize=64)
def _compiled(policy, max_new_tokens: int, temperature: float, k: int,
              stop_ids: tuple[int, ...], pad_id: int, num_samples: int):
    """One jitted guided decoder per (policy, hyper-parameters); jit caches
    per guide structure (its static modules) and input shape."""
    M, n = max_new_tokens, num_samples
    greedy = temperature == 0.0

    def is_stop(tok_R):
        hit = jnp.zeros(tok_R.shape, bool)
        for s in stop_ids:
            hit = hit | (tok_R == s)
        return hit

    def step(logits_RV, gstate, guide, keys_R, t, live_R):
        """Token, guided/base log-probs, KL and the guide's state for column t."""
        s = guided_step(logits_RV, functools.partial(guide.score, gstate), temperature, k)
        if greedy:
            tok = jnp.argmax(s["z_RV"], axis=-1).astype(jnp.int32)
        else:
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_R, t)
            tok = two_level_sample(step_keys, s["z_RV"])
        choice = jnp.argmax(s["cand_RK"] == tok[:, None], axis=1).astype(jnp.int32)
        glp = jnp.take_along_axis(s["glogp_RK"], choice[:, None], axis=1)[:, 0]
        blp = jnp.take_along_axis(s["logp_RV"], tok[:, None], axis=1)[:, 0]
        gstate = guide.commit(gstate, s["aux"], choice, live_R)
        zero = lambda x: jnp.where(live_R, x, 0.0)
        return (jnp.where(live_R, tok, pad_id), zero(glp), zero(blp), zero(s["kl_R"]), gstate)

    def run(params, guide, prompt_BT, mask_BT, rng):
        _TRACE_COUNT[0] += 1
        variables = {"params": params}
        B, T = prompt_BT.shape
        R = B * n
        prompt_BT, mask_BT = _left_align(prompt_BT.astype(jnp.int32), mask_BT.astype(bool))
        prompt_RT = jnp.repeat(prompt_BT, n, axis=0)
        pmask_RT = jnp.repeat(mask_BT, n, axis=0)
        tokens = jnp.full((R, M), pad_id, jnp.int32)
        logps = jnp.zeros((R, M), jnp.float32)
        if M == 0:
            return GuidedOutput(tokens, logps, logps, jnp.zeros((R,), jnp.float32),
                                jnp.zeros((R, 0), bool), jnp.zeros((R,), jnp.int32),
                                prompt_RT, pmask_RT)
        keys_R = sample_keys(rng, B, n).reshape(R)

        cache = KVCache.init(policy.config, B, T + M - 1)
        h_BTE, cache = policy.apply(variables, prompt_BT, mask_BT, None, cache,
                                    method=policy.hidden_states)
        logits_RV = jnp.repeat(policy.apply(variables, h_BTE[:, -1:], method=policy.logits)[:, 0],
                               n, axis=0)
        cache = _repeat_rows(cache, n)
        gstate = guide.init(prompt_BT, mask_BT, n, T + M - 1, k)

        live = jnp.ones((R,), bool)
        tok, glp, blp, kl, gstate = step(logits_RV, gstate, guide, keys_R, 0, live)
        tokens = tokens.at[:, 0].set(tok)
        logps = logps.at[:, 0].set(glp)
        base = jnp.zeros((R, M), jnp.float32).at[:, 0].set(blp)
        carry = (jnp.asarray(1, jnp.int32), cache, gstate, tok, is_stop(tok), tokens, logps,
                 base, kl, jnp.ones((R,), jnp.int32))

        def cond(c):
            return (c[0] < M) & ~jnp.all(c[4])

        def body(c):
            t, cache, gstate, prev, done, tokens, logps, base, kl, lengths = c
            live = ~done
            # Stopped rows feed pad_id unattended, as in `generate`.
            logits, cache = policy.apply(variables, prev[:, None], live[:, None], None, cache)
            tok, glp, blp, dkl, gstate = step(logits[:, 0], gstate, guide, keys_R, t, live)
            put = lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x[:, None], t, axis=1)
            return (t + 1, cache, gstate, tok, done | (live & is_stop(tok)), put(tokens, tok),
                    put(logps, glp), put(base, blp), kl + dkl, lengths + live.astype(jnp.int32))

        if M > 1:
            carry = jax.lax.while_loop(cond, body, carry)
        _, _, _, _, _, tokens, logps, base, kl, lengths = carry
        mask = jnp.arange(M)[None, :] < lengths[:, None]
        return GuidedOutput(tokens, logps, base, kl, mask, lengths, prompt_RT, pmask_RT)

    return jax.jit(run)


def guided_generate(policy, params, prompt_tokens_BP: Array, prompt_mask_BP: Array, guide: Guide,
                    *, rng: Array, max_new_tokens: int, k: int = 10, temperature: float = 1.0,
                    stop_ids=(), pad_id: int = 0, num_samples: int = 1) -> GuidedOutput:
    """Samples continuations from the base policy's top-k re-weighted by `guide`.

    Same prompts, keys, padding, stopping and loop as `sampler.generate` (see
    its docstring); per step the token is drawn from
    g ∝ p_k(a) exp(score(a)) over the k most likely tokens (module docstring).

    Args:
      policy: the base `Decoder`; params: its parameters.
      prompt_tokens_BP, prompt_mask_BP: `[B, P]` prompts, any padding side.
      guide: a `Guide` (`vas_guide(...)`, `args_guide(...)`, or your own).
      rng: one PRNG key or a `[B, N]` batch of keys (`sampler.sample_keys`).
      max_new_tokens: M >= 0.
      k: candidates per step, >= 1; k > V is clamped to V with a warning.
      temperature: > 0 samples; 0 takes the argmax of the guided weights
        (lowest id on ties).
      stop_ids, pad_id, num_samples: as `generate`.

    Returns:
      `GuidedOutput` with R = B·N rows (row b·N + j is sample j of prompt b).

    Raises:
      ValueError: bad shapes or hyper-parameters (as `generate`), k < 1, or a
        guide that cannot score the policy's vocabulary (e.g. a value model
        with a different vocab_size).
    """
    prompt_tokens_BP, prompt_mask_BP, stop_ids = check_decode_args(
        policy.config, prompt_tokens_BP, prompt_mask_BP, rng, max_new_tokens, temperature, num_samples,
        stop_ids)
    V = policy.config.vocab_size
    check_integer("k", k, 1)
    if k > V:
        warnings.warn(f"k = {k} exceeds the vocabulary size {V}; using k = {V}", stacklevel=2)
        k = V
    guide.check(V)
    fn = _compiled(policy, int(max_new_tokens), float(temperature), int(k),
                   tuple(sorted({int(s) for s in stop_ids})), int(pad_id), int(num_samples))
    return fn(params, guide, prompt_tokens_BP, prompt_mask_BP, rng)
