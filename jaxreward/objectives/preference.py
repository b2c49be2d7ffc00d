"""Preference-optimization losses on sequence log-probs.

Calling convention for kind ``preference`` (pairwise) — every function takes

    chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B

as its first four arguments: float32 `[B]` log-probabilities (nats) of the
chosen and rejected responses under the policy and the frozen reference,
**summed** over response tokens (use `sequence_logps`). Hyper-parameters are
keyword-only and static (`beta`, ...). Losses that need response lengths
(SimPO, ORPO, or IPO with `length_normalize=True`) take `chosen_lengths_B`,
`rejected_lengths_B` (number of response tokens). Reference-free losses
accept the reference arguments and ignore them (pass None); they carry the
attribute ``uses_reference = False`` so a trainer can skip the reference pass.
Every loss takes an optional `example_mask_B` (bool) and averages over the
valid pairs (0 if none). Every `[B]` argument (log-probs, mask, lengths,
margins) must have exactly the shape of `chosen_logps_B`: nothing is
broadcast, and a mismatch raises a ValueError naming the argument and both
shapes (`check_pair_shapes`).

Every loss returns `(loss, metrics)` where metrics holds at least ``loss``,
``accuracy`` (chosen implicit reward > rejected strictly, ties 0 as in TRL), ``margin_mean``,
``chosen_reward_mean``/``_std`` and ``rejected_reward_mean``/``_std``. The
implicit reward is β·(log π − log π_ref) unless the docstring says otherwise.

Notation in docstrings: ρ_c = log π(y_c) − log π_ref(y_c) and ρ_r likewise
(the log-ratios), h = ρ_c − ρ_r, σ the logistic function.

Every function registered under ``preference`` has that signature
(`registry.PreferenceLoss`), so a trainer takes any of them by name. TGDPO,
which needs per-token log-probs, is registered under kind
``token_preference`` (`registry.TokenPreferenceLoss`: the four `[B, T]`
log-prob arrays, then the chosen and rejected response masks). KTO is
unpaired and registered under kind ``unpaired_preference``
(`registry.UnpairedPreferenceLoss`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import jax
import jax.numpy as jnp

from jaxreward.objectives import registry
from jaxreward.objectives.checks import (check_ndim, check_range, check_same_shape, check_shape,
                                         check_values_in_range)
from jaxreward.objectives.masking import (
    as_bool,
    masked_mean,
    masked_std,
    masked_sum,
    safe_divide,
    select,
)
from jaxreward.objectives.reward import pair_metrics

# A given statistic is cast to float32: beyond this it would be inf there (a traced value is not checked).
_F32_MAX = float(jnp.finfo(jnp.float32).max)

log_sigmoid = jax.nn.log_sigmoid
sg = jax.lax.stop_gradient


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def sequence_logps(logps_BT, mask_BT, *, average: bool = False) -> jnp.ndarray:
    """Response log-prob of each row: Σ_t logps[b, t] over the mask (or its mean).

    Args:
      logps_BT: float32 `[B, T]`, `logps[b, t]` = log p(token t+1 | tokens ≤ t).
      mask_BT: bool `[B, T]`, the response tokens whose log-prob counts.
      average: static; divide by the number of response tokens.

    Returns:
      float32 `[B]`; 0 for an empty response.
    """
    logps_BT = jnp.asarray(logps_BT, jnp.float32)
    total = masked_sum(logps_BT, mask_BT, axis=-1)
    if average:
        return safe_divide(total, jnp.sum(as_bool(mask_BT), axis=-1))
    return total


def _mask(example_mask_B, like) -> jnp.ndarray:
    if example_mask_B is None:
        return jnp.ones(jnp.shape(like), bool)
    return as_bool(example_mask_B)


_SUMMED_HINT = "per-token [B, T] log-probs must be summed first (sequence_logps(logps_BT, mask_BT))"


def check_pair_shapes(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B=None,
    ref_rejected_logps_B=None,
    example_mask_B=None,
    **per_pair_B,
) -> tuple[int]:
    """Checks the shapes of a pairwise loss's arrays; every loss calls it first.

    `chosen_logps_B` must be `[B]`, and every other array given (None is
    skipped) must be `[B]` too: the other log-probs, `example_mask_B`, and any
    per-pair array passed by keyword (`chosen_lengths_B=...`, ...). JAX would
    otherwise broadcast a `[B, 1]` mask or length against `[B]` log-probs into
    a `[B, B]` loss and return a wrong number.

    Returns:
      `(B,)`.

    Raises:
      ValueError: naming the argument and both shapes.
    """
    check_ndim("chosen_logps_B", chosen_logps_B, 1, "[B] (one summed log-prob per response)", _SUMMED_HINT)
    return check_same_shape(
        "chosen_logps_B",
        chosen_logps_B,
        rejected_logps_B=rejected_logps_B,
        ref_chosen_logps_B=ref_chosen_logps_B,
        ref_rejected_logps_B=ref_rejected_logps_B,
        example_mask_B=example_mask_B,
        **per_pair_B,
    )


def _pair_inputs(chosen, rejected, ref_chosen, ref_rejected, example_mask_B, fill=0.0):
    """float32 inputs with masked pairs replaced by `fill` before any arithmetic (shapes checked)."""
    check_pair_shapes(chosen, rejected, ref_chosen, ref_rejected, example_mask_B)
    chosen = jnp.asarray(chosen, jnp.float32)
    mask = _mask(example_mask_B, chosen)
    out = [select(chosen, mask, fill), select(jnp.asarray(rejected, jnp.float32), mask, fill)]
    for ref in (ref_chosen, ref_rejected):
        out.append(None if ref is None else select(jnp.asarray(ref, jnp.float32), mask, fill))
    return (*out, mask)


def _per_pair(name, x, mask, chosen_logps_B) -> jnp.ndarray:
    """A per-pair `[B]` array (lengths, margins) as float32, 0 at masked pairs."""
    check_shape(name, x, jnp.shape(chosen_logps_B), "chosen_logps_B")
    return select(jnp.asarray(x, jnp.float32), mask)


def log_ratios(chosen, rejected, ref_chosen, ref_rejected, example_mask_B):
    """Log-ratios of a pair batch, the first step of every reference-based loss.

    Args:
      chosen, rejected, ref_chosen, ref_rejected: float32 `[B]` summed log-probs.
      example_mask_B: optional bool `[B]`; masked pairs are zeroed first.

    Returns:
      (ρ_c, ρ_r, mask): ρ = log π − log π_ref for chosen and rejected, float32
      `[B]` (0 for masked pairs), and the bool `[B]` mask.

    Raises:
      ValueError: if a reference array is None.
    """
    if ref_chosen is None or ref_rejected is None:
        raise ValueError("this loss needs the reference log-probs (ref_chosen_logps_B, ref_rejected_logps_B)")
    c, r, rc, rr, mask = _pair_inputs(chosen, rejected, ref_chosen, ref_rejected, example_mask_B)
    return c - rc, r - rr, mask


def reduce_pair_loss(losses_B, chosen_rewards_B, rejected_rewards_B, mask_B, **extra):
    """Averages per-pair losses over valid pairs and builds the standard metrics.

    Args:
      losses_B: float32 `[B]` per-pair losses.
      chosen_rewards_B, rejected_rewards_B: float32 `[B]` implicit rewards.
      mask_B: bool `[B]`.
      **extra: more metrics: `[B]` arrays are averaged over valid pairs,
        scalars are reported as they are (all without gradient).

    Returns:
      (loss, metrics) with the keys of `reward.pair_metrics` plus ``loss``.
    """
    loss = masked_mean(losses_B, mask_B)
    metrics = {"loss": loss, **pair_metrics(chosen_rewards_B, rejected_rewards_B, mask_B)}
    for k, v in extra.items():
        metrics[k] = masked_mean(sg(v), mask_B) if jnp.ndim(v) else sg(jnp.asarray(v, jnp.float32))
    return loss, metrics


def _reference_free(fn):
    fn.uses_reference = False
    return fn


def _check_beta(beta):
    check_range("beta", beta, low=0.0, low_open=True)


# ----------------------------------------------------------------------------
# Pairwise losses
# ----------------------------------------------------------------------------


@registry.register("preference", "dpo")
def dpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    example_mask_B=None,
):
    """DPO (sigmoid loss): −log σ(β·h), h = ρ_c − ρ_r.

    Paper: R. Rafailov et al., "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model" (2023). TRL calls it ``sigmoid``.

    Args:
      chosen_logps_B, rejected_logps_B, ref_chosen_logps_B,
        ref_rejected_logps_B: float32 `[B]` summed response log-probs.
      beta: static β > 0, the KL coefficient (larger stays closer to the
        reference; typical 0.1). Units: nats⁻¹ on log-ratios.
      example_mask_B: optional bool `[B]`.

    Returns:
      (loss, metrics); implicit rewards β·ρ.

    Raises:
      ValueError: if beta <= 0 or a reference array is None.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    h = rho_c - rho_r
    losses = -log_sigmoid(beta * h)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "cdpo")
def cdpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    label_smoothing: float,
    example_mask_B=None,
):
    """Conservative DPO: DPO against labels flipped with probability ε.

        loss = −(1 − ε)·log σ(β h) − ε·log σ(−β h)

    Paper: E. Mitchell, "A note on DPO with noisy preferences & relationship
    to IPO" (2023). TRL: ``sigmoid`` with ``label_smoothing``.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0.
      label_smoothing: static ε in [0, 0.5); ε = 0 is DPO. ε = 0.5 is
        refused: the loss is then symmetric in the margin, its minimum is
        the reference itself, and a run would train nothing.
      example_mask_B: optional bool `[B]`.

    Raises:
      ValueError: if ε is outside [0, 0.5) or beta <= 0.
    """
    _check_beta(beta)
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    h = rho_c - rho_r
    eps = label_smoothing
    losses = -(1.0 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "robust_dpo")
def robust_dpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    label_smoothing: float,
    example_mask_B=None,
):
    """Robust DPO: an unbiased DPO loss under labels flipped with rate ε.

        loss = [−(1 − ε)·log σ(β h) + ε·log σ(−β h)] / (1 − 2ε)

    Its expectation over the noisy labels equals the clean DPO loss. Note the
    + sign on the second term (cDPO has −).

    Paper: S. R. Chowdhury, A. Kini, N. Natarajan, "Provably Robust DPO:
    Aligning Language Models with Noisy Feedback" (2024).

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0.
      label_smoothing: static flip rate ε in [0, 0.5).

    Raises:
      ValueError: if ε is outside [0, 0.5) or beta <= 0.
    """
    _check_beta(beta)
    check_range("label_smoothing", label_smoothing, low=0.0, high=0.5, high_open=True)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    h = rho_c - rho_r
    eps = label_smoothing
    losses = (-(1.0 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "ipo")
def ipo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    length_normalize: bool = False,
    chosen_lengths_B=None,
    rejected_lengths_B=None,
    example_mask_B=None,
):
    """IPO: squared regression of h onto 1/(2τ), with τ = beta.

        loss = (h − 1/(2β))²

    Paper: M. G. Azar et al., "A General Theoretical Paradigm to Understand
    Learning from Human Preferences" (2023), eq. 17.

    The paper writes the loss on sequence log-probs; TRL feeds it per-token
    *averaged* log-probs. Set `length_normalize=True` (and pass the lengths)
    for TRL's variant: every log-prob, policy and reference, is divided by
    its response length first.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static τ > 0 (the target margin is 1/(2τ) nats).
      length_normalize: static; see above.
      chosen_lengths_B, rejected_lengths_B: int or float `[B]` response
        lengths, needed when `length_normalize`.

    Raises:
      ValueError: if beta <= 0, or lengths are missing when needed.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    check_pair_shapes(chosen_logps_B, rejected_logps_B, chosen_lengths_B=chosen_lengths_B,
                      rejected_lengths_B=rejected_lengths_B)
    if length_normalize:
        if chosen_lengths_B is None or rejected_lengths_B is None:
            raise ValueError("length_normalize=True needs chosen_lengths_B and rejected_lengths_B")
        rho_c = safe_divide(rho_c, _per_pair("chosen_lengths_B", chosen_lengths_B, mask, chosen_logps_B))
        rho_r = safe_divide(rho_r, _per_pair("rejected_lengths_B", rejected_lengths_B, mask, chosen_logps_B))
    h = rho_c - rho_r
    losses = jnp.square(h - 1.0 / (2.0 * beta))
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "hinge")
def hinge_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    example_mask_B=None,
):
    """SLiC-style hinge on the log-ratio margin: max(0, 1 − β h).

    Paper: Y. Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with
    Human Feedback" (2023). SLiC's calibration margin δ corresponds to 1/β;
    like TRL's ``hinge`` we use reference-normalized log-probs (h), which
    with a uniform reference reduces to SLiC's raw log-prob margin.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0 (margin 1/β in nats).
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    h = rho_c - rho_r
    losses = jax.nn.relu(1.0 - beta * h)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@_reference_free
