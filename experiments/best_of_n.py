"""Best-of-N with a pretrained policy and a trained reward model (configs/best_of_n.py).

    python -m jaxreward.main --config=configs/best_of_n.py:smollm2 --workdir=DIR \
        --config.reward_model_dir=RM_RUN/reward_model

The policy samples N completions per chat prompt (prompt prefilled once,
its KV cache shared by the N continuations); a reward model exported by the
reward_model task ranks them (or, without one, the built-in length-free
demo reward); prints each prompt, the chosen completion and all rewards,
and writes `<workdir>/best_of_n.jsonl`: per prompt, all N completions
with their rewards, the chosen index and the KL bound.

`reward_model_dir` may also be an ensemble export (`ensemble.json` + member
folders, e.g. `<quickstart workdir>/reward_ensemble`): its members' rewards
combine by `ensemble.aggregate` (mean | min | mean_minus_std, the last with
λ = `ensemble.std_coef`), chosen here at scoring time.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

import jaxreward
from jaxreward.sampling.best_of_n import best_of_n, text_reward_fn
from jaxreward.models import ensemble as ensemble_lib
from jaxreward.data.records import read_prompts as read_prompts_file
from jaxreward import rewards
from jaxreward.errors import UserError
from jaxreward.train import defaults

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "How do I politely decline a meeting invitation?",
    "Write a haiku about the sea.",
)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.check_path(config, "prompts_path")
    defaults.check_int(config, "n", 1)
    defaults.check_int(config, "prompt_batch_size", 1)
    defaults.check_int(config, "objective", 0)
    defaults.check_choice(config, "text_reward", rewards.names())
    defaults.check_path(config, "reward_model_dir")
    ensemble_lib.check_config_block(config)


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (field `prompt`) file,
    read and validated by `data.records.read_prompts`; the built-in list
    when `path` is empty.

    Raises:
      DataError: the first bad line, naming file, line and field.
    """
    if not path:
        return list(BUILTIN_PROMPTS)
    records, _ = read_prompts_file(path, on_error="raise")
    return [r.prompt for r in records]


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Chat-rendered, left-padded prompt arrays `[B, T]`."""
    ids = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                             add_generation_prompt=True)
        ids.append(tokenizer.encode(text, add_bos=tokenizer.add_bos))
    T = max(map(len, ids))
    tokens = np.full((len(ids), T), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(ids), T), bool)
    for i, row in enumerate(ids):
        tokens[i, T - len(row):] = row
        mask[i, T - len(row):] = True
    return tokens, mask


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    policy, params, tokenizer = jaxreward.load_pretrained(config.model.pretrained,
                                                          dtype=config.model.dtype)
    if tokenizer is None:
        raise UserError(f"model.pretrained={config.model.pretrained!r} has no tokenizer; best-of-N "
                        "renders text prompts with its chat template")
    prompts = read_prompts(config.prompts_path)
    if config.reward_model_dir:
        reward_fn, reward_name = ensemble_lib.reward_fn_for(
            config, config.reward_model_dir, policy.config.vocab_size, objective=config.objective)
    else:
        # Without a trained RM, a registered Python text reward ranks the samples.
        text_fn = rewards.get(config.text_reward)
        reward_fn = text_reward_fn(
            tokenizer.decode, lambda p, r: float(rewards.call(text_fn, [p], [r])[0]))
        reward_name = f"text reward {config.text_reward!r} (no reward_model_dir given)"
    print(f"policy {config.model.pretrained}; ranking {config.n} samples per prompt by {reward_name}")

    s = config.sampling
    rows = []
    for start in range(0, len(prompts), config.prompt_batch_size):
        batch = prompts[start:start + config.prompt_batch_size]
        tokens, mask = encode_prompts(tokenizer, batch)
        out = best_of_n(policy, params, tokens, mask, reward_fn, n=config.n,
                        rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), start),
                        max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, stop_ids=tokenizer.stop_ids,
                        pad_id=tokenizer.pad_id)
        tokens_RM = np.asarray(out.samples.tokens_RM)
        mask_RM = np.asarray(out.samples.mask_RM)
        rewards_BN = np.asarray(out.rewards_BN)
        for i, prompt in enumerate(batch):
            rows_i = range(i * config.n, (i + 1) * config.n)  # row b * N + j is sample j
            completions = [tokenizer.decode(tokens_RM[r][mask_RM[r]].tolist()) for r in rows_i]
            best = int(out.best_index_B[i])
            text = completions[best]
            row = {"prompt": prompt, "best": text, "best_index": best,
                   "best_reward": float(rewards_BN[i].max()), "rewards": rewards_BN[i].tolist(),
                   "completions": completions, "kl_bound": out.kl_bound}
            rows.append(row)
            print(f"\n### {prompt}\n--- best of {config.n} (sample {row['best_index']}, reward "
                  f"{row['best_reward']:.3f}; all: {np.array2string(rewards_BN[i], precision=2)})\n"
                  f"{text}")
    print(f"\nKL(best-of-{config.n} || policy) <= log N - (N-1)/N = {rows[0]['kl_bound']:.4f} nats")
    with open(os.path.join(workdir, "best_of_n.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
