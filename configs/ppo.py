"""PPO with a value model, KL in the reward (experiments/ppo.py).

    python -m jaxreward.main --config=configs/ppo.py:synthetic --workdir=DIR
    python -m jaxreward.main --config=configs/ppo.py:smollm2_hh --workdir=DIR \\
        --config.reward.reward_model_dir=RM_WORKDIR/reward_model

The policy is trained with the PPO clip loss on GAE advantages of per-token
rewards (the sequence reward on the last token minus β·k1 per token); a
separate value model (decoder + per-token scalar head, its own optimizer)
learns the GAE returns with a clipped value loss.

Variants:
  synthetic (default): the counting task of configs/rl.py:synthetic. A proxy
    reward model is trained first on noisy Bradley–Terry labels of the
    hidden gold reward; the policy is optimized against the proxy, the value
    model starts from the proxy (its head is the value head); gold and proxy
    reward are logged against √KL beside best-of-N of the same proxy. No
    files; a few minutes on 2 CPU cores.
  tiny: the synthetic task at test size (seconds).
  smollm2_hh: SmolLM2-135M-Instruct prompted with the (chat-rendered) prompts
    of the HH-RLHF harmless-base test file, rewarded by an exported HH reward
    model (configs/reward_model.py:smollm2_hh writes one to
    <workdir>/reward_model; pass it as reward.reward_model_dir), which also
    initializes the value model. Top 4 blocks of the policy and of the value
    model train. 24 steps take ~23 minutes on 2 CPU cores; the held-out
    RM reward rises from 0.05 to 0.32 (README, "What the runs show").
"""
import ml_collections
from ml_collections.config_dict import placeholder

from jaxreward.train import defaults

