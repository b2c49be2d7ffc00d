"""Study fork of experiments/quickstart.py: best-of-N proxy vs gold reward,
repeated over `study.seeds` sampling seeds, with a plot.

    python -m jaxreward.main --config=experiments/proj/bon_proxy_vs_gold/config.py \
        --workdir=runs/bon_proxy_vs_gold

Changed from the quickstart (everything else is the same code): step 4
runs once per seed; the table reports mean and standard deviation over
seeds; `bon_proxy_vs_gold.png` plots gold and proxy reward against the KL
bound. See README.md beside this file for the claim and the results.

1. A tiny random decoder is the base policy; it samples two responses to
   each random prompt.
2. Pairs are labelled by the Bradley–Terry model of a hidden gold reward
   (`jaxreward.data.synthetic.CountingTask`).
3. A proxy reward model (the base policy's weights + a fresh head) is
   trained on the pairs with the Bradley–Terry loss.
4. On held-out prompts, N = 1, 2, 4, ..., max_n samples per prompt are
   ranked by the proxy; the table reports the mean proxy and gold reward of
   the chosen sample against the best-of-N KL bound log N − (N−1)/N.

Results go to `<workdir>/best_of_n.json` and the printed table.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import parallel
from jaxreward.data import synthetic
from jaxreward.data.pipeline import GrainLoader
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.sampling.best_of_n import best_of_n, best_of_n_kl_bound, reward_model_fn
from jaxreward.sampling.sampler import generate
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, pairwise
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.step import unbox


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.per_process_batch(config)  # data.batch_size divides among the processes (one share each)
    pairwise.pair_loss(config.loss.name)
    for name in ("synthetic.prompt_length", "synthetic.response_length", "synthetic.num_train_pairs",
                 "synthetic.num_eval_pairs", "best_of_n.num_prompts", "best_of_n.max_n",
                 "reward.num_objectives", "model.vocab_size", "model.hidden_size",
                 "model.intermediate_size", "model.num_layers", "model.num_heads",
                 "model.num_kv_heads"):
        defaults.check_int(config, name, 1)
    defaults.check_int(config, "reward.trainable_blocks", -1)
    defaults.check_best_of_n_max_n(config, "best_of_n.max_n", off=False)
    defaults.check_at_least_one_batch(config, "synthetic.num_train_pairs", "data.batch_size")
    defaults.check_float(config, "synthetic.label_beta", 0.0)
    defaults.check_float(config, "synthetic.temperature", 0.0, low_open=True)
    defaults.check_float(config, "model.rope_theta", 0.0, low_open=True)
    defaults.check_int(config, "study.seeds", 1)


def model_config(config: ml_collections.ConfigDict) -> LlamaConfig:
    s = config.synthetic
    return LlamaConfig(**config.model.to_dict(),
                       max_position_embeddings=s.prompt_length + s.response_length)


def sample_pairs(task: synthetic.CountingTask, policy: Decoder, policy_params, n: int,
                 seed: int, temperature: float) -> tuple[dict[str, np.ndarray], float]:
    """n labelled pairs sampled from the policy; also the fraction of pairs
    whose chosen response has the higher gold reward (the label noise)."""
    prompts = task.prompts(n, seed)
    out = generate(policy, policy_params, prompts, np.ones_like(prompts, bool),
                   rng=jax.random.PRNGKey(seed), max_new_tokens=task.response_length,
                   temperature=temperature, num_samples=2)
    resp = np.asarray(out.tokens_RM).reshape(n, 2, -1)
    mask = np.asarray(out.mask_RM).reshape(n, 2, -1)
    gold = task.gold_reward(resp.reshape(2 * n, -1), mask.reshape(2 * n, -1)).reshape(n, 2)
    prefer_1 = task.label(gold[:, 0], gold[:, 1], seed)
    arrays = synthetic.pair_arrays(prompts, resp[:, 0], resp[:, 1], prefer_1, mask[:, 0], mask[:, 1])
    agree = np.mean(np.where(prefer_1, gold[:, 0] > gold[:, 1], gold[:, 1] > gold[:, 0]))
    return arrays, float(agree)


def best_of_n_curve(proxy_BN: np.ndarray, gold_BN: np.ndarray, max_n: int) -> list[dict]:
    """Per N in 1, 2, 4, ..., max_n: best-of-N over the first N samples of
    each prompt (nested subsets), selected by the proxy (ties: lowest index).
    """
    rows, n = [], 1
    while n <= max_n:
        pick = np.argmax(proxy_BN[:, :n], axis=1)  # first maximum = lowest index
        take = lambda a: np.take_along_axis(a[:, :n], pick[:, None], axis=1)[:, 0]
        rows.append({"N": n, "kl_bound": best_of_n_kl_bound(n),
                     "proxy_reward": float(take(proxy_BN).mean()),
                     "gold_reward": float(take(gold_BN).mean()),
                     "oracle_gold": float(gold_BN[:, :n].max(axis=1).mean())})
        n *= 2
    return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- The task, the base policy, labelled pairs.
    s, t = config.synthetic, config.train
    mcfg = model_config(config)
    task = synthetic.CountingTask(mcfg.vocab_size, s.prompt_length, s.response_length,
                                  seed=config.seed, label_beta=s.label_beta)
    policy = Decoder(mcfg)
    dummy = jnp.zeros((1, s.prompt_length), jnp.int32)
    policy_params = unbox(policy.init(jax.random.PRNGKey(config.seed), dummy)["params"])
    print(f"base policy / reward backbone: {mcfg.num_params():,} params")
    train, train_agree = sample_pairs(task, policy, policy_params, s.num_train_pairs,
                                      seed=1, temperature=s.temperature)
    evals, eval_agree = sample_pairs(task, policy, policy_params, s.num_eval_pairs,
                                     seed=2, temperature=s.temperature)
    print(f"sampled {s.num_train_pairs} train / {s.num_eval_pairs} eval pairs; labels agree "
          f"with the gold reward on {eval_agree:.3f} of eval pairs (the accuracy ceiling)")

    # --- The proxy reward model: the policy's weights + a fresh head, as in RLHF.
    rm = RewardModel(mcfg, num_objectives=config.reward.num_objectives,
                     frozen_blocks=state_lib.frozen_blocks(mcfg.num_layers,
                                                           config.reward.trainable_blocks))
    boxed = rm.init(jax.random.PRNGKey(config.seed + 1), dummy)["params"]
    rm_params = unbox(boxed)
    rm_params["backbone"] = policy_params
    trainable = state_lib.block_trainable(mcfg.num_layers, config.reward.trainable_blocks)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tx, schedule = state_lib.make_optimizer(config.optimizer, loop.schedule_steps(t), trainable)
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    loss_fn, metrics_fn = pairwise.make_loss_fns(rm, config.loss.name)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                          micro_batches=t.micro_batches)
    score_fn = jax.jit(lambda p, b: pairwise.pair_rewards(rm, p, b))
    evaluate = lambda p: pairwise.evaluate_pairs(rm, p, evals, config.data.eval_batch_size, mesh,
                                                 config.loss.name, score_fn)
    batcher = GrainLoader(train, defaults.per_process_batch(config), seed=config.seed)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (rm_params,), shardings, batcher)

    # --- Train the proxy.
    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    bar = tqdm.trange(start, stop, desc="train proxy reward model", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        state, metrics = train_step(state, parallel.shard_batch(next(batcher), mesh))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            loop.log_train(writer, done, metrics, bar)
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, evaluate(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, batcher.state())
    checkpointer.close()
    if loop.stopped_early(int(state.step), t.num_steps):
        writer.close()
        return {"stopped_at": int(state.step)}
    final = evaluate(state.params)
    writer.write(int(state.step), final, prefix="eval")
    writer.close()
    print(f"proxy reward model: held-out pairwise accuracy {final['accuracy']:.3f} "
          f"(ceiling {eval_agree:.3f})")

    # --- Best-of-N on held-out prompts, ranked by the proxy, scored by gold; once per seed.
    b = config.best_of_n
    prompts = task.prompts(b.num_prompts, seed=3)
    curves = []
    for seed in range(config.study.seeds):
        result = best_of_n(policy, policy_params, prompts, np.ones_like(prompts, bool),
                           reward_model_fn(rm, state.params), n=b.max_n,
                           rng=jax.random.PRNGKey(config.seed + 3 + 1000 * seed),
                           max_new_tokens=s.response_length, temperature=s.temperature)
        gold = task.gold_reward(np.asarray(result.samples.tokens_RM),
                                np.asarray(result.samples.mask_RM))
        curves.append(best_of_n_curve(np.asarray(result.rewards_BN),
                                      gold.reshape(b.num_prompts, b.max_n), b.max_n))
    table = []
    for rows in zip(*curves):
        row = {"N": rows[0]["N"], "kl_bound": rows[0]["kl_bound"]}
        for key in ("proxy_reward", "gold_reward", "oracle_gold"):
            values = np.array([r[key] for r in rows])
            row[key], row[f"{key}_std"] = float(values.mean()), float(values.std())
        table.append(row)
    print(f"\nbest-of-N on held-out prompts, mean ± std over {config.study.seeds} sampling seeds")
    print(metrics_lib.format_table(table, ["N", "kl_bound", "proxy_reward", "proxy_reward_std",
                                           "gold_reward", "gold_reward_std", "oracle_gold"]))
    summary = {"eval": final, "label_gold_agreement": eval_agree,
               "train_label_gold_agreement": train_agree, "best_of_n": table, "per_seed": curves}
    with open(os.path.join(workdir, "best_of_n.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kl = [r["kl_bound"] for r in table]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("proxy_reward", "proxy (picked by proxy)"),
                       ("gold_reward", "gold (picked by proxy)"), ("oracle_gold", "gold (oracle pick)")):
        ax.plot(kl, [r[key] for r in table], marker="o", label=label)
    ax.set_xlabel("KL bound log N - (N-1)/N (nats)")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(workdir, "bon_proxy_vs_gold.png")
    metrics_lib.save_figure(fig, png)
    print(f"saved {png}")
    return summary
