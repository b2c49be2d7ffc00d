"""Autoregressive sampling from a `Decoder` with its KV cache.

`generate` prefills the whole prompt once, then decodes one token per row
per step inside one jitted `lax.while_loop` (the loop ends as soon as every
row has stopped). Tokens are drawn exactly, block then token (see
`two_level_sample`), from
`scoring.process_logits(logits, temperature, top_k, top_p)`, the same
processed distribution the training path scores with, so a sampled token's
log-prob is recomputed, up to float rounding, by
`scoring.token_logps(..., temperature=, top_k=, top_p=)` on
`SampleOutput.sequences()` (which keeps the token in the top-k/top-p set
even where rounding would put it just outside).

Key scheme (what makes samples reproducible and batch-independent): sample
j of prompt b draws its token at response column t with the key
`fold_in(K[b, j], t)`, where `K = sample_keys(rng, B, N)`, i.e.
`K[b, j] = fold_in(fold_in(rng, b), j)` for a single key `rng` (or the
`[B, N]` keys the caller passes). So a row's samples depend only on its
prompt, its key and t: not on its batch companions, the padding side, the
batch size, `max_new_tokens` (a shorter run is a prefix of a longer one) or
N (the first N samples of a larger N are the same).

Prompts are moved to the right end of their row (left padding) before the
prefill, with a stable per-row shift that keeps the real tokens in order, so
left-, right- or irregularly padded prompts give the same computation.
"""
from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxreward.models.llama import KVCache, positions_from_mask
from jaxreward.models.scoring import NEG_INF, process_logits

Array = jax.Array

# Incremented each time `_generate` is traced; tests use it to check that a
# second call with the same shapes and hyper-parameters does not re-trace.
_TRACE_COUNT = [0]


@flax.struct.dataclass
class SampleBatch:
    """Prompt + response as fixed-shape arrays for the training path.

    Rows are R = B * N samples (row b * N + j is sample j of prompt b); the
    sequence length is L = P + M, prompt part first (columns `[:P]`, left
    padded), then the response (columns `[P:]`, right padded).

    Attributes:
      tokens_RL: int32 `[R, L]` full sequences.
      attention_mask_RL: bool `[R, L]`, True at real prompt and response tokens.
      loss_mask_RL: bool `[R, L]`, True at response tokens (token-aligned,
        see `scoring.shift_mask`).
      positions_RL: int32 `[R, L]`, `positions_from_mask(attention_mask)`.
      sample_logps_RL: float32 `[R, L]` on the log-prob grid of
        `scoring.token_logps`: `[r, t]` is the sampling log-prob of token t+1
        (the response logps moved to columns `P-1 .. L-2`), 0 elsewhere.
      prompt_tokens_RP, prompt_mask_RP: the left-aligned prompt `[R, P]`.
      response_tokens_RM: int32 `[R, M]`; pad_id after a row stops.
      response_mask_RM: bool `[R, M]`.
      prompt_length: P (static).
    """
    tokens_RL: Array
    attention_mask_RL: Array
    loss_mask_RL: Array
    positions_RL: Array
    sample_logps_RL: Array
    prompt_tokens_RP: Array
    prompt_mask_RP: Array
    response_tokens_RM: Array
    response_mask_RM: Array
    prompt_length: int = flax.struct.field(pytree_node=False)

    @property
    def num_rows(self) -> int:
        return self.tokens_RL.shape[0]

    def as_dict(self) -> dict[str, Array]:
        """The DESIGN batch dict: tokens, attention_mask, loss_mask, positions,
        plus `sample_logps` (the behaviour policy's log-probs on the grid)."""
        return {"tokens": self.tokens_RL, "attention_mask": self.attention_mask_RL,
                "loss_mask": self.loss_mask_RL, "positions": self.positions_RL,
                "sample_logps": self.sample_logps_RL}