@registry.register("preference", "simpo")
def simpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B=None,
    ref_rejected_logps_B=None,
    *,
    beta: float,
    gamma: float,
    chosen_lengths_B,
    rejected_lengths_B,
    example_mask_B=None,
):
    """SimPO: length-normalized, reference-free reward with a target margin γ.

        r_c = β·log π(y_c)/|y_c|,  r_r = β·log π(y_r)/|y_r|
        loss = −log σ(r_c − r_r − γ)

    Paper: Y. Meng, M. Xia, D. Chen, "SimPO: Simple Preference Optimization
    with a Reference-Free Reward" (2024). γ is in reward units: the paper's
    γ, TRL's `CPOConfig.simpo_gamma`; the authors' own trainer takes
    `gamma_beta_ratio` = γ/β instead.

    Args:
      chosen_logps_B, rejected_logps_B: float32 `[B]` summed log-probs.
      ref_*: ignored (pass None).
      beta: static β > 0 (paper: 2–10).
      gamma: static margin γ ≥ 0 in reward units.
      chosen_lengths_B, rejected_lengths_B: `[B]` response token counts.

    Returns:
      (loss, metrics); implicit rewards are r_c, r_r above.
    """
    _check_beta(beta)
    c, r, _, _, mask = _pair_inputs(chosen_logps_B, rejected_logps_B, None, None, example_mask_B)
    check_range("gamma", gamma, low=0.0)
    reward_c = beta * safe_divide(c, _per_pair("chosen_lengths_B", chosen_lengths_B, mask, chosen_logps_B))
    reward_r = beta * safe_divide(r, _per_pair("rejected_lengths_B", rejected_lengths_B, mask, chosen_logps_B))
    losses = -log_sigmoid(reward_c - reward_r - gamma)
    return reduce_pair_loss(losses, reward_c, reward_r, mask)


