"""Preference optimization on a policy (the DPO family): the pair forward,
loss functions for `step.make_train_step`, the reference log-prob cache,
held-out metrics, and sample-based evaluation against the reference.

A pair batch holds `chosen_*` and `rejected_*` arrays (`tokens`,
`attention_mask`, `loss_mask`, `positions`: `[B, T]`, one layout for both
sides) and, when the reference log-probs were precomputed,
`ref_chosen_logps` / `ref_rejected_logps` float32 `[B]`.

A policy is any `logps_fn(params, tokens_BT, attention_mask_BT, positions_BT)
-> logps_BT` with the grid of `models.scoring.token_logps` (`logps[b, t]` is
log p(token t+1 | tokens ≤ t)): a `Decoder` through `decoder_logps_fn`, or a
table of logits in the tests. Params of the train state are
`{"policy": ...}`, plus `{"reference": ...}` when the reference runs inside
the step (`reference.precompute=False`); the reference is never trained.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxreward import parallel
from jaxreward.errors import UserError
from jaxreward.models.scoring import branch_logps, scored_mask, sequence_logps, shift_mask, token_logps
from jaxreward.objectives import registry
from jaxreward.objectives.kl import kl_k3
from jaxreward.objectives.masking import masked_mean
from jaxreward.sampling.best_of_n import best_of_n_kl_bound
from jaxreward.train import evaluate
from jaxreward.train import metrics as metrics_lib

Array = jax.Array
LogpsFn = Callable[[Any, Array, Array, Array], Array]

SIDES = ("chosen", "rejected")
PAIR_FIELDS = ("tokens", "attention_mask", "loss_mask", "positions")
LOSS_KIND = "preference"
UNPAIRED_KIND = "unpaired_preference"  # KTO: desirable / undesirable examples, not pairs
# Keyword arguments the driver fills from the data; a config may not set them.
DATA_KWARGS = ("example_mask_B", "chosen_lengths_B", "rejected_lengths_B")
# Pair forwards traced per role ("policy", "reference"); tests read it to
# check that reference-free losses never run the reference.
FORWARDS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------
# The pair forward
# ----------------------------------------------------------------------------


def decoder_logps_fn(model, packed_length: int = 0, response_length: int = 0, **kwargs) -> LogpsFn:
    """`logps_fn` of a `Decoder` (`scoring.token_logps`; kwargs: temperature, chunk_size, ...).

    With `packed_length` S > 0 the result is a `SharedPrefixLogps`: its pair
    forward packs each pair into one row of S tokens (see `pack_pairs`)
    instead of running the prompt twice. With `response_length` W > 0
    (`shared_response_length`) the output layer scores only the W columns
    from the chosen response's first token on, not the prompt's.
    """
    if packed_length:
        return SharedPrefixLogps(model, int(packed_length), tuple(sorted(kwargs.items())),
                                 int(response_length))

    def fn(params, tokens_BT, attention_mask_BT, positions_BT):
        return token_logps(model, params, tokens_BT, attention_mask_BT, positions_BT, **kwargs)
    return fn


def pair_fields(arrays: Mapping[str, Any]) -> dict:
    """The `chosen_*`/`rejected_*` token arrays of a pair dict (no reference log-probs)."""
    return {f"{s}_{k}": arrays[f"{s}_{k}"] for s in SIDES for k in PAIR_FIELDS}


def pair_logps(logps_fn: LogpsFn, params, batch: Mapping[str, Array], role: str = "policy"):
    """Summed response log-probs of both sides in ONE forward.

    The forward is over `[2B, T]` (chosen rows, then rejected rows), or over
    `[B, S]` packed rows when `logps_fn` is a `SharedPrefixLogps`; both give
    the same numbers.

    Returns:
      `(chosen_logps_B, rejected_logps_B, chosen_lengths_B, rejected_lengths_B)`:
      float32 sums of log p over response tokens (`loss_mask`, prompt tokens
      never count) and the number of those tokens (float32).
    """
    FORWARDS[role] += 1
    if isinstance(logps_fn, SharedPrefixLogps):
        return logps_fn.pair_logps(params, batch)
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    attention = cat("attention_mask").astype(bool)
    loss_mask = cat("loss_mask").astype(bool) & attention
    logps = logps_fn(params, cat("tokens"), attention, cat("positions"))
    # Left padding and no prompt: the first response token follows padding
    # and is not scored, as with right padding (`scored_mask`).
    seq = sequence_logps(logps, loss_mask, attention_mask_BT=attention)
    lengths = scored_mask(loss_mask, attention).sum(axis=1).astype(jnp.float32)
    B = batch["chosen_tokens"].shape[0]
    return seq[:B], seq[B:], lengths[:B], lengths[B:]


# ----------------------------------------------------------------------------
# Prefix sharing: one row per pair
# ----------------------------------------------------------------------------


def _compact(values_BT: Array, keep_BT: Array) -> Array:
    """Moves each row's kept entries to its front, in order (the rest follow)."""
    order = jnp.argsort(~keep_BT, axis=1, stable=True)
    return jnp.take_along_axis(values_BT, order, axis=1)


def pack_pairs(batch: Mapping[str, Array], packed_length: int) -> dict[str, Array]:
    """Packs each pair into one row: `[prompt | chosen response | rejected response]`.

    The prompt (attended tokens outside `loss_mask`) is taken from the chosen
    side; the rejected side contributes its response only. Positions are the
    sides' own (so the rejected response restarts after the prompt), and
    `branch_ids` (0 prompt, 1 chosen, 2 rejected) keep the rejected tokens
    from attending to the chosen ones. Each response is thus scored exactly
    as in its own row, with the prompt encoded once ("Accelerating Direct
    Preference Optimization with Prefix Sharing", 2024). Any padding side
    and amount gives the same packed row.

    Args:
      batch: pair arrays `[B, T]` whose two sides share their prompt (see
        `shared_prefix_length`, which checks it and gives `packed_length`).
      packed_length: S >= prompt + chosen + rejected tokens of every row
        (static). A longer row does not fit: its `fits` entry is False and
        `SharedPrefixLogps.pair_logps` gives it NaN, in value and gradient,
        rather than the log-probs of a cut pair.

    Returns:
      dict of `[B, S]` arrays: `tokens`, `attention_mask`, `positions`,
      `branch_ids`, `chosen` and `rejected` (bool: a scored token of that
      side; with an empty prompt a response's first token is not scored, as
      on the `[B, T]` grid), `prefix_last` int32 `[B]` (the prompt's last
      column, which scores both responses' first tokens), `response_start`
      and `response_tokens` int32 `[B]` (the chosen response's first column
      and the two responses' token count: every scored column is in
      `[response_start, response_start + response_tokens)`) and `fits` bool
      `[B]` (the pair's tokens fit in S).
    """
    S = packed_length
    attn_c = batch["chosen_attention_mask"].astype(bool)
    resp_c = batch["chosen_loss_mask"].astype(bool) & attn_c
    resp_r = batch["rejected_loss_mask"].astype(bool) & batch["rejected_attention_mask"].astype(bool)
    p_B = jnp.sum(attn_c & ~resp_c, axis=1)
    pc_B = jnp.sum(attn_c, axis=1)
    end_B = pc_B + jnp.sum(resp_r, axis=1)
    T = attn_c.shape[1]
    tok_c, pos_c = (_compact(batch[f"chosen_{k}"], attn_c) for k in ("tokens", "positions"))
    tok_r, pos_r = (_compact(batch[f"rejected_{k}"], resp_r) for k in ("tokens", "positions"))
    j = jnp.arange(S)[None, :]
    in_c = j < pc_B[:, None]
    in_r = (j >= pc_B[:, None]) & (j < end_B[:, None])
    ic = jnp.broadcast_to(jnp.minimum(j, T - 1), (attn_c.shape[0], S))
    ir = jnp.clip(j - pc_B[:, None], 0, T - 1)
    pick = lambda c, r: jnp.where(in_c, jnp.take_along_axis(c, ic, axis=1),
                                  jnp.where(in_r, jnp.take_along_axis(r, ir, axis=1), 0))
    return {
        "tokens": pick(tok_c, tok_r).astype(jnp.int32),
        "attention_mask": in_c | in_r,
        "positions": pick(pos_c, pos_r).astype(jnp.int32),
        "branch_ids": jnp.where(j < p_B[:, None], 0, jnp.where(in_c, 1, 2)).astype(jnp.int32),
        "prefix_last": jnp.maximum(p_B - 1, 0).astype(jnp.int32),
        "response_start": p_B.astype(jnp.int32),
        "response_tokens": (end_B - p_B).astype(jnp.int32),
        # A response token with no earlier prompt token (empty prompt) has no
        # predictor at all: it is not scored, as on the [B, T] grid.
        "chosen": in_c & (j >= p_B[:, None]) & (j > 0),
        "rejected": in_r & ((p_B[:, None] > 0) | (j > pc_B[:, None])),
        "fits": end_B <= S,
    }


