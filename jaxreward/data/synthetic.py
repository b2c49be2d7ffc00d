"""A synthetic preference task with a known gold reward (the quickstart).

Token ids are plain integers (no tokenizer). The gold reward of a response
is a hidden linear function of its token counts:

    r*(y) = Σ_v w_v · count_v(y) / sqrt(R)          w_v ~ N(0, 1), w_pad = 0

with R the response length, so r* has unit scale. Preference labels follow
the Bradley–Terry model of r*: y1 is preferred to y2 with probability
σ(β_label · (r*(y1) − r*(y2))). A proxy reward model trained on such pairs
can then be compared with the gold reward it approximates, as in "Scaling
Laws for Reward Model Overoptimization" (Gao et al., 2023).
"""
from __future__ import annotations

import dataclasses

import numpy as np

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class CountingTask:
    """Prompts of random tokens; gold reward linear in response token counts.

    Attributes:
      vocab_size: V; token 0 is padding and never drawn in prompts.
      prompt_length: P tokens per prompt.
      response_length: R tokens per response.
      seed: seeds the hidden weights w.
      label_beta: β of the Bradley–Terry labelling (1/reward unit).
    """
    vocab_size: int
    prompt_length: int
    response_length: int
    seed: int = 0
    label_beta: float = 1.0

    @property
    def gold_weights(self) -> np.ndarray:
        """float32 `[V]` hidden weights (w_pad = 0)."""
        w = np.random.default_rng([self.seed, 1]).standard_normal(self.vocab_size)
        w[PAD_ID] = 0.0
        return w.astype(np.float32)

    def prompts(self, n: int, seed: int) -> np.ndarray:
        """int32 `[n, P]` prompts, tokens uniform in [1, V)."""
        rng = np.random.default_rng([self.seed, 2, seed])
        return rng.integers(1, self.vocab_size, (n, self.prompt_length)).astype(np.int32)

    def gold_reward(self, response_tokens: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
        """float32 `[N]` gold rewards of responses `[N, R]` (masked tokens count 0)."""
        w = self.gold_weights[np.asarray(response_tokens)]
        return (np.where(response_mask, w, 0.0).sum(axis=1)
                / np.sqrt(self.response_length)).astype(np.float32)

    def label(self, gold_1: np.ndarray, gold_2: np.ndarray, seed: int) -> np.ndarray:
        """bool `[N]`: True where response 1 is preferred, drawn from
        σ(β · (r1 − r2))."""
        rng = np.random.default_rng([self.seed, 3, seed])
        p1 = 1.0 / (1.0 + np.exp(-self.label_beta * (gold_1 - gold_2)))
        return rng.random(len(p1)) < p1


def pair_arrays(prompts_NP: np.ndarray, resp_1_NR: np.ndarray, resp_2_NR: np.ndarray,
                prefer_1_N: np.ndarray, mask_1_NR: np.ndarray | None = None,
                mask_2_NR: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pair batch arrays (`chosen_*`/`rejected_*`: tokens, attention_mask,
    loss_mask, positions, all `[N, P + R]`) from two responses per prompt.

    Responses are right-padded: a masked response slot is padding.
    """
    N, P = prompts_NP.shape
    R = resp_1_NR.shape[1]
    ones = np.ones((N, R), bool)
    mask_1 = ones if mask_1_NR is None else mask_1_NR.astype(bool)
    mask_2 = ones if mask_2_NR is None else mask_2_NR.astype(bool)
    pick = prefer_1_N[:, None]
    out = {}
    for side, (r_a, m_a, r_b, m_b) in {"chosen": (resp_1_NR, mask_1, resp_2_NR, mask_2),
                                       "rejected": (resp_2_NR, mask_2, resp_1_NR, mask_1)}.items():
        resp = np.where(pick, r_a, r_b)
        mask = np.where(pick, m_a, m_b)
        tokens = np.concatenate([prompts_NP, np.where(mask, resp, PAD_ID)], axis=1).astype(np.int32)
        attn = np.concatenate([np.ones((N, P), bool), mask], axis=1)
        out[f"{side}_tokens"] = tokens
        out[f"{side}_attention_mask"] = attn
        out[f"{side}_loss_mask"] = np.concatenate([np.zeros((N, P), bool), mask], axis=1)
        out[f"{side}_positions"] = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    return out


def random_pairs(task: CountingTask, n: int, seed: int, ragged: bool = True
                 ) -> tuple[dict[str, np.ndarray], float]:
    """n labelled pairs of uniformly random responses (no policy needed).

    Responses have tokens uniform in [1, V); with `ragged`, each response
    keeps a random length in [2, R] (the rest is padding). Labels follow
    `task.label` (Bradley–Terry of the gold reward).

    Returns:
      `(pair arrays as in pair_arrays, fraction of pairs whose chosen
      response has the higher gold reward)` — the accuracy ceiling.
    """
    rng = np.random.default_rng([task.seed, 4, seed])
    R = task.response_length
    r1 = rng.integers(1, task.vocab_size, (n, R))
    r2 = rng.integers(1, task.vocab_size, (n, R))
    if ragged:
        m1 = np.arange(R)[None] < rng.integers(min(2, R), R + 1, (n, 1))
        m2 = np.arange(R)[None] < rng.integers(min(2, R), R + 1, (n, 1))
    else:
        m1 = m2 = np.ones((n, R), bool)
    g1, g2 = task.gold_reward(r1, m1), task.gold_reward(r2, m2)
    prefer_1 = task.label(g1, g2, seed)
    agree = float(np.mean(np.where(prefer_1, g1 > g2, g2 > g1)))
    return pair_arrays(task.prompts(n, seed), r1, r2, prefer_1, m1, m2), agree
