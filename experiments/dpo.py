"""Direct preference optimization and its family (configs/dpo.py).

    python -m jaxreward.main --config=configs/dpo.py:synthetic --workdir=DIR

The policy starts as a copy of the base model; the reference is the frozen
initial policy (or `reference.path`). Any registered "preference" loss
(`loss.name`: DPO, IPO, cDPO, SimPO, ORPO, ...) is trained on preference
pairs with one forward per pair batch: each pair packed as one row
`[prompt | chosen | rejected]` (`model.prefix_sharing`, the default), or
chosen and rejected as one `[2B, T]` batch when it is off; per-token
log-probs summed over response tokens only.

Reference log-probs are computed once for every train and eval pair (one
jitted pass, `reference.batch_size` pairs per forward) and cached in
`<workdir>/reference_logps.npz`, keyed by a hash of the token arrays, the
tokenization and the reference weights: re-runs and resumes reuse it, and a
cache written for anything else is refused. With `reference.precompute=False`
the reference runs inside every step under stop_gradient (its weights then
sit, frozen, in the train state); there, `reference.sync_every=k` softly
updates it every k steps (TR-DPO). Reference-free losses (SimPO, ORPO) run
no reference at all.

The job, top to bottom: base policy -> pairs (sampled and gold-labelled, or
read and tokenized) -> reference log-probs -> sharded step -> restore or
init -> loop (step, log, eval, checkpoint) -> final held-out eval ->
generation eval vs best-of-N -> summary, plot, export.

Writes `metrics.jsonl` (train/*, eval/*, generate/*), `tensorboard/`,
`checkpoints/`, `reference_logps.npz`, `dpo.json` (summary),
`reward_vs_kl.png` and `policy/` (an HF checkpoint, `export=True`).
"""
from __future__ import annotations

import dataclasses
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
from jaxreward.data import pipeline, synthetic
from jaxreward.errors import UserError
from jaxreward.data.preference import PreferencePair, read_preference_pairs
from jaxreward.data.records import read_feedback
from jaxreward.models import pretrained
from jaxreward.models.llama import Decoder
from jaxreward.models import ensemble as ensemble_lib
from jaxreward.sampling.best_of_n import best_of_n
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train import defaults, loop
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import preference as pref
from jaxreward.train import state as state_lib
from jaxreward.train import step as step_lib
from jaxreward.train.proxy import sample_pairs

CACHE_FILE = "reference_logps.npz"
EXPORT_DIR = "policy"
SPLITS = ("train", "eval")


