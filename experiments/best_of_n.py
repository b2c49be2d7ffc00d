"""Best-of-N with a pretrained policy and a trained reward model (configs/best_of_n.py).

    python -m jaxreward.main --config=configs/best_of_n.py:smollm2 --workdir=DIR \
        --config.reward_model_dir=RM_RUN/reward_model

The policy samples N completions per chat prompt (prompt prefilled once,
its KV cache shared by the N continuations); a reward model exported by the
reward_model task ranks them (or, without one, the built-in length-free
demo reward); prints each prompt, the chosen completion and all rewards,
and writes `<workdir>/best_of_n.jsonl`: per prompt, all N completions
with their rewards, the chosen index and the KL bound.

Bad prompt lines are skipped and counted (`on_error`); prompts longer than
`max_prompt_length` tokens (0: what fits beside `sampling.max_new_tokens` in
the policy's context) keep their last tokens, counted.

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
from jaxreward.train import defaults, rollout

BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "How do I politely decline a meeting invitation?",
    "Write a haiku about the sea.",
)


# Checked here with narrower ranges than the shared checks (defaults.check_common skips them).
STRICT_FIELDS = ("sampling.temperature", "sampling.max_new_tokens")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks this job's own fields (the shared blocks are checked by main)."""
    defaults.check_path(config, "prompts_path")
    defaults.check_choice(config, "on_error", ("skip", "raise"))
    defaults.check_int(config, "max_prompt_length", 0)
    defaults.check_int(config, "n", 1)
    defaults.check_int(config, "prompt_batch_size", 1)
    # Greedy decoding would draw N identical samples; an empty completion has nothing to rank.
    defaults.check_float(config, "sampling.temperature", 0.0, low_open=True)
    defaults.check_int(config, "sampling.max_new_tokens", 1)
    defaults.check_int(config, "objective", 0)
    defaults.check_choice(config, "text_reward", rewards.names())
    defaults.check_path(config, "reward_model_dir")
    ensemble_lib.check_config_block(config)
    if not config.reward_model_dir:
        if config.objective:
            raise defaults.ConfigError(f"config field objective={config.objective}: without reward_model_dir "
                                       f"the text reward {config.text_reward!r} ranks, and it has 1 objective")
        return
    ensemble_lib.check_export_dir(config, "reward_model_dir")
    k = export_objectives(config.reward_model_dir)
    if k is not None and config.objective >= k:
        raise defaults.ConfigError(f"config field objective={config.objective}: the reward model has {k} "
                                   "objective(s)")


def export_objectives(directory: str) -> int | None:
    """K, the head outputs of the reward-model or ensemble export in
    `directory`, read from its JSON before any weights load; None when the
    JSON cannot tell (loading the export then names the damage)."""
    name = ensemble_lib.ENSEMBLE_FILE if ensemble_lib.is_ensemble_dir(directory) else "reward_model.json"
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            k = json.load(f).get("num_objectives")
    except (OSError, ValueError, AttributeError):
        return None
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def read_prompts(path: str, on_error: str = "skip") -> list[str]:
    """Prompts from a .txt (one per line) or .jsonl (field `prompt`) file,
    read and validated by `data.records.read_prompts` (bad lines skipped and
    counted in the printed summary, or with on_error="raise" the first one
    raised); the built-in list when `path` is empty.

    Raises:
      DataError: on_error="raise": the first bad line, naming file, line and field.
      UserError: no usable prompt in the file.
    """
    return read_prompt_split(path, on_error)["texts"]


def read_prompt_split(path: str, on_error: str = "skip") -> dict:
    """`read_prompts`' prompts as a split of `rollout.prompt_set`: `texts`,
    `sources` (file:line) and `columns` (`answer`, where the file gives
    answers; none for the built-in list), for the text rewards."""
    if not path:
        return {"texts": list(BUILTIN_PROMPTS), "sources": [None] * len(BUILTIN_PROMPTS), "columns": {}}
    records, report = read_prompts_file(path, on_error=on_error)
    if not records:
        raise UserError(f"config field prompts_path: no prompt left to sample from; {report.summary()}")
    print(report.summary())
    answers = [r.answer for r in records]
    return {"texts": [r.prompt for r in records], "sources": [r.source for r in records],
            "columns": {"answer": answers} if any(a is not None for a in answers) else {}}


