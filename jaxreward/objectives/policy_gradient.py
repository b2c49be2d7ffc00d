"""Policy-gradient surrogate losses, value loss, entropy and loss aggregation.

Per-token arrays are `[B, T]` with a bool `mask_BT` of response tokens;
`logps_BT[b, t]` is log π(token t+1 | tokens ≤ t) in nats (float32).
Advantages may be given per token `[B, T]` or per sequence `[B]` (then
broadcast over the tokens).

Aggregation modes (kind ``aggregation``) turn a per-token loss l[b, t] into a
scalar Σ_bt w[b, t]·l[b, t]. With n_b the number of valid tokens in row b,
N = Σ_b n_b, S the number of rows with n_b > 0 and L a fixed length:

==========================  =======================  ============================
mode                        per-token weight w[b,t]  used by
==========================  =======================  ============================
token-mean                  1 / N                    DAPO, PPO in most RLHF code
seq-mean-token-mean         1 / (S · n_b)            GRPO (DeepSeekMath)
seq-mean-token-sum          1 / S                    —
seq-mean-token-sum-norm     1 / (S · L)              Dr. GRPO (L = max generation length)
==========================  =======================  ============================

(w = 0 at masked slots.) N and S are batch-level counts: when a batch is split
into micro-batches and gradients are summed, pass `num_tokens` = N and
`num_seqs` = S of the *whole* batch (see `aggregation_normalizers`) and the
sum of micro-batch losses equals the one-shot loss in every mode. L defaults
to T, the padded length; pass `max_len` to fix it across batches as Dr. GRPO
intends.

Policy losses (kind ``policy_loss``) share the signature
`(logps_BT, old_logps_BT, advantages, mask_BT, *, ...) -> (loss, metrics)`.

Every per-token array must have exactly the shape of `mask_BT` (no
broadcasting); a mismatch raises a ValueError naming both shapes
(`checks.check_token_arrays`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxreward.objectives import registry
from jaxreward.objectives.checks import check_int, check_ndim, check_range, check_shape, check_token_arrays
from jaxreward.objectives.masking import (
    as_bool,
    masked_count,
    masked_mean,
    safe_divide,
    select,
)

sg = jax.lax.stop_gradient

# Log-ratios are clamped to this range before exp so one bad token cannot
# overflow float32; e^20 ≈ 5e8 is far outside any clip range.
MAX_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------


def aggregation_normalizers(mask_BT) -> dict:
    """Batch-level counts for aggregation: `num_tokens` (N) and `num_seqs` (S).

    Compute these on the whole batch before splitting it into micro-batches.

    Args:
      mask_BT: bool `[B, T]`.

    Returns:
      dict of float32 scalars `num_tokens`, `num_seqs`.
    """
    check_ndim("mask_BT", mask_BT, 2, "[B, T]")
    mask = as_bool(mask_BT)
    return {
        "num_tokens": masked_count(mask),
        "num_seqs": masked_count(jnp.any(mask, axis=-1)),
    }


def _counts(mask, num_tokens, num_seqs):
    check_ndim("mask_BT", mask, 2, "[B, T]")
    for name, value in (("num_tokens", num_tokens), ("num_seqs", num_seqs)):
        if value is not None:
            check_ndim(name, value, 0, "a scalar (a count over the whole batch)")
    n_tok = masked_count(mask) if num_tokens is None else jnp.asarray(num_tokens, jnp.float32)
    n_seq = masked_count(jnp.any(mask, axis=-1)) if num_seqs is None else jnp.asarray(num_seqs, jnp.float32)
    return n_tok, n_seq


@registry.register("aggregation", "token-mean")
def token_mean_weights(mask_BT, *, num_tokens=None, num_seqs=None, max_len=None):
    """w[b, t] = 1/N: every valid token in the batch counts the same.

    Long responses carry proportionally more weight. Paper: Q. Yu et al.,
    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (2025).
    """
    mask = as_bool(mask_BT)
    n_tok, _ = _counts(mask, num_tokens, num_seqs)
    return select(jnp.broadcast_to(safe_divide(1.0, n_tok), mask.shape), mask)


@registry.register("aggregation", "seq-mean-token-mean")
def seq_mean_token_mean_weights(mask_BT, *, num_tokens=None, num_seqs=None, max_len=None):
    """w[b, t] = 1/(S·n_b): mean over each sequence's tokens, then over sequences.

    Every response counts the same, so a token of a short response weighs
    more than one of a long response. Paper: Z. Shao et al., "DeepSeekMath:
    Pushing the Limits of Mathematical Reasoning in Open Language Models"
    (2024) (GRPO).
    """
    mask = as_bool(mask_BT)
    _, n_seq = _counts(mask, num_tokens, num_seqs)
    n_b = masked_count(mask, axis=-1)
    return select(safe_divide(1.0, n_b * n_seq)[:, None] * jnp.ones(mask.shape, jnp.float32), mask)


@registry.register("aggregation", "seq-mean-token-sum")
def seq_mean_token_sum_weights(mask_BT, *, num_tokens=None, num_seqs=None, max_len=None):
    """w[b, t] = 1/S: sum over each sequence's tokens, mean over sequences."""
    mask = as_bool(mask_BT)
    _, n_seq = _counts(mask, num_tokens, num_seqs)
    return select(jnp.broadcast_to(safe_divide(1.0, n_seq), mask.shape), mask)