def shared_prefix_length(splits: Mapping[str, Mapping[str, np.ndarray]], multiple: int = 8) -> int:
    """Host check + the static packed length for `pack_pairs`.

    Returns the largest prompt + chosen + rejected token count over every
    pair of every split, rounded up to `multiple`.

    Raises:
      UserError: a pair whose two sides hold different prompt tokens (or
        give them different positions), or whose response is not one block
        after the prompt (prefix sharing needs all three; set
        `model.prefix_sharing=False` for such data).
    """
    longest = 1
    for name, a in splits.items():
        for side in SIDES:
            attn = np.asarray(a[f"{side}_attention_mask"], bool)
            resp = np.asarray(a[f"{side}_loss_mask"], bool) & attn
            # Attended tokens must read prompt..., response...: no prompt after a response token.
            after = np.cumsum(resp, axis=1) > 0
            bad = np.flatnonzero((after & attn & ~resp).any(axis=1))
            if bad.size:
                raise UserError(f"{name} pair {int(bad[0])}: the {side} response is not one block "
                                "after the prompt; prefix sharing needs that "
                                "(set model.prefix_sharing=False)")
        prompts = []
        for side in SIDES:
            attn = np.asarray(a[f"{side}_attention_mask"], bool)
            keep = attn & ~np.asarray(a[f"{side}_loss_mask"], bool)
            prompts.append([(row[k], pos[k]) for row, pos, k in zip(
                np.asarray(a[f"{side}_tokens"]), np.asarray(a[f"{side}_positions"]), keep)])
        for i, ((tc, pc), (tr, pr)) in enumerate(zip(*prompts)):
            if not np.array_equal(tc, tr):
                raise UserError(f"{name} pair {i}: chosen and rejected have different prompt tokens; "
                                "prefix sharing needs one prompt per pair "
                                "(set model.prefix_sharing=False)")
            if not np.array_equal(pc, pr):
                raise UserError(f"{name} pair {i}: chosen and rejected give the prompt different "
                                "positions; prefix sharing encodes it once "
                                "(set model.prefix_sharing=False)")
        total = (np.asarray(a["chosen_attention_mask"], bool).sum(axis=1)
                 + (np.asarray(a["rejected_loss_mask"], bool)
                    & np.asarray(a["rejected_attention_mask"], bool)).sum(axis=1))
        if total.size:
            longest = max(longest, int(total.max()))
    return -(-longest // multiple) * multiple


def shared_response_length(splits: Mapping[str, Mapping[str, np.ndarray]], multiple: int = 8) -> int:
    """The static scored window for `SharedPrefixLogps.response_length`.

    Returns the largest chosen + rejected response token count over every
    pair of every split (`loss_mask` & `attention_mask`), rounded up to
    `multiple`.
    """
    longest = 1
    for a in splits.values():
        resp = sum((np.asarray(a[f"{side}_loss_mask"], bool)
                    & np.asarray(a[f"{side}_attention_mask"], bool)).sum(axis=1) for side in SIDES)
        if np.size(resp):
            longest = max(longest, int(np.max(resp)))
    return -(-longest // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class SharedPrefixLogps:
    """A `Decoder`'s log-prob function whose pair forward shares the prompt.

    Called like any `LogpsFn` it gives the `[B, T]` grid of
    `scoring.token_logps`; `pair_logps` (used by the module's `pair_logps`)
    runs one packed `[B, packed_length]` forward per pair batch instead of
    `[2B, T]`: for a prompt of P tokens and responses of R, 2(P + R) tokens
    become P + 2R. With `response_length` W > 0, the output layer runs over
    the W columns that hold the two responses (`scoring.branch_logps`'
    window), not over the prompt: for 2R <= W, P + 2R columns become W.
    """
    model: Any
    packed_length: int
    kwargs: tuple = ()
    response_length: int = 0

    def __call__(self, params, tokens_BT, attention_mask_BT, positions_BT):
        return token_logps(self.model, params, tokens_BT, attention_mask_BT, positions_BT,
                           **dict(self.kwargs))

    def pair_logps(self, params, batch: Mapping[str, Array]):
        """Summed response log-probs of both sides from one packed forward.

        Args:
          params: the policy's (or reference's) params.
          batch: a pair batch (`chosen_tokens`, `chosen_mask`, ... as
            `batching.tokenize_pairs` makes them; any padding side).

        Returns:
          `(logps_chosen_B, logps_rejected_B, tokens_chosen_B,
          tokens_rejected_B)`, float32 `[B]` each: the sums over response
          tokens in nats, and the response token counts (for
          length-normalized losses). A pair that does not fit
          `packed_length` (or the response window) gives NaN log-probs, never
          a wrong number.
        """
        p = pack_pairs(batch, self.packed_length)
        W = self.response_length if 0 < self.response_length < self.packed_length else 0
        lp = branch_logps(self.model, params, p["tokens"], p["attention_mask"], p["positions"],
                          p["branch_ids"], p["prefix_last"],
                          window_start_B=p["response_start"] if W else None, window=W,
                          **dict(self.kwargs))
        side = lambda m: (jnp.sum(jnp.where(m, lp, 0.0), axis=1), jnp.sum(m, axis=1).astype(jnp.float32))
        (c, lc), (r, lr) = side(p["chosen"]), side(p["rejected"])
        # The two responses sit at different columns of the packed row, where
        # float rounding differs (~1e-5 nats on SmolLM2): a pair of identical
        # responses would no longer be an exact tie. Such a pair reads both
        # sides from the chosen branch (the same function, so the same value
        # and gradient), as the unpacked [2B, T] forward gives them.
        same = identical_sides(batch)
        r, lr = jnp.where(same, c, r), jnp.where(same, lc, lr)
        # A pair longer than packed_length was cut, or whose responses
        # overrun the scored window: NaN, never a wrong number. Multiplied,
        # not selected, so the gradient is NaN too, even under a loss that
        # masks the pair: a step on such a batch cannot quietly train on
        # the other pairs (its loss and grad_norm are NaN, which the train
        # loop's finite check stops).
        fits = p["fits"] & ((p["response_tokens"] <= W) if W else True)
        cut = lambda x: x * jnp.where(fits, 1.0, jnp.nan)
        return cut(c), cut(r), lc, lr


def identical_sides(batch: Mapping[str, Array]) -> Array:
    """bool `[B]`: the pair's chosen and rejected rows hold the same tokens,
    masks and response span (padding ids ignored), i.e. the same sequence."""
    same = jnp.ones(batch["chosen_tokens"].shape[:1], bool)
    mask_c = batch["chosen_attention_mask"].astype(bool)
    mask_r = batch["rejected_attention_mask"].astype(bool)
    same &= jnp.all(mask_c == mask_r, axis=1)
    same &= jnp.all(jnp.where(mask_c, batch["chosen_tokens"] == batch["rejected_tokens"], True), axis=1)
    same &= jnp.all(batch["chosen_loss_mask"].astype(bool) == batch["rejected_loss_mask"].astype(bool), axis=1)
    return same


# ----------------------------------------------------------------------------
# The configured loss
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
    """A registered "preference" loss with its hyper-parameters bound.

    Attributes:
      name: registry name.
      fn: the registered function (`registry.PreferenceLoss` signature).
      hparams: keyword hyper-parameters from the config (None-valued fields dropped).
      uses_reference: False for reference-free losses (SimPO, ORPO, a
        mixture of them): the driver then runs no reference at all.
      unpaired: True for a loss of registry kind "unpaired_preference"
        (KTO). Its rows are examples stored as pairs (`kto_examples`): the
        "chosen" side is the example `[prompt | completion]`, the
        "rejected" side the same prompt with another example's completion
        (KTO's mismatched pair for the reference point z_0), and the batch
        has `desirable` bool `[B]`.
    """
    name: str
    fn: Callable
    hparams: Mapping[str, Any]
    uses_reference: bool
    unpaired: bool = False

    def __call__(self, chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, chosen_lengths_B,
                 rejected_lengths_B, example_mask_B, desirable_B=None, reference_point=None):
        if self.unpaired:  # example log-probs, then the mismatched (KL) completions'
            fixed = {} if reference_point is None else {"reference_point": reference_point}
            return self.fn(chosen_B, ref_chosen_B, desirable_B, rejected_B, ref_rejected_B,
                           example_mask_B=example_mask_B, **fixed, **self.hparams)
        data = {"example_mask_B": example_mask_B, "chosen_lengths_B": chosen_lengths_B,
                "rejected_lengths_B": rejected_lengths_B}
        return self.fn(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B,
                       **registry.accepted_kwargs(self.fn, data), **self.hparams)

    @property
    def batch_reference_point(self) -> bool:
        """True when the loss estimates z_0 from its batch (KTO without a fixed
        `reference_point`): the step then computes it over the whole batch."""
        return self.unpaired and self.hparams.get("reference_point") is None


def resolve_loss(loss_config: Mapping[str, Any], field: str = "config.loss") -> PreferenceLoss:
    """The loss named by `loss_config["name"]` with the other non-None fields as hyper-parameters.

    Checks everything a config can get wrong, each with a one-line message
    naming the field: an unknown name, a hyper-parameter the loss does not
    take, a missing required one, and a value the loss refuses (it is called
    once on a dummy 2-pair batch).

    Raises:
      ValueError: as above.
    """
    name = loss_config["name"]
    unpaired = name in registry.names(UNPAIRED_KIND)
    try:
        fn = registry.get(UNPAIRED_KIND if unpaired else LOSS_KIND, name)
    except KeyError as e:
        raise ValueError(f"{field}.name: {e.args[0]}; unpaired (kind {UNPAIRED_KIND!r}): "
                         f"{', '.join(registry.names(UNPAIRED_KIND))}") from None
    hparams = {k: (tuple(v) if isinstance(v, list) else v) for k, v in loss_config.items()
               if k != "name" and v is not None}
    takes = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in DATA_KWARGS]
    for k in sorted(hparams):
        if k in DATA_KWARGS:
            raise ValueError(f"{field}.{k} is filled from the data by the driver; remove it")
        try:
            registry.check_accepted(fn, {k: hparams[k]}, f"loss {name!r}")
        except ValueError:
            raise ValueError(f"{field}.{k} is not a hyper-parameter of loss {name!r}, which takes "
                             f"{', '.join(takes)}; leave {field}.{k} None") from None
    for p in inspect.signature(fn).parameters.values():
        if (p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
                and p.name not in DATA_KWARGS and p.name not in hparams):
            raise ValueError(f"loss {name!r} needs {field}.{p.name}")
    uses_reference = getattr(fn, "uses_reference", True)
    if "components" in hparams:
        comps = _mixture_component_fns(hparams["components"], f"{field}.components")
        uses_reference = any(getattr(f, "uses_reference", True) for f in comps)  # if any component does
        # A shared hyper-parameter that no component takes would be dropped silently
        # (each component receives only what its signature accepts).
        for k in sorted(set(hparams) - {"components"}):
            if not any(registry.accepted_kwargs(f, {k: None}) for f in comps):
                raise ValueError(f"{field}.{k} is not a hyper-parameter of any component of the "
                                 f"mixture ({', '.join(c[0] for c in hparams['components'])}); "
                                 f"leave {field}.{k} None")
    loss = PreferenceLoss(name, fn, dict(hparams), bool(uses_reference), unpaired)
    ones = jnp.ones(2, jnp.float32)
    ref = -ones if loss.uses_reference else None
    try:
        jax.eval_shape(lambda: loss(-ones, -2 * ones, ref, ref, ones, ones, jnp.ones(2, bool),
                                    jnp.array([True, False])))
    except (ValueError, KeyError, TypeError) as e:
        message = e.args[0] if e.args else str(e)
        raise ValueError(f"{field} ({name!r}): {message}") from None
    return loss


# Pairwise losses that estimate a statistic from their batch unless a field fixes it.
BATCH_STATISTICS = {"bco_pair": "reference_point", "beta_dpo": "margin_reference"}


def batch_statistics(loss: PreferenceLoss) -> list[str]:
    """`"<loss> (<field>)"` for each (mixture component) loss that estimates a
    statistic from its batch: split into micro-batches, each part would use its
    own estimate, so the step would not equal the one-shot step. KTO's z_0 is
    not listed: the step computes it over the whole batch (`make_totals_fn`)."""
    if loss.name == "mixture":
        entries = [(c[0], dict(c[2]) if len(c) > 2 else {}) for c in loss.hparams["components"]]
    else:
        entries = [(loss.name, {})]
    return [f"{n} ({BATCH_STATISTICS[n]})" for n, overrides in entries
            if n in BATCH_STATISTICS and {**loss.hparams, **overrides}.get(BATCH_STATISTICS[n]) is None]


def _mixture_component_fns(components, field: str) -> list[Callable]:
    """The registered functions of a mixture's `components`, each checked for
    shape and name, in one line naming `field` (the weights' values are
    checked by the loss; all of them 0 is refused here: nothing would train)."""
    shape = (f"{field} must be a tuple of (name, weight) or (name, weight, overrides) tuples, "
             f"e.g. ((\'dpo\', 1.0), (\'ipo\', 0.5)); got {components!r}")
    if not isinstance(components, (tuple, list)) or not components or not all(
            isinstance(c, (tuple, list)) and len(c) in (2, 3) and isinstance(c[0], str) for c in components):
        raise ValueError(shape)
    fns = []
    for name, *_ in components:
        if name not in registry.names(LOSS_KIND):
            raise ValueError(f"{field}: component {name!r} is not a pairwise loss (registry kind "
                             f"{LOSS_KIND!r}: {', '.join(registry.names(LOSS_KIND))})")
        fns.append(registry.get(LOSS_KIND, name))
    weights = [c[1] for c in components]
    if all(isinstance(w, (int, float)) and not isinstance(w, bool) and w == 0 for w in weights):
        raise ValueError(f"{field}: every weight is 0, so the loss is 0 and nothing would train")
    return fns


def pair_outputs(policy_fn: LogpsFn, ref_fn: LogpsFn | None, loss: PreferenceLoss, params,
                 batch: Mapping[str, Array]) -> dict:
    """Per-pair arrays `[B]` of a batch: policy (and reference) log-probs, lengths, validity.

    The reference log-probs come from the batch when precomputed, else from
    a stop-gradient forward of `params["reference"]`; a reference-free loss
    gets none. A pair is valid when both responses have a scored token.
    """
    c, r, lc, lr = pair_logps(policy_fn, params["policy"], batch, "policy")
    out = {"chosen_logps": c, "rejected_logps": r, "chosen_lengths": lc, "rejected_lengths": lr,
           "valid": (lc > 0) & (lr > 0)}
    if loss.unpaired:
        out["desirable"] = jnp.asarray(batch["desirable"], bool)
    if loss.uses_reference:
        if "ref_chosen_logps" in batch:
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            rc, rr, _, _ = pair_logps(ref_fn, params["reference"], batch, "reference")
        out["ref_chosen_logps"] = jax.lax.stop_gradient(jnp.asarray(rc, jnp.float32))
        out["ref_rejected_logps"] = jax.lax.stop_gradient(jnp.asarray(rr, jnp.float32))
    return out


def apply_loss(loss: PreferenceLoss, out: Mapping[str, Array], reference_point: Array | None = None):
    """`(loss, metrics)` of the registered loss on `pair_outputs` (masked mean over valid pairs).

    `reference_point`: KTO's z_0 computed elsewhere (over a whole batch that
    was split into micro-batches); None estimates it from `out`.
    """
    return loss(out["chosen_logps"], out["rejected_logps"], out.get("ref_chosen_logps"),
                out.get("ref_rejected_logps"), out["chosen_lengths"], out["rejected_lengths"],
                out["valid"], out.get("desirable"), reference_point)


def loss_metrics(loss: PreferenceLoss, out: Mapping[str, Array]) -> dict:
    """Metrics under the names users of the well-known trainers read.

    `rewards/chosen|rejected` (mean implicit reward, usually β·(log π − log
    π_ref)), `rewards/accuracies` (chosen > rejected strictly, a tie counts 0,
    as TRL's `(chosen_rewards > rejected_rewards).float()`),
    `rewards/margins`, `logps/chosen|rejected` (mean summed response
    log-prob, nats), `valid_pairs` (fraction; `valid_examples` for KTO's
    unpaired rows), and the loss's own extras (`nll`, `beta_mean`, ...). All
    over valid rows. No `loss` key (the step adds it).
    """
    _, m = apply_loss(loss, out)
    renamed = {"accuracy": "rewards/accuracies", "margin_mean": "rewards/margins",
               "chosen_reward_mean": "rewards/chosen", "rejected_reward_mean": "rewards/rejected",
               "chosen_reward_std": "rewards/chosen_std", "rejected_reward_std": "rewards/rejected_std"}
    metrics = {renamed.get(k, k): v for k, v in m.items() if k != "loss"}
    valid = out["valid"]
    if loss.unpaired:  # KTO: "chosen" = desirable examples, "rejected" = undesirable ones (as TRL)
        # A side without a valid example has no mean: NaN, not the objective's finite 0
        # (which would read as a reward of 0 and a margin equal to the other side's mean).
        sides = {"chosen": valid & out["desirable"], "rejected": valid & ~out["desirable"]}
        for side, rows in sides.items():
            metrics[f"logps/{side}"] = masked_mean(out["chosen_logps"], rows)
            for k in (f"rewards/{side}", f"rewards/{side}_std", f"logps/{side}"):
                metrics[k] = jnp.where(jnp.any(rows), metrics[k], jnp.nan)
        both = jnp.any(sides["chosen"]) & jnp.any(sides["rejected"])
        metrics["rewards/margins"] = jnp.where(both, metrics["rewards/margins"], jnp.nan)
        metrics["valid_examples"] = jnp.mean(valid.astype(jnp.float32))
        return metrics
    metrics["logps/chosen"] = masked_mean(out["chosen_logps"], valid)
    metrics["logps/rejected"] = masked_mean(out["rejected_logps"], valid)
    metrics["valid_pairs"] = jnp.mean(valid.astype(jnp.float32))
    return metrics


def make_loss_fns(policy_fn: LogpsFn, loss: PreferenceLoss, ref_fn: LogpsFn | None = None):
    """`(loss_fn, metrics_fn)` for `step.make_train_step`.

    The loss of a (micro-)batch is Σ_valid ℓ_i / B: the loss's mean over
    valid pairs times their fraction. It equals the plain mean when every
    pair is valid, is 0 (with zero gradients) when none is, and keeps the
    micro-batch split exact even when invalid pairs fall unevenly.
    """
    def loss_fn(params, batch, rng, totals=None):
        del rng  # deterministic forward: no dropout
        out = pair_outputs(policy_fn, ref_fn, loss, params, batch)
        value, _ = apply_loss(loss, out, None if totals is None else totals["reference_point"])
        # With totals (`make_totals_fn`) the step sums the parts: normalize by the whole batch.
        n = out["valid"].shape[0] if totals is None else totals["rows"]
        return value * jnp.sum(out["valid"]) / n, out

    def metrics_fn(outputs, batch):
        del batch
        return loss_metrics(loss, outputs)

    return loss_fn, metrics_fn


def make_totals_fn(policy_fn: LogpsFn, loss: PreferenceLoss, ref_fn: LogpsFn | None,
                   micro_batches: int):
    """The step's `totals_fn` when a loss needs a whole-batch statistic of the
    params across micro-batches, else None.

    KTO estimates its reference point z_0 from the batch. Split into k
    micro-batches, each part would see its own z_0 (TRL's behaviour under
    gradient accumulation); this computes z_0 once over the whole batch and
    the loss function sums the parts normalized by the whole batch, so k
    parts give the one-shot step. The z_0 pass runs forward only, part by
    part (a masked sum and a count of the mismatched log-ratios per part),
    so its peak memory is one micro-batch's, like the step's.
    """
    if not loss.batch_reference_point:
        return None

    def totals_fn(batch, params):
        def part_sums(part):
            out = pair_outputs(policy_fn, ref_fn, loss, params, part)
            rho = jnp.where(out["valid"], out["rejected_logps"] - out["ref_rejected_logps"], 0.0)
            return jnp.sum(rho), jnp.sum(out["valid"].astype(jnp.float32))
        parts = jax.tree.map(lambda x: x.reshape(micro_batches, -1, *x.shape[1:]), dict(batch))
        sums, counts = jax.lax.map(part_sums, parts)
        z0 = jnp.maximum(jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0), 0.0)
        return {"reference_point": jax.lax.stop_gradient(z0),
                "rows": jnp.float32(batch["chosen_tokens"].shape[0])}
    totals_fn.uses_params = True
    return totals_fn