@flax.struct.dataclass
class SampleOutput:
    """What `generate` returns; R = B * num_samples rows, M = max_new_tokens.

    Attributes:
      tokens_RM: int32 `[R, M]` drawn tokens; the stop token is included,
        after it the row holds pad_id.
      logps_RM: float32 `[R, M]`, log-prob of each drawn token under the
        processed distribution it was drawn from (see `generate` for greedy);
        0 at masked slots.
      mask_RM: bool `[R, M]`, True for the first `lengths_R[r]` columns.
      lengths_R: int32 `[R]`, response lengths (stop token counted).
      prompt_tokens_RP, prompt_mask_RP: `[R, P]` the prompts, left-aligned
        (real tokens moved to the right end of the row) and repeated per
        sample.
    """
    tokens_RM: Array
    logps_RM: Array
    mask_RM: Array
    lengths_R: Array
    prompt_tokens_RP: Array
    prompt_mask_RP: Array

    def sequences(self) -> SampleBatch:
        """Prompt + response as a `SampleBatch` (the training-path arrays)."""
        return _sequences(self)


@jax.jit
def _sequences(out: SampleOutput) -> SampleBatch:
    R, T = out.prompt_tokens_RP.shape
    tokens = jnp.concatenate([out.prompt_tokens_RP, out.tokens_RM], axis=1)
    mask = jnp.concatenate([out.prompt_mask_RP, out.mask_RM], axis=1)
    loss_mask = jnp.concatenate([jnp.zeros((R, T), bool), out.mask_RM], axis=1)
    # logps[:, t] scores token t + 1: response column i lives at T - 1 + i.
    grid = jnp.concatenate([jnp.zeros((R, T - 1), jnp.float32), out.logps_RM,
                            jnp.zeros((R, 1), jnp.float32)], axis=1)
    return SampleBatch(tokens_RL=tokens, attention_mask_RL=mask, loss_mask_RL=loss_mask,
                       positions_RL=positions_from_mask(mask), sample_logps_RL=grid,
                       prompt_tokens_RP=out.prompt_tokens_RP, prompt_mask_RP=out.prompt_mask_RP,
                       response_tokens_RM=out.tokens_RM, response_mask_RM=out.mask_RM,
                       prompt_length=T)


def _as_typed_keys(rng: Array) -> Array:
    rng = jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _key_batch_shape(rng) -> tuple[int, ...]:
    """Shape of the key batch (without the raw-key data dimension)."""
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return tuple(rng.shape)
    return tuple(rng.shape[:-1])


def sample_keys(rng: Array, batch_size: int, num_samples: int) -> Array:
    """The per-sample keys `generate` uses: typed keys `[B, N]`.

    `K[b, j] = fold_in(fold_in(rng, b), j)`; token t of that sample is drawn
    with `fold_in(K[b, j], t)`. Accepts a typed key (`jax.random.key`) or a
    raw one (`jax.random.PRNGKey`); a `[B, N]` batch of keys is returned
    as typed keys unchanged.

    Raises:
      ValueError: rng is neither one key nor a `[B, N]` batch of keys.
    """
    shape = _key_batch_shape(jnp.asarray(rng))
    keys = _as_typed_keys(rng)
    if shape == (batch_size, num_samples):
        return keys
    if shape != ():
        raise ValueError(f"rng must be one key or a [{batch_size}, {num_samples}] batch of "
                         f"keys, got key batch shape {shape}")
    per_prompt = jax.vmap(lambda b: jax.random.fold_in(keys, b))(jnp.arange(batch_size))
    return jax.vmap(lambda k: jax.vmap(lambda j: jax.random.fold_in(k, j))(
        jnp.arange(num_samples)))(per_prompt)