@registry.register("aggregation", "seq-mean-token-sum-norm")
def seq_mean_token_sum_norm_weights(mask_BT, *, num_tokens=None, num_seqs=None, max_len=None):
    """w[b, t] = 1/(S·L): token sums divided by a fixed length L, mean over sequences.

    Removes GRPO's per-response length normalization (its bias towards long
    wrong answers) while keeping the loss scale fixed. L = `max_len` (static;
    the maximum generation length) or the padded length T.

    Paper: Z. Liu et al., "Understanding R1-Zero-Like Training: A Critical
    Perspective" (2025) (Dr. GRPO).
    """
    mask = as_bool(mask_BT)
    _, n_seq = _counts(mask, num_tokens, num_seqs)
    length = float(mask.shape[-1] if max_len is None else check_int("max_len", max_len))
    return select(jnp.broadcast_to(safe_divide(1.0, n_seq * length), mask.shape), mask)


AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregation_weights(mask_BT, mode: str, *, num_tokens=None, num_seqs=None, max_len: Optional[int] = None):
    """Per-token weights w[b, t] of an aggregation mode (table in the module docstring).

    Args:
      mask_BT: bool `[B, T]`.
      mode: static, one of `AGGREGATION_MODES`.
      num_tokens: optional float32 scalar N over the whole batch.
      num_seqs: optional float32 scalar S over the whole batch.
      max_len: static L for ``seq-mean-token-sum-norm``.

    Returns:
      float32 `[B, T]`, 0 at masked slots; all 0 if the batch is empty.

    Raises:
      KeyError: for an unknown mode (the message lists the modes).
    """
    fn = registry.get("aggregation", mode)
    if max_len is not None:
        check_int("max_len", max_len)
    return fn(mask_BT, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)


def aggregate_loss(loss_BT, mask_BT, mode: str = "token-mean", *, num_tokens=None, num_seqs=None, max_len=None):
    """Σ_bt w[b, t]·l[b, t] for the aggregation `mode`.

    Masked slots of `loss_BT` are replaced by 0 before the weighted sum, so
    NaN/inf there affect neither the value nor the gradient.

    Args:
      loss_BT: float32 `[B, T]` per-token loss.
      mask_BT: bool `[B, T]`.
      mode: static aggregation mode.
      num_tokens, num_seqs, max_len: see `aggregation_weights`.

    Returns:
      float32 scalar.
    """
    check_token_arrays("loss_BT", loss_BT, mask_BT=mask_BT)
    weights = sg(aggregation_weights(mask_BT, mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len))
    return jnp.sum(select(jnp.asarray(loss_BT, jnp.float32), mask_BT) * weights)


