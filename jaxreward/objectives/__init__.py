"""Pure objectives: losses, advantages, KL estimators and reward transforms.

Everything here is a function of arrays and static hyper-parameters; nothing
depends on Flax or on a model. Modules, one concept each:

  masking          masked reductions safe for NaN/inf padding
  checks           shape and hyper-parameter checks shared by every objective
  registry         `register(kind, name)` / `get(kind, name)`; one signature per kind
  reward           reward-model losses, ensembles, implicit rewards
  preference       DPO family, SimPO, ORPO, KTO, ... (pairwise and unpaired)
  policy_gradient  PPO/GSPO surrogates, value loss, entropy, aggregation modes
  advantages       GAE, GRPO, RLOO, REINFORCE++, ReMax
  kl               k1/k2/k3 estimators, KL penalty and loss, adaptive control
  transforms       whitening, clipping, length penalties, PAR, process rewards

README.md in this folder lists every registered name.
"""
from jaxreward.objectives import (
    advantages,
    checks,
    kl,
    masking,
    policy_gradient,
    preference,
    registry,
    reward,
    transforms,
)
from jaxreward.objectives.advantages import (
    broadcast_to_tokens,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    remax_advantages,
    rloo_advantages,
)
from jaxreward.objectives.kl import (
    adaptive_kl_coef,
    apply_kl_penalty,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_loss,
    kl_metrics,
    kl_per_token,
)
from jaxreward.objectives.masking import (
    masked_count,
    masked_mean,
    masked_std,
    masked_sum,
    masked_var,
    masked_whiten,
    safe_divide,
)
from jaxreward.objectives.policy_gradient import (
    AGGREGATION_MODES,
    aggregate_loss,
    aggregation_normalizers,
    aggregation_weights,
    entropy_from_logits,
    entropy_loss,
    gspo_policy_loss,
    log_ratio,
    ppo_policy_loss,
    value_loss,
)
from jaxreward.objectives.preference import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    beta_dpo_loss,
    cdpo_loss,
    cream_consistency,
    cream_loss,
    dpo_loss,
    exo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    mixture_loss,
    nca_loss,
    orpo_loss,
    robust_dpo_loss,
    sequence_logps,
    simpo_loss,
    tgdpo_loss,
)
from jaxreward.objectives.registry import get, register
from jaxreward.objectives.reward import (
    bradley_terry_loss,
    ensemble_reward,
    implicit_prefix_rewards,
    implicit_reward,
    implicit_token_rewards,
    pair_metrics,
    regression_loss,
    scaled_bradley_terry_loss,
    weighted_objective_sum,
)
from jaxreward.objectives.transforms import (
    clip_process_rewards,
    clip_rewards,
    combine_log_sigmoid,
    delta_process_rewards,
    length_penalty,
    log_sigmoid_centered,
    overlong_penalty,
    par_reward,
    place_on_last_token,
    pure_min_form,
    whiten_rewards,
)