def _left_align(tokens_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Moves each row's real tokens to its right end, keeping their order."""
    order = jnp.argsort(mask_BT.astype(jnp.int32), axis=1, stable=True)
    return (jnp.take_along_axis(tokens_BT, order, axis=1),
            jnp.take_along_axis(mask_BT, order, axis=1))


def _check_prompts(tokens_BT: np.ndarray, mask_BT: np.ndarray, vocab_size: int) -> None:
    """Host-side check: every row has a real token and real ids are in range.

    Raises:
      ValueError: naming the first offending row.
    """
    empty = np.flatnonzero(~mask_BT.astype(bool).any(axis=1))
    if empty.size:
        raise ValueError(f"prompt row {int(empty[0])} has no attended token (all-False mask); "
                         "every prompt needs at least one real token, e.g. BOS")
    bad = mask_BT.astype(bool) & ((tokens_BT < 0) | (tokens_BT >= vocab_size))
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise ValueError(f"prompt token id {int(tokens_BT[b, t])} at row {b}, column {t} is "
                         f"outside the vocabulary [0, {vocab_size})")


def two_level_sample(keys_R: Array, logp_RV: Array, block: int = 256) -> Array:
    """Exact categorical draws with far fewer random numbers than Gumbel-max.

    The vocabulary is cut into blocks of `block` tokens. A block is drawn
    with probability P(block) = Σ_{i in block} p_i (Gumbel-max over the
    block log-masses), then a token within it with probability p_i / P(block)
    (Gumbel-max over the block): P(i) = p_i exactly. That is V/block + block
    Gumbel draws per row instead of V; for a 49k vocabulary on CPU the plain
    `jax.random.categorical` dominated the decode step. Tokens with zero
    probability (removed by top-k/top-p, log-prob -1e30) are never drawn.

    Args:
      keys_R: `[R]` PRNG keys.
      logp_RV: float32 `[R, V]` normalized log-probs.
      block: tokens per block (static).

    Returns:
      int32 `[R]` token ids.
    """
    R, V = logp_RV.shape
    if V <= block:
        return jax.vmap(jax.random.categorical)(keys_R, logp_RV).astype(jnp.int32)
    nb = -(-V // block)
    lp = jnp.pad(logp_RV, ((0, 0), (0, nb * block - V)), constant_values=NEG_INF)
    lp_RNB = lp.reshape(R, nb, block)
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys_R)
    b_R = jax.vmap(jax.random.categorical)(keys[:, 0], jax.nn.logsumexp(lp_RNB, axis=-1))
    within_RB = jnp.take_along_axis(lp_RNB, b_R[:, None, None], axis=1)[:, 0]
    j_R = jax.vmap(jax.random.categorical)(keys[:, 1], within_RB)
    return (b_R * block + j_R).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _compiled(model, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              stop_ids: tuple[int, ...], pad_id: int, num_samples: int):
    """One jitted sampler per (model, hyper-parameters); jit caches per shape."""
    M, n = max_new_tokens, num_samples
    greedy = temperature == 0.0

    def draw(logits_RV, keys_R, t):
        """Token and its log-prob for each row at response column t."""
        if greedy:
            logp = process_logits(logits_RV, 1.0, top_k, top_p)
            tok = jnp.argmax(logits_RV.astype(jnp.float32), axis=-1).astype(jnp.int32)
        else:
            logp = process_logits(logits_RV, temperature, top_k, top_p)
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_R, t)
            tok = two_level_sample(step_keys, logp)
        return tok, jnp.take_along_axis(logp, tok[:, None], axis=1)[:, 0]

    def is_stop(tok_R):
        hit = jnp.zeros(tok_R.shape, bool)
        for s in stop_ids:
            hit = hit | (tok_R == s)
        return hit

    def run(params, prompt_BT, mask_BT, rng):
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
            return SampleOutput(tokens, logps, jnp.zeros((R, 0), bool), jnp.zeros((R,), jnp.int32),
                                prompt_RT, pmask_RT)
        keys_R = sample_keys(rng, B, n).reshape(R)

        # Prefill once for the B prompts; the last drawn token is never fed back,
        # so the cache needs T + M - 1 slots.
        cache = KVCache.init(model.config, B, T + M - 1)
        h_BTE, cache = model.apply(variables, prompt_BT, mask_BT, None, cache,
                                   method=model.hidden_states)
        logits_BV = model.apply(variables, h_BTE[:, -1:], method=model.logits)[:, 0]
        if n > 1:
            rep = lambda x: jnp.repeat(x, n, axis=0)
            cache = KVCache(k=tuple(map(rep, cache.k)), v=tuple(map(rep, cache.v)),
                            mask_BS=rep(cache.mask_BS), index=cache.index)
            logits_BV = rep(logits_BV)

        tok, lp = draw(logits_BV, keys_R, 0)
        tokens = tokens.at[:, 0].set(tok)
        logps = logps.at[:, 0].set(lp)
        lengths = jnp.ones((R,), jnp.int32)
        done = is_stop(tok)

        def cond(carry):
            t, _, _, done, _, _, _ = carry
            return (t < M) & ~jnp.all(done)

        def body(carry):
            t, cache, prev, done, tokens, logps, lengths = carry
            live = ~done
            # Stopped rows feed pad_id as an unattended token: the cache slot stays
            # invalid and their output is masked.
            logits, cache = model.apply(variables, prev[:, None], live[:, None], None, cache)
            tok, lp = draw(logits[:, 0], keys_R, t)
            tok = jnp.where(live, tok, pad_id)
            lp = jnp.where(live, lp, 0.0)
            tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], t, axis=1)
            logps = jax.lax.dynamic_update_slice_in_dim(logps, lp[:, None], t, axis=1)
            return (t + 1, cache, tok, done | (live & is_stop(tok)), tokens, logps,
                    lengths + live.astype(jnp.int32))

        if M > 1:
            carry = (jnp.asarray(1, jnp.int32), cache, tok, done, tokens, logps, lengths)
            _, _, _, _, tokens, logps, lengths = jax.lax.while_loop(cond, body, carry)
        mask = jnp.arange(M)[None, :] < lengths[:, None]
        return SampleOutput(tokens, logps, mask, lengths, prompt_RT, pmask_RT)

    return jax.jit(run)