def evaluate_pairs(score_fn: Callable, params, arrays: Mapping[str, np.ndarray], batch_size: int,
                   mesh, loss: PreferenceLoss) -> dict[str, float]:
    """Held-out loss and metrics over ALL pairs of `arrays` (see `loss_metrics`),
    `num_pairs`, and the 95% Wilson interval of the implicit-reward accuracy
    (`rewards/accuracies_ci_low|high`, over the valid pairs).

    Args:
      score_fn: jitted `(params, batch) -> pair_outputs(...)`.
    """
    keys = [k for k in arrays if k.startswith(SIDES) or k.startswith("ref_") or k == "desirable"]
    out = evaluate.score_all_rows(score_fn, params, {k: arrays[k] for k in keys}, batch_size, mesh)
    out = {k: jnp.asarray(v) for k, v in out.items()}
    value, _ = apply_loss(loss, out)
    metrics = {"loss": value, **loss_metrics(loss, out)}
    result = {k: float(v) for k, v in jax.device_get(metrics).items()}
    n_valid = int(np.sum(np.asarray(out["valid"])))
    result["num_examples" if loss.unpaired else "num_pairs"] = float(len(out["valid"]))  # rows scored
    # Strict accuracy: an integer count; round off the float32 mean's error.
    result["rewards/accuracies_ci_low"], result["rewards/accuracies_ci_high"] = evaluate.wilson_interval(
        round(result["rewards/accuracies"] * n_valid), n_valid)
    if loss.unpaired and "pair_index" in arrays and (np.asarray(arrays["pair_index"]) >= 0).any():
        result.update(_kto_pair_accuracy(out, np.asarray(arrays["pair_index"])))
    return result


