"""Objectives by name, so a config can pick one with a string.

Each function is registered under a kind (what it computes and from which
inputs) and a name::

    from jaxreward.objectives import registry

    @registry.register("preference", "my_dpo_variant")
    def my_dpo_variant(chosen_logps_B, rejected_logps_B, ref_chosen_logps_B,
                       ref_rejected_logps_B, *, beta, example_mask_B=None):
        ...
        return loss, metrics

    loss_fn = registry.get("preference", config.loss_type)

A kind has ONE signature, written below as a `typing.Protocol` and listed in
`KIND_SIGNATURES`: every member takes the same positional inputs, in the
same order and under the same names, and accepts the kind's keyword
arguments. So a driver takes any member of a kind by name with no
allow-list. A member may add keyword-only hyper-parameters of its own
(`label_smoothing`, `scale_by_std`, ...), which the config supplies; check
them with `check_accepted`. `register` checks the signature of every function
registered under a kind of `KIND_SIGNATURES` and raises at import if it
differs. A kind not in `KIND_SIGNATURES` is created by its first `register`
call and is not checked (add it to the table).

Arrays are written `Array` here (a `jax.Array` or anything `jnp.asarray`
takes); this module imports no JAX.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional, Protocol, Sequence, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
Array = Any
Metrics = dict  # flat dict of float32 scalars
LossAndMetrics = tuple  # (float32 scalar loss, Metrics)


# ----------------------------------------------------------------------------
# One signature per kind
# ----------------------------------------------------------------------------


class PairwiseRewardLoss(Protocol):
    """Reward-model loss on preference pairs (reward.py).

    `rewards_*`: float32 `[B]` or `[B, K]` rewards of the chosen / rejected
    responses; `margin_B`: optional per-pair preference strength m (scalar,
    `[B]` or `[B, K]`, reward units); `example_mask_B`: optional bool `[B]`;
    `objective_weights_K`: optional static K weights.
    """

    def __call__(self, rewards_chosen_B: Array, rewards_rejected_B: Array, margin_B: Optional[Array] = None,
                 example_mask_B: Optional[Array] = None, *,
                 objective_weights_K: Optional[Sequence[float]] = None) -> LossAndMetrics: ...


class RatedRewardLoss(Protocol):
    """Reward-model loss on rated responses (reward.py): float32 `[B]` or `[B, K]` rewards and ratings."""

    def __call__(self, rewards_B: Array, targets_B: Array, example_mask_B: Optional[Array] = None, *,
                 objective_weights_K: Optional[Sequence[float]] = None) -> LossAndMetrics: ...


class PreferenceLoss(Protocol):
    """Pairwise preference loss on float32 `[B]` response log-probs summed over tokens (preference.py).

    Reference-free members (`fn.uses_reference is False`) ignore the
    reference arrays (pass None). Some members need more keyword arguments
    (`chosen_lengths_B`, `rejected_lengths_B`, `label_smoothing`, ...).
    """

    def __call__(self, chosen_logps_B: Array, rejected_logps_B: Array, ref_chosen_logps_B: Optional[Array],
                 ref_rejected_logps_B: Optional[Array], *, beta: float,
                 example_mask_B: Optional[Array] = None) -> LossAndMetrics: ...


class TokenPreferenceLoss(Protocol):
    """Pairwise preference loss on per-token float32 `[B, T_c]` / `[B, T_r]` log-probs and bool masks (preference.py)."""

    def __call__(self, chosen_logps_BT: Array, rejected_logps_BT: Array, ref_chosen_logps_BT: Array,
                 ref_rejected_logps_BT: Array, chosen_mask_BT: Array, rejected_mask_BT: Array, *, beta: float,
                 example_mask_B: Optional[Array] = None) -> LossAndMetrics: ...


class UnpairedPreferenceLoss(Protocol):
    """Loss on unpaired desirable / undesirable completions, float32 `[B]` summed log-probs (preference.py)."""

    def __call__(self, logps_B: Array, ref_logps_B: Array, desirable_B: Array, kl_logps_B: Optional[Array] = None,
                 ref_kl_logps_B: Optional[Array] = None, *, beta: float,
                 example_mask_B: Optional[Array] = None) -> LossAndMetrics: ...


class GroupAdvantage(Protocol):
    """float32 `[B]` advantages from one reward per response, groups of `group_size` contiguous rows (advantages.py)."""

    def __call__(self, rewards_B: Array, *, group_size: int, valid_B: Optional[Array] = None) -> Array: ...


class BaselineAdvantage(Protocol):
    """float32 `[B]` advantages against the reward of a baseline response to the same prompt (advantages.py)."""

    def __call__(self, rewards_B: Array, greedy_rewards_B: Array, *, valid_B: Optional[Array] = None) -> Array: ...


class TokenAdvantage(Protocol):
    """`(advantages_BT, returns_BT)` from float32 `[B, T]` per-token rewards (advantages.py).

    Critic-free members (`fn.uses_values is False`) ignore `values_BT` (pass None).
    """

    def __call__(self, rewards_BT: Array, values_BT: Optional[Array], mask_BT: Array, *,
                 gamma: float = 1.0) -> tuple[Array, Array]: ...


class PolicyLoss(Protocol):
    """Policy-gradient surrogate on float32 `[B, T]` log-probs; advantages `[B, T]` or `[B]` (policy_gradient.py)."""

    def __call__(self, logps_BT: Array, old_logps_BT: Array, advantages: Array, mask_BT: Array, *,
                 clip_eps: float = ..., loss_agg_mode: str = ..., num_tokens: Optional[Array] = None,
                 num_seqs: Optional[Array] = None, max_len: Optional[int] = None) -> LossAndMetrics: ...


class Aggregation(Protocol):
    """float32 `[B, T]` weights w of the aggregate Σ w·l of a per-token loss (policy_gradient.py)."""

    def __call__(self, mask_BT: Array, *, num_tokens: Optional[Array] = None, num_seqs: Optional[Array] = None,
                 max_len: Optional[int] = None) -> Array: ...


class KLEstimator(Protocol):
    """Elementwise KL(π‖π_ref) estimate from same-shaped float32 log-probs of the sampled tokens (kl.py)."""

    def __call__(self, logps: Array, ref_logps: Array) -> Array: ...


class KindSignature(NamedTuple):
    alias: type
    description: str


KIND_SIGNATURES: dict[str, KindSignature] = {
    "pairwise_reward_loss": KindSignature(
        PairwiseRewardLoss, "reward-model losses on (chosen, rejected) rewards with an optional per-pair margin"),
    "rated_reward_loss": KindSignature(RatedRewardLoss, "reward-model losses on rewards against ratings"),
    "preference": KindSignature(
        PreferenceLoss, "DPO family: pairwise losses on four summed sequence log-prob arrays"),
    "token_preference": KindSignature(
        TokenPreferenceLoss, "pairwise losses on per-token log-probs and response masks"),
    "unpaired_preference": KindSignature(
        UnpairedPreferenceLoss, "losses on unpaired desirable / undesirable completions (KTO)"),
    "group_advantage": KindSignature(GroupAdvantage, "advantages from one reward per response, per group of samples"),
    "baseline_advantage": KindSignature(
        BaselineAdvantage, "advantages against the reward of a separate baseline (greedy) response"),
    "token_advantage": KindSignature(TokenAdvantage, "advantages and returns from per-token rewards"),
    "policy_loss": KindSignature(PolicyLoss, "policy-gradient surrogate losses"),
    "aggregation": KindSignature(Aggregation, "per-token weights of a loss-aggregation mode"),
    "kl": KindSignature(KLEstimator, "per-token KL estimators k1 / k2 / k3"),
}

# Kinds that were split, so an old config or caller gets a pointer.
_SPLIT_KINDS = {
    "reward_loss": ("pairwise_reward_loss", "rated_reward_loss"),
    "advantage": ("group_advantage", "baseline_advantage", "token_advantage"),
}


def _params(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    return params[1:] if params and params[0].name == "self" else params


def signature_mismatch(kind: str, fn: Callable[..., Any]) -> Optional[str]:
    """Why `fn` does not have the signature of `kind`, or None if it does (or `kind` has none declared).

    `fn` must take the positional parameters of `KIND_SIGNATURES[kind].alias`
    under the same names and in the same order (with a default wherever the
    alias has one) and nothing else positionally, and accept each of its
    keyword-only parameters (with a default wherever the alias has one).
    """
    if kind not in KIND_SIGNATURES:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    want = _params(KIND_SIGNATURES[kind].alias.__call__)
    got = _params(fn)
    want_pos = [p for p in want if p.kind in positional]
    got_pos = [p for p in got if p.kind in positional]
    if [p.name for p in got_pos] != [p.name for p in want_pos]:
        return f"positional parameters {[p.name for p in got_pos]}, expected {[p.name for p in want_pos]}"
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in got):
        return "takes *args"
    by_name = {p.name: p for p in got}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in got)
    for w in want:
        g = by_name.get(w.name)
        if g is None:
            if w.kind is inspect.Parameter.KEYWORD_ONLY and var_kw:
                continue
            return f"does not accept {w.name!r}"
        if w.default is not inspect.Parameter.empty and g.default is inspect.Parameter.empty:
            return f"{w.name!r} has no default"
    return None


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str) -> Callable[[F], F]:
    """Decorator that registers a function under `(kind, name)` and returns it unchanged.

    Raises:
      ValueError: if `(kind, name)` is already taken by a different function,
        or `fn` does not have the signature of `kind` (`KIND_SIGNATURES`).
    """

    def decorator(fn: F) -> F:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not fn:
            raise ValueError(
                f"{kind!r} objective {name!r} is already registered "
                f"(by {table[name].__module__}.{table[name].__qualname__})"
            )
        problem = signature_mismatch(kind, fn)
        if problem:
            raise ValueError(f"{fn.__module__}.{fn.__qualname__} cannot be registered as {kind!r} {name!r}: "
                             f"{problem} (see registry.{KIND_SIGNATURES[kind].alias.__name__})")
        table[name] = fn
        return fn

    return decorator


def _unknown_message(kind: str, name: str) -> Optional[str]:
    """One-line reason why `(kind, name)` is not registered, or None if it is."""
    if kind not in _REGISTRY:
        split = f" (it was split into {', '.join(_SPLIT_KINDS[kind])})" if kind in _SPLIT_KINDS else ""
        return f"unknown objective kind {kind!r}{split}; known kinds: {', '.join(kinds())}"
    if name in _REGISTRY[kind]:
        return None
    elsewhere = [k for k in kinds() if name in _REGISTRY[k]]
    hint = f"; {name!r} is registered under {', '.join(map(repr, elsewhere))}" if elsewhere else ""
    return f"unknown {kind!r} objective {name!r}; known names: {', '.join(names(kind))}{hint}"


def get(kind: str, name: str) -> Callable[..., Any]:
    """Returns the function registered as `(kind, name)`.

    Raises:
      KeyError: for an unknown kind or name; the one-line message lists the
        names of that kind (or the known kinds).
    """
    message = _unknown_message(kind, name)
    if message:
        raise KeyError(message)
    return _REGISTRY[kind][name]


def check_kind_member(kind: str, name: str, context: str = "") -> None:
    """Raises a one-line ValueError unless `name` is registered under `kind`.

    For checking a config before any model loads, e.g.
    `check_kind_member("pairwise_reward_loss", config.loss.name, "config.loss.name")`.

    Raises:
      ValueError: `"{context}: unknown 'kind' objective 'x'; known names: a, b"`.
    """
    message = _unknown_message(kind, name)
    if message:
        raise ValueError(f"{context}: {message}" if context else message)


def names(kind: str) -> tuple[str, ...]:
    """Sorted names registered under `kind` (empty for an unknown kind)."""
    return tuple(sorted(_REGISTRY.get(kind, {})))


def kinds() -> tuple[str, ...]:
    """Sorted kinds that have at least one registered function."""
    return tuple(sorted(_REGISTRY))


# ----------------------------------------------------------------------------
# Keyword arguments
# ----------------------------------------------------------------------------


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
