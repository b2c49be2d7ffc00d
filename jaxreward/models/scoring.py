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
import numbers

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e30  # finite "minus infinity": keeps softmax and gradients NaN-free


def _check_processing(temperature: float, top_p: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def process_logits(logits_BV: Array, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, always_keep: Array | None = None) -> Array:
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
      always_keep: optional bool `[..., V]`: tokens kept whatever top-k/top-p
        say (scoring passes the target token: a token that was sampled was
        in the kept set when it was drawn, and a recomputation that rounds
        differently, e.g. in bfloat16, must not give it probability 0).

    Returns:
      float32 `[..., V]` normalized log-probs; removed tokens get -1e30.

    Raises:
      ValueError: temperature <= 0 or top_p outside (0, 1].
    """
    _check_processing(temperature, top_p)
    x = logits_BV.astype(jnp.float32)
    # Shift by the (constant) row max before scaling: log_softmax is shift
    # invariant, and a tiny temperature then sends logits towards -inf, never
    # +inf; the clamp keeps them finite so no NaN can appear.
    x = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    # 1/T is capped at 1e30 (below float32's max), so even a subnormal T
    # gives finite, greedy-like log-probs instead of 0 * inf = NaN.
    x = jnp.maximum(x * min(1.0 / temperature, 1e30), NEG_INF)
    x_all = x
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
    if always_keep is not None and (top_k or top_p < 1.0):
        x = jnp.where(always_keep, x_all, x)
    return jax.nn.log_softmax(x, axis=-1)


def shift_mask(loss_mask_BT: Array) -> Array:
    """Moves a token-aligned mask onto the log-prob grid.

    `loss_mask[b, t]` marks token t as a response token; its log-prob lives
    at `logps[b, t - 1]`. Returns bool `[B, T]` with a False last column.
    """
    m = loss_mask_BT.astype(bool)
    return jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def target_logps(logits_fn, h_BNE: Array, targets_BN: Array, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, chunk_size: int = 128) -> Array:
    """Chunked log p(targets[b, n] | hidden state h[b, n]) under the processed distribution.

    Args:
      logits_fn: maps hidden states `[B, C, E]` to logits `[B, C, V]`.
      h_BNE: hidden states, one per target.
      targets_BN: int32 token ids in [0, V).
      chunk_size: positions per chunk (N is padded up to a multiple); each
        chunk's float32 logits live only inside its `jax.checkpoint`.

    With top-k/top-p the target is always in the support: a target outside
    the kept set is scored over the set plus itself. A token the sampler
    drew was inside the set when it was drawn, but a recomputation that
    rounds differently (bfloat16, another batch layout) can put it just
    outside; it then gets a finite log-prob near the sampler's, never
    −1e30. For a token the set really excludes (another model's sample),
    this is the log-prob of the smallest support that contains it.

    Returns:
      float32 `[B, N]`.

    Raises:
      ValueError: temperature <= 0 or top_p outside (0, 1].
    """
    B, N, E = h_BNE.shape
    c = max(1, min(chunk_size, N))
    n = -(-N // c)
    pad = n * c - N
    h = jnp.pad(h_BNE, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets_BN, ((0, 0), (0, pad)))
    h_KBCE = h.reshape(B, n, c, E).swapaxes(0, 1)
    tgt_KBC = tgt.reshape(B, n, c).swapaxes(0, 1)

    _check_processing(temperature, top_p)
    whole_vocab = not top_k and top_p >= 1.0

    @jax.checkpoint
    def chunk(h_BCE, tgt_BC):
        logits = logits_fn(h_BCE)
        hit = tgt_BC[..., None] == jnp.arange(logits.shape[-1], dtype=tgt_BC.dtype)
        if whole_vocab:
            # No truncation: log p(y) = z_y - logsumexp(z), with z the scaled
            # logits of `process_logits` (the same shift, scale and clamp).
            # Never forming the [.., V] log-softmax saves whole passes over
            # the logits: a SmolLM2 output layer's forward + backward ran
            # ~28% faster than through `process_logits` (same values to
            # float32 round-off).
            z = logits.astype(jnp.float32)
            if temperature != 1.0:
                z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
                z = jnp.maximum(z * min(1.0 / temperature, 1e30), NEG_INF)
            return jnp.sum(jnp.where(hit, z, 0.0), axis=-1) - jax.nn.logsumexp(z, axis=-1)
        # The target stays in the top-k/top-p support (see `process_logits`).
        logp = process_logits(logits, temperature, top_k, top_p, always_keep=hit)
        # Pick the target by a one-hot select and sum (exact: one term is
        # non-zero). Its gradient is elementwise; `take_along_axis`'s is a
        # scatter, which XLA on CPU ran as a slow separate pass.
        return jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)

    out_KBC = jax.lax.map(lambda a: chunk(*a), (h_KBCE, tgt_KBC))
    return out_KBC.swapaxes(0, 1).reshape(B, n * c)[:, :N]


def logps_from_hidden(logits_fn, h_BTE: Array, tokens_BT: Array, **kwargs) -> Array:
    """Chunked per-token log-probs from hidden states.

    Args:
      logits_fn: maps hidden states `[B, C, E]` to logits `[B, C, V]`.
      h_BTE: final hidden states.
      tokens_BT: int32 tokens; targets are `tokens[:, 1:]`.
      **kwargs: temperature, top_k, top_p, chunk_size (see `target_logps`).

    Returns:
      float32 `[B, T]`; column T-1 is 0.

    Raises:
      ValueError: temperature <= 0 or top_p outside (0, 1].
    """
    T = h_BTE.shape[1]
    targets_BT = jnp.concatenate([tokens_BT[:, 1:], jnp.zeros_like(tokens_BT[:, :1])], axis=1)
    return target_logps(logits_fn, h_BTE, targets_BT, **kwargs).at[:, T - 1].set(0.0)


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

    Raises:
      ValueError: temperature <= 0 or top_p outside (0, 1] (before the
        forward pass).
    """
    _check_processing(kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0))
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


def branch_logps(model, params, tokens_BS: Array, attention_mask_BS: Array, positions_BS: Array,
                 branch_ids_BS: Array, prefix_last_B: Array, window_start_B: Array | int | None = None,
                 window: int = 0, **kwargs) -> Array:
    """Token log-probs of packed rows (prefix sharing), from ONE forward.

    A packed row holds a shared prefix (a prompt; branch id 0) followed by
    several continuations of it (branch ids 1, 2, ...; see
    `Decoder.hidden_states`), so the prefix is encoded once instead of once
    per continuation ("Accelerating Direct Preference Optimization with
    Prefix Sharing", 2024). A token is scored from the hidden state of the
    column before it, except the first token of a branch, which is scored
    from the prefix's last token.

    Args:
      model: a `Decoder`; params: its parameters.
      tokens_BS, attention_mask_BS, positions_BS, branch_ids_BS: the packed
        rows `[B, S]` (positions restart after the prefix for each branch).
      prefix_last_B: int32 `[B]`, the column of each row's last prefix token.
      window_start_B, window: score only columns `[start, start + window)`
        of each row (int32 `[B]` or one static int for all rows; `window`
        static): the output layer, the costliest part of scoring a small
        model with a large vocabulary, then runs over `window` columns
        instead of S. Callers pass the first continuation column, so the
        prefix, which no loss reads, is not scored. A start past
        `S - window` is moved back to it (the window still ends at S).
        None scores every column.
      **kwargs: temperature, top_k, top_p, chunk_size (see `target_logps`).

    Returns:
      float32 `[B, S]`, token-aligned: `[b, j]` = log p(tokens[b, j] | its
      branch's earlier tokens and the prefix). Column 0, padded columns and
      columns outside the window are 0; without a window, prefix columns
      hold the prefix's own log-probs.

    Raises:
      ValueError: a `window_start_B` without a positive static int `window`;
        temperature <= 0 or top_p outside (0, 1] (before the forward pass).
    """
    _check_processing(kwargs.get("temperature", 1.0), kwargs.get("top_p", 1.0))
    if window_start_B is not None and not (isinstance(window, numbers.Integral) and window > 0):
        raise ValueError(f"branch_logps: window_start_B needs window, the static number of columns "
                         f"to score (a positive int), got window={window!r}")
    variables = {"params": params}
    mask = jnp.asarray(attention_mask_BS).astype(bool)
    tokens_BS = jnp.where(mask, tokens_BS, 0)
    h = model.apply(variables, tokens_BS, mask, positions_BS, None, branch_ids_BS,
                    method=model.hidden_states)
    # The previous column's state; at a branch start, the prefix's last one.
    prev = jnp.concatenate([h[:, :1], h[:, :-1]], axis=1)
    start = (branch_ids_BS > 0) & (branch_ids_BS != jnp.concatenate(
        [branch_ids_BS[:, :1], branch_ids_BS[:, :-1]], axis=1))
    last = jnp.take_along_axis(h, prefix_last_B[:, None, None], axis=1)
    h_src = jnp.where(start[..., None], last, prev)
    logits_fn = functools.partial(model.apply, variables, method=model.logits)
    B, S = tokens_BS.shape
    if window_start_B is None or window >= S:
        lp = target_logps(logits_fn, h_src, tokens_BS, **kwargs)
    elif isinstance(window_start_B, int):
        lo = min(window_start_B, S - window)
        lp_win = target_logps(logits_fn, h_src[:, lo:lo + window], tokens_BS[:, lo:lo + window], **kwargs)
        lp = jnp.pad(lp_win, ((0, 0), (lo, S - lo - window)))
    else:
        lo_B = jnp.clip(jnp.asarray(window_start_B, jnp.int32), 0, S - window)
        cut = jax.vmap(lambda x, lo: jax.lax.dynamic_slice_in_dim(x, lo, window, axis=0))
        lp_win = target_logps(logits_fn, cut(h_src, lo_B), cut(tokens_BS, lo_B), **kwargs)
        lp = jax.vmap(lambda w, lo: jax.lax.dynamic_update_slice_in_dim(
            jnp.zeros((S,), w.dtype), w, lo, axis=0))(lp_win, lo_B)
    scored = mask & (jnp.arange(S) > 0)[None]
    return jnp.where(scored, lp, 0.0)


def group_token_logps(model, params, tokens_RL: Array, attention_mask_RL: Array,
                      positions_RL: Array, prompt_length: int, group_size: int, **kwargs) -> Array:
    """`token_logps` of groups of rows that share a prompt, with the prompt encoded once.

    Rows `g·G .. g·G + G − 1` must hold the same prompt in columns `[:P]`
    (as `generate(num_samples=G)` lays out a group) and their own response
    in `[P:]`. Each group becomes one packed row `[prompt | response 1 |
    ... | response G]` of P + G·M tokens (see `branch_logps`), so a forward
    costs P + G·M tokens per group instead of G·(P + M) ("Accelerating
    Direct Preference Optimization with Prefix Sharing", 2024, applied to a
    group of samples).

    Args:
      model, params: a `Decoder` and its parameters.
      tokens_RL, attention_mask_RL, positions_RL: `[R, L]` rows, L = P + M,
        R a multiple of G.
      prompt_length: P (static), >= 1.
      group_size: G (static).
      **kwargs: temperature, top_k, top_p, chunk_size.

    Returns:
      float32 `[R, L]` on the grid of `token_logps`: `[r, t]` = log p(token
      t + 1 | tokens <= t) for response tokens t + 1 >= P, 0 elsewhere (the
      prompt's own tokens are not scored) and where token t + 1 is padding.
    """
    R, L = tokens_RL.shape
    P, M = prompt_length, L - prompt_length
    mask_RL = jnp.asarray(attention_mask_RL).astype(bool)
    packed = pack_groups(tokens_RL, mask_RL, positions_RL, P, group_size)
    # Only the responses' columns [P, S) are scored: the prompt's own
    # log-probs are never read.
    lp = branch_logps(model, params, packed["tokens"], packed["attention_mask"], packed["positions"],
                      packed["branch_ids"], packed["prefix_last"], window_start_B=P,
                      window=group_size * M, **kwargs)
    grid = jnp.concatenate([jnp.zeros((R, P - 1), jnp.float32), lp[:, P:].reshape(R, M),
                            jnp.zeros((R, 1), jnp.float32)], axis=1)
    return jnp.where(shift_mask(mask_RL), grid, 0.0)


def pack_groups(tokens_RL: Array, attention_mask_RL: Array, positions_RL: Array,
                prompt_length: int, group_size: int) -> dict[str, Array]:
    """Packs groups of G rows that share a prompt into one row each (prefix sharing).

    Rows `g·G .. g·G + G − 1` hold the same prompt in columns `[:P]` and
    their own response in `[P:]` (L = P + M). Group g becomes the row
    `[prompt | response 1 | ... | response G]` of S = P + G·M columns.

    Args:
      tokens_RL, attention_mask_RL, positions_RL: `[R, L]`, R a multiple of G
        (masked tokens are replaced by 0).
      prompt_length: P (static), >= 1; group_size: G (static).

    Returns:
      `tokens`, `attention_mask`, `positions`, `branch_ids` (0 on the prompt,
      i on response i) `[R/G, S]`, and `prefix_last` int32 `[R/G]`, the
      column of each group's last attended prompt token.
    """
    R, L = tokens_RL.shape
    P, G = prompt_length, group_size
    M = L - P
    n = R // G
    mask_RL = jnp.asarray(attention_mask_RL).astype(bool)
    tokens_RL = jnp.where(mask_RL, tokens_RL, 0)
    group = lambda x: x.reshape(n, G, L)
    packed = lambda x: jnp.concatenate([x[:, 0, :P], x[:, :, P:].reshape(n, G * M)], axis=1)
    msk = group(mask_RL)
    branch = jnp.concatenate([jnp.zeros((P,), jnp.int32),
                              jnp.repeat(jnp.arange(1, G + 1, dtype=jnp.int32), M)])
    return {"tokens": packed(group(tokens_RL)), "attention_mask": packed(msk),
            "positions": packed(group(positions_RL)), "branch_ids": jnp.broadcast_to(branch, (n, P + G * M)),
            "prefix_last": jnp.max(jnp.where(msk[:, 0, :P], jnp.arange(P)[None], 0), axis=1)}


def unpack_groups(x_nS: Array, prompt_length: int, group_size: int) -> Array:
    """The inverse of `pack_groups` for a per-column quantity: `[R/G, S]` →
    `[R, L]`, row g·G + i reading the prompt columns `[:P]` of packed row g
    and response i's columns after them."""
    n, S = x_nS.shape
    P, G = prompt_length, group_size
    M = (S - P) // G
    prompt = jnp.repeat(x_nS[:, :P], G, axis=0)
    return jnp.concatenate([prompt, x_nS[:, P:].reshape(n * G, M)], axis=1)


def scored_mask(loss_mask_BT: Array, attention_mask_BT: Array | None = None) -> Array:
    """The log-prob grid's mask of scored response tokens.

    Token t counts when `loss_mask[t]` is True and, given an attention mask,
    the token before it is a real one: a response token that follows
    padding (left padding and no prompt) has no context and is not scored,
    whatever the padding side. bool `[B, T]` (see `shift_mask`).
    """
    m = shift_mask(loss_mask_BT)
    if attention_mask_BT is not None:
        m = m & jnp.asarray(attention_mask_BT).astype(bool)
    return m


def sequence_logps(logps_BT: Array, loss_mask_BT: Array, average: bool = False,
                   attention_mask_BT: Array | None = None) -> Array:
    """Sums (or averages) the response-token log-probs of each row.

    Args:
      logps_BT: from `token_logps`.
      loss_mask_BT: bool, token-aligned (True at response tokens).
      average: divide by the number of response tokens (0 for an empty row).
      attention_mask_BT: when given, a response token right after padding
        is not scored (see `scored_mask`).

    Returns:
      float32 `[B]`. Values at masked slots are selected away with `where`
      first, so NaN/inf there never reaches the result or its gradient.
    """
    m = scored_mask(loss_mask_BT, attention_mask_BT)
    total = jnp.sum(jnp.where(m, logps_BT, 0.0), axis=1)
    if not average:
        return total
    count = m.sum(axis=1)
    return total / jnp.maximum(count, 1)
