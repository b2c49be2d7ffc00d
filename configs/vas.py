"""Value-augmented sampling: a token value model trained by TD(λ) on the
frozen policy's samples, then value-guided decoding (experiments/vas.py).

    python -m jaxreward.main --config=configs/vas.py:synthetic --workdir=DIR
    python -m jaxreward.main --config=configs/vas.py:synthetic_proxy --workdir=DIR
    python -m jaxreward.main --config=configs/vas.py:compose --workdir=DIR
    python -m jaxreward.main --config=configs/vas.py:smollm2_hh --workdir=DIR \\
        --config.reward.reward_model_dir=RM_WORKDIR/reward_model

"Value Augmented Sampling for Language Model Alignment and Personalization"
(Han et al., 2024). The policy never trains: it samples completions once
(cached in the workdir, or read from `rollout.samples_path`), a reward scores
them, and a value model V(prefix) learns TD(λ) targets of that reward. At
decode time the policy's top-k tokens are re-weighted by
exp(β·(V(s, a) − mean_top-k V)); several value models combine as Σ_i β_i·V_i.

Variants:
  synthetic (default): the quickstart's counting task. Values of the hidden
    gold reward; a table over β (gold reward, KL from the base, decode
    seconds, value-forward tokens) beside best-of-N (N = 1…64) picked by the
    same reward; `reward_vs_kl.png`. No files; about two minutes on 2 CPU cores.
  synthetic_proxy: the same with a noisy proxy reward model (trained first on
    few Bradley–Terry labels of the gold reward) as the reward; the gold
    reward of each method is reported beside the proxy's.
  compose: synthetic + a second value model for a second user's hidden
    counting reward (`compose.kind = "second_gold"`); VAS with (β₁, β₂) on a
    grid shows the trade-off between the two rewards without retraining.
  tiny: the synthetic task at test size (seconds).
  smollm2_hh: SmolLM2-135M-Instruct as the frozen policy on the chat-rendered
    prompts of HH-RLHF harmless-base; a SmolLM2 value model (top 4 blocks
    train) learns the scores of an exported HH reward model
    (configs/reward_model.py:smollm2_hh writes one; pass
    reward.reward_model_dir); VAS against best-of-N at matched wall-clock.
"""
import ml_collections

from jaxreward.train import defaults

