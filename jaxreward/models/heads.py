"""Heads on the decoder: scalar / multi-objective reward model, token value model.

`RewardModel` = `Decoder` backbone + a linear head with K outputs read from
a pooled hidden state: the last attended position of each row (found from
the attention mask, never from token ids), or the mean over the response
tokens. K = 1 is the Bradley–Terry reward model of "Training
language models to follow instructions with human feedback" (2022); K > 1
gives one reward per objective (e.g. helpfulness, harmlessness).

`ValueModel` = the same backbone + a one-output linear head applied at
every position: V[b, t] is the value of the state tokens[b, :t+1] (the PPO
critic of "Fine-Tuning Language Models from Human Preferences", 2019). Its
head starts at zero, or from a reward model's head
(`value_params_from_reward_model`), since with "last" pooling the value of
the full sequence is then exactly the reward.

Params of both: `{"backbone": <Decoder params>, "head": {"kernel": [E, K]}}`
(K = 1 for the value model), so a pretrained decoder's params drop in as
`backbone` (`value_params_from_policy`) and a K = 1 reward model's params
are a value model's.
"""
from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreward.models.llama import Decoder, LlamaConfig, last_token_index
from jaxreward.models.scoring import pack_groups, unpack_groups


class RewardModel(nn.Module):
    """Reward model: rewards float32 `[B, K]` for tokens `[B, T]`.

    Attributes:
      config: backbone architecture.
      num_objectives: K, outputs of the head.
      frozen_blocks: see `Decoder.frozen_blocks`.
      pooling: "last" — the hidden state of the last attended token (for
        our pairs, the EOS after the response); "mean" — the mean over the
        `pool_mask` tokens (the response tokens when the caller passes the
        loss mask; all attended tokens otherwise).
    """
    config: LlamaConfig
    num_objectives: int = 1
    frozen_blocks: int = 0
    pooling: str = "last"

    def setup(self):
        self.backbone = Decoder(self.config, frozen_blocks=self.frozen_blocks)
        # No bias: the Bradley–Terry likelihood depends only on reward
        # differences, so a bias gets a zero gradient up to round-off, which
        # Adam would turn into learning-rate-sized random steps.
        self.head = nn.Dense(
            self.num_objectives, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0 / (self.config.hidden_size + 1) ** 0.5),
                ("embed", "objectives")))

    def features(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, pool_mask: jax.Array | None = None
                 ) -> jax.Array:
        """Pooled hidden states float32 `[B, E]`: the head's input."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens_BT.shape, bool)
        attention_mask = attention_mask.astype(bool)
        h_BTE = self.backbone.hidden_states(tokens_BT, attention_mask, positions).astype(jnp.float32)
        if self.pooling == "mean":
            w_BT = attention_mask if pool_mask is None else pool_mask.astype(bool) & attention_mask
            w_BT = w_BT.astype(jnp.float32)
            return jnp.einsum("bt,bte->be", w_BT, h_BTE) / jnp.maximum(w_BT.sum(1), 1.0)[:, None]
        if self.pooling != "last":
            raise ValueError(f"pooling must be 'last' or 'mean', got {self.pooling!r}")
        idx_B = last_token_index(attention_mask)
        return jnp.take_along_axis(h_BTE, idx_B[:, None, None], axis=1)[:, 0]

    def score_features(self, features_BE: jax.Array, attention_mask: jax.Array | None = None
                       ) -> jax.Array:
        """Rewards float32 `[B, K]` from pooled features (e.g. cached ones);
        0 for rows whose `attention_mask` is all False."""
        rewards_BK = self.head(features_BE.astype(jnp.float32))
        if attention_mask is None:
            return rewards_BK
        # A row with no attended token has no reward: 0, not a value read
        # from padding.
        return jnp.where(attention_mask.astype(bool).any(axis=1)[:, None], rewards_BK, 0.0)

    def __call__(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, pool_mask: jax.Array | None = None
                 ) -> jax.Array:
        """Rewards float32 `[B, K]` (0 for a row with no attended token).

        Args:
          tokens_BT, attention_mask, positions: as `Decoder.hidden_states`.
          pool_mask: bool `[B, T]`, the tokens "mean" pooling averages (pass
            the response/loss mask); ignored by "last" pooling.
        """
        if attention_mask is None:
            attention_mask = jnp.ones(tokens_BT.shape, bool)
        return self.score_features(self.features(tokens_BT, attention_mask, positions, pool_mask),
                                   attention_mask)


class ValueModel(nn.Module):
    """Token value model: values float32 `[B, T]` for tokens `[B, T]`.

    `values[b, t]` = w · h[b, t], the head applied to the final hidden state
    at position t, which by causal attention depends only on tokens[b, :t+1]:
    the value of that state. The head (`kernel` float32 `[E, 1]`, no bias,
    like the reward head) is initialized to zero, so V ≡ 0 at init.

    Attributes:
      config: backbone architecture.
      frozen_blocks: see `Decoder.frozen_blocks`.
    """
    config: LlamaConfig
    frozen_blocks: int = 0

    def setup(self):
        self.backbone = Decoder(self.config, frozen_blocks=self.frozen_blocks)
        # Named and shaped as RewardModel's head with K = 1, so its weights copy over.
        self.head = nn.Dense(
            1, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "objectives")))

    def features(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
        """Final hidden states float32 `[B, T, E]`: the head's input at every
        position (`branch_ids`: packed rows, see `Decoder.hidden_states`)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens_BT.shape, bool)
        return self.backbone.hidden_states(tokens_BT, attention_mask.astype(bool), positions,
                                           branch_ids=branch_ids).astype(jnp.float32)

    def score_features(self, features_BTE: jax.Array, attention_mask: jax.Array | None = None
                       ) -> jax.Array:
        """Values float32 `[B, T]` from hidden states `[B, T, E]`; 0 where
        `attention_mask` is False (padding has no value)."""
        B, T, E = features_BTE.shape
        # A 2-D [B·T, E] GEMM, as the decoder's projections.
        values_BT = self.head(features_BTE.reshape(B * T, E).astype(jnp.float32)).reshape(B, T)
        if attention_mask is None:
            return values_BT
        return jnp.where(attention_mask.astype(bool), values_BT, 0.0)

    def __call__(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, branch_ids: jax.Array | None = None) -> jax.Array:
        """Values float32 `[B, T]`: `values[b, t]` is the value of tokens[b, :t+1];
        0 at masked slots.

        Args:
          tokens_BT, attention_mask, positions, branch_ids: as
            `Decoder.hidden_states` (positions default to counting attended
            tokens, so left and right padding give a real token the same
            value; with `branch_ids` a packed row's continuation sees only
            the prefix and itself).
        """
        if attention_mask is None:
            attention_mask = jnp.ones(tokens_BT.shape, bool)
        return self.score_features(self.features(tokens_BT, attention_mask, positions, branch_ids),
                                   attention_mask)