@_reference_free
@registry.register("preference", "orpo")
def orpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B=None,
    ref_rejected_logps_B=None,
    *,
    beta: float,
    chosen_lengths_B,
    rejected_lengths_B,
    example_mask_B=None,
):
    """ORPO: NLL on the chosen response plus a log odds-ratio penalty.

        p̄ = mean per-token log-prob (log π / |y|)
        log odds(y) = p̄ − log(1 − exp(p̄))
        loss = −p̄_c − λ·log σ(log odds(y_c) − log odds(y_r))

    with λ = `beta`. Reference-free. The NLL term is each pair's per-token
    mean, then averaged over pairs (the paper's formula); TRL's trainer
    averages over all chosen tokens of the batch, which weighs long
    responses more.

    Paper: J. Hong, N. Lee, J. Thorne, "ORPO: Monolithic Preference
    Optimization without Reference Model" (2024).

    Args:
      chosen_logps_B, rejected_logps_B: float32 `[B]` summed log-probs.
      ref_*: ignored.
      beta: static λ > 0 (paper: 0.1–1).
      chosen_lengths_B, rejected_lengths_B: `[B]` response token counts.

    Returns:
      (loss, metrics); implicit rewards β·p̄ (TRL's convention); extra
      metrics under TRL's names: ``nll``, ``log_odds_chosen`` (the log odds
      ratio log odds(p̄_c) − log odds(p̄_r)) and ``log_odds_ratio`` (log σ of
      it). Mean log-probs are capped at
      −1e-6 so log(1 − exp(p̄)) stays finite.
    """
    _check_beta(beta)
    c, r, _, _, mask = _pair_inputs(chosen_logps_B, rejected_logps_B, None, None, example_mask_B)
    # Masked pairs get p̄ = −1 (any value < 0 works) so the log-odds are finite.
    len_c = _per_pair("chosen_lengths_B", chosen_lengths_B, mask, chosen_logps_B)
    len_r = _per_pair("rejected_lengths_B", rejected_lengths_B, mask, chosen_logps_B)
    mean_c = select(safe_divide(c, len_c), mask, -1.0)
    mean_r = select(safe_divide(r, len_r), mask, -1.0)
    mean_c = jnp.minimum(mean_c, -1e-6)
    mean_r = jnp.minimum(mean_r, -1e-6)

    def log_odds(p):
        return p - jnp.log(-jnp.expm1(p))

    log_odds_ratio = log_odds(mean_c) - log_odds(mean_r)
    nll = -mean_c
    losses = nll - beta * log_sigmoid(log_odds_ratio)
    # TRL's ORPO metric names: log_odds_chosen is the log odds ratio itself,
    # log_odds_ratio the log σ of it (the term λ multiplies).
    return reduce_pair_loss(losses, beta * mean_c, beta * mean_r, mask, nll=nll,
                            log_odds_chosen=log_odds_ratio, log_odds_ratio=log_sigmoid(log_odds_ratio))


@registry.register("preference", "nca")
def nca_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    example_mask_B=None,
):
    """NCA (pairwise): absolute likelihood targets instead of only a margin.

        loss = −log σ(β ρ_c) − ½·log σ(−β ρ_c) − ½·log σ(−β ρ_r)

    Paper: H. Chen et al., "Noise Contrastive Alignment of Language Models
    with Explicit Rewards" (2024). TRL: ``nca_pair``.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    reward_c, reward_r = beta * rho_c, beta * rho_r
    losses = -log_sigmoid(reward_c) - 0.5 * log_sigmoid(-reward_c) - 0.5 * log_sigmoid(-reward_r)
    return reduce_pair_loss(losses, reward_c, reward_r, mask)


@registry.register("preference", "apo_zero")
def apo_zero_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    example_mask_B=None,
):
    """APO-zero: raise the chosen likelihood, lower the rejected one.

        loss = (1 − σ(β ρ_c)) + σ(β ρ_r)

    Use when the chosen outputs are better than the model's own.

    Paper: K. D'Oosterlinck et al., "Anchored Preference Optimization and
    Contrastive Revisions: Addressing Underspecification in Alignment"
    (2024), eq. 7.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    losses = (1.0 - jax.nn.sigmoid(beta * rho_c)) + jax.nn.sigmoid(beta * rho_r)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "apo_down")
def apo_down_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    example_mask_B=None,
):
    """APO-down: lower both likelihoods, the rejected one more.

        loss = σ(β ρ_c) + (1 − σ(β (ρ_c − ρ_r)))

    Use when the chosen outputs are worse than the model's own.

    Paper: K. D'Oosterlinck et al., "Anchored Preference Optimization and
    Contrastive Revisions: Addressing Underspecification in Alignment"
    (2024), eq. 8.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    losses = jax.nn.sigmoid(beta * rho_c) + (1.0 - jax.nn.sigmoid(beta * (rho_c - rho_r)))
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "bco_pair")
def bco_pair_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    reference_point=None,
    example_mask_B=None,
):
    """BCO (pairwise): chosen and rejected as separate binary classifications.

        δ = stop_grad(mean of {β ρ_c, β ρ_r} over the batch)   (or given)
        loss = −log σ(β ρ_c − δ) − log σ(−(β ρ_r − δ))

    Paper: S. Jung et al., "Binary Classifier Optimization for Large Language
    Model Alignment" (2024). The paper (and TRL) use a running mean of the
    rewards over training for δ; that is trainer state, so pass it as
    `reference_point` (a float32 scalar array) to reproduce it. Without it
    the current batch's mean is used, which makes the loss depend on how the
    batch is split into micro-batches.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0.
      reference_point: optional float32 scalar δ (reward units).

    Returns:
      (loss, metrics); extra metric ``reference_point``.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    reward_c, reward_r = beta * rho_c, beta * rho_r
    if reference_point is not None:
        check_ndim("reference_point", reference_point, 0, "a scalar")
        check_range("reference_point", reference_point, low=-_F32_MAX, high=_F32_MAX)  # finite in float32
    if reference_point is None:
        delta = sg(0.5 * (masked_mean(reward_c, mask) + masked_mean(reward_r, mask)))
    else:
        delta = sg(jnp.asarray(reference_point, jnp.float32))
    losses = -log_sigmoid(reward_c - delta) - log_sigmoid(-(reward_r - delta))
    return reduce_pair_loss(losses, reward_c, reward_r, mask, reference_point=delta)


