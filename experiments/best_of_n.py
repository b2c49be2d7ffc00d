"""Best-of-N with a pretrained policy and a trained reward model (configs/best_of_n.py).

    python -m jaxreward.main --config=configs/best_of_n.py:smollm2 --workdir=DIR \
        --config.reward_model_dir=RM_RUN/reward_model

The policy samples N completions per chat prompt (prompt prefilled once,
its KV cache shared by the N continuations); a reward model exported by the
reward_model task ranks them (or, without one, the built-in length-free
demo reward); prints each prompt, the chosen completion and all rewards,
and writes `<workdir>/best_of_n.jsonl`.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

import jaxreward
from jaxreward.sampling.best_of_n import best_of_n, reward_model_fn, text_reward_fn
from jaxreward.models.reward_io import load_reward_model
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
    defaults.check_path(config, "reward_model_dir")


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (field `prompt`) file.

    Raises:
      ValueError: a .jsonl line that is not JSON or has no string `prompt`
        (file and line named).
    """
    if not path:
        return list(BUILTIN_PROMPTS)
    prompts = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: drop a byte-order mark
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    value = json.loads(line).get("prompt")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{path}:{i}: field 'prompt' must be a non-empty string")
                prompts.append(value)
            else:
                prompts.append(line.rstrip("\n"))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


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
    prompts = read_prompts(config.prompts_path)
    if config.reward_model_dir:
        rm, rm_params, meta = load_reward_model(config.reward_model_dir)
        if rm.config.vocab_size != policy.config.vocab_size:
            raise ValueError(f"reward model vocabulary ({rm.config.vocab_size}) differs from the "
                             f"policy's ({policy.config.vocab_size}); use the same tokenizer")
        reward_fn = reward_model_fn(rm, rm_params, objective=config.objective)
        reward_name = f"reward model {config.reward_model_dir}"
    else:
        # A transparent stand-in so the pipeline runs without a trained RM:
        # the fraction of distinct words (penalizes repetition).
        def distinct_words(prompt, response):
            words = response.split()
            return len(set(words)) / max(len(words), 1)
        reward_fn = text_reward_fn(tokenizer.decode, distinct_words)
        reward_name = "distinct-word fraction (no reward_model_dir given)"
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
        best_tokens = np.asarray(out.best.tokens_RM)
        best_mask = np.asarray(out.best.mask_RM)
        rewards = np.asarray(out.rewards_BN)
        for i, prompt in enumerate(batch):
            text = tokenizer.decode(best_tokens[i][best_mask[i]].tolist())
            row = {"prompt": prompt, "best": text, "best_index": int(out.best_index_B[i]),
                   "best_reward": float(rewards[i].max()), "rewards": rewards[i].tolist(),
                   "kl_bound": out.kl_bound}
            rows.append(row)
            print(f"\n### {prompt}\n--- best of {config.n} (sample {row['best_index']}, reward "
                  f"{row['best_reward']:.3f}; all: {np.array2string(rewards[i], precision=2)})\n"
                  f"{text}")
    print(f"\nKL(best-of-{config.n} || policy) <= log N - (N-1)/N = {rows[0]['kl_bound']:.4f} nats")
    with open(os.path.join(workdir, "best_of_n.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows
