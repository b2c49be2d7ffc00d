"""Reward model on preference pairs (experiments/reward_model.py).

    python -m jaxreward.main --config=configs/reward_model.py:smollm2_hh \
        --workdir=runs/rm_hh --config.data.train_path=PATH.jsonl.gz

Variants:
  synthetic (default): a tiny random decoder + head on pairs of random
    token responses labelled by the Bradley–Terry model of the counting
    task's gold reward (jaxreward/data/synthetic.py). No files; seconds.
  smollm2_hh: SmolLM2-135M-Instruct + head on HH-RLHF-format pairs (HH
    transcripts rendered with the model's chat template). Defaults fit a
    CPU budget: the head reads the mean over the response tokens of block
    20 of 30 (`reward.backbone_blocks`), the backbone is frozen and its
    features are computed once per pair (`reward.cache_features`), so
    training 5 epochs of 1,024 pairs costs one forward per pair. Unfreeze
    top blocks (`reward.trainable_blocks`, `reward.cache_features=False`)
    on an accelerator.
"""
import ml_collections

from jaxreward.train import defaults

VARIANTS = ("synthetic", "smollm2_hh")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/reward_model.py")
    c = ml_collections.ConfigDict()
    c.task = "reward_model"
    c.seed = 0                                 # seeds head init, data order, eval split
    c.model = ml_collections.ConfigDict(dict(
        pretrained="smollm2-135m-instruct",    # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype (bfloat16 on accelerators)
        remat=False,                           # rematerialize blocks in backward (saves memory)
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == "" (sizes in units)
            vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=500.0)),
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="jsonl",                        # jsonl | tfds | synthetic
        tfds_data_dir="~/tensorflow_datasets", # TFDS data dir (source=tfds)
        tfds_name="hh",                        # datasets jaxreward_pairs/<name>_{train,eval} (source=tfds)
        cache_dir="",                          # tokenized-array cache ("" = <workdir>/token_cache)
        train_path="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz",  # .jsonl[.gz] pairs
        eval_path="",                          # held-out file; "" holds out num_eval_pairs
        num_eval_pairs=256,                    # pairs held out of train_path when no eval_path
        format="auto",                         # auto | hh | trl | trl_chat | trl_implicit (data/preference.py)
        on_error="skip",                       # skip | raise, for malformed/degenerate lines
        hh_as_chat=True,                       # render HH transcripts with the chat template
        max_length=128,                        # tokens per sequence (prompt + response + EOS)
        max_prompt_length=64,                  # tokens of prompt kept, its end (0: adaptive, >= half)
        max_train_pairs=1024,                  # cap on train pairs (0 = all)
        max_eval_pairs=0,                      # cap on eval pairs (0 = all)
        batch_size=32,                         # pairs per optimizer step
        eval_batch_size=32,                    # pairs per eval / feature forward
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=4,                       # tokens per prompt
        response_length=6,                     # tokens per response (ragged: 2..R kept)
        label_beta=1.0,                        # Bradley–Terry β of the gold labels (1/reward unit)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        num_objectives=1,                      # K outputs of the head
        trainable_blocks=0,                    # top blocks trained with the head (-1 = all, 0 = head only)
        backbone_blocks=20,                    # keep the first n pretrained blocks, head on block n (0 = all)
        pooling="mean",                        # last (token) | mean (over response tokens)
        head_init_scale=0.0,                   # × the head's N(0, 1/(E+1)) init (0 = zero init)
        cache_features=True,                   # trainable_blocks=0 only: backbone features computed once
    ))
    c.loss = defaults.loss()
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=10)
    c.optimizer.head_lr_multiplier = 1.0       # head LR = learning_rate × this (e.g. 100 with blocks at 1e-5)
    c.train = defaults.train(num_steps=160, log_every=8)  # 5 epochs of 1,024 pairs
    c.train.eval_every = 32                    # held-out accuracy every 32 steps (the learning curve)
    c.train.checkpoint_every = 80              # steps between checkpoints
    c.mesh = defaults.mesh()

    if variant == "synthetic":
        c.model.pretrained = ""
        c.reward.update(backbone_blocks=0, pooling="last", head_init_scale=1.0, cache_features=False)
        c.data.update(max_prompt_length=0)
        c.train.eval_every = 0
        c.data.update(source="synthetic", train_path="", max_train_pairs=64, num_eval_pairs=48,
                      max_eval_pairs=0, batch_size=16, eval_batch_size=24)
        c.reward.trainable_blocks = -1
        c.optimizer = defaults.optimizer(learning_rate=3e-3, warmup_steps=2)
        c.optimizer.head_lr_multiplier = 1.0
        c.train = defaults.train(num_steps=40, log_every=5)
        c.train.checkpoint_every = 20
    return c