@registry.register("preference", "exo")
def exo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    epsilon: float = 1e-3,
    example_mask_B=None,
):
    """EXO (pairwise): reverse KL from the model's pair preference to the label.

        p = σ(β h)
        loss = p·(log p − log(1 − ε)) + (1 − p)·(log(1 − p) − log ε)

    i.e. KL(Bernoulli(p) ‖ Bernoulli(1 − ε)): mode-seeking, unlike DPO's
    forward cross-entropy. ε smooths the label so the KL is finite.

    Paper: H. Ji et al., "Towards Efficient Exact Optimization of Language
    Model Alignment" (2024), eq. 16 with K = 2.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0.
      epsilon: static label smoothing ε in (0, 0.5) (TRL's default 1e-3).

    Raises:
      ValueError: if ε is outside (0, 0.5).
    """
    _check_beta(beta)
    check_range("epsilon", epsilon, low=0.0, high=0.5, low_open=True, high_open=True)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    z = beta * (rho_c - rho_r)
    p = jax.nn.sigmoid(z)
    losses = p * (log_sigmoid(z) - math.log(1.0 - epsilon)) + (1.0 - p) * (log_sigmoid(-z) - math.log(epsilon))
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask)


@registry.register("preference", "beta_dpo")
def beta_dpo_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    alpha: float,
    reward_margin_B=None,
    margin_reference=None,
    beta_min: float = 1e-3,
    example_mask_B=None,
):
    """DPO with a per-pair β set from the pair's reward margin.

        m_i  = reward margin of pair i (given, or stop_grad(β h_i))
        m_0  = reference margin (given, or the batch mean of m)
        β_i  = max(β·(1 + α (m_i − m_0)), β_min)
        loss = −log σ(β_i h_i)

    Pairs with a clear margin get a larger β (a tighter fit), ambiguous ones
    a smaller β (stay near the reference).

    Paper: J. Wu et al., "β-DPO: Direct Preference Optimization with Dynamic
    β" (2024). The paper's main variant uses one β per batch (the batch mean
    of m_i) and a moving-average m_0; this is its instance-level form. Pass
    `margin_reference` (the moving average) to reproduce the paper's m_0;
    the batch mean depends on how the batch is split.
    The default margin is the implicit reward margin β·h, in the paper's
    words; the authors' code takes the raw log-ratio gap h, so an α tuned
    there corresponds to α/β here.

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static base β_0 > 0.
      alpha: static α ≥ 0; α = 0 is DPO.
      reward_margin_B: optional float32 `[B]` margins (e.g. from a reward
        model, r_c − r_r); treated as constants.
      margin_reference: optional float32 scalar m_0.
      beta_min: static floor for β_i.

    Returns:
      (loss, metrics); implicit rewards use the base β; extra ``beta_mean``.
    """
    _check_beta(beta)
    check_range("alpha", alpha, low=0.0)
    check_range("beta_min", beta_min, low=0.0)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    if margin_reference is not None:
        check_ndim("margin_reference", margin_reference, 0, "a scalar")
        check_range("margin_reference", margin_reference, low=-_F32_MAX, high=_F32_MAX)  # finite in float32
    h = rho_c - rho_r
    if reward_margin_B is None:
        margin = sg(beta * h)
    else:
        margin = sg(_per_pair("reward_margin_B", reward_margin_B, mask, chosen_logps_B))
    m0 = masked_mean(margin, mask) if margin_reference is None else jnp.asarray(margin_reference, jnp.float32)
    beta_i = jnp.maximum(beta * (1.0 + alpha * (margin - sg(m0))), beta_min)
    losses = -log_sigmoid(beta_i * h)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask, beta_mean=beta_i)


@registry.register("preference", "cream")
def cream_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B,
    ref_rejected_logps_B,
    *,
    beta: float,
    consistency,
    example_mask_B=None,
):
    """CREAM: DPO whose labels are softened by a self-consistency rate C.

        loss = −C·log σ(β h) − (1 − C)·log σ(−β h)

    C in [0, 1] measures how consistently the current and previous-iteration
    models rank the responses (see `cream_consistency`); C = 1 is DPO, and
    low consistency pulls the pair towards indifference. Same form as cDPO
    with ε = 1 − C, but C is data (an array), not a hyper-parameter.

    Paper: Z. Wang et al., "CREAM: Consistency Regularized Self-Rewarding
    Language Models" (2024).

    Args:
      first four: float32 `[B]` summed log-probs.
      beta: static β > 0.
      consistency: float32 scalar or `[B]` C in [0, 1] (treated as constant).

    Raises:
      ValueError: a concrete consistency outside [0, 1] (NaN included) in a
        valid pair.

    Returns:
      (loss, metrics); extra ``consistency``.
    """
    _check_beta(beta)
    rho_c, rho_r, mask = log_ratios(
        chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B, example_mask_B
    )
    check_shape("consistency", consistency, jnp.shape(chosen_logps_B), "chosen_logps_B", allow_scalar=True)
    # Outside [0, 1] the loss is no cross-entropy and is unbounded below in h.
    check_values_in_range("consistency", consistency, low=0.0, high=1.0, where=example_mask_B)
    h = rho_c - rho_r
    cons = sg(jnp.broadcast_to(jnp.asarray(consistency, jnp.float32), h.shape))
    losses = -cons * log_sigmoid(beta * h) - (1.0 - cons) * log_sigmoid(-beta * h)
    return reduce_pair_loss(losses, beta * rho_c, beta * rho_r, mask, consistency=cons)


