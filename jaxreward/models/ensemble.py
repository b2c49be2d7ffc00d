"""Reward-model ensembles: E members stacked on a leading axis, trained in
one step, exported together, aggregated at scoring time.

"Reward Model Ensembles Help Mitigate Overoptimization" (Coste et al., 2023):
E reward models that differ only in their random seeds (here: the head's
init seed and the order of their batches) disagree most where the data is
thin, so ranking by a conservative aggregate (the mean minus λ·std, or the
worst member) resists over-optimization better than one model.

Layout: one `RewardModel` definition and a member-stacked param tree,
`params_E` — every leaf of one member's params `{"backbone", "head"}` gets
a leading axis of size E. `jax.vmap` over that axis runs all members at
once, for scoring (`member_rewards`) and for training
(`make_ensemble_train_step`: one jitted step updates all E, each with its
own optimizer state, clipping and batch).

An exported ensemble is a folder:

    ensemble.json        {"members": E, "member_dirs": ["member_0", ...],
                          "num_objectives": K, "pretrained": ..., ...}
    member_0/ ... member_{E-1}/   each one `reward_io.export_reward_model` folder
                                  (reward_model.json + params/, with SHA-256 digests)

`ensemble.json` is written last, so a folder without it is an unfinished
export. Each member folder is an ordinary reward model as well.
`load_reward_model_or_ensemble(dir)` takes either kind of folder and returns
a best-of-N reward function (`SampleBatch -> float32[R]`); how members
combine (`mean`, `min`, `mean_minus_std`) is chosen there, at scoring time,
by `objectives.reward.ensemble_reward`.

Shape letters: E here is the member count (the README's E, model width,
never appears next to it in these names).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxreward import parallel
from jaxreward.errors import CorruptFileError, UserError
from jaxreward.models.heads import RewardModel
from jaxreward.models.reward_io import export_reward_model, load_reward_model
from jaxreward.objectives.reward import ENSEMBLE_MODES, ensemble_reward
from jaxreward.sampling.best_of_n import RewardFn, reward_model_fn
from jaxreward.sampling.sampler import SampleBatch
from jaxreward.train import step as step_lib
from jaxreward.train.state import TrainState

ENSEMBLE_FILE = "ensemble.json"
EXPORT_DIR = "reward_ensemble"  # the folder name a run that trains an ensemble writes in its workdir


# ----------------------------------------------------------------- stacking


def stack(member_params: list) -> Any:
    """`[params_0, ..., params_{E-1}]` (same structure) -> `params_E`."""
    if not member_params:
        raise ValueError("an ensemble needs at least one member")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *member_params)


def num_members(params_E) -> int:
    """E, the leading size of every leaf of `params_E`."""
    sizes = {x.shape[0] for x in jax.tree.leaves(params_E)}
    if len(sizes) != 1:
        raise ValueError(f"params_E leaves disagree on the member axis: sizes {sorted(sizes)}")
    return sizes.pop()


def member(params_E, e: int) -> Any:
    """Member e's params (the leading axis indexed)."""
    return jax.tree.map(lambda x: x[e], params_E)


def stacked_shardings(member_shardings: Any) -> Any:
    """One member's `NamedSharding`s -> the stacked tree's: the member axis
    is not sharded (`P(None, *spec)`); a `TrainState`'s `step` stays as it is
    (it is shared by the members, see `make_ensemble_train_step`)."""
    def add_axis(s: NamedSharding) -> NamedSharding:
        return NamedSharding(s.mesh, P(None, *s.spec))
    if isinstance(member_shardings, TrainState):
        return member_shardings.replace(params=jax.tree.map(add_axis, member_shardings.params),
                                        opt_state=jax.tree.map(add_axis, member_shardings.opt_state),
                                        rng=add_axis(member_shardings.rng))
    return jax.tree.map(add_axis, member_shardings)


# ------------------------------------------------------------------ scoring


