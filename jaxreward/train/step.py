"""Sharded, jitted train steps, built once: `step(state, batch) -> (state, metrics)`.

A step is assembled from pure pieces:

- `loss_fn(params, batch, rng) -> (loss, outputs)`: the scalar loss of one
  (micro-)batch, a *mean over its examples* (without `totals_fn`), and per-example outputs
  (arrays with a leading batch axis, e.g. rewards).
- `metrics_fn(outputs, batch) -> dict` of scalars, computed on the whole
  batch's outputs after the micro-batches are stitched back together, so
  metrics do not depend on the micro-batch split.
- optionally `totals_fn(batch) -> dict` of scalars, batch-level normalizers
  (e.g. `policy_gradient.aggregation_normalizers`: the number of valid
  tokens N and of non-empty rows S). The loss function then takes them:
  `loss_fn(params, batch, rng, totals)`.

Micro-batching splits the batch into k equal parts (rows i·b .. i·b + b − 1
form part i), scans over them and combines the parts in one of two modes:

==================  =========================================  ===============================
mode                loss_fn returns                            combined loss and gradient
==================  =========================================  ===============================
no `totals_fn`      the mean over the part's examples          mean of the k parts
with `totals_fn`    Σ over the part of w·l, w normalized by    sum of the k parts
                    the *whole batch's* totals
==================  =========================================  ===============================

Averaging is exact for per-example means (every part has b examples) and for
nothing else: a token-mean loss Σ l / N_i over parts with different token
counts N_i averages to (1/k) Σ_i (Σ_{part i} l) / N_i, not Σ l / N. Every
aggregation mode of `objectives.policy_gradient` (token-mean,
seq-mean-token-mean, ...) is a weighted sum Σ w·l whose weights depend on
other rows only through N and S, so with `totals_fn` computing them once on
the whole batch (inside the jitted step: global counts under any sharding)
the sum of the parts equals the one-shot loss and gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from einops import rearrange
from jax.sharding import Mesh

from jaxreward import parallel
from jaxreward.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
# The loss of a (micro-)batch normalized by whole-batch totals: (params, batch, rng, totals).
TotalsLossFn = Callable[[Any, dict, jax.Array, dict], tuple[jax.Array, dict]]
MetricsFn = Callable[[dict, dict], dict]
TotalsFn = Callable[[dict], dict]


def _split(batch: dict, k: int) -> dict:
    """Each leaf `[k*b, ...]` -> `[k, b, ...]`: micro-batch i is rows i*b .. i*b + b - 1."""
    def f(x):
        if x.shape[0] % k:
            raise ValueError(f"batch size {x.shape[0]} does not split into {k} micro-batches")
        return rearrange(x, "(k b) ... -> k b ...", k=k)
    return jax.tree.map(f, batch)


def _merge(tree: dict) -> dict:
    """The inverse of `_split`: each leaf `[k, b, ...]` -> `[k*b, ...]`."""
    return jax.tree.map(lambda x: rearrange(x, "k b ... -> (k b) ..."), tree)


def loss_and_grad(loss_fn: LossFn | TotalsLossFn, params, batch: dict, rng: jax.Array,
                  micro_batches: int = 1, totals_fn: TotalsFn | None = None):
    """Loss, per-example outputs and gradient over `micro_batches` parts.

    Args:
      loss_fn: `loss_fn(params, part, rng)` (a per-example mean) without
        `totals_fn`; `loss_fn(params, part, rng, totals)` with it (normalized
        by the whole-batch `totals`). See the module docstring.
      params: the parameter pytree (differentiated).
      batch: dict of arrays with a leading batch axis `[k*b, ...]`.
      rng: PRNG key, split into one key per part (the one-shot call gets it
        unsplit).
      micro_batches: k, the number of parts (static).
      totals_fn: optional `totals_fn(batch) -> dict` of scalars, evaluated
        once on the whole batch before it is split. One with the attribute
        `uses_params = True` is called as `totals_fn(batch, params)`, for a
        statistic of the current params over the whole batch (KTO's
        reference point z_0); it gets no gradient.

    Returns:
      `(loss, outputs, grads)`: float32 scalar loss (the mean of the parts'
      losses without `totals_fn`, their sum with it), outputs with the parts
      merged back in row order, and grads shaped like `params` (combined the
      same way as the loss).

    Raises:
      ValueError: if a leaf's leading size does not divide by `micro_batches`.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if totals_fn is None:
        extra = ()
    elif getattr(totals_fn, "uses_params", False):  # statistics of the current params (no gradient)
        extra = (totals_fn(batch, jax.lax.stop_gradient(params)),)
    else:
        extra = (totals_fn(batch),)
    if micro_batches == 1:
        (loss, outputs), grads = grad_fn(params, batch, rng, *extra)
        return loss, outputs, grads
    parts = _split(batch, micro_batches)
    rngs = jax.random.split(rng, micro_batches)

    def body(acc, xs):
        part, r = xs
        (loss, outputs), grads = grad_fn(params, part, r, *extra)
        acc = jax.tree.map(jnp.add, acc, (loss, grads))
        return acc, outputs

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), outputs = jax.lax.scan(body, zeros, (parts, rngs))
    if totals_fn is not None:  # each part is already normalized by the whole batch
        return loss, _merge(outputs), grads
    scale = 1.0 / micro_batches
    return loss * scale, _merge(outputs), jax.tree.map(lambda g: g * scale, grads)


