"""A proxy reward model for the synthetic counting task, trained in one call.

RL and best-of-N studies of overoptimization need a reward model that is
*learned* from noisy labels, so that optimizing against it can drift from
the gold reward ("Scaling Laws for Reward Model Overoptimization", Gao et
al., 2022). `train_proxy` builds one the way RLHF does: the base policy's
weights + a fresh scalar head, trained with the Bradley–Terry loss on pairs
of the base policy's own samples, labelled by the Bradley–Terry model of the
hidden gold reward (`data.synthetic.CountingTask.label`).

It is small and short (no checkpoints): the export in `directory` is reused
when its settings match, so a resumed RL run scores with the same proxy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxreward import parallel
from jaxreward.data import synthetic
from jaxreward.data.pipeline import GrainLoader
from jaxreward.models.heads import RewardModel
from jaxreward.models.reward_io import export_reward_model, load_reward_model
from jaxreward.sampling.sampler import generate
from jaxreward.train import defaults, pairwise
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.step import unbox


def sample_pairs(task: synthetic.CountingTask, policy, params, n: int, seed: int,
                 temperature: float = 1.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """n pairs of the policy's own samples labelled by Bradley–Terry of the gold
    reward (pair arrays as `synthetic.pair_arrays`), and bool `[n]`: the
    chosen response has the higher gold reward (its mean is the accuracy
    ceiling a reward model can reach on them)."""
    prompts = task.prompts(n, seed)
    out = generate(policy, params, prompts, np.ones_like(prompts, bool), rng=jax.random.PRNGKey(seed),
                   max_new_tokens=task.response_length, temperature=temperature, num_samples=2)
    resp = np.asarray(out.tokens_RM).reshape(n, 2, -1)
    mask = np.asarray(out.mask_RM).reshape(n, 2, -1)
    gold = task.gold_reward(resp.reshape(2 * n, -1), mask.reshape(2 * n, -1)).reshape(n, 2)
    prefer_1 = task.label(gold[:, 0], gold[:, 1], seed)
    arrays = synthetic.pair_arrays(prompts, resp[:, 0], resp[:, 1], prefer_1, mask[:, 0], mask[:, 1])
    agree = np.where(prefer_1, gold[:, 0] > gold[:, 1], gold[:, 1] > gold[:, 0])
    return arrays, agree


BATCH_SIZE = 32  # pairs per proxy training step (so at least this many pairs)


def train_proxy(directory: str, task: synthetic.CountingTask, policy, params, *, num_pairs: int,
                num_steps: int, seed: int, batch_size: int = BATCH_SIZE, learning_rate: float = 1e-3,
                num_eval_pairs: int = 256) -> tuple[RewardModel, dict, dict]:
    """Trains (or reloads from `directory`) a proxy reward model.

    Args:
      directory: where the proxy is exported (`models.reward_io` format).
      task: the counting task (vocabulary, lengths, gold reward, label β).
      policy, params: the base policy (a `Decoder`) whose samples are
        labelled and whose weights initialize the backbone.
      num_pairs: labelled training pairs (few pairs = a weak proxy).
      num_steps: optimizer steps of `batch_size` pairs (AdamW, constant lr).
      seed: seeds the head init, pair sampling, labels and data order.

    Returns:
      `(reward_model, params, info)`; info has the held-out pairwise
      `accuracy`, the label `ceiling`, and the settings.
    """
    # The key covers everything the proxy depends on: the task (its seed sets the
    # gold weights), the training settings, the base policy's architecture and weights.
    settings = {"num_pairs": num_pairs, "num_steps": num_steps, "seed": seed,
                "batch_size": batch_size, "learning_rate": learning_rate,
                "num_eval_pairs": num_eval_pairs, "task": dataclasses.asdict(task),
                "policy_config": _architecture(policy.config),
                "policy_sha256": params_digest(params)}
    info_path = os.path.join(directory, "proxy.json")
    if os.path.exists(info_path):
        try:
            with open(info_path, encoding="utf-8") as f:
                info = json.load(f)
        except ValueError:  # damaged (bad JSON or UTF-8): a cache, so train it again
            print(f"{info_path} is damaged; training the proxy reward model again")
            info = {}
        if isinstance(info, dict) and info.get("settings") == settings:
            rm, rm_params, _ = load_reward_model(directory)
            return rm, rm_params, info
    train, _ = sample_pairs(task, policy, params, num_pairs, seed=seed * 7 + 1)
    evals, ceiling = sample_pairs(task, policy, params, num_eval_pairs, seed=seed * 7 + 2)
    cfg = policy.config
    rm = RewardModel(cfg)
    dummy = jnp.zeros((1, 2), jnp.int32)
    boxed = rm.init(jax.random.PRNGKey(seed + 1), dummy)["params"]
    rm_params = unbox(boxed)
    rm_params["backbone"] = params
    # One device of this process: on a pod every process trains the same
    # copy (same data, seed and device kind).
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    opt = defaults.optimizer(learning_rate=learning_rate, warmup_steps=0)
    opt.final_lr_ratio = 1.0
    tx, schedule = state_lib.make_optimizer(opt, num_steps, state_lib.block_trainable(cfg.num_layers, -1))
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    loss_fn, metrics_fn = pairwise.make_loss_fns(rm, "bradley_terry")
    step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings)
    state = jax.jit(lambda p: state_lib.init_state(p, tx, seed), out_shardings=shardings)(rm_params)
    loader = GrainLoader(train, batch_size, seed=seed, shard_index=0, shard_count=1)
    for _ in range(num_steps):
        state, _ = step(state, parallel.shard_global_batch(next(loader), mesh))  # every process: the whole batch
    final = pairwise.evaluate_pairs(rm, state.params, evals, 256, mesh, "bradley_terry")
    rm_params = parallel.to_host(state.params)  # gathered first where a pod spreads them
    info = {"settings": settings, "accuracy": final["accuracy"], "ceiling": float(ceiling.mean())}
    export_reward_model(directory, rm, rm_params, pretrained="")  # collective: every process calls it
    if jax.process_index() == 0:
        with open(info_path + ".tmp", "w", encoding="utf-8") as f:  # atomic: a kill leaves no half file
            json.dump(info, f, indent=2)
        os.replace(info_path + ".tmp", info_path)
    return rm, rm_params, info


def params_digest(params) -> str:
    """SHA-256 over a param pytree's leaf paths, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = parallel.to_host(x)
        h.update(f"{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _architecture(config) -> dict:
    """The policy config for the cache key, without `attention_query_chunk`:
    how attention is split changes speed and float32 rounding only, and
    leaving it out keeps the keys of proxies cached before the field existed."""
    fields = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    fields.pop("attention_query_chunk", None)
    return fields