def member_rewards(rm: RewardModel, params_E, tokens_BT, attention_mask_BT, positions_BT=None,
                   pool_mask_BT=None):
    """Rewards of every member, float32 `[E, B, K]` (one vmapped forward).
    `pool_mask_BT` (the response tokens) is passed on only when given, for
    heads that pool over it."""
    args = (tokens_BT, attention_mask_BT, positions_BT) + (() if pool_mask_BT is None else (pool_mask_BT,))
    return jax.vmap(lambda p: rm.apply({"params": p}, *args))(params_E)


def member_rewards_fn(rm: RewardModel, params_E, objective: int = 0,
                      chunk_size: int | None = None) -> Callable[[SampleBatch], jax.Array]:
    """`SampleBatch` (R rows) -> float32 `[E, R]`: each member's reward of
    objective column `objective`, scoring at most `chunk_size` rows per call
    (every call has exactly that many rows, the last chunk repeating its last
    row, so it compiles once). The raw material of every aggregate. Rows are
    read as `sampling.best_of_n.reward_model_fn` reads them (a mean-pooling
    head pools over the response tokens, `loss_mask_RL`)."""
    k = rm.num_objectives
    if not 0 <= objective < k:
        raise ValueError(f"objective must be in [0, {k}), got {objective}")
    pooled = getattr(rm, "pooling", "last") != "last"

    def fn(batch: SampleBatch) -> jax.Array:
        rows = (batch.tokens_RL, batch.attention_mask_RL, batch.positions_RL,
                batch.loss_mask_RL if pooled else None)
        R = rows[0].shape[0]
        if chunk_size is None or chunk_size >= R:
            return _member_scores(rm, params_E, *rows, objective)
        outs = []
        for start in range(0, R, chunk_size):
            idx = jnp.minimum(jnp.arange(start, start + chunk_size), R - 1)
            chunk = [None if x is None else x[idx] for x in rows]
            outs.append(_member_scores(rm, params_E, *chunk, objective)[:, :min(chunk_size, R - start)])
        return jnp.concatenate(outs, axis=1)

    return fn


@functools.partial(jax.jit, static_argnums=(0, 6))
def _member_scores(rm, params_E, tokens, mask, positions, pool_mask, objective):
    """Compiled once per (model, objective, shapes), shared by every reward fn."""
    return member_rewards(rm, params_E, tokens, mask, positions, pool_mask)[:, :, objective].astype(jnp.float32)


def check_aggregate(aggregate: str, std_coef: float) -> None:
    """Raises a one-line `UserError` for an unknown mode or a negative/NaN λ."""
    if aggregate not in ENSEMBLE_MODES:
        raise UserError(f"ensemble aggregate {aggregate!r} is not one of {', '.join(ENSEMBLE_MODES)}")
    if not (isinstance(std_coef, (int, float)) and np.isfinite(std_coef) and std_coef >= 0):
        raise UserError(f"ensemble std_coef must be a finite number >= 0, got {std_coef!r}")


def ensemble_reward_fn(rm: RewardModel, params_E, aggregate: str = "mean", std_coef: float = 1.0,
                       objective: int = 0, chunk_size: int | None = None) -> RewardFn:
    """Best-of-N reward function of an ensemble: `SampleBatch -> float32[R]`,
    `objectives.reward.ensemble_reward(member rewards [E, R], aggregate,
    std_coef=λ)` — `mean`, `min` or `mean_minus_std` (mean − λ·std, the
    population std over members)."""
    check_aggregate(aggregate, std_coef)
    members = member_rewards_fn(rm, params_E, objective, chunk_size)
    return lambda batch: ensemble_reward(members(batch), aggregate, std_coef=float(std_coef))


# ------------------------------------------------------------ export / load