# ----------------------------------------------------------------------------
# Ratios
# ----------------------------------------------------------------------------


def log_ratio(logps_BT, old_logps_BT, mask_BT) -> jnp.ndarray:
    """Per-token log π(y_t) − log π_old(y_t), 0 at masked slots.

    Args:
      logps_BT: float32 `[B, T]` current-policy log-probs.
      old_logps_BT: float32 `[B, T]` behaviour-policy log-probs.
      mask_BT: bool `[B, T]`.

    Raises:
      ValueError: if the three shapes are not one `[B, T]`.
    """
    check_token_arrays("logps_BT", logps_BT, old_logps_BT=old_logps_BT, mask_BT=mask_BT)
    lp = select(jnp.asarray(logps_BT, jnp.float32), mask_BT)
    old = select(jnp.asarray(old_logps_BT, jnp.float32), mask_BT)
    return lp - old


def _token_advantages(advantages, mask):
    check_shape("advantages", advantages, mask.shape, "mask_BT", allow_prefix=True)
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.ndim == 1:
        adv = jnp.broadcast_to(adv[:, None], mask.shape)
    return select(adv, mask)


def _clipped_surrogate(ratio, adv, clip_eps_low, clip_eps_high, dual_clip):
    """−min(ρA, clip(ρ, 1−ε_l, 1+ε_h)A), with the dual clip for A < 0."""
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = jnp.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    dual_active = jnp.zeros(ratio.shape, bool)
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss > dual_bound)
        loss = jnp.where(adv < 0, jnp.minimum(loss, dual_bound), loss)
    return loss, is_clipped, dual_active


def _check_clip(clip_eps, clip_eps_high, dual_clip):
    check_range("clip_eps", clip_eps, low=0.0, low_open=True)
    if clip_eps_high is not None:
        check_range("clip_eps_high", clip_eps_high, low=0.0, low_open=True)
    if dual_clip is not None:
        check_range("dual_clip", dual_clip, low=1.0, low_open=True)
    return clip_eps if clip_eps_high is None else clip_eps_high


# ----------------------------------------------------------------------------
# Policy losses
# ----------------------------------------------------------------------------