def make_train_step(loss_fn: LossFn | TotalsLossFn, metrics_fn: MetricsFn,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    state_shardings: Any, micro_batches: int = 1, totals_fn: TotalsFn | None = None):
    """Builds the jitted step with explicit in/out shardings (pjit semantics).

    Args:
      loss_fn, metrics_fn: see the module docstring.
      tx, schedule: the optimizer and its learning-rate schedule (for metrics).
      mesh: the device mesh; batches are split along `data` × `fsdp`.
      state_shardings: a `TrainState` of `NamedSharding`s.
      micro_batches: gradient-accumulation parts per step.
      totals_fn: optional whole-batch normalizers; when given, `loss_fn`
        takes them as a fourth argument and the parts' losses and gradients
        are summed (see the module docstring and `loss_and_grad`). They are
        computed inside the jitted step, so on a mesh they are global.

    Returns:
      `step(state, batch) -> (state, metrics)`; the input state is donated.
      Metrics add `loss`, `grad_norm` and `learning_rate` to `metrics_fn`'s.
    """
    def step(state: TrainState, batch: dict):
        rng, sub = jax.random.split(state.rng)
        loss, outputs, grads = loss_and_grad(loss_fn, state.params, batch, sub, micro_batches,
                                            totals_fn)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics_fn(outputs, batch))
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                       learning_rate=schedule(state.step))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    batch_sharding = parallel.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))


def state_shardings(mesh: Mesh, boxed_params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Shardings of a `TrainState` from logically-boxed (abstract) params.

    Each optimizer-state leaf whose key path ends with a parameter's key path
    (and has its shape) takes that parameter's sharding: this covers Adam's
    moments, including inside `multi_transform`/`masked` states. Everything
    else (counts, the RNG, the step) is replicated.
    """
    p_shard = parallel.param_shardings(mesh, boxed_params)
    params = unbox(boxed_params)
    rep = parallel.replicated(mesh)
    by_path = {}
    for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(params),
                                   jax.tree.leaves(p_shard)):
        by_path[tuple(map(str, path))] = (leaf.shape, shard)
    opt_shape = jax.eval_shape(tx.init, params)

    def leaf_sharding(path, leaf):
        keys = tuple(map(str, path))
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return rep

    opt_shard = jax.tree_util.tree_map_with_path(leaf_sharding, opt_shape)
    return TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)


def unbox(tree: Any) -> Any:
    """Strips `nn.LogicallyPartitioned` boxes, leaving the arrays."""
    return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, tree,
                        is_leaf=lambda x: hasattr(x, "unbox"))