def _kto_pair_accuracy(out: Mapping[str, Array], pair_index: np.ndarray) -> dict[str, float]:
    """Held-out pairs scored by a KTO policy's implicit reward log π − log π_ref:
    `rewards/pair_accuracies` (the desirable side strictly higher, a tie counts
    0: DPO's `rewards/accuracies`), its 95% Wilson interval and `num_scored_pairs`.
    Pairs are the examples `kto_examples` made from the two sides of one pair
    (same `pair_index` >= 0); a pair with an invalid side is not counted."""
    rho = np.asarray(out["chosen_logps"], np.float64) - np.asarray(out["ref_chosen_logps"], np.float64)
    valid, desirable = np.asarray(out["valid"]), np.asarray(out["desirable"])
    good, bad = {}, {}
    for i, (p, d, v) in enumerate(zip(pair_index, desirable, valid)):
        if p >= 0 and v:
            (good if d else bad)[int(p)] = rho[i]
    both = sorted(set(good) & set(bad))
    wins = sum(good[p] > bad[p] for p in both)
    low, high = evaluate.wilson_interval(wins, len(both))
    return {"rewards/pair_accuracies": wins / len(both) if both else float("nan"),
            "rewards/pair_accuracies_ci_low": low, "rewards/pair_accuracies_ci_high": high,
            "num_scored_pairs": float(len(both))}