def export_ensemble(directory: str, rm: RewardModel, params_E, pretrained: str,
                    extra: dict | None = None) -> None:
    """Writes `member_e/` (one `export_reward_model` folder per member), then
    `ensemble.json` (`extra` is merged into it, e.g. how members were seeded)."""
    E = num_members(params_E)
    dirs = [f"member_{e}" for e in range(E)]
    for e, name in enumerate(dirs):
        export_reward_model(os.path.join(directory, name), rm, member(params_E, e), pretrained)
    meta = {"members": E, "member_dirs": dirs, "num_objectives": rm.num_objectives,
            "pretrained": pretrained, "aggregates": list(ENSEMBLE_MODES), **(extra or {})}
    if jax.process_index() == 0:  # written last: a folder without it is an unfinished export
        with open(os.path.join(directory, ENSEMBLE_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def is_ensemble_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ENSEMBLE_FILE))


def load_ensemble(directory: str) -> tuple[RewardModel, Any, dict]:
    """`(RewardModel, params_E, meta)` from `export_ensemble`'s folder.

    Raises:
      FileNotFoundError: no `ensemble.json`.
      CorruptFileError: `ensemble.json` does not parse or lacks a field, a
        member folder is missing or damaged (named, with its own reason),
        or the members differ in architecture, head size or backbone
        (`pretrained`, which names the tokenizer).
    """
    path = os.path.join(directory, ENSEMBLE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: point at the `{EXPORT_DIR}/` folder a run "
                                "that trains an ensemble wrote into its workdir")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        E, dirs = meta["members"], meta["member_dirs"]
        if not isinstance(E, int) or E < 1 or not isinstance(dirs, list) or len(dirs) != E:
            raise ValueError(f"members={E!r} does not match member_dirs={dirs!r}")
        if not all(isinstance(name, str) and name for name in dirs):
            raise ValueError(f"member_dirs must list folder names (strings), got {dirs!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"{path} is damaged or not an ensemble export "
                               f"({type(e).__name__}: {e}); export the ensemble again") from e
    rms, params, sources = [], [], []
    for name in dirs:
        sub = os.path.join(directory, name)
        try:
            rm, p, member_meta = load_reward_model(sub)
        except FileNotFoundError as e:
            raise CorruptFileError(f"ensemble {directory}: member folder {name} is missing or "
                                   f"incomplete ({e}); export the ensemble again") from e
        except CorruptFileError as e:
            raise CorruptFileError(f"ensemble {directory}: member {name}: {e}") from e
        rms.append(rm)
        params.append(p)
        sources.append(member_meta.get("pretrained"))
    for name, rm, source in zip(dirs[1:], rms[1:], sources[1:]):
        if rm != rms[0]:  # flax modules compare by their fields: architecture, head size, pooling
            raise CorruptFileError(f"ensemble {directory}: member {name} has a different "
                                   f"architecture, head size or pooling than {dirs[0]}")
        if source != sources[0]:  # the backbone names the tokenizer every member is scored with
            raise CorruptFileError(f"ensemble {directory}: member {name} was exported from backbone "
                                   f"{source!r}, {dirs[0]} from {sources[0]!r}: the members of an "
                                   "ensemble read one tokenization, so they must share one backbone")
    return rms[0], stack(params), meta


def config_options(config) -> tuple[str, float]:
    """`(ensemble.aggregate, ensemble.std_coef)` of a job config: how the
    members of an ensemble export combine wherever the job takes a
    reward-model directory; ("mean", 1.0) when the config has no `ensemble`
    block.

    Raises:
      UserError: a bad aggregate or std_coef.
    """
    block = config.get("ensemble") or {}
    aggregate, std_coef = block.get("aggregate", "mean"), block.get("std_coef", 1.0)
    check_aggregate(aggregate, std_coef)
    return aggregate, float(std_coef)


def check_config_block(config) -> None:
    """Checks the config's `ensemble` block, if it has one.

    Raises:
      ConfigError: naming `ensemble.aggregate` or `ensemble.std_coef`.
    """
    from jaxreward.train import defaults
    if config.get("ensemble") is not None:
        defaults.check_choice(config, "ensemble.aggregate", ENSEMBLE_MODES)
        defaults.check_float(config, "ensemble.std_coef", 0.0)


