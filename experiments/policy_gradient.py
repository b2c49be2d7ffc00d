"""Critic-free on-policy RL: GRPO, RLOO, REINFORCE++, ReMax, Dr. GRPO, DAPO (configs/rl.py).

    python -m jaxreward.main --config=configs/rl.py:synthetic --workdir=DIR

One step, in this order (each part is a block of `run` below):

1. **Rollout.** The prompt sampler gives B prompts (each once per epoch);
   `generate` prefills each prompt once and samples G completions from the
   shared cache (rows b·G .. b·G + G − 1 are prompt b's group), returning the
   behaviour log-probs.
2. **Score.** The reward function maps the completions to float32 `[R]`: a
   proxy or the gold reward (synthetic task), an exported reward model, or
   weighted registered Python rewards of the decoded text. A completion cut
   off at `max_new_tokens` without EOS is scored as is, given
   `reward.truncated_penalty`, or masked out of the loss
   (`reward.truncated`).
3. **Reference.** Log-probs of the frozen reference on the rollout (skipped
   when β = 0 and `kl.measure` is off).
4. **Advantages** from the objectives registry by name: group (grpo, rloo),
   token (reinforce_pp) or greedy-baseline (remax, which decodes one greedy
   completion per prompt more). KL in the reward subtracts β·k1 per token
   (sequence methods: its sum) before the advantages.
5. **Update.** `num_epochs` passes over `num_minibatches` shuffled
   minibatches of whole groups, each one optimizer step of the sharded step
   factory. The loss is the registered policy loss (PPO clip, GSPO) + β·KL
   when the KL is in the loss, aggregated over tokens by `loss_agg_mode`
   with whole-minibatch normalizers, so micro-batches sum to the one-shot
   gradient. The first minibatch of the first epoch is on-policy: its old
   log-probs are the current ones under stop_gradient (ratio exactly 1).
   Later minibatches use the behaviour log-probs, recomputed once with the
   training forward when `recompute_old_logps` asks for it (`auto`: when
   the rollout is reused and sampling and training log-probs could differ,
   i.e. top-k/top-p or a low-precision dtype). Off-policy minibatches weight
   the KL loss by π/π_old so its gradient stays the documented one
   (objectives/kl.py).

What the update converges to (tests/experiments/test_policy_gradient.py
checks both on a bandit). With k3 in the loss the expected gradient is that
of E_π[A] − β·KL(π_ref‖π) (objectives/kl.py), and a group advantage rescales
the reward: for Dr. GRPO (A = r − group mean) E[A_i | y_i] =
(1 − 1/G)·(r(y_i) − E_π r), so the fixed point maximizes
(1 − 1/G)·E_π[r] − β·KL(π_ref‖π): for a tabular policy
(1 − 1/G)·π_y·(r_y − E_π r) = β·(π_y − π_ref,y), which is *not*
π_ref·e^{r/β}/Z (GRPO's std scaling divides r by the group std as well).
With k1 in the reward and RLOO (E[A_i | y_i] = r̃(y_i) − E_π r̃ for the
KL-shaped reward r̃) it is π_ref·e^{r/β}/Z, the maximizer of
E_π[r] − β·KL(π‖π_ref).

Eval points (start, every `train.eval_every`, end): samples of the policy on
held-out prompts, their reward (gold and proxy in the synthetic task) and
KL(π‖π_ref) (k1, k3), plotted against √KL beside best-of-N of the reference
ranked by the same reward (`reward_vs_kl.png`).

Writes `metrics.jsonl` (train/*, eval/*), `tensorboard/`, `checkpoints/`
(policy state, prompt sampler, KL coefficient), `rl.json` (summary),
`reward_vs_kl.png`, `proxy_reward_model/` (synthetic) and `policy/` (HF).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

import jaxreward
from jaxreward import parallel
from jaxreward.data.prompts import PromptSampler, filter_degenerate_groups
from jaxreward.errors import UserError
from jaxreward.models.llama import Decoder
from jaxreward.models.scoring import shift_mask
from jaxreward.objectives import registry
from jaxreward.objectives.kl import adaptive_kl_coef, kl_loss
from jaxreward.objectives.policy_gradient import aggregation_normalizers
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, rollout
from jaxreward.train import evaluate as evaluate_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib

sg = jax.lax.stop_gradient
EXPORT_DIR = "policy"
ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "remax")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    ro, a, k = config.rollout, config.algorithm, config.kl
    rollout.check_prompts_and_reward(config)
    defaults.check_pretrained(config, "reference.path")
    defaults.check_int(config, "reference.batch_size", 1)
    defaults.check_int(config, "policy.trainable_blocks", -1)
    defaults.check_choice(config, "reward.transform", ("none", "whiten", "clip"))
    defaults.check_float(config, "reward.clip", 0.0, low_open=True)
    defaults.check_choice(config, "reward.truncated", ("score", "penalty", "mask"))
    defaults.check_float(config, "reward.truncated_penalty")
    for name in ("prompts_per_step", "group_size", "max_new_tokens"):
        defaults.check_int(config, f"rollout.{name}", 1)
    defaults.check_float(config, "rollout.temperature", 0.0, low_open=True)
    defaults.check_int(config, "rollout.top_k", 0)
    defaults.check_float(config, "rollout.top_p", 0.0, 1.0, low_open=True)
    defaults.check_choice(config, "algorithm.advantage", ADVANTAGES)
    defaults.check_choice(config, "algorithm.policy_loss", tuple(registry.names("policy_loss")))
    defaults.check_choice(config, "algorithm.loss_agg_mode", tuple(registry.names("aggregation")))
    defaults.check_float(config, "algorithm.clip_eps", 0.0, low_open=True)
    if a.clip_eps_high is not None:
        defaults.check_float(config, "algorithm.clip_eps_high", 0.0, low_open=True)
    defaults.check_float(config, "algorithm.gamma", 0.0, 1.0)
    for name in ("num_epochs", "num_minibatches"):
        defaults.check_int(config, f"algorithm.{name}", 1)
    defaults.check_choice(config, "algorithm.recompute_old_logps", ("auto", "always", "never"))
    if a.advantage in ("grpo", "rloo") and ro.group_size < 2:
        raise defaults.ConfigError(f"config field rollout.group_size: {a.advantage} needs groups of >= 2 "
                                   f"completions per prompt, got {ro.group_size}")
    if a.advantage == "remax" and config.reward.transform == "whiten":
        raise defaults.ConfigError("config field reward.transform: 'whiten' with algorithm.advantage='remax' would "
                                   "subtract the greedy reward (reward units) from whitened rewards (batch "
                                   "units); use reward.transform='none' or 'clip'")
    if a.dynamic_sampling and ro.group_size < 2:
        raise defaults.ConfigError("config field algorithm.dynamic_sampling: drops groups whose G rewards are "
                                   "all equal, which is every group of rollout.group_size=1 (nothing would "
                                   "train); use groups of >= 2 or dynamic_sampling=False")
    defaults.check_choice(config, "model.prefix_sharing", (True, False))
    if config.model.prefix_sharing and config.reference.batch_size % ro.group_size:
        raise defaults.ConfigError(f"config field reference.batch_size: {config.reference.batch_size} is not a "
                                   f"multiple of rollout.group_size={ro.group_size} (with model.prefix_sharing "
                                   "a reference forward packs whole groups)")
    defaults.check_enough_prompts(config)  # before the model loads: counts the prompt file's lines
    if ro.prompts_per_step % a.num_minibatches:
        raise defaults.ConfigError(f"config field algorithm.num_minibatches: {a.num_minibatches} does not "
                                   f"divide rollout.prompts_per_step={ro.prompts_per_step} (minibatches "
                                   "hold whole groups)")
    defaults.check_choice(config, "kl.placement", ("loss", "reward", "none"))
    defaults.check_choice(config, "kl.estimator", ("k1", "k2", "k3"))
    defaults.check_float(config, "kl.beta", 0.0)
    if k.placement == "none" and k.beta > 0:
        # Refused rather than ignored: β would be logged (kl/beta) and printed as in use, and
        # force a reference pass, while no KL term acts. KL metrics need only kl.measure.
        raise defaults.ConfigError(f"config field kl.beta: {k.beta:g} with kl.placement='none' would not be "
                                   "applied; set kl.beta=0 for no KL penalty, or kl.placement to 'loss' or "
                                   "'reward'")
    if k.placement == "reward" and k.estimator != "k1":
        raise defaults.ConfigError("config field kl.estimator: KL in the reward uses k1 (its score-function "
                                   f"gradient is that of KL(π‖π_ref)), got {k.estimator!r}")
    if k.placement == "loss" and k.estimator == "k1" and k.beta > 0:
        raise defaults.ConfigError("config field kl.estimator: k1 in the loss has zero expected gradient; "
                                   "use k2 (∇KL(π‖π_ref)) or k3 (∇KL(π_ref‖π))")
    if k.adaptive:
        if k.placement != "reward":
            raise defaults.ConfigError("config field kl.adaptive: the adaptive controller adjusts β of the "
                                       "KL in the reward (set kl.placement='reward')")
        defaults.check_float(config, "kl.target", 0.0, low_open=True)
        defaults.check_float(config, "kl.horizon", 0.0, low_open=True)
    defaults.check_int(config, "eval.samples_per_prompt", 1)
    defaults.check_best_of_n_max_n(config)


# ----------------------------------------------------------------------------- the update


def decoder_logps_fn(policy: Decoder, config: ml_collections.ConfigDict):
    """`logps_fn(params, tokens, attention_mask, positions) -> [R, L]` of a
    decoder under the sampling processing (temperature, top-k, top-p).

    With `model.prefix_sharing` the rows are taken as whole rollout groups
    and each group's prompt is encoded once (`scoring.group_token_logps`):
    the response log-probs are the same, prompt columns are 0 (the loss
    never reads them).
    """
    ro = config.rollout
    G = ro.group_size if config.model.prefix_sharing else 1

    def logps_fn(params, tokens, attention_mask, positions):
        batch = {"tokens": tokens, "attention_mask": attention_mask, "positions": positions}
        return rollout.rollout_logps(policy, params, batch, temperature=ro.temperature, top_k=ro.top_k,
                                     top_p=ro.top_p, group_size=G, max_new_tokens=ro.max_new_tokens)
    return logps_fn


def make_loss_fns(logps_fn, config: ml_collections.ConfigDict, max_len: int):
    """`(loss_fn, metrics_fn, totals_fn)` of the update for `step.make_train_step`.

    `logps_fn(params, tokens, attention_mask, positions)` gives the policy's
    float32 `[R, L]` log-probs on the grid of `scoring.token_logps`
    (`decoder_logps_fn` in the driver; a table of logits in the tests). The
    minibatch holds `tokens`, `attention_mask`, `positions` `[R, L]`,
    `mask` bool `[R, L]` (response tokens on the log-prob grid, minus masked
    rows), `advantages` float32 `[R, L]`, `old_logps` `[R, L]`, `ref_logps`
    `[R, L]` and `on_policy` bool `[R]`.
    """
    a, k = config.algorithm, config.kl
    policy_loss = registry.get("policy_loss", a.policy_loss)
    clip_high = a.clip_eps if a.clip_eps_high is None else a.clip_eps_high
    kl_in_loss = k.placement == "loss" and k.beta > 0

    def totals_fn(batch):
        return aggregation_normalizers(batch["mask"])

    def loss_fn(params, mb, rng, totals):
        del rng  # deterministic forward
        logps = logps_fn(params, mb["tokens"], mb["attention_mask"], mb["positions"])
        mask = mb["mask"]
        # On-policy: π_old = π exactly (ratio 1, gradient ∇log π); else the behaviour log-probs.
        old = jnp.where(mb["on_policy"][:, None], sg(logps), mb["old_logps"])
        agg = dict(loss_agg_mode=a.loss_agg_mode, num_tokens=totals["num_tokens"],
                   num_seqs=totals["num_seqs"], max_len=max_len)
        kwargs = dict(clip_eps=a.clip_eps, clip_eps_high=clip_high)
        loss, _ = policy_loss(logps, old, mb["advantages"], mask, **kwargs, **agg)
        if kl_in_loss:
            off_policy = jnp.where(mb["on_policy"][:, None], logps, old)  # ρ = 1 on-policy
            kl_term, _ = kl_loss(logps, mb["ref_logps"], mask, estimator=k.estimator,
                                 old_logps_BT=sg(off_policy), **agg)
            loss = loss + k.beta * kl_term
        # Per-row sums for metrics (merged over micro-batches, then averaged per token).
        outputs = rollout.update_row_stats(logps, old, mb["advantages"], mb["ref_logps"], mask, a.clip_eps,
                                           clip_high)
        return loss, outputs

    def metrics_fn(outputs, batch):
        return rollout.update_metrics(outputs, config.kl.beta > 0 or config.kl.measure)

    return loss_fn, metrics_fn, totals_fn


def compute_advantages(config, rewards_R, valid_R, token_rewards_RL, mask_RL, greedy_R):
    """float32 `[R, L]` advantages (0 at masked slots) from the configured estimator."""
    a = config.algorithm
    fn = _advantage_fn(a.advantage, config.rollout.group_size, a.scale_by_std, a.gamma)
    if a.advantage == "reinforce_pp":
        return np.asarray(fn(token_rewards_RL, mask_RL), np.float32)
    seq = fn(rewards_R, valid_R, greedy_R if a.advantage == "remax" else rewards_R)
    return np.where(mask_RL, np.asarray(seq, np.float32)[:, None], 0.0).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _advantage_fn(name: str, group_size: int, scale_by_std: bool, gamma: float):
    """The registry estimator, jitted once (its scans would re-trace if called eagerly)."""
    if name == "reinforce_pp":
        fn = registry.get("token_advantage", "reinforce_pp")
        return jax.jit(lambda r, m: fn(r, None, m, gamma=gamma)[0])
    if name == "remax":
        fn = registry.get("baseline_advantage", "remax")
        return jax.jit(lambda r, valid, greedy: fn(r, greedy, valid_B=valid))
    kw = {"scale_by_std": scale_by_std} if name == "grpo" else {}
    fn = registry.get("group_advantage", name)
    return jax.jit(lambda r, valid, _: fn(r, group_size=group_size, valid_B=valid, **kw))


# ----------------------------------------------------------------------------- the job


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- Policy, reference, prompts, reward.
    m, d, ro, a, k, t, e = (config.model, config.data, config.rollout, config.algorithm, config.kl,
                            config.train, config.eval)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rollout.check_minibatch_split(config, mesh)  # before the model loads
    base_model, base_params, tokenizer = rollout.load_policy(config, m.pretrained)
    cfg = dataclasses.replace(base_model.config, remat=m.remat)
    if d.source != "synthetic" and tokenizer is None:
        raise UserError(f"model.pretrained={m.pretrained!r} has no tokenizer; text prompts need one")
    task = rollout.synthetic_task(config, cfg.vocab_size)
    print(f"policy {m.pretrained or 'random model.arch'}: {cfg.num_params():,} params; "
          f"{a.advantage} advantages, {a.policy_loss} loss ({a.loss_agg_mode}), KL {k.placement} "
          f"β={k.beta:g} ({k.estimator})")
    prompts = rollout.prompt_set(config, tokenizer, task)
    train_p, eval_p = prompts["train"], prompts["eval"]
    B, G = ro.prompts_per_step, ro.group_size
    R = B * G
    defaults.check_enough_prompts(config, num_train=len(train_p["tokens"]))  # after bad lines were skipped
    ref_model, ref_params = rollout.load_reference(config, cfg.vocab_size, base_model, base_params)
    rollout.check_prompts_fit(config, prompts, base_model, ref_model)  # both sample (eval, best-of-N)
    score, reward_name = rollout.make_reward_fn(config, workdir, task, tokenizer, base_model, base_params,
                                                     prompts)
    sampling = rollout.sampling_kwargs(config, tokenizer)
    stop_ids = sampling["stop_ids"]
    process = (ro.temperature, ro.top_k, ro.top_p)
    ref_logps_fn = rollout.logps_fn(ref_model, *process)
    needs_ref = k.beta > 0 or k.measure

    # --- Sharded update step, state, prompt sampler.
    tb = config.policy.trainable_blocks
    policy = Decoder(cfg, frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    boxed = jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    steps_total = loop.schedule_steps(t) * a.num_epochs * a.num_minibatches
    tx, schedule = state_lib.make_optimizer(config.optimizer, steps_total,
                                            state_lib.block_trainable(cfg.num_layers, tb))
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    loss_fn, metrics_fn, totals_fn = make_loss_fns(decoder_logps_fn(policy, config), config, ro.max_new_tokens)
    update = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                      micro_batches=t.micro_batches, totals_fn=totals_fn)
    policy_logps_fn = rollout.logps_fn(policy, *process)
    # The rollout's own rows come in groups of G: those forwards encode each prompt once.
    packing = (G if m.prefix_sharing else 1, ro.max_new_tokens)
    group_ref_fn = rollout.logps_fn(ref_model, *process, *packing)
    group_policy_fn = rollout.logps_fn(policy, *process, *packing)
    run_state = rollout.RunState(PromptSampler(len(train_p["tokens"]), B, config.seed), k.beta)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (base_params,), shardings, run_state)
    reuse = a.num_epochs * a.num_minibatches > 1
    recompute = a.recompute_old_logps == "always" or (
        a.recompute_old_logps == "auto" and reuse and (ro.top_k > 0 or ro.top_p < 1.0 or m.dtype != "float32"))
    print(f"{len(train_p['tokens'])} train prompts, {B} per step × {G} completions = {R} rows; "
          f"{a.num_epochs} epoch(s) × {a.num_minibatches} minibatch(es) per rollout; reward: {reward_name}")

    # --- Eval points: policy samples on held-out prompts, reward and KL to the reference.
    ref_bs = config.reference.batch_size

    def evaluate(params) -> dict:
        return rollout.eval_point(policy, params, eval_p, score, sampling, policy_logps_fn, ref_logps_fn,
                                  ref_params, samples_per_prompt=e.samples_per_prompt, batch_size=ref_bs,
                                  mesh=mesh, seed=config.seed)

    # --- Train: rollout, score, reference, advantages, update.
    updates_per_step = a.num_epochs * a.num_minibatches  # state.step counts optimizer steps
    start, stop = int(state.step) // updates_per_step, loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    if start == 0:
        writer.write(0, evaluate(state.params), prefix="eval")
    history = []
    bar = tqdm.trange(start, stop, desc=f"rl {a.advantage}", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        # 1. Rollout: B prompts, G completions each (one prefill per prompt).
        t0 = time.perf_counter()
        ids_B = run_state.sampler.next()
        ids_R = np.repeat(ids_B, G)
        samples = rollout.sample_rollout(policy, state.params, train_p["tokens"][ids_B], train_p["mask"][ids_B],
                                         mesh, rng=jax.random.fold_in(jax.random.PRNGKey(config.seed + 11), step),
                                         num_samples=G, **sampling)  # split over the mesh's batch shards
        arrays = rollout.rollout_arrays(samples)
        rollout_s = time.perf_counter() - t0
        # 2. Score.
        t0 = time.perf_counter()
        rewards_R, extra = score(samples, ids_R, train_p)
        truncated = rollout.truncated_rows(samples, stop_ids)
        # Penalty, clip, whitening; reward/mean is the reward trained on (rollout.shape_rewards).
        rewards_R, valid, _, reward_metrics = rollout.shape_rewards(config.reward, rewards_R, truncated)
        greedy_R = None
        if a.advantage == "remax":  # the greedy completion's reward is the baseline
            greedy = rollout.sample_rollout(policy, state.params, train_p["tokens"][ids_B], train_p["mask"][ids_B],
                                            mesh, rng=jax.random.PRNGKey(0), num_samples=1,
                                            **{**sampling, "temperature": 0.0})
            greedy_B = rollout.shape_baseline(config.reward, score(greedy, ids_B, train_p)[0],
                                              rollout.truncated_rows(greedy, stop_ids))
            greedy_R = np.repeat(greedy_B, G)
        score_s = time.perf_counter() - t0
        # 3. Reference log-probs (and the behaviour log-probs on the training grid).
        t0 = time.perf_counter()
        resp_RL = np.asarray(shift_mask(samples.loss_mask_RL))   # every sampled response token
        mask = resp_RL & valid[:, None]
        old_logps = np.asarray(samples.sample_logps_RL)
        if recompute:
            old_logps = evaluate_lib.score_all_rows(group_policy_fn, state.params, arrays, ref_bs, mesh,
                                                multiple_of=packing[0])
        ref_logps = (evaluate_lib.score_all_rows(group_ref_fn, ref_params, arrays, ref_bs, mesh,
                                             multiple_of=packing[0]) if needs_ref
                     else np.zeros_like(old_logps))
        ref_s = time.perf_counter() - t0
        # 4. Advantages (KL in the reward first).
        beta = run_state.beta
        k1_RL = np.where(mask, old_logps - ref_logps, 0.0).astype(np.float32)
        # KL of the policy's samples (metrics, adaptive β): all of them, also those out of the loss.
        kl_RL = np.where(resp_RL, old_logps - ref_logps, 0.0).astype(np.float32)
        token_rewards = np.zeros_like(k1_RL)
        ends = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)  # last response token
        token_rewards[np.arange(R), ends] = np.where(mask.any(1), rewards_R, 0.0)  # none if empty
        seq_rewards = rewards_R
        if k.placement == "reward" and beta > 0:
            token_rewards = token_rewards - beta * k1_RL
            seq_rewards = rewards_R - beta * k1_RL.sum(1)
        dropped = 0
        if a.dynamic_sampling:
            keep_B, dropped = filter_degenerate_groups(seq_rewards, G)
            mask = mask & np.repeat(keep_B, G)[:, None]
            valid = valid & np.repeat(keep_B, G)
        advantages = compute_advantages(config, seq_rewards, valid, token_rewards, mask, greedy_R)
        # 5. Update: epochs × minibatches of whole groups, shuffled.
        t0 = time.perf_counter()
        batch = {**arrays, "mask": mask, "advantages": advantages, "old_logps": old_logps.astype(np.float32),
                 "ref_logps": ref_logps.astype(np.float32)}
        rng = np.random.default_rng([config.seed, step])
        mb_metrics = []
        for epoch in range(a.num_epochs):
            for j, rows in enumerate(rollout.group_minibatches(rng, B, G, a.num_minibatches)):
                mb = {key: v[rows] for key, v in batch.items()}
                mb["on_policy"] = np.full(len(rows), epoch == 0 and j == 0)
                state, met = update(state, parallel.shard_global_batch(mb, mesh))
                mb_metrics.append(met)
        jax.block_until_ready(state.params)
        update_s = time.perf_counter() - t0
        # KL controller and metrics.
        resp_mask = np.asarray(samples.response_mask_RM)
        lengths = resp_mask.sum(1)
        seq_kl = kl_RL.sum(1)
        if k.adaptive and needs_ref:
            run_state.beta = float(adaptive_kl_coef(beta, float(seq_kl.mean()), R, target=k.target,
                                                     horizon=k.horizon))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            met = {key: float(np.mean([float(x[key]) for x in mb_metrics])) for key in mb_metrics[0]}
            met.update({**reward_metrics,
                        "advantages/mean": float(advantages[mask].mean()) if mask.any() else 0.0,
                        "advantages/std": float(advantages[mask].std()) if mask.any() else 0.0,
                        "response_length/mean": float(lengths.mean()),
                        "response_length/min": float(lengths.min()),
                        "response_length/max": float(lengths.max()),
                        "response_length/clipped_frac": float(truncated.mean()),
                        "kl/beta": beta, "groups/dropped": float(dropped),
                        "rollout_tokens/s": float(resp_mask.sum()) / rollout_s,
                        "update_tokens/s": float(np.asarray(arrays["attention_mask"]).sum())
                        * a.num_epochs / update_s,
                        "time/rollout_s": rollout_s, "time/score_s": score_s, "time/reference_s": ref_s,
                        "time/update_s": update_s})
            for name, v in extra.items():
                met[f"reward/{name}"] = float(np.mean(v))
            if needs_ref:
                x = kl_RL
                k3 = np.where(resp_RL, rollout.k3_terms(x), 0.0)
                met.update({"kl/k1": float(seq_kl.mean()), "kl/k2": float((0.5 * x * x).sum(1).mean()),
                            "kl/k3": float(k3.sum(1).mean())})
            history.append({"step": done, **loop.log_train(writer, done, met, bar, show=("reward/mean", "kl/k1"))})
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, evaluate(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, run_state.state())
    checkpointer.close()
    done = int(state.step) // updates_per_step
    if loop.stopped_early(done, t.num_steps):
        writer.close()
        return {"stopped_at": done, "history": history, "state": state, "mesh": mesh}

    # --- Final eval, best-of-N of the reference on the same prompts, summary, plot, export.
    final = evaluate(state.params)
    writer.write(done, final, prefix="eval")
    writer.close()
    points = [{"step": r["step"], **{key.split("/", 1)[1]: v for key, v in r.items() if key.startswith("eval/")}}
              for r in metrics_lib.read_metrics(workdir) if any(key.startswith("eval/") for key in r)]
    curve = []
    if e.best_of_n_max_n:
        curve = rollout.best_of_n_points(ref_model, ref_params, eval_p, score, sampling, e.best_of_n_max_n,
                                         config.seed, mesh)
    cols = ["step", "reward", "kl_k1", "kl_k3", "sqrt_kl"] + sorted({c for p in points for c in p
                                                                     if c.startswith("reward/")})
    print(f"\neval points on {len(eval_p['tokens'])} held-out prompts × {e.samples_per_prompt} samples "
          f"({reward_name}; KL in nats per response)")
    print(metrics_lib.format_table(points, cols))
    if curve:
        print("\nbest-of-N of the reference on the same prompts (KL bound log N − (N−1)/N)")
        print(metrics_lib.format_table(curve, list(curve[0])))
    if tokenizer is not None and e.show:
        rollout.show_samples(policy, state.params, eval_p, score, sampling, tokenizer, e.show, config.seed)
    summary = {"final": final, "points": points, "best_of_n": curve, "reward": reward_name,
               "history": history[-1:] if history else []}
    if e.plot and points:
        path = os.path.join(workdir, "reward_vs_kl.png")
        rollout.plot_reward_vs_kl(path, points, curve, reward_name, f"{a.advantage}, KL {k.placement} β={k.beta:g}")
        print(f"plot: {path}")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "rl.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if config.export:
        out_dir = os.path.join(workdir, EXPORT_DIR)
        host = parallel.to_host(state.params)  # collective on a pod: every process gathers
        if jax.process_index() == 0:  # one writer of the shared export folder
            jaxreward.save_pretrained(out_dir, policy.config, host, tokenizer)
        print(f"policy saved to {out_dir} (HF format)")
    return {"final": final, "points": points, "best_of_n": curve, "history": history, "state": state,
            "mesh": mesh, "summary": summary}