# ----------------------------------------------------------------------------
# KTO's unpaired examples, stored as pair rows
# ----------------------------------------------------------------------------


def prompt_keys(arrays: Mapping[str, np.ndarray], side: str = "chosen") -> list[bytes]:
    """`[N]` hashable prompt identities of a side's rows: the bytes of the
    row's prompt tokens (attended and not scored), so two rows share a key
    exactly when they hold the same prompt token sequence, at any padding."""
    tokens = np.asarray(arrays[f"{side}_tokens"], np.int64)  # one dtype: the same ids, the same bytes
    prompt = (np.asarray(arrays[f"{side}_attention_mask"], bool)
              & ~np.asarray(arrays[f"{side}_loss_mask"], bool))
    return [row[keep].tobytes() for row, keep in zip(tokens, prompt)]


def _row_layout(arrays: Mapping[str, np.ndarray], side: str) -> tuple[np.ndarray, np.ndarray]:
    """`(prompt_lengths [N], row_lengths [N])` of a side's right-padded
    `[prompt | completion | pad]` rows (one contiguous completion).

    Raises:
      ValueError: naming the first row not in that layout.
    """
    attn = np.asarray(arrays[f"{side}_attention_mask"], bool)
    scored = np.asarray(arrays[f"{side}_loss_mask"], bool) & attn
    n, p = attn.sum(axis=1), (attn & ~scored).sum(axis=1)
    col = np.arange(attn.shape[1])
    ok = (np.all(attn == (col < n[:, None]), axis=1)
          & np.all(scored == ((col >= p[:, None]) & (col < n[:, None])), axis=1))
    if not ok.all():
        raise ValueError(f"{side} row {int(np.argmin(ok))} is not [prompt | completion | padding] "
                         "(right-padded, one contiguous completion): KTO examples are built from that layout")
    return p, n


def mismatched_partners(prompt_keys: Sequence[bytes], seed: int) -> np.ndarray:
    """For each example, another example whose completion it borrows for
    KTO's reference point: one written for ANOTHER prompt (x_e, y_m(e)).

    Examples are laid out prompt group by prompt group (groups and their
    members in seeded orders), and m(e) is the example M places later,
    cyclically, where M is the largest group: when no prompt holds more than
    half the examples, this is a permutation (every completion is borrowed
    once) and never lands in e's own group. When one prompt holds more than
    half, each example draws m(e) uniformly from the other prompts' examples.
    When all examples share one prompt, there is no mismatched completion:
    m(e) is the next example of the layout (e itself when E = 1).

    Args:
      prompt_keys: `[E]` hashable prompt identities (e.g. the prompt tokens' bytes).
      seed: seeds the orders and draws.

    Returns:
      int64 `[E]` partner indices.
    """
    rng = np.random.default_rng([seed, 11])
    E = len(prompt_keys)
    groups: dict[bytes, list[int]] = {}
    for e, key in enumerate(prompt_keys):
        groups.setdefault(key, []).append(e)
    members = list(groups.values())
    layout = np.concatenate([rng.permutation(members[g]) for g in rng.permutation(len(members))]
                            ) if E else np.zeros(0, np.int64)
    M = max((len(g) for g in members), default=0)
    partner = np.empty(E, np.int64)
    if len(members) == 1:
        partner[layout] = np.roll(layout, -1)
    elif E >= 2 * M:
        partner[layout] = np.roll(layout, -M)
    else:  # uniform over the examples outside e's group: the k-th of the layout with that group cut out
        pos = np.empty(E, np.int64)
        pos[layout] = np.arange(E)
        start, size = np.empty(E, np.int64), np.empty(E, np.int64)  # of e's group's run in the layout
        for idx in members:
            start[idx], size[idx] = pos[idx].min(), len(idx)
        k = rng.integers(0, E - size)  # per example, an index among the E − |group| others
        partner[:] = layout[np.where(k < start, k, k + size)]
    return partner


