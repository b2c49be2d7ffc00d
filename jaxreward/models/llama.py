"""A Llama-family decoder-only transformer in Flax linen.

RMSNorm, rotary position embeddings (RoPE, configurable base), grouped-query
attention, SwiGLU MLP, tied or untied embeddings, optional Q/K/V bias (Qwen2)
and an explicit KV cache for decoding. Parameters and activations carry
logical axis names (see `jaxreward.parallel.AXIS_RULES`).

The module is pure: `model.apply({"params": params}, tokens_BT,
attention_mask=mask_BT)` returns logits `[B, T, V]`. Parameter layout follows
HF transformers' Llama (q/k/v/o projections with the rotate-half RoPE
convention), so HF safetensors map onto it one-to-one.

References: "LLaMA: Open and Efficient Foundation Language Models" (2023);
"RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021);
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints" (2023); "GLU Variants Improve Transformer" (2020).
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters (sizes are counts, not bytes)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None        # default hidden_size // num_heads
    rope_theta: float = 10000.0        # RoPE base
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True        # lm_head shares the embedding matrix
    qkv_bias: bool = False             # Qwen2 has biases on q/k/v
    max_position_embeddings: int = 2048
    dtype: str = "float32"             # activation/compute dtype
    param_dtype: str = "float32"
    remat: bool = False                # rematerialize each block in backward
    attention_impl: str | None = None  # None: grouped_attention; else jax.nn.dot_product_attention's impl
    attention_query_chunk: int = 128   # cache-free causal attention in query chunks of >= this many
                                       # positions (only when T >= 2 chunks; 0 = one chunk)

    def __post_init__(self):
        chunk = self.attention_query_chunk
        if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, numbers.Integral) or chunk < 0:
            raise ValueError(f"attention_query_chunk={chunk!r} must be an integer >= 0 "
                             "(0 = attention in one query chunk)")
        object.__setattr__(self, "attention_query_chunk", int(chunk))  # numpy integers too
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
                             f"{self.num_kv_heads} (grouped-query attention shares each kv head "
                             "among num_heads / num_kv_heads query heads)")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        e, f, v, d = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += d * (self.num_heads + 2 * self.num_kv_heads)
        block = attn + 3 * e * f + 2 * e
        head = 0 if self.tie_embeddings else v * e
        return v * e + self.num_layers * block + e + head


@flax.struct.dataclass
class KVCache:
    """Keys/values of past tokens, one `[B, KV, S, D]` pair per layer.

    Head-major, the layout `grouped_attention` reads, so a decode step only
    writes its new slot and never transposes the whole cache (that copy was
    ~6% of a SmolLM2 decode step).

    Attributes:
      k, v: tuples (one per layer) of `[B, num_kv_heads, S, head_dim]` arrays.
      mask_BS: bool `[B, S]`, True where a slot holds an attended token.
      index: int32 scalar, the next slot to write (same for every row).
    """
    k: tuple[Array, ...]
    v: tuple[Array, ...]
    mask_BS: Array
    index: Array

    @classmethod
    def init(cls, config: LlamaConfig, batch_size: int, max_length: int) -> "KVCache":
        shape = (batch_size, config.num_kv_heads, max_length, config.dim_per_head)
        zeros = lambda: jnp.zeros(shape, jnp.dtype(config.dtype))
        return cls(k=tuple(zeros() for _ in range(config.num_layers)),
                   v=tuple(zeros() for _ in range(config.num_layers)),
                   mask_BS=jnp.zeros((batch_size, max_length), bool),
                   index=jnp.zeros((), jnp.int32))

    @property
    def lengths_B(self) -> Array:
        """Number of attended tokens each row holds."""
        return self.mask_BS.sum(axis=1).astype(jnp.int32)


def positions_from_mask(attention_mask_BT: Array, offset_B: Array | None = None) -> Array:
    """Position ids 0, 1, 2, ... over attended tokens (padding keeps its left
    neighbour's id), so left and right padding give a token the same position.
    """
    pos = jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=1) - 1
    pos = jnp.maximum(pos, 0)
    if offset_B is not None:
        pos = pos + offset_B[:, None]
    return pos


def rope(x_BTHD: Array, positions_BT: Array, theta: float) -> Array:
    """Rotary embedding, HF "rotate half" layout (pairs (i, i + D/2))."""
    d = x_BTHD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BT[..., None].astype(jnp.float32) * inv_freq  # [B,T,D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32.astype(self.dtype) * scale.astype(self.dtype))


def _dense(features, axes, use_bias, cfg: LlamaConfig, name, in_axis=-1):
    init = nn.initializers.normal(stddev=0.02)
    return nn.DenseGeneral(
        features=features, axis=in_axis, use_bias=use_bias, name=name,
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-len(features) if isinstance(features, tuple) else -1:]),
    )


def grouped_attention(q_BTHD: Array, k_BKSD: Array, v_BKSD: Array, mask_BTS: Array) -> Array:
    """Softmax attention with grouped key/value heads, as one batched GEMM per kv head.

    The G = H / K query heads that share kv head k are stacked along the
    query axis (`[B, K, G·T, D]`), so the scores of a kv head are one
    `[G·T, D] @ [D, S]` product and keys and values are never repeated.
    Scores and softmax are float32; the probabilities are cast to the
    values' dtype for the second product (the arithmetic of
    `jax.nn.dot_product_attention`'s XLA path). On XLA CPU this layout ran
    a 4.5M-param training step's attention about 20% faster than
    `jax.nn.dot_product_attention`, which puts the heads on a separate axis.

    Args:
      q_BTHD: queries `[B, T, H, D]`; k_BKSD, v_BKSD: keys and values
        head-major `[B, K, S, D]` (the `KVCache` layout), K divides H.
      mask_BTS: bool `[B, T, S]`, True where query t may read key s; every
        query row must have at least one True.

    Returns:
      `[B, T, H, D]` in the queries' dtype.
    """
    B, T, H, D = q_BTHD.shape
    K = k_BKSD.shape[1]
    G = H // K
    q = rearrange(q_BTHD, "b t (k g) d -> b k (g t) d", k=K)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k_BKSD, preferred_element_type=jnp.float32)
    scores = scores * (D ** -0.5)
    visible = jnp.tile(mask_BTS, (1, G, 1))[:, None]  # row g·T + t is query t of group g
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BKSD.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v_BKSD)
    return rearrange(out, "b k (g t) d -> b t (k g) d", g=G).astype(q_BTHD.dtype)


MAX_QUERY_CHUNKS = 8


def causal_grouped_attention(q_BTHD: Array, k_BKTD: Array, v_BKTD: Array, mask_BTT: Array,
                             min_chunk: int = 128) -> Array:
    """`grouped_attention` of T queries over the same T keys under a causal mask, in query chunks.

    Query chunk [lo, hi) reads keys [0, hi) only. Under a causal mask no
    query of the chunk sees a key at or after hi, so every softmax row
    covers the same visible keys as in one chunk and the result is the
    same function; the scores computed shrink from T² to (n + 1) / 2n of
    it for n chunks. A chunk holds whole rows, so no online softmax is
    needed. With SmolLM2's heads (8 rows, T = 384, float32, XLA CPU),
    three chunks of 128 ran attention's forward + backward in 71 ms
    against 112 ms in one (benchmarks/README.md).

    The chunks are at least `min_chunk` query positions: n = T // min_chunk,
    at most `MAX_QUERY_CHUNKS`; below 2 · min_chunk it is one chunk. Short
    chunks are avoided because XLA CPU's masked softmax over few or short
    rows is not bitwise independent of the batch size (see
    `benchmarks/probe_batch_invariance.py`); at 128 and more it was in
    every shape probed, so two passes over different batch sizes still
    agree exactly.

    Args:
      q_BTHD: `[B, T, H, D]`; k_BKTD, v_BKTD: `[B, K, T, D]` (the same T
        positions); mask_BTT: bool `[B, T, T]`, causal (False above the
        diagonal; the rest free) with every row non-empty.
      min_chunk: the least query positions per chunk; 0 = one chunk.

    Returns:
      `[B, T, H, D]` in the queries' dtype.
    """
    T = q_BTHD.shape[1]
    n = min(T // min_chunk, MAX_QUERY_CHUNKS) if min_chunk > 0 else 1
    if n <= 1:
        return grouped_attention(q_BTHD, k_BKTD, v_BKTD, mask_BTT)
    bounds = [round(T * i / n) for i in range(n + 1)]
    return jnp.concatenate([
        grouped_attention(q_BTHD[:, lo:hi], k_BKTD[:, :, :hi], v_BKTD[:, :, :hi], mask_BTT[:, lo:hi, :hi])
        for lo, hi in zip(bounds[:-1], bounds[1:])], axis=1)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache_kv=None, cache_index=None):
        cfg = self.config
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        B = x_BTE.shape[0]
        # Projections run on [B*T, E]: a 2-D activation keeps every forward and
        # backward matmul a plain GEMM (3-D operands were ~3x slower in the
        # weight-gradient on XLA CPU). The kernels are [E, heads, D]
        # (DenseGeneral), so the projections themselves split the heads.
        x_NE = rearrange(x_BTE, "b t e -> (b t) e")
        q = _dense((h, d), ("embed", "heads", "kv"), cfg.qkv_bias, cfg, "q_proj")(x_NE)
        k = _dense((kv, d), ("embed", "kv_heads", "kv"), cfg.qkv_bias, cfg, "k_proj")(x_NE)
        v = _dense((kv, d), ("embed", "kv_heads", "kv"), cfg.qkv_bias, cfg, "v_proj")(x_NE)
        q, k, v = (rearrange(a, "(b t) h d -> b t h d", b=B) for a in (q, k, v))
        q = rope(q, positions_BT, cfg.rope_theta)
        k = rope(k, positions_BT, cfg.rope_theta)
        # Keys and values head-major [B, KV, S, D], the cache's layout.
        k, v = (rearrange(a, "b s k d -> b k s d") for a in (k, v))
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=2)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=2)
            new_kv = (k, v)
        # GQA: query head i reads kv head i // (h // kv), as HF's repeat_kv.
        # o_proj contracts (heads, D).
        if cfg.attention_impl is None and cache_kv is None:
            # No cache: causal self-attention over the same T positions.
            out = causal_grouped_attention(q, k, v, mask_BTS, cfg.attention_query_chunk)
        elif cfg.attention_impl is None:
            out = grouped_attention(q, k, v, mask_BTS)
        else:
            k, v = (rearrange(a, "b k s d -> b s k d") for a in (k, v))
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask_BTS[:, None, :, :], implementation=cfg.attention_impl)
        out = _dense(cfg.hidden_size, ("heads", "kv", "embed"), False, cfg, "o_proj",
                     in_axis=(-2, -1))(rearrange(out, "b t h d -> (b t) h d"))
        return rearrange(out, "(b t) e -> b t e", b=B), new_kv


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTE):
        cfg = self.config
        x_NE = x_BTE.reshape(-1, x_BTE.shape[-1])  # 2-D GEMMs, see Attention
        gate = _dense(cfg.intermediate_size, ("embed", "mlp"), False, cfg, "gate_proj")(x_NE)
        up = _dense(cfg.intermediate_size, ("embed", "mlp"), False, cfg, "up_proj")(x_NE)
        out = _dense(cfg.hidden_size, ("mlp", "embed"), False, cfg, "down_proj")(nn.silu(gate) * up)
        return out.reshape(x_BTE.shape)


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, mask_BTS, cache_kv=None, cache_index=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype),
                                    jnp.dtype(cfg.param_dtype), name=name)
        a, new_kv = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x_BTE), positions_BT, mask_BTS, cache_kv, cache_index)
        x_BTE = x_BTE + a
        x_BTE = x_BTE + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x_BTE))
        return x_BTE, new_kv


class Decoder(nn.Module):
    """Decoder-only transformer.

    Attributes:
      config: the architecture.
      frozen_blocks: the output of block `frozen_blocks - 1` is wrapped in
        `stop_gradient`, so backward stops there and the embedding and the
        first `frozen_blocks` blocks get no gradient (used to train only the
        top blocks and a head). 0 trains everything.
    """
    config: LlamaConfig
    frozen_blocks: int = 0

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
        block = nn.remat(Block, static_argnums=()) if cfg.remat else Block
        self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), False, cfg, "lm_head")

    def hidden_states(self, tokens_BT: Array, attention_mask: Array | None = None,
                      positions: Array | None = None, cache: KVCache | None = None,
                      branch_ids: Array | None = None):
        """Final-norm hidden states `[B, T, E]` (and the updated cache).

        Args:
          tokens_BT: int32 `[B, T]`; ids in [0, vocab_size) at attended slots
            (an out-of-range id there gives NaN, as jnp.take does); masked
            slots may hold any id.
          attention_mask: bool `[B, T]`, True at real tokens (default all).
          positions: int32 `[B, T]` (default: counted from the mask, continuing
            from the cache's lengths when a cache is given).
          cache: a `KVCache`; when given, the T tokens are written at slots
            `cache.index .. cache.index + T - 1` and attend to all valid
            earlier slots.
          branch_ids: int32 `[B, T]` for a packed row of one shared prefix
            and several continuations of it (no cache): 0 on the prefix,
            k >= 1 on continuation k. A token then attends to earlier
            tokens of its own branch and of the prefix only, so each
            continuation sees exactly what it would see alone; give
            `positions` that restart after the prefix for each branch.
            (Prefix sharing: "Accelerating Direct Preference Optimization
            with Prefix Sharing", 2024.)

        Returns:
          `h_BTE` if cache is None, else `(h_BTE, new_cache)`.
        """
        B, T = tokens_BT.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), bool)
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask)
            causal = jnp.tril(jnp.ones((T, T), bool))
            mask_BTS = causal[None] & attention_mask[:, None, :]
            if branch_ids is not None:
                key = branch_ids[:, None, :]
                mask_BTS = mask_BTS & ((key == 0) | (key == branch_ids[:, :, None]))
            new_mask = None
        else:
            if branch_ids is not None:
                raise ValueError("branch_ids (packed prefix + branches) is for cache-free forwards")
            if positions is None:
                positions = positions_from_mask(attention_mask, cache.lengths_B)
            S = cache.mask_BS.shape[1]
            new_mask = jax.lax.dynamic_update_slice_in_dim(
                cache.mask_BS, attention_mask, cache.index, axis=1)
            slot_S = jnp.arange(S)
            query_slot_T = cache.index + jnp.arange(T)
            mask_BTS = (slot_S[None, :] <= query_slot_T[:, None])[None] & new_mask[:, None, :]
        # A query row with no visible key (padding) would softmax over nothing;
        # let it see itself so every row stays finite. Such rows are padding
        # and never read.
        if cache is None:
            mask_BTS = mask_BTS | jnp.eye(T, dtype=bool)[None]
        else:
            mask_BTS = mask_BTS | (jnp.arange(S)[None, :] == query_slot_T[:, None])[None]
        # Ids at masked slots may be anything (pad_id = vocab_size, -1, ...):
        # an out-of-range id embeds as NaN, and 0 * NaN in attention would
        # leak into real positions. Masked slots read token 0 instead.
        x = self.embed_tokens(jnp.where(attention_mask, tokens_BT, 0))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x, out_kv = layer(x, positions, mask_BTS, kv, None if cache is None else cache.index)
            if cache is not None:
                new_k.append(out_kv[0])
                new_v.append(out_kv[1])
            if i + 1 == self.frozen_blocks:
                # Backward stops here: embeddings and blocks 0..i get no gradient.
                x = jax.lax.stop_gradient(x)
        h = self.norm(x)
        if cache is None:
            return h
        return h, KVCache(k=tuple(new_k), v=tuple(new_v), mask_BS=new_mask,
                          index=cache.index + T)

    def logits(self, h_BTE: Array) -> Array:
        """Vocabulary logits `[B, T, V]` (compute dtype) from hidden states."""
        if self.config.tie_embeddings:
            return self.embed_tokens.attend(h_BTE)
        return self.lm_head(h_BTE)

    def __call__(self, tokens_BT: Array, attention_mask: Array | None = None,
                 positions: Array | None = None, cache: KVCache | None = None):
        """Logits `[B, T, V]`; with a cache, `(logits, new_cache)`."""
        out = self.hidden_states(tokens_BT, attention_mask, positions, cache)
        if cache is None:
            return self.logits(out)
        h, new_cache = out
        return self.logits(h), new_cache


def last_token_index(attention_mask_BT: Array) -> Array:
    """Index of the last True in each row of the mask (0 for an empty row).

    Taken from the mask, never from token ids, so it is the same for left
    and right padding.
    """
    T = attention_mask_BT.shape[1]
    idx = jnp.arange(T)[None, :]
    return jnp.max(jnp.where(attention_mask_BT.astype(bool), idx, 0), axis=1)
