"""Objectives by name, so a config can pick one with a string.

Each function is registered under a kind (what it computes) and a name::

    from jaxreward.objectives import registry

    @registry.register("preference", "my_dpo_variant")
    def my_dpo_variant(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B,
                       ref_rejected_logps_B, *, beta, example_mask_B=None):
        ...
        return loss, metrics

    loss_fn = registry.get("preference", config.loss_type)

Kinds used in this package (each module documents the calling convention
of its kind; the functions of one kind are interchangeable where the
convention says so):

* ``preference``           pairwise preference losses; all take the four
                           sequence log-prob arrays first (preference.py)
* ``unpaired_preference``  KTO (preference.py)
* ``reward_loss``          reward-model training losses (reward.py)
* ``policy_loss``          policy-gradient surrogates, one signature (policy_gradient.py)
* ``aggregation``          per-token weights of each loss-aggregation mode (policy_gradient.py)
* ``advantage``            advantage estimators; inputs differ per estimator (advantages.py)
* ``kl``                   per-token KL estimators k1/k2/k3 (kl.py)

A new kind needs no declaration: the first `register` call creates it.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator that registers a function under `(kind, name)` and returns it unchanged.

    Raises:
      ValueError: if `(kind, name)` is already taken by a different function.
    """

    def decorator(fn: F) -> F:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not fn:
            raise ValueError(
                f"{kind!r} objective {name!r} is already registered "
                f"(by {table[name].__module__}.{table[name].__qualname__})"
            )
        table[name] = fn
        return fn

    return decorator


def get(kind: str, name: str) -> Callable[..., Any]:
    """Returns the function registered as `(kind, name)`.

    Raises:
      KeyError: for an unknown kind or name; the message lists the known ones.
    """
    if kind not in _REGISTRY:
        raise KeyError(f"unknown objective kind {kind!r}; known kinds: {sorted(_REGISTRY)}")
    table = _REGISTRY[kind]
    if name not in table:
        raise KeyError(f"unknown {kind!r} objective {name!r}; known names: {sorted(table)}")
    return table[name]


def names(kind: str) -> tuple[str, ...]:
    """Sorted names registered under `kind` (empty for an unknown kind)."""
    return tuple(sorted(_REGISTRY.get(kind, {})))


def kinds() -> tuple[str, ...]:
    """Sorted kinds that have at least one registered function."""
    return tuple(sorted(_REGISTRY))


def accepted_kwargs(fn: Callable[..., Any], available: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `available` that `fn` accepts as keyword arguments.

    Lets a trainer hold every array and hyper-parameter it has in one dict and
    call whichever loss the config named: `fn(**accepted_kwargs(fn, kw))`. If
    `fn` takes `**kwargs`, everything is passed.
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(available)
    allowed = {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return {k: v for k, v in available.items() if k in allowed}
