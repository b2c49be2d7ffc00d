"""Heads on the decoder: scalar / multi-objective reward model.

`RewardModel` = `Decoder` backbone + a linear head with K outputs read at the
last attended position of each row (found from the attention mask, never
from token ids). K = 1 is the Bradley–Terry reward model of "Training
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
    """
    config: LlamaConfig
    num_objectives: int = 1
    frozen_blocks: int = 0

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

    def __call__(self, tokens_BT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Rewards float32 `[B, K]` at the last attended token of each row
        (0 for a row with no attended token)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens_BT.shape, bool)
        h_BTE = self.backbone.hidden_states(tokens_BT, attention_mask, positions)
        idx_B = last_token_index(attention_mask)
        h_BE = jnp.take_along_axis(h_BTE, idx_B[:, None, None], axis=1)[:, 0]
        rewards_BK = self.head(h_BE.astype(jnp.float32))
        # A row with no attended token has no reward: 0, not a value read
        # from padding.
        return jnp.where(attention_mask.any(axis=1)[:, None], rewards_BK, 0.0)
