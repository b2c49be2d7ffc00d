"""On-policy RL without a critic: GRPO, RLOO, REINFORCE++, ReMax, Dr. GRPO, DAPO
(experiments/policy_gradient.py).

    python -m jaxreward.main --config=configs/rl.py:synthetic --workdir=DIR
    python -m jaxreward.main --config=configs/rl.py:synthetic --workdir=DIR --config.kl.beta=0.1
    python -m jaxreward.main --config=configs/rl.py:smollm2_arith --workdir=DIR

The methods differ only by named parts from the objectives registry:

| variant        | advantage (`algorithm.advantage`)       | aggregation (`loss_agg_mode`) | clip ε (low, high) | KL            |
|----------------|-----------------------------------------|-------------------------------|--------------------|---------------|
| synthetic/grpo | grpo (group mean / std)                 | seq-mean-token-mean           | 0.2, 0.2           | k3 in loss    |
| dr_grpo        | grpo, scale_by_std=False                | seq-mean-token-sum-norm       | 0.2, 0.2           | k3 in loss    |
| dapo           | grpo + dynamic filtering of flat groups | token-mean                    | 0.2, 0.28          | none          |
| rloo           | rloo (leave-one-out mean)               | token-mean                    | 0.2, 0.2           | k1 in reward  |
| reinforce_pp   | reinforce_pp (batch-whitened returns)   | token-mean                    | 0.2, 0.2           | k1 in reward  |
| remax          | remax (greedy response's reward)        | token-mean                    | 0.2, 0.2           | k1 in reward  |

Variants:
  synthetic (default), rloo, reinforce_pp, remax, dr_grpo, dapo: the
    quickstart's counting task (jaxreward/data/synthetic.py). A proxy reward
    model is trained first on noisy Bradley–Terry labels of the hidden gold
    reward, then the policy is optimized against the proxy; gold and proxy
    reward are logged against √KL and plotted beside best-of-N of the same
    proxy (the overoptimization study of "Scaling Laws for Reward Model
    Overoptimization", Gao et al., 2022). No files; a few minutes on 2 CPU cores.
  tiny: the synthetic task at test size (seconds).
  smollm2_arith: SmolLM2-135M-Instruct on generated arithmetic prompts
    ("What is 23 + 58?"), rewarded by exact match of the final number.
"""
import ml_collections
from ml_collections.config_dict import placeholder

from jaxreward.train import defaults