def cream_consistency(scores_now_NM, scores_prev_NM, mask_NM=None) -> jnp.ndarray:
    """CREAM consistency rate: mean over prompts of (Kendall τ + 1) / 2.

    For each of N prompts, M sampled responses are scored by the current
    model and by the previous-iteration model (e.g. implicit DPO rewards);
    τ is Kendall's tau-a between the two rankings (pairs tied in either
    ranking count 0). C = 1 for identical rankings, 0 for reversed ones.

    Paper: Z. Wang et al., "CREAM: Consistency Regularized Self-Rewarding
    Language Models" (2024).

    Args:
      scores_now_NM: float32 `[N, M]`.
      scores_prev_NM: float32 `[N, M]`.
      mask_NM: optional bool `[N, M]` of valid responses.

    Returns:
      float32 scalar in [0, 1] (0.5 if no prompt has two valid responses).
    """
    a = jnp.asarray(scores_now_NM, jnp.float32)
    b = jnp.asarray(scores_prev_NM, jnp.float32)
    mask = jnp.ones(a.shape, bool) if mask_NM is None else as_bool(mask_NM)
    a, b = select(a, mask), select(b, mask)
    m = a.shape[1]
    upper = jnp.triu(jnp.ones((m, m), bool), k=1)
    pair_mask = mask[:, :, None] & mask[:, None, :] & upper
    concordance = jnp.sign(a[:, :, None] - a[:, None, :]) * jnp.sign(b[:, :, None] - b[:, None, :])
    tau_N = masked_mean(concordance, pair_mask, axis=(1, 2))
    has_pairs = jnp.any(pair_mask, axis=(1, 2))
    consistency_N = (tau_N + 1.0) / 2.0
    return jnp.where(jnp.any(has_pairs), masked_mean(consistency_N, has_pairs), 0.5)


@registry.register("token_preference", "tgdpo")
def tgdpo_loss(
    chosen_logps_BT,
    rejected_logps_BT,
    ref_chosen_logps_BT,
    ref_rejected_logps_BT,
    chosen_mask_BT,
    rejected_mask_BT,
    *,
    beta: float,
    alpha: float,
    chosen_token_rewards_BT,
    rejected_token_rewards_BT,
    example_mask_B=None,
):
    """TGDPO: DPO with a per-token β guided by token-level rewards.

        u_c = Σ_t β (1 + α r̂_c,t) · (log π − log π_ref)(y_c,t)
        u_r = Σ_t β (1 − α r̂_r,t) · (log π − log π_ref)(y_r,t)
        loss = −log σ(u_c − u_r)

    Tokens of the chosen response with high guidance reward r̂ may move
    further from the reference, and tokens of the rejected response with low
    r̂ likewise. α = 0 is exactly DPO on summed log-probs. The paper's
    practical guidance is r̂_t = β'·(log π_dpo − log π_ref) of a previously
    DPO-trained model, computed outside and passed in.

    Unlike the losses of kind ``preference`` this one takes **per-token**
    arrays, `logps[b, t]` = log p(token t+1 | tokens ≤ t), and the response
    masks (kind ``token_preference``); chosen and rejected may have
    different lengths T_c, T_r.

    Paper: M. Zhu et al., "TGDPO: Harnessing Token-Level Reward Guidance for
    Enhancing Direct Preference Optimization" (2025).

    Args:
      chosen_logps_BT, ref_chosen_logps_BT: float32 `[B, T_c]`.
      rejected_logps_BT, ref_rejected_logps_BT: float32 `[B, T_r]`.
      chosen_mask_BT, rejected_mask_BT: bool response masks, shaped like
        the log-probs of their side.
      beta: static β > 0.
      alpha: static guidance strength α ≥ 0.
      chosen_token_rewards_BT, rejected_token_rewards_BT: float32 guidance
        rewards r̂ (treated as constants).

    Returns:
      (loss, metrics); implicit rewards u_c, u_r above.
    """
    _check_beta(beta)
    check_range("alpha", alpha, low=0.0)
    c_shape = check_ndim("chosen_logps_BT", chosen_logps_BT, 2, "[B, T_c] (per-token log-probs)")
    r_shape = check_ndim("rejected_logps_BT", rejected_logps_BT, 2, "[B, T_r] (per-token log-probs)")
    if r_shape[0] != c_shape[0]:
        raise ValueError(f"rejected_logps_BT has shape {r_shape} but chosen_logps_BT has shape "
                         f"{c_shape}; the batch sizes B must match")
    check_same_shape("chosen_logps_BT", chosen_logps_BT, ref_chosen_logps_BT=ref_chosen_logps_BT,
                     chosen_mask_BT=chosen_mask_BT, chosen_token_rewards_BT=chosen_token_rewards_BT)
    check_same_shape("rejected_logps_BT", rejected_logps_BT, ref_rejected_logps_BT=ref_rejected_logps_BT,
                     rejected_mask_BT=rejected_mask_BT, rejected_token_rewards_BT=rejected_token_rewards_BT)
    check_shape("example_mask_B", example_mask_B, c_shape[:1], "chosen_logps_BT's batch axis")
    f32 = jnp.float32
    chosen_logps_BT = jnp.asarray(chosen_logps_BT, f32)
    mask_B = _mask(example_mask_B, chosen_logps_BT[:, 0])
    cmask = as_bool(chosen_mask_BT) & mask_B[:, None]
    rmask = as_bool(rejected_mask_BT) & mask_B[:, None]
    rho_c = select(chosen_logps_BT, cmask) - select(jnp.asarray(ref_chosen_logps_BT, f32), cmask)
    rho_r = select(jnp.asarray(rejected_logps_BT, f32), rmask) - select(jnp.asarray(ref_rejected_logps_BT, f32), rmask)
    guide_c = sg(select(jnp.asarray(chosen_token_rewards_BT, f32), cmask))
    guide_r = sg(select(jnp.asarray(rejected_token_rewards_BT, f32), rmask))
    u_c = jnp.sum(beta * (1.0 + alpha * guide_c) * rho_c, axis=-1)
    u_r = jnp.sum(beta * (1.0 - alpha * guide_r) * rho_r, axis=-1)
    losses = -log_sigmoid(u_c - u_r)
    return reduce_pair_loss(losses, u_c, u_r, mask_B)