def text_reward_rows(tokenizer, name: str, columns: dict, first: int, n: int):
    """The `best_of_n` reward function of the registered text reward `name`
    for the prompts `first`, `first + 1`, …: row r (sample r % n of prompt
    first + r // n) is scored on its decoded prompt and response, with that
    prompt's `columns` (e.g. its `answer`), one row per call."""
    text_fn = rewards.get(name)

    def fn(prompt: str, response: str, row: int) -> float:
        cols = {k: [v[first + row // n]] for k, v in columns.items()}
        return float(rewards.call(text_fn, [prompt], [response], cols)[0])
    return text_reward_fn(tokenizer.decode, fn, with_row=True)


def prompt_length_cap(config: ml_collections.ConfigDict, max_positions: int) -> int:
    """Prompt tokens kept (the last ones): `max_prompt_length`, or with 0
    all that fit beside `sampling.max_new_tokens` in the policy's
    `max_positions`.

    Raises:
      UserError: naming the field, when prompt + max_new_tokens cannot fit.
    """
    M, cap = config.sampling.max_new_tokens, config.max_prompt_length
    room = max_positions - M
    if room < 1:
        raise UserError(f"config field sampling.max_new_tokens={M}: leaves no room for a prompt in the "
                        f"policy's max_position_embeddings {max_positions}")
    if cap > room:
        raise UserError(f"config field max_prompt_length={cap}: with sampling.max_new_tokens={M} it exceeds "
                        f"the policy's max_position_embeddings {max_positions}; use at most {room} "
                        "(0: as many as fit)")
    return cap or room


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    split = read_prompt_split(config.prompts_path, config.on_error)  # a bad file fails before the model loads
    prompts = split["texts"]
    if not config.reward_model_dir:  # a reward that cannot score these prompts (e.g. no answers), up front
        rollout.check_text_rewards([(config.text_reward, 1.0)], {"prompts": split}, field="text_reward",
                                   before="the policy loads")
    policy, params, tokenizer = jaxreward.load_pretrained(config.model.pretrained,
                                                          dtype=config.model.dtype)
    if tokenizer is None:
        raise UserError(f"model.pretrained={config.model.pretrained!r} has no tokenizer; best-of-N "
                        "renders text prompts with its chat template")
    # Left-padded `[B, P]` per sampling call, chat-rendered when the tokenizer has a template;
    # a longer prompt keeps its last `cap` tokens (VAS and the RL drivers encode theirs alike).
    cap = prompt_length_cap(config, policy.config.max_position_embeddings)
    bs = config.prompt_batch_size
    starts = range(0, len(prompts), bs)
    encoded = [rollout.encode_prompts(tokenizer, prompts[lo:lo + bs], cap, chat=True) for lo in starts]
    cut = sum(c for _, _, c in encoded)
    if cut:
        why = ("max_prompt_length" if config.max_prompt_length else
               f"max_prompt_length=0: what fits beside sampling.max_new_tokens={config.sampling.max_new_tokens} "
               f"in max_position_embeddings {policy.config.max_position_embeddings}")
        print(f"{cut} of {len(prompts)} prompts were longer than {cap} tokens ({why}) and keep their last tokens")
    if config.reward_model_dir:
        reward_fn, reward_name = ensemble_lib.reward_fn_for(
            config, config.reward_model_dir, policy.config.vocab_size, objective=config.objective)
    else:
        # Without a trained RM, a registered Python text reward ranks the samples.
        reward_fn = None  # per prompt batch, with its rows of the prompt file's columns (answers)
        reward_name = f"text reward {config.text_reward!r} (no reward_model_dir given)"
    print(f"policy {config.model.pretrained}; ranking {config.n} samples per prompt by {reward_name}")

    s = config.sampling
    rows = []
    for lo, (tokens, mask, _) in zip(starts, encoded):
        batch = prompts[lo:lo + bs]
        batch_fn = reward_fn or text_reward_rows(tokenizer, config.text_reward, split["columns"], lo, config.n)
        out = best_of_n(policy, params, tokens, mask, batch_fn, n=config.n,
                        rng=jax.random.fold_in(jax.random.PRNGKey(config.seed), lo),
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
