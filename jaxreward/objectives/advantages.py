"""Advantage estimators, registered under three kinds, one signature each
(`registry.KIND_SIGNATURES`):

* ``token_advantage`` (``gae``, ``reinforce_pp``):
  ``fn(rewards_BT, values_BT, mask_BT, *, gamma=1.0, ...) -> (advantages_BT,
  returns_BT)``. float32 `[B, T]` per-token rewards and values with a bool
  `mask_BT` of response tokens; outputs are 0 at masked slots, and masked
  slots (even in the middle of a row) are skipped, so the values and rewards
  stored there have no effect. Critic-free estimators ignore `values_BT`
  (pass None) and carry ``uses_values = False`` so a trainer can skip the
  value head.
* ``group_advantage`` (``grpo``, ``rloo``):
  ``fn(rewards_B, *, group_size, valid_B=None, ...) -> advantages_B``. One
  scalar reward per response, the B = G·N responses laid out group by group
  (N = `group_size` consecutive rows share a prompt).
* ``baseline_advantage`` (``remax``):
  ``fn(rewards_B, greedy_rewards_B, *, valid_B=None) -> advantages_B``. The
  baseline is the reward of a separately decoded (greedy) response to the
  same prompt, an input the group estimators do not take.

Broadcast `advantages_B` over the tokens with `broadcast_to_tokens`.

A member marked invalid in `valid_B` gets advantage 0 and is left out of its
group's baseline and statistics; pass `valid_B = mask_BT.any(-1)` so that
responses with no valid token (empty) are excluded.
Degenerate groups (fewer than two valid members, or all rewards equal) get
exact zeros.

None of these functions stops gradients: advantages are targets, and the
policy losses treat them as constants.

Shapes are checked exactly (no broadcasting) and static hyper-parameters
against their documented range (γ, λ in [0, 1], group_size an integer ≥ 1);
both raise a ValueError naming the argument (`checks.py`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxreward.objectives import registry
from jaxreward.objectives.checks import (
    check_int,
    check_ndim,
    check_range,
    check_same_shape,
    check_shape,
    check_token_arrays,
)
from jaxreward.objectives.masking import (
    as_bool,
    masked_all_equal,
    masked_count,
    masked_mean,
    masked_std,
    masked_sum,
    masked_whiten,
    safe_divide,
    select,
)


def broadcast_to_tokens(advantages_B, mask_BT) -> jnp.ndarray:
    """Copies one advantage per sequence onto its valid tokens (0 elsewhere).

    Args:
      advantages_B: float32 `[B]`.
      mask_BT: bool `[B, T]`.

    Returns:
      float32 `[B, T]`.
    """
    check_ndim("mask_BT", mask_BT, 2, "[B, T]")
    check_shape("advantages_B", advantages_B, jnp.shape(mask_BT)[:1], "mask_BT's batch axis")
    mask = as_bool(mask_BT)
    adv = jnp.asarray(advantages_B, jnp.float32)
    return select(jnp.broadcast_to(adv[:, None], mask.shape), mask)


def _reverse_masked_scan(step, carry0, xs_BT):
    """Runs `step` from the last time step to the first over `[B, T]` arrays."""
    xs_TB = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), xs_BT)
    _, ys_TB = jax.lax.scan(step, carry0, xs_TB, reverse=True)
    return jax.tree_util.tree_map(lambda y: jnp.swapaxes(y, 0, 1), ys_TB)


@registry.register("token_advantage", "gae")
def gae_advantages(
    rewards_BT,
    values_BT,
    mask_BT,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    terminated_B=None,
    bootstrap_values_B=None,
):
    """Generalized advantage estimation over masked sequences.

        δ_t = r_t + γ·V_{t'} − V_t          (t' = the next valid step)
        A_t = δ_t + γλ·A_{t'}
        R_t = A_t + V_t                      (the value target)

    After the last valid step, V_{t'} is 0 for a terminated row and
    `bootstrap_values_B[b]` for a truncated one, and A_{t'} is 0. λ = 1 gives
    Monte-Carlo returns minus values; λ = 0 gives one-step TD errors.

    Paper: J. Schulman et al., "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation" (2016).

    Args:
      rewards_BT: float32 `[B, T]` per-token rewards (sequence reward on the
        last token plus any per-token KL penalty).
      values_BT: float32 `[B, T]` value predictions V(s_t) for each token.
      mask_BT: bool `[B, T]`.
      gamma: static discount γ in [0, 1].
      lam: static GAE λ in [0, 1].
      terminated_B: optional bool `[B]` (default all true: every response
        ended with EOS or a final answer).
      bootstrap_values_B: optional float32 `[B]` V of the state after the last
        token, used where `terminated_B` is false.

    Returns:
      (advantages_BT, returns_BT), float32, 0 at masked slots.

    Raises:
      ValueError: γ or λ outside [0, 1], or an array of the wrong shape.
    """
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_range("lam", lam, low=0.0, high=1.0)
    shape = check_token_arrays("rewards_BT", rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    for name, x in (("terminated_B", terminated_B), ("bootstrap_values_B", bootstrap_values_B)):
        check_shape(name, x, shape[:1], "rewards_BT's batch axis")
    mask = as_bool(mask_BT)
    rewards = select(jnp.asarray(rewards_BT, jnp.float32), mask)
    values = select(jnp.asarray(values_BT, jnp.float32), mask)
    batch = mask.shape[0]
    next_value0 = jnp.zeros((batch,), jnp.float32)
    if bootstrap_values_B is not None:
        terminated = jnp.ones((batch,), bool) if terminated_B is None else as_bool(terminated_B)
        next_value0 = select(jnp.asarray(bootstrap_values_B, jnp.float32), ~terminated)

    def step(carry, x):
        next_value, next_adv = carry
        r_t, v_t, m_t = x
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
        return carry, jnp.where(m_t, adv, 0.0)

    carry0 = (next_value0, jnp.zeros((batch,), jnp.float32))
    advantages = _reverse_masked_scan(step, carry0, (rewards, values, mask))
    returns = select(advantages + values, mask)
    return advantages, returns


def discounted_returns(rewards_BT, mask_BT, *, gamma: float = 1.0) -> jnp.ndarray:
    """Discounted reward-to-go over the valid tokens of each row.

        G_t = r_t + γ·G_{t'}      (t' = the next valid step; G = 0 after the last)

    Masked slots are skipped (they neither add reward nor count as a step)
    and read 0.

    Args:
      rewards_BT: float32 `[B, T]` per-token rewards.
      mask_BT: bool `[B, T]`.
      gamma: static discount γ in [0, 1].

    Returns:
      float32 `[B, T]`.

    Raises:
      ValueError: γ outside [0, 1], or shapes that are not one `[B, T]`.
    """
    check_range("gamma", gamma, low=0.0, high=1.0)
    check_token_arrays("rewards_BT", rewards_BT, mask_BT=mask_BT)
    mask = as_bool(mask_BT)
    rewards = select(jnp.asarray(rewards_BT, jnp.float32), mask)

    def step(next_return, x):
        r_t, m_t = x
        g = r_t + gamma * next_return
        return jnp.where(m_t, g, next_return), jnp.where(m_t, g, 0.0)

    return _reverse_masked_scan(step, jnp.zeros((mask.shape[0],), jnp.float32), (rewards, mask))


def _valid(valid_B, rewards_B):
    check_same_shape("rewards_B", rewards_B, valid_B=valid_B)
    if valid_B is None:
        return jnp.ones(jnp.shape(rewards_B), bool)
    return as_bool(valid_B)


def _grouped(rewards_B, valid_B, group_size):
    """(rewards `[G, N]` zeroed where invalid, valid `[G, N]`), all arguments checked."""
    n = check_int("group_size", group_size, minimum=1)
    (b,) = check_ndim("rewards_B", rewards_B, 1, "[B]")
    if b % n:
        raise ValueError(f"rewards_B has shape {(b,)}: B must be a multiple of group_size={n}")
    valid = _valid(valid_B, rewards_B).reshape(-1, n)
    return select(jnp.asarray(rewards_B, jnp.float32).reshape(-1, n), valid), valid


@registry.register("group_advantage", "grpo")
def grpo_advantages(
    rewards_B,
    *,
    group_size: int,
    valid_B=None,
    scale_by_std: bool = True,
    eps: float = 1e-6,
):
    """Group-relative advantages: A_i = (r_i − mean_g) / (std_g + eps).

    Mean and std are over the valid members of the group; std is the
    unbiased (ddof 1) estimate, as in the DeepSeekMath and TRL/verl code.
    `scale_by_std=False` gives A_i = r_i − mean_g (Dr. GRPO).

    Papers: Z. Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical
    Reasoning in Open Language Models" (2024); without std scaling, Z. Liu et
    al., "Understanding R1-Zero-Like Training: A Critical Perspective"
    (2025).

    Args:
      rewards_B: float32 `[B]`, B = G·group_size, groups contiguous.
      group_size: static N ≥ 1.
      valid_B: optional bool `[B]`; false members (e.g. empty responses) get
        0 and do not move their group's mean or std.
      scale_by_std: static.
      eps: static, added to the std.

    Returns:
      float32 `[B]`; exact zeros for invalid members and for groups with
      fewer than two valid members or all-equal rewards.

    Raises:
      ValueError: if group_size is not an integer >= 1, B is not a multiple
        of it, eps < 0, or valid_B is not shaped like rewards_B.
    """
    check_range("eps", eps, low=0.0)
    r, valid = _grouped(rewards_B, valid_B, group_size)
    mean = masked_mean(r, valid, axis=1)[:, None]
    adv = r - mean
    if scale_by_std:
        std = masked_std(r, valid, axis=1, ddof=1)[:, None]
        adv = adv / (std + eps)
    degenerate = masked_all_equal(r, valid, axis=1)[:, None]
    return jnp.where(valid & ~degenerate, adv, 0.0).reshape(-1)


@registry.register("group_advantage", "rloo")
def rloo_advantages(rewards_B, *, group_size: int, valid_B=None):
    """REINFORCE leave-one-out: A_i = r_i − mean_{j ≠ i, valid} r_j.

    Papers: W. Kool, H. van Hoof, M. Welling, "Buy 4 REINFORCE Samples, Get a
    Baseline for Free!" (2019); A. Ahmadian et al., "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback
    in LLMs" (2024).

    Args:
      rewards_B: float32 `[B]`, groups of `group_size` contiguous rows.
      group_size: static N ≥ 1.
      valid_B: optional bool `[B]`; invalid members get 0 and are not in the
        other members' baselines.

    Returns:
      float32 `[B]`; zeros for groups with fewer than two valid members or
      all-equal rewards.

    Raises:
      ValueError: as `grpo_advantages`.
    """
    r, valid = _grouped(rewards_B, valid_B, group_size)
    n = masked_count(valid, axis=1)[:, None]
    total = masked_sum(r, valid, axis=1)[:, None]
    baseline = safe_divide(total - r, n - 1.0)
    degenerate = masked_all_equal(r, valid, axis=1)[:, None]
    return jnp.where(valid & ~degenerate, r - baseline, 0.0).reshape(-1)


def _critic_free(fn):
    fn.uses_values = False
    return fn


@_critic_free
@registry.register("token_advantage", "reinforce_pp")
def reinforce_pp_advantages(rewards_BT, values_BT, mask_BT, *, gamma: float = 1.0):
    """REINFORCE++: discounted token returns, whitened over the whole batch.

        G_t = Σ_{s ≥ t} γ^{s−t} r_s        (r includes the per-token KL penalty)
        A_t = (G_t − mean(G)) / (std(G) + 1e-8)   over all valid tokens

    Critic-free: `values_BT` is ignored (pass None); the argument is there so
    that every ``token_advantage`` estimator takes the same inputs.

    Paper: J. Hu, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models" (2025).

    Args:
      rewards_BT: float32 `[B, T]` per-token rewards.
      values_BT: ignored (None, or a `[B, T]` array, whose shape is checked).
      mask_BT: bool `[B, T]`.
      gamma: static γ.

    Returns:
      (advantages_BT, returns_BT); whitening statistics are those of this
      batch (compute on the full batch before splitting into micro-batches).
    """
    check_token_arrays("rewards_BT", rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    mask = as_bool(mask_BT)
    returns = discounted_returns(rewards_BT, mask, gamma=gamma)
    return masked_whiten(returns, mask), returns


@registry.register("baseline_advantage", "remax")
def remax_advantages(rewards_B, greedy_rewards_B, *, valid_B=None):
    """ReMax: the greedy response's reward as baseline, A = r(sampled) − r(greedy).

    Paper: Z. Li et al., "ReMax: A Simple, Effective, and Efficient
    Reinforcement Learning Method for Aligning Large Language Models"
    (2023).

    Args:
      rewards_B: float32 `[B]` rewards of the sampled responses.
      greedy_rewards_B: float32 `[B]` rewards of the greedy responses to the
        same prompts.
      valid_B: optional bool `[B]`; invalid rows get 0.

    Returns:
      float32 `[B]`.
    """
    check_ndim("rewards_B", rewards_B, 1, "[B]")
    check_same_shape("rewards_B", rewards_B, greedy_rewards_B=greedy_rewards_B)
    valid = _valid(valid_B, rewards_B)
    r = select(jnp.asarray(rewards_B, jnp.float32), valid)
    b = select(jnp.asarray(greedy_rewards_B, jnp.float32), valid)
    return select(r - b, valid)


__all__ = [
    "broadcast_to_tokens",
    "discounted_returns",
    "gae_advantages",
    "grpo_advantages",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
]
