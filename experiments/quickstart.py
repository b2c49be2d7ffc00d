"""Quickstart: proxy vs gold reward under best-of-N (configs/quickstart.py).

    python -m jaxreward.main --config=configs/quickstart.py --workdir=runs/quickstart

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

With `ensemble.size = E > 1` (variants `ensemble`, `ensemble_tiny`) the same
run also trains E reward models in ONE vmapped step ("Reward Model Ensembles
Help Mitigate Overoptimization", Coste et al., 2023): member e is the
proxy's backbone + a head seeded `seed + 1 + e`, drawing its own batches in
the order seeded `seed + e` (so member 0 is set up exactly like the proxy).
They are checkpointed under `<workdir>/ensemble/`, exported to
`<workdir>/reward_ensemble/`, and the same best-of-N samples are ranked by
the single proxy, by each member, and by the ensemble's mean, mean − λ·std
and min; the gold reward of each pick against the KL bound is printed,
added to `best_of_n.json` under `ensemble`, and plotted to
`<workdir>/best_of_n_ensemble.png`. With `ensemble.size` 0 or 1 none of this
runs and the job is exactly the single-proxy quickstart.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import errors, parallel
from jaxreward.data import synthetic
from jaxreward.data.pipeline import GrainLoader
from jaxreward.models import ensemble
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import Decoder, LlamaConfig
from jaxreward.objectives.reward import ensemble_reward
from jaxreward.sampling.best_of_n import best_of_n, proxy_gold_curve, reward_model_fn
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, pairwise
from jaxreward.train import evaluate as evaluate_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.proxy import sample_pairs
from jaxreward.train.step import unbox


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.per_process_batch(config)  # data.batch_size divides among the processes (one share each)
    pairwise.pair_loss(config.loss.name)
    for name in ("synthetic.prompt_length", "synthetic.response_length", "synthetic.num_train_pairs",
                 "synthetic.num_eval_pairs", "best_of_n.num_prompts", "best_of_n.max_n",
                 "reward.num_objectives"):
        defaults.check_int(config, name, 1)
    defaults.check_arch(config, "model")  # the decoder's sizes, head size, rope_theta
    defaults.check_int(config, "reward.trainable_blocks", -1)
    defaults.check_best_of_n_max_n(config, "best_of_n.max_n", off=False)
    defaults.check_at_least_one_batch(config, "synthetic.num_train_pairs", "data.batch_size")
    defaults.check_int(config, "ensemble.size", 0)
    defaults.check_int(config, "ensemble.score_chunk_size", 1)
    defaults.check_float(config, "ensemble.std_coef", 0.0)
    defaults.check_float(config, "synthetic.label_beta", 0.0)
    defaults.check_float(config, "synthetic.temperature", 0.0, low_open=True)


def model_config(config: ml_collections.ConfigDict) -> LlamaConfig:
    s = config.synthetic
    return LlamaConfig(**config.model.to_dict(),
                       max_position_embeddings=s.prompt_length + s.response_length)


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
    train_agree, eval_agree = float(train_agree.mean()), float(eval_agree.mean())
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
    ens_state = ens_eval = None
    if config.ensemble.size > 1:  # E members in one vmapped step, beside the proxy
        ens_state, ens_eval = train_ensemble(config, workdir, rm, rm_params, train, evals, mesh, tx,
                                             schedule, shardings, loss_fn, metrics_fn, score_fn)
    if loop.stopped_early(int(state.step), t.num_steps):
        writer.close()
        return {"stopped_at": int(state.step)}
    final = evaluate(state.params)
    writer.write(int(state.step), final, prefix="eval")
    writer.close()
    print(f"proxy reward model: held-out pairwise accuracy {final['accuracy']:.3f} "
          f"(ceiling {eval_agree:.3f})")

    # --- Best-of-N on held-out prompts, ranked by the proxy, scored by gold.
    b = config.best_of_n
    prompts = task.prompts(b.num_prompts, seed=3)
    result = best_of_n(policy, policy_params, prompts, np.ones_like(prompts, bool),
                       reward_model_fn(rm, state.params), n=b.max_n,
                       rng=jax.random.PRNGKey(config.seed + 3),
                       max_new_tokens=s.response_length, temperature=s.temperature)
    samples = result.samples
    gold = task.gold_reward(np.asarray(samples.tokens_RM), np.asarray(samples.mask_RM))
    curve = proxy_gold_curve(np.asarray(result.rewards_BN), gold.reshape(b.num_prompts, b.max_n),
                            b.max_n)
    print("\nbest-of-N on held-out prompts (mean over prompts; KL bound in nats)")
    print(metrics_lib.format_table(curve, ["N", "kl_bound", "proxy_reward", "gold_reward",
                                           "oracle_gold"]))
    summary = {"eval": final, "label_gold_agreement": eval_agree,
               "train_label_gold_agreement": train_agree, "best_of_n": curve}
    if ens_state is not None:
        summary["ensemble"] = ensemble_best_of_n(config, workdir, rm, ens_state.params, ens_eval, final,
                                                 samples, np.asarray(result.rewards_BN),
                                                 gold.reshape(b.num_prompts, b.max_n))
    with open(os.path.join(workdir, "best_of_n.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


# ------------------------------------------------------------------ ensemble


def train_ensemble(config, workdir, rm, rm_params, train, evals, mesh, tx, schedule, shardings,
                   loss_fn, metrics_fn, score_fn):
    """Trains `ensemble.size` reward models in one vmapped step, beside the proxy.

    Member e: the proxy's initial backbone, a head initialized from
    `PRNGKey(seed + 1 + e)`, its own batches shuffled with seed `seed + e`,
    its own optimizer state; member 0 is set up exactly like the proxy. Same
    optimizer, schedule, steps, stop and resume rules as the proxy, with its
    checkpoints and metrics under `<workdir>/ensemble/` (metrics: the mean
    over members, and `loss_e{e}` / `accuracy_e{e}` per member).

    Returns:
      `(state, final eval)`: the stacked `TrainState` and, when it reached
      `train.num_steps`, `evaluate_ensemble`'s metrics (else None).
    """
    E, t = config.ensemble.size, config.train
    dummy = jnp.zeros((1, config.synthetic.prompt_length), jnp.int32)
    heads = [unbox(rm.init(jax.random.PRNGKey(config.seed + 1 + e), dummy)["params"]["head"])
             for e in range(E)]
    params_E = ensemble.stack([{"backbone": rm_params["backbone"], "head": h} for h in heads])
    seeds = [config.seed + e for e in range(E)]
    ens_dir = os.path.join(workdir, "ensemble")
    ens_shardings = ensemble.stacked_shardings(shardings)
    train_step = ensemble.make_ensemble_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                                   micro_batches=t.micro_batches)
    bs = defaults.per_process_batch(config)
    batcher = ensemble.MemberBatches([GrainLoader(train, bs, seed=s) for s in seeds])
    checkpointer = ckpt_lib.Checkpointer(os.path.join(ens_dir, "checkpoints"))
    make_state = jax.jit(lambda p: ensemble.init_ensemble_state(p, tx, seeds), out_shardings=ens_shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (params_E,), ens_shardings, batcher)
    evaluate = lambda p: evaluate_ensemble(rm, p, evals, config, mesh, score_fn)

    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(ens_dir, resume_step=start)
    bar = tqdm.trange(start, stop, desc=f"train an ensemble of {E} reward models", initial=start,
                      total=stop, disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        state, metrics = train_step(state, parallel.shard_batch(next(batcher), mesh))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            per_member = jax.device_get(metrics)
            if not np.all(np.isfinite(per_member["loss"])):
                raise errors.diverged("ensemble loss", per_member["loss"], done)
            mets = {k: float(np.mean(v)) for k, v in per_member.items()}  # mean over members
            for e in range(E):
                mets[f"loss_e{e}"] = float(per_member["loss"][e])
                mets[f"accuracy_e{e}"] = float(per_member["accuracy"][e])
            writer.write(done, mets)
            bar.set_postfix(loss=f"{mets['loss']:.4f}", acc=f"{mets['accuracy']:.3f}")
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, evaluate(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, batcher.state())
    checkpointer.close()
    final = None
    if int(state.step) >= t.num_steps:
        final = evaluate(state.params)
        writer.write(int(state.step), final, prefix="eval")
    writer.close()
    return state, final


def evaluate_ensemble(rm, params_E, evals, config, mesh, score_fn) -> dict[str, float]:
    """Held-out pairwise metrics of each member (`accuracy_e{e}`, `loss_e{e}`),
    their mean (`accuracy`, `loss`), and the accuracy of ranking each pair by
    each aggregate of the members (`accuracy_mean`, `accuracy_min`,
    `accuracy_mean_minus_std`, λ = `ensemble.std_coef`)."""
    E = ensemble.num_members(params_E)
    pairs = {k: v for k, v in evals.items() if k.startswith(pairwise.SIDES)}
    scored = [evaluate_lib.score_all_rows(score_fn, ensemble.member(params_E, e), pairs,
                                          config.data.eval_batch_size, mesh) for e in range(E)]
    rc_E, rr_E = np.stack([c for c, _ in scored]), np.stack([r for _, r in scored])  # [E, n, K]
    loss = pairwise.pair_loss(config.loss.name)
    out = {}
    for e in range(E):
        value, m = loss(jnp.asarray(rc_E[e]), jnp.asarray(rr_E[e]))
        out[f"loss_e{e}"], out[f"accuracy_e{e}"] = float(value), float(m["accuracy"])
    out["loss"] = float(np.mean([out[f"loss_e{e}"] for e in range(E)]))
    out["accuracy"] = float(np.mean([out[f"accuracy_e{e}"] for e in range(E)]))
    for mode in ("mean", "min", "mean_minus_std"):
        agg = [ensemble_reward(x, mode, std_coef=config.ensemble.std_coef) for x in (rc_E, rr_E)]
        out[f"accuracy_{mode}"] = float(loss(*agg)[1]["accuracy"])
    out["num_pairs"] = float(rc_E.shape[1])
    return out


def ensemble_best_of_n(config, workdir, rm, params_E, ens_eval, proxy_eval, samples, proxy_BN,
                       gold_BN) -> dict:
    """Exports the ensemble, reloads it, and ranks the proxy's best-of-N
    samples by each member and by each aggregate; prints the gold reward of
    each ranking's pick against the KL bound, plots it, returns the curves."""
    E, lam, b = config.ensemble.size, config.ensemble.std_coef, config.best_of_n
    export_dir = os.path.join(workdir, ensemble.EXPORT_DIR)
    ensemble.export_ensemble(export_dir, rm, params_E, "quickstart base policy",
                             extra={"head_seeds": [config.seed + 1 + e for e in range(E)],
                                    "data_seeds": [config.seed + e for e in range(E)]})
    ens_rm, loaded_E, _ = ensemble.load_ensemble(export_dir)  # rank with what was exported
    score = ensemble.member_rewards_fn(ens_rm, loaded_E, chunk_size=config.ensemble.score_chunk_size)
    members_ER = np.asarray(score(samples.sequences()))
    B, N = gold_BN.shape
    rankers = {"proxy": proxy_BN}
    for mode in ("mean", "mean_minus_std", "min"):
        rankers[f"ensemble_{mode}"] = np.asarray(ensemble_reward(members_ER, mode, std_coef=lam)).reshape(B, N)
    curves = {name: proxy_gold_curve(r, gold_BN, b.max_n) for name, r in rankers.items()}
    member_curves = [proxy_gold_curve(members_ER[e].reshape(B, N), gold_BN, b.max_n) for e in range(E)]
    rows = []
    for i, row in enumerate(curves["proxy"]):
        rows.append({"N": row["N"], "kl_bound": row["kl_bound"], "proxy": row["gold_reward"],
                     "member_avg": float(np.mean([c[i]["gold_reward"] for c in member_curves])),
                     "ens_mean": curves["ensemble_mean"][i]["gold_reward"],
                     f"ens_mean-{lam:g}std": curves["ensemble_mean_minus_std"][i]["gold_reward"],
                     "ens_min": curves["ensemble_min"][i]["gold_reward"],
                     "oracle": row["oracle_gold"]})
    # Member 0 is seeded like the proxy: the same training up to float
    # round-off (vmapped vs plain matmuls), which many steps can amplify.
    member0_gap = float(np.max(np.abs(members_ER[0] - proxy_BN.reshape(-1))))
    member0_corr = float(np.corrcoef(members_ER[0], proxy_BN.reshape(-1))[0, 1])
    print(f"\nensemble of {E}: held-out pairwise accuracy per member "
          + " ".join(f"{ens_eval[f'accuracy_e{e}']:.3f}" for e in range(E))
          + f"; ranking pairs by the mean {ens_eval['accuracy_mean']:.3f}, mean-{lam:g}std "
          f"{ens_eval['accuracy_mean_minus_std']:.3f}, min {ens_eval['accuracy_min']:.3f} "
          f"(single proxy {proxy_eval['accuracy']:.3f}); member 0, seeded like the proxy, "
          f"agrees with it up to amplified round-off: max |reward difference| {member0_gap:.2g}, "
          f"correlation {member0_corr:.6f} on the best-of-N samples")
    print(f"gold reward of the best-of-N pick by ranking reward (mean over {B} prompts; "
          "member_avg: each member alone, averaged)")
    print(metrics_lib.format_table(rows))
    print(f"ensemble saved to {export_dir}")
    plot = plot_ensemble_curves(curves, member_curves, lam, os.path.join(workdir, "best_of_n_ensemble.png"))
    return {"members": E, "std_coef": lam, "eval": ens_eval, "gold_by_ranker": rows,
            "curves": curves, "member_curves": member_curves, "member0_vs_proxy_max_abs": member0_gap,
            "member0_vs_proxy_corr": member0_corr,
            "export_dir": export_dir, "plot": plot}


