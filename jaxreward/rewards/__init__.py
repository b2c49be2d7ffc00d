"""Reward functions by name (DESIGN.md: `jaxreward/rewards/`).

Python text rewards share one signature, `(prompts, completions) ->
float32[R]`, and are picked by name from `registry` (`register`, `get`,
`names`, `call`). Reward models are scored by the evaluation job
(experiments/evaluate_rm.py) and best-of-N (sampling/best_of_n.py).
"""
from jaxreward.rewards.registry import TextRewardFn, call, get, names, register

__all__ = ["TextRewardFn", "call", "get", "names", "register"]
