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


def _keyword_names(fn: Callable[..., Any]):
    """Names `fn` accepts as keyword arguments, or None if it takes `**kwargs`."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def accepted_kwargs(fn: Callable[..., Any], available: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `available` that `fn` accepts as keyword arguments.

    Lets a trainer hold every array and hyper-parameter it has in one dict and
    call whichever loss the config named: `fn(**accepted_kwargs(fn, kw))`. If
    `fn` takes `**kwargs`, everything is passed.

    This filter drops a misspelled name silently, so use it only for the
    shared pool; check the arguments meant for one function in particular
    (a config's `loss_kwargs`, a mixture component's overrides) with
    `check_accepted` first.
    """
    allowed = _keyword_names(fn)
    if allowed is None:
        return dict(available)
    return {k: v for k, v in available.items() if k in allowed}


def check_accepted(fn: Callable[..., Any], kwargs: Mapping[str, Any], context: str = "") -> None:
    """Raises if `fn` does not accept every key of `kwargs` as a keyword argument.

    Args:
      fn: the function the keyword arguments are meant for.
      kwargs: the arguments (only the keys are read).
      context: prefix of the message, e.g. "mixture component 0 ('dpo')".

    Raises:
      ValueError: naming the unknown keys and the keywords `fn` accepts.
    """
    allowed = _keyword_names(fn)
    if allowed is None:
        return
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        where = f"{context}: " if context else ""
        raise ValueError(f"{where}unknown keyword argument(s) {unknown} for "
                         f"{fn.__module__}.{fn.__qualname__}; it accepts {sorted(allowed)}")
