"""Multi-objective reward model on rated responses (configs/reward_model_rated.py).

    python -m jaxreward.main --config=configs/reward_model_rated.py --workdir=DIR
    python -m jaxreward.main --config=configs/reward_model_rated.py:smollm2_helpsteer \
        --workdir=DIR --config.data.train_path=PATH.jsonl

A backbone + a fresh K-output head (`RewardModel(num_objectives=K)`) trained
with a registered `rated_reward_loss` (`loss.name`, default `regression`:
"HelpSteer2: Open-source dataset for training top-performing reward models",
Wang et al., 2024) on (prompt, response, K ratings) records — HelpSteer-style
`.jsonl` read by `data.records.read_rated`, or the `synthetic` task (K hidden
linear functions of token counts). Logs and evaluates per objective (mean
squared error, Pearson correlation), and scores with one scalar per
response: a weighted sum of the K outputs (`objectives.reward.
weighted_objective_sum`) or their log-sigmoid AND (`objectives.transforms.
combine_log_sigmoid`, "Transforming and Combining Rewards for Aligning Large
Language Models", Wang et al., 2024), reporting how well that scalar tracks
the same combination of the ratings.

Ratings are centered on their train means (`data.center_targets`; the head
has no bias) — `ratings.json` in the export stores the offsets, so a rating
is predicted as reward + offset.

The job, top to bottom: read records -> tokenize -> model and params ->
sharded step -> restore or init -> loop (step, log, eval, checkpoint) ->
final eval -> export (`<workdir>/reward_model/` + `ratings.json`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import parallel
from jaxreward.data import records
from jaxreward.data.batching import tokenize_pairs
from jaxreward.data.pipeline import GrainLoader
from jaxreward import errors
from jaxreward.errors import UserError
from jaxreward.models.heads import RewardModel
from jaxreward.models import pretrained
from jaxreward.models.reward_io import EXPORT_DIR, export_reward_model
from jaxreward.objectives import registry
from jaxreward.objectives.reward import weighted_objective_sum
from jaxreward.objectives.transforms import combine_log_sigmoid
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop
from jaxreward.train import evaluate as evaluate_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.step import unbox

LOSS_KIND = "rated_reward_loss"
COMBINE_MODES = ("weighted_sum", "log_sigmoid_and")
ROW_KEYS = ("tokens", "attention_mask", "positions")  # + "ratings" [n, K]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.per_process_batch(config)  # data.batch_size divides among the processes (one share each)
    if config.loss.name not in registry.names(LOSS_KIND):
        raise defaults.ConfigError(f"config field loss.name={config.loss.name!r} is not a {LOSS_KIND}; "
                                   f"registered: {', '.join(registry.names(LOSS_KIND))}")
    defaults.check_choice(config, "data.source", ("jsonl", "synthetic"))
    defaults.check_file_fields_unused(config)
    defaults.check_int(config, "reward.num_objectives", 1)
    defaults.check_int(config, "reward.trainable_blocks", -1)
    K = config.reward.num_objectives
    if config.data.source == "jsonl":
        defaults.check_path(config, "data.train_path", required=True)
        defaults.check_path(config, "data.eval_path")
        attributes = tuple(config.data.attributes)
        if attributes and len(attributes) != K:
            raise defaults.ConfigError(
                f"config fields data.attributes ({len(attributes)} names: {', '.join(attributes)}) and "
                f"reward.num_objectives={K} disagree: the head has one output per rating")
        if len(set(attributes)) != len(attributes) or not all(isinstance(a, str) and a for a in attributes):
            raise defaults.ConfigError(f"config field data.attributes must be distinct non-empty "
                                       f"names, got {attributes!r}")
    else:
        for name in ("prompt_length", "response_length", "num_train_records", "num_eval_records"):
            defaults.check_int(config, f"synthetic.{name}", 1)
        defaults.check_float(config, "synthetic.noise_std", 0.0)
    if not config.model.pretrained:
        defaults.check_arch(config)
        if config.data.source == "jsonl":
            raise defaults.ConfigError("config field model.pretrained is empty, but data.source=jsonl "
                                       "needs the checkpoint's tokenizer")
    for name in ("num_eval_records", "max_train_records", "max_eval_records"):
        defaults.check_int(config, f"data.{name}", 0)
    for name, n in (("loss.objective_weights", K), ("scoring.weights", K)):
        values = tuple(defaults.get_field(config, name))
        if values and (len(values) != n or not all(isinstance(v, (int, float)) and np.isfinite(v)
                                                  for v in values)):
            raise defaults.ConfigError(f"config field {name} must be () or {n} finite numbers "
                                       f"(one per objective), got {values!r}")
    defaults.check_choice(config, "scoring.combine", COMBINE_MODES)
    defaults.check_float(config, "scoring.quantile", 0.0, 1.0)


def objective_names(config) -> list[str]:
    """The attribute names (jsonl with named fields), else k0 .. k{K-1}."""
    attributes = tuple(config.data.attributes) if config.data.source == "jsonl" else ()
    return list(attributes) or [f"k{k}" for k in range(config.reward.num_objectives)]


# --------------------------------------------------------------------- data


def load_backbone(config: ml_collections.ConfigDict):
    """`(decoder, params, tokenizer)`: pretrained, or a random `model.arch`
    decoder (tokenizer None) when `model.pretrained` is empty."""
    m, s = config.model, config.synthetic
    return pretrained.load_or_init(m.pretrained, m.arch, dtype=m.dtype, seed=config.seed,
                                   max_positions=s.prompt_length + s.response_length)


def synthetic_ratings(config: ml_collections.ConfigDict, n: int, split_seed: int) -> dict[str, np.ndarray]:
    """n random-token responses with K ratings each.

    Rating k of response y is the counting task's gold reward
    (`data/synthetic.py`) with its own hidden weights w_k, plus noise:

        y_k = Σ_v w_kv · count_v(y) / sqrt(R) + ε,   w_kv ~ N(0, 1), w_k,pad = 0, ε ~ N(0, noise_std²)

    `w` is seeded by `seed` alone (train and eval share it); prompts,
    responses (lengths uniform in [2, R]) and noise by (`seed`, `split_seed`).
    """
    s, V, K = config.synthetic, config.model.arch.vocab_size, config.reward.num_objectives
    P, R = s.prompt_length, s.response_length
    w_KV = np.random.default_rng([config.seed, 11]).standard_normal((K, V))
    w_KV[:, 0] = 0.0
    rng = np.random.default_rng([config.seed, 12, split_seed])
    prompts = rng.integers(1, V, (n, P))
    resp = rng.integers(1, V, (n, R))
    resp_mask = np.arange(R)[None] < rng.integers(min(2, R), R + 1, (n, 1))
    counts_NV = np.zeros((n, V))
    np.add.at(counts_NV, (np.repeat(np.arange(n), R), resp.ravel()), resp_mask.ravel())
    ratings = counts_NV @ w_KV.T / np.sqrt(R) + s.noise_std * rng.standard_normal((n, K))
    attention = np.concatenate([np.ones((n, P), bool), resp_mask], axis=1)
    return {"tokens": np.concatenate([prompts, np.where(resp_mask, resp, 0)], axis=1).astype(np.int32),
            "attention_mask": attention,
            "positions": np.maximum(np.cumsum(attention, axis=1) - 1, 0).astype(np.int32),
            "ratings": ratings.astype(np.float32)}


class _AsPair(NamedTuple):
    """A rated record in the shape `tokenize_pairs` reads (the response on both sides)."""
    prompt: str
    chosen: str
    rejected: str
    source: str


def read_rated_records(config: ml_collections.ConfigDict, tokenizer):
    """Train and eval `RatedRecord`s per the config; prints each file's report.

    A message-list prompt is rendered by the checkpoint's chat template (as
    the reader does for every record kind); a string prompt becomes one user
    turn of it when `data.prompt_as_chat` (else it is used as is). Without
    `data.eval_path` the last `data.num_eval_records` records of a seeded
    shuffle are held out.

    Raises:
      DataError: with `data.on_error=raise`, the first bad line, naming file,
        line and field (a missing attribute, a non-numeric rating, a ratings
        list whose length is not `reward.num_objectives`, an empty prompt or
        response, ...).
    """
    d = config.data
    attributes = tuple(d.attributes) or None
    rendered = set()  # prompts the template rendered from message lists

    def render(messages, **kwargs):
        text = tokenizer.apply_chat_template(messages, **kwargs)
        rendered.add(text)
        return text

    def as_chat(prompt: str) -> str:
        if prompt in rendered or not (d.prompt_as_chat and tokenizer.chat_template):
            return prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)

    def read(path):
        recs, report = records.read_rated(path, attributes=attributes,
                                          num_ratings=None if attributes else config.reward.num_objectives,
                                          on_error=d.on_error,
                                          render_chat=render if tokenizer.chat_template else None)
        print(report.summary())
        return [dataclasses.replace(r, prompt=as_chat(r.prompt)) for r in recs]

    train = read(d.train_path)
    if d.eval_path:
        evals = read(d.eval_path)
    else:
        order = np.random.default_rng(config.seed).permutation(len(train))
        n_eval = min(d.num_eval_records, len(train) // 2)
        evals = [train[i] for i in order[len(train) - n_eval:]]
        train = [train[i] for i in order[:len(train) - n_eval]]
        print(f"held out {n_eval} of {len(train) + n_eval} rated records for evaluation (seed {config.seed})")
    if d.max_train_records:
        train = train[:d.max_train_records]
    if d.max_eval_records:
        evals = evals[:d.max_eval_records]
    return train, evals


def tokenize_rated(recs, tokenizer, config: ml_collections.ConfigDict, name: str) -> dict[str, np.ndarray]:
    """Row arrays (`tokens`, `attention_mask`, `positions` `[n, T]`, `ratings`
    `[n, K]`) of rated records: BOS + prompt | response + EOS, right padded,
    truncated like preference pairs (`batching.tokenize_pairs`: the end of
    the prompt and the start of the response are kept)."""
    d = config.data
    pairs = [_AsPair(r.prompt, r.response, r.response, r.source) for r in recs]
    arrays, report = tokenize_pairs(pairs, tokenizer, max_length=d.max_length,
                                    max_prompt_length=d.max_prompt_length or None)
    dropped = "; ".join(f"{why.replace('chosen ', '')}: {n} [{', '.join(report.dropped_examples[why])}]"
                        for why, n in sorted(report.dropped.items()))
    print(f"{name}: tokenized {report.num_pairs} rated responses: kept {report.num_kept}, prompt cut "
          f"{report.prompt_truncated}, response cut {report.chosen_truncated}, dropped "
          f"{report.num_dropped}" + (f" ({dropped})" if dropped else ""))
    kept = report.kept_indices
    out = {k: arrays[f"chosen_{k}"] for k in ROW_KEYS}
    out["ratings"] = np.asarray([recs[i].ratings for i in kept], np.float32).reshape(len(kept), -1)
    return out


def load_rated_arrays(config: ml_collections.ConfigDict, tokenizer):
    """Train and eval row arrays for `data.source`."""
    if config.data.source == "synthetic":
        s = config.synthetic
        train = synthetic_ratings(config, s.num_train_records, split_seed=1)
        evals = synthetic_ratings(config, s.num_eval_records, split_seed=2)
        print(f"synthetic ratings: {s.num_train_records} train, {s.num_eval_records} eval responses, "
              f"K={config.reward.num_objectives} hidden linear targets + noise (std {s.noise_std})")
        return train, evals
    train, evals = read_rated_records(config, tokenizer)
    return (tokenize_rated(train, tokenizer, config, "train"),
            tokenize_rated(evals, tokenizer, config, "eval"))


# ------------------------------------------------------- loss and metrics


def pearson_K(x_NK, y_NK):
    """Pearson correlation of each column of x with the same column of y,
    `[K]` (0 for a constant column); works on numpy and jax arrays."""
    xp = jnp if isinstance(x_NK, jax.Array) or isinstance(y_NK, jax.Array) else np
    xc, yc = x_NK - xp.mean(x_NK, axis=0), y_NK - xp.mean(y_NK, axis=0)
    denom = xp.sqrt(xp.sum(xc * xc, axis=0) * xp.sum(yc * yc, axis=0))
    return xp.where(denom > 0, xp.sum(xc * yc, axis=0) / xp.where(denom > 0, denom, 1.0), 0.0)


def make_rated_loss_fns(rm: RewardModel, config: ml_collections.ConfigDict, names: list[str]):
    """`(loss_fn, metrics_fn)` for `step.make_train_step`: the registered
    rated loss on `[B, K]` rewards vs ratings; metrics add per objective the
    mean squared error `mse_<name>` and the batch Pearson `pearson_<name>`."""
    loss = registry.get(LOSS_KIND, config.loss.name)
    weights = tuple(config.loss.objective_weights) or None

    def loss_fn(params, batch, rng):
        del rng  # deterministic forward: no dropout
        rewards = rm.apply({"params": params}, batch["tokens"], batch["attention_mask"], batch["positions"])
        value, _ = loss(rewards, batch["ratings"], objective_weights_K=weights)
        return value, {"rewards": rewards}

    def metrics_fn(outputs, batch):
        r, y = outputs["rewards"], batch["ratings"]
        _, metrics = loss(r, y, objective_weights_K=weights)
        metrics.pop("loss")
        mse, corr = jnp.mean(jnp.square(r - y), axis=0), pearson_K(r, y)
        for k, name in enumerate(names):
            metrics[f"mse_{name}"], metrics[f"pearson_{name}"] = mse[k], corr[k]
        return metrics

    return loss_fn, metrics_fn


def combine_objectives(rewards_NK, scoring: ml_collections.ConfigDict, reference_MK) -> jax.Array:
    """One scalar per row from K rewards, `float32[N]`.

    `weighted_sum`: Σ_k w_k r_k (`scoring.weights`, default 1/K each).
    `log_sigmoid_and`: Σ_k log σ(r_k − ref_k), ref_k the `scoring.quantile`
    of column k of `reference_MK` (rewards of M reference responses: in the
    paper, base-policy samples of the same prompt; here, when none are at
    hand, the evaluation set's rewards) — high only when every objective is
    above its reference.
    """
    r = jnp.asarray(rewards_NK, jnp.float32)
    K = r.shape[1]
    if scoring.combine == "weighted_sum":
        weights = tuple(scoring.weights) or (1.0 / K,) * K
        return weighted_objective_sum(r, jnp.asarray(weights, jnp.float32))
    ref = jnp.asarray(reference_MK, jnp.float32)
    # The quantile is over M; every row shares the same M references.
    ref_q = jnp.quantile(ref, scoring.quantile, axis=0)
    return combine_log_sigmoid(r, jnp.broadcast_to(ref_q, (r.shape[0], 1, K)), quantile=scoring.quantile)


def evaluate_rated(score_fn, params, arrays, config, mesh, names, loss_name: str) -> dict[str, float]:
    """Held-out metrics over every row: the loss and its metrics, per-objective
    `mse_<name>` and `pearson_<name>`, and `combined_pearson`: the Pearson
    correlation of `combine_objectives` of the predictions with the same
    combination of the ratings (each against its own eval set as reference)."""
    rows = {k: arrays[k] for k in ROW_KEYS}
    pred = evaluate_lib.score_all_rows(score_fn, params, rows, config.data.eval_batch_size, mesh)
    y = arrays["ratings"]
    weights = tuple(config.loss.objective_weights) or None
    _, metrics = registry.get(LOSS_KIND, loss_name)(jnp.asarray(pred), jnp.asarray(y),
                                                    objective_weights_K=weights)
    out = metrics_lib.to_floats(metrics)
    mse, corr = np.mean(np.square(pred - y), axis=0), pearson_K(pred.astype(np.float64), y.astype(np.float64))
    for k, name in enumerate(names):
        out[f"mse_{name}"], out[f"pearson_{name}"] = float(mse[k]), float(corr[k])
    combined = [np.asarray(combine_objectives(x, config.scoring, x))[:, None] for x in (pred, y)]
    out["combined_pearson"] = float(pearson_K(combined[0].astype(np.float64), combined[1].astype(np.float64))[0])
    out["num_records"] = float(len(y))
    return out


# --------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- Data and model.
    m, d, t = config.model, config.data, config.train
    K, names = config.reward.num_objectives, objective_names(config)
    decoder, backbone_params, tokenizer = load_backbone(config)
    cfg = dataclasses.replace(decoder.config, remat=m.remat)
    print(f"backbone {m.pretrained or 'random model.arch'}: {cfg.num_params():,} params, "
          f"{cfg.num_layers} blocks; head: {K} objectives ({', '.join(names)})")
    train, evals = load_rated_arrays(config, tokenizer)
    if len(train["tokens"]) < d.batch_size:
        raise UserError(f"{len(train['tokens'])} usable train records is fewer than one batch "
                        f"(data.batch_size={d.batch_size})")
    if len(evals["tokens"]) == 0:
        raise UserError("no usable eval records (data.eval_path / data.num_eval_records)")
    offset_K = train["ratings"].mean(axis=0) if d.center_targets else np.zeros(K, np.float32)
    for arrays in (train, evals):
        arrays["ratings"] = (arrays["ratings"] - offset_K).astype(np.float32)

    tb = config.reward.trainable_blocks
    rm = RewardModel(cfg, num_objectives=K, frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    head = rm.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 2), jnp.int32))
    params = {"backbone": backbone_params, "head": unbox(head["params"]["head"])}
    trainable = state_lib.block_trainable(cfg.num_layers, tb)
    print(f"training the head and {'all' if trainable is None else tb} of {cfg.num_layers} blocks on "
          f"{len(train['tokens'])} rated responses, {t.num_steps} steps of {d.batch_size}, "
          f"loss {config.loss.name}")

    # --- Sharded step, state, data iterator.
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    tx, schedule = state_lib.make_optimizer(config.optimizer, loop.schedule_steps(t), trainable)
    boxed = jax.eval_shape(lambda: rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    shardings = step_lib.state_shardings(mesh, boxed["params"], tx)
    loss_fn, metrics_fn = make_rated_loss_fns(rm, config, names)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                          micro_batches=t.micro_batches)
    score_fn = jax.jit(lambda p, b: rm.apply({"params": p}, b["tokens"], b["attention_mask"], b["positions"]))
    evaluate = lambda p: evaluate_rated(score_fn, p, evals, config, mesh, names, config.loss.name)
    batcher = GrainLoader(train, defaults.per_process_batch(config), seed=config.seed)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (params,), shardings, batcher)
    del params, backbone_params

    # --- Train.
    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    history = []
    bar = tqdm.trange(start, stop, desc="train rated reward model", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        state, metrics = train_step(state, parallel.shard_batch(next(batcher), mesh))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            mets = metrics_lib.to_floats(metrics)
            if not np.isfinite(mets["loss"]):
                raise errors.diverged("loss", mets["loss"], done)
            writer.write(done, mets)
            history.append({"step": done, **mets})
            bar.set_postfix(loss=f"{mets['loss']:.4f}")
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            writer.write(done, evaluate(state.params), prefix="eval")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, batcher.state())
    checkpointer.close()
    if int(state.step) < t.num_steps:
        writer.close()
        print(f"stopped at step {int(state.step)} of {t.num_steps} (train.stop_after_steps); "
              "re-run with the same --workdir to continue")
        return {"stopped_at": int(state.step), "history": history, "state": state}

    # --- Final eval, summary, export.
    final = evaluate(state.params)
    writer.write(int(state.step), final, prefix="eval")
    writer.close()
    rows = [{"objective": name, "offset": float(offset_K[k]), "mse": final[f"mse_{name}"],
             "pearson": final[f"pearson_{name}"]} for k, name in enumerate(names)]
    print(f"held-out, {int(final['num_records'])} rated responses: loss {final['loss']:.4f}; "
          f"{config.scoring.combine} of the {K} outputs vs of the ratings: Pearson "
          f"{final['combined_pearson']:.4f}")
    print(metrics_lib.format_table(rows))
    export = os.path.join(workdir, EXPORT_DIR)
    export_reward_model(export, rm, state.params, m.pretrained or "random")
    if jax.process_index() == 0:
        with open(os.path.join(export, "ratings.json"), "w", encoding="utf-8") as f:
            json.dump({"objectives": names, "rating_offset": [float(x) for x in offset_K],
                       "scoring": config.scoring.to_dict(), "loss": config.loss.name}, f, indent=2)
    print(f"reward model saved to {export} (+ ratings.json: objective names, rating offsets)")
    return {"eval": final, "history": history, "state": state, "offset": offset_K, "names": names}
