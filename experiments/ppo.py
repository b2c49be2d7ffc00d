"""PPO with a value model (configs/ppo.py).

    python -m jaxreward.main --config=configs/ppo.py:synthetic --workdir=DIR

The RLHF PPO of "Fine-Tuning Language Models from Human Preferences"
(Ziegler et al., 2019) and "Training language models to follow instructions
with human feedback" (Ouyang et al., 2022): a policy and a separate critic
(`ValueModel`: our decoder + a per-token scalar head), each with its own
optimizer, train state and sharded step. One step, in this order (each part
is a block of `run` below):

1. **Rollout.** The prompt sampler gives B prompts (each once per epoch);
   `generate` samples G completions of each (R = B·G rows) with the
   behaviour log-probs.
2. **Score.** The reward function maps the completions to float32 `[R]`
   (the synthetic proxy or gold reward, an exported reward model, or
   registered Python rewards of the text). A completion cut off at
   `max_new_tokens` without EOS is scored as is, given
   `reward.truncated_penalty`, or masked out (`reward.truncated`).
3. **Reference, values.** Log-probs of the frozen reference on the rollout,
   and one forward of the value model: on the log-prob grid (`logps[r, t]`
   is the log-prob of token t+1) the state before token t+1 is tokens[:t+1],
   whose value is the value model's output at position t, so
   `values[r, t]` sits beside `logps[r, t]`.
4. **Rewards, advantages.** Per-token rewards: the sequence reward on the
   last response token (none for an empty response) minus β·k1 per token
   (KL in the reward; β fixed or adaptive). GAE with γ, λ (registry
   `token_advantage` "gae") gives advantages and value targets (returns);
   the advantages are whitened over the valid tokens (`algorithm.whiten_advantages`).
5. **Update.** `num_epochs` passes over `num_minibatches` shuffled
   minibatches of whole groups; each minibatch is one policy step (registry
   `policy_loss`, PPO clip) and one value step (`value_loss`, clipped by
   `algorithm.value_clip` around the rollout's values). The first minibatch
   of the first epoch is on-policy (old log-probs = the current ones under
   stop_gradient); later ones use the behaviour log-probs, recomputed with
   the training forward when `recompute_old_logps` asks for it.

With `model.prefix_sharing` (the default) every forward over the rollout
(reference, values, recomputed log-probs, both updates) packs each group of
G completions into one row `[prompt | completion 1 | ... | completion G]`,
so the prompt is encoded once per group (`scoring.group_token_logps`,
`heads.group_values`); the numbers are those of one row per completion.

Eval points (start, every `train.eval_every`, end) as in policy_gradient.py:
reward and KL(π‖π_ref) of policy samples on held-out prompts, plotted against
√KL beside best-of-N of the reference (`reward_vs_kl.png`).

Writes `metrics.jsonl` (train/*, eval/*), `tensorboard/`, `checkpoints/`
(policy and value states with their optimizers, prompt sampler, KL β),
`ppo.json` (summary), `reward_vs_kl.png`, `proxy_reward_model/` (synthetic)
and `policy/` (HF).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

import jaxreward
from jaxreward import parallel
from jaxreward.data.prompts import PromptSampler
from jaxreward.errors import UserError
from jaxreward.models.llama import Decoder
from jaxreward.models.heads import group_values
from jaxreward.models.scoring import shift_mask
from jaxreward.objectives import registry
from jaxreward.objectives.kl import adaptive_kl_coef
from jaxreward.objectives.masking import masked_whiten
from jaxreward.objectives.policy_gradient import aggregation_normalizers, value_loss
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, rollout
from jaxreward.train import evaluate as evaluate_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib

sg = jax.lax.stop_gradient
EXPORT_DIR = "policy"


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
    defaults.check_choice(config, "algorithm.policy_loss", tuple(registry.names("policy_loss")))
    defaults.check_choice(config, "algorithm.loss_agg_mode", tuple(registry.names("aggregation")))
    defaults.check_float(config, "algorithm.clip_eps", 0.0, low_open=True)
    if a.clip_eps_high is not None:
        defaults.check_float(config, "algorithm.clip_eps_high", 0.0, low_open=True)
    defaults.check_float(config, "algorithm.value_clip", 0.0)
    defaults.check_float(config, "algorithm.gamma", 0.0, 1.0)
    defaults.check_float(config, "algorithm.lam", 0.0, 1.0)
    defaults.check_choice(config, "algorithm.whiten_advantages", (True, False))
    for name in ("num_epochs", "num_minibatches"):
        defaults.check_int(config, f"algorithm.{name}", 1)
    defaults.check_choice(config, "algorithm.recompute_old_logps", ("auto", "always", "never"))
    defaults.check_enough_prompts(config)  # before the model loads: counts the prompt file's lines
    if ro.prompts_per_step % a.num_minibatches:
        raise defaults.ConfigError(f"config field algorithm.num_minibatches: {a.num_minibatches} does not "
                                   f"divide rollout.prompts_per_step={ro.prompts_per_step} (minibatches "
                                   "hold whole groups)")
    defaults.check_choice(config, "model.prefix_sharing", (True, False))
    if config.model.prefix_sharing and config.reference.batch_size % ro.group_size:
        raise defaults.ConfigError(f"config field reference.batch_size: {config.reference.batch_size} is not a "
                                   f"multiple of rollout.group_size={ro.group_size} (with model.prefix_sharing "
                                   "a reference / value forward packs whole groups)")
    rollout.check_value_config(config)
    vo = "value_optimizer"
    defaults.check_float(config, f"{vo}.learning_rate", 0.0, low_open=True)
    defaults.check_int(config, f"{vo}.warmup_steps", 0)
    defaults.check_float(config, f"{vo}.final_lr_ratio", 0.0, 1.0)
    defaults.check_float(config, f"{vo}.b1", 0.0, 1.0, high_open=True)
    defaults.check_float(config, f"{vo}.b2", 0.0, 1.0, high_open=True)
    defaults.check_float(config, f"{vo}.eps", 0.0, low_open=True)
    defaults.check_float(config, f"{vo}.weight_decay", 0.0)
    defaults.check_float(config, f"{vo}.max_grad_norm", 0.0)
    defaults.check_float(config, "kl.beta", 0.0)
    defaults.check_choice(config, "kl.adaptive", (True, False))
    defaults.check_choice(config, "kl.measure", (True, False))
    if k.adaptive:
        if k.beta <= 0:
            raise defaults.ConfigError("config field kl.beta: the adaptive controller scales β, so it must "
                                       f"start > 0, got {k.beta!r}")
        defaults.check_float(config, "kl.target", 0.0, low_open=True)
        defaults.check_float(config, "kl.horizon", 0.0, low_open=True)
    defaults.check_int(config, "eval.samples_per_prompt", 1)
    defaults.check_best_of_n_max_n(config)
    defaults.check_choice(config, "eval.plot", (True, False))
    defaults.check_int(config, "eval.show", 0)
    defaults.check_choice(config, "export", (True, False))


# ----------------------------------------------------------------------------- the update


def make_policy_loss_fns(config: ml_collections.ConfigDict, max_len: int, logps_fn):
    """`(loss_fn, metrics_fn, totals_fn)` of the policy step for `step.make_train_step`.

    `logps_fn(params, mb) -> float32 [R, L]` gives the policy's log-probs on
    the log-prob grid (the driver's: `rollout.rollout_logps` of the Decoder,
    on packed groups with `model.prefix_sharing`; a test's: a table). The minibatch holds `tokens`, `attention_mask`, `positions`
    `[R, L]`, `mask` bool `[R, L]` (response tokens on the log-prob grid,
    minus masked rows), `advantages`, `old_logps`, `ref_logps` float32
    `[R, L]` and `on_policy` bool `[R]`.
    """
    a = config.algorithm
    policy_loss = registry.get("policy_loss", a.policy_loss)
    clip_high = a.clip_eps if a.clip_eps_high is None else a.clip_eps_high

    def totals_fn(batch):
        return aggregation_normalizers(batch["mask"])

    def loss_fn(params, mb, rng, totals):
        del rng  # deterministic forward
        logps = logps_fn(params, mb)
        mask = mb["mask"]
        # On-policy: π_old = π exactly (ratio 1, gradient ∇log π); else the behaviour log-probs.
        old = jnp.where(mb["on_policy"][:, None], sg(logps), mb["old_logps"])
        loss, _ = policy_loss(logps, old, mb["advantages"], mask, clip_eps=a.clip_eps, clip_eps_high=clip_high,
                              loss_agg_mode=a.loss_agg_mode, num_tokens=totals["num_tokens"],
                              num_seqs=totals["num_seqs"], max_len=max_len)
        # Per-row sums for metrics (merged over micro-batches, then averaged per token).
        outputs = rollout.update_row_stats(logps, old, mb["advantages"], mb["ref_logps"], mask, a.clip_eps,
                                           clip_high)
        return loss, outputs

    def metrics_fn(outputs, batch):
        return rollout.update_metrics(outputs, config.kl.beta > 0 or config.kl.measure)

    return loss_fn, metrics_fn, totals_fn


def make_value_loss_fns(config: ml_collections.ConfigDict, max_len: int, values_fn):
    """`(loss_fn, metrics_fn, totals_fn)` of the value step for `step.make_train_step`.

    `values_fn(params, mb) -> float32 [R, L]` gives the value of the state
    before each token of the log-prob grid (the driver's: the `ValueModel`
    forward, or `heads.group_values` with `model.prefix_sharing`; a test's:
    a table). The loss is `value_loss` (½·max((V − R)²,
    (V_clip − R)²), V_clip within `algorithm.value_clip` of the rollout's
    values; unclipped when it is 0), aggregated like the policy loss over the
    minibatch's `mask`, with `returns` and `old_values` float32 `[R, L]`.
    """
    a = config.algorithm
    clip = a.value_clip or None

    def totals_fn(batch):
        return aggregation_normalizers(batch["mask"])

    def loss_fn(params, mb, rng, totals):
        del rng
        values, mask = values_fn(params, mb), mb["mask"]
        loss, _ = value_loss(values, mb["old_values"], mb["returns"], mask, clip_eps=clip,
                             loss_agg_mode=a.loss_agg_mode, num_tokens=totals["num_tokens"],
                             num_seqs=totals["num_seqs"], max_len=max_len)
        if clip is None:
            clipped = jnp.zeros(mask.shape, bool)
        else:  # the clipped error is the larger one (as in value_loss)
            v_clip = mb["old_values"] + jnp.clip(values - mb["old_values"], -clip, clip)
            clipped = jnp.square(v_clip - mb["returns"]) > jnp.square(values - mb["returns"])
        rowsum = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=1)
        return loss, {"tokens": rowsum(jnp.ones_like(values)), "clipped": rowsum(clipped.astype(jnp.float32))}

    def metrics_fn(outputs, batch):
        return {"clipfrac": outputs["clipped"].sum() / jnp.maximum(outputs["tokens"].sum(), 1.0)}

    return loss_fn, metrics_fn, totals_fn


def token_rewards(rewards_R, k1_RL, mask_RL, beta: float) -> np.ndarray:
    """float32 `[R, L]`: each row's reward on its last response token (none
    for an empty response, which has no token to carry it) minus β·k1 per
    response token (KL in the reward, Ziegler et al., 2019); 0 elsewhere."""
    mask = np.asarray(mask_RL, bool)
    R, L = mask.shape
    out = np.zeros((R, L), np.float32)
    ends = L - 1 - np.argmax(mask[:, ::-1], axis=1)  # last response token (any column if empty)
    out[np.arange(R), ends] = np.where(mask.any(1), np.asarray(rewards_R, np.float32), 0.0)
    return np.where(mask, out - np.float32(beta) * np.asarray(k1_RL, np.float32), 0.0).astype(np.float32)


def advantages_and_returns(config, rewards_RL, values_RL, mask_RL) -> tuple[np.ndarray, np.ndarray]:
    """GAE (registry `token_advantage` "gae", γ = `algorithm.gamma`, λ =
    `algorithm.lam`; every response terminates, so nothing is bootstrapped):
    advantages (whitened over the valid tokens when
    `algorithm.whiten_advantages`) and the value targets (returns = the GAE
    advantages + values, unwhitened), float32 `[R, L]`, 0 at masked slots."""
    a = config.algorithm
    adv, returns = _gae(jnp.asarray(rewards_RL, jnp.float32), jnp.asarray(values_RL, jnp.float32),
                        jnp.asarray(mask_RL, bool), gamma=float(a.gamma), lam=float(a.lam),
                        whiten=bool(a.whiten_advantages))
    return np.asarray(adv, np.float32), np.asarray(returns, np.float32)


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten"))
def _gae(rewards_RL, values_RL, mask_RL, *, gamma: float, lam: float, whiten: bool):
    # Jitted once per (shape, γ, λ): eagerly, the reverse scan would compile anew at every call.
    adv, returns = registry.get("token_advantage", "gae")(rewards_RL, values_RL, mask_RL, gamma=gamma, lam=lam)
    return (masked_whiten(adv, mask_RL) if whiten else adv), returns


def update(policy_step, value_step, state, value_state, batch: dict, config, step: int, mesh):
    """`num_epochs` passes over `num_minibatches` shuffled minibatches of
    whole groups (`rollout.group_size` contiguous rows), each one policy step
    and one value step on the same rows. The first minibatch of the first
    epoch is on-policy. Returns both states and each step's metrics (the
    value step's prefixed `value/`)."""
    a, G = config.algorithm, config.rollout.group_size
    R = len(batch["mask"])
    rng = np.random.default_rng([config.seed, step])
    out = []
    for epoch in range(a.num_epochs):
        for j, rows in enumerate(rollout.group_minibatches(rng, R // G, G, a.num_minibatches)):
            mb = {key: v[rows] for key, v in batch.items()}
            mb["on_policy"] = np.full(len(rows), epoch == 0 and j == 0)
            mb = parallel.shard_global_batch(mb, mesh)
            state, met = policy_step(state, mb)
            value_state, vmet = value_step(value_state, mb)
            out.append({**met, **{f"value/{key}": x for key, x in vmet.items()}})
    return state, value_state, out


@flax.struct.dataclass
class PPOState:
    """The policy's and the value model's train states, checkpointed and
    restored together; `step` counts rollouts (each takes `updates_per_step`
    optimizer steps of both)."""
    policy: state_lib.TrainState
    value: state_lib.TrainState
    updates_per_step: int = flax.struct.field(pytree_node=False, default=1)

    @property
    def step(self):
        return self.policy.step // self.updates_per_step


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
    print(f"policy {m.pretrained or 'random model.arch'}: {cfg.num_params():,} params; PPO "
          f"({a.policy_loss} loss, {a.loss_agg_mode}), GAE γ={a.gamma:g} λ={a.lam:g}, KL in the reward "
          f"β={k.beta:g}{' (adaptive)' if k.adaptive else ''}")
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

    # --- The value model (critic): from the reward model, the policy, or value.path.
    value_model, value_params = rollout.value_model_init(config, workdir, cfg, base_params, tokenizer)
    print(f"value model ({config.value.init}{': ' + config.value.path if config.value.init == 'path' else ''}): "
          f"{value_model.config.num_params():,} params")

    # --- Two sharded steps and states (policy, value), prompt sampler.
    updates_per_step = a.num_epochs * a.num_minibatches
    steps_total = loop.schedule_steps(t) * updates_per_step
    init_tokens = jnp.zeros((1, 2), jnp.int32)
    tb = config.policy.trainable_blocks
    policy = Decoder(cfg, frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    boxed = jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0), init_tokens))["params"]
    tx, schedule = state_lib.make_optimizer(config.optimizer, steps_total,
                                            state_lib.block_trainable(cfg.num_layers, tb))
    vcfg, vtb = value_model.config, config.value.trainable_blocks
    vboxed = jax.eval_shape(lambda: value_model.init(jax.random.PRNGKey(0), init_tokens))["params"]
    vtx, vschedule = state_lib.make_optimizer(config.value_optimizer, steps_total,
                                              state_lib.block_trainable(vcfg.num_layers, vtb),
                                              name="value_optimizer")
    shardings = PPOState(step_lib.state_shardings(mesh, boxed, tx), step_lib.state_shardings(mesh, vboxed, vtx),
                         updates_per_step)

    # With prefix sharing every forward over rollout rows packs whole groups (prompt once).
    packing = (G if m.prefix_sharing else 1, ro.max_new_tokens)
    P = lambda mb: mb["tokens"].shape[1] - ro.max_new_tokens

    policy_logps = functools.partial(rollout.rollout_logps, policy, temperature=ro.temperature, top_k=ro.top_k,
                                     top_p=ro.top_p, group_size=packing[0], max_new_tokens=packing[1])

    def values(params, mb):
        if packing[0] > 1:
            return group_values(value_model, params, mb["tokens"], mb["attention_mask"], mb["positions"],
                                P(mb), G)
        return value_model.apply({"params": params}, mb["tokens"], mb["attention_mask"], mb["positions"])

    ploss, pmetrics, ptotals = make_policy_loss_fns(config, ro.max_new_tokens, policy_logps)
    policy_step = step_lib.make_train_step(ploss, pmetrics, tx, schedule, mesh, shardings.policy,
                                           micro_batches=t.micro_batches, totals_fn=ptotals)
    vloss, vmetrics, vtotals = make_value_loss_fns(config, ro.max_new_tokens, values)
    value_step = step_lib.make_train_step(vloss, vmetrics, vtx, vschedule, mesh, shardings.value,
                                          micro_batches=t.micro_batches, totals_fn=vtotals)
    policy_logps_fn = rollout.logps_fn(policy, *process)   # eval points: not groups of G
    group_policy_fn = rollout.logps_fn(policy, *process, *packing)
    group_ref_fn = rollout.logps_fn(ref_model, *process, *packing)
    values_fn = jax.jit(values)
    run_state = rollout.RunState(PromptSampler(len(train_p["tokens"]), B, config.seed), k.beta)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_states = jax.jit(lambda p, v: PPOState(state_lib.init_state(p, tx, config.seed),
                                                state_lib.init_state(v, vtx, config.seed + 1), updates_per_step),
                          out_shardings=shardings)
    states, _ = loop.restore_or_init(checkpointer, make_states, (base_params, value_params), shardings, run_state)
    state, value_state = states.policy, states.value
    del value_params
    reuse = updates_per_step > 1
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

    # --- Train: rollout, score, reference and values, rewards and advantages, update.
    start, stop = int(state.step) // updates_per_step, loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    if start == 0:
        writer.write(0, evaluate(state.params), prefix="eval")
    history = []
    bar = tqdm.trange(start, stop, desc="ppo", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        # 1. Rollout: B prompts, G completions each.
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
        score_s = time.perf_counter() - t0
        # 3. Reference log-probs, behaviour log-probs on the training grid, values (one forward).
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
        # values[r, t] = V(tokens[:t+1]), the state before token t+1, whose log-prob is logps[r, t].
        old_values = np.where(mask, evaluate_lib.score_all_rows(values_fn, value_state.params, arrays, ref_bs,
                                                                mesh, multiple_of=packing[0]), 0.0)
        ref_s = time.perf_counter() - t0
        # 4. Per-token rewards (KL in the reward), GAE advantages and returns.
        beta = run_state.beta
        k1_RL = np.where(mask, old_logps - ref_logps, 0.0).astype(np.float32)
        # KL of the policy's samples (metrics, adaptive β): all of them, also those out of the loss.
        kl_RL = np.where(resp_RL, old_logps - ref_logps, 0.0).astype(np.float32)
        rewards_RL = token_rewards(rewards_R, k1_RL, mask, beta)
        advantages, returns = advantages_and_returns(config, rewards_RL, old_values, mask)
        # 5. Update: epochs × minibatches of whole groups, each a policy step and a value step.
        t0 = time.perf_counter()
        batch = {**arrays, "mask": mask, "advantages": advantages, "old_logps": old_logps.astype(np.float32),
                 "ref_logps": ref_logps.astype(np.float32), "returns": returns,
                 "old_values": old_values.astype(np.float32)}
        state, value_state, mb_metrics = update(policy_step, value_step, state, value_state, batch, config,
                                                step, mesh)
        jax.block_until_ready((state.params, value_state.params))
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
                        "returns/mean": float(returns[mask].mean()) if mask.any() else 0.0,
                        "value/mean": float(old_values[mask].mean()) if mask.any() else 0.0,
                        "value/explained_variance": rollout.explained_variance(old_values, returns, mask),
                        "response_length/mean": float(lengths.mean()),
                        "response_length/min": float(lengths.min()),
                        "response_length/max": float(lengths.max()),
                        "response_length/clipped_frac": float(truncated.mean()),
                        "kl/beta": beta,
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
            history.append({"step": done, **loop.log_train(
                writer, done, met, bar, show=("reward/mean", "kl/k1", "value/loss"),
                # A diverged value model makes the advantages, then the policy, NaN: name it first.
                finite=(("value/loss", "value_optimizer.learning_rate"), ("loss", "optimizer.learning_rate")))})
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, evaluate(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, PPOState(state, value_state, updates_per_step), run_state.state(),
                              lr_fields=(("value", "value_optimizer.learning_rate"),
                                         ("", "optimizer.learning_rate")))
    checkpointer.close()
    if loop.stopped_early(int(state.step) // updates_per_step, t.num_steps):
        writer.close()
        return {"stopped_at": int(state.step) // updates_per_step, "history": history, "state": state,
                "value_state": value_state, "mesh": mesh}

    # --- Final eval, best-of-N of the reference on the same prompts, summary, plot, export.
    final_step = int(state.step) // updates_per_step
    final = evaluate(state.params)
    writer.write(final_step, final, prefix="eval")
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
        rollout.plot_reward_vs_kl(path, points, curve, reward_name, f"PPO, KL in the reward β={k.beta:g}")
        print(f"plot: {path}")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "ppo.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if config.export:
        out_dir = os.path.join(workdir, EXPORT_DIR)
        host = parallel.to_host(state.params)  # collective on a pod: every process gathers
        if jax.process_index() == 0:  # one writer of the shared export folder
            jaxreward.save_pretrained(out_dir, policy.config, host, tokenizer)
        print(f"policy saved to {out_dir} (HF format)")
    return {"final": final, "points": points, "best_of_n": curve, "history": history, "state": state,
            "value_state": value_state, "mesh": mesh, "summary": summary}
