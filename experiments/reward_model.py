"""Reward model on real preference pairs (configs/reward_model.py).

    python -m jaxreward.main --config=configs/reward_model.py:smollm2_hh --workdir=DIR

A pretrained backbone (`load_pretrained`) + a fresh K-output head, trained
with a registered pairwise reward loss (`loss.name`, default Bradley–Terry)
on HH-RLHF- or TRL-format pairs. Prints the data reports, held-out pairwise
accuracy and a summary table, and exports the reward model to
`<workdir>/reward_model/` for best-of-N, evaluation and RL.

The job, top to bottom: read pairs -> tokenize -> build model and params ->
build the sharded step -> restore or init -> loop (step, log, eval,
checkpoint) -> final eval -> export.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from jaxreward import parallel
from jaxreward.data import synthetic
from jaxreward.errors import UserError
from jaxreward.data import pipeline, tfds_builders
from jaxreward.data.preference import read_preference_pairs
from jaxreward.models.heads import RewardModel
from jaxreward.models import pretrained
from jaxreward.models.reward_io import EXPORT_DIR, export_reward_model
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
    defaults.check_choice(config, "data.source", ("jsonl", "tfds", "synthetic"))
    defaults.check_file_fields_unused(config)
    if config.data.source in ("jsonl", "tfds"):
        defaults.check_path(config, "data.train_path", required=True)
        defaults.check_path(config, "data.eval_path")
    if not config.model.pretrained:
        defaults.check_arch(config)
        if config.data.source != "synthetic":
            raise defaults.ConfigError(f"config field model.pretrained is empty, but data.source="
                                       f"{config.data.source} needs the checkpoint's tokenizer")
    defaults.check_int(config, "reward.num_objectives", 1)
    defaults.check_int(config, "reward.trainable_blocks", -1)
    defaults.check_int(config, "reward.backbone_blocks", 0)
    defaults.check_choice(config, "reward.pooling", ("last", "mean"))
    defaults.check_float(config, "reward.head_init_scale", 0.0)
    defaults.check_float(config, "optimizer.head_lr_multiplier", 0.0, low_open=True)
    if config.reward.cache_features and config.reward.trainable_blocks != 0:
        raise defaults.ConfigError(
            "config field reward.cache_features=True needs reward.trainable_blocks=0 (a frozen "
            f"backbone), got {config.reward.trainable_blocks}")
    for name in ("prompt_length", "response_length"):
        defaults.check_int(config, f"synthetic.{name}", 1)
    defaults.check_float(config, "synthetic.label_beta", 0.0)


def load_backbone(config: ml_collections.ConfigDict):
    """`(decoder, params, tokenizer)`: pretrained, or a random `model.arch`
    decoder (tokenizer None) when `model.pretrained` is empty."""
    m, s = config.model, config.synthetic
    return pretrained.load_or_init(m.pretrained, m.arch, dtype=m.dtype, seed=config.seed,
                                   max_positions=s.prompt_length + s.response_length)


def read_pairs(config: ml_collections.ConfigDict, tokenizer):
    """Train and eval pairs per the config; prints each file's report.

    `data.source = "tfds"` builds (or reuses) the TFDS dataset
    `jaxreward_pairs/<data.tfds_name>_{train,eval}` under `data.tfds_data_dir`
    from the files (the reader's validation runs during the build and its
    report is stored with the dataset), then reads it back in file/line
    order, so both sources give the same pairs. Without `data.eval_path`,
    the last `data.num_eval_pairs` pairs of a seeded shuffle are held out.
    """
    d = config.data
    kw = dict(fmt=d.format, on_error=d.on_error, hh_as_chat=d.hh_as_chat,
              render_chat=tokenizer.apply_chat_template if tokenizer.chat_template else None)

    def read(path, split_name):
        if d.source == "tfds":
            builder, report = tfds_builders.build("pairs", path, os.path.expanduser(d.tfds_data_dir),
                                                  name=f"{d.tfds_name}_{split_name}", **kw)
            print(report.summary())
            return sorted(tfds_builders.decode_all(builder.as_data_source("train")),
                          key=_source_order)
        pairs, report = read_preference_pairs(path, **kw)
        print(report.summary())
        return pairs

    pairs = read(d.train_path, "train")
    if d.eval_path:
        eval_pairs = read(d.eval_path, "eval")
    else:
        order = np.random.default_rng(config.seed).permutation(len(pairs))
        n_eval = min(d.num_eval_pairs, len(pairs) // 2)
        eval_pairs = [pairs[i] for i in order[len(pairs) - n_eval:]]
        pairs = [pairs[i] for i in order[:len(pairs) - n_eval]]
        print(f"held out {n_eval} of {len(pairs) + n_eval} pairs for evaluation (seed {config.seed})")
    if d.max_train_pairs:
        pairs = pairs[:d.max_train_pairs]
    if d.max_eval_pairs:
        eval_pairs = eval_pairs[:d.max_eval_pairs]
    return pairs, eval_pairs


def _source_order(pair) -> tuple[str, int]:
    """Sort key of a pair's `source` ("file:line"): file, then line number."""
    name, _, line = pair.source.rpartition(":")
    return name, int(line)


