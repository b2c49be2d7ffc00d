"""Best-of-N sampling from a pretrained policy, ranked by a trained reward model.

    python -m jaxreward.main --config=configs/best_of_n.py:smollm2 --workdir=runs/bon \
        --config.reward_model_dir=runs/rm_hh/reward_model

Variants:
  smollm2: SmolLM2-135M-Instruct samples N completions per chat prompt (from
    `prompts_path` — .txt one per line, or .jsonl with a `prompt` field — or
    a short built-in list; bad lines are skipped and counted, long prompts
    keep their last tokens) and a reward model from configs/reward_model.py
    ranks them.
"""
import ml_collections

from jaxreward.train import defaults

VARIANTS = ("smollm2",)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/best_of_n.py")
    c = ml_collections.ConfigDict()
    c.task = "best_of_n"
    c.seed = 0                                  # sampling seed
    c.model = ml_collections.ConfigDict(dict(
        pretrained="smollm2-135m-instruct",     # policy: HF dir, .gguf, or known name
        dtype="float32",                        # compute dtype
    ))
    c.reward_model_dir = ""                     # <workdir>/reward_model of a reward_model run
    c.objective = 0                             # which head output of reward_model_dir ranks samples
    c.text_reward = "distinct_words"            # jaxreward.rewards name, used without reward_model_dir
    c.ensemble = defaults.ensemble()           # reward_model_dir an ensemble export: how members combine
    c.prompts_path = ""                         # .txt / .jsonl prompts; "" = built-in list
    c.on_error = "skip"                         # skip | raise, for malformed prompt lines (skips are counted)
    c.max_prompt_length = 0                     # tokens; longer prompts keep their end, counted (0: what
                                                # fits beside sampling.max_new_tokens in the policy's context)
    c.prompt_batch_size = 4                     # prompts per sampling call
    c.n = 8                                     # samples per prompt (N)
    c.sampling = ml_collections.ConfigDict(dict(
        max_new_tokens=48,                      # tokens per completion (stop token included), >= 1
        temperature=0.7,                        # softmax temperature, > 0 (greedy would draw N equal samples)
        top_k=0,                                # keep the k most likely tokens (0 = all)
        top_p=0.95,                             # nucleus mass (1 = all)
    ))
    return c
