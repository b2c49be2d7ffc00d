"""Reward models on preference pairs: one forward for both sides, the
configured pairwise loss, and held-out metrics over all pairs.

Pair batches hold `chosen_*` and `rejected_*` arrays (`tokens`,
`attention_mask`, `positions`: `[B, T]`) and optionally `margin` `[B]`.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxreward.objectives import registry
from jaxreward.train import evaluate
from jaxreward.train import metrics as metrics_lib

SIDES = ("chosen", "rejected")
LOSS_KIND = "pairwise_reward_loss"  # registry kind of the losses a pair trainer takes


def pair_rewards(model: nn.Module, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards `float32[B, K]` of chosen and rejected, in ONE forward of `[2B, T]`.

    With `chosen_features`/`rejected_features` `[B, E]` in the batch (pooled
    features cached from a frozen backbone, see `cache_features`), only the
    head runs.
    """
    B = batch["chosen_tokens"].shape[0]
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    if "chosen_features" in batch:
        rewards = model.apply({"params": params}, cat("features"), cat("attention_mask"),
                              method=model.score_features)
    else:
        pool = cat("loss_mask") if "chosen_loss_mask" in batch else None
        rewards = model.apply({"params": params}, cat("tokens"), cat("attention_mask"),
                              cat("positions"), pool)
    return rewards[:B], rewards[B:]


def cache_features(model: nn.Module, params, arrays: dict[str, np.ndarray], batch_size: int,
                   mesh) -> dict[str, np.ndarray]:
    """`arrays` plus `chosen_features` / `rejected_features` float32 `[n, E]`:
    the pooled hidden states of a frozen backbone, computed once.

    Training a head on a frozen backbone then runs the head alone each step
    (`pair_rewards` reads the features), and the backbone forward is paid
    once per pair instead of once per epoch. Rows are scored longest first
    in batches trimmed to their longest row (right padding), so short pairs
    cost short forwards; every row is scored exactly once.
    """
    def feats(p, b):
        return model.apply({"params": p}, b["tokens"], b["attention_mask"], b["positions"],
                           b.get("loss_mask"), method=model.features)
    feats = jax.jit(feats)
    out = dict(arrays)
    for side in SIDES:
        mask = arrays[f"{side}_attention_mask"]
        if mask[:, 0].size and not mask[:, 0].all():
            raise ValueError("cache_features needs right-padded rows (attention_mask[:, 0] all True)")
        lengths = mask.sum(axis=1)
        order = np.argsort(-lengths, kind="stable")
        result = np.zeros((len(lengths), model.config.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = int(min(mask.shape[1], -(-max(int(lengths[rows].max()), 1) // 16) * 16))
            b = {k: arrays[f"{side}_{k}"][rows, :width]
                 for k in ("tokens", "attention_mask", "positions", "loss_mask")
                 if f"{side}_{k}" in arrays}
            padded = evaluate.score_all_rows(feats, params, b, batch_size, mesh)
            result[rows] = padded
        out[f"{side}_features"] = result
    return out


def pair_loss(name: str) -> Callable:
    """The registered pairwise reward loss `name` (kind `pairwise_reward_loss`).

    Raises:
      ValueError: an unknown name; the message lists the registered ones.
    """
    if name not in registry.names(LOSS_KIND):
        raise ValueError(f"loss.name={name!r} is not a {LOSS_KIND}; registered: "
                         f"{', '.join(registry.names(LOSS_KIND))}")
    return registry.get(LOSS_KIND, name)


def make_loss_fns(model: nn.Module, loss_name: str):
    """`(loss_fn, metrics_fn)` for `step.make_train_step` with the named loss."""
    loss = pair_loss(loss_name)

    def loss_fn(params, batch, rng):
        del rng  # deterministic forward: no dropout
        rc, rr = pair_rewards(model, params, batch)
        value, _ = loss(rc, rr, batch.get("margin"))
        return value, {"chosen_rewards": rc, "rejected_rewards": rr}

    def metrics_fn(outputs, batch):
        _, metrics = loss(outputs["chosen_rewards"], outputs["rejected_rewards"], batch.get("margin"))
        metrics.pop("loss")
        return metrics

    return loss_fn, metrics_fn


def evaluate_pairs(model: nn.Module, params, arrays: dict[str, np.ndarray], batch_size: int,
                   mesh, loss_name: str, score_fn: Callable | None = None) -> dict[str, float]:
    """Held-out metrics of the configured loss over ALL pairs of `arrays`.

    Args:
      score_fn: optional jitted `(params, batch) -> (chosen, rejected)`, to
        reuse one compiled function across calls; built from `model` if None.

    Returns: the loss's metrics (accuracy: chosen > rejected strictly, a
    tie counts 0, as TRL and RewardBench), `loss`, `num_pairs`, and the 95%
    Wilson interval of the accuracy as `accuracy_ci_low` / `accuracy_ci_high`
    (successes = the integer count of correct pairs).
    """
    score_fn = score_fn or jax.jit(lambda p, b: pair_rewards(model, p, b))
    pairs = {k: v for k, v in arrays.items() if k.startswith(SIDES) or k == "margin"}
    rc, rr = evaluate.score_all_rows(score_fn, params, pairs, batch_size, mesh)
    margin = jnp.asarray(arrays["margin"]) if "margin" in arrays else None
    _, metrics = pair_loss(loss_name)(jnp.asarray(rc), jnp.asarray(rr), margin)
    out = metrics_lib.to_floats(metrics)
    out["num_pairs"] = float(len(rc))
    # Strict accuracy: an integer count; round off the float32 mean's error.
    out["accuracy_ci_low"], out["accuracy_ci_high"] = evaluate.wilson_interval(
        round(out["accuracy"] * len(rc)), len(rc))
    return out


def describe_accuracy(metrics: dict[str, float]) -> str:
    """"0.6133 [0.5523, 0.6710] on 256 pairs" from `evaluate_pairs`' output."""
    return (f"{metrics['accuracy']:.4f} [{metrics['accuracy_ci_low']:.4f}, "
            f"{metrics['accuracy_ci_high']:.4f}] on {int(metrics['num_pairs'])} pairs")
