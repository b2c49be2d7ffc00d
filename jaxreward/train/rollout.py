"""Pieces the on-policy RL drivers share (experiments/policy_gradient.py, experiments/ppo.py).

Loading the policy, the prompt sets (synthetic, generated arithmetic, or a
prompt file), the reward function of a config, truncation, batched
log-probs, eval-time best-of-N on the same axes, and the reward-vs-√KL plot.
The step itself (rollout, score, reference, advantages, update) stays in the
drivers, where it reads top to bottom.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import jaxreward
from jaxreward import parallel, rewards
from jaxreward.data.arithmetic import arithmetic_prompts
from jaxreward.data.preference import read_preference_pairs
from jaxreward.data.records import PromptRecord, read_prompts
from jaxreward.errors import UserError
from jaxreward.models.heads import ValueModel, value_params_from_policy, value_params_from_reward_model
from jaxreward.models import pretrained
from jaxreward.models.llama import Decoder
from jaxreward.models import ensemble as ensemble_lib
from jaxreward.models.reward_io import load_reward_model
from jaxreward.models.scoring import group_token_logps, token_logps
from jaxreward.sampling.best_of_n import best_of_n_kl_bound, reward_model_fn
from jaxreward.sampling.sampler import SampleBatch, SampleOutput, generate
from jaxreward.train import evaluate, state as state_lib
from jaxreward.train import metrics as metrics_lib
from jaxreward.train import proxy as proxy_lib
from jaxreward.train.proxy import train_proxy

def load_policy(config: ml_collections.ConfigDict, path: str):
    """`(decoder, params, tokenizer)`: pretrained `path`, or a random
    `model.arch` decoder (tokenizer None) when `path` is empty."""
    return pretrained.load_or_init(
        path, config.model.arch, dtype=config.model.dtype, seed=config.seed,
        max_positions=config.synthetic.prompt_length + config.rollout.max_new_tokens)


def check_prompts_and_reward(config: ml_collections.ConfigDict) -> None:
    """Checks the blocks the sampling drivers share (policy_gradient, ppo,
    vas): `data` (source, prompt file, sizes), `model.arch` when there is no
    `model.pretrained`, `synthetic`, and `reward` (kind for the data source,
    the reward-model folder, the text reward specs).

    The synthetic task takes a random `model.arch` decoder and reward.kind
    proxy | gold | reward_model; text prompts (arithmetic, jsonl, pairs) take
    a pretrained model with a tokenizer and reward.kind reward_model | text.

    Raises:
      ConfigError: naming the first field with an impossible value.
    """
    from jaxreward.train import defaults
    d, r = config.data, config.reward
    defaults.check_choice(config, "data.source", ("synthetic", "arithmetic", "jsonl", "pairs"))
    if d.source in ("jsonl", "pairs"):
        defaults.check_path(config, "data.prompts_path", required=True)
        defaults.check_not_empty(config, "data.prompts_path")  # before any model loads
    if d.source == "synthetic":
        if config.model.pretrained:
            raise defaults.ConfigError("config field model.pretrained: the synthetic task needs a random "
                                       "model.arch decoder (set model.pretrained='' or another data.source)")
        defaults.check_choice(config, "reward.kind", ("proxy", "gold", "reward_model"))
    else:
        if not config.model.pretrained:
            raise defaults.ConfigError(f"config field model.pretrained: data.source={d.source!r} has text "
                                       "prompts and needs a pretrained model with a tokenizer")
        defaults.check_choice(config, "reward.kind", ("reward_model", "text"))
    if not config.model.pretrained:
        defaults.check_arch(config)
    defaults.check_choice(config, "data.on_error", ("skip", "raise"))
    defaults.check_choice(config, "data.chat_template", (True, False))
    for name in ("max_prompt_length", "num_prompts", "num_eval_prompts"):
        defaults.check_int(config, f"data.{name}", 1)
    defaults.check_int(config, "data.operand_low", 0)
    if "operand_low" in d:
        defaults.check_int(config, "data.operand_high", d.operand_low)
    for name in ("prompt_length", "proxy_steps"):
        defaults.check_int(config, f"synthetic.{name}", 1)
    defaults.check_int(config, "synthetic.proxy_pairs", proxy_lib.BATCH_SIZE)  # one proxy batch
    defaults.check_float(config, "synthetic.label_beta", 0.0)
    if r.kind == "reward_model":
        defaults.check_path(config, "reward.reward_model_dir", required=True)
        ensemble_lib.check_export_dir(config, "reward.reward_model_dir")
    ensemble_lib.check_config_block(config)
    if r.kind == "text":
        try:
            rewards.combine(r.functions)
        except (ValueError, KeyError, TypeError) as e:
            raise defaults.ConfigError(f"config field reward.functions: {e}") from None


def encode_prompts(tokenizer, texts: list[str], max_length: int, chat: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded prompt arrays `[N, P]` (chat-rendered as a user turn when
    `chat`), and how many prompts lost their beginning to `max_length`."""
    ids, cut = [], 0
    for text in texts:
        if chat and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        row = tokenizer.encode(text, add_bos=tokenizer.add_bos)
        if len(row) > max_length:
            row, cut = row[-max_length:], cut + 1
        ids.append(row)
    P = max(map(len, ids))
    tokens = np.full((len(ids), P), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), P), bool)
    for i, row in enumerate(ids):
        tokens[i, P - len(row):], mask[i, P - len(row):] = row, True
    return tokens, mask, cut


