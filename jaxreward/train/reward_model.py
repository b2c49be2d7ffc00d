"""Reward-model training: Bradley–Terry on preference pairs, sharded, resumable.

`fit_reward_model` is the loop every reward-model experiment uses; the
experiment (jaxreward/tasks/) prepares the model, initial params and
tokenized pair arrays, this module trains and evaluates.

Pair batches hold `chosen_*` and `rejected_*` arrays (`tokens`,
`attention_mask`, `positions`: `[B, T]`) and optionally `margin` `[B]`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import parallel
from jaxreward.data.batching import PairBatcher
from jaxreward.objectives import registry
from jaxreward.objectives import reward as reward_objectives
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib

SIDES = ("chosen", "rejected")


def pair_rewards(model: nn.Module, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Rewards `[B, K]` of chosen and rejected, in ONE forward pass of `[2B, T]`."""
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    rewards = model.apply({"params": params}, cat("tokens"), cat("attention_mask"), cat("positions"))
    B = batch["chosen_tokens"].shape[0]
    return rewards[:B], rewards[B:]


def make_loss_fns(model: nn.Module, loss_name: str = "bradley_terry"):
    """`(loss_fn, metrics_fn)` for `step.make_train_step` (see there)."""
    loss = reward_objectives_loss(loss_name)

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


# Reward losses the pair trainer can drive: f(chosen [B, K], rejected [B, K], margin).
PAIR_LOSSES = ("bradley_terry",)


def reward_objectives_loss(name: str) -> Callable:
    """The registered pairwise reward loss `name`.

    Raises:
      ValueError: `name` is not a pairwise reward loss this trainer can feed
        (e.g. `regression` needs rated data, not pairs).
    """
    if name not in PAIR_LOSSES:
        raise ValueError(f"loss.name={name!r} is not a pairwise reward loss; choose one of "
                         f"{PAIR_LOSSES} (registered reward losses: "
                         f"{registry.names('reward_loss')})")
    return registry.get("reward_loss", name)


def evaluate_pairs(reward_fn: Callable, params, arrays: dict[str, np.ndarray], batch_size: int,
                   mesh) -> dict[str, float]:
    """Held-out metrics over ALL pairs (the last batch is padded and masked).

    Args:
      reward_fn: `(params, batch) -> (chosen [B, K], rejected [B, K])`.

    Returns: pairwise accuracy (ties 0.5), loss, margin and reward stats, and
    `num_pairs`.
    """
    n = len(arrays["chosen_tokens"])
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // n_shards) * n_shards
    chosen, rejected = [], []
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(rows)
        rows = np.concatenate([rows, np.zeros(pad, rows.dtype)])
        batch = {k: v[rows] for k, v in arrays.items() if k.startswith(SIDES)}
        rc, rr = reward_fn(params, parallel.shard_batch(batch, mesh))
        keep = batch_size - pad
        chosen.append(np.asarray(rc)[:keep])
        rejected.append(np.asarray(rr)[:keep])
    rc, rr = np.concatenate(chosen), np.concatenate(rejected)
    _, metrics = reward_objectives.bradley_terry_loss(jnp.asarray(rc), jnp.asarray(rr))
    out = metrics_lib.to_floats(metrics)
    out["num_pairs"] = float(n)
    return out


def fit_reward_model(config: ml_collections.ConfigDict, workdir: str, model: nn.Module,
                     params: Any, train_arrays: dict[str, np.ndarray],
                     eval_arrays: dict[str, np.ndarray] | None = None,
                     trainable: Callable | None = None) -> dict[str, Any]:
    """Trains `model` (a `RewardModel`) with the config's loss; resumes from
    `<workdir>/checkpoints` when a checkpoint exists.

    Args:
      config: the experiment config (uses `seed`, `mesh`, `optimizer`,
        `train`, `data.batch_size`, `data.eval_batch_size`, `loss`).
      workdir: output folder: checkpoints, metrics.jsonl, tensorboard/.
      model: a Flax module; `model.apply({"params": p}, tokens, mask, positions)`
        returns rewards `[B, K]`.
      params: initial params (unboxed arrays), e.g. a pretrained backbone +
        a fresh head.
      train_arrays, eval_arrays: tokenized pairs (see `data.batching.tokenize_pairs`).
      trainable: param-path predicate (see `state.block_trainable`); None trains all.

    Returns:
      dict with `state` (final TrainState), `history` (list of logged train
      metrics), `eval` (final held-out metrics, or None without eval data or
      when `train.stop_after_steps` stopped the run early), `stopped_early`.
    """
    cfg_t = config.train
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tx, schedule = state_lib.make_optimizer(config.optimizer, cfg_t.num_steps, trainable)
    sample = {k: v[:1] for k, v in train_arrays.items()}
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), sample["chosen_tokens"],
                           sample["chosen_attention_mask"], sample["chosen_positions"]))["params"]
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    loss_fn, metrics_fn = make_loss_fns(model, config.loss.name)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                          micro_batches=cfg_t.micro_batches)
    batcher = PairBatcher(train_arrays, config.data.batch_size, seed=config.seed)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))

    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    if checkpointer.latest_step() is not None:
        abstract = jax.eval_shape(make_state, params)
        abstract = ckpt_lib.abstract_like(abstract, shardings)
        state, data_state = checkpointer.restore(abstract)
        batcher.restore(data_state)
        logging.info("resumed from step %d in %s", int(state.step), checkpointer.directory)
        print(f"Resuming from checkpoint at step {int(state.step)} ({checkpointer.directory})")
    else:
        state = make_state(params)

    reward_fn = jax.jit(lambda p, b: pair_rewards(model, p, b))
    writer = metrics_lib.MetricWriter(workdir)
    history: list[dict[str, float]] = []
    start = int(state.step)
    stop = cfg_t.num_steps if not cfg_t.stop_after_steps else min(cfg_t.stop_after_steps, cfg_t.num_steps)
    eval_metrics = None
    bar = tqdm.trange(start, stop, desc="train reward model", initial=start, total=stop,
                      disable=not cfg_t.progress_bar, dynamic_ncols=True)
    for step in bar:
        batch = parallel.shard_batch(next(batcher), mesh)
        state, metrics = train_step(state, batch)
        done = step + 1
        if done % cfg_t.log_every == 0 or done == stop:
            m = metrics_lib.to_floats(metrics)
            if not np.isfinite(m["loss"]):
                raise FloatingPointError(f"non-finite loss {m['loss']} at step {done}")
            writer.write(done, m)
            history.append({"step": done, **m})
            bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}")
        if eval_arrays is not None and cfg_t.eval_every and done % cfg_t.eval_every == 0 and done != stop:
            writer.write(done, evaluate_pairs(reward_fn, state.params, eval_arrays, config.data.eval_batch_size,
                                              mesh), prefix="eval")
        if done % cfg_t.checkpoint_every == 0 or done == stop:
            checkpointer.save(done, state, batcher.state())
    stopped_early = int(state.step) < cfg_t.num_steps
    if stopped_early:
        print(f"stopped at step {int(state.step)} of {cfg_t.num_steps} (train.stop_after_steps); "
              "re-run with the same --workdir to continue")
    elif eval_arrays is not None and len(eval_arrays["chosen_tokens"]):
        eval_metrics = evaluate_pairs(reward_fn, state.params, eval_arrays, config.data.eval_batch_size, mesh)
        writer.write(int(state.step), eval_metrics, prefix="eval")
    checkpointer.close()
    writer.close()
    return {"state": state, "history": history, "eval": eval_metrics, "mesh": mesh,
            "stopped_early": stopped_early}