@registry.register("policy_loss", "ppo")
def ppo_policy_loss(
    logps_BT,
    old_logps_BT,
    advantages,
    mask_BT,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: Optional[int] = None,
):
    """PPO clipped surrogate with asymmetric clipping and an optional dual clip.

        ρ_t  = exp(log π(y_t) − log π_old(y_t))
        l_t  = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε_low, 1 + ε_high))
        l_t  = min(l_t, −c·A_t)       where A_t < 0      (dual clip, c > 1)
        loss = aggregate(l, mode)

    Papers: J. Schulman et al., "Proximal Policy Optimization Algorithms"
    (2017); the dual clip from D. Ye et al., "Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning" (2020); clip-higher
    (ε_high > ε_low) from Q. Yu et al., "DAPO: An Open-Source LLM
    Reinforcement Learning System at Scale" (2025).

    Args:
      logps_BT: float32 `[B, T]` current log-probs (differentiated).
      old_logps_BT: float32 `[B, T]` behaviour log-probs (constant).
      advantages: float32 `[B, T]` or `[B]` advantages (constant).
      mask_BT: bool `[B, T]`.
      clip_eps: static ε_low > 0.
      clip_eps_high: static ε_high (default ε_low).
      dual_clip: static c > 1 or None.
      loss_agg_mode: static aggregation mode.
      num_tokens, num_seqs, max_len: aggregation normalizers (see module).

    Returns:
      (loss, metrics): ``loss``, ``clipfrac`` (fraction of tokens where the
      ε clip is active), ``dual_clipfrac``, ``ppo_kl`` (mean of
      log π_old − log π, an estimate of KL(π_old‖π)), ``ratio_mean``.

    Raises:
      ValueError: for non-positive ε, c <= 1, or arrays whose shapes are not
        one `[B, T]` (advantages: `[B, T]` or `[B]`); KeyError for an
        unknown mode.
    """
    high = _check_clip(clip_eps, clip_eps_high, dual_clip)
    mask = as_bool(mask_BT)
    lr = jnp.clip(log_ratio(logps_BT, sg(old_logps_BT), mask), -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = jnp.exp(lr)
    adv = sg(_token_advantages(advantages, mask))
    loss_BT, clipped, dual = _clipped_surrogate(ratio, adv, clip_eps, high, dual_clip)
    loss = aggregate_loss(loss_BT, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics = {
        "loss": loss,
        "clipfrac": masked_mean(clipped.astype(jnp.float32), mask),
        "dual_clipfrac": masked_mean(dual.astype(jnp.float32), mask),
        "ppo_kl": masked_mean(-sg(lr), mask),
        "ratio_mean": masked_mean(sg(ratio), mask),
    }
    return loss, metrics


@registry.register("policy_loss", "gspo")
def gspo_policy_loss(
    logps_BT,
    old_logps_BT,
    advantages,
    mask_BT,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: Optional[float] = 4e-4,
    loss_agg_mode: str = "seq-mean-token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: Optional[int] = None,
):
    """GSPO: PPO clipping on a sequence-level, length-normalized ratio.

        s_b     = exp( (1/n_b) Σ_t (log π(y_t) − log π_old(y_t)) )
        s_{b,t} = stop_grad(s_b) · π(y_t) / stop_grad(π(y_t))   (token form)
        l_{b,t} = max(−A_b s_{b,t}, −A_b clip(s_{b,t}, 1 − ε_low, 1 + ε_high))

    s_{b,t} equals s_b in value, and with ``seq-mean-token-mean`` aggregation
    and one advantage per sequence its gradient equals that of the
    sequence-level objective (1/S)·Σ_b max(−A_b s_b, −A_b clip(s_b)). The
    token form also admits per-token advantages.

    Paper: C. Zheng et al., "Group Sequence Policy Optimization" (2025); its
    clip ranges are tiny (3e-4, 4e-4) because s_b is a geometric mean.

    Args:
      as `ppo_policy_loss`; the defaults follow the paper.

    Returns:
      (loss, metrics): ``loss``, ``clipfrac`` (fraction of tokens clipped),
      ``seq_ratio_mean`` (mean s_b over non-empty rows), ``ppo_kl``.
    """
    high = _check_clip(clip_eps, clip_eps_high, None)
    mask = as_bool(mask_BT)
    lr = log_ratio(logps_BT, sg(old_logps_BT), mask)
    seq_lr_B = masked_mean(lr, mask, axis=-1)
    lp = select(jnp.asarray(logps_BT, jnp.float32), mask)
    token_lr = sg(seq_lr_B)[:, None] + lp - sg(lp)
    ratio = jnp.exp(jnp.minimum(token_lr, MAX_LOG_RATIO))
    adv = sg(_token_advantages(advantages, mask))
    loss_BT, clipped, _ = _clipped_surrogate(ratio, adv, clip_eps, high, None)
    loss = aggregate_loss(loss_BT, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    nonempty = jnp.any(mask, axis=-1)
    metrics = {
        "loss": loss,
        "clipfrac": masked_mean(clipped.astype(jnp.float32), mask),
        "seq_ratio_mean": masked_mean(jnp.exp(sg(seq_lr_B)), nonempty),
        "ppo_kl": masked_mean(-sg(lr), mask),
    }
    return loss, metrics


# ----------------------------------------------------------------------------
# Value and entropy
# ----------------------------------------------------------------------------


def value_loss(
    values_BT,
    old_values_BT,
    returns_BT,
    mask_BT,
    *,
    clip_eps: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: Optional[int] = None,
):
    """Clipped value loss: ½·max((V − R)², (V_clip − R)²).

        V_clip = V_old + clip(V − V_old, −ε, ε)

    Without `clip_eps` it is ½·(V − R)². Paper: J. Schulman et al.,
    "Proximal Policy Optimization Algorithms" (2017) (clipping as in the
    OpenAI baselines implementation).

    Args:
      values_BT: float32 `[B, T]` current value predictions (differentiated).
      old_values_BT: float32 `[B, T]` values at rollout time.
      returns_BT: float32 `[B, T]` targets (e.g. GAE returns).
      mask_BT: bool `[B, T]`.
      clip_eps: static ε > 0 (in value units) or None.
      loss_agg_mode, num_tokens, num_seqs, max_len: aggregation.

    Returns:
      (loss, metrics): ``loss``, ``vf_clipfrac``, ``value_mean``,
      ``return_mean``.
    """
    check_token_arrays("values_BT", values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT,
                       mask_BT=mask_BT)
    if clip_eps is not None:
        check_range("clip_eps", clip_eps, low=0.0, low_open=True)
        if old_values_BT is None:
            raise ValueError("value_loss with clip_eps needs old_values_BT")
    mask = as_bool(mask_BT)
    v = select(jnp.asarray(values_BT, jnp.float32), mask)
    ret = sg(select(jnp.asarray(returns_BT, jnp.float32), mask))
    err = jnp.square(v - ret)
    if clip_eps is None:
        loss_BT = 0.5 * err
        clipped = jnp.zeros(mask.shape, bool)
    else:
        old = sg(select(jnp.asarray(old_values_BT, jnp.float32), mask))
        v_clip = old + jnp.clip(v - old, -clip_eps, clip_eps)
        err_clip = jnp.square(v_clip - ret)
        loss_BT = 0.5 * jnp.maximum(err, err_clip)
        clipped = err_clip > err
    loss = aggregate_loss(loss_BT, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, {
        "loss": loss,
        "vf_clipfrac": masked_mean(clipped.astype(jnp.float32), mask),
        "value_mean": masked_mean(sg(v), mask),
        "return_mean": masked_mean(ret, mask),
    }


def entropy_from_logits(logits_BTV, mask_BT) -> jnp.ndarray:
    """Per-token entropy H = −Σ_v p_v log p_v of the softmax over the vocabulary.

    Args:
      logits_BTV: float `[B, T, V]` logits (upcast to float32).
      mask_BT: bool `[B, T]`; rows of masked positions are zeroed first.

    Returns:
      float32 `[B, T]` entropies in nats, 0 at masked slots.
    """
    shape = check_ndim("logits_BTV", logits_BTV, 3, "[B, T, V]")
    check_shape("mask_BT", mask_BT, shape[:2], "logits_BTV's [B, T]")
    mask = as_bool(mask_BT)
    logits = select(jnp.asarray(logits_BTV, jnp.float32), mask[..., None])
    logp = jax.nn.log_softmax(logits, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return select(ent, mask)


def entropy_loss(
    entropy_BT,
    mask_BT,
    *,
    loss_agg_mode: str = "token-mean",
    num_tokens=None,
    num_seqs=None,
    max_len: Optional[int] = None,
):
    """Entropy bonus as a loss: −aggregate(H). Add `coef · loss` to maximize entropy.

    Args:
      entropy_BT: float32 `[B, T]` per-token entropies (`entropy_from_logits`).
      mask_BT: bool `[B, T]`.
      loss_agg_mode, num_tokens, num_seqs, max_len: aggregation.

    Returns:
      (loss, metrics): ``loss`` (= −entropy) and ``entropy``.
    """
    check_token_arrays("entropy_BT", entropy_BT, mask_BT=mask_BT)
    ent = aggregate_loss(entropy_BT, mask_BT, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return -ent, {"loss": -ent, "entropy": sg(ent)}


__all__ = [
    "AGGREGATION_MODES",
    "MAX_LOG_RATIO",
    "aggregate_loss",
    "aggregation_normalizers",
    "aggregation_weights",
    "entropy_from_logits",
    "entropy_loss",
    "gspo_policy_loss",
    "log_ratio",
    "ppo_policy_loss",
    "value_loss",
]