def check_integer(name: str, value, low: int) -> None:
    """`value` is an integer (a Python or numpy int, not a bool nor a float
    such as 2.0) >= `low`, else a ValueError naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_decode_args(config, prompt_tokens_BP, prompt_mask_BP, rng, max_new_tokens: int,
                      temperature: float, num_samples: int, stop_ids):
    """The checks every decoder of this package makes (`generate`, guided decoding).

    Returns `(prompt_tokens_BP, prompt_mask_BP, stop_ids)` as jax arrays and a
    tuple of ids.

    Raises:
      ValueError: prompt tokens and mask not one `[B, P]` shape (P >= 1),
        max_new_tokens not an integer >= 0, temperature < 0 or not finite,
        num_samples not an integer >= 1 (a bool or a float such as 2.0 is
        refused), P + max_new_tokens > max_position_embeddings, rng
        neither one key nor a `[B, num_samples]` batch, or (for concrete
        prompts) a row with no real token or an id outside the vocabulary.
    """
    prompt_tokens_BP = jnp.asarray(prompt_tokens_BP)
    prompt_mask_BP = jnp.asarray(prompt_mask_BP)
    if prompt_tokens_BP.ndim != 2 or prompt_tokens_BP.shape != prompt_mask_BP.shape:
        raise ValueError(f"prompt tokens {prompt_tokens_BP.shape} and mask "
                         f"{prompt_mask_BP.shape} must be the same [B, P] shape")
    B, T = prompt_tokens_BP.shape
    if T < 1:
        raise ValueError("prompts need T >= 1 columns")
    check_integer("max_new_tokens", max_new_tokens, 0)
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    check_integer("num_samples", num_samples, 1)
    max_pos = config.max_position_embeddings
    if T + max_new_tokens > max_pos:
        raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_position_embeddings {max_pos}")
    shape = _key_batch_shape(jnp.asarray(rng))
    if shape not in ((), (B, num_samples)):
        raise ValueError(f"rng must be one key or a [{B}, {num_samples}] batch of keys, "
                         f"got key batch shape {shape}")
    if not isinstance(prompt_tokens_BP, jax.core.Tracer):  # concrete: check on the host
        _check_prompts(_readable_rows(prompt_tokens_BP), _readable_rows(prompt_mask_BP), config.vocab_size)
    if isinstance(stop_ids, (int, np.integer)):
        stop_ids = (stop_ids,)
    return prompt_tokens_BP, prompt_mask_BP, tuple(stop_ids)


def _readable_rows(x: Array) -> np.ndarray:
    """The rows of `x` this process can read: all of them, except for an
    array split over several processes (a pod), where each process checks
    the shards on its own devices (so together every row is checked)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.concatenate([np.asarray(shard.data) for shard in x.addressable_shards])


