"""Best-of-N sampling: draw N responses per prompt, keep the highest reward.

The N samples share one prefill of the prompt (`generate(...,
num_samples=N)`). A reward function maps a `SampleBatch` (full sequences
plus the prompt/response split, R = B * N rows) to float32 `[R]`; two
adapters cover a trained `RewardModel` and a Python function of the
decoded text.
"""
from __future__ import annotations

import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxreward.sampling.sampler import SampleBatch, SampleOutput, check_integer, generate

Array = jax.Array
RewardFn = Callable[[SampleBatch], Array]


def best_of_n_kl_bound(n: int) -> float:
    """`log N - (N - 1) / N`, the classic KL(best-of-N || base policy) formula.

    "Theoretical guarantees on the best-of-n alignment policy" (Beirami et
    al., 2024) shows this analytic value is an *upper bound* on the actual
    KL divergence (it is exact only when all responses are distinct with
    vanishing probability each), so report it as a bound, not the KL.

    Raises:
      ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@flax.struct.dataclass
class BestOfNOutput:
    """Best-of-N result for B prompts.

    Attributes:
      best: `SampleOutput` with B rows, the highest-reward sample per prompt.
      best_index_B: int32 `[B]`, which sample j won (lowest j on ties).
      best_reward_B: float32 `[B]`.
      rewards_BN: float32 `[B, N]`, every sample's reward.
      samples: `SampleOutput` with B * N rows (row b * N + j).
      kl_bound: `best_of_n_kl_bound(N)` (static).
    """
    best: SampleOutput
    best_index_B: Array
    best_reward_B: Array
    rewards_BN: Array
    samples: SampleOutput
    kl_bound: float = flax.struct.field(pytree_node=False)


def _checked_rewards(out, rows: int, where: str) -> Array:
    """`out` as float32 `[rows]`; anything else (a scalar, [rows, 1], too few or too many) raises."""
    shape = tuple(np.shape(out))
    if shape != (rows,):
        raise ValueError(f"reward_fn must return float32 [{rows}] (one reward per row) for {where}, "
                         f"got shape {shape}")
    return jnp.asarray(out, jnp.float32)


def _score(reward_fn: RewardFn, batch: SampleBatch, chunk_size: int | None) -> Array:
    R = batch.num_rows
    if chunk_size is None or chunk_size >= R:
        return _checked_rewards(reward_fn(batch), R, f"the batch of {R} rows")
    outs = []
    for start in range(0, R, chunk_size):
        # Every chunk has chunk_size rows (the last repeats row R - 1), so a
        # jitted reward model compiles once; each chunk's output is checked
        # before the repeated rows are cut off.
        idx = jnp.minimum(jnp.arange(start, start + chunk_size), R - 1)
        chunk = jax.tree.map(lambda x: x[idx], batch)
        where = f"the chunk of {chunk_size} rows starting at row {start} (reward_chunk_size={chunk_size})"
        outs.append(_checked_rewards(reward_fn(chunk), chunk_size, where)[: min(chunk_size, R - start)])
    return jnp.concatenate(outs)


def best_of_n(model, params, prompt_tokens: Array, prompt_mask: Array, reward_fn: RewardFn, *,
              n: int, rng: Array, reward_chunk_size: int | None = None,
              **sampling_kwargs) -> BestOfNOutput:
    """Samples n responses per prompt and keeps the one with the highest reward.

    Args:
      model, params, prompt_tokens, prompt_mask, rng: as for `generate`
        (prompt arrays `[B, T]`).
      reward_fn: `SampleBatch` (R = B * n rows) -> float32 `[R]`, e.g.
        `reward_model_fn(...)` or `text_reward_fn(...)`.
      n: samples per prompt, >= 1.
      reward_chunk_size: score at most this many rows per `reward_fn` call
        (bounds reward-model memory), an integer >= 1; None scores all R rows
        at once. Every call gets exactly this many rows (the last chunk is
        padded by repeating the last row) and must return that many rewards.
      **sampling_kwargs: max_new_tokens, temperature, top_k, top_p, stop_ids,
        pad_id for `generate`.

    Returns:
      `BestOfNOutput`. Ties go to the lowest sample index.

    Raises:
      ValueError: n not an integer >= 1, reward_chunk_size not an integer >= 1, reward_fn
        returns the wrong shape (for the whole batch or for any chunk) or a
        NaN reward (checked on the host), plus everything `generate` raises.
      TypeError: num_samples passed in sampling_kwargs (use n).
    """
    check_integer("n", n, 1)  # before sampling: n = 2.5 would otherwise be blamed on reward_fn
    if reward_chunk_size is not None and (isinstance(reward_chunk_size, bool)
                                          or not isinstance(reward_chunk_size, (int, np.integer))
                                          or reward_chunk_size < 1):
        raise ValueError(f"reward_chunk_size must be an integer >= 1 or None, got {reward_chunk_size!r}")
    if "num_samples" in sampling_kwargs:
        raise TypeError("pass n, not num_samples")
    samples = generate(model, params, prompt_tokens, prompt_mask, rng=rng, num_samples=n,
                       **sampling_kwargs)
    B = samples.lengths_R.shape[0] // n
    rewards = _score(reward_fn, samples.sequences(), reward_chunk_size)
    if rewards.shape != (B * n,):
        raise ValueError(f"reward_fn must return float32 [{B * n}], got shape {rewards.shape}")
    if np.isnan(np.asarray(rewards)).any():
        raise ValueError("reward_fn returned NaN")
    rewards_BN = rewards.reshape(B, n)
    best_B = jnp.argmax(rewards_BN, axis=1).astype(jnp.int32)  # first maximum on ties
    rows = jnp.arange(B) * n + best_B
    return BestOfNOutput(best=jax.tree.map(lambda x: x[rows], samples), best_index_B=best_B,
                         best_reward_B=rewards_BN[jnp.arange(B), best_B], rewards_BN=rewards_BN,
                         samples=samples, kl_bound=best_of_n_kl_bound(n))


def reward_model_fn(reward_model, reward_params, objective: int = 0) -> RewardFn:
    """Adapter: a `RewardModel` scoring the full sequences, objective column k.

    The reward model must share the policy's vocabulary. "last" pooling
    reads the last attended token of each row (the last response token, or
    the last prompt token for an empty response); "mean" pooling averages
    the response tokens.

    Raises:
      ValueError: objective outside [0, reward_model.num_objectives).
    """
    k = getattr(reward_model, "num_objectives", 1)
    if not 0 <= objective < k:
        raise ValueError(f"objective must be in [0, {k}), got {objective}")

    @jax.jit
    def score(params, tokens, mask, positions, response_mask):
        return reward_model.apply({"params": params}, tokens, mask, positions,
                                  response_mask)[:, objective]

    def fn(batch: SampleBatch) -> Array:
        return score(reward_params, batch.tokens_RL, batch.attention_mask_RL,
                     batch.positions_RL, batch.loss_mask_RL).astype(jnp.float32)

    return fn


def text_reward_fn(tokenizer_decode: Callable[[list[int]], str],
                   fn: Callable[..., float], with_row: bool = False) -> RewardFn:
    """Adapter: a Python function of the decoded (prompt, response) text.

    Args:
      tokenizer_decode: token ids -> text, e.g. `Tokenizer.decode`. It gets
        only the real tokens (by mask); the stop token is included in the
        response ids.
      fn: (prompt_text, response_text) -> float reward; with `with_row`,
        (prompt_text, response_text, row) with the row's index in the batch
        (row b * N + j is sample j of prompt b), e.g. to look up the prompt's answer.

    Runs on the host, one call per row.
    """
    def reward(batch: SampleBatch) -> Array:
        pt, pm = np.asarray(batch.prompt_tokens_RP), np.asarray(batch.prompt_mask_RP)
        rt, rm = np.asarray(batch.response_tokens_RM), np.asarray(batch.response_mask_RM)
        out = [fn(tokenizer_decode(pt[i][pm[i]].tolist()), tokenizer_decode(rt[i][rm[i]].tolist()),
                  *((i,) if with_row else ())) for i in range(pt.shape[0])]
        return jnp.asarray(np.asarray(out, np.float32).reshape(pt.shape[0]))

    return reward


def proxy_gold_curve(proxy_BN, gold_BN, max_n: int) -> list[dict]:
    """Best-of-N picked by a proxy reward, scored by a gold reward.

    Per N in 1, 2, 4, ..., max_n: the sample with the highest proxy reward
    among the first N of each prompt (nested subsets; ties: lowest index).
    This is the best-of-N curve of "Scaling Laws for Reward Model
    Overoptimization" (Gao et al., 2022).

    Args:
      proxy_BN, gold_BN: float `[B, N_samples]` rewards of the same samples.
      max_n: the largest N, an integer in [1, N_samples] (the curve never
        reports an N beyond the samples given).

    Returns:
      one dict per N: `N`, `kl_bound` (nats, `best_of_n_kl_bound`),
      `proxy_reward` and `gold_reward` of the picks (means over prompts),
      `oracle_gold` (the best gold reward among the N).

    Raises:
      ValueError: the two arrays are not one `[B, N_samples]` shape, or
        max_n is not an integer in [1, N_samples].
    """
    proxy_BN, gold_BN = np.asarray(proxy_BN), np.asarray(gold_BN)
    if proxy_BN.ndim != 2 or proxy_BN.shape != gold_BN.shape:
        raise ValueError(f"proxy and gold rewards must be one [B, N] shape, got {proxy_BN.shape} and "
                         f"{gold_BN.shape}")
    check_integer("max_n", max_n, 1)
    if max_n > proxy_BN.shape[1]:
        raise ValueError(f"max_n={max_n} exceeds the {proxy_BN.shape[1]} samples per prompt (columns) given: "
                         f"best-of-N for N > {proxy_BN.shape[1]} needs more samples")
    rows, n = [], 1
    while n <= max_n:
        pick = np.argmax(proxy_BN[:, :n], axis=1)  # first maximum = lowest index
        take = lambda a: np.take_along_axis(a[:, :n], pick[:, None], axis=1)[:, 0]
        rows.append({"N": n, "kl_bound": best_of_n_kl_bound(n),
                     "proxy_reward": float(take(proxy_BN).mean()),
                     "gold_reward": float(take(gold_BN).mean()),
                     "oracle_gold": float(gold_BN[:, :n].max(axis=1).mean())})
        n *= 2
    return rows
