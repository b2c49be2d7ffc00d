"""KV-cache sampling, best-of-N and guided decoding (see README.md in this folder)."""
from jaxreward.sampling.best_of_n import (BestOfNOutput, best_of_n, best_of_n_kl_bound,
                                          reward_model_fn, text_reward_fn)
from jaxreward.sampling.sampler import SampleBatch, SampleOutput, generate, sample_keys
from jaxreward.sampling.value_guided import (Guide, GuidedOutput, RewardGuide, ValueGuide,
                                             args_guide, guided_generate, vas_guide)

__all__ = ["BestOfNOutput", "Guide", "GuidedOutput", "RewardGuide", "SampleBatch", "SampleOutput",
           "ValueGuide", "args_guide", "best_of_n", "best_of_n_kl_bound", "generate",
           "guided_generate", "reward_model_fn", "sample_keys", "text_reward_fn", "vas_guide"]
