"""Direct preference optimization and its family (experiments/dpo.py).

    python -m jaxreward.main --config=configs/dpo.py:synthetic --workdir=DIR
    python -m jaxreward.main --config=configs/dpo.py:smollm2_hh --workdir=DIR \
        --config.eval.reward_model_dir=runs/rm_hh/reward_model

Variants:
  synthetic (default): the quickstart's counting task. A tiny random decoder
    is the base policy; it samples two responses per random prompt, and the
    pairs are labelled by the Bradley–Terry model of the hidden gold reward
    (jaxreward/data/synthetic.py). The policy (a copy of the base) is
    trained on them; the reference is the base. Held-out samples are scored
    by the gold reward and compared with best-of-N of the base at the same
    KL. No files; about a minute on 2 CPU cores.
  smollm2_hh: SmolLM2-135M-Instruct on HH-RLHF-format pairs (transcripts
    rendered with the model's chat template), top `policy.trainable_blocks`
    blocks trained: one epoch of 512 pairs at 128 tokens, 256 held-out
    pairs, ~25 min on 2 CPU cores. Generation eval reports the KL to the
    reference, and reward / win rate / best-of-N when `eval.reward_model_dir`
    points at an exported reward model (configs/reward_model.py).

`loss.name` is any member of the objectives registry kind "preference"
(dpo, ipo, cdpo, robust_dpo, hinge, simpo, orpo, nca, apo_zero, apo_down,
bco_pair, exo, beta_dpo, cream, mixture; see jaxreward/objectives/README.md)
or of kind "unpaired_preference" (kto: each side of a pair is one example,
chosen desirable and rejected undesirable, or unpaired lines with
`data.format=feedback`).
Its hyper-parameters sit beside it under `loss`; a field left at None is not
passed, and a set field the loss does not take is refused by name.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from jaxreward.train import defaults

VARIANTS = ("synthetic", "smollm2_hh")


def loss() -> ml_collections.ConfigDict:
    """`name` + every hyper-parameter a "preference" loss may take (None = not passed)."""
    return ml_collections.ConfigDict(dict(
        name="dpo",                          # registry kind "preference" member
        beta=0.1,                            # β: KL coefficient (1/nats of log-ratio); SimPO: reward scale; ORPO: λ
        label_smoothing=placeholder(float),  # cdpo / robust_dpo: label-flip probability ε in [0, 0.5)
        gamma=placeholder(float),            # simpo: target reward margin γ (reward units)
        length_normalize=placeholder(bool),  # ipo: divide log-ratios by response length (TRL's IPO)
        epsilon=placeholder(float),          # exo: label smoothing ε in (0, 0.5)
        alpha=placeholder(float),            # beta_dpo: β_i = β·(1 + α(m_i − m_0)) (1/reward units)
        beta_min=placeholder(float),         # beta_dpo: floor of β_i (1/nats)
        consistency=placeholder(float),      # cream: self-consistency rate C in [0, 1] (one for all pairs)
        reference_point=placeholder(float),  # bco_pair: fixed δ (reward units; None = batch mean);
                                             # kto: fixed z_0 (nats; None = the batch's KL estimate)
        desirable_weight=placeholder(float),  # kto: λ_D, weight of desirable examples (default 1)
        undesirable_weight=placeholder(float),  # kto: λ_U, weight of undesirable examples (default 1)
        margin_reference=placeholder(float),  # beta_dpo: fixed m_0 (reward units; None = batch mean)
        components=placeholder(tuple),       # mixture: (("dpo", 1.0), ("ipo", 0.5, (("beta", 0.2),)), ...)
    ))


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/dpo.py")
    c = ml_collections.ConfigDict()
    c.task = "dpo"
    c.seed = 0                                 # seeds init, pair sampling, data order, eval samples

    c.model = ml_collections.ConfigDict(dict(  # the base policy
        pretrained="",                         # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype (bfloat16 on accelerators)
        remat=False,                           # rematerialize blocks in backward (saves memory)
        prefix_sharing=True,                   # encode each pair's prompt once: [prompt | chosen | rejected] rows
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == "" (sizes in units)
            vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=10000.0)),
    ))
    c.policy = ml_collections.ConfigDict(dict(
        trainable_blocks=-1,                   # top blocks trained + final norm (-1 = every policy param)
    ))
    c.reference = ml_collections.ConfigDict(dict(
        path="",                               # HF dir / .gguf / known name ("" = the initial policy)
        precompute=True,                       # log-probs once before training, cached in the workdir
                                               # (False: a stop-gradient forward inside every step)
        batch_size=64,                         # pairs per forward of the precompute pass
        sync_every=0,                          # TR-DPO: steps between soft updates of the reference (0 = never;
                                               # needs precompute=False)
        sync_alpha=0.6,                        # TR-DPO α in (0, 1]: π_ref <- α·π_θ + (1 − α)·π_ref (1 = hard copy)
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",                    # synthetic | jsonl
        train_path="",                         # .jsonl[.gz] pairs (source=jsonl)
        eval_path="",                          # held-out file; "" holds out num_eval_pairs of train_path
        num_eval_pairs=64,                     # pairs held out of train_path when no eval_path
        format="auto",                         # auto | hh | trl | trl_chat | trl_implicit (pairs, data/preference.py)
                                               # | feedback (unpaired prompt/completion/label lines: kto only)
        on_error="skip",                       # skip | raise, for malformed/degenerate lines
        hh_as_chat=True,                       # render HH transcripts with the chat template
        max_length=192,                        # tokens per sequence (prompt + response + EOS)
        max_prompt_length=0,                   # tokens of prompt kept (0: adaptive, >= half)
        max_train_pairs=0,                     # cap on train pairs (0 = all)
        max_eval_pairs=0,                      # cap on eval pairs (0 = all)
        cache_dir="",                          # tokenized-array cache ("" = <workdir>/token_cache)
        batch_size=32,                         # pairs per optimizer step
        eval_batch_size=128,                   # pairs per held-out forward
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=8,                       # tokens per prompt
        response_length=16,                    # tokens per sampled response
        num_train_pairs=2048,                  # pairs sampled from the base policy for training
        num_eval_pairs=256,                    # held-out pairs (implicit-reward accuracy)
        label_beta=2.0,                        # Bradley–Terry β of the gold labels (1/reward unit)
        temperature=1.0,                       # base-policy temperature when sampling the pairs
    ))
    c.loss = loss()
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=10)
    c.optimizer.weight_decay = 0.0            # no decay towards 0: the anchor is the reference, via β
    c.train = defaults.train(num_steps=150, log_every=10)
    c.train.eval_every = 50                    # steps between held-out evals (+ one at the end)
    c.train.checkpoint_every = 50              # steps between checkpoints
    c.eval = ml_collections.ConfigDict(dict(
        generate=True,                         # sample policy and reference at every eval point
        num_prompts=128,                       # held-out prompts
        samples_per_prompt=4,                  # samples per prompt from each of policy and reference
        reward_model_dir="",                   # exported reward model or ensemble ("" = gold reward if synthetic, else none)
        best_of_n_max_n=64,                    # best-of-N of the reference, N = 1, 2, 4, ..., max (0 = off)
        plot=True,                             # write reward_vs_kl.png (matplotlib)
    ))
    c.ensemble = defaults.ensemble()          # eval.reward_model_dir an ensemble export: how members combine
    c.sampling = ml_collections.ConfigDict(dict(  # generation eval and best-of-N
        max_new_tokens=16,                     # response tokens per sample
        temperature=1.0,                       # > 0; KL is between the processed distributions
        top_k=0,                               # keep the k most likely tokens (0 = all)
        top_p=1.0,                             # nucleus mass in (0, 1]
    ))
    c.export = True                            # write the policy as an HF checkpoint to <workdir>/policy
    c.mesh = defaults.mesh()

    if variant == "smollm2_hh":
        c.model.pretrained = "smollm2-135m-instruct"
        # Sized for 2 CPU cores (~30 min with the reference pass): one epoch of 512
        # pairs, 128 tokens (prompts keep their last 64), the top 4 blocks at 2e-4,
        # 256 held-out pairs so that the accuracy's 95% interval is about ±0.06.
        c.policy.trainable_blocks = 4
        c.reference.batch_size = 32
        c.data.update(source="jsonl", train_path="../shared/data/hh-rlhf/harmless-base-test.jsonl.gz",
                      num_eval_pairs=256, max_train_pairs=512, max_eval_pairs=256, max_length=128,
                      max_prompt_length=64, batch_size=8, eval_batch_size=32)
        c.optimizer = defaults.optimizer(learning_rate=2e-4, warmup_steps=4)
        c.train = defaults.train(num_steps=64, log_every=2)
        c.train.eval_every = 32
        c.train.checkpoint_every = 32
        # 48 prompts x 2 samples: the win rate's standard error is about ±0.05
        c.eval.update(num_prompts=48, samples_per_prompt=2, best_of_n_max_n=8)
        c.sampling.update(max_new_tokens=48, temperature=1.0)
    return c