VARIANTS = ("synthetic", "tiny", "smollm2_hh")
HH_FILE = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    variant = defaults.pick_variant(variant, VARIANTS, "configs/ppo.py")
    c = ml_collections.ConfigDict()
    c.task = "ppo"
    c.seed = 0                                 # seeds init, proxy RM, prompt order, rollouts, minibatches

    c.model = ml_collections.ConfigDict(dict(  # the initial policy (and reference)
        pretrained="",                         # HF dir, .gguf file, or a known name ("" = random `arch`)
        dtype="float32",                       # compute dtype of policy, reference and value model
        remat=False,                           # rematerialize blocks in backward (saves memory)
        prefix_sharing=True,                   # encode each group's prompt once (reference, values, updates)
        arch=ml_collections.ConfigDict(dict(   # random decoder when pretrained == "" (sizes in units)
            vocab_size=64, hidden_size=64, intermediate_size=256, num_layers=2,
            num_heads=4, num_kv_heads=2, rope_theta=10000.0)),
    ))
    c.policy = ml_collections.ConfigDict(dict(
        trainable_blocks=-1,                   # top blocks trained + final norm (-1 = every param)
    ))
    c.reference = ml_collections.ConfigDict(dict(
        path="",                               # HF dir / .gguf / known name ("" = the initial policy)
        batch_size=64,                         # rows per reference / value / old-log-prob forward
    ))
    c.value = ml_collections.ConfigDict(dict(  # the critic: decoder + per-token scalar head
        init="reward_model",                   # reward_model (proxy / reward.reward_model_dir) | policy (0 head) | path
        path="",                               # init=path: exported reward model dir, or HF dir / .gguf / name
        trainable_blocks=-1,                   # top blocks trained + final norm + head (-1 = every param)
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",                    # synthetic | arithmetic | jsonl (prompts) | pairs (preference pairs)
        prompts_path="",                       # jsonl: .jsonl (`prompt`[, `answer`]) or .txt; pairs: HH/TRL .jsonl[.gz]
        on_error="skip",                       # skip | raise, for malformed prompt / pair lines
        chat_template=True,                    # render text prompts (pairs: HH transcripts) with the chat template
        max_prompt_length=128,                 # tokens; longer prompts keep their end (counted)
        num_prompts=512,                       # arithmetic: generated train prompts; synthetic: prompt pool; a file: unused (all its prompts)
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
        reward_model_dir="",                   # kind=reward_model: an exported reward model or ensemble (reward_model/, reward_ensemble/)
        functions=(("exact_match", 1.0),),     # kind=text: (name, weight[, kwargs]) from jaxreward.rewards
        transform="none",                      # none | whiten | clip (objectives.transforms, on the batch)
        clip=5.0,                              # transform=clip: rewards clipped to [−clip, clip] (reward units)
        truncated="score",                     # no EOS within max_new_tokens: score | penalty | mask
        truncated_penalty=-1.0,                # truncated=penalty: the reward such a completion gets (reward units)
    ))
    c.ensemble = defaults.ensemble()          # reward.reward_model_dir an ensemble export: how members combine
    c.rollout = ml_collections.ConfigDict(dict(
        prompts_per_step=16,                   # B prompts per step
        group_size=4,                          # G completions per prompt (R = B·G rows)
        max_new_tokens=16,                     # M response tokens
        temperature=1.0,                       # sampling temperature (> 0); log-probs use the same
        top_k=0,                               # 0 = all
        top_p=1.0,                             # 1 = all
    ))
    c.algorithm = ml_collections.ConfigDict(dict(
        policy_loss="ppo",                     # ppo | gspo (registry kind policy_loss)
        clip_eps=0.2,                          # ε_low of the clipped ratio
        clip_eps_high=placeholder(float),      # ε_high (None = ε_low)
        value_clip=0.2,                        # value clip ε around the rollout's values (reward units; 0 = off)
        loss_agg_mode="token-mean",            # policy + value loss: token-mean | seq-mean-token-{mean,sum,sum-norm}
        gamma=1.0,                             # GAE discount γ (per token)
        lam=0.95,                              # GAE λ
        whiten_advantages=True,                # whiten advantages over the rollout's valid tokens
        num_epochs=2,                          # passes over each rollout
        num_minibatches=2,                     # policy + value steps per pass (whole groups; divides prompts_per_step)
        recompute_old_logps="auto",            # auto | always | never (auto: when the rollout is reused)
    ))
    c.kl = ml_collections.ConfigDict(dict(     # KL(π‖π_ref) in the reward: −β·k1 per token
        beta=0.05,                             # β (1/nats); 0 = no penalty
        adaptive=False,                        # adaptive β (Ziegler et al., 2019)
        target=6.0,                            # adaptive: target KL per response (nats)
        horizon=10000,                         # adaptive: horizon (rollout rows)
        measure=True,                          # compute reference log-probs for KL metrics even when β = 0
    ))
    c.optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=5)  # the policy's (steps = optimizer steps)
    c.value_optimizer = defaults.optimizer(learning_rate=1e-3, warmup_steps=5)  # the value model's
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

    if variant == "tiny":
        c.model.arch.update(hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
        c.synthetic.update(proxy_pairs=128, proxy_steps=10)
        c.data.update(num_prompts=32, num_eval_prompts=8)
        c.reference.batch_size = 16
        c.rollout.update(prompts_per_step=4, group_size=4, max_new_tokens=8)
        c.train.update(num_steps=4, log_every=1, eval_every=2, checkpoint_every=2, progress_bar=False)
        c.eval.update(samples_per_prompt=2, best_of_n_max_n=4)
    elif variant == "smollm2_hh":
        c.model.pretrained = "smollm2-135m-instruct"
        c.policy.trainable_blocks = 4
        c.value.update(init="reward_model", trainable_blocks=4)
        c.reference.batch_size = 16
        c.data.update(source="pairs", prompts_path=HH_FILE, chat_template=True, max_prompt_length=128,
                      num_eval_prompts=32)
        c.reward.update(kind="reward_model", truncated="score")
        c.rollout.update(prompts_per_step=8, group_size=2, max_new_tokens=48, temperature=1.0)
        c.kl.update(beta=0.05)
        c.optimizer = defaults.optimizer(learning_rate=5e-5, warmup_steps=2)
        c.value_optimizer = defaults.optimizer(learning_rate=5e-5, warmup_steps=2)
        c.train.update(num_steps=24, log_every=1, eval_every=8, checkpoint_every=8)
        c.eval.update(samples_per_prompt=2, best_of_n_max_n=0)
    return c