def _right_pad(x: np.ndarray, width: int, value) -> np.ndarray:
    """`x [N, W]` right-padded with `value` to `[N, width]` (width >= W)."""
    x = np.asarray(x)
    return np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def kto_examples(arrays: Mapping[str, np.ndarray], sides: Mapping[str, np.ndarray], seed: int,
                 pad_id: int = 0) -> dict[str, np.ndarray]:
    """KTO's unpaired examples from pair-shaped token arrays, stored as pairs.

    Every row of each side in `sides` becomes one example with the label
    `sides[side][row]` (desirable = True). From preference pairs, chosen ->
    desirable and rejected -> undesirable (how TRL unpairs a preference
    dataset for KTO): `sides={"chosen": all True, "rejected": all False}`.
    From unpaired feedback tokenized as pairs with the completion on the
    chosen side: `sides={"chosen": labels}`.

    Example e is stored as a pair row: its "chosen" side is `[prompt_e |
    completion_e]`, its "rejected" side `[prompt_e | completion_m(e)]`, the
    completion of an example m(e) with another prompt
    (`mismatched_partners`), cut to the row width. That mismatched
    completion is KTO's sample for the reference point z_0 = E[log π(y'|x)
    − log π_ref(y'|x)];
    like TRL, the pairing is fixed once, so reference log-probs of both
    rows can be precomputed and cached. Prefix sharing then encodes the
    prompt once for both.

    Paper: K. Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
    Optimization" (2024).

    Args:
      arrays: `chosen_*`/`rejected_*` tokens, attention_mask, loss_mask `[N, T]`,
        right-padded, one contiguous completion per row.
      sides: side name -> bool `[N]` labels; the sides taken, in order.
      seed: seeds the mismatched pairing.
      pad_id: token of padding slots.

    Returns:
      pair arrays `[E, T]` (E = N × len(sides); example order: side by side
      for each row, i.e. pair b's chosen then its rejected), plus
      `desirable` bool `[E]` and `pair_index` int32 `[E]` (the source row b
      when both sides of a pair were taken, else −1).

    Raises:
      ValueError: for a row not in the layout above, or a side whose rows or
        labels are not N (a side tokenized to another width is right-padded
        to the widest).
    """
    names = list(sides)
    N = len(arrays[f"{names[0]}_tokens"])
    for side in names:
        if np.shape(sides[side]) != (N,) or len(arrays[f"{side}_tokens"]) != N:
            raise ValueError(f"kto_examples: side {side!r} has {len(arrays[f'{side}_tokens'])} rows and labels of "
                             f"shape {np.shape(sides[side])}; every side needs {N} rows and {N} labels")
    # Sides tokenized to different widths: right-pad them all to the widest.
    T = max(np.shape(arrays[f"{side}_tokens"])[1] for side in names)
    arrays = {f"{side}_{k}": _right_pad(arrays[f"{side}_{k}"], T, pad_id if k == "tokens" else False)
              for side in names for k in ("tokens", "attention_mask", "loss_mask")}
    # Example e = b·S + k is row b of side names[k] (S = len(names)): pair b's sides next to each other.
    interleave = lambda xs: np.stack(xs, axis=1).reshape(N * len(names), *xs[0].shape[1:])
    layouts = [_row_layout(arrays, side) for side in names]
    prompt_E, length_E = interleave([l[0] for l in layouts]), interleave([l[1] for l in layouts])
    tokens_ET = interleave([np.asarray(arrays[f"{side}_tokens"]) for side in names])
    keys = [prompt_keys(arrays, side) for side in names]
    partner = mismatched_partners([k for row in zip(*keys) for k in row], seed)
    col = np.arange(T)[None, :]
    prompt, own_end = prompt_E[:, None], length_E[:, None]
    # The mismatched row: e's prompt, then m(e)'s completion, cut to the row width.
    other_end = np.minimum(prompt + (length_E - prompt_E)[partner][:, None], T)
    shifted = np.clip(prompt_E[partner][:, None] + col - prompt, 0, T - 1)  # m(e)'s column for e's column
    other_tokens = np.take_along_axis(tokens_ET[partner], shifted, axis=1)
    out = {}
    for s, end, completion in (("chosen", own_end, tokens_ET), ("rejected", other_end, other_tokens)):
        attn = col < end
        out[f"{s}_tokens"] = np.where(col < prompt, tokens_ET, np.where(attn, completion, pad_id)).astype(np.int32)
        out[f"{s}_attention_mask"] = attn
        out[f"{s}_loss_mask"] = attn & (col >= prompt)
        out[f"{s}_positions"] = np.maximum(np.cumsum(attn, axis=1) - 1, 0).astype(np.int32)
    out["desirable"] = interleave([np.asarray(sides[side], bool) for side in names])
    out["pair_index"] = np.repeat(np.arange(N, dtype=np.int32) if len(names) == 2 else
                                  np.full(N, -1, np.int32), len(names))
    return out


# ----------------------------------------------------------------------------
# Which policy parameters train
# ----------------------------------------------------------------------------


def policy_trainable(num_layers: int, trainable_blocks: int):
    """Predicate on param key paths of `{"policy": ..., "reference": ...}`.

    The reference never trains. With `trainable_blocks < 0` (or >= layers)
    every policy parameter trains; otherwise the final norm, an untied
    `lm_head` and the top `trainable_blocks` blocks do, and the embeddings
    (the output layer too when tied) stay frozen.
    """
    everything = trainable_blocks < 0 or trainable_blocks >= num_layers
    first = num_layers - trainable_blocks

    def trainable(names: tuple[str, ...]) -> bool:
        if names[0] != "policy":
            return False
        if everything:
            return True
        part = names[1]
        if part in ("norm", "lm_head"):
            return True
        if part.startswith("layers_"):
            return int(part.split("_")[1]) >= first
        return False
    return trainable


# ----------------------------------------------------------------------------
# Reference log-probs: one pass before training, cached in the workdir
# ----------------------------------------------------------------------------