def prompt_set(config: ml_collections.ConfigDict, tokenizer, task) -> dict:
    """Train and eval prompts: token arrays, texts and `columns` (e.g. answers).

    `data.source`: synthetic (the counting task), arithmetic (generated),
    jsonl (a prompt file, `records.read_prompts`) or pairs (the prompts of a
    preference-pair file such as HH-RLHF, `pair_prompts`).
    """
    d = config.data
    n_train, n_eval = d.num_prompts, d.num_eval_prompts
    if d.source == "synthetic":
        tokens = task.prompts(n_train + n_eval, seed=5)
        mask = np.ones_like(tokens, bool)
        texts, answers, sources = [None] * len(tokens), None, [None] * len(tokens)
    else:
        if d.source == "arithmetic":
            records = arithmetic_prompts(n_train + n_eval, seed=config.seed, low=d.get("operand_low", 10),
                                         high=d.get("operand_high", 99))
        else:
            if d.source == "pairs":
                records, report = pair_prompts(d.prompts_path, tokenizer, on_error=d.on_error,
                                               chat=d.chat_template)
            else:
                records, report = read_prompts(d.prompts_path, on_error=d.on_error)
            print(report.summary())
            if len(records) < 2:  # one train and one eval prompt at least
                raise UserError(f"{d.prompts_path}: {len(records)} usable prompt(s); need at least 2 "
                                "(train and eval) (data.prompts_path)")
            n_eval = min(n_eval, len(records) // 2)
            if n_eval < d.num_eval_prompts:
                print(f"data.num_eval_prompts={d.num_eval_prompts} is more than half of the {len(records)} "
                      f"usable prompts of {d.prompts_path}: holding out {n_eval} for eval")
            n_train = len(records) - n_eval
        texts = [r.prompt for r in records]
        answers = [r.answer for r in records]
        sources = [r.source for r in records]
        chat = d.chat_template and d.source != "pairs"  # pair prompts come rendered
        tokens, mask, cut = encode_prompts(tokenizer, texts, d.max_prompt_length, chat)
        if cut:
            print(f"{cut} of {len(texts)} prompts were longer than data.max_prompt_length="
                  f"{d.max_prompt_length} tokens and keep their last tokens")
    out = {}
    for name, lo, hi in (("train", 0, n_train), ("eval", n_train, n_train + n_eval)):
        out[name] = {"tokens": tokens[lo:hi], "mask": mask[lo:hi], "texts": texts[lo:hi],
                     "sources": sources[lo:hi],
                     "columns": {} if answers is None else {"answer": answers[lo:hi]}}
    return out


def check_prompts_fit(config: ml_collections.ConfigDict, prompts: dict, *models) -> None:
    """Refuses prompts the sampler cannot extend: the widest prompt of
    `prompts` (`prompt_set`'s splits) plus `rollout.max_new_tokens` must fit
    the `max_position_embeddings` of every model that samples (`models`).

    Raises:
      UserError: naming `rollout.max_new_tokens` (no room for any prompt) or
        `data.max_prompt_length` and the largest value that fits.
    """
    M = config.rollout.max_new_tokens
    limit = min(model.config.max_position_embeddings for model in models)
    P = max(split["tokens"].shape[1] for split in prompts.values())
    if limit - M < 1:
        raise UserError(f"config field rollout.max_new_tokens={M}: leaves no room for a prompt in the "
                        f"model's max_position_embeddings {limit}")
    if P + M > limit:
        raise UserError(f"config field data.max_prompt_length={config.data.max_prompt_length}: prompts of up "
                        f"to {P} tokens + rollout.max_new_tokens={M} exceed the model's "
                        f"max_position_embeddings {limit}; use data.max_prompt_length <= {limit - M}")


def pair_prompts(path, tokenizer, *, on_error: str = "skip", chat: bool = True):
    """The distinct prompts of a preference-pair file (`data.preference`
    formats: HH-RLHF transcripts, TRL), in file order, as `PromptRecord`s
    without answers, and the reader's report. Only the prompts are needed, so
    a pair whose responses are at fault (an empty chosen reply, a prompt
    mismatch: the prompt of `chosen`) keeps its prompt, counted in the
    report's summary (`read_preference_pairs(prompts_only=True)`).

    Each pair's prompt is the text before its responses. With `chat` (and a
    tokenizer with a chat template) HH transcripts are rendered with the chat
    template, as the reward_model and dpo jobs read them (`data.hh_as_chat`),
    so the policy is prompted the way the reward model was trained; chat
    formats are always rendered. The texts are ready to encode as they are.
    """
    render = tokenizer.apply_chat_template if tokenizer is not None and tokenizer.chat_template else None
    pairs, report = read_preference_pairs(path, on_error=on_error, render_chat=render,
                                          hh_as_chat=bool(chat and render), prompts_only=True)
    seen, records = set(), []
    for pair in pairs:
        if pair.prompt not in seen:
            seen.add(pair.prompt)
            records.append(PromptRecord(pair.prompt, None, pair.source))
    return records, report


def make_reward_fn(config, workdir, task, tokenizer, policy, base_params, prompts=None):
    """`score(samples, prompt_ids_R, split) -> (rewards_R, extra)`, its name, and
    `extra` metrics of each call (e.g. the gold reward next to the proxy).

    With `prompts` (`prompt_set`'s splits), text rewards are first tried on
    every prompt with an empty completion (`check_text_rewards`), so a
    prompt the reward cannot score (e.g. `exact_match` without an answer)
    is refused before training, naming its file and line.
    """
    r = config.reward
    if r.kind in ("proxy", "gold", "reward_model") and task is not None:
        gold = lambda s: task.gold_reward(np.asarray(s.response_tokens_RM), np.asarray(s.response_mask_RM))
        if r.kind == "gold":
            return (lambda s, ids, split: (gold(s), {"gold": gold(s)})), "gold reward"
        if r.kind == "proxy":
            s = config.synthetic
            rm, rm_params, info = train_proxy(os.path.join(workdir, "proxy_reward_model"), task, policy,
                                              base_params, num_pairs=s.proxy_pairs, num_steps=s.proxy_steps,
                                              seed=config.seed)
            print(f"proxy reward model: {s.proxy_pairs} noisy pairs, held-out accuracy "
                  f"{info['accuracy']:.3f} (label ceiling {info['ceiling']:.3f})")
            fn = reward_model_fn(rm, rm_params)
        else:
            fn, name = ensemble_lib.reward_fn_for(config, r.reward_model_dir, policy.config.vocab_size)
            print(f"proxy reward: {name}")
        return (lambda s, ids, split: _with_gold(np.asarray(fn(s)), gold(s))), "proxy reward"
    if r.kind == "reward_model":
        fn, name = ensemble_lib.reward_fn_for(config, r.reward_model_dir, policy.config.vocab_size)
        return (lambda s, ids, split: (np.asarray(fn(s)), {})), name
    if prompts is not None:
        check_text_rewards(r.functions, prompts)
    return text_reward_fn(r.functions, tokenizer), " + ".join(f"{w:g}·{name}" for name, w, *_ in r.functions)


def check_text_rewards(functions, splits, field: str = "reward.functions", before: str = "training") -> None:
    """Scores an empty completion of every prompt of `splits` with each text
    reward of `functions` (`rewards.combine`'s specs). The messages name the
    config field `field` and say it ran before `before`.

    Raises:
      UserError: a reward raised on a prompt: names the prompt's source
        (file:line), the reward and its message, and `reward.functions`;
        without a line when it fails on every prompt alone (the reward's
        fault, e.g. a wrong shape) or only on all of them at once.
    """
    for spec in functions:
        name = spec[0]
        one = rewards.combine([(name, 1.0, dict(spec[2]) if len(spec) == 3 else {})])
        for split_name, split in splits.items():
            if any(t is None for t in split["texts"]):   # token prompts (synthetic): no text to score
                continue
            n = len(split["texts"])
            try:
                one(split["texts"], [""] * n, split["columns"])
                continue
            except Exception as e:  # noqa: BLE001 - find the row, then report it as the user's
                batch_error = e
            def alone(i):
                try:
                    one([split["texts"][i]], [""], {k: [v[i]] for k, v in split["columns"].items()})
                except Exception as e:  # noqa: BLE001
                    return e
                return None
            for i in range(n):
                e = alone(i)
                if e is None:
                    continue
                detail = str(e) if isinstance(e, rewards.RewardFunctionError) else (
                    f"text reward {name!r} raised {type(e).__name__}: {e}")
                if i == 0 and n > 1 and all(alone(j) is not None for j in range(1, n)):
                    # Every prompt fails: the reward is at fault, not a line of the prompt file.
                    raise UserError(f"{detail} ({field}: fails on every prompt, each tried on an "
                                    f"empty completion before {before})") from e
                where = (split.get("sources") or [None] * n)[i] or f"{split_name} prompt {i}"
                raise UserError(f"{where}: {detail} ({field}, tried on an empty completion "
                                f"of this prompt before {before})") from e
            e = batch_error   # no prompt fails alone: the batch of all of them does
            detail = str(e) if isinstance(e, rewards.RewardFunctionError) else (
                f"text reward {name!r} raised {type(e).__name__}: {e}")
            raise UserError(f"{detail} ({field}, tried on an empty completion of every {split_name} "
                            f"prompt at once before {before})") from e


def text_reward_fn(functions, tokenizer):
    """`score(samples, prompt_ids_R, split) -> (float32 [R], {name: [R]})`:
    the weighted registered text rewards `functions` (`rewards.combine`'s
    specs) of each completion's text, with its prompt text and the split's
    extra columns (e.g. `answer`) of prompt `prompt_ids_R[r]`."""
    combined = rewards.combine(functions)

    def score_text(samples: SampleBatch, prompt_ids_R, split):
        prompts = [split["texts"][i] for i in prompt_ids_R]
        columns = {k: [v[i] for i in prompt_ids_R] for k, v in split["columns"].items()}
        return combined(prompts, decode_completions(tokenizer, samples), columns)
    return score_text


def _with_gold(proxy_R, gold_R):
    return proxy_R.astype(np.float32), {"gold": gold_R}


def decode_completions(tokenizer, samples: SampleBatch) -> list[str]:
    """The response text of each row (the stop token dropped)."""
    toks, mask = np.asarray(samples.response_tokens_RM), np.asarray(samples.response_mask_RM)
    return [tokenizer.decode(toks[i][mask[i]].tolist()) for i in range(len(toks))]


def truncated_rows(samples: SampleBatch, stop_ids) -> np.ndarray:
    """bool `[R]`: completions that reached `max_new_tokens` without a stop
    token (always False without stop ids, e.g. the synthetic task)."""
    toks, lengths = np.asarray(samples.response_tokens_RM), np.asarray(samples.response_mask_RM).sum(1)
    M = toks.shape[1]
    if not stop_ids:
        return np.zeros(len(toks), bool)
    last = toks[np.arange(len(toks)), np.maximum(lengths - 1, 0)]
    return (lengths == M) & ~np.isin(last, list(stop_ids))


def shape_rewards(reward_cfg, scores_R, truncated_R) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The sequence rewards the advantages are computed from, and what is logged of them.

    Order: the truncation rule (`reward.truncated`: `penalty` replaces the
    score of a truncated row by `reward.truncated_penalty`; `mask` takes it
    out of the loss), then `reward.transform` (`clip` to ±`reward.clip`, or
    `whiten` over the valid rows).

    The logging rule, one for every transform: `reward/mean|std` are the
    reward the policy is trained on, in reward units: after every per-row
    change (penalty, clip), before per-batch whitening (an affine
    normalization whose mean is 0 and std 1 by construction, as the
    advantages' own scaling) and without any KL term (logged as `kl/*`).
    `reward/raw_mean|raw_std` are the scorer's output before any of it. Both
    are over all R rows (with `mask`, truncated rows are counted but out of
    the loss; their fraction is `response_length/clipped_frac`).

    Returns: `(rewards_R, valid_R, logged_R, metrics)`: float32 `[R]` for the
    advantages, bool `[R]` rows in the loss, float32 `[R]` the logged
    reward, and the four metrics above.
    """
    from jaxreward.objectives.masking import masked_whiten
    raw = np.asarray(scores_R, np.float32)
    truncated = np.asarray(truncated_R, bool)
    rewards = raw
    if reward_cfg.truncated == "penalty":
        rewards = np.where(truncated, np.float32(reward_cfg.truncated_penalty), rewards).astype(np.float32)
    valid = ~truncated if reward_cfg.truncated == "mask" else np.ones(len(raw), bool)
    if reward_cfg.transform == "clip":
        rewards = np.clip(rewards, -reward_cfg.clip, reward_cfg.clip).astype(np.float32)
    logged = rewards
    if reward_cfg.transform == "whiten":
        rewards = np.asarray(masked_whiten(jnp.asarray(rewards), jnp.asarray(valid)), np.float32)
    metrics = {"reward/mean": float(logged.mean()), "reward/std": float(logged.std()),
               "reward/raw_mean": float(raw.mean()), "reward/raw_std": float(raw.std())}
    return rewards, valid, logged, metrics


def generate_on_shards(model: Decoder, params, tokens_BP, mask_BP, mesh, *, rng, num_samples: int = 1,
                       **sampling) -> SampleOutput:
    """`generate` with the B prompts split over the mesh's batch shards
    (data × fsdp) when B divides them, so each shard prefills and decodes its
    own prompts' samples (data-parallel sampling; on a pod, across
    processes); otherwise the prompts go in whole and every shard decodes all
    rows. The sampler's keys are per sample (`sampler.sample_keys`), so the
    tokens are those of an unsplit call and the log-probs agree to float
    round-off (tested on 1 and 8 devices). The output's arrays stay on the
    devices (`parallel.to_host` reads them whole on every process).
    """
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if len(tokens_BP) % shards == 0:
        placed = parallel.shard_global_batch({"tokens": tokens_BP, "mask": mask_BP}, mesh)
        tokens_BP, mask_BP = placed["tokens"], placed["mask"]
    return generate(model, params, tokens_BP, mask_BP, rng=rng, num_samples=num_samples, **sampling)


def sample_rollout(policy: Decoder, params, tokens_BP, mask_BP, mesh, *, rng, num_samples: int,
                   **sampling) -> SampleBatch:
    """`generate`'s G = `num_samples` completions of each of B prompts, as
    the training-path `SampleBatch` with numpy fields, whole on every process,
    sampled over the mesh's batch shards (`generate_on_shards`). Every
    sampling pass of the RL and VAS drivers (rollouts, eval points, best-of-N)
    goes through here.
    """
    out = generate_on_shards(policy, params, tokens_BP, mask_BP, mesh, rng=rng, num_samples=num_samples,
                             **sampling)
    return parallel.to_host(out.sequences())


def shape_baseline(reward_cfg, scores_B, truncated_B) -> np.ndarray:
    """float32 `[B]`: a baseline completion's score (ReMax's greedy one) in
    the units of `shape_rewards`' output: the same per-row rules (a truncated
    baseline gets `reward.truncated_penalty` under `penalty`; `clip`). Under
    `mask` a truncated baseline keeps its score (a baseline cannot leave the
    loss). Whitening is per batch, so it has no baseline counterpart; the
    drivers refuse it with a baseline ("ReMax: A Simple, Effective, and
    Efficient Reinforcement Learning Method for Aligning Large Language
    Models", 2023).
    """
    if reward_cfg.transform == "whiten":
        raise ValueError("a baseline has no whitened counterpart; reward.transform='whiten' is refused with one")
    out = np.asarray(scores_B, np.float32)
    if reward_cfg.truncated == "penalty":
        out = np.where(np.asarray(truncated_B, bool), np.float32(reward_cfg.truncated_penalty), out)
    if reward_cfg.transform == "clip":
        out = np.clip(out, -reward_cfg.clip, reward_cfg.clip)
    return out.astype(np.float32)


def rollout_logps(model: Decoder, params, batch: dict, *, temperature: float, top_k: int, top_p: float,
                  group_size: int = 1, max_new_tokens: int = 0) -> jax.Array:
    """Training-path log-probs `[R, L]` float32 of `model` on rollout rows
    under the sampling processing (temperature, top-k, top-p), so they match
    the sampler's. `batch` holds `tokens`, `attention_mask`, `positions`
    `[R, L]`.

    With `group_size` G > 1 the rows are rollout groups (G samples of one
    prompt, contiguous, L = P + max_new_tokens) and each group's prompt is
    encoded once (`scoring.group_token_logps`, "Accelerating Direct
    Preference Optimization with Prefix Sharing", 2024); the response
    log-probs are the same, the prompt columns are 0. Every forward the RL
    drivers run over rollout rows (reference, behaviour, update) goes
    through here.
    """
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    if group_size > 1:
        return group_token_logps(model, params, batch["tokens"], batch["attention_mask"], batch["positions"],
                                 batch["tokens"].shape[1] - max_new_tokens, group_size, **kw)
    return token_logps(model, params, batch["tokens"], batch["attention_mask"], batch["positions"], **kw)


@functools.lru_cache(maxsize=8)
def logps_fn(model: Decoder, temperature: float, top_k: int, top_p: float, group_size: int = 1,
             max_new_tokens: int = 0):
    """`rollout_logps` of `model`, jitted: `fn(params, batch) -> [R, L]`."""
    return jax.jit(functools.partial(rollout_logps, model, temperature=temperature, top_k=top_k, top_p=top_p,
                                     group_size=group_size, max_new_tokens=max_new_tokens))


def group_minibatches(rng: np.random.Generator, num_groups: int, group_size: int,
                      num_minibatches: int) -> list[np.ndarray]:
    """Row indices of `num_minibatches` minibatches of whole groups (rows
    g·G .. g·G + G − 1 stay together and in order), the groups shuffled by
    `rng` when there is more than one minibatch.

    Raises:
      ValueError: `num_minibatches` does not divide `num_groups`.
    """
    if num_groups % num_minibatches:
        raise ValueError(f"{num_minibatches} minibatches do not divide {num_groups} groups")
    groups = rng.permutation(num_groups) if num_minibatches > 1 else np.arange(num_groups)
    return [(part[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
            for part in np.split(groups, num_minibatches)]


def rollout_arrays(samples: SampleBatch) -> dict[str, np.ndarray]:
    """`tokens`, `attention_mask`, `positions` `[R, L]` of a rollout as numpy."""
    return {"tokens": np.asarray(samples.tokens_RL), "attention_mask": np.asarray(samples.attention_mask_RL),
            "positions": np.asarray(samples.positions_RL)}


def standard_error(x) -> float:
    """Standard error of the mean (ddof 1; 0 for fewer than two values)."""
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def best_of_n_points(model, params, split, score, sampling, max_n: int, seed: int, mesh) -> list[dict]:
    """Best-of-N of `model` on the eval prompts, picked by the training reward:
    per N, the KL bound, its √, and the mean of each reward (training reward,
    and e.g. gold) of the picks. The samples are drawn over `mesh`'s batch
    shards (`sample_rollout`)."""
    P = len(split["tokens"])
    samples = sample_rollout(model, params, split["tokens"], split["mask"], mesh,
                             rng=jax.random.PRNGKey(seed + 13), num_samples=max_n, **sampling)
    ids = np.repeat(np.arange(P), max_n)
    rew, extra = score(samples, ids, split)
    rew = np.asarray(rew).reshape(P, max_n)
    rows, n = [], 1
    while n <= max_n:
        pick = np.argmax(rew[:, :n], axis=1)
        row = {"N": n, "kl_bound": best_of_n_kl_bound(n), "sqrt_kl": math.sqrt(best_of_n_kl_bound(n)),
               "reward": float(rew[np.arange(P), pick].mean())}
        for name, v in extra.items():
            row[f"reward/{name}"] = float(np.asarray(v).reshape(P, max_n)[np.arange(P), pick].mean())
        rows.append(row)
        n *= 2
    return rows


def show_samples(policy, params, split, score, sampling, tokenizer, n: int, seed: int) -> None:
    """Prints n held-out prompts, the policy's completion and its reward."""
    n = min(n, len(split["tokens"]))
    out = generate(policy, params, split["tokens"][:n], split["mask"][:n], rng=jax.random.PRNGKey(seed + 17),
                   **{**sampling, "temperature": 0.0})
    samples = out.sequences()
    rew, _ = score(samples, np.arange(n), split)
    for i, text in enumerate(decode_completions(tokenizer, samples)):
        answer = split["columns"].get("answer", [None] * n)[i]
        print(f"\n### {split['texts'][i]}" + (f"  (answer {answer})" if answer is not None else "")
              + f"\n--- greedy completion, reward {float(rew[i]):.3f}\n{text}")


def plot_reward_vs_kl(path: str, points: list[dict], curve: list[dict], reward_name: str, title: str,
                      point_label: str = "policy") -> None:
    """Rewards of the eval points (`point_label`: a trained policy, VAS at
    each β, ...) against √KL (nats^½), with best-of-N against √(its KL
    bound): the axes of Gao et al. (2022)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = ["reward"] + sorted({c for p in points for c in p if c.startswith("reward/")})
    for i, key in enumerate(keys[:4]):
        label = reward_name if key == "reward" else key.split("/", 1)[1]
        color, marker = f"C{i}", "os^v"[i]
        ax.plot([p["sqrt_kl"] for p in points], [p[key] for p in points], "-", marker=marker, color=color,
                label=f"{point_label}: {label}")
        if curve:
            ax.plot([c["sqrt_kl"] for c in curve], [c[key] for c in curve], "--", marker=marker, color=color,
                    alpha=0.5, label=f"best-of-N: {label}")
    # Each point says what it is: β (VAS) or the step (a trained policy); each best-of-N point its N.
    for p in points:
        tag = f"β={p['beta']:g}" if "beta" in p else (f"{p['step']}" if "step" in p else "")
        ax.annotate(tag, (p["sqrt_kl"], p["reward"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for c in curve:
        ax.annotate(f"N={c['N']}", (c["sqrt_kl"], c["reward"]), fontsize=6, alpha=0.6, xytext=(3, -8),
                    textcoords="offset points")
    ax.ticklabel_format(useOffset=False)
    ax.set_xlabel("√KL(π‖π_ref)  (k3, nats^½; best-of-N: √ of its bound)")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    metrics_lib.save_figure(fig, path)


def synthetic_task(config: ml_collections.ConfigDict, vocab_size: int):
    """The counting task of `data.source = "synthetic"` (None otherwise)."""
    if config.data.source != "synthetic":
        return None
    from jaxreward.data.synthetic import CountingTask
    return CountingTask(vocab_size, config.synthetic.prompt_length, config.rollout.max_new_tokens,
                        seed=config.seed, label_beta=config.synthetic.label_beta)


def load_reference(config: ml_collections.ConfigDict, vocab_size: int, base_model, base_params):
    """`(model, params)` of the reference: the initial policy, or `reference.path`.

    Raises:
      UserError: the reference's vocabulary differs from the policy's.
    """
    if not config.reference.path:
        return base_model, base_params
    model, params, _ = jaxreward.load_pretrained(config.reference.path, dtype=config.model.dtype)
    if model.config.vocab_size != vocab_size:
        raise UserError(f"reference.path={config.reference.path!r} has vocabulary {model.config.vocab_size}, "
                        f"the policy {vocab_size}: they must share one tokenizer")
    return model, params


def sampling_kwargs(config: ml_collections.ConfigDict, tokenizer) -> dict:
    """`generate` keyword arguments of `config.rollout` (stop and pad ids from the tokenizer)."""
    from jaxreward.data.synthetic import PAD_ID
    ro = config.rollout
    return dict(max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_k=ro.top_k, top_p=ro.top_p,
                stop_ids=tokenizer.stop_ids if tokenizer else (),
                pad_id=tokenizer.pad_id if tokenizer else PAD_ID)


def check_minibatch_split(config: ml_collections.ConfigDict, mesh) -> None:
    """Each minibatch splits into whole groups over the mesh's batch shards and
    the micro-batches (`data.prompts.group_shard_check`), else a ConfigError."""
    from jaxreward.data.prompts import group_shard_check
    from jaxreward.train.defaults import ConfigError
    ro, a = config.rollout, config.algorithm
    rows = ro.prompts_per_step * ro.group_size // a.num_minibatches
    try:
        group_shard_check(rows, ro.group_size, mesh.shape["data"] * mesh.shape["fsdp"],
                          config.train.micro_batches)
    except ValueError as err:
        raise ConfigError(f"config fields rollout, algorithm.num_minibatches, train.micro_batches, mesh: "
                          f"{err}") from None


class RunState:
    """What resumes beside the train state(s): the prompt sampler and the KL β
    (JSON, saved in the checkpoint as its data state)."""

    def __init__(self, sampler, beta: float):
        self.sampler, self.beta = sampler, float(beta)

    def state(self) -> dict:
        return {"prompts": self.sampler.state(), "kl_beta": self.beta}

    def restore(self, state: dict) -> None:
        self.sampler.restore(state["prompts"])
        self.beta = float(state["kl_beta"])


def update_row_stats(logps_RL, old_logps_RL, advantages_RL, ref_logps_RL, mask_RL, clip_eps: float,
                     clip_eps_high: float) -> dict:
    """Per-row sums float32 `[R]` for the update's metrics (summed over
    micro-batches, then divided by the token count in `update_metrics`, so
    they do not depend on the split): tokens, −log π (entropy estimate),
    clipped tokens below 1 − ε_low (A < 0) and above 1 + ε_high (A > 0),
    ½(log ρ)² (approximate KL(π_old‖π)), ρ, and k1/k2/k3 against the reference."""
    from jaxreward.objectives.kl import kl_per_token
    from jaxreward.objectives.policy_gradient import MAX_LOG_RATIO
    sg = jax.lax.stop_gradient
    mask = mask_RL
    log_ratio = jnp.clip(jnp.where(mask, sg(logps_RL) - old_logps_RL, 0.0), -MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    clip_low = mask & (advantages_RL < 0) & (ratio < 1 - clip_eps)
    clip_hi = mask & (advantages_RL > 0) & (ratio > 1 + clip_eps_high)
    rowsum = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=1)
    out = {"tokens": rowsum(jnp.ones_like(ratio)), "neg_logp": rowsum(-sg(logps_RL)),
           "clip_low": rowsum(clip_low.astype(jnp.float32)), "clip_high": rowsum(clip_hi.astype(jnp.float32)),
           "approx_kl": rowsum(0.5 * log_ratio ** 2), "ratio": rowsum(ratio)}
    for name in ("k1", "k2", "k3"):
        out[f"kl_{name}"] = rowsum(sg(kl_per_token(logps_RL, ref_logps_RL, mask, name)))
    return out


def update_metrics(outputs: dict, with_kl: bool) -> dict:
    """Token means of `update_row_stats` over the whole minibatch: `entropy`
    (sampled-token estimate −E[log π(y_t)]), `clipfrac`, `clipfrac/low|high`,
    `approx_kl`, `ratio/mean`, and `update_kl/k1|k2|k3` when `with_kl`."""
    n = jnp.maximum(outputs["tokens"].sum(), 1.0)
    out = {"entropy": outputs["neg_logp"].sum() / n, "clipfrac/low": outputs["clip_low"].sum() / n,
           "clipfrac/high": outputs["clip_high"].sum() / n, "approx_kl": outputs["approx_kl"].sum() / n,
           "ratio/mean": outputs["ratio"].sum() / n}
    out["clipfrac"] = out["clipfrac/low"] + out["clipfrac/high"]
    if with_kl:
        for name in ("k1", "k2", "k3"):
            out[f"update_kl/{name}"] = outputs[f"kl_{name}"].sum() / n
    return out


def eval_point(policy, params, split: dict, score, sampling: dict, policy_logps, ref_logps, ref_params, *,
               samples_per_prompt: int, batch_size: int, mesh, seed: int) -> dict:
    """One eval point: samples of the policy on the held-out prompts (a fixed key,
    so every point sees the same draws' randomness), their reward (and the
    reward function's extras, e.g. gold) and KL(π‖π_ref) per response.

    KL is measured with the training-path log-probs of both models on the
    samples: k1 = Σ_t (log π − log π_ref) and k3 = Σ_t (e^{−x} − 1 + x),
    x the per-token log-ratio; both are unbiased for KL on the policy's own
    samples. `sqrt_kl` = √(mean k3), the x-axis of Gao et al. (2022): k3 is
    ≥ 0 per token, so the root never needs a clip. (√max(k1, 0) read 0
    whenever sampling noise made the mean k1 negative, as it does near the
    start, and clipping biases it.) The signed k1 stays in `kl_k1`, and the
    DPO plot puts k3 on its x-axis too. Each mean has its standard error
    (`*_se`) over responses.
    """
    from jaxreward.models.scoring import shift_mask
    samples = sample_rollout(policy, params, split["tokens"], split["mask"], mesh,
                             rng=jax.random.PRNGKey(seed + 7), num_samples=samples_per_prompt, **sampling)
    ids = np.repeat(np.arange(len(split["tokens"])), samples_per_prompt)
    rew, extra = score(samples, ids, split)
    arrays = rollout_arrays(samples)
    mask = np.asarray(shift_mask(samples.loss_mask_RL))
    lp = evaluate.score_all_rows(policy_logps, params, arrays, batch_size, mesh)
    ref = evaluate.score_all_rows(ref_logps, ref_params, arrays, batch_size, mesh)
    res = {"reward": float(np.mean(rew)), "reward_se": standard_error(rew), **eval_kl_stats(lp, ref, mask),
           "response_length": float(np.asarray(samples.response_mask_RM).sum(1).mean())}
    for name, v in extra.items():
        res[f"reward/{name}"] = float(np.mean(v))
    return res


def eval_kl_stats(logps_RL, ref_logps_RL, mask_RL) -> dict:
    """KL(π‖π_ref) per response from the two models' log-probs on the policy's
    samples: `kl_k1` (mean Σ_t x, signed), `kl_k3` (mean Σ_t k3(x), >= 0),
    each with `_se`, and `sqrt_kl` = √kl_k3 (see `eval_point`)."""
    x = np.where(mask_RL, np.asarray(logps_RL) - np.asarray(ref_logps_RL), 0.0)
    k1, k3 = x.sum(1), np.where(mask_RL, k3_terms(x), 0.0).sum(1)
    return {"kl_k1": float(k1.mean()), "kl_k1_se": standard_error(k1),
            "kl_k3": float(k3.mean()), "kl_k3_se": standard_error(k3),
            "sqrt_kl": math.sqrt(float(k3.mean()))}  # k3 >= 0 per token (k3_terms clamps round-off)


def explained_variance(values_RL, returns_RL, mask_RL) -> float:
    """1 − Var[returns − values] / Var[returns] over the valid tokens: 1 for a
    critic that predicts its targets, 0 for one no better than their mean
    (also 0 when the returns do not vary: nothing to explain)."""
    mask = np.asarray(mask_RL, bool)
    ret = np.asarray(returns_RL, np.float64)[mask]
    err = ret - np.asarray(values_RL, np.float64)[mask]
    var = ret.var() if ret.size else 0.0
    return float(1.0 - err.var() / var) if var > 0 else 0.0


VALUE_INITS = ("reward_model", "policy", "path")


def check_value_config(config: ml_collections.ConfigDict) -> None:
    """Checks `config.value` of a job with a value model (ppo, vas): `init`
    is one of `VALUE_INITS`, "reward_model" has a reward model to start
    from, "path" names an exported reward model or a decoder checkpoint.

    Raises:
      ConfigError: naming the field.
    """
    from jaxreward.train import defaults
    v, r = config.value, config.reward
    defaults.check_choice(config, "value.init", VALUE_INITS)
    if v.init == "reward_model" and r.kind not in ("proxy", "reward_model"):
        raise defaults.ConfigError(f"config field value.init: 'reward_model' needs a reward model "
                                   f"(reward.kind proxy or reward_model), got reward.kind={r.kind!r}; "
                                   "use value.init='policy' or 'path'")
    if (v.init == "reward_model" and r.kind == "reward_model" and r.reward_model_dir
            and ensemble_lib.is_ensemble_dir(r.reward_model_dir)):
        raise defaults.ConfigError(
            f"config field value.init: reward.reward_model_dir {r.reward_model_dir!r} is an ensemble "
            "export and the value model starts from one reward model; set value.init='path' with "
            f"value.path={os.path.join(r.reward_model_dir, 'member_0')!r}, or value.init='policy'")
    if v.init == "path":
        # An exported reward model, a checkpoint path or a known model name (check_pretrained knows both).
        if not v.path:
            defaults.check_path(config, "value.path", required=True)
        if not isinstance(v.path, str):
            raise defaults.ConfigError(f"config field value.path: a path or model name, got {v.path!r}")
        if ensemble_lib.is_ensemble_dir(v.path):
            raise defaults.ConfigError(
                f"config field value.path: {v.path!r} is an ensemble export and a value model starts "
                f"from one reward model: point it at one member, e.g. {os.path.join(v.path, 'member_0')!r}")
        if not os.path.exists(os.path.join(v.path, "reward_model.json")):
            defaults.check_pretrained(config, "value.path")
    defaults.check_int(config, "value.trainable_blocks", -1)


def value_model_init(config, workdir: str, policy_cfg, base_params, policy_tokenizer=None):
    """`(ValueModel, params)` of `config.value`.

    `value.init`: "reward_model" (the synthetic proxy in `<workdir>/proxy_reward_model`
    or `reward.reward_model_dir`; its head becomes the value head), "policy"
    (the initial policy's backbone, zero head), or "path" (`value.path`: an
    exported reward model, or an HF dir / .gguf / known name, zero head; it
    may be smaller than the policy but must share its tokenizer).

    Raises:
      UserError: the source's vocabulary size differs from the policy's, its
        tokenizer differs from `policy_tokenizer` (when both have one), or a
        reward-model source has more than one objective, or the source is
        missing or not a model (naming the config field).
    """
    from jaxreward.data.pipeline import tokenizer_fingerprint
    v, m = config.value, config.model
    if v.init == "policy":
        cfg, params = policy_cfg, value_params_from_policy(base_params)
    else:
        path = v.path
        if v.init == "reward_model":
            path = (os.path.join(workdir, "proxy_reward_model") if config.reward.kind == "proxy"
                    else config.reward.reward_model_dir)
        if os.path.exists(os.path.join(path, "reward_model.json")):
            rm, rm_params, _ = load_reward_model(path)
            if rm.num_objectives != 1:
                raise UserError(f"value model source {path} has {rm.num_objectives} objectives; the value "
                                "head needs a one-output reward model")
            cfg, params = rm.config, value_params_from_reward_model(rm_params)
        else:
            try:
                decoder, dec_params, tokenizer = jaxreward.load_pretrained(path, dtype=m.dtype)
            except (ValueError, OSError) as e:  # not a model (e.g. another run's workdir): name the field
                field = "value.path" if v.init == "path" else "reward.reward_model_dir"
                raise UserError(f"config field {field}: {path!r} is neither an exported reward model "
                                f"(reward_model.json) nor a decoder checkpoint ({e})") from None
            cfg, params = decoder.config, value_params_from_policy(dec_params)
            if (tokenizer is not None and policy_tokenizer is not None
                    and tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(policy_tokenizer)):
                raise UserError(f"value model source {path} has another tokenizer than the policy: a value "
                                "model must score the policy's own token ids")
        if cfg.vocab_size != policy_cfg.vocab_size:
            raise UserError(f"value model source {path} has vocabulary {cfg.vocab_size}, the policy "
                            f"{policy_cfg.vocab_size}: they must share one tokenizer")
    cfg = dataclasses.replace(cfg, dtype=m.dtype, remat=m.remat)
    tb = v.trainable_blocks
    return ValueModel(cfg, frozen_blocks=state_lib.frozen_blocks(cfg.num_layers, tb)), params


def k3_terms(x: np.ndarray) -> np.ndarray:
    """k3 = e^{−x} − 1 + x per token, x = log π − log π_ref, for metrics (host, numpy).

    k3 is never negative; as `expm1(−x) + x` in float32, x near 0 can round
    to about −1e-8, which a metric would show as a negative KL. Clamped at 0
    ("Approximating KL Divergence", Schulman, 2020).
    """
    x = np.asarray(x)
    return np.maximum(np.expm1(-x) + x, 0.0).astype(x.dtype, copy=False)
