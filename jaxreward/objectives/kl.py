"""Per-token KL estimators, KL penalties (in the reward or in the loss), KL control.

For tokens y_t sampled from π, with log-ratio x = log π(y_t) − log π_ref(y_t)
(nats) and u = π_ref/π = e^{−x}:

=====  =====================  ============================================
name   estimator              expected value under y ~ π
=====  =====================  ============================================
k1     x                      KL(π‖π_ref) (unbiased, high variance, can be < 0)
k2     ½ x²                   ≈ KL(π‖π_ref) for small x (biased, always ≥ 0)
k3     u − 1 − log u          KL(π‖π_ref) (unbiased, always ≥ 0, low variance)
=====  =====================  ============================================

Reference: J. Schulman, "Approximating KL Divergence" (blog post, 2020).

**Which gradient each gives.** Used *as a reward* (the penalty −β·k enters
the return and the score-function gradient E[−β k ∇log π]), k1 gives exactly
−β ∇KL(π‖π_ref). Used *as a loss* (differentiated through log π of the
sampled tokens, samples held fixed), their expected gradients are:

* k1: E_π[∇ log π] = 0 — no gradient at all; k1 is useless as a loss.
* k2: E_π[x ∇ log π] = ∇ KL(π‖π_ref) — the exact gradient of the reverse KL.
* k3: E_π[(1 − u) ∇ log π] = −Σ π_ref ∇ log π = ∇ KL(π_ref‖π) — the gradient
  of the *forward* KL, not of KL(π‖π_ref), although its value estimates the
  latter. (GRPO uses k3 in the loss.)

**Off-policy samples.** When the tokens come from a behaviour policy π_old
(PPO's later epochs, a lagging rollout worker), the expectations above are
over the wrong distribution. `kl_loss(..., old_logps_BT=...)` weights each
token's term by the importance ratio ρ = π(y_t)/π_old(y_t), held constant
(stop_gradient) and computed as exp(clamp(log π − log π_old, ±20)). Then

    E_{y~π_old}[ρ(y) ∇k(y)] = Σ_y π_old(y) (π(y)/π_old(y)) ∇k(y) = E_{y~π}[∇k(y)],

so each estimator keeps its on-policy expected gradient above (k2 →
∇KL(π‖π_ref), k3 → ∇KL(π_ref‖π), k1 → 0) exactly (while the clamp is
inactive). Without the weights, k1's expected gradient becomes
Σ π_old ∇log π ≠ 0 and k2's and k3's are those of neither KL. Importance
sampling: e.g. R. S. Sutton and A. G. Barto, "Reinforcement Learning: An
Introduction" (2018), section 5.5.

tests/objectives/test_kl.py checks these by enumerating a 3-action policy,
on-policy and off-policy.

Masked slots are selected away before any arithmetic. The log-ratio is
clamped to ±20 in k3 so e^{−x} cannot overflow. Log-probs and masks must
share one `[B, T]` shape exactly (no broadcasting); a mismatch raises a
ValueError naming both shapes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxreward.objectives import registry
from jaxreward.objectives.checks import check_range, check_same_shape, check_token_arrays
from jaxreward.objectives.masking import as_bool, masked_mean, select
from jaxreward.objectives.policy_gradient import aggregate_loss, log_ratio

sg = jax.lax.stop_gradient

MAX_LOG_RATIO = 20.0
ESTIMATORS = ("k1", "k2", "k3")


@registry.register("kl", "k1")
def kl_k1(logps, ref_logps) -> jnp.ndarray:
    """k1 = log π − log π_ref (elementwise on same-shaped arrays; float32 in, float32 out)."""
    check_same_shape("logps", logps, ref_logps=ref_logps)
    return jnp.asarray(logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)


@registry.register("kl", "k2")
def kl_k2(logps, ref_logps) -> jnp.ndarray:
    """k2 = ½ (log π − log π_ref)²; as a loss its expected gradient is ∇KL(π‖π_ref)."""
    return 0.5 * jnp.square(kl_k1(logps, ref_logps))


@registry.register("kl", "k3")
def kl_k3(logps, ref_logps) -> jnp.ndarray:
    """k3 = e^{−x} − 1 + x with x = log π − log π_ref (clamped to ±20).

    Unbiased and non-negative estimate of KL(π‖π_ref); as a loss its expected
    gradient is ∇KL(π_ref‖π) (forward KL).
    """
    x = jnp.clip(kl_k1(logps, ref_logps), -MAX_LOG_RATIO, MAX_LOG_RATIO)
    return jnp.expm1(-x) + x


def kl_per_token(logps_BT, ref_logps_BT, mask_BT, estimator: str) -> jnp.ndarray:
    """Per-token KL estimate, 0 at masked slots.

    Args:
      logps_BT: float32 `[B, T]` policy log-probs of the sampled tokens.
      ref_logps_BT: float32 `[B, T]` reference log-probs of the same tokens.
      mask_BT: bool `[B, T]`.
      estimator: static, ``k1``, ``k2`` or ``k3``.

    Raises:
      KeyError: for an unknown estimator.
    """
    fn = registry.get("kl", estimator)
    check_token_arrays("logps_BT", logps_BT, ref_logps_BT=ref_logps_BT, mask_BT=mask_BT)
    mask = as_bool(mask_BT)
    lp = select(jnp.asarray(logps_BT, jnp.float32), mask)
    ref = select(jnp.asarray(ref_logps_BT, jnp.float32), mask)
    return select(fn(lp, ref), mask)


def kl_metrics(logps_BT, ref_logps_BT, mask_BT) -> dict:
    """All three estimators, without gradient.

    Returns:
      ``kl_k1``, ``kl_k2``, ``kl_k3``: mean per valid token (nats/token);
      ``kl_k1_seq``, ``kl_k2_seq``, ``kl_k3_seq``: mean over non-empty rows
      of the per-sequence sum (nats/response).
    """
    check_token_arrays("logps_BT", logps_BT, ref_logps_BT=ref_logps_BT, mask_BT=mask_BT)
    mask = as_bool(mask_BT)
    nonempty = jnp.any(mask, axis=-1)
    lp, ref = sg(jnp.asarray(logps_BT, jnp.float32)), sg(jnp.asarray(ref_logps_BT, jnp.float32))
    out = {}
    for name in ESTIMATORS:
        k = kl_per_token(lp, ref, mask, name)
        out[f"kl_{name}"] = masked_mean(k, mask)
        out[f"kl_{name}_seq"] = masked_mean(jnp.sum(k, axis=-1), nonempty)
    return out


def apply_kl_penalty(
    token_rewards_BT,
    logps_BT,
    ref_logps_BT,
    mask_BT,
    *,
    beta: float,
    estimator: str = "k1",
):
    """KL as a per-token reward penalty: r'_t = r_t − β·k(y_t).

    The penalty is a reward, hence a constant (stop_gradient). With k1 and a
    policy-gradient loss the expected update is exactly the gradient of
    E[Σ r] − β·KL(π‖π_ref) (Ziegler et al. 2019; Ouyang et al. 2022).

    Paper: D. M. Ziegler et al., "Fine-Tuning Language Models from Human
    Preferences" (2019).

    Args:
      token_rewards_BT: float32 `[B, T]` task rewards (e.g. the sequence
        reward on the last token, see transforms.place_on_last_token).
      logps_BT, ref_logps_BT: float32 `[B, T]`.
      mask_BT: bool `[B, T]`.
      beta: KL coefficient β ≥ 0 (float or float32 scalar array, so an
        adaptive controller can change it without recompiling).
      estimator: static estimator name.

    Returns:
      (rewards_BT, metrics): penalized rewards (0 at masked slots), and the
      `kl_metrics` plus ``kl_penalty_mean`` (mean per token of β·k).
    """
    check_token_arrays("token_rewards_BT", token_rewards_BT, logps_BT=logps_BT, ref_logps_BT=ref_logps_BT,
                       mask_BT=mask_BT)
    check_range("beta", beta, low=0.0)
    mask = as_bool(mask_BT)
    k = sg(kl_per_token(logps_BT, ref_logps_BT, mask, estimator))
    beta = jnp.asarray(beta, jnp.float32)
    rewards = select(jnp.asarray(token_rewards_BT, jnp.float32), mask) - beta * k
    metrics = kl_metrics(logps_BT, ref_logps_BT, mask)
    metrics["kl_penalty_mean"] = masked_mean(beta * k, mask)
    return select(rewards, mask), metrics


def kl_loss(
    logps_BT,
    ref_logps_BT,
    mask_BT,
    *,
    estimator: str,
    old_logps_BT=None,
    loss_agg_mode: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: Optional[int] = None,
):
    """KL as a loss term: aggregate(ρ·k(log π, log π_ref)), differentiated through log π.

    Choose the estimator deliberately (module docstring): ``k2`` gives the
    exact expected gradient of KL(π‖π_ref); ``k3`` (GRPO's choice) gives
    that of KL(π_ref‖π); ``k1`` gives zero expected gradient. The caller
    multiplies the loss by its coefficient.

    On-policy (tokens sampled from π, `old_logps_BT` None) ρ = 1. When the
    tokens were sampled from a behaviour policy π_old, pass its log-probs:
    each token's term is weighted by the constant importance ratio

        ρ_t = stop_gradient(exp(clamp(log π(y_t) − log π_old(y_t), ±20)))

    so that E_{y~π_old}[ρ ∇k] = E_{y~π}[∇k] and the gradients above hold
    (module docstring, "Off-policy samples").

    Paper: Z. Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical
    Reasoning in Open Language Models" (2024) (KL in the GRPO loss).

    Args:
      logps_BT: float32 `[B, T]` policy log-probs (differentiated).
      ref_logps_BT: float32 `[B, T]` reference log-probs (constant).
      mask_BT: bool `[B, T]`.
      estimator: static ``k1``/``k2``/``k3`` (required on purpose).
      old_logps_BT: optional float32 `[B, T]` log-probs of the sampled tokens
        under the behaviour policy π_old (constant).
      loss_agg_mode, num_tokens, num_seqs, max_len: aggregation.

    Returns:
      (loss, metrics): ``loss`` plus `kl_metrics` (unweighted means over the
      sampled tokens, so off-policy they describe π on π_old's samples), and
      with `old_logps_BT` ``kl_importance_weight_mean``, the mean ρ per valid
      token (1 when π = π_old).

    Raises:
      ValueError: if the arrays do not share one `[B, T]` shape.
      KeyError: for an unknown estimator or aggregation mode.
    """
    mask = as_bool(mask_BT)
    k = kl_per_token(logps_BT, sg(jnp.asarray(ref_logps_BT, jnp.float32)), mask, estimator)
    extra = {}
    if old_logps_BT is not None:
        lr = log_ratio(sg(jnp.asarray(logps_BT, jnp.float32)), sg(jnp.asarray(old_logps_BT, jnp.float32)), mask)
        rho = select(jnp.exp(jnp.clip(lr, -MAX_LOG_RATIO, MAX_LOG_RATIO)), mask)
        k = rho * k
        extra["kl_importance_weight_mean"] = masked_mean(rho, mask)
    loss = aggregate_loss(k, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, {"loss": loss, **kl_metrics(logps_BT, ref_logps_BT, mask), **extra}


def adaptive_kl_coef(beta, observed_kl, n_steps, *, target: float, horizon: float, max_error: float = 0.2):
    """One update of the adaptive KL controller (proportional control on log β).

        e     = clip(KL / target − 1, −max_error, max_error)
        β_new = β · (1 + e · n_steps / horizon)

    β grows when the observed KL is above target and shrinks below it.

    Paper: D. M. Ziegler et al., "Fine-Tuning Language Models from Human
    Preferences" (2019), section 2.2.

    Args:
      beta: float32 scalar, the current β.
      observed_kl: float32 scalar, the KL measured on the last batch (nats per
        response, the same units as `target`).
      n_steps: number of samples (or steps) since the last update.
      target: static target KL (nats), > 0.
      horizon: static horizon (samples), > 0.
      max_error: static clip of the proportional error.

    Returns:
      float32 scalar, the new β.

    Raises:
      ValueError: if target, horizon or max_error is not positive.
    """
    check_range("target", target, low=0.0, low_open=True)
    check_range("horizon", horizon, low=0.0, low_open=True)
    check_range("max_error", max_error, low=0.0, low_open=True)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -max_error, max_error)
    return jnp.asarray(beta, jnp.float32) * (1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon)


__all__ = [
    "ESTIMATORS",
    "adaptive_kl_coef",
    "apply_kl_penalty",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_metrics",
    "kl_per_token",
]