def soft_update_reference(params: Mapping[str, Any], alpha: float) -> dict:
    """TR-DPO's reference update: π_ref ← α·π_θ + (1 − α)·π_ref, leaf by leaf.

    α = 1 is the hard update (the reference becomes a copy of the policy).
    Paper: A. Gorbatovski et al., "Learn Your Reference Model for Real Good
    Alignment" (2024), the soft update with weight α every τ steps.

    Args:
      params: `{"policy": P, "reference": P, ...}`, two pytrees of the same
        structure and leaf shapes (float leaves; the update is computed in
        each reference leaf's dtype).
      alpha: the weight of the policy, in (0, 1].

    Returns:
      `params` with the new `"reference"`; everything else unchanged.

    Raises:
      ValueError: if alpha is outside (0, 1] or the two trees differ.
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"the TR-DPO weight alpha must be in (0, 1], got {alpha}")
    policy, ref = params["policy"], params["reference"]
    if jax.tree.structure(policy) != jax.tree.structure(ref) or any(
            jnp.shape(p) != jnp.shape(r) for p, r in zip(jax.tree.leaves(policy), jax.tree.leaves(ref))):
        raise ValueError("the reference and the policy must have the same parameters to mix them "
                         "(TR-DPO); this reference has another architecture")
    mixed = jax.tree.map(lambda p, r: (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)
                                       ).astype(r.dtype), policy, ref)
    return {**params, "reference": mixed}


class StaleCacheError(UserError):
    """A cache file was written for other data, tokenization or reference weights."""


def _update_array(digest, name: str, x) -> None:
    x = np.ascontiguousarray(np.asarray(x))
    digest.update(json.dumps([name, str(x.dtype), list(x.shape)]).encode())
    digest.update(x.tobytes())


def arrays_digest(splits: Mapping[str, Mapping[str, np.ndarray]]) -> str:
    """sha256 over every array of every split (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        for k in sorted(splits[split]):
            _update_array(digest, f"{split}/{k}", splits[split][k])
    return digest.hexdigest()


def params_digest(params) -> str:
    """sha256 of a param pytree: every leaf's key path, dtype, shape and bytes.
    On a pod, a leaf spread over several processes' devices is gathered
    first (`parallel.to_host`), one leaf at a time."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        _update_array(digest, jax.tree_util.keystr(path), parallel.to_host(leaf))
    return digest.hexdigest()


def reference_cache_key(splits: Mapping[str, Mapping[str, np.ndarray]], tokenization: str,
                        ref_params, ref_config: Any, options: Mapping[str, Any]) -> str:
    """sha256 over the pair token arrays of every split, the tokenization
    (e.g. the tokenizer fingerprint), the reference weights and architecture,
    and the log-prob options."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        arrays = pair_fields(splits[split])
        for k in sorted(arrays):
            _update_array(digest, f"{split}/{k}", arrays[k])
    header = [tokenization, params_digest(ref_params), repr(ref_config), sorted(options.items())]
    digest.update(json.dumps(header, default=str).encode())
    return digest.hexdigest()


def reference_logps(ref_fn: LogpsFn, ref_params, splits: Mapping[str, Mapping[str, np.ndarray]],
                    batch_size: int, mesh) -> dict[str, np.ndarray]:
    """Reference log-probs of every pair of every split in ONE jitted pass.

    Returns:
      `{"<split>/ref_chosen_logps": float32 [N], "<split>/ref_rejected_logps": ...}`.
    """
    names = sorted(splits)
    sizes = [len(splits[s]["chosen_tokens"]) for s in names]
    arrays = {k: np.concatenate([pair_fields(splits[s])[k] for s in names])
              for k in pair_fields(splits[names[0]])}
    score = jax.jit(lambda p, b: pair_logps(ref_fn, p, b, "reference")[:2])
    chosen, rejected = evaluate.score_all_rows(score, ref_params, arrays, batch_size, mesh)
    out, start = {}, 0
    for s, n in zip(names, sizes):
        out[f"{s}/ref_chosen_logps"] = np.asarray(chosen[start:start + n], np.float32)
        out[f"{s}/ref_rejected_logps"] = np.asarray(rejected[start:start + n], np.float32)
        start += n
    return out


def read_cache(path: str, what: str, advice: str = "move it away to recompute it",
               field: str = "") -> tuple[str, dict[str, np.ndarray]]:
    """`(key, arrays)` of a cache file written by `cached_reference_logps`.

    `advice` ends the error message; `field`, when the user named `path` in
    a config field, begins it ("config field <field>: ...").

    Raises:
      CorruptFileError: `path` is a directory, not an `.npz` archive, cut
        short, or has no key (one line naming the file; nothing is deleted).
    """
    import zipfile
    from jaxreward.errors import CorruptFileError
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files") or "__key__" not in data.files:
                raise ValueError("no __key__ entry")
            return str(data["__key__"]), {k: data[k] for k in data.files if k != "__key__"}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CorruptFileError((f"config field {field}: " if field else "")
                               + f"{path} is not a cache of {what} written by this code ({type(e).__name__}: "
                               f"{e}); {advice}") from None


def cached_reference_logps(path: str, key: str, compute: Callable[[], dict[str, np.ndarray]],
                           what: str = "reference log-probs", made_of: str = "data, tokenization or "
                           "reference weights") -> tuple[dict[str, np.ndarray], bool]:
    """`compute()`'s arrays, stored at `path` (`.npz` with the key) and reused while the key matches.

    Any job's npz cache with a key (reference log-probs here, the VAS
    driver's policy samples); `what` and `made_of` name its content in the
    error.

    Returns:
      `(arrays, reused)`.

    Raises:
      StaleCacheError: `path` holds arrays for another key (other data,
        tokenization or weights); the message says what to do.
    """
    if os.path.exists(path):
        stored, arrays = read_cache(path, what)
        if stored != key:
            raise StaleCacheError(
                f"{path} holds {what} for other {made_of} (key {stored[:16]}..., this run needs "
                f"{key[:16]}...); delete the file to recompute them, or use a new --workdir")
        return arrays, True
    arrays = compute()
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.savez(buffer, __key__=np.array(key), **arrays)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
            f.write(buffer.getvalue())
        os.replace(f.name, path)
    return arrays, False


# ----------------------------------------------------------------------------
# Sample-based evaluation: reward, win rate and KL against the reference
# ----------------------------------------------------------------------------


def mean_and_se(x) -> tuple[float, float]:
    """Mean and its standard error std/√n (ddof 1; 0 for n = 1)."""
    x = np.asarray(x, np.float64)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), se


def sequence_kl(logps_RL: Array, ref_logps_RL: Array, loss_mask_RL: Array) -> tuple[Array, Array]:
    """Per-sample estimates of KL(π‖π_ref) from the sampled responses.

    With x_t = log π(y_t) − log π_ref(y_t) over the response tokens:
    k1 = Σ_t x_t and k3 = Σ_t (e^{−x_t} − 1 + x_t). Both are unbiased for
    the sequence-level KL when y ~ π (k3 per token has expectation
    KL(π(·|y<t) ‖ π_ref(·|y<t)); the chain rule sums them); k3 is ≥ 0 and
    has lower variance.

    Returns:
      float32 `[R]` k1 and k3.
    """
    m = shift_mask(loss_mask_RL)
    k1 = jnp.sum(jnp.where(m, logps_RL - ref_logps_RL, 0.0), axis=1)
    k3 = jnp.sum(jnp.where(m, kl_k3(jnp.where(m, logps_RL, 0.0), jnp.where(m, ref_logps_RL, 0.0)), 0.0),
                 axis=1)
    return k1, k3


