"""Heads on the decoder: scalar / multi-objective reward model.

`RewardModel` = `Decoder` backbone + a linear head with K outputs read from
a pooled hidden state: the last attended position of each row (found from
the attention mask, never from token ids), or the mean over the response
tokens. K = 1 is the Bradley–Terry reward model of "Training
language models to follow instructions with human feedback" (2022); K > 1
gives one reward per objective (e.g. helpfulness, harmlessness).

Params: `{"backbone": <Decoder params>, "head": {"kernel": [E, K]}}`,
so a pretrained decoder's params drop in as `backbone`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxreward.models.llama import Decoder, LlamaConfig, last_token_index


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