# Checked in check_config with narrower ranges than the shared checks (which skip them),
# or with more choices (data.format: also unpaired feedback for KTO).
STRICT_FIELDS = ("sampling.temperature", "sampling.max_new_tokens", "data.format")
PAIR_FORMATS = ("auto", "hh", "trl", "trl_chat", "trl_implicit")
# Settings that change neither the training nor its data: a run may resume with others.
RESUMABLE_CHANGES = ("reference.batch_size", "export")
# Fields added after runs were written, at the values that keep those runs' behaviour.
ADDED_FIELDS = {"reference.sync_every": 0, "reference.sync_alpha": 0.6}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.per_process_batch(config)  # data.batch_size divides among the processes (one share each)
    try:
        loss = pref.resolve_loss(config.loss)
    except ValueError as e:
        raise defaults.ConfigError(str(e)) from None
    per_batch = pref.batch_statistics(loss)
    if config.train.micro_batches > 1 and per_batch:
        raise defaults.ConfigError(
            f"config field train.micro_batches={config.train.micro_batches}: {', '.join(per_batch)} is "
            "estimated from each batch, so each micro-batch would use its own estimate; fix it "
            "under config.loss, or set train.micro_batches=1")
    defaults.check_choice(config, "data.source", ("synthetic", "jsonl"))
    defaults.check_choice(config, "data.format", (*PAIR_FORMATS, "feedback"))
    if config.data.format == "feedback" and not loss.unpaired:
        raise defaults.ConfigError(
            f"config field data.format='feedback' reads unpaired examples (prompt, completion, label); "
            f"loss {config.loss.name!r} trains on pairs: use loss.name='kto', or a pair format")
    defaults.check_file_fields_unused(config)
    if config.data.source == "jsonl":
        defaults.check_path(config, "data.train_path", required=True)
        defaults.check_path(config, "data.eval_path")
        if not config.data.eval_path and config.data.num_eval_pairs == 0:
            raise defaults.ConfigError("config field data.num_eval_pairs=0 holds out no pairs and "
                                       "data.eval_path is empty: the run needs held-out pairs")
    if not config.model.pretrained:
        defaults.check_arch(config)
        if config.data.source != "synthetic":
            raise defaults.ConfigError(f"config field model.pretrained is empty, but data.source="
                                       f"{config.data.source} needs the checkpoint's tokenizer")
    defaults.check_choice(config, "model.prefix_sharing", (True, False))
    defaults.check_pretrained(config, "reference.path")
    defaults.check_choice(config, "reference.precompute", (True, False))
    defaults.check_int(config, "reference.batch_size", 1)
    defaults.check_int(config, "reference.sync_every", 0)
    defaults.check_float(config, "reference.sync_alpha", 0.0, 1.0, low_open=True)
    if config.reference.sync_every:
        if not loss.uses_reference:
            raise defaults.ConfigError(
                f"config field reference.sync_every={config.reference.sync_every}: loss "
                f"{config.loss.name!r} uses no reference, so there is nothing to sync; set it to 0")
        if config.reference.precompute:
            raise defaults.ConfigError(
                f"config field reference.sync_every={config.reference.sync_every} updates the reference "
                "during training (TR-DPO), so its log-probs cannot be precomputed: set "
                "reference.precompute=False")
    defaults.check_int(config, "policy.trainable_blocks", -1)
    for name in ("prompt_length", "response_length", "num_train_pairs", "num_eval_pairs"):
        defaults.check_int(config, f"synthetic.{name}", 1)
    defaults.check_float(config, "synthetic.label_beta", 0.0)
    defaults.check_float(config, "synthetic.temperature", 0.0, low_open=True)
    defaults.check_choice(config, "eval.generate", (True, False))
    defaults.check_int(config, "eval.num_prompts", 1)
    defaults.check_int(config, "eval.samples_per_prompt", 1)
    defaults.check_best_of_n_max_n(config)
    defaults.check_float(config, "sampling.temperature", 0.0, low_open=True)
    defaults.check_int(config, "sampling.max_new_tokens", 1 if config.eval.generate else 0)
    if config.eval.reward_model_dir:
        defaults.check_path(config, "eval.reward_model_dir")
        ensemble_lib.check_export_dir(config, "eval.reward_model_dir")
    ensemble_lib.check_config_block(config)


def load_model(path: str, config: ml_collections.ConfigDict, seed: int):
    """`(decoder, params, tokenizer)`: pretrained `path`, or a random
    `model.arch` decoder (tokenizer None) when `path` is empty."""
    s = config.synthetic
    return pretrained.load_or_init(
        path, config.model.arch, dtype=config.model.dtype, seed=seed,
        max_positions=s.prompt_length + max(s.response_length, config.sampling.max_new_tokens))


