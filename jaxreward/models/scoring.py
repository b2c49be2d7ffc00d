"""Per-token log-probs: the one helper for training, reference, reward and sampling.

`logps_BT[b, t]` is log p(tokens[b, t + 1] | tokens[b, : t + 1]) under the
*processed* next-token distribution (temperature, top-k, top-p), in float32.
The last column has no next token and is 0. Logits are computed in chunks
over the sequence under `jax.checkpoint`, so the float32 `[B, T, V]` logits
are never all alive at once, in forward or in backward.

The sampler draws from `process_logits(...)` of the same model, so a token's
sampling log-prob and its recomputed training log-prob agree.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite "minus infinity": keeps softmax and gradients NaN-free


def process_logits(logits_BV: Array, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> Array:
    """Log-probabilities of the processed next-token distribution.

    Args:
      logits_BV: `[..., V]` logits, any float dtype (upcast to float32).
      temperature: > 0; logits are divided by it. (Greedy decoding is handled
        by the sampler, not here.)
      top_k: keep the k largest logits (0 = all). Ties at the k-th value are
        all kept.
      top_p: keep the smallest set of tokens whose probability reaches top_p
        (nucleus sampling, "The Curious Case of Neural Text Degeneration",
        2020); the most likely token is always kept. 1.0 keeps all.

    Returns:
      float32 `[..., V]` normalized log-probs; removed tokens get -1e30.

    Raises:
      ValueError: temperature <= 0 or top_p outside (0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    x = logits_BV.astype(jnp.float32)
    # Shift by the (constant) row max before scaling: log_softmax is shift
    # invariant, and a tiny temperature then sends logits towards -inf, never
    # +inf; the clamp keeps them finite so no NaN can appear.
    x = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    # 1/T is capped at 1e30 (below float32's max), so even a subnormal T
    # gives finite, greedy-like log-probs instead of 0 * inf = NaN.
    x = jnp.maximum(x * min(1.0 / temperature, 1e30), NEG_INF)
    if top_k and top_k < x.shape[-1]:
        # The k-th largest as the min of the top k (the same value): slicing
        # the last column instead made XLA on CPU sort the whole vocabulary
        # (≈ 100 ms per step at batch 8, V = 49152) rather than call top-k.
        kth = jnp.min(jax.lax.top_k(x, top_k)[0], axis=-1, keepdims=True)
        x = jnp.where(x >= kth, x, NEG_INF)
    if top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[..., ::-1]
        sorted_p = jax.nn.softmax(sorted_x, axis=-1)
        # Mass strictly before each sorted token (exclusive cumsum, so the most
        # likely token has exactly 0); keep while it is < top_p.
        cum = jnp.cumsum(sorted_p, axis=-1)
        before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
        keep_sorted = before < top_p
        # The threshold is the smallest kept *scaled logit*, compared with x
        # itself. Comparing recomputed log-probs instead is not exact under
        # jit: XLA may evaluate exp/log in two fusions with different rounding,
        # and then even the top token can fail `logp >= threshold`.
        threshold = jnp.min(jnp.where(keep_sorted, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x >= threshold, x, NEG_INF)
    return jax.nn.log_softmax(x, axis=-1)


def shift_mask(loss_mask_BT: Array) -> Array:
    """Moves a token-aligned mask onto the log-prob grid.

    `loss_mask[b, t]` marks token t as a response token; its log-prob lives
    at `logps[b, t - 1]`. Returns bool `[B, T]` with a False last column.
    """
    m = loss_mask_BT.astype(bool)
    return jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def logps_from_hidden(logits_fn, h_BTE: Array, tokens_BT: Array, *, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, chunk_size: int = 128) -> Array:
    """Chunked per-token log-probs from hidden states.

    Args:
      logits_fn: maps hidden states `[B, C, E]` to logits `[B, C, V]`.
      h_BTE: final hidden states.
      tokens_BT: int32 tokens; targets are `tokens[:, 1:]`.
      chunk_size: sequence positions per chunk (T is padded up to a multiple).

    Returns:
      float32 `[B, T]`; column T-1 is 0.
    """
    B, T, E = h_BTE.shape
    targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
    c = max(1, min(chunk_size, T))
    n = -(-T // c)
    pad = n * c - T
    h = jnp.pad(h_BTE, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h_NBCE = h.reshape(B, n, c, E).swapaxes(0, 1)
    tgt_NBC = tgt.reshape(B, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(h_BCE, tgt_BC):
        logp = process_logits(logits_fn(h_BCE), temperature, top_k, top_p)
        return jnp.take_along_axis(logp, tgt_BC[..., None], axis=-1)[..., 0]

    out_NBC = jax.lax.map(lambda a: chunk(*a), (h_NBCE, tgt_NBC))
    logps = out_NBC.swapaxes(0, 1).reshape(B, n * c)[:, :T]
    return logps.at[:, T - 1].set(0.0)


def token_logps(model, params, tokens_BT: Array, attention_mask_BT: Array,
                positions_BT: Array | None = None, **kwargs) -> Array:
    """Per-token log-probs of a `Decoder` (see module docstring).

    Args:
      model: a `jaxreward.models.llama.Decoder`.
      params: its parameter pytree.
      tokens_BT, attention_mask_BT, positions_BT: as for the model.
      **kwargs: temperature, top_k, top_p, chunk_size (see `logps_from_hidden`).

    Returns:
      float32 `[B, T]`, `logps[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`;
      0 where token t+1 is padding (and in the last column). Ids at padded
      slots are never read.
    """
    variables = {"params": params}
    attention_mask_BT = jnp.asarray(attention_mask_BT).astype(bool)
    # Padding ids may be anything (even out of range): read token 0 there, and
    # report 0 wherever the next token is padding.
    tokens_BT = jnp.where(attention_mask_BT, tokens_BT, 0)
    h = model.apply(variables, tokens_BT, attention_mask_BT, positions_BT,
                    method=model.hidden_states)
    logits_fn = functools.partial(model.apply, variables, method=model.logits)
    logps = logps_from_hidden(logits_fn, h, tokens_BT, **kwargs)
    return jnp.where(shift_mask(attention_mask_BT), logps, 0.0)


def sequence_logps(logps_BT: Array, loss_mask_BT: Array, average: bool = False) -> Array:
    """Sums (or averages) the response-token log-probs of each row.

    Args:
      logps_BT: from `token_logps`.
      loss_mask_BT: bool, token-aligned (True at response tokens).
      average: divide by the number of response tokens (0 for an empty row).

    Returns:
      float32 `[B]`. Values at masked slots are selected away with `where`
      first, so NaN/inf there never reaches the result or its gradient.
    """
    m = shift_mask(loss_mask_BT)
    total = jnp.sum(jnp.where(m, logps_BT, 0.0), axis=1)
    if not average:
        return total
    count = m.sum(axis=1)
    return total / jnp.maximum(count, 1)
