"""Reward-model losses and reward computations.

Losses here train a scalar (or K-objective) reward head from preference pairs
or ratings; the reward functions turn log-probs or ensembles into rewards.
Rewards are float32 in the reward model's own units ("nats" for implicit
rewards, which are β-scaled log-ratios).

Registered losses, one signature per kind (`registry.KIND_SIGNATURES`):

* ``pairwise_reward_loss`` (``bradley_terry``, ``scaled_bradley_terry``):
  ``fn(rewards_chosen_B, rewards_rejected_B, margin_B=None, example_mask_B=None,
  *, objective_weights_K=None) -> (loss, metrics)``. ``margin_B`` is the
  per-pair preference strength m of the data (e.g. 1–3 for slightly to much
  better); each loss uses it in its own way (subtracted, or as a weight), and
  without it each is the plain Bradley–Terry loss. Both return the same
  metric keys.
* ``rated_reward_loss`` (``regression``):
  ``fn(rewards_B, targets_B, example_mask_B=None, *, objective_weights_K=None)
  -> (loss, metrics)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxreward.objectives import registry
from jaxreward.objectives.checks import (check_ndim, check_range, check_same_shape, check_shape,
                                         check_values_in_range)
from jaxreward.objectives.masking import (
    as_bool,
    masked_cumsum,
    masked_mean,
    masked_std,
    select,
)

Metrics = dict


# ----------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------


def _example_mask(mask_B, shape, ref_name) -> jnp.ndarray:
    """Broadcasts an optional `[B]` (or `[B, K]`) example mask to `shape` (`[B]` or `[B, K]`)."""
    if mask_B is None:
        return jnp.ones(shape, bool)
    check_shape("example_mask_B", mask_B, shape, ref_name, allow_prefix=True)
    mask_B = as_bool(mask_B)
    if len(shape) == 2 and mask_B.ndim == 1:
        mask_B = mask_B[:, None]
    return jnp.broadcast_to(mask_B, shape)


def _per_example(name, x, shape, ref_name) -> jnp.ndarray:
    """Broadcasts a scalar, `[B]` or `[B, K]` array to `shape` (`[B]` or `[B, K]`)."""
    check_shape(name, x, shape, ref_name, allow_scalar=True, allow_prefix=True)
    x = jnp.asarray(x, jnp.float32)
    if len(shape) == 2 and x.ndim == 1:
        x = x[:, None]
    return jnp.broadcast_to(x, shape)


def pair_metrics(chosen_rewards, rejected_rewards, mask) -> Metrics:
    """Standard metrics of a batch of (chosen, rejected) rewards.

    Args:
      chosen_rewards: float32 `[B]` or `[B, K]` rewards (implicit or explicit).
      rejected_rewards: same shape.
      mask: bool, same shape; false entries are ignored.

    Returns:
      Flat dict of float32 scalars, all computed without gradient:
      ``accuracy`` (fraction with chosen > rejected strictly; a tie counts 0,
      as in TRL and RewardBench),
      ``margin_mean`` (mean of chosen − rejected), ``chosen_reward_mean``,
      ``chosen_reward_std``, ``rejected_reward_mean``, ``rejected_reward_std``
      (population std, ddof 0). All 0 when nothing is selected.
    """
    rc = jax.lax.stop_gradient(select(chosen_rewards, mask))
    rr = jax.lax.stop_gradient(select(rejected_rewards, mask))
    diff = rc - rr
    # Strict, as TRL's DPOTrainer ((chosen > rejected).float()) and RewardBench:
    # a tie is wrong, so a constant model (or a policy equal to its reference)
    # scores 0, not 0.5.
    correct = (diff > 0).astype(jnp.float32)
    return {
        "accuracy": masked_mean(correct, mask),
        "margin_mean": masked_mean(diff, mask),
        "chosen_reward_mean": masked_mean(rc, mask),
        "chosen_reward_std": masked_std(rc, mask),
        "rejected_reward_mean": masked_mean(rr, mask),
        "rejected_reward_std": masked_std(rr, mask),
    }


def _reduce_objectives(loss_BK, mask_BK, objective_weights_K) -> jnp.ndarray:
    """Mean over valid examples and objectives, or Σ_k w_k · mean_b when weighted."""
    if objective_weights_K is None:
        return masked_mean(loss_BK, mask_BK)
    if loss_BK.ndim != 2:
        raise ValueError("objective_weights_K needs [B, K] rewards")
    weights = jnp.asarray(objective_weights_K, jnp.float32)
    if weights.shape != (loss_BK.shape[1],):
        raise ValueError(f"objective_weights_K has shape {weights.shape}, expected ({loss_BK.shape[1]},)")
    return jnp.sum(weights * masked_mean(loss_BK, mask_BK, axis=0))


def _per_objective_accuracy(diff_BK, mask_BK) -> Metrics:
    correct = (diff_BK > 0).astype(jnp.float32)  # strict: a tie is wrong (as pair_metrics)
    acc_K = masked_mean(jax.lax.stop_gradient(correct), mask_BK, axis=0)
    return {f"accuracy_k{k}": acc_K[k] for k in range(diff_BK.shape[1])}


def _pair_reward_inputs(rewards_chosen_B, rewards_rejected_B, margin_B, example_mask_B, margin_default):
    """(r_c, r_r, m, mask), float32 `[B]` or `[B, K]`, masked entries replaced by 0 (m by `margin_default`)."""
    rc = jnp.asarray(rewards_chosen_B, jnp.float32)
    rr = jnp.asarray(rewards_rejected_B, jnp.float32)
    if rc.shape != rr.shape or rc.ndim not in (1, 2):
        raise ValueError(f"reward shapes {rc.shape} and {rr.shape} must match and be [B] or [B, K]")
    mask = _example_mask(example_mask_B, rc.shape, "rewards_chosen_B")
    margin = (jnp.full(rc.shape, margin_default, jnp.float32) if margin_B is None
              else _per_example("margin_B", margin_B, rc.shape, "rewards_chosen_B"))
    return select(rc, mask), select(rr, mask), select(margin, mask, margin_default), mask


def _pair_reward_result(loss_BK, rc, rr, mask, objective_weights_K):
    """(loss, metrics) of a pairwise reward loss: the reduction and the metric keys every member reports."""
    loss = _reduce_objectives(loss_BK, mask, objective_weights_K)
    metrics = {"loss": loss, **pair_metrics(rc, rr, mask)}
    if rc.ndim == 2 and rc.shape[1] > 1:
        metrics.update(_per_objective_accuracy(rc - rr, mask))
    return loss, metrics


# ----------------------------------------------------------------------------
# Reward-model training losses
# ----------------------------------------------------------------------------


@registry.register("pairwise_reward_loss", "bradley_terry")
def bradley_terry_loss(
    rewards_chosen_B,
    rewards_rejected_B,
    margin_B=None,
    example_mask_B=None,
    *,
    objective_weights_K: Optional[Sequence[float]] = None,
):
    """Bradley–Terry pairwise loss, optionally with a margin.

        loss = −log σ(r_c − r_r − m)

    averaged over valid examples (and over the K objectives). With a margin m
    (Llama 2's "margin component", larger for more clearly preferred pairs)
    the chosen reward must beat the rejected one by at least m.

    Papers: R. A. Bradley and M. E. Terry, "Rank Analysis of Incomplete Block
    Designs: I. The Method of Paired Comparisons" (1952); margin from H.
    Touvron et al., "Llama 2: Open Foundation and Fine-Tuned Chat Models"
    (2023).

    Args:
      rewards_chosen_B: float32 `[B]` or `[B, K]` rewards of the chosen responses.
      rewards_rejected_B: float32, same shape, rewards of the rejected ones.
      margin_B: optional float32 scalar, `[B]` or `[B, K]` margin, in reward units.
      example_mask_B: optional bool `[B]`; false rows (padding) are ignored.
        If every row is masked the loss is 0 with zero gradients.
      objective_weights_K: optional static `K` weights; the loss becomes
        Σ_k w_k · mean_b loss_bk instead of the plain mean over B and K.

    Returns:
      (loss, metrics): float32 scalar loss, and metrics ``loss``,
      ``accuracy`` (fraction with r_c > r_r strictly, ties count 0, margin not
      applied), ``margin_mean`` (mean r_c − r_r), ``chosen_reward_mean``,
      ``chosen_reward_std``, ``rejected_reward_mean``, ``rejected_reward_std``
      (population std over B and K), plus ``accuracy_k{k}`` per objective when
      K > 1.

    Raises:
      ValueError: if the reward shapes differ or are not `[B]`/`[B, K]`, or
        `example_mask_B` / `margin_B` has a shape other than those above
        (nothing is broadcast; the message names the argument and both shapes).
    """
    rc, rr, margin, mask = _pair_reward_inputs(rewards_chosen_B, rewards_rejected_B, margin_B, example_mask_B, 0.0)
    loss_BK = -jax.nn.log_sigmoid(rc - rr - margin)
    return _pair_reward_result(loss_BK, rc, rr, mask, objective_weights_K)


@registry.register("pairwise_reward_loss", "scaled_bradley_terry")
def scaled_bradley_terry_loss(
    rewards_chosen_B,
    rewards_rejected_B,
    margin_B=None,
    example_mask_B=None,
    *,
    objective_weights_K: Optional[Sequence[float]] = None,
):
    """Scaled Bradley–Terry: the BT loss of each pair times its preference strength.

        loss = mean_b  m_b · (−log σ(r_c − r_r))

    where m_b ≥ 0 is how strongly the annotators preferred the chosen
    response (e.g. 1 = slightly, 3 = much better): the same per-pair number
    that `bradley_terry_loss` subtracts as a margin (the paper compares the
    two on the same magnitudes), here used as a weight. The mean is over
    valid pairs, not over Σ m_b, so the scale of m sets the effective step
    size. Without `margin_B` (m = 1) it is the plain Bradley–Terry loss.

    Paper: Z. Wang et al., "HelpSteer2-Preference: Complementing Ratings with
    Preferences" (2024).

    Args:
      rewards_chosen_B: float32 `[B]` or `[B, K]` chosen rewards.
      rewards_rejected_B: float32, same shape.
      margin_B: optional float32 scalar, `[B]` or `[B, K]` preference
        strengths m ≥ 0 (default 1).
      example_mask_B: optional bool `[B]`.
      objective_weights_K: optional static K weights (Σ_k w_k · mean_b).

    Returns:
      (loss, metrics) with the same metric keys as `bradley_terry_loss`.

    Raises:
      ValueError: a concrete `margin_B` with a negative, NaN or infinite entry
        in a valid pair (a scalar always).
    """
    rc, rr, strength, mask = _pair_reward_inputs(rewards_chosen_B, rewards_rejected_B, margin_B, example_mask_B, 1.0)
    if margin_B is not None:  # a negative strength would reward the wrong order, without bound
        # After the shape checks; masked pairs' strengths are already replaced by 1.
        check_values_in_range("margin_B", margin_B if jnp.ndim(margin_B) == 0 else strength, low=0.0)
    loss_BK = -strength * jax.nn.log_sigmoid(rc - rr)
    return _pair_reward_result(loss_BK, rc, rr, mask, objective_weights_K)


@registry.register("rated_reward_loss", "regression")
def regression_loss(
    rewards_B,
    targets_B,
    example_mask_B=None,
    *,
    objective_weights_K: Optional[Sequence[float]] = None,
):
    """Mean squared error between predicted rewards and ratings.

        loss = mean_b (r_b − y_b)²

    For rated data (e.g. Likert scores per attribute, K objectives at once).

    Paper: Z. Wang et al., "HelpSteer2: Open-source dataset for training
    top-performing reward models" (2024) (regression reward models on
    attribute ratings).

    Args:
      rewards_B: float32 `[B]` or `[B, K]` predicted rewards.
      targets_B: float32, same shape, the ratings (same units as rewards).
      example_mask_B: optional bool `[B]`.
      objective_weights_K: optional static K weights (Σ_k w_k · mean_b).

    Returns:
      (loss, metrics): ``loss`` (MSE), ``mae``, ``reward_mean``,
      ``target_mean``.
    """
    r = jnp.asarray(rewards_B, jnp.float32)
    y = jnp.asarray(targets_B, jnp.float32)
    check_ndim("rewards_B", r, (1, 2), "[B] or [B, K]")
    check_same_shape("rewards_B", r, targets_B=y)
    mask = _example_mask(example_mask_B, r.shape, "rewards_B")
    r, y = select(r, mask), select(y, mask)
    err = r - y
    loss = _reduce_objectives(jnp.square(err), mask, objective_weights_K)
    sg = jax.lax.stop_gradient
    return loss, {
        "loss": loss,
        "mae": masked_mean(jnp.abs(sg(err)), mask),
        "reward_mean": masked_mean(sg(r), mask),
        "target_mean": masked_mean(y, mask),
    }


# ----------------------------------------------------------------------------
# Combining rewards
# ----------------------------------------------------------------------------


def weighted_objective_sum(rewards_BK, weights_K) -> jnp.ndarray:
    """Scalarizes K objectives: r_b = Σ_k w_k r_bk.

    Args:
      rewards_BK: float32 `[B, K]`.
      weights_K: float32 `[K]` (or a sequence).

    Returns:
      float32 `[B]`.

    Raises:
      ValueError: if the shapes disagree.
    """
    rewards_BK = jnp.asarray(rewards_BK, jnp.float32)
    weights_K = jnp.asarray(weights_K, jnp.float32)
    if rewards_BK.ndim != 2 or weights_K.shape != (rewards_BK.shape[1],):
        raise ValueError(f"need rewards [B, K] and weights [K]; got {rewards_BK.shape}, {weights_K.shape}")
    return rewards_BK @ weights_K


ENSEMBLE_MODES = ("mean", "min", "mean_minus_std")


def ensemble_reward(rewards_EB, mode: str = "mean", *, std_coef: float = 1.0) -> jnp.ndarray:
    """Aggregates the rewards of an ensemble of E reward models.

    * ``mean``: mean over members.
    * ``min``: worst-case member (conservative optimization).
    * ``mean_minus_std``: mean − λ·std with λ = `std_coef` and the population
      std over members (ddof 0), an uncertainty penalty.

    Paper: T. Coste et al., "Reward Model Ensembles Help Mitigate
    Overoptimization" (2023) (mean, worst-case and uncertainty-weighted
    optimization; they penalize variance, we penalize std so λ is in reward
    units).

    Args:
      rewards_EB: float32 `[E, B]` (or `[E, B, K]`), member axis first.
      mode: static, one of `ENSEMBLE_MODES`.
      std_coef: static λ ≥ 0 for ``mean_minus_std``.

    Returns:
      float32 `[B]` (or `[B, K]`).

    Raises:
      ValueError: for an unknown mode.
    """
    r = jnp.asarray(rewards_EB, jnp.float32)
    check_ndim("rewards_EB", r, (2, 3), "[E, B] or [E, B, K]")
    check_range("std_coef", std_coef, low=0.0)
    if mode == "mean":
        return jnp.mean(r, axis=0)
    if mode == "min":
        return jnp.min(r, axis=0)
    if mode == "mean_minus_std":
        ones = jnp.ones(r.shape, bool)
        return jnp.mean(r, axis=0) - std_coef * masked_std(r, ones, axis=0)
    raise ValueError(f"unknown ensemble mode {mode!r}; known: {ENSEMBLE_MODES}")


# ----------------------------------------------------------------------------
# Implicit rewards of a policy relative to a reference
# ----------------------------------------------------------------------------


def implicit_token_rewards(logps_BT, ref_logps_BT, mask_BT, *, beta: float) -> jnp.ndarray:
    """Per-token implicit reward β·(log π(y_t) − log π_ref(y_t)).

    `logps_BT[b, t]` is the log-prob of token t+1 given tokens ≤ t (the
    project-wide convention); `mask_BT` marks the response tokens.

    Paper: R. Rafailov et al., "From r to Q*: Your Language Model is Secretly
    a Q-Function" (2024).

    Args:
      logps_BT: float32 `[B, T]` policy log-probs (nats).
      ref_logps_BT: float32 `[B, T]` reference log-probs.
      mask_BT: bool `[B, T]`.
      beta: static KL coefficient β > 0.

    Returns:
      float32 `[B, T]`, 0 at masked slots.
    """
    check_ndim("logps_BT", logps_BT, 2, "[B, T]")
    check_same_shape("logps_BT", logps_BT, ref_logps_BT=ref_logps_BT, mask_BT=mask_BT)
    check_range("beta", beta, low=0.0, low_open=True)
    lp = select(jnp.asarray(logps_BT, jnp.float32), mask_BT)
    ref = select(jnp.asarray(ref_logps_BT, jnp.float32), mask_BT)
    return select(beta * (lp - ref), mask_BT)


def implicit_reward(logps_BT, ref_logps_BT, mask_BT, *, beta: float) -> jnp.ndarray:
    """Sequence implicit reward β·Σ_t (log π − log π_ref) over response tokens.

    The DPO reward of a response, up to the prompt-only term β·log Z(x).

    Paper: R. Rafailov et al., "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model" (2023).

    Args:
      logps_BT, ref_logps_BT: float32 `[B, T]`.
      mask_BT: bool `[B, T]`.
      beta: static β > 0.

    Returns:
      float32 `[B]`; 0 for an empty response.
    """
    return jnp.sum(implicit_token_rewards(logps_BT, ref_logps_BT, mask_BT, beta=beta), axis=-1)


def implicit_prefix_rewards(logps_BT, ref_logps_BT, mask_BT, *, beta: float) -> jnp.ndarray:
    """Prefix (Q-value) form q_t = Σ_{s ≤ t} β·(log π(y_s) − log π_ref(y_s)).

    q_t is the implicit reward of the partial response y_≤t; the implicit
    process reward of step t is q_t − q_{t−1}. Masked tokens contribute
    nothing to the running sum and read 0.

    Paper: L. Yuan et al., "Free Process Rewards without Process Labels"
    (2024); R. Rafailov et al., "From r to Q*: Your Language Model is Secretly
    a Q-Function" (2024).

    Args:
      logps_BT, ref_logps_BT: float32 `[B, T]`.
      mask_BT: bool `[B, T]`.
      beta: static β > 0.

    Returns:
      float32 `[B, T]`, 0 at masked slots.
    """
    token = implicit_token_rewards(logps_BT, ref_logps_BT, mask_BT, beta=beta)
    return masked_cumsum(token, mask_BT, axis=-1)


__all__ = [
    "ENSEMBLE_MODES",
    "bradley_terry_loss",
    "ensemble_reward",
    "implicit_prefix_rewards",
    "implicit_reward",
    "implicit_token_rewards",
    "pair_metrics",
    "regression_loss",
    "scaled_bradley_terry_loss",
    "weighted_objective_sum",
]