Component = Union[tuple[str, float], tuple[str, float, Union[Mapping[str, Any], tuple[tuple[str, Any], ...]]]]


def _mixture_components(components) -> list[tuple[str, float, dict]]:
    """`(name, weight, overrides)` of each component, checked."""
    if isinstance(components, (str, bytes, Mapping)) or not isinstance(components, Sequence):
        raise ValueError("components must be a tuple (or list) of (name, weight) or "
                         f"(name, weight, overrides) tuples, got {components!r}")
    if not components:
        raise ValueError("mixture_loss needs at least one component")
    out = []
    for i, comp in enumerate(components):
        if isinstance(comp, (str, bytes)) or not isinstance(comp, Sequence) or len(comp) not in (2, 3):
            raise ValueError(f"mixture component {i} must be (name, weight) or (name, weight, overrides), "
                             f"got {comp!r}")
        name, weight = comp[0], comp[1]
        if not isinstance(name, str):
            raise ValueError(f"mixture component {i}: name must be a str, got {name!r}")
        if name == "mixture":
            raise ValueError(f"mixture component {i} is itself a mixture; list its components in this one")
        # A negative weight would maximize that loss: the mixture is then unbounded below.
        check_range(f"weight of mixture component {i} ({name!r})", weight, low=0.0)
        try:
            overrides = dict(comp[2]) if len(comp) == 3 else {}
        except (TypeError, ValueError) as e:
            raise ValueError(f"mixture component {i} ({name!r}): overrides must be a dict or a tuple of "
                             f"(key, value) pairs, got {comp[2]!r}") from e
        out.append((name, float(weight), overrides))
    return out


@registry.register("preference", "mixture")
def mixture_loss(
    chosen_logps_B,
    rejected_logps_B,
    ref_chosen_logps_B=None,
    ref_rejected_logps_B=None,
    *,
    components: Sequence[Component],
    example_mask_B=None,
    **shared_kwargs,
):
    """Weighted sum of registered pairwise losses: Σ_i w_i · loss_i.

    Each component is `(name, weight)` or `(name, weight, overrides)`, where
    `overrides` (a dict, or a tuple of `(key, value)` pairs) replaces shared
    keyword arguments for that component only, e.g. `{"beta": 0.05}`. Every
    override key must be a keyword argument of that component's loss (a typo
    raises). The shared keyword arguments (`beta`, lengths, ...) are filtered
    per component: each loss receives only those its signature accepts.

    `components` is a hyper-parameter, fixed at trace time. To pass it to a
    jitted function as a static argument it must be hashable: use a tuple of
    tuples, with overrides as a tuple of pairs, e.g.
    `(("dpo", 1.0), ("ipo", 0.5, (("beta", 0.1),)))` and
    `jax.jit(fn, static_argnames="components")`. (Closing over a list of
    dicts, as with any other hyper-parameter, works too.)

    Paper: W. Wang et al., "Enhancing the Reasoning Ability of Multimodal
    Large Language Models via Mixed Preference Optimization" (2024) (MPO:
    DPO + BCO + SFT); TRL accepts a list of `loss_type` with `loss_weights`.

    Args:
      first four: float32 `[B]` summed log-probs.
      components: static tuple (or list) as above; names from kind ``preference``.
      example_mask_B: optional bool `[B]`.
      **shared_kwargs: keyword arguments offered to every component.

    Returns:
      (loss, metrics): the reward/accuracy metrics of the first component,
      plus ``{name}/loss`` for every component (``{name}_{i}/loss`` if a name
      repeats).

    Raises:
      ValueError: for an empty or malformed `components`, a weight that is
        not a number >= 0, a component that is itself a mixture, or an override key the component's loss does not accept; KeyError
        for an unknown name.
    """
    parsed = _mixture_components(components)   # each component checks the array shapes itself
    fns = []
    for i, (name, _, overrides) in enumerate(parsed):
        fn = registry.get("preference", name)
        registry.check_accepted(fn, overrides, f"mixture component {i} ({name!r}) overrides")
        fns.append(fn)
    total = 0.0
    metrics: dict = {}
    seen: dict[str, int] = {}
    for i, ((name, weight, overrides), fn) in enumerate(zip(parsed, fns)):
        available = {**shared_kwargs, **overrides, "example_mask_B": example_mask_B}
        loss_i, metrics_i = fn(
            chosen_logps_B, rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B,
            **registry.accepted_kwargs(fn, available),
        )
        total = total + weight * loss_i
        if i == 0:
            metrics.update({k: v for k, v in metrics_i.items() if k != "loss"})
        key = name if name not in seen else f"{name}_{i}"
        seen[name] = i
        metrics[f"{key}/loss"] = loss_i
    metrics["loss"] = total
    return total, metrics


# ----------------------------------------------------------------------------
# Unpaired
# ----------------------------------------------------------------------------


