"""Reward transforms: normalization, shaping, combination and placement.

Sequence rewards are float32 `[B]` (or `[B, K]` for K aspects); process
rewards are float32 `[B, K]` over K reasoning steps with a bool
`step_mask_BK`. Units are those of the reward model unless stated. Masks and
per-row arrays must have exactly the documented shapes (a mismatch raises a
ValueError naming both shapes, see `checks.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreward.objectives.checks import check_int, check_ndim, check_range, check_same_shape, check_shape
from jaxreward.objectives.masking import as_bool, masked_mean, masked_whiten, select

sg = jax.lax.stop_gradient


def _mask_like(mask, x, mask_name, x_name):
    check_shape(mask_name, mask, jnp.shape(x), x_name)
    return jnp.ones(jnp.shape(x), bool) if mask is None else as_bool(mask)


def _check_steps(step_rewards_BK, step_mask_BK):
    check_ndim("step_rewards_BK", step_rewards_BK, 2, "[B, K]")
    check_same_shape("step_rewards_BK", step_rewards_BK, step_mask_BK=step_mask_BK)


def whiten_rewards(rewards, mask=None, *, shift_mean: bool = True, eps: float = 1e-8) -> jnp.ndarray:
    """(r − mean) / (std + eps) over the valid entries of the batch.

    Args:
      rewards: float32 array (e.g. `[B]`).
      mask: optional bool, same shape.
      shift_mean: static; False keeps the mean (scales only).
      eps: static.

    Returns:
      float32, same shape; 0 at masked slots; the centred part is exactly 0
      when all valid rewards are equal.
    """
    check_range("eps", eps, low=0.0)
    rewards = jnp.asarray(rewards, jnp.float32)
    return masked_whiten(rewards, _mask_like(mask, rewards, "mask", "rewards"), shift_mean=shift_mean, eps=eps)


def clip_rewards(rewards, *, low: float, high: float) -> jnp.ndarray:
    """Clamps rewards to [low, high] (static bounds, reward units).

    Raises:
      ValueError: if low > high.
    """
    check_range("low", low, allow_inf=True)
    check_range("high", high, low=low, allow_inf=True)
    return jnp.clip(jnp.asarray(rewards, jnp.float32), low, high)


def length_penalty(rewards_B, lengths_B, *, coef: float, free_length: float = 0.0) -> jnp.ndarray:
    """Linear length penalty: r − coef · max(L − free_length, 0).

    Args:
      rewards_B: float32 `[B]`.
      lengths_B: int or float `[B]` response lengths in tokens.
      coef: static penalty per token beyond `free_length` (reward units/token).
      free_length: static number of tokens that cost nothing.

    Returns:
      float32 `[B]`.
    """
    check_ndim("rewards_B", rewards_B, 1, "[B]")
    check_same_shape("rewards_B", rewards_B, lengths_B=lengths_B)
    check_range("free_length", free_length, low=0.0)
    excess = jnp.maximum(jnp.asarray(lengths_B, jnp.float32) - free_length, 0.0)
    return jnp.asarray(rewards_B, jnp.float32) - coef * excess


def overlong_penalty(lengths_B, *, max_length: int, cache_length: int) -> jnp.ndarray:
    """DAPO's soft overlong punishment (add it to the reward).

        0                                   if L ≤ L_max − L_cache
        (L_max − L_cache − L) / L_cache     if L_max − L_cache < L ≤ L_max
        −1                                  if L > L_max

    Paper: Q. Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale" (2025).

    Args:
      lengths_B: int or float `[B]` response lengths (tokens).
      max_length: static L_max.
      cache_length: static L_cache, 0 < L_cache ≤ L_max.

    Returns:
      float32 `[B]` in [−1, 0].
    """
    check_int("max_length", max_length, minimum=1)
    check_int("cache_length", cache_length, minimum=1)
    check_range("cache_length", cache_length, high=max_length)
    lengths = jnp.asarray(lengths_B, jnp.float32)
    soft = (max_length - cache_length - lengths) / cache_length
    return jnp.clip(soft, -1.0, 0.0)


def par_reward(rewards_B, ref_rewards_BM, ref_mask_BM=None) -> jnp.ndarray:
    """Preference As Reward: r' = mean_m σ(r − r_ref,m).

    The reward becomes the probability (under Bradley–Terry) that the
    response beats the reference model's responses to the same prompt, which
    is bounded and saturates, damping reward hacking.

    Paper: J. Fu et al., "Reward Shaping to Mitigate Reward Hacking in RLHF"
    (2025).

    Args:
      rewards_B: float32 `[B]` policy-response rewards.
      ref_rewards_BM: float32 `[B, M]` rewards of M reference responses.
      ref_mask_BM: optional bool `[B, M]` of valid reference responses.

    Returns:
      float32 `[B]` in (0, 1); 0 for a row with no valid reference.
    """
    shape = check_ndim("ref_rewards_BM", ref_rewards_BM, 2, "[B, M]")
    check_shape("rewards_B", rewards_B, shape[:1], "ref_rewards_BM's batch axis")
    ref = jnp.asarray(ref_rewards_BM, jnp.float32)
    mask = _mask_like(ref_mask_BM, ref, "ref_mask_BM", "ref_rewards_BM")
    r = jnp.asarray(rewards_B, jnp.float32)[:, None]
    return masked_mean(jax.nn.sigmoid(r - select(ref, mask)), mask, axis=-1)


def log_sigmoid_centered(rewards, base_rewards, *, quantile: float) -> jnp.ndarray:
    """u = log σ(r − r_ref(x)), r_ref(x) the `quantile` of base-policy rewards for x.

    The transform saturates once a response is clearly better than the base
    policy's typical response, so effort goes to responses that are still
    bad. Works per aspect.

    Paper: Z. Wang et al., "Transforming and Combining Rewards for Aligning
    Large Language Models" (2024).

    Args:
      rewards: float32 `[B]` or `[B, K]` rewards of the responses.
      base_rewards: float32 `[B, M]` or `[B, M, K]`: rewards of M base-policy
        samples for each prompt (all valid; treated as constants).
      quantile: static q in [0, 1] (e.g. 0.5 for the median).

    Returns:
      float32, shape of `rewards`, ≤ 0.
    """
    check_range("quantile", quantile, low=0.0, high=1.0)
    shape = check_ndim("rewards", rewards, (1, 2), "[B] or [B, K]")
    layout = "[B, M]" if len(shape) == 1 else "[B, M, K]"
    base_shape = check_ndim("base_rewards", base_rewards, len(shape) + 1, layout)
    if base_shape[:1] + base_shape[2:] != shape:
        raise ValueError(f"base_rewards has shape {base_shape}, expected {layout} with the B (and K) "
                         f"of rewards, whose shape is {shape}")
    ref = jnp.quantile(sg(jnp.asarray(base_rewards, jnp.float32)), quantile, axis=1)
    return jax.nn.log_sigmoid(jnp.asarray(rewards, jnp.float32) - ref)


def combine_log_sigmoid(rewards_BK, base_rewards_BMK, *, quantile: float) -> jnp.ndarray:
    """Σ_k log σ(r_k − r_ref,k): a soft AND of K aspects (good on every one).

    Paper: Z. Wang et al., "Transforming and Combining Rewards for Aligning
    Large Language Models" (2024).

    Args:
      rewards_BK: float32 `[B, K]`.
      base_rewards_BMK: float32 `[B, M, K]`.
      quantile: static q in [0, 1].

    Returns:
      float32 `[B]`, ≤ 0.
    """
    return jnp.sum(log_sigmoid_centered(rewards_BK, base_rewards_BMK, quantile=quantile), axis=-1)


def pure_min_form(step_rewards_BK, step_mask_BK, *, temperature: float) -> jnp.ndarray:
    """PURE min-form credit: step rewards reweighted by softmax(−r/T) over the steps.

        w_k  = exp(−r_k/T) / Σ_j exp(−r_j/T)      (valid steps of the row)
        r'_k = w_k · r_k

    Σ_k r'_k → min_k r_k as T → 0, so a sum-form return over r' approximates
    the min-form value "as good as the worst step", which stops the policy
    from farming high-reward steps. The weights are constants (no gradient).

    Paper: J. Cheng et al., "Stop Summation: Min-Form Credit Assignment Is
    All Process Reward Model Needs for Reasoning" (2025).

    Args:
      step_rewards_BK: float32 `[B, K]` process rewards.
      step_mask_BK: bool `[B, K]` valid steps.
      temperature: static T > 0.

    Returns:
      float32 `[B, K]`, 0 at masked steps and for rows without steps.
    """
    check_range("temperature", temperature, low=0.0, low_open=True)
    _check_steps(step_rewards_BK, step_mask_BK)
    mask = as_bool(step_mask_BK)
    r = select(jnp.asarray(step_rewards_BK, jnp.float32), mask)
    logits = jnp.where(mask, -r / temperature, -jnp.inf)
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    logits = jnp.where(any_valid, logits, 0.0)
    w = sg(jax.nn.softmax(logits, axis=-1))
    return select(w * r, mask)


def clip_process_rewards(step_rewards_BK, step_mask_BK, *, threshold: float) -> jnp.ndarray:
    """Clip mechanism: r'_k = min(r_k − η, 0).

    Every step reward becomes ≤ 0, so adding steps can never raise the
    return; steps judged above η cost nothing.

    Paper: J. Gao et al., "On Designing Effective RL Reward at Training Time
    for LLM Reasoning" (2024).

    Args:
      step_rewards_BK: float32 `[B, K]`.
      step_mask_BK: bool `[B, K]`.
      threshold: static η (reward units).

    Returns:
      float32 `[B, K]`, 0 at masked steps.
    """
    check_range("threshold", threshold)
    _check_steps(step_rewards_BK, step_mask_BK)
    mask = as_bool(step_mask_BK)
    r = select(jnp.asarray(step_rewards_BK, jnp.float32), mask)
    return select(jnp.minimum(r - threshold, 0.0), mask)


def delta_process_rewards(step_rewards_BK, step_mask_BK) -> jnp.ndarray:
    """Delta mechanism: r'_k = r_k − r_{k+1} for all but the last valid step, r'_last = r_last.

    The return from step k telescopes to Σ_{j ≥ k} r'_j = r_k, a single
    step's reward, so repeating good steps cannot inflate it. "Next" means
    the next valid step of the row.

    Paper: J. Gao et al., "On Designing Effective RL Reward at Training Time
    for LLM Reasoning" (2024).

    Args:
      step_rewards_BK: float32 `[B, K]`.
      step_mask_BK: bool `[B, K]`.

    Returns:
      float32 `[B, K]`, 0 at masked steps.
    """
    _check_steps(step_rewards_BK, step_mask_BK)
    mask = as_bool(step_mask_BK)
    r = select(jnp.asarray(step_rewards_BK, jnp.float32), mask)

    def step(carry, x):
        next_r, has_next = carry
        r_k, m_k = x
        out = jnp.where(m_k, r_k - jnp.where(has_next, next_r, 0.0), 0.0)
        return (jnp.where(m_k, r_k, next_r), has_next | m_k), out

    batch = mask.shape[0]
    carry0 = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), bool))
    _, out_KB = jax.lax.scan(step, carry0, (r.T, mask.T), reverse=True)
    return out_KB.T


def place_on_last_token(rewards_B, mask_BT) -> jnp.ndarray:
    """Puts each sequence reward on the last valid response token.

    Args:
      rewards_B: float32 `[B]`.
      mask_BT: bool `[B, T]` response tokens.

    Returns:
      float32 `[B, T]`: r_b at the last true slot of row b, 0 elsewhere; an
      empty response gets no reward anywhere (and no gradient to r_b).
    """
    shape = check_ndim("mask_BT", mask_BT, 2, "[B, T]")
    check_shape("rewards_B", rewards_B, shape[:1], "mask_BT's batch axis")
    mask = as_bool(mask_BT)
    t = mask.shape[-1]
    positions = jnp.arange(t)
    last = jnp.max(jnp.where(mask, positions, -1), axis=-1)  # −1 for an empty row
    onehot = positions[None, :] == last[:, None]
    rewards = jnp.asarray(rewards_B, jnp.float32)[:, None]
    return jnp.where(onehot & mask, rewards, 0.0)


__all__ = [
    "clip_process_rewards",
    "clip_rewards",
    "combine_log_sigmoid",
    "delta_process_rewards",
    "length_penalty",
    "log_sigmoid_centered",
    "overlong_penalty",
    "par_reward",
    "place_on_last_token",
    "pure_min_form",
    "whiten_rewards",
]
