"""KV-cache sampling and best-of-N (see README.md in this folder)."""
from jaxreward.sampling.best_of_n import (BestOfNOutput, best_of_n, best_of_n_kl_bound,
                                          reward_model_fn, text_reward_fn)
from jaxreward.sampling.sampler import SampleBatch, SampleOutput, generate, sample_keys

__all__ = ["BestOfNOutput", "SampleBatch", "SampleOutput", "best_of_n", "best_of_n_kl_bound",
           "generate", "reward_model_fn", "sample_keys", "text_reward_fn"]
