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
    """Rewards `float32[B, K]` of chosen and rejected, in ONE forward of `[2B, T]`."""
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    rewards = model.apply({"params": params}, cat("tokens"), cat("attention_mask"), cat("positions"))
    B = batch["chosen_tokens"].shape[0]
    return rewards[:B], rewards[B:]


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

    Returns: the loss's metrics (accuracy counts ties as 0.5 for
    Bradley–Terry), `loss`, `num_pairs`, and the 95% Wilson interval of the
    accuracy as `accuracy_ci_low` / `accuracy_ci_high`.
    """
    score_fn = score_fn or jax.jit(lambda p, b: pair_rewards(model, p, b))
    pairs = {k: v for k, v in arrays.items() if k.startswith(SIDES) or k == "margin"}
    rc, rr = evaluate.score_all_rows(score_fn, params, pairs, batch_size, mesh)
    margin = jnp.asarray(arrays["margin"]) if "margin" in arrays else None
    _, metrics = pair_loss(loss_name)(jnp.asarray(rc), jnp.asarray(rr), margin)
    out = metrics_lib.to_floats(metrics)
    out["num_pairs"] = float(len(rc))
    out["accuracy_ci_low"], out["accuracy_ci_high"] = evaluate.wilson_interval(
        out["accuracy"] * len(rc), len(rc))
    return out


def describe_accuracy(metrics: dict[str, float]) -> str:
    """"0.6133 [0.5523, 0.6710] on 256 pairs" from `evaluate_pairs`' output."""
    return (f"{metrics['accuracy']:.4f} [{metrics['accuracy_ci_low']:.4f}, "
            f"{metrics['accuracy_ci_high']:.4f}] on {int(metrics['num_pairs'])} pairs")