def plot_ensemble_curves(curves, member_curves, lam, path) -> str | None:
    """Gold reward (left) and the ranking reward itself (right) of the pick
    against the KL bound, per ranking; returns the PNG path (None without
    matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    labels = {"proxy": "single proxy", "ensemble_mean": "ensemble mean",
              "ensemble_mean_minus_std": f"ensemble mean − {lam:g}·std", "ensemble_min": "ensemble min"}
    fig, (ax_gold, ax_score) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        kl = [r["kl_bound"] for r in curve]
        ax_gold.plot(kl, [r["gold_reward"] for r in curve], "o-", label=labels[name])
        ax_score.plot(kl, [r["proxy_reward"] for r in curve], "o-", label=labels[name])
    kl = [r["kl_bound"] for r in curves["proxy"]]
    ax_gold.plot(kl, np.mean([[r["gold_reward"] for r in c] for c in member_curves], axis=0), "s--",
                 color="gray", label="one member (average)")
    ax_gold.plot(kl, [r["oracle_gold"] for r in curves["proxy"]], "k:", label="oracle (gold picks)")
    for ax, what in ((ax_gold, "gold reward of the pick"), (ax_score, "ranking reward of the pick")):
        ax.set(xlabel="KL bound log N − (N−1)/N (nats)", ylabel=what)
    ax_gold.set_title("gold reward under best-of-N")
    ax_score.set_title("what each ranking optimizes")
    ax_gold.legend(fontsize=8)
    fig.tight_layout()
    metrics_lib.save_figure(fig, path)
    print(f"plot saved to {path}")
    return path
