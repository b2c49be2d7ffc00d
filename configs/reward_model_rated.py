"""Multi-objective reward model on rated responses (experiments/reward_model_rated.py).

    python -m jaxreward.main --config=configs/reward_model_rated.py --workdir=runs/rated
    python -m jaxreward.main --config=configs/reward_model_rated.py:smollm2_helpsteer \
        --workdir=runs/rated_hs --config.data.train_path=helpsteer.jsonl

A backbone + a K-output head regressed on K ratings per (prompt, response)
with a registered `rated_reward_loss` (default `regression`, HelpSteer2's
MSE); per-objective loss and Pearson correlation; scored at the end by a
weighted sum of the K outputs or their log-sigmoid AND.

Variants:
  synthetic (default): a tiny random decoder; random-token responses rated
    by K hidden linear functions of their token counts plus Gaussian noise
    (the quickstart's gold reward, K times). No files; about a minute.
  smollm2_helpsteer: SmolLM2-135M-Instruct + a 5-output head on a
    HelpSteer-style .jsonl (`data.train_path`; none ships with the repo):
    one JSON object per line,
        {"prompt": "...", "response": "...", "helpfulness": 3, "correctness": 4,
         "coherence": 4, "complexity": 2, "verbosity": 1}
    (`prompt` may also be a chat message list; with `data.attributes=()`
    each line holds `"ratings": [K numbers]` instead of named fields).
"""
import ml_collections

from jaxreward.train import defaults

VARIANTS = ("synthetic", "smollm2_helpsteer")
HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/reward_model_rated.py")
    c = ml_collections.ConfigDict()
    c.task = "reward_model_rated"
    c.seed = 0                                 # seeds head init, data order, eval split, synthetic data
    c.model = ml_collections.ConfigDict(dict(
        pretrained="smollm2-135m-instruct",    # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype (bfloat16 on accelerators)
        remat=False,                           # rematerialize blocks in backward (saves memory)
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == "" (sizes in units)
            vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=500.0)),
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="jsonl",                        # jsonl (records.read_rated) | synthetic
        train_path="",                         # .jsonl[.gz] rated records
        eval_path="",                          # held-out file; "" holds out num_eval_records of train_path
        attributes=HELPSTEER_ATTRIBUTES,       # the K rating fields in head order; () = `ratings` lists
        on_error="skip",                       # skip | raise, for malformed lines (file:line:field reported)
        prompt_as_chat=True,                   # a string prompt becomes one user message in the chat template
        max_length=256,                        # tokens per sequence (prompt + response + EOS)
        max_prompt_length=0,                   # tokens of prompt kept (0: adaptive, >= half)
        num_eval_records=128,                  # records held out of train_path when no eval_path
        max_train_records=0,                   # cap on train records (0 = all)
        max_eval_records=0,                    # cap on eval records (0 = all)
        center_targets=True,                   # subtract each rating's train mean (the head has no bias)
        batch_size=8,                          # records per optimizer step
        eval_batch_size=16,                    # records per eval forward
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=2,                       # tokens per prompt
        response_length=8,                     # tokens per response (ragged: 2..R kept)
        num_train_records=2048,                # rated training responses
        num_eval_records=512,                  # held-out rated responses
        noise_std=0.1,                         # Gaussian rating noise (rating units; the signal has std ~1)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        num_objectives=5,                      # K outputs of the head (= len(data.attributes) when named)
        trainable_blocks=2,                    # top blocks trained with the head (-1 = all)
    ))
    c.loss = ml_collections.ConfigDict(dict(
        name="regression",                     # rated_reward_loss registry name (jaxreward.objectives.registry)
        objective_weights=(),                  # K loss weights (Σ_k w_k mean_b loss_bk); () = plain mean
    ))
    c.scoring = ml_collections.ConfigDict(dict(
        combine="weighted_sum",                # weighted_sum (Σ_k w_k r_k) | log_sigmoid_and (Σ_k log σ(r_k − ref_k))
        weights=(),                            # K weights of weighted_sum; () = 1/K each
        quantile=0.5,                          # log_sigmoid_and: ref_k = this quantile of eval-set rewards
    ))
    c.optimizer = defaults.optimizer(learning_rate=1e-4, warmup_steps=4)
    c.train = defaults.train(num_steps=32, log_every=4)
    c.train.checkpoint_every = 16              # steps between checkpoints
    c.mesh = defaults.mesh()

    if variant == "synthetic":
        c.model.pretrained = ""
        c.data.update(source="synthetic", attributes=(), batch_size=64, eval_batch_size=256)
        c.reward.update(num_objectives=3, trainable_blocks=-1)
        c.optimizer = defaults.optimizer(learning_rate=3e-3, warmup_steps=10)
        c.train = defaults.train(num_steps=300, log_every=25)
        c.train.checkpoint_every = 150
    return c