def group_values(value_model: ValueModel, params, tokens_RL: jax.Array, attention_mask_RL: jax.Array,
                 positions_RL: jax.Array, prompt_length: int, group_size: int) -> jax.Array:
    """`ValueModel` values of groups of rows that share a prompt, with the prompt encoded once.

    Rows `g·G .. g·G + G − 1` hold one prompt in columns `[:P]` and their own
    response in `[P:]` (the layout of `generate(num_samples=G)`). Each group
    is one packed row `[prompt | response 1 | ... | response G]`
    (`scoring.pack_groups`), so the backbone runs over P + G·M tokens per
    group instead of G·(P + M) ("Accelerating Direct Preference
    Optimization with Prefix Sharing", 2024, applied to a group of samples).

    Args:
      value_model, params: a `ValueModel` and its parameters.
      tokens_RL, attention_mask_RL, positions_RL: `[R, L]`, L = P + M, R a
        multiple of G.
      prompt_length: P (static), >= 1; group_size: G (static).

    Returns:
      float32 `[R, L]`, equal to `value_model.apply(..., tokens_RL,
      attention_mask_RL, positions_RL)` up to round-off: `[r, t]` is the
      value of row r's tokens[:t+1], 0 at masked slots.
    """
    packed = pack_groups(tokens_RL, attention_mask_RL, positions_RL, prompt_length, group_size)
    v_nS = value_model.apply({"params": params}, packed["tokens"], packed["attention_mask"],
                             packed["positions"], packed["branch_ids"])
    return unpack_groups(v_nS, prompt_length, group_size)


def value_params_from_reward_model(rm_params, objective: int | None = None) -> dict:
    """`ValueModel` params from `RewardModel` params: the same backbone, the reward head as the value head.

    With a "last"-pooling reward model, the value at the last attended token
    then equals the reward of the sequence (the usual PPO critic init, e.g.
    L. Ouyang et al., "Training language models to follow instructions with
    human feedback", 2022). With "mean" pooling it does not (the head is
    copied all the same).

    Args:
      rm_params: `{"backbone": ..., "head": {"kernel": float32 [E, K]}}`
        (unboxed, e.g. from `reward_io.load_reward_model`).
      objective: which of the K reward columns becomes the value head;
        required when K > 1.

    Returns:
      `{"backbone": <the same arrays>, "head": {"kernel": float32 [E, 1]}}`.

    Raises:
      ValueError: if the tree is not a reward model's, if K > 1 and
        `objective` is None, or if `objective` is not in [0, K).
    """
    if not isinstance(rm_params, Mapping) or set(rm_params) != {"backbone", "head"}:
        keys = sorted(rm_params) if isinstance(rm_params, Mapping) else type(rm_params).__name__
        raise ValueError(f"rm_params must be a RewardModel param tree with keys ['backbone', 'head'], "
                         f"got {keys}")
    kernel = rm_params["head"]["kernel"]
    if kernel.ndim != 2:
        raise ValueError(f"reward head kernel must be [E, K], got shape {tuple(kernel.shape)}")
    K = kernel.shape[1]
    if objective is None:
        if K != 1:
            raise ValueError(f"the reward model has K = {K} objectives: pass objective in [0, {K})")
        objective = 0
    if not 0 <= objective < K:
        raise ValueError(f"objective must be in [0, {K}), got {objective}")
    head = {"kernel": jnp.asarray(kernel[:, objective:objective + 1], jnp.float32)}
    return {"backbone": rm_params["backbone"], "head": head}


def value_params_from_policy(decoder_params) -> dict:
    """`ValueModel` params from plain `Decoder` params: the same backbone, a zero head.

    The LM head (`lm_head`, untied checkpoints only) is dropped: the value
    model never reads it, and the tree then equals `ValueModel.init`'s.

    Args:
      decoder_params: a `Decoder` param tree (unboxed), e.g. from
        `load_pretrained` or a policy's train state.

    Returns:
      `{"backbone": <the decoder's arrays>, "head": {"kernel": zeros float32 [E, 1]}}`.

    Raises:
      ValueError: if the tree has no `embed_tokens.embedding` `[V, E]`.
    """
    try:
        E = decoder_params["embed_tokens"]["embedding"].shape[1]
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError("decoder_params must be a Decoder param tree with embed_tokens.embedding "
                         f"[V, E] ({type(e).__name__}: {e})") from e
    backbone = {k: v for k, v in decoder_params.items() if k != "lm_head"}
    return {"backbone": backbone, "head": {"kernel": jnp.zeros((E, 1), jnp.float32)}}