def check_export_dir(config, field: str) -> None:
    """Config field `field` must name a reward-model export (`reward_model.json`)
    or an ensemble export (`ensemble.json`).

    Raises:
      ConfigError: naming the field, when the folder holds neither file.
    """
    from jaxreward.train import defaults
    directory = defaults.get_field(config, field)
    if not (is_ensemble_dir(directory) or os.path.isfile(os.path.join(directory, "reward_model.json"))):
        raise defaults.ConfigError(
            f"config field {field}: {directory!r} has neither reward_model.json nor {ENSEMBLE_FILE} "
            "(point it at the reward_model/ or reward_ensemble/ folder a run wrote)")


def reward_fn_for(config, directory: str, vocab_size: int, objective: int = 0) -> tuple[RewardFn, str]:
    """`(reward_fn: SampleBatch -> float32 [R], name)` of the reward model or
    ensemble exported in `directory`, for a job whose policy has `vocab_size`
    tokens. An ensemble's members combine by the config's
    `ensemble.aggregate` / `ensemble.std_coef` (`config_options`): mean, min,
    or mean − λ·std ("Reward Model Ensembles Help Mitigate Overoptimization",
    Coste et al., 2023). `name` is one line for logs and plots.

    Raises:
      UserError: the export's vocabulary is not `vocab_size`, or a bad
        aggregate / std_coef.
      FileNotFoundError, CorruptFileError: a missing or damaged export.
    """
    aggregate, std_coef = config_options(config)
    fn, rm, meta = load_reward_model_or_ensemble(directory, aggregate=aggregate, std_coef=std_coef,
                                                 objective=objective)
    if rm.config.vocab_size != vocab_size:
        raise UserError(f"reward model {directory} has vocabulary {rm.config.vocab_size}, the "
                        f"policy {vocab_size}: they must share one tokenizer")
    if meta.get("members", 1) == 1:
        return fn, f"reward model {directory}"
    how = aggregate_label(aggregate, std_coef)
    return fn, f"reward-model ensemble {directory} ({meta['members']} members, {how})"


def aggregate_label(aggregate: str, std_coef: float) -> str:
    """How members combine, for logs: "mean", "min" or "mean - λ*std"."""
    return f"mean - {std_coef:g}*std" if aggregate == "mean_minus_std" else aggregate


def export_digest(directory: str) -> str:
    """sha256 (16 hex digits) of an export's JSON files: `reward_model.json`,
    or `ensemble.json` and every member's `reward_model.json` (they hold the
    weights' digests), so a cache keyed on it notices a re-export."""
    import hashlib
    digest = hashlib.sha256()
    if is_ensemble_dir(directory):
        with open(os.path.join(directory, ENSEMBLE_FILE), encoding="utf-8") as f:
            text = f.read()
        digest.update(text.encode())
        try:
            members = json.loads(text).get("member_dirs", [])
        except (json.JSONDecodeError, AttributeError):
            members = []
        paths = [os.path.join(directory, m, "reward_model.json") for m in members]
    else:
        paths = [os.path.join(directory, "reward_model.json")]
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def load_reward_model_or_ensemble(directory: str, *, aggregate: str = "mean", std_coef: float = 1.0,
                                  objective: int = 0, chunk_size: int | None = None
                                  ) -> tuple[RewardFn, RewardModel, dict]:
    """A best-of-N reward function from an exported reward model OR ensemble.

    Args:
      directory: a `reward_model/` export (`reward_model.json`) or an
        ensemble export (`ensemble.json`).
      aggregate, std_coef: how ensemble members combine (`mean`, `min`,
        `mean_minus_std` with λ = std_coef); checked for a single model too,
        where every mode is the model's own reward.
      objective: which head output ranks (for K-objective heads).
      chunk_size: ensemble rows per vmapped forward (None: all at once).

    Returns:
      `(reward_fn: SampleBatch -> float32[R], RewardModel, meta)`; `meta` is
      the export's JSON with `members` (1 for a single model).

    Raises:
      FileNotFoundError: neither JSON file is in `directory`.
      CorruptFileError: a damaged export (see `load_ensemble`,
        `reward_io.load_reward_model`).
      UserError: a bad aggregate or std_coef.
    """
    check_aggregate(aggregate, std_coef)
    if is_ensemble_dir(directory):
        rm, params_E, meta = load_ensemble(directory)
        return ensemble_reward_fn(rm, params_E, aggregate, std_coef, objective, chunk_size), rm, meta
    if not os.path.isfile(os.path.join(directory, "reward_model.json")):
        raise FileNotFoundError(f"{directory} holds neither {ENSEMBLE_FILE} nor reward_model.json: "
                                "point at a reward_model/ or reward_ensemble/ export")
    rm, params, meta = load_reward_model(directory)
    return reward_model_fn(rm, params, objective=objective), rm, {**meta, "members": 1}