def win_rate(rewards_R, ref_rewards_R) -> np.ndarray:
    """Per-sample win indicator: 1 if the policy's reward beats the reference's, 0.5 on ties.

    A win rate, not an accuracy: as AlpacaEval-style win rates, a tie is
    credited half (an unchanged policy reads 0.5). The pairwise accuracies
    (`rewards/accuracies`, `accuracy`) count a tie as 0 instead, as TRL.
    """
    a, b = np.asarray(rewards_R), np.asarray(ref_rewards_R)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def best_of_n_curve(rewards_BN: np.ndarray, max_n: int) -> list[dict]:
    """Per N in 1, 2, 4, ..., max_n: the mean reward of the best of the first N
    samples of each prompt (nested subsets), with its standard error and the
    KL bound log N − (N−1)/N (nats; an upper bound on KL(best-of-N ‖ π))."""
    rows, n = [], 1
    while n <= max_n:
        best = np.asarray(rewards_BN)[:, :n].max(axis=1)
        mean, se = mean_and_se(best)
        rows.append({"N": n, "kl_bound": best_of_n_kl_bound(n), "reward": mean, "reward_se": se})
        n *= 2
    return rows


def reward_at_kl(curve: list[dict], kl: float) -> float:
    """Best-of-N reward at KL bound `kl`, linear between the measured N
    (NaN beyond the largest N). The bound overstates best-of-N's KL, so this
    understates what best-of-N reaches at that true KL."""
    bounds = [r["kl_bound"] for r in curve]
    if not curve or kl > bounds[-1]:
        return float("nan")
    return float(np.interp(max(kl, 0.0), bounds, [r["reward"] for r in curve]))


def plot_reward_vs_kl(path: str, points: list[dict], curve: list[dict], reward_name: str,
                      title: str = "") -> None:
    """PNG of reward vs KL: the policy at each eval point (k3 KL, ±1 SE
    bars, labelled by step) beside the best-of-N curve of the reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    if curve:
        ax.plot([r["kl_bound"] for r in curve], [r["reward"] for r in curve], "o-", color="tab:gray",
                label="best-of-N of the reference (x: KL bound)")
        for r in curve:
            ax.annotate(f"N={r['N']}", (r["kl_bound"], r["reward"]), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color="tab:gray")
    if points:
        ax.errorbar([p["kl_k3"] for p in points], [p["reward"] for p in points],
                    xerr=[p["kl_k3_se"] for p in points], yerr=[p["reward_se"] for p in points],
                    fmt="s-", color="tab:blue", capsize=2, label="policy at eval points (x: k3 KL)")
        for i, p in enumerate(points):  # alternate above/below: points at equal KL (e.g. 0) stay legible
            ax.annotate(f"step {int(p['step'])}", (p["kl_k3"], p["reward"]), textcoords="offset points",
                        xytext=(4, 4 if i % 2 == 0 else -10), fontsize=7, color="tab:blue")
    ax.set_xlabel("KL(π ‖ π_ref) (nats)")
    ax.set_ylabel(f"mean {reward_name}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    metrics_lib.save_figure(fig, path, dpi="figure")


def _processing(sampling: Mapping[str, Any]) -> dict:
    """The `token_logps` processing kwargs of the sampler's settings."""
    return {k: sampling[k] for k in ("temperature", "top_k", "top_p") if k in sampling}


@functools.lru_cache(maxsize=16)
def _sample_logps(model, temperature: float, top_k: int, top_p: float):
    return jax.jit(lambda p, t, a, pos: token_logps(model, p, t, a, pos, temperature=temperature,
                                                    top_k=top_k, top_p=top_p))


def sample_logps(model, params, batch, sampling: Mapping[str, Any]) -> Array:
    """Per-token log-probs `[R, L]` of sampled sequences (a `SampleBatch`)
    under `model`'s processed distribution (the sampler's temperature/top-k/top-p)."""
    p = _processing(sampling)
    fn = _sample_logps(model, float(p.get("temperature", 1.0)), int(p.get("top_k", 0)),
                       float(p.get("top_p", 1.0)))
    return fn(params, batch.tokens_RL, batch.attention_mask_RL, batch.positions_RL)


def generation_eval(policy_model, policy_params, ref_model, ref_params, prompts_BP, prompt_mask_BP,
                    reward_fn: Callable | None, *, rng, num_samples: int, sampling: Mapping[str, Any],
                    ref_rewards_R: np.ndarray | None = None, mesh=None) -> tuple[dict[str, float], np.ndarray | None]:
    """Samples the policy on held-out prompts and compares it with the reference.

    The policy and the reference draw `num_samples` responses per prompt
    with the same keys (so sample j of prompt b is a paired comparison).

    Args:
      reward_fn: `SampleBatch -> float32 [R]` (gold reward, a reward model),
        or None for KL only.
      sampling: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_ids`, `pad_id`.
      ref_rewards_R: the reference samples' rewards from an earlier call
        (they do not change during training); sampled and scored when None.
      mesh: when given, the prompts are sampled over its batch shards
        (`rollout.generate_on_shards`: the same tokens as unsplit).

    Returns:
      `(stats, ref_rewards_R)`. stats: `kl_k1`, `kl_k3` (see `sequence_kl`,
      nats per response) and `response_length`, each with `_se` (standard
      error over the R samples); with a reward also `reward`, `ref_reward`,
      `win_rate` (vs the reference's sample for the same prompt and key,
      ties 0.5), each with `_se`.
    """
    from jaxreward.sampling.sampler import generate
    from jaxreward.train.rollout import generate_on_shards

    def sample(model, params):
        if mesh is None:
            return generate(model, params, prompts_BP, prompt_mask_BP, rng=rng, num_samples=num_samples,
                            **sampling)
        return parallel.to_host(generate_on_shards(model, params, prompts_BP, prompt_mask_BP, mesh, rng=rng,
                                                   num_samples=num_samples, **sampling))

    out = sample(policy_model, policy_params)
    batch = out.sequences()
    logps = sample_logps(policy_model, policy_params, batch, sampling)
    ref_logps = sample_logps(ref_model, ref_params, batch, sampling)
    k1, k3 = jax.device_get(sequence_kl(logps, ref_logps, batch.loss_mask_RL))
    stats = {}
    for name, values in (("kl_k1", k1), ("kl_k3", k3), ("response_length", np.asarray(out.lengths_R))):
        stats[name], stats[f"{name}_se"] = mean_and_se(values)
    if reward_fn is not None:
        rewards = np.asarray(reward_fn(batch), np.float64)
        if ref_rewards_R is None:
            ref_rewards_R = np.asarray(reward_fn(sample(ref_model, ref_params).sequences()), np.float64)
        for name, values in (("reward", rewards), ("ref_reward", ref_rewards_R),
                             ("win_rate", win_rate(rewards, ref_rewards_R))):
            stats[name], stats[f"{name}_se"] = mean_and_se(values)
    return stats, ref_rewards_R
