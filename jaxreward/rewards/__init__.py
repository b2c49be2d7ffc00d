"""Reward functions by name (DESIGN.md: `jaxreward/rewards/`).

Every reward function shares one signature, `fn(prompts, completions,
columns, **hparams) -> float32[R]` (or `[R, K]`), and is picked by name
from the registry (`register`, `get`, `names`, `make`, `call`, `combine`;
registry.py). Members: `length`, `distinct_words` (registry.py) and the
verifiable rewards `exact_match`, `format_regex`, `length_target`
(verifiable.py, registered on import). Reward models are scored by the
evaluation job (experiments/evaluate_rm.py) and best-of-N (sampling/best_of_n.py).
"""
from jaxreward.rewards import verifiable  # noqa: F401  (registers the verifiable rewards)
from jaxreward.rewards.registry import (
    BoundReward, Combined, RewardFn, RewardFunctionError, call, combine, get, hyperparameters, make, names,
    register)

__all__ = ["BoundReward", "Combined", "RewardFn", "RewardFunctionError", "call", "combine", "get",
           "hyperparameters", "make", "names", "register", "verifiable"]