def read_pairs(config: ml_collections.ConfigDict, tokenizer, workdir: str):
    """Tokenized train and eval pairs from `data.train_path` (and `data.eval_path`).

    Without `data.eval_path`, the last `data.num_eval_pairs` pairs of a
    seeded shuffle of the train file are held out.
    """
    d = config.data
    render = tokenizer.apply_chat_template if tokenizer.chat_template else None
    if d.format == "feedback":  # KTO's unpaired lines, tokenized as pairs with chosen = rejected
        read = lambda path: _feedback_as_pairs(*read_feedback(path, on_error=d.on_error, render_chat=render))
    else:
        read = lambda path: read_preference_pairs(path, fmt=d.format, on_error=d.on_error,
                                                  hh_as_chat=d.hh_as_chat, render_chat=render)
    pairs, report = read(d.train_path)
    print(report.summary())
    if d.eval_path:
        eval_pairs, eval_report = read(d.eval_path)
        print(eval_report.summary())
    else:
        order = np.random.default_rng(config.seed).permutation(len(pairs))
        n_eval = min(d.num_eval_pairs, len(pairs) // 2)
        eval_pairs = [pairs[i] for i in order[len(pairs) - n_eval:]]
        pairs = [pairs[i] for i in order[:len(pairs) - n_eval]]
        unit = "feedback lines" if d.format == "feedback" else "pairs"
        print(f"held out {n_eval} of {len(pairs) + n_eval} {unit} for evaluation (seed {config.seed})")
    pairs = pairs[:d.max_train_pairs or None]
    eval_pairs = eval_pairs[:d.max_eval_pairs or None]
    warn_train_eval_overlap(pairs, eval_pairs, "feedback lines" if d.format == "feedback" else "pairs")
    out = []
    for name, split in (("train", pairs), ("eval", eval_pairs)):
        arrays, tok_report = pipeline.cached_tokenize(
            split, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length or None,
            cache_dir=d.cache_dir or os.path.join(workdir, "token_cache"))
        print(f"{name}: {tok_report.summary(unpaired=d.format == 'feedback')}")
        if d.format == "feedback":  # the labels of the lines that were kept
            arrays = {**arrays, "desirable": np.array([split[i].label for i in tok_report.kept_indices], bool)}
        out.append(arrays)
    return out


def warn_train_eval_overlap(train: list, held_out: list, unit: str) -> int:
    """Warns when held-out records repeat train records word for word
    (duplicate lines in a file, or an eval file cut from the train file):
    their accuracy is then partly training accuracy. Returns the count."""
    key = lambda r: (r.prompt, r.chosen, r.rejected)  # a feedback line's label aside: the text was trained on
    seen = {key(r) for r in train}
    repeated = sum(key(r) in seen for r in held_out)
    if repeated:
        where = ", ".join(r.source for r in held_out if key(r) in seen)
        print(f"warning: {repeated} of {len(held_out)} held-out {unit} repeat a train record word for word "
              f"({where[:200]}{'...' if len(where) > 200 else ''}): their held-out accuracy is partly "
              "training accuracy; remove the duplicates from the data")
    return repeated


@dataclasses.dataclass(frozen=True)
class _FeedbackPair(PreferencePair):
    """An unpaired line as a pair (completion on both sides) that keeps its label."""
    label: bool = False


def _feedback_as_pairs(records, report):
    return [_FeedbackPair(r.prompt, r.completion, r.completion, r.source, None, r.label) for r in records], report


def kto_examples(arrays: dict[str, np.ndarray], seed: int, pad_id: int) -> dict[str, np.ndarray]:
    """KTO's examples (`pref.kto_examples`): feedback rows keep their labels;
    each pair gives its chosen side as desirable and its rejected side as undesirable."""
    n = len(arrays["chosen_tokens"])
    sides = ({"chosen": arrays["desirable"]} if "desirable" in arrays else
             {"chosen": np.ones(n, bool), "rejected": np.zeros(n, bool)})
    return pref.kto_examples(arrays, sides, seed, pad_id)


def make_loss_fns(config: ml_collections.ConfigDict, policy_fn: pref.LogpsFn,
                  ref_fn: pref.LogpsFn | None = None):
    """`(loss_fn, metrics_fn, loss)` of `config.loss` for `step.make_train_step`.

    `policy_fn`/`ref_fn` map `(params, tokens, attention_mask, positions)` to
    per-token log-probs (`pref.decoder_logps_fn` of a Decoder; a table of
    logits in the tests). The step's params are `{"policy": ...}` (+
    `"reference"` when the reference runs in the step).
    """
    loss = pref.resolve_loss(config.loss)
    return (*pref.make_loss_fns(policy_fn, loss, ref_fn), loss)


def eval_prompts(arrays: dict[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompts of the first n pairs: `(tokens [n, P], mask [n, P])`, right-padded."""
    prompt = arrays["chosen_attention_mask"][:n] & ~arrays["chosen_loss_mask"][:n]
    P = int(prompt.sum(axis=1).max())
    return arrays["chosen_tokens"][:n, :P], prompt[:, :P]


def first_row_per_prompt(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the first row of each distinct prompt (token sequence), in row order."""
    first = {}
    for i, key in enumerate(pref.prompt_keys(arrays)):
        first.setdefault(key, i)
    return np.fromiter(first.values(), np.int64, len(first))


def check_positions_fit(config: ml_collections.ConfigDict, models, splits: dict, prompt_width: int) -> None:
    """Refuses data the models cannot position: rows longer than a model's
    `max_position_embeddings` (training and held-out pairs), or eval prompts
    plus `sampling.max_new_tokens` (the generation eval), before any long pass.

    Raises:
      UserError: naming the config field to lower and the largest value that fits.
    """
    limit = min(model.config.max_position_embeddings for model in models)
    need = max(int(a[f"{side}_attention_mask"].sum(axis=1).max(initial=0))
               for a in splits.values() for side in pref.SIDES)
    if need > limit:
        raise UserError(f"config field data.max_length={config.data.max_length}: rows of up to {need} "
                        f"tokens exceed the model's max_position_embeddings {limit}; use "
                        f"data.max_length <= {limit}")
    M = config.sampling.max_new_tokens
    if prompt_width and prompt_width + M > limit:
        raise UserError(f"config field sampling.max_new_tokens={M}: eval prompts of up to {prompt_width} "
                        f"tokens + {M} new exceed the model's max_position_embeddings {limit}; use "
                        f"sampling.max_new_tokens <= {limit - prompt_width} or a smaller "
                        "data.max_prompt_length")


def check_kto_balance(loss: pref.PreferenceLoss, desirable: np.ndarray) -> None:
    """Warns when λ_D·n_D / (λ_U·n_U) is outside [1, 4/3], the range the KTO
    paper recommends (its section 4.2; TRL's KTOTrainer warns the same way),
    naming the weights that would bring it back, or when one label is absent."""
    n_d = int(np.sum(desirable))
    n_u = len(desirable) - n_d
    lam_d = loss.hparams.get("desirable_weight", 1.0)
    lam_u = loss.hparams.get("undesirable_weight", 1.0)
    if n_d == 0 or n_u == 0:
        print(f"warning: every train example is {'un' if n_d == 0 else ''}desirable: KTO then only "
              "pushes log π/π_ref one way, relative to z_0")
        return
    ratio = lam_d * n_d / (lam_u * n_u)
    if not 1.0 <= ratio <= 4 / 3:
        print(f"warning: loss.desirable_weight·n_D / (loss.undesirable_weight·n_U) = {lam_d:g}·{n_d} / "
              f"({lam_u:g}·{n_u}) = {ratio:.3g}, outside the KTO paper's [1, 4/3]: use "
              f"loss.desirable_weight in [{lam_u * n_u / n_d:.3g}, {4 / 3 * lam_u * n_u / n_d:.3g}] or "
              f"loss.undesirable_weight in [{3 / 4 * lam_d * n_d / n_u:.3g}, {lam_d * n_d / n_u:.3g}]")


DATA_FILE = "data_sha256.txt"


def check_data_unchanged(workdir: str, splits: dict) -> None:
    """Refuses to resume checkpoints on other data than they were trained on
    (an edited file, other labels): the token arrays' sha256 is kept in
    `<workdir>/data_sha256.txt`, written by the first run (or the first one
    since this check exists).

    Raises:
      UserError: the data's digest differs from the stored one while
        checkpoints exist.
    """
    path = os.path.join(workdir, DATA_FILE)
    digest = pref.arrays_digest(splits)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resuming = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
    if resuming and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = f.read().strip()
        if stored != digest:
            raise UserError(f"--workdir={workdir} holds checkpoints trained on other data (its {DATA_FILE} "
                            "differs from this run's pairs: an edited file, other labels or tokenization); "
                            "use a new --workdir, or restore the data")
    elif jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
            f.write(digest + "\n")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    # --- Base policy and pairs.
    m, d, t, e = config.model, config.data, config.train, config.eval
    loss = pref.resolve_loss(config.loss)
    base_model, base_params, tokenizer = load_model(m.pretrained, config, config.seed)
    cfg = dataclasses.replace(base_model.config, remat=m.remat)
    print(f"base policy {m.pretrained or 'random model.arch'}: {cfg.num_params():,} params, "
          f"{cfg.num_layers} blocks; loss {loss.name} {dict(loss.hparams)}")
    task = None
    if d.source == "synthetic":
        s = config.synthetic
        task = synthetic.CountingTask(cfg.vocab_size, s.prompt_length, s.response_length,
                                      seed=config.seed, label_beta=s.label_beta)
        # One sampler call (one compile) for both splits: the last pairs are held out.
        pairs, agree = sample_pairs(task, base_model, base_params,
                                    s.num_train_pairs + s.num_eval_pairs, 1, s.temperature)
        train = {k: v[:s.num_train_pairs] for k, v in pairs.items()}
        evals = {k: v[s.num_train_pairs:] for k, v in pairs.items()}
        train_agree = float(agree[:s.num_train_pairs].mean())
        eval_agree = float(agree[s.num_train_pairs:].mean())
        print(f"sampled {s.num_train_pairs} train / {s.num_eval_pairs} eval pairs from the base "
              f"policy; labels agree with the gold reward on {eval_agree:.3f} of eval pairs "
              "(the accuracy ceiling)")
        tokenization = f"synthetic vocab={cfg.vocab_size}"
    else:
        train, evals = read_pairs(config, tokenizer, workdir)
        train_agree = eval_agree = None
        tokenization = pipeline.tokenizer_fingerprint(tokenizer)
    if loss.unpaired:  # KTO: one example per side of a pair (or per feedback line)
        pad_id = tokenizer.pad_id if tokenizer else synthetic.PAD_ID
        train = kto_examples(train, config.seed, pad_id)
        evals = kto_examples(evals, config.seed + 1, pad_id)
    num_train, num_eval = len(train["chosen_tokens"]), len(evals["chosen_tokens"])
    unit = "examples" if loss.unpaired else "pairs"  # a row: a KTO example, or a pair
    if num_train == 0 and d.source == "jsonl":
        raise UserError(f"data.train_path={d.train_path!r} gave no usable train {unit} (see its report above)"
                        + ("; its lines are unpaired feedback? set data.format=feedback"
                           if loss.unpaired and d.format != "feedback" else ""))
    if num_train < d.batch_size:
        raise UserError(f"{num_train} usable train {unit} is fewer than one batch "
                        f"(data.batch_size={d.batch_size})")
    if num_eval == 0:
        raise UserError(f"data.eval_path={d.eval_path!r} gave no usable eval {unit} (see its report above)"
                        if d.source == "jsonl" and d.eval_path else
                        f"no usable eval {unit}: set data.eval_path or data.num_eval_pairs")
    if loss.unpaired:
        print(f"{loss.name}: {num_train} train examples ({int(train['desirable'].sum())} desirable), "
              f"{num_eval} held out; each row also holds a completion of another prompt for the "
              "reference point z_0")
        for name, split in (("train", train), ("eval", evals)):
            if len(first_row_per_prompt(split)) == 1:
                print(f"note: all {len(split['desirable'])} {name} examples share one prompt, so z_0's rows "
                      "borrow completions of that same prompt (KTO's mismatched pairs need two prompts)")
        check_kto_balance(loss, train["desirable"])

    # --- The held-out prompts of the generation eval.
    if task is not None:
        prompts = task.prompts(e.num_prompts, seed=3)
        prompt_mask = np.ones_like(prompts, bool)
    else:  # KTO's examples repeat prompts (two per pair, or several lines per prompt): each once
        once = first_row_per_prompt(evals) if loss.unpaired else np.arange(num_eval)
        prompts, prompt_mask = eval_prompts({k: v[once] for k, v in evals.items()}, e.num_prompts)
    check_positions_fit(config, [base_model], {"train": train, "eval": evals},
                        prompts.shape[1] if e.generate else 0)
    check_data_unchanged(workdir, {"train": train, "eval": evals})

    # --- The reward function of the generation eval, loaded before any long pass
    # so that a reward model that cannot score this policy (another vocabulary,
    # a missing file) is refused up front.
    reward_fn, reward_name = None, None
    if e.reward_model_dir:  # a reward model, or an ensemble combined by config.ensemble
        reward_fn, reward_name = ensemble_lib.reward_fn_for(config, e.reward_model_dir, cfg.vocab_size)
    elif task is not None:
        reward_fn = lambda b: task.gold_reward(np.asarray(b.response_tokens_RM),
                                               np.asarray(b.response_mask_RM))
        reward_name = "gold reward"

    # --- The reference: the initial policy, or `reference.path`.
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    r = config.reference
    ref_model, ref_params = base_model, base_params
    if r.path and (loss.uses_reference or e.generate):
        ref_model, ref_params, _ = load_model(r.path, config, config.seed)
        if ref_model.config.vocab_size != cfg.vocab_size:
            raise UserError(f"reference.path={r.path!r} has vocabulary {ref_model.config.vocab_size}, "
                            f"the policy {cfg.vocab_size}: they must share one tokenizer")
        check_positions_fit(config, [ref_model], {"train": train, "eval": evals},
                            prompts.shape[1] if e.generate else 0)
    ref_boxed = jax.eval_shape(lambda: ref_model.init(jax.random.PRNGKey(0),
                                                      jnp.zeros((1, 2), jnp.int32)))["params"]
    ref_params = jax.device_put(ref_params, parallel.param_shardings(mesh, ref_boxed))
    # Prefix sharing: every pair forward packs [prompt | chosen | rejected] into one row.
    # The output layer scores only the responses' columns of the packed row.
    packed = pref.shared_prefix_length({"train": train, "eval": evals}) if m.prefix_sharing else 0
    window = pref.shared_response_length({"train": train, "eval": evals}) if packed else 0
    if packed:
        T = train["chosen_tokens"].shape[1]
        print(f"prefix sharing: one row of {packed} tokens per pair instead of two of {T}, "
              f"{min(window, packed)} of them scored")
    ref_fn = pref.decoder_logps_fn(ref_model, packed, window)
    in_step_reference = loss.uses_reference and not r.precompute
    if loss.uses_reference and r.precompute:
        splits = {"train": train, "eval": evals}
        # Packed and unpacked forwards round differently (~1e-5 nats), so the
        # packing is part of the key: the cache holds what this run's step would compute.
        key = pref.reference_cache_key(splits, tokenization, ref_params, ref_model.config,
                                       {"temperature": 1.0, "packed_length": packed, "scored_window": window})
        t0 = time.perf_counter()
        cache, reused = pref.cached_reference_logps(
            os.path.join(workdir, CACHE_FILE), key,
            lambda: pref.reference_logps(ref_fn, ref_params, splits, r.batch_size, mesh),
            made_of="data, tokenization, reference weights or packing (model.prefix_sharing)")
        print(f"reference log-probs of {num_train + num_eval} {unit}: "
              + ("reused " + CACHE_FILE if reused else
                 f"computed in {time.perf_counter() - t0:.1f}s, cached in {CACHE_FILE}"))
        train = {**train, **{k.split("/")[1]: v for k, v in cache.items() if k.startswith("train/")}}
        evals = {**evals, **{k.split("/")[1]: v for k, v in cache.items() if k.startswith("eval/")}}
    elif not loss.uses_reference:
        print(f"{loss.name} is reference-free: no reference forward in training")

    # --- Sharded step, state, data iterator.
    tb = config.policy.trainable_blocks
    policy = Decoder(cfg, frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb))
    boxed = {"policy": jax.eval_shape(lambda: policy.init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 2), jnp.int32)))["params"]}
    params = {"policy": base_params}
    if in_step_reference:
        boxed["reference"], params["reference"] = ref_boxed, ref_params
    trainable = pref.policy_trainable(cfg.num_layers, tb)
    tx, schedule = state_lib.make_optimizer(config.optimizer, loop.schedule_steps(t), trainable)
    shardings = step_lib.state_shardings(mesh, boxed, tx)
    policy_fn = pref.decoder_logps_fn(policy, packed, window)
    loss_fn, metrics_fn, _ = make_loss_fns(config, policy_fn, ref_fn)
    # KTO's z_0 over the whole batch when it is split into micro-batches (one extra
    # forward, part by part).
    totals_fn = pref.make_totals_fn(policy_fn, loss, ref_fn, t.micro_batches) if t.micro_batches > 1 else None
    train_step = step_lib.make_train_step(loss_fn, metrics_fn, tx, schedule, mesh, shardings,
                                          micro_batches=t.micro_batches, totals_fn=totals_fn)
    score_fn = jax.jit(lambda p, b: pref.pair_outputs(policy_fn, ref_fn, loss, p, b))
    evaluate = lambda p: pref.evaluate_pairs(score_fn, p, evals, d.eval_batch_size, mesh, loss)
    loader = pipeline.GrainLoader(train, defaults.per_process_batch(config), seed=config.seed)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    make_state = jax.jit(lambda p: state_lib.init_state(p, tx, config.seed), out_shardings=shardings)
    state, _ = loop.restore_or_init(checkpointer, make_state, (params,), shardings, loader)
    del params
    sync_reference = None
    if r.sync_every:  # TR-DPO: the in-step reference moves toward the policy every k steps
        try:
            jax.eval_shape(lambda p: pref.soft_update_reference(p, r.sync_alpha), state.params)
        except ValueError as err:
            raise UserError(f"reference.sync_every={r.sync_every} with reference.path={r.path!r}: "
                            f"{err}") from None
        sync_reference = jax.jit(
            lambda s: s.replace(params=pref.soft_update_reference(s.params, r.sync_alpha)),
            in_shardings=(shardings,), out_shardings=shardings, donate_argnums=(0,))
        print(f"TR-DPO: reference <- {r.sync_alpha} * policy + {1 - r.sync_alpha:g} * reference "
              f"every {r.sync_every} steps")
        if r.sync_every >= t.num_steps:
            print(f"warning: reference.sync_every={r.sync_every} is not below train.num_steps="
                  f"{t.num_steps}: the reference is never synced (plain DPO with the reference in "
                  "the step)")
    trained = "every policy parameter" if tb < 0 or tb >= cfg.num_layers else \
        f"the top {tb} of {cfg.num_layers} blocks + final norm"
    print(f"training {trained} on {num_train} {unit}: {t.num_steps} steps of {d.batch_size} {unit}")

    # --- Generation eval: policy vs reference samples on held-out prompts.
    sampling = dict(max_new_tokens=config.sampling.max_new_tokens,
                    temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                    top_p=config.sampling.top_p, stop_ids=tokenizer.stop_ids if tokenizer else (),
                    pad_id=tokenizer.pad_id if tokenizer else synthetic.PAD_ID)
    # One key for policy samples, reference samples and best-of-N (common random
    # numbers): an unchanged policy ties the reference on every prompt (win rate
    # exactly 0.5), and best-of-N's first samples are the reference's own.
    gen_rng = jax.random.PRNGKey(config.seed + 3)
    ref_rewards = [None]  # the reference's samples do not change: scored once

    def generation_eval(policy_params) -> dict[str, float]:
        stats, ref_rewards[0] = pref.generation_eval(
            policy, policy_params, ref_model, ref_params, prompts, prompt_mask, reward_fn,
            rng=gen_rng, num_samples=e.samples_per_prompt, sampling=sampling,
            ref_rewards_R=ref_rewards[0], mesh=mesh)
        return stats

    # --- Train.
    start, stop = int(state.step), loop.stop_step(t)
    writer = metrics_lib.MetricWriter(workdir, resume_step=start)
    history = []
    bar = tqdm.trange(start, stop, desc=f"train {loss.name}", initial=start, total=stop,
                      disable=not t.progress_bar, dynamic_ncols=True)
    clock, tokens_since = None, 0
    for step in bar:
        if sync_reference is not None and step and step % r.sync_every == 0:
            # At the start of the step after every k-th: evals and checkpoints of step k hold
            # the reference it was trained against, and a run resumed there syncs here too.
            state = sync_reference(state)
        batch = next(loader)
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
        done = step + 1
        if clock is None:  # tokens/s leaves out the first step (compilation)
            jax.block_until_ready(state.step)
            clock = time.perf_counter()
        else:
            tokens_since += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
        if loop.due(done, t.log_every, stop):
            metrics = dict(jax.block_until_ready(metrics))
            if tokens_since:  # attended tokens of both sides per second of training
                metrics["tokens/s"] = tokens_since * jax.process_count() / (time.perf_counter() - clock)
                clock, tokens_since = time.perf_counter(), 0
            mets = loop.log_train(writer, done, metrics, bar, show=("loss", "rewards/accuracies"))
            history.append({"step": done, **mets})
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            jax.block_until_ready(state.params)  # pending steps count as training time
            paused = time.perf_counter()
            writer.write(done, evaluate(state.params), prefix="eval")
            if e.generate:
                writer.write(done, generation_eval(state.params["policy"]), prefix="generate")
            if clock is not None:  # eval time does not count against tokens/s
                clock += time.perf_counter() - paused
        if loop.due(done, t.checkpoint_every, stop):
            checkpointer.save(done, state, loader.state())
    checkpointer.close()
    if loop.stopped_early(int(state.step), t.num_steps):
        writer.close()
        return {"stopped_at": int(state.step), "history": history, "state": state, "mesh": mesh}

    # --- Final held-out eval and generation eval.
    final = evaluate(state.params)
    writer.write(int(state.step), final, prefix="eval")
    acc = "rewards/pair_accuracies" if "rewards/pair_accuracies" in final else "rewards/accuracies"
    what = (f"{int(final['num_scored_pairs'])} pairs" if acc == "rewards/pair_accuracies" else
            f"{int(final['num_examples'])} examples (KTO: on the right side of z_0)" if loss.unpaired else
            f"{int(final['num_pairs'])} pairs")
    print(f"held-out implicit-reward accuracy {final[acc]:.4f} "
          f"[{final[acc + '_ci_low']:.4f}, {final[acc + '_ci_high']:.4f}] "
          f"(95% Wilson) on {what}, loss {final['loss']:.4f}"
          + (f" (label ceiling {eval_agree:.3f})" if eval_agree is not None else ""))
    points, curve, gen = [], [], None
    if e.generate:
        gen = generation_eval(state.params["policy"])
        writer.write(int(state.step), gen, prefix="generate")
        points = [{"step": 0, **_reference_point(gen)}] if "reward" in gen else []
        points += _generate_records(workdir)
        if reward_fn is not None and e.best_of_n_max_n:
            bon = best_of_n(ref_model, ref_params, prompts, prompt_mask, reward_fn,
                            n=e.best_of_n_max_n, rng=gen_rng, **sampling)
            curve = pref.best_of_n_curve(np.asarray(bon.rewards_BN), e.best_of_n_max_n)
    writer.close()

    # --- Summary, plot, export.
    rows, unit = [], "examples" if loss.unpaired else "pairs"
    if history:
        last = history[-1]
        rows.append({"split": f"train (last batch, step {last['step']})", unit: d.batch_size,
                     **{k: last[k] for k in _SUMMARY}})
    rows.append({"split": "held-out", unit: int(final[f"num_{unit}"]), **{k: final[k] for k in _SUMMARY}})
    print(metrics_lib.format_table(rows, ["split", unit, *_SUMMARY]))
    summary = {"loss": loss.name, "hparams": dict(loss.hparams), "eval": final,
               "label_gold_agreement": eval_agree, "train_label_gold_agreement": train_agree,
               "generate": gen, "generate_points": points, "best_of_n": curve}
    if gen is not None:
        print(f"\ngeneration eval on {len(prompts)} held-out prompts × {e.samples_per_prompt} samples "
              "(mean ± standard error; KL in nats per response)")
        print(metrics_lib.format_table([_generate_row(p) for p in points] or [_generate_row(
            {"step": int(state.step), **gen})]))
    if curve:
        kl = gen["kl_k3"]
        at_kl = pref.reward_at_kl(curve, kl)
        summary["best_of_n_reward_at_policy_kl"] = at_kl if np.isfinite(at_kl) else None  # None: beyond N
        print(f"\nbest-of-N of the reference, same prompts and {reward_name} (KL bound in nats)")
        print(metrics_lib.format_table(curve, ["N", "kl_bound", "reward", "reward_se"]))
        print(f"policy: {reward_name} {gen['reward']:.4f} ± {gen['reward_se']:.4f} at KL (k3) "
              f"{kl:.4f}; best-of-N at that KL bound: "
              + (f"{at_kl:.4f}" if np.isfinite(at_kl) else
                 f"beyond N={curve[-1]['N']} (bound {curve[-1]['kl_bound']:.4f}; raise "
                 "eval.best_of_n_max_n)"))
        if e.plot:
            path = os.path.join(workdir, "reward_vs_kl.png")
            title = f"{loss.name} {dict(loss.hparams)}"
            pref.plot_reward_vs_kl(path, points, curve, reward_name, title)
            print(f"plot: {path}")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "dpo.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    if config.export:
        out_dir = os.path.join(workdir, EXPORT_DIR)
        host = parallel.to_host(state.params["policy"])  # collective on a pod: every process gathers
        if jax.process_index() == 0:  # one writer of the shared export folder
            jaxreward.save_pretrained(out_dir, policy.config, host, tokenizer)
        print(f"policy saved to {out_dir} (HF format)")
    return {"eval": final, "generate": gen, "best_of_n": curve, "history": history, "state": state,
            "mesh": mesh, "summary": summary}


_SUMMARY = ["loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
            "logps/chosen", "logps/rejected"]


def _reference_point(gen: dict) -> dict:
    """The reference itself as an eval point: KL 0, its own reward."""
    return {"reward": gen["ref_reward"], "reward_se": gen["ref_reward_se"], "kl_k1": 0.0,
            "kl_k1_se": 0.0, "kl_k3": 0.0, "kl_k3_se": 0.0, "win_rate": 0.5, "win_rate_se": 0.0}


def _generate_records(workdir: str) -> list[dict]:
    """Every `generate/*` record of `metrics.jsonl` (this run and the ones it resumed)."""
    return [{"step": r["step"], **{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith("generate/")}}
            for r in metrics_lib.read_metrics(workdir) if any(k.startswith("generate/") for k in r)]


def _generate_row(p: dict) -> dict:
    row = {"step": int(p["step"])}
    for k in ("reward", "win_rate", "kl_k1", "kl_k3"):
        if k in p:
            row[k] = f"{p[k]:.4f} ± {p[k + '_se']:.4f}"
    return row
