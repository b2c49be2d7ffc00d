"""Reward model on real preference data (configs/reward_model.py).

Pretrained backbone (`load_pretrained`) + a fresh K-output head, trained
with the Bradley–Terry loss on HH-RLHF- or TRL-format pairs; prints the data
reports, held-out pairwise accuracy and a summary table, and exports the
trained reward model to `<workdir>/reward_model/` for best-of-N.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import jaxreward
from jaxreward.data.batching import tokenize_pairs
from jaxreward.data.preference import read_preference_pairs
from jaxreward.models.heads import RewardModel
from jaxreward.models.llama import LlamaConfig
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import reward_model as rm_train
from jaxreward.train import state as state_lib
from jaxreward.train.step import unbox

EXPORT_DIR = "reward_model"


def read_pairs(config: ml_collections.ConfigDict, tokenizer):
    """Train and eval pairs per the config; prints each file's report.

    Without `data.eval_path`, the last `data.num_eval_pairs` pairs of a
    seeded shuffle of the train file are held out.
    """
    d = config.data
    if not d.train_path:
        raise ValueError("set --config.data.train_path to a .jsonl or .jsonl.gz preference file")
    kw = dict(fmt=d.format, on_error=d.on_error, hh_as_chat=d.hh_as_chat,
              render_chat=tokenizer.apply_chat_template if tokenizer.chat_template else None)
    pairs, report = read_preference_pairs(d.train_path, **kw)
    print(report.summary())
    if d.eval_path:
        eval_pairs, eval_report = read_preference_pairs(d.eval_path, **kw)
        print(eval_report.summary())
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


def tokenize(pairs, tokenizer, d: ml_collections.ConfigDict, name: str):
    arrays, report = tokenize_pairs(pairs, tokenizer, max_length=d.max_length,
                                    max_prompt_length=d.max_prompt_length or None)
    print(f"{name}: {report.summary()}")
    return arrays


def export_reward_model(directory: str, rm: RewardModel, params, pretrained: str) -> None:
    """Saves params (orbax) and `reward_model.json` (architecture + source)."""
    meta = {"pretrained": pretrained, "num_objectives": rm.num_objectives,
            "llama_config": dataclasses.asdict(rm.config)}
    ckpt_lib.save_params(os.path.join(directory, "params"), params)
    if jax.process_index() == 0:
        with open(os.path.join(directory, "reward_model.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def load_reward_model(directory: str):
    """`(RewardModel, params, meta)` from `export_reward_model`'s folder.

    Raises:
      FileNotFoundError: the folder has no reward_model.json.
    """
    path = os.path.join(directory, "reward_model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: point at the `{EXPORT_DIR}/` folder a "
                                "reward_model run wrote into its workdir")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    rm = RewardModel(LlamaConfig(**meta["llama_config"]), num_objectives=meta["num_objectives"])
    params = ckpt_lib.load_params(os.path.join(directory, "params"))
    return rm, params, meta


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    m = config.model
    decoder, backbone_params, tokenizer = jaxreward.load_pretrained(m.pretrained, dtype=m.dtype)
    cfg = dataclasses.replace(decoder.config, remat=m.remat)
    print(f"backbone {m.pretrained}: {cfg.num_params():,} params, {cfg.num_layers} blocks")
    pairs, eval_pairs = read_pairs(config, tokenizer)
    train = tokenize(pairs, tokenizer, config.data, "train")
    evals = tokenize(eval_pairs, tokenizer, config.data, "eval")
    if len(train["chosen_tokens"]) < config.data.batch_size:
        raise ValueError(f"{len(train['chosen_tokens'])} usable train pairs is fewer than "
                         f"one batch ({config.data.batch_size})")

    tb = config.reward.trainable_blocks
    rm = RewardModel(cfg, num_objectives=config.reward.num_objectives,
                     frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    head = rm.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 2), jnp.int32))
    params = {"backbone": backbone_params, "head": unbox(head["params"]["head"])}
    del head
    trainable = state_lib.block_trainable(cfg.num_layers, tb)
    print(f"training the head and {'all' if trainable is None else tb} of {cfg.num_layers} blocks "
          f"on {len(train['chosen_tokens'])} pairs, {config.train.num_steps} steps of "
          f"{config.data.batch_size} pairs, length {config.data.max_length}")
    if not len(evals["chosen_tokens"]):
        print("warning: no usable eval pairs; the run reports no held-out accuracy")
    fit = rm_train.fit_reward_model(config, workdir, rm, params, train, evals, trainable)
    if fit["stopped_early"]:
        return {"stopped_at": int(fit["state"].step)}

    export_reward_model(os.path.join(workdir, EXPORT_DIR), rm, fit["state"].params, m.pretrained)
    rows = []
    if fit["history"]:
        last = fit["history"][-1]
        rows.append({"split": f"train (step {last['step']})", "pairs": len(train["chosen_tokens"]),
                     "loss": last["loss"], "accuracy": last["accuracy"],
                     "margin": last["margin_mean"]})
    if fit["eval"]:
        e = fit["eval"]
        rows.append({"split": "held-out", "pairs": int(e["num_pairs"]), "loss": e["loss"],
                     "accuracy": e["accuracy"], "margin": e["margin_mean"]})
        print(f"held-out pairwise accuracy: {e['accuracy']:.4f} on {int(e['num_pairs'])} pairs")
    print(metrics_lib.format_table(rows))
    print(f"reward model saved to {os.path.join(workdir, EXPORT_DIR)}")
    return {"eval": fit["eval"], "history": fit["history"]}