VARIANTS = ("synthetic", "rloo", "reinforce_pp", "remax", "dr_grpo", "dapo", "tiny", "smollm2_arith")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/rl.py")
    c = ml_collections.ConfigDict()
    c.task = "policy_gradient"
    c.seed = 0                                 # seeds init, proxy RM, prompt order, rollouts

    c.model = ml_collections.ConfigDict(dict(  # the initial policy (and reference)
        pretrained="",                         # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype (bfloat16 on accelerators)
        remat=False,                           # rematerialize blocks in backward (saves memory)
        prefix_sharing=True,                   # encode each group's prompt once in the update and reference forwards
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == ""
            vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=10000.0)),
    ))
    c.policy = ml_collections.ConfigDict(dict(
        trainable_blocks=-1,                   # top blocks trained + final norm (-1 = every param)
    ))
    c.reference = ml_collections.ConfigDict(dict(
        path="",                               # HF dir / .gguf / known name ("" = the initial policy)
        batch_size=64,                         # rows per reference forward
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",                    # synthetic | arithmetic | jsonl (prompts) | pairs (preference pairs' prompts)
        prompts_path="",                       # jsonl: .jsonl (`prompt`[, `answer`]) or .txt; pairs: HH/TRL .jsonl[.gz]
        on_error="skip",                       # skip | raise, for malformed prompt lines
        chat_template=True,                    # render text prompts as a user turn with the chat template
        max_prompt_length=128,                 # tokens; longer prompts keep their end (counted)
        num_prompts=512,                       # arithmetic: generated train prompts; synthetic: prompt pool; a file: unused (all its prompts)
        operand_low=10,                        # arithmetic: smallest operand (integer)
        operand_high=99,                       # arithmetic: largest operand (integer)
        num_eval_prompts=64,                   # held-out prompts for eval points
    ))
    c.synthetic = ml_collections.ConfigDict(dict(  # data.source == "synthetic" only
        prompt_length=8,                       # tokens per prompt
        label_beta=2.0,                        # Bradley–Terry β of the proxy's labels (1/reward unit)
        proxy_pairs=512,                       # pairs labelled for the proxy reward model (few = a weak proxy)
        proxy_steps=100,                       # proxy training steps (batch 32, lr 1e-3)
    ))
    c.reward = ml_collections.ConfigDict(dict(
        kind="proxy",                          # proxy | gold (synthetic) | reward_model | text
        reward_model_dir="",                   # kind=reward_model: an exported reward model or ensemble
        functions=(("exact_match", 1.0),),     # kind=text: (name, weight[, kwargs]) from jaxreward.rewards
        transform="none",                      # none | whiten | clip (objectives.transforms, on the batch)
        clip=5.0,                              # transform=clip: rewards clipped to [−clip, clip]
        truncated="score",                     # no EOS within max_new_tokens: score | penalty | mask
        truncated_penalty=-1.0,                # truncated=penalty: the reward such a completion gets
    ))
    c.ensemble = defaults.ensemble()          # reward.reward_model_dir an ensemble export: how members combine
    c.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=16,                   # B prompts per step
        group_size=8,                          # G completions per prompt (R = B·G rows)
        max_new_tokens=16,                     # M response tokens
        temperature=1.0,                       # sampling temperature (> 0); log-probs use the same
        top_k=0,                               # 0 = all
        top_p=1.0,                             # 1 = all
    ))
    c.algorithm = ml_collections.ConfigDict(dict(
        advantage="grpo",                      # grpo | rloo (group_advantage), reinforce_pp (token_advantage), remax
        scale_by_std=True,                     # grpo: divide by the group std (False = Dr. GRPO)
        gamma=1.0,                             # reinforce_pp: discount γ
        policy_loss="ppo",                     # ppo | gspo (registry kind policy_loss)
        clip_eps=0.2,                          # ε_low of the clipped ratio
        clip_eps_high=placeholder(float),      # ε_high (None = ε_low; DAPO: 0.28)
        loss_agg_mode="seq-mean-token-mean",   # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
        num_epochs=1,                          # passes over each rollout
        num_minibatches=1,                     # optimizer steps per pass (minibatches of whole groups)
        dynamic_sampling=False,                # DAPO: drop groups whose G rewards are all equal from the loss
        recompute_old_logps="auto",            # auto | always | never (auto: when the rollout is reused)
    ))
    c.kl = ml_collections.ConfigDict(dict(
        placement="loss",                      # loss | reward | none (none needs beta=0: refused otherwise)
        estimator="k3",                        # loss: k1 | k2 | k3 (k2: ∇KL(π‖π_ref); k3: ∇KL(π_ref‖π)); reward: k1
        beta=0.04,                             # β (1/nats)
        adaptive=False,                        # reward placement: adaptive β (Ziegler et al., 2019)
        target=6.0,                            # adaptive: target KL per response (nats)
        horizon=10000,                         # adaptive: horizon (rollout rows)
        measure=True,                          # compute reference log-probs for KL metrics even when β = 0
    ))
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=5)
    c.optimizer.weight_decay = 0.0
    c.train = defaults.train(num_steps=60, log_every=5)   # a step = one rollout + its updates
    c.train.eval_every = 10                    # steps between eval points (+ one at the start and end)
    c.train.checkpoint_every = 20              # steps between checkpoints
    c.eval = ml_collections.ConfigDict(dict(
        samples_per_prompt=4,                  # samples per held-out prompt at each eval point
        best_of_n_max_n=64,                    # best-of-N of the reference on the eval prompts (0 = off)
        plot=True,                             # reward_vs_kl.png
        show=3,                                # text tasks: completions printed at the end
    ))
    c.export = True                            # the policy as an HF checkpoint in <workdir>/policy
    c.mesh = defaults.mesh()

    if variant == "dr_grpo":
        c.algorithm.update(scale_by_std=False, loss_agg_mode="seq-mean-token-sum-norm")
    elif variant == "dapo":
        c.algorithm.update(clip_eps_high=0.28, loss_agg_mode="token-mean", dynamic_sampling=True)
        c.kl.update(placement="none", beta=0.0)
    elif variant in ("rloo", "reinforce_pp", "remax"):
        c.algorithm.update(advantage=variant, loss_agg_mode="token-mean")
        c.kl.update(placement="reward", estimator="k1", beta=0.05)
    elif variant == "tiny":
        c.model.arch.update(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
        c.synthetic.update(proxy_pairs=128, proxy_steps=10)
        c.data.update(num_prompts=32, num_eval_prompts=8)
        c.rollout.update(prompts_per_step=4, group_size=4, max_new_tokens=8)
        c.train.update(num_steps=4, log_every=1, eval_every=2, checkpoint_every=2, progress_bar=False)
        c.optimizer.warmup_steps = 1  # below the 4 steps (the default's 5 would be cut, with a warning)
        c.eval.update(samples_per_prompt=2, best_of_n_max_n=4)
    elif variant == "smollm2_arith":
        c.model.pretrained = "smollm2-135m-instruct"
        c.policy.trainable_blocks = 4
        # Operands 1..20: SmolLM2-135M answers ~27% of these right at temperature 0.7
        # (~7% for 10..99), so most groups of 8 carry a learning signal.
        c.data.update(source="arithmetic", num_prompts=256, num_eval_prompts=32, max_prompt_length=64,
                      operand_low=1, operand_high=20)
        c.reward.update(kind="text", functions=(("exact_match", 1.0),), truncated="score")
        c.rollout.update(prompts_per_step=4, group_size=8, max_new_tokens=32, temperature=0.7)
        c.algorithm.update(loss_agg_mode="seq-mean-token-mean")
        # No KL term and no reference forward in training (eval points still measure the KL).
        c.kl.update(placement="loss", estimator="k3", beta=0.0, measure=False)
        c.optimizer = defaults.optimizer(learning_rate=5e-5, warmup_steps=2)
        c.optimizer.weight_decay = 0.0
        c.train.update(num_steps=30, log_every=1, eval_every=15, checkpoint_every=15)
        c.eval.update(samples_per_prompt=2, best_of_n_max_n=0)
    return c