# ----------------------------------------------------------------- training
# Step, state and batch helpers for training all members at once. By the
# layering of DESIGN.md they belong in train/ (e.g. train/ensemble.py); they
# sit here, next to the stacking they rely on, until that file exists.


def make_ensemble_train_step(loss_fn: step_lib.LossFn, metrics_fn: step_lib.MetricsFn,
                             tx: optax.GradientTransformation, schedule: optax.Schedule, mesh,
                             member_state_shardings: TrainState, micro_batches: int = 1):
    """One jitted step that trains all E members: `step_lib.make_train_step`'s
    step body, `jax.vmap`ped over the member axis.

    Each member has its own params, optimizer state (so its own Adam moments
    and its own global-norm clip) and RNG, and its own batch; `step` is
    shared. The result equals E separate `make_train_step` steps (tested).

    Args:
      loss_fn, metrics_fn, tx, schedule, micro_batches: as for
        `make_train_step`, written for ONE member.
      member_state_shardings: one member's `TrainState` shardings
        (`step_lib.state_shardings`); the stacked ones follow.

    Returns:
      `step(state_E, batch) -> (state_E, metrics)`. `state_E` is a
      `TrainState` whose params, opt_state and rng have a leading member
      axis (see `init_ensemble_state`); every batch leaf is `[B, E, ...]`
      (member e's rows in column e, so the batch axis stays first and
      shards over the mesh as usual). Metrics are `[E]` per member
      (`learning_rate` a scalar).
    """
    def member_step(params, opt_state, rng, step, batch):
        rng, sub = jax.random.split(rng)
        loss, outputs, grads = step_lib.loss_and_grad(loss_fn, params, batch, sub, micro_batches)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics_fn(outputs, batch))
        metrics.update(loss=loss, grad_norm=optax.tree.norm(grads))
        return params, opt_state, rng, metrics

    def step(state: TrainState, batch: dict):
        params, opt_state, rng, metrics = jax.vmap(member_step, in_axes=(0, 0, 0, None, 1))(
            state.params, state.opt_state, state.rng, state.step, batch)
        metrics["learning_rate"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    shardings = stacked_shardings(member_state_shardings)
    return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def init_ensemble_state(params_E, tx: optax.GradientTransformation, seeds: list[int]) -> TrainState:
    """The stacked `TrainState`: step 0, each member's `tx.init`, member e's
    RNG `PRNGKey(seeds[e])` (as `state.init_state(params, tx, seeds[e])`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params_E,
                      opt_state=jax.vmap(tx.init)(params_E),
                      rng=jnp.stack([jax.random.PRNGKey(s) for s in seeds]))


class MemberBatches:
    """E batch iterators -> one ensemble batch: each leaf `[B, E, ...]`,
    member e's batch in column e. Its position (every member's) is saved in
    checkpoints like a single loader's: `state()` / `restore()`."""

    def __init__(self, loaders: list):
        self.loaders = list(loaders)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(loader) for loader in self.loaders]
        return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}

    def state(self) -> dict:
        return {"members": [loader.state() for loader in self.loaders]}

    def restore(self, state: dict) -> None:
        members = state["members"]
        if len(members) != len(self.loaders):
            raise ValueError(f"loader state has {len(members)} members, expected {len(self.loaders)}")
        for loader, s in zip(self.loaders, members):
            loader.restore(s)