VARIANTS = ("synthetic", "synthetic_proxy", "compose", "tiny", "smollm2_hh")
HH_FILE = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/vas.py")
    c = ml_collections.ConfigDict()
    c.task = "vas"
    c.seed = 0                                 # seeds init, proxy RM, samples, minibatch order, decoding

    c.model = ml_collections.ConfigDict(dict(  # the frozen policy
        pretrained="",                         # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype of policy and value models
        remat=False,                           # rematerialize value-model blocks in backward
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == "" (sizes in units)
            vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=10000.0)),
    ))
    c.value = ml_collections.ConfigDict(dict(  # token value model: decoder + per-token scalar head
        init="policy",                         # policy (its backbone, zero head) | reward_model | path
        path="",                               # init=path: exported reward model, or HF dir / .gguf / name
        trainable_blocks=-1,                   # top blocks trained + final norm + head (-1 = every param)
        lam=0.95,                              # TD(λ) λ
        gamma=1.0,                             # discount γ per token
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",                    # synthetic | arithmetic | jsonl (prompts) | pairs (preference pairs)
        prompts_path="",                       # jsonl: .jsonl (`prompt`[, `answer`]) or .txt; pairs: HH/TRL .jsonl[.gz]
        on_error="skip",                       # skip | raise, for malformed prompt / pair lines
        chat_template=True,                    # render text prompts with the chat template
        max_prompt_length=128,                 # tokens; longer prompts keep their end (counted)
        num_prompts=512,                       # train prompts (generated; a prompt file: its first num_prompts)
        num_eval_prompts=64,                   # held-out prompts for the decoding comparison
        batch_size=64,                         # sample rows per value-model step
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=8,                       # tokens per prompt
        label_beta=2.0,                        # Bradley–Terry β of the proxy's labels (1/reward unit)
        proxy_pairs=128,                       # pairs labelled for the proxy reward model
        proxy_steps=100,                       # proxy training steps (batch 32, lr 1e-3)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        kind="gold",                           # synthetic data: gold | proxy | reward_model; text prompts
                                               # (arithmetic, jsonl, pairs): reward_model | text
        reward_model_dir="",                   # kind=reward_model: an exported reward model or ensemble
        functions=(("exact_match", 1.0),),     # kind=text: (name, weight[, kwargs]) from jaxreward.rewards
    ))
    c.ensemble = defaults.ensemble()          # reward.reward_model_dir an ensemble export: how members combine
    c.rollout = ml_collections.ConfigDict(dict(  # the frozen policy's samples (the value model's data)
        samples_per_prompt=4,                  # completions per train prompt
        max_new_tokens=16,                     # M response tokens
        temperature=1.0,                       # sampling temperature (> 0), also of decoding and best-of-N
        top_k=0,                               # kept 0: guided decoding takes its own top-k (guide.k)
        top_p=1.0,                             # kept 1
        batch_size=64,                         # prompts per sampling call
        samples_path="",                       # "" = <workdir>/samples.npz; another run's file reuses its samples
    ))
    c.guide = ml_collections.ConfigDict(dict(  # value-guided decoding on the eval prompts
        k=64,                                  # top-k candidates per step (clamped to the vocabulary)
        betas=(0.0, 1.0, 2.0, 4.0, 8.0, 16.0),  # β values (1/reward unit) of the sweep
        samples_per_prompt=4,                  # guided samples per eval prompt
    ))
    c.compose = ml_collections.ConfigDict(dict(  # a second value model for a second reward
        kind="",                               # "" (off) | second_gold (synthetic data) | text (text prompts)
        functions=(("length_target", 1.0, {"target": 64}),),  # kind=text: as reward.functions
        betas=(0.0, 4.0, 8.0),                 # the (β₁, β₂) grid is betas × betas
    ))
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=10)
    c.train = defaults.train(num_steps=128, log_every=8)  # value steps (an epoch = samples // batch_size)
    c.train.eval_every = 0                     # steps between held-out value diagnostics (0: at the end)
    c.train.checkpoint_every = 64
    c.eval = ml_collections.ConfigDict(dict(
        best_of_n_max_n=64,                    # best-of-N of the policy on the eval prompts, N = 1, 2, 4, ...,
                                               # this (a power of two; 0 = off)
        plot=True,                             # reward_vs_kl.png (and compose.png)
        show=3,                                # text tasks: prompts with base and guided completions
    ))
    c.mesh = defaults.mesh()

    if variant == "synthetic_proxy":
        c.reward.kind = "proxy"
    elif variant == "compose":
        c.compose.kind = "second_gold"
        c.guide.betas = (0.0, 4.0, 8.0)
    elif variant == "tiny":
        c.model.arch.update(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
        c.synthetic.update(proxy_pairs=64, proxy_steps=10)
        c.data.update(num_prompts=16, num_eval_prompts=4, batch_size=16)
        c.rollout.update(samples_per_prompt=2, max_new_tokens=6, batch_size=8)
        c.guide.update(k=8, betas=(0.0, 2.0), samples_per_prompt=2)
        c.compose.betas = (0.0, 2.0)
        c.train.update(num_steps=4, log_every=1, checkpoint_every=2, eval_every=2, progress_bar=False)
        c.optimizer.warmup_steps = 1  # below the 4 steps (the default's 10 would be cut, with a warning)
        c.eval.update(best_of_n_max_n=4)
    elif variant == "smollm2_hh":
        c.model.pretrained = "smollm2-135m-instruct"
        c.value.update(init="policy", trainable_blocks=4)
        c.data.update(source="pairs", prompts_path=HH_FILE, chat_template=True, max_prompt_length=96,
                      num_prompts=192, num_eval_prompts=16, batch_size=16)
        c.reward.kind = "reward_model"
        c.rollout.update(samples_per_prompt=2, max_new_tokens=32, batch_size=32)
        c.guide.update(k=10, betas=(0.0, 4.0, 16.0, 64.0), samples_per_prompt=2)
        c.optimizer = defaults.optimizer(learning_rate=1e-4, warmup_steps=4)
        c.train.update(num_steps=48, log_every=4, checkpoint_every=24)
        c.eval.update(best_of_n_max_n=8)
    return c