@registry.register("unpaired_preference", "kto")
def kto_loss(
    logps_B,
    ref_logps_B,
    desirable_B,
    kl_logps_B=None,
    ref_kl_logps_B=None,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_point=None,
    example_mask_B=None,
):
    """KTO: prospect-theoretic loss on unpaired desirable/undesirable examples.

        ρ   = log π(y|x) − log π_ref(y|x)
        z_0 = max(0, stop_grad(mean_b [log π(y'_b|x_b) − log π_ref(y'_b|x_b)]))
        loss_b = λ_D·(1 − σ(β (ρ_b − z_0)))   if y_b is desirable
               = λ_U·(1 − σ(β (z_0 − ρ_b)))   otherwise
        loss = mean_b loss_b

    z_0 is the batch reference point: a KL estimate from mismatched pairs
    (x_b, y'_b), y' being another example's completion (e.g. the batch
    rolled by one). If `kl_logps_B` is None, z_0 = 0. A given
    `reference_point` is z_0 itself (a fixed value, or one estimated over a
    whole batch before it was split into micro-batches), and the mismatched
    log-probs are then not read.

    Paper: K. Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
    Optimization" (2024).

    Args:
      logps_B, ref_logps_B: float32 `[B]` summed log-probs of each completion.
      desirable_B: bool `[B]`, true for desirable ("chosen") completions.
      kl_logps_B, ref_kl_logps_B: optional float32 `[B]` summed log-probs of
        the mismatched completions.
      beta: static β > 0.
      desirable_weight, undesirable_weight: static λ_D, λ_U > 0 (the paper
        balances them so λ_D·n_D / (λ_U·n_U) is in [1, 4/3]).
      reference_point: optional z_0 (float32 scalar, log-ratio units: nats),
        used as given (no clamp, no gradient).
      example_mask_B: optional bool `[B]`; masked rows also leave z_0 alone.

    Returns:
      (loss, metrics): ``chosen_reward_*`` / ``rejected_reward_*`` are β·ρ
      over desirable / undesirable rows, ``margin_mean`` is their difference
      of means, ``accuracy`` the fraction of rows strictly on the right side
      of z_0 (a row at z_0 counts 0, as a tie in the pairwise accuracy), and
      ``kl`` is z_0. A side with no (unmasked) row reads 0, finite, as
      every masked mean of this library; the DPO driver's metrics
      (`train.preference.loss_metrics`) report it as NaN instead.
    """
    _check_beta(beta)
    check_range("desirable_weight", desirable_weight, low=0.0, low_open=True)
    check_range("undesirable_weight", undesirable_weight, low=0.0, low_open=True)
    check_ndim("logps_B", logps_B, 1, "[B] (one summed log-prob per completion)", _SUMMED_HINT)
    check_same_shape("logps_B", logps_B, ref_logps_B=ref_logps_B, desirable_B=desirable_B,
                     kl_logps_B=kl_logps_B, ref_kl_logps_B=ref_kl_logps_B, example_mask_B=example_mask_B)
    if (kl_logps_B is None) != (ref_kl_logps_B is None):
        raise ValueError("kl_logps_B and ref_kl_logps_B must be given together (or neither)")
    f32 = jnp.float32
    logps_B = jnp.asarray(logps_B, f32)
    mask = _mask(example_mask_B, logps_B)
    desirable = as_bool(desirable_B)
    rho = select(logps_B, mask) - select(jnp.asarray(ref_logps_B, f32), mask)
    if reference_point is not None:
        check_ndim("reference_point", reference_point, 0, "a scalar z_0")
        check_range("reference_point", reference_point, low=-_F32_MAX, high=_F32_MAX)  # finite in float32
        z0 = sg(jnp.asarray(reference_point, f32))
    elif kl_logps_B is None:
        z0 = jnp.zeros((), f32)
    else:
        kl_rho = select(jnp.asarray(kl_logps_B, f32), mask) - select(jnp.asarray(ref_kl_logps_B, f32), mask)
        z0 = jnp.maximum(sg(masked_mean(kl_rho, mask)), 0.0)
    z = beta * (rho - z0)
    losses = jnp.where(
        desirable,
        desirable_weight * (1.0 - jax.nn.sigmoid(z)),
        undesirable_weight * (1.0 - jax.nn.sigmoid(-z)),
    )
    loss = masked_mean(losses, mask)

    rewards = sg(beta * rho)
    zs = sg(z)
    correct = jnp.where(desirable, zs > 0, zs < 0).astype(f32)  # strict: z = z_0 is wrong
    dmask, umask = mask & desirable, mask & ~desirable
    chosen_mean = masked_mean(rewards, dmask)
    rejected_mean = masked_mean(rewards, umask)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean(correct, mask),
        "margin_mean": chosen_mean - rejected_mean,
        "chosen_reward_mean": chosen_mean,
        "chosen_reward_std": masked_std(rewards, dmask),
        "rejected_reward_mean": rejected_mean,
        "rejected_reward_std": masked_std(rewards, umask),
        "kl": z0,
    }
    return loss, metrics


__all__ = [
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "beta_dpo_loss",
    "cdpo_loss",
    "check_pair_shapes",
    "cream_consistency",
    "cream_loss",
    "dpo_loss",
    "exo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "mixture_loss",
    "nca_loss",
    "orpo_loss",
    "robust_dpo_loss",
    "sequence_logps",
    "simpo_loss",
    "tgdpo_loss",
]
