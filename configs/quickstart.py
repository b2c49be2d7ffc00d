"""Quickstart: proxy reward model vs a known gold reward, then best-of-N.

A tiny decoder (~1M params) samples pairs of responses to random prompts;
pairs are labelled by the Bradley–Terry model of a hidden gold reward (linear
in token counts, see jaxreward/data/synthetic.py); a proxy reward model
(the same decoder + a head) is trained on them; best-of-N for N = 1..64 is
scored by proxy and gold reward next to the KL bound log N − (N−1)/N.
Needs no files. Runs in a few minutes on 2 CPU cores.

    python -m jaxreward.main --config=configs/quickstart.py --workdir=runs/quickstart

Variants: `default`, `tiny` (seconds; used by tests), `ensemble` (a weak
proxy from 512 pairs and an ensemble of 4 reward models trained beside it,
best-of-N ranked by the proxy vs the ensemble's mean, mean − λ·std and min;
a few minutes), `ensemble_tiny` (its test-sized version).
"""
import ml_collections

from jaxreward.train import defaults


VARIANTS = ("default", "tiny", "ensemble", "ensemble_tiny")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/quickstart.py")
    c = ml_collections.ConfigDict()
    c.task = "quickstart"
    c.seed = 0                        # seeds init, data order, sampling

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=64,                # tokens (0 = padding)
        hidden_size=128,              # model width
        intermediate_size=512,        # SwiGLU hidden width
        num_layers=4,                 # transformer blocks
        num_heads=4,                  # query heads
        num_kv_heads=2,               # key/value heads (GQA)
        rope_theta=10000.0,           # RoPE base
        tie_embeddings=True,          # output layer shares the embedding matrix
        dtype="float32",              # compute dtype
    ))
    c.synthetic = ml_collections.ConfigDict(dict(
        prompt_length=8,              # tokens per prompt
        response_length=16,           # tokens per sampled response
        num_train_pairs=4096,         # labelled pairs for the proxy RM
        num_eval_pairs=512,           # held-out pairs
        label_beta=2.0,               # Bradley–Terry β of the gold labels (1/reward unit)
        temperature=1.0,              # base-policy sampling temperature
    ))
    c.reward = ml_collections.ConfigDict(dict(
        num_objectives=1,             # K outputs of the head
        trainable_blocks=-1,          # top blocks trained (-1 = all)
    ))
    c.data = ml_collections.ConfigDict(dict(
        batch_size=32,                # pairs per optimizer step
        eval_batch_size=256,          # pairs per eval forward
    ))
    c.best_of_n = ml_collections.ConfigDict(dict(
        num_prompts=128,              # held-out prompts
        max_n=64,                     # largest N; N = 1, 2, 4, ..., max_n (nested subsets)
    ))
    c.ensemble = ml_collections.ConfigDict(dict(
        size=0,                       # E reward models trained beside the proxy in one vmapped step (0/1: none)
        std_coef=1.0,                 # λ of the mean − λ·std aggregate (reward units per member std)
        score_chunk_size=2048,        # sampled rows per vmapped ensemble forward when ranking best-of-N
    ))
    c.loss = defaults.loss()
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=20)
    c.train = defaults.train(num_steps=200, log_every=20)
    c.train.checkpoint_every = 100    # steps between checkpoints
    c.mesh = defaults.mesh()

    if variant in ("ensemble", "ensemble_tiny"):
        # A deliberately weak proxy (few pairs), so over-optimization can show;
        # 100 steps (6 epochs of the 512 pairs) keep the 5 models' training short.
        c.synthetic.num_train_pairs = 512
        c.ensemble.size = 4
        c.train.update(num_steps=100, log_every=10, checkpoint_every=50)
    if variant in ("tiny", "ensemble_tiny"):
        c.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1)
        c.synthetic.update(num_train_pairs=256, num_eval_pairs=64)
        c.data.update(batch_size=32, eval_batch_size=64)
        c.best_of_n.update(num_prompts=16, max_n=8)
        c.train.update(num_steps=20, log_every=5, checkpoint_every=10)
        c.optimizer.warmup_steps = 4  # below the 20 steps (the default's 20 would be cut, with a warning)
    if variant == "ensemble_tiny":
        c.ensemble.size = 3
    return c
