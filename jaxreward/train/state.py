"""Train state and optimizer: AdamW with warmup + cosine decay, clipping, freezing."""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a step changes; saved whole in each checkpoint.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: parameter pytree.
      opt_state: optax state.
      rng: uint32 `[2]` PRNG key, split once per step.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def learning_rate_schedule(cfg: ml_collections.ConfigDict, num_steps: int,
                           name: str = "optimizer") -> optax.Schedule:
    """Linear warmup from 0 to `cfg.learning_rate` over `cfg.warmup_steps`, then
    cosine decay to `cfg.learning_rate * cfg.final_lr_ratio` at `num_steps`.

    A warmup of `num_steps` or more is shortened to `num_steps − 1` (the peak
    is reached at the last step), with one warning line naming
    `<name>.warmup_steps` and `train.num_steps`: a short smoke run of a
    variant still runs, but not silently. The shortened schedule is the one
    the checkpoints record: a run extended later (larger `train.num_steps`)
    keeps its schedule length (`train.schedule_steps`, see
    `main.check_resume_config`), so its warmup does not change either.
    """
    warmup = min(int(cfg.warmup_steps), max(num_steps - 1, 0))
    if warmup < int(cfg.warmup_steps):
        print(f"warning: {name}.warmup_steps={int(cfg.warmup_steps)} is not below the schedule's {num_steps} "
              f"optimizer steps (train.num_steps); warming up over {warmup} steps instead, so the learning "
              f"rate peaks at the last step (set {name}.warmup_steps < {num_steps} to silence this)")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.final_lr_ratio)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int,
                   trainable: Callable[[tuple[str, ...]], bool] | None = None,
                   name: str = "optimizer") -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW ("Decoupled Weight Decay Regularization", 2019) with global-norm
    clipping; parameters for which `trainable(path)` is False get zero updates
    and no weight decay. Weight decay applies to matrices only (ndim >= 2).

    Args:
      cfg: `learning_rate`, `warmup_steps`, `final_lr_ratio`, `b1`, `b2`,
        `eps`, `weight_decay`, `max_grad_norm` (0 disables clipping), and
        optionally `head_lr_multiplier`: params under a top-level "head" key
        (a reward or value head) train at that multiple of the schedule.
        Clipping is by the global norm over all params together.
      num_steps: total optimizer steps (length of the schedule).
      trainable: predicate on a param's key path (tuple of names).
      name: the config section of `cfg`, for the warmup warning
        (`learning_rate_schedule`).

    Returns:
      `(tx, schedule)`; `schedule` is the base (non-head) learning rate.
    """
    schedule = learning_rate_schedule(cfg, num_steps, name)
    head_mult = float(cfg.get("head_lr_multiplier", 1.0))
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    adamw = lambda sched: optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                      weight_decay=cfg.weight_decay, mask=decay_mask)
    if head_mult == 1.0 and trainable is None:
        inner = adamw(schedule)
    else:
        is_train = trainable or (lambda names: True)

        def labels(params):
            def label(path, _):
                names = path_names(path)
                if not is_train(names):
                    return "freeze"
                return "head" if names[0] == "head" and head_mult != 1.0 else "train"
            return jax.tree_util.tree_map_with_path(label, params)
        inner = optax.multi_transform(
            {"train": adamw(schedule), "head": adamw(lambda step: head_mult * schedule(step)),
             "freeze": optax.set_to_zero()}, labels)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    return optax.chain(*parts, inner), schedule


def path_names(path) -> tuple[str, ...]:
    """('backbone', 'layers_3', 'mlp', ...) from a jax key path."""
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def block_trainable(num_layers: int, trainable_blocks: int):
    """Predicate: head, final norm and the top `trainable_blocks` blocks train.

    `trainable_blocks < 0` (or >= num_layers) trains everything.
    """
    if trainable_blocks < 0 or trainable_blocks >= num_layers:
        return None
    first = num_layers - trainable_blocks

    def trainable(names: tuple[str, ...]) -> bool:
        if names[0] != "backbone":
            return True  # heads
        if names[1] == "norm":
            return True
        if names[1].startswith("layers_"):
            return int(names[1].split("_")[1]) >= first
        return False  # embeddings (and a tied lm_head) stay frozen
    return trainable


def frozen_blocks(num_layers: int, trainable_blocks: int) -> int:
    """Bottom blocks frozen when the top `trainable_blocks` train (-1: none)."""
    if trainable_blocks < 0 or trainable_blocks >= num_layers:
        return 0
    return num_layers - trainable_blocks


def init_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Step 0: `params`, `tx`'s fresh optimizer state, and the PRNG key of `seed`."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(seed))
