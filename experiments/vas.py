"""Value-augmented sampling (configs/vas.py).

    python -m jaxreward.main --config=configs/vas.py:synthetic --workdir=DIR

"Value Augmented Sampling for Language Model Alignment and Personalization"
(Han et al., 2024): the policy stays frozen; a token value model learns, from
the policy's own samples, the expected reward of finishing a prefix with the
policy, and decoding re-weights the policy's top-k tokens by it. The job, in
the order of `run` below:

1. **Samples.** The frozen policy samples `rollout.samples_per_prompt`
   completions of every train prompt (and of every eval prompt, for the
   value diagnostics); the reward function scores them (the synthetic gold
   or proxy reward, an exported reward model, or registered Python rewards
   of the text), and a second reward when `compose.kind` asks for one. All
   of it is stored in `<workdir>/samples.npz` under a key over the policy's
   weights, the prompts, the sampling settings and the reward config, and
   reused on resume and by other value-model runs (`rollout.samples_path`);
   a file written for anything else is refused.
2. **Value model(s).** A `ValueModel` (decoder + per-token scalar head, head
   zero at init) from the policy, a reward-model export or another
   checkpoint with the same tokenizer (`value.init`). It is trained by TD(λ)
   on the "value grid" of each sample: the columns from the last prompt
   token to the last response token, where `values[r, t]` = V(tokens[:t+1]),
   the state after token t. The reward sits on the last response token and
   the state after it is terminal, so the λ-return is

       G_t = γ·((1 − λ)·V(s_{t+1}) + λ·G_{t+1}),   G_last = r

   (the GAE returns of `objectives.advantages.gae_advantages`; λ = 1 gives
   the Monte-Carlo return r at every position). As in the paper's code, the
   targets of an epoch (`len(samples) // data.batch_size` steps) are computed
   once from the values at its start (and stored, so a resumed run uses the
   same ones), then regressed with ½·(V − G)² averaged over the grid tokens
   of the batch, through the sharded step factory.
3. **Value diagnostics** on the held-out samples: V at the prompt's last
   token (the value before the first response token) against the realized
   reward (MSE, correlation), V at the last token against r, and the
   explained variance of the Monte-Carlo returns.
4. **Value-guided decoding** (`sampling.value_guided`) on the eval prompts
   for each β of `guide.betas`: mean reward (and gold reward), the exact
   KL(guided ‖ base) per sequence (standard errors over prompts,
   `prompt_standard_error`), decode seconds and the value-model tokens
   spent; beside best-of-N of the frozen policy picked by the same reward
   (N = 1, 2, 4, …, `eval.best_of_n_max_n`, a power of two), with its reward-model tokens
   and seconds, and the plot `reward_vs_kl.png` (reward against √KL).
5. **Composition** (`compose.kind`): the second value model's β₂ beside the
   first's β₁ on a grid, Σ_i β_i·(V_i − mean V_i), no retraining; both
   rewards per grid point and `compose.png`.

Writes `samples.npz`, `<name>/metrics.jsonl` + `<name>/tensorboard/` per value model
(`value`, and `value_b` when composing),
`checkpoints/<name>/`, `td_targets/<name>/epoch_<e>.npy`, `vas.json`,
`reward_vs_kl.png` and `compose.png`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import parallel, rewards
from jaxreward.data.pipeline import tokenizer_fingerprint
from jaxreward.errors import UserError
from jaxreward.models import ensemble as ensemble_lib
from jaxreward.models.scoring import shift_mask
from jaxreward.objectives import registry
from jaxreward.objectives.policy_gradient import aggregation_normalizers, value_loss
from jaxreward.sampling.sampler import generate
from jaxreward.sampling.value_guided import guided_generate, vas_guide
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop, rollout
from jaxreward.train import evaluate as evaluate_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import preference as pref
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib

SAMPLES_FILE = "samples.npz"
# Decode-time settings: a finished (or resumed) workdir re-decodes under new
# values with the value models it trained (jaxreward.main checks the rest).
RESUMABLE_CHANGES = ("guide", "compose.betas", "eval")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    d, ro, g, c = config.data, config.rollout, config.guide, config.compose
    rollout.check_prompts_and_reward(config)
    defaults.check_choice(config, "compose.kind", ("", "second_gold") if d.source == "synthetic" else ("", "text"))
    if c.kind == "text":
        try:
            rewards.combine(c.functions)
        except (ValueError, KeyError, TypeError) as e:
            raise defaults.ConfigError(f"config field compose.functions: {e}") from None
    for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
        defaults.check_int(config, f"rollout.{name}", 1)
    defaults.check_enough_prompts(config, "data.batch_size", per_prompt="rollout.samples_per_prompt",
                                  cap="data.num_prompts")  # before the model loads
    defaults.check_float(config, "rollout.temperature", 0.0, low_open=True)
    if ro.top_k != 0 or ro.top_p != 1.0:
        raise defaults.ConfigError("config fields rollout.top_k / rollout.top_p: keep 0 / 1; guided decoding "
                                   "takes its own top-k (guide.k) of the temperature-scaled policy")
    if ro.samples_path:
        defaults.check_path(config, "rollout.samples_path")
    rollout.check_value_config(config)
    defaults.check_float(config, "value.lam", 0.0, 1.0)
    defaults.check_float(config, "value.gamma", 0.0, 1.0)
    defaults.check_int(config, "guide.k", 1)
    defaults.check_int(config, "guide.samples_per_prompt", 1)
    for field, betas in (("guide.betas", g.betas), ("compose.betas", c.betas)):
        if (not isinstance(betas, (tuple, list)) or not betas
                or not all(isinstance(b, (int, float)) and math.isfinite(b) and b >= 0 for b in betas)):
            raise defaults.ConfigError(f"config field {field}: a non-empty tuple of finite β >= 0, got {betas!r}")
    defaults.check_best_of_n_max_n(config)
    defaults.check_choice(config, "eval.plot", (True, False))
    defaults.check_int(config, "eval.show", 0)


# ----------------------------------------------------------------------------- TD(λ) value learning


def value_grid(loss_mask_RL) -> np.ndarray:
    """bool `[R, L]`: the states a value model learns, from the last prompt
    token (the state before the first response token) to the last response
    token (the complete sequence). `loss_mask_RL` marks the response tokens."""
    loss_mask = np.asarray(loss_mask_RL, bool)
    return loss_mask | np.asarray(shift_mask(loss_mask))


def token_rewards(rewards_R, grid_RL) -> np.ndarray:
    """float32 `[R, L]`: each row's reward at its last grid position (the
    complete sequence), 0 elsewhere."""
    grid = np.asarray(grid_RL, bool)
    R, L = grid.shape
    out = np.zeros((R, L), np.float32)
    last = L - 1 - np.argmax(grid[:, ::-1], axis=1)
    out[np.arange(R), last] = np.where(grid.any(1), np.asarray(rewards_R, np.float32), 0.0)
    return out


@functools.partial(jax.jit, static_argnames=("gamma", "lam"))
def td_lambda_targets(rewards_RL, values_RL, grid_RL, *, gamma: float, lam: float):
    """TD(λ) targets float32 `[R, L]` on the value grid, 0 elsewhere.

    G_t = r_t + γ·((1 − λ)·V_{t'} + λ·G_{t'}) with t' the next grid position
    and G = 0 after the last (terminal); with the reward only on the last
    position, G_last = r. These are the GAE returns (advantages + values) of
    `gae_advantages` (Schulman et al., 2016); λ = 1 gives r everywhere.
    """
    _, returns = registry.get("token_advantage", "gae")(rewards_RL, values_RL, grid_RL, gamma=gamma, lam=lam)
    return returns


def make_value_loss_fns(values_fn):
    """`(loss_fn, metrics_fn, totals_fn)` of the value step for `step.make_train_step`.

    `values_fn(params, mb) -> float32 [R, L]` (the driver's: the `ValueModel`
    forward; a test's: a table). The batch holds `grid` bool `[R, L]` and
    `targets` float32 `[R, L]`; the loss is ½·(V − G)² averaged over all grid
    tokens of the whole batch (normalizer from `totals_fn`, so micro-batches
    sum to the one-shot loss). Metrics: `explained_variance` of the targets.
    """
    def totals_fn(batch):
        return aggregation_normalizers(batch["grid"])

    def loss_fn(params, mb, rng, totals):
        del rng
        values, grid, targets = values_fn(params, mb), mb["grid"], mb["targets"]
        loss, _ = value_loss(values, targets, targets, grid, clip_eps=None, loss_agg_mode="token-mean",
                             num_tokens=totals["num_tokens"], num_seqs=totals["num_seqs"],
                             max_len=grid.shape[1])
        err = jnp.where(grid, targets - values, 0.0)
        tgt = jnp.where(grid, targets, 0.0)
        return loss, {"n": grid.sum(1).astype(jnp.float32), "err": err.sum(1), "err2": (err * err).sum(1),
                      "tgt": tgt.sum(1), "tgt2": (tgt * tgt).sum(1)}

    def metrics_fn(outputs, batch):
        n = jnp.maximum(outputs["n"].sum(), 1.0)
        var = lambda s, s2: s2.sum() / n - jnp.square(s.sum() / n)
        var_t = var(outputs["tgt"], outputs["tgt2"])
        ev = jnp.where(var_t > 0, 1.0 - var(outputs["err"], outputs["err2"]) / jnp.maximum(var_t, 1e-12), 0.0)
        return {"explained_variance": ev}

    return loss_fn, metrics_fn, totals_fn


def value_diagnostics(values_RL, rewards_R, grid_RL) -> dict:
    """How well values predict the realized rewards of held-out samples.

    `first_*`: V at the first grid position (the prompt; its expected reward
    under the policy) against r; `last_*`: V of the complete sequence (its
    target is r itself); `explained_variance`: of the Monte-Carlo returns (r
    at every grid position) by V over all grid tokens.
    """
    values, grid = np.asarray(values_RL, np.float64), np.asarray(grid_RL, bool)
    r = np.asarray(rewards_R, np.float64)
    R, L = grid.shape
    first = values[np.arange(R), np.argmax(grid, axis=1)]
    last = values[np.arange(R), L - 1 - np.argmax(grid[:, ::-1], axis=1)]
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    mc = np.broadcast_to(r[:, None], grid.shape)
    return {"first_mse": float(np.mean((first - r) ** 2)), "first_corr": corr(first, r),
            "last_mse": float(np.mean((last - r) ** 2)), "last_corr": corr(last, r),
            "explained_variance": rollout.explained_variance(values, mc, grid),
            "reward_mean": float(r.mean()), "reward_var": float(r.var())}


# ----------------------------------------------------------------------------- samples and rewards


def second_reward(config, task, tokenizer):
    """`(fn(samples, ids, split) -> float32 [R], name)` of `compose.kind`, or None.

    "second_gold": the gold reward of a second hidden weight vector (another
    user's preference over the same tokens; `CountingTask` seeded seed + 1000).
    "text": registered Python rewards of the completion text, weighted.
    """
    c = config.compose
    if not c.kind:
        return None
    if c.kind == "second_gold":
        import dataclasses
        other = dataclasses.replace(task, seed=task.seed + 1000)
        return (lambda s, ids, split: other.gold_reward(np.asarray(s.response_tokens_RM),
                                                        np.asarray(s.response_mask_RM))), "second gold reward"
    score = rollout.text_reward_fn(c.functions, tokenizer)
    return (lambda s, ids, split: score(s, ids, split)[0]), " + ".join(f"{w:g}·{name}" for name, w, *_ in c.functions)


def sample_split(policy, params, split, score, score_b, sampling, n: int, batch_size: int, seed: int,
                 desc: str, mesh, progress: bool = True) -> dict[str, np.ndarray]:
    """`n` samples of every prompt of `split`, in calls of `batch_size`
    prompts over `mesh`'s batch shards (`rollout.sample_rollout`), with their
    rewards: `tokens`, `attention_mask`, `positions`, `loss_mask` `[S, L]`,
    `prompt_ids`, `rewards`, `extra/<name>` (e.g. the gold reward beside a
    proxy) and `rewards_b` (the composed reward) `[S]`."""
    num = len(split["tokens"])
    parts = []
    for lo in tqdm.trange(0, num, batch_size, desc=desc, leave=False, dynamic_ncols=True, disable=not progress):
        ids_B = np.arange(lo, min(lo + batch_size, num))
        samples = rollout.sample_rollout(policy, params, split["tokens"][ids_B], split["mask"][ids_B], mesh,
                                         rng=jax.random.fold_in(jax.random.PRNGKey(seed), lo), num_samples=n,
                                         **sampling)
        ids_R = np.repeat(ids_B, n)
        rew, extra = score(samples, ids_R, split)
        part = {**{k: np.asarray(v) for k, v in samples.as_dict().items() if k != "sample_logps"},
                "prompt_ids": ids_R.astype(np.int32), "rewards": np.asarray(rew, np.float32),
                **{f"extra/{k}": np.asarray(v, np.float32) for k, v in extra.items()}}
        if score_b is not None:
            part["rewards_b"] = np.asarray(score_b(samples, ids_R, split), np.float32)
        parts.append(part)
    # One prompt width for the split (prompt_set pads all prompts alike), so the parts stack.
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- the job


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    m, d, ro, v, g, c, t, e = (config.model, config.data, config.rollout, config.value, config.guide,
                               config.compose, config.train, config.eval)
    # --- The frozen policy, prompts, reward function(s).
    policy, params, tokenizer = rollout.load_policy(config, m.pretrained)
    if d.source != "synthetic" and tokenizer is None:
        raise UserError(f"model.pretrained={m.pretrained!r} has no tokenizer; text prompts need one")
    task = rollout.synthetic_task(config, policy.config.vocab_size)
    prompts = rollout.prompt_set(config, tokenizer, task)
    train_p, eval_p = prompts["train"], prompts["eval"]
    if len(train_p["tokens"]) > d.num_prompts:  # a prompt file: its first data.num_prompts train prompts
        train_p = {**{x: train_p[x][:d.num_prompts] for x in ("tokens", "mask", "texts", "sources")},
                   "columns": {x: y[:d.num_prompts] for x, y in train_p["columns"].items()}}
        prompts = {"train": train_p, "eval": eval_p}
    rollout.check_prompts_fit(config, prompts, policy)
    score, reward_name = rollout.make_reward_fn(config, workdir, task, tokenizer, policy, params, prompts)
    if config.reward.kind == "gold":  # the reward is the gold reward: no second `reward/gold` column
        score = functools.partial(lambda fn, *a: (fn(*a)[0], {}), score)
    composed = second_reward(config, task, tokenizer)
    score_b, reward_b_name = composed if composed else (None, None)
    sampling = rollout.sampling_kwargs(config, tokenizer)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    print(f"policy {m.pretrained or 'random model.arch'} (frozen): {policy.config.num_params():,} params; "
          f"reward: {reward_name}" + (f"; composed with: {reward_b_name}" if composed else ""))

    S = min(len(train_p["tokens"]), d.num_prompts) * ro.samples_per_prompt
    # After bad prompt lines were skipped (check_config counted the lines before the model loaded).
    defaults.check_enough_prompts(config, "data.batch_size", len(train_p["tokens"]),
                                  per_prompt="rollout.samples_per_prompt", cap="data.num_prompts")
    # The value model now, so a bad value.path fails before any sampling.
    value_model, init_params = rollout.value_model_init(config, workdir, policy.config, params, tokenizer)

    # --- 1. Samples of the frozen policy and their rewards (cached under a key).
    path = ro.samples_path or os.path.join(workdir, SAMPLES_FILE)
    key, meta = _samples_key(config, params, tokenizer, prompts, sampling)

    def draw():
        out = {}
        for name, split, seed in (("train", train_p, config.seed + 21), ("eval", eval_p, config.seed + 22)):
            arrays = sample_split(policy, params, split, score, score_b, sampling, ro.samples_per_prompt,
                                  ro.batch_size, seed, f"sampling {name}", mesh, t.progress_bar)
            out.update({f"{name}/{k}": x for k, x in arrays.items()})
        return out
    t0 = time.perf_counter()
    if os.path.exists(path):  # reuse, or say which settings differ (the file is never touched)
        if ro.samples_path:  # the user's file: name the field, and advice that passes check_config
            stored_key, cache = pref.read_cache(
                path, "policy samples", field="rollout.samples_path",
                advice=f"point rollout.samples_path at the {SAMPLES_FILE} of a VAS run, or set it to '' to "
                       "draw new samples")
        else:
            stored_key, cache = pref.read_cache(path, "policy samples")
        if stored_key != key:
            stored_meta = json.loads(str(cache["__meta__"])) if "__meta__" in cache else {}
            diff = [f"{k}: {stored_meta.get(k, '?')} -> {meta[k]}" for k in meta if stored_meta.get(k) != meta[k]]
            fix = ("point rollout.samples_path at samples drawn under these settings, or set it to '' to draw new "
                   "ones" if ro.samples_path else f"move {path} away to draw new samples, or use a new --workdir")
            raise pref.StaleCacheError(("config field rollout.samples_path: " if ro.samples_path else "")
                                       + f"{path} holds policy samples drawn under other settings ("
                                       + "; ".join(diff or ["unrecorded"]) + f"); {fix}")
        reused = True
    else:
        cache, reused = pref.cached_reference_logps(
            path, key, lambda: {**draw(), "__meta__": np.array(json.dumps(meta))}, what="policy samples")
    data = {s: {k.split("/", 1)[1]: x for k, x in cache.items() if k.startswith(s + "/")} for s in ("train", "eval")}
    print(f"{S} train and {len(data['eval']['tokens'])} eval samples "
          + (f"reused from {path}" if reused else f"drawn in {time.perf_counter() - t0:.1f}s, cached in {path}")
          + f"; train reward mean {data['train']['rewards'].mean():.3f} (std {data['train']['rewards'].std():.3f})")

    # --- 2. Value model(s), trained by TD(λ) on the cached samples.
    columns = [("value", "rewards", reward_name)] + ([("value_b", "rewards_b", reward_b_name)] if composed else [])
    print(f"value model ({v.init}{': ' + v.path if v.init == 'path' else ''}): "
          f"{value_model.config.num_params():,} params, TD(λ={v.lam:g}, γ={v.gamma:g}), "
          f"{S // d.batch_size} steps per epoch")
    trained, diagnostics = {}, {}
    for name, column, label in columns:
        trained[name], diagnostics[name] = train_value_model(
            config, workdir, name, value_model, init_params, data, column, mesh)
        print(f"{name} ({label}) on held-out samples: "
              + ", ".join(f"{k} {x:.3f}" for k, x in diagnostics[name].items()))
    if loop.stopped_early(min(trained[n]["step"] for n in trained), t.num_steps):
        return {"stopped_at": min(trained[n]["step"] for n in trained), "diagnostics": diagnostics}

    # --- 3. Value-guided decoding over β, beside best-of-N of the same reward.
    B, n = len(eval_p["tokens"]), g.samples_per_prompt
    P = eval_p["tokens"].shape[1]
    k = min(g.k, policy.config.vocab_size)
    if g.k > k:
        print(f"warning: guide.k={g.k} exceeds the vocabulary size {k}; using k = {k}")
    ids_R = np.repeat(np.arange(B), n)
    guided = functools.partial(guided_generate, policy, params, eval_p["tokens"], eval_p["mask"], k=k,
                               num_samples=n, rng=jax.random.PRNGKey(config.seed + 31),
                               **{x: y for x, y in sampling.items() if x not in ("top_k", "top_p")})

    def guided_point(guide) -> tuple[dict, object]:
        t0 = time.perf_counter()
        out = guided(guide)
        jax.block_until_ready(out.tokens_RM)
        seconds = time.perf_counter() - t0
        rew, extra = score(out.sample_output().sequences(), ids_R, eval_p)
        kl = np.asarray(out.kl_R, np.float64)
        steps = int(np.asarray(out.lengths_R).max())
        # Forward tokens: each model prefills the B prompts once, then scores k candidates per row and step.
        value_tokens = len(guide.models) * (B * P + B * n * k * steps)
        row = {"reward": float(np.mean(rew)), "reward_se": prompt_standard_error(rew, n),
               **{f"reward/{x}": float(np.mean(y)) for x, y in extra.items()},
               "kl": float(kl.mean()), "kl_se": prompt_standard_error(kl, n), "sqrt_kl": math.sqrt(max(kl.mean(), 0)),
               "scorer_tokens/output": value_tokens / (B * n), "policy_tokens/output": (B * P + B * n * steps) / (B * n),
               "seconds/output": seconds / (B * n), "decode_s": seconds, "value_tokens": value_tokens}
        return row, out

    vm, vp = value_model, trained["value"]["params"]
    print(f"decoding {B} eval prompts × {n}: VAS at β = {', '.join(f'{b:g}' for b in g.betas)} (compiling first)"
          + (f", then best-of-N up to N = {e.best_of_n_max_n}" if e.best_of_n_max_n else ""))
    # Compiles once (β is a leaf, so every β below reuses it); blocked on, so no timing below includes it.
    jax.block_until_ready(guided(vas_guide(vm, vp, 0.0)).tokens_RM)
    vas_rows, outs = [], {}
    for beta in tqdm.tqdm(g.betas, desc="VAS β sweep", leave=False, disable=not t.progress_bar):
        row, outs[beta] = guided_point(vas_guide(vm, vp, beta))
        vas_rows.append({"beta": float(beta), **row})
    bon_rows = best_of_n_rows(policy, params, eval_p, score, sampling, e.best_of_n_max_n, config.seed, mesh)

    print(f"\nVAS (k = {k}) on {B} held-out prompts × {n} samples ({reward_name}; KL in nats per response, "
          "exact)")
    cols = ["beta", "reward", "reward_se"] + sorted(x for x in vas_rows[0] if x.startswith("reward/")) + [
        "kl", "kl_se", "decode_s", "scorer_tokens/output", "policy_tokens/output", "seconds/output"]
    print(metrics_lib.format_table(vas_rows, cols))
    if k < policy.config.vocab_size:
        print(f"(k = {k} < V = {policy.config.vocab_size}: β = 0 is the policy truncated to its top {k}, and its "
              "KL is the cost of that truncation)")
    if bon_rows:
        print(f"\nbest-of-N of the policy on the same prompts, picked by {reward_name} "
              "(KL bound log N − (N−1)/N; scorer tokens = the reward model's N·(P+M) per output)")
        print(metrics_lib.format_table(bon_rows, [x for x in bon_rows[0] if x not in ("reward_tokens", "seconds")]))
    if e.plot:
        plot = os.path.join(workdir, "reward_vs_kl.png")
        rollout.plot_reward_vs_kl(plot, vas_rows, bon_rows, reward_name,
                                  f"VAS (k = {k})" + (" vs best-of-N" if bon_rows else ""), point_label="VAS")
        print(f"plot: {plot}")
    if tokenizer is not None and e.show:
        show_completions(tokenizer, eval_p, outs, score, ids_R, n, e.show)

    # --- 4. Composition: Σ_i β_i (V_i − mean V_i) over a grid of (β₁, β₂), no retraining.
    compose_rows = []
    if composed:
        pair = ((value_model, value_model), (vp, trained["value_b"]["params"]))
        jax.block_until_ready(guided(vas_guide(*pair, (0.0, 0.0))).tokens_RM)  # two models: compile once
        for b1 in c.betas:
            for b2 in c.betas:
                row, out = guided_point(vas_guide(*pair, (b1, b2)))
                second = score_b(out.sample_output().sequences(), ids_R, eval_p)
                compose_rows.append({"beta_1": float(b1), "beta_2": float(b2), "reward": row["reward"],
                                     "reward_b": float(np.mean(second)),
                                     **{x: y for x, y in row.items() if x.startswith("reward/")},
                                     "kl": row["kl"], "decode_s": row["decode_s"]})
        print(f"\ncomposition: β₁ on {reward_name}, β₂ on {reward_b_name} (reward_b)")
        print(metrics_lib.format_table(compose_rows, list(compose_rows[0])))
        if e.plot:
            plot = os.path.join(workdir, "compose.png")
            plot_composition(plot, compose_rows, reward_name, reward_b_name)
            print(f"plot: {plot}")

    summary = {"reward": reward_name, "reward_b": reward_b_name, "k": k, "diagnostics": diagnostics,
               "vas": vas_rows, "best_of_n": bon_rows, "compose": compose_rows,
               "samples": {"train": S, "eval": len(data["eval"]["tokens"]), "path": path, "reused": reused}}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "vas.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return {**summary, "trained": trained, "value_model": value_model, "mesh": mesh}


def train_value_model(config, workdir: str, name: str, value_model, init_params, data: dict, column: str,
                      mesh) -> tuple[dict, dict]:
    """Trains one value model on `data["train"][column]` by TD(λ); returns
    `({"params", "step"}, held-out diagnostics)`. Metrics go to
    `<workdir>/<name>/metrics.jsonl` (train/*, eval/*) and TensorBoard;
    checkpoints to `checkpoints/<name>/`."""
    v, d, t = config.value, config.data, config.train
    train, evals = data["train"], data["eval"]
    S, B = len(train["tokens"]), d.batch_size
    steps_per_epoch = S // B
    grid = value_grid(train["loss_mask"])
    arrays = {k: train[k] for k in ("tokens", "attention_mask", "positions")}
    rewards_RL = token_rewards(train[column], grid)

    vtb = v.trainable_blocks
    vcfg = value_model.config
    boxed = jax.eval_shape(lambda: value_model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))["params"]
    tx, schedule = state_lib.make_optimizer(config.optimizer, loop.schedule_steps(t),
                                            state_lib.block_trainable(vcfg.num_layers, vtb))
    shardings = step_lib.state_shardings(mesh, boxed, tx)

    def values(params, mb):
        return value_model.apply({"params": params}, mb["tokens"], mb["attention_mask"], mb["positions"])

    loss_fn, metrics_fn, totals_fn = make_value_loss_fns(values)
    step_fn = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                       micro_batches=t.micro_batches, totals_fn=totals_fn)
    values_fn = jax.jit(values)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints", name))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (init_params,), shardings)
    all_values = lambda p, a: evaluate_lib.score_all_rows(values_fn, p, a, B, mesh)

    def epoch_targets(epoch: int, params) -> np.ndarray:
        # Fixed within an epoch; stored, so a resumed run regresses the same targets.
        file = os.path.join(workdir, "td_targets", name, f"epoch_{epoch}.npy")
        if os.path.exists(file):
            return np.load(file)
        targets = np.asarray(td_lambda_targets(rewards_RL, all_values(params, arrays), grid,
                                               gamma=float(v.gamma), lam=float(v.lam)), np.float32)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(file), exist_ok=True)
            np.save(file + ".tmp.npy", targets)
            os.replace(file + ".tmp.npy", file)
        return targets

    def diagnose(params) -> dict:
        ev_arrays = {k: evals[k] for k in ("tokens", "attention_mask", "positions")}
        return value_diagnostics(all_values(params, ev_arrays), evals[column], value_grid(evals["loss_mask"]))

    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(os.path.join(workdir, name), resume_step=start)
    if start == 0:
        writer.write(0, diagnose(state.params), prefix="eval")
    bar = tqdm.trange(start, stop, desc=f"{name} TD({v.lam:g})", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    targets, targets_epoch = None, -1
    for step in bar:
        epoch, j = divmod(step, steps_per_epoch)
        if epoch != targets_epoch:
            targets, targets_epoch = epoch_targets(epoch, state.params), epoch
        rows = np.random.default_rng([config.seed, epoch]).permutation(S)[j * B:(j + 1) * B]
        mb = {**{k: x[rows] for k, x in arrays.items()}, "grid": grid[rows], "targets": targets[rows]}
        state, met = step_fn(state, parallel.shard_global_batch(mb, mesh))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            loop.log_train(writer, done, met, bar, show=("loss", "explained_variance"))
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, diagnose(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, {"epoch": epoch})
    checkpointer.close()
    final = diagnose(state.params)
    writer.write(int(state.step), final, prefix="eval")
    writer.close()
    return {"params": state.params, "step": int(state.step)}, final


def prompt_standard_error(x_R, n: int) -> float:
    """Standard error of the mean of `x_R` (`[B·n]`; row b·n + j is sample j
    of prompt b) over prompts: the mean of each prompt's n samples, then the
    standard error of those B means (ddof 1). The n samples of a prompt share
    it, so they are not B·n independent draws; counting them as such
    understates the SE when prompts differ more than their samples do."""
    return rollout.standard_error(np.asarray(x_R, np.float64).reshape(-1, n).mean(axis=1))


def best_of_n_rows(policy, params, split, score, sampling, max_n: int, seed: int, mesh) -> list[dict]:
    """Best-of-N of the frozen policy, N = 1, 2, 4, …, max_n, picked by the
    reward: mean reward (and extras) of the picks, the KL bound, and per
    returned completion the reward-model tokens N·L, the policy tokens
    P + N·M (one prefill per prompt) and the seconds of sampling N and
    scoring them (timed on a second call, after compiling; unsplit, as the
    guided decode is, so the seconds compare)."""
    if not max_n:
        return []
    rows = rollout.best_of_n_points(policy, params, split, score, sampling, max_n, seed, mesh)
    B, P, M = len(split["tokens"]), split["tokens"].shape[1], sampling["max_new_tokens"]
    L = P + M
    for row in rows:
        N = row["N"]
        ids = np.repeat(np.arange(B), N)
        for _ in range(2):  # the first call compiles this N
            t0 = time.perf_counter()
            out = generate(policy, params, split["tokens"], split["mask"], rng=jax.random.PRNGKey(seed + 41),
                           num_samples=N, **sampling)
            score(out.sequences(), ids, split)
            seconds = time.perf_counter() - t0
        row.update({"scorer_tokens/output": N * L, "policy_tokens/output": P + N * M,
                    "seconds/output": seconds / B, "reward_tokens": N * B * L, "seconds": seconds})
    return rows


def show_completions(tokenizer, split, outs: dict, score, ids_R, n: int, count: int) -> None:
    """Prints `count` eval prompts with their completion at the smallest and
    the largest β of the sweep, and the rewards."""
    lo, hi = min(outs), max(outs)
    texts = {b: rollout.decode_completions(tokenizer, outs[b].sample_output().sequences()) for b in (lo, hi)}
    rews = {b: np.asarray(score(outs[b].sample_output().sequences(), ids_R, split)[0]) for b in (lo, hi)}
    for i in range(min(count, len(split["tokens"]))):
        r = i * n
        print(f"\n### {split['texts'][i]}")
        for b in (lo, hi):
            print(f"--- β = {b:g}, reward {rews[b][r]:.3f}\n{texts[b][r]}")


def plot_composition(path: str, rows: list[dict], name_a: str, name_b: str) -> None:
    """Mean reward A against mean reward B for every (β₁, β₂), labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter([r["reward"] for r in rows], [r["reward_b"] for r in rows], c=[r["beta_1"] - r["beta_2"] for r in rows],
               cmap="coolwarm")
    for r in rows:
        ax.annotate(f"({r['beta_1']:g}, {r['beta_2']:g})", (r["reward"], r["reward_b"]), fontsize=7)
    ax.set_xlabel(f"{name_a} (β₁)")
    ax.set_ylabel(f"{name_b} (β₂)")
    ax.set_title("VAS composition: Σ β_i·V_i at decode time")
    fig.tight_layout()
    metrics_lib.save_figure(fig, path)


def _samples_key(config, params, tokenizer, prompts: dict, sampling: dict) -> tuple[str, dict]:
    """`(sha256, settings)`: what the samples depend on, as a flat dict of
    strings (policy weights and architecture (`config.model` but its
    value-model-only `remat`), tokenizer, prompts, sampling
    settings, samples per prompt, seed, reward settings and a reward-model
    export's digests), and the sha256 of it. The dict is stored with the
    samples so a mismatch can name the settings that differ."""
    import hashlib
    r = config.reward
    rm_meta = ""
    if r.kind == "reward_model":  # the export's JSON digests (and how an ensemble's members combine)
        rm_meta = ensemble_lib.export_digest(r.reward_model_dir)
        if ensemble_lib.is_ensemble_dir(r.reward_model_dir):
            rm_meta += " %s %g" % ensemble_lib.config_options(config)
    digest = hashlib.sha256()
    for name in sorted(prompts):
        for k in ("tokens", "mask"):
            pref._update_array(digest, f"{name}/{k}", prompts[name][k])
    short = lambda x: json.dumps(x, default=str, sort_keys=True)
    # model.remat only changes how the value model's backward runs, never the policy's samples.
    model = {x: y for x, y in config.model.to_dict().items() if x != "remat"}
    meta = {"policy weights": pref.params_digest(params)[:16], "model": short(model),
            "tokenizer": tokenizer_fingerprint(tokenizer)[:16] if tokenizer is not None else "",
            "prompts": digest.hexdigest()[:16], "sampling": short(sampling),
            "rollout.samples_per_prompt": str(config.rollout.samples_per_prompt),
            "rollout.batch_size": str(config.rollout.batch_size), "seed": str(config.seed),
            "reward": short(r.to_dict()), "reward model export": rm_meta,
            "synthetic": short(config.synthetic.to_dict()),
            "compose": short([config.compose.kind, config.compose.functions])}
    return hashlib.sha256(short(meta).encode()).hexdigest(), meta