def generate(model, params, prompt_tokens_BP: Array, prompt_mask_BP: Array, *, rng: Array,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids=(), pad_id: int = 0, num_samples: int = 1) -> SampleOutput:
    """Samples `num_samples` continuations of each prompt with the KV cache.

    The prompts are prefilled once (batch B); the cache is then repeated
    `num_samples` times along the batch and all B * N continuations are
    decoded together, one token per row per step, in one jitted
    `lax.while_loop` that ends when every row has stopped. The jitted
    function is cached per (model, hyper-parameters) and compiled once per
    input shape.

    Args:
      model: a `jaxreward.models.llama.Decoder`.
      params: its parameters.
      prompt_tokens_BP: int `[B, P]`, P >= 1; any padding side.
      prompt_mask_BP: bool `[B, P]`, True at real prompt tokens. Every row
        needs at least one real token (e.g. BOS): an empty prompt has no
        next-token distribution and its samples are meaningless.
      rng: one PRNG key (typed or raw), or a `[B, N]` batch of keys, one per
        sample (see `sample_keys` and the module docstring).
      max_new_tokens: M >= 0 response columns; 0 returns `[R, 0]` outputs.
      temperature: > 0 samples from softmax(logits / temperature) after
        top-k/top-p. 0 is greedy: the token is the argmax of the raw logits
        (lowest id on ties) and its reported log-prob is taken under
        temperature 1 with the same top_k/top_p, i.e. what
        `token_logps(..., temperature=1.0, top_k=, top_p=)` recomputes.
      top_k: keep the k most likely tokens (0 = all).
      top_p: nucleus mass in (0, 1] (1 = all).
      stop_ids: token ids that end a row (put the tokenizer's EOS here). The
        stop token is emitted, counted in the length, and followed by pad_id.
      pad_id: id written after a row stops (masked out).
      num_samples: N >= 1 continuations per prompt.

    Returns:
      `SampleOutput` with R = B * N rows; row b * N + j is sample j of
      prompt b. `out.sequences()` gives the training-path arrays.

    Raises:
      ValueError: bad shapes, max_new_tokens not an integer >= 0, temperature < 0
        (or NaN), top_k not an integer >= 0, top_p outside (0, 1], num_samples not
        an integer >= 1 (integers: Python or numpy ints, not bools or floats), rng of the wrong
        shape, or T + max_new_tokens > model.config.max_position_embeddings.
    """
    check_integer("top_k", top_k, 0)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_tokens_BP, prompt_mask_BP, stop_ids = check_decode_args(
        model.config, prompt_tokens_BP, prompt_mask_BP, rng, max_new_tokens, temperature, num_samples,
        stop_ids)
    fn = _compiled(model, int(max_new_tokens), float(temperature), int(top_k), float(top_p),
                   tuple(sorted({int(s) for s in stop_ids})), int(pad_id), int(num_samples))
    return fn(params, prompt_tokens_BP, prompt_mask_BP, rng)
