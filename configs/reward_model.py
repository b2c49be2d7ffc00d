"""Reward model on preference pairs (experiments/reward_model.py).

    python -m jaxreward.main --config=configs/reward_model.py:smollm2_hh \
        --workdir=runs/rm_hh --config.data.train_path=PATH.jsonl.gz

Variants:
  synthetic (default): a tiny random decoder + head on pairs of random
    token responses labelled by the Bradley–Terry model of the counting
    task's gold reward (jaxreward/data/synthetic.py). No files; seconds.
  smollm2_hh: SmolLM2-135M-Instruct + head on HH-RLHF-format pairs (HH
    transcripts rendered with the model's chat template).
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
        num_eval_pairs=128,                    # pairs held out of train_path when no eval_path
        format="auto",                         # auto | hh | trl | trl_chat | trl_implicit (data/preference.py)
        on_error="skip",                       # skip | raise, for malformed/degenerate lines
        hh_as_chat=True,                       # render HH transcripts with the chat template
        max_length=192,                        # tokens per sequence (prompt + response + EOS)
        max_prompt_length=0,                   # tokens of prompt kept (0: adaptive, >= half)
        max_train_pairs=256,                   # cap on train pairs (0 = all)
        max_eval_pairs=128,                    # cap on eval pairs (0 = all)
        batch_size=8,                          # pairs per optimizer step
        eval_batch_size=16,                    # pairs per eval forward
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=4,                       # tokens per prompt
        response_length=6,                     # tokens per response (ragged: 2..R kept)
        label_beta=1.0,                        # Bradley–Terry β of the gold labels (1/reward unit)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        num_objectives=1,                      # K outputs of the head
        trainable_blocks=2,                    # top blocks trained with the head (-1 = all)
    ))
    c.loss = defaults.loss()
    c.optimizer = defaults.optimizer(learning_rate=5e-5, warmup_steps=4)
    c.train = defaults.train(num_steps=32, log_every=4)
    c.train.checkpoint_every = 16              # steps between checkpoints
    c.mesh = defaults.mesh()

    if variant == "synthetic":
        c.model.pretrained = ""
        c.data.update(source="synthetic", train_path="", max_train_pairs=64, num_eval_pairs=48,
                      max_eval_pairs=0, batch_size=16, eval_batch_size=24)
        c.reward.trainable_blocks = -1
        c.optimizer = defaults.optimizer(learning_rate=3e-3, warmup_steps=2)
        c.train = defaults.train(num_steps=40, log_every=5)
        c.train.checkpoint_every = 20
    return c