def tokenize(pairs, tokenizer, config: ml_collections.ConfigDict, workdir: str, name: str):
    """Tokenized pair arrays, cached per (pairs, tokenizer, lengths) under
    `data.cache_dir` (default `<workdir>/token_cache`)."""
    d = config.data
    arrays, report = pipeline.cached_tokenize(
        pairs, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length or None,
        cache_dir=d.cache_dir or os.path.join(workdir, "token_cache"))
    print(f"{name}: {report.summary()}")
    return arrays


def load_pair_arrays(config: ml_collections.ConfigDict, tokenizer, workdir: str):
    """Tokenized train and eval pair arrays for `data.source`."""
    d = config.data
    if d.source == "synthetic":
        s, vocab = config.synthetic, config.model.arch.vocab_size
        task = synthetic.CountingTask(vocab, s.prompt_length, s.response_length,
                                      seed=config.seed, label_beta=s.label_beta)
        train, _ = synthetic.random_pairs(task, d.max_train_pairs or 1024, seed=1)
        evals, ceiling = synthetic.random_pairs(task, d.num_eval_pairs, seed=2)
        print(f"synthetic pairs: {len(train['chosen_tokens'])} train, {d.num_eval_pairs} eval; "
              f"labels agree with the gold reward on {ceiling:.3f} of eval pairs")
        return train, evals
    pairs, eval_pairs = read_pairs(config, tokenizer)
    return (tokenize(pairs, tokenizer, config, workdir, "train"),
            tokenize(eval_pairs, tokenizer, config, workdir, "eval"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- Data and model.
    m, d, t, r = config.model, config.data, config.train, config.reward
    decoder, backbone_params, tokenizer = load_backbone(config)
    cfg = dataclasses.replace(decoder.config, remat=m.remat)
    if r.backbone_blocks > cfg.num_layers:
        raise defaults.ConfigError(
            f"config field reward.backbone_blocks={r.backbone_blocks}: the backbone "
            f"{m.pretrained or 'model.arch'} has {cfg.num_layers} blocks (0 = all)")
    if r.backbone_blocks:  # read the head from block `backbone_blocks` (drop the blocks above)
        cfg = dataclasses.replace(cfg, num_layers=r.backbone_blocks)
        backbone_params = {k: v for k, v in backbone_params.items()
                           if not (k.startswith("layers_") and int(k[7:]) >= r.backbone_blocks)}
    print(f"backbone {m.pretrained or 'random model.arch'}: {cfg.num_params():,} params, "
          f"{cfg.num_layers} blocks")
    train, evals = load_pair_arrays(config, tokenizer, workdir)
    if len(train["chosen_tokens"]) < d.batch_size:
        raise UserError(f"{len(train['chosen_tokens'])} usable train pairs is fewer than "
                         f"one batch (data.batch_size={d.batch_size})")
    has_eval = len(evals["chosen_tokens"]) > 0
    if not has_eval and d.source != "synthetic" and d.eval_path:
        raise UserError(f"data.eval_path={d.eval_path!r} gave no usable eval pairs (see its report "
                        "above); fix the file, or leave data.eval_path empty to hold out train pairs")
    if not has_eval:
        print("warning: no usable eval pairs; the run reports no held-out accuracy")

    tb = r.trainable_blocks
    rm = RewardModel(cfg, num_objectives=r.num_objectives, pooling=r.pooling,
                     frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    head = rm.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 2), jnp.int32))
    head = jax.tree.map(lambda w: w * r.head_init_scale, unbox(head["params"]["head"]))
    params = {"backbone": backbone_params, "head": head}
    trainable = state_lib.block_trainable(cfg.num_layers, tb)
    print(f"training the head ({r.pooling} pooling) and {'all' if trainable is None else tb} of "
          f"{cfg.num_layers} blocks on {len(train['chosen_tokens'])} pairs, {t.num_steps} steps "
          f"of {d.batch_size} pairs, length {d.max_length}")

    # --- Sharded step, state, data iterator.
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if r.cache_features:  # frozen backbone: its pooled features, once per pair
        t0 = time.perf_counter()
        train, evals = (pairwise.cache_features(rm, params, a, d.eval_batch_size, mesh)
                        for a in (train, evals))
        print(f"cached the frozen backbone's features of {len(train['chosen_tokens'])} train and "
              f"{len(evals['chosen_tokens'])} eval pairs in {time.perf_counter() - t0:.0f} s")
    tx, schedule = state_lib.make_optimizer(config.optimizer, loop.schedule_steps(t), trainable)
    boxed = jax.eval_shape(lambda: rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    shardings = step_lib.state_shardings(mesh, boxed["params"], tx)
    loss_fn, metrics_fn = pairwise.make_loss_fns(rm, config.loss.name)
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                          micro_batches=t.micro_batches)
    score_fn = jax.jit(lambda p, b: pairwise.pair_rewards(rm, p, b))
    evaluate = lambda p: pairwise.evaluate_pairs(rm, p, evals, d.eval_batch_size, mesh,
                                                 config.loss.name, score_fn)
    batcher = pipeline.GrainLoader(train, defaults.per_process_batch(config), seed=config.seed)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (params,), shardings, batcher)
    del params, backbone_params

    # --- Train.
    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    history = []
    if has_eval and t.eval_every and start == 0:  # the untrained head: step 0 of the curve
        untrained = evaluate(state.params)
        writer.write(0, untrained, prefix="eval")
        print(f"held-out pairwise accuracy at step 0 (untrained head): "
              f"{pairwise.describe_accuracy(untrained)}")
    bar = tqdm.trange(start, stop, desc="train reward model", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    for step in bar:
        state, metrics = train_step(state, parallel.shard_batch(next(batcher), mesh))
        done = step + 1
        if loop.due(done, t.log_every, stop):
            mets = loop.log_train(writer, done, metrics, bar)
            history.append({"step": done, **mets})
        if has_eval and t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            mets = evaluate(state.params)
            writer.write(done, mets, prefix="eval")
            tqdm.tqdm.write(f"step {done}: held-out pairwise accuracy {pairwise.describe_accuracy(mets)}")
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, batcher.state())
    checkpointer.close()
    if loop.stopped_early(int(state.step), t.num_steps):
        writer.close()
        return {"stopped_at": int(state.step), "history": history, "state": state, "mesh": mesh}

    # --- Final eval, summary, export.
    rows, final = [], None
    if history:
        last = history[-1]
        rows.append({"split": f"train (last batch, step {last['step']})", "pairs": d.batch_size,
                     "loss": last["loss"], "accuracy": last["accuracy"],
                     "margin": last["margin_mean"]})
    if has_eval:
        final = evaluate(state.params)
        writer.write(int(state.step), final, prefix="eval")
        rows.append({"split": "held-out", "pairs": int(final["num_pairs"]), "loss": final["loss"],
                     "accuracy": final["accuracy"], "margin": final["margin_mean"]})
        print(f"held-out pairwise accuracy: {pairwise.describe_accuracy(final)} "
              "(95% Wilson interval)")
    writer.close()
    curve = metrics_lib.plot_curve(workdir, "eval/accuracy", "learning_curve.png",
                                   "held-out pairwise accuracy",
                                   band=("eval/accuracy_ci_low", "eval/accuracy_ci_high"),
                                   reference=0.5)
    if curve:
        print(f"learning curve: {curve}")
    print(metrics_lib.format_table(rows))
    export_reward_model(os.path.join(workdir, EXPORT_DIR), rm, state.params, m.pretrained or "random")
    print(f"reward model saved to {os.path.join(workdir, EXPORT_DIR)}")
    return {"eval": final, "history": history, "state": state, "mesh": mesh}
