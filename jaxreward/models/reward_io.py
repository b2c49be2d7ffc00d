"""Export and load trained reward models (a `RewardModel` + its params).

An exported folder holds `reward_model.json` (architecture, head size, the
pretrained source and the SHA-256 of every file under `params/`) and
`params/` (an orbax checkpoint of the param pytree). Loading checks the
digests first, so a truncated, deleted or altered file is refused by name
instead of loading wrong weights; the param tree is then checked against the
architecture `reward_model.json` describes (shapes and names).
Best-of-N, the evaluation job and the RL trainers read it back with
`load_reward_model`.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from jaxreward.errors import CorruptFileError
from jaxreward.models.heads import RewardModel
from jaxreward.models.hf_io import make_export_dir
from jaxreward.models.llama import LlamaConfig
from jaxreward.train import checkpoint as ckpt_lib
from jaxreward.train.step import unbox

EXPORT_DIR = "reward_model"  # the folder name a reward-model run writes in its workdir


def export_reward_model(directory: str, rm: RewardModel, params, pretrained: str) -> None:
    """Saves `params` (orbax) and `reward_model.json` into `directory`.

    Args:
      directory: output folder (created; an existing export is overwritten).
      rm: the `RewardModel` (its config and `num_objectives` are stored).
      params: its param pytree `{"backbone": ..., "head": ...}`.
      pretrained: where the backbone came from (a path or known name), stored
        for the record.

    Raises:
      UserError: `directory` (or a parent) is a file, or the folder cannot
        be created or written (before orbax's save threads start).
    """
    make_export_dir(directory)  # before orbax's save threads start
    digests = ckpt_lib.save_params(os.path.join(directory, "params"), params)
    meta = {"pretrained": pretrained, "num_objectives": rm.num_objectives, "pooling": rm.pooling,
            "llama_config": dataclasses.asdict(rm.config), "params_sha256": digests}
    if jax.process_index() == 0:  # written last: a folder without it is an unfinished export
        with open(os.path.join(directory, "reward_model.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)


def load_reward_model(directory: str) -> tuple[RewardModel, dict, dict]:
    """`(RewardModel, params, meta)` from `export_reward_model`'s folder.

    Raises:
      FileNotFoundError: the folder or its `reward_model.json` is missing.
      CorruptFileError: `reward_model.json` does not parse, lacks a field or
        has a field of the wrong type (named; see `check_meta`), or a file under `params/` is missing or differs from the export
        (named; exports without `params_sha256`, from older versions, are
        loaded unchecked), or the params do not fit the architecture that
        `reward_model.json` describes (the first differing parameter named).
    """
    path = os.path.join(directory, "reward_model.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: point at the `{EXPORT_DIR}/` folder a "
                                "reward_model run wrote into its workdir")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        check_meta(meta)
        rm = RewardModel(LlamaConfig(**meta["llama_config"]), num_objectives=meta["num_objectives"],
                         pooling=meta.get("pooling", "last"))
    except (ValueError, KeyError, TypeError) as e:  # bad JSON (a ValueError), missing/unknown keys
        raise CorruptFileError(f"{path} is damaged or not a reward-model export "
                               f"({type(e).__name__}: {e}); export the reward model again") from e
    try:
        params = ckpt_lib.load_params(os.path.join(directory, "params"),
                                      digests=meta.get("params_sha256"))
    except CorruptFileError as e:
        raise CorruptFileError(f"reward model {directory}: {e}; export it again") from e
    mismatch = params_mismatch(rm, params)
    if mismatch:
        raise CorruptFileError(f"{path} does not describe the parameters in {directory}/params "
                               f"({mismatch}); export the reward model again")
    return rm, params, meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each LlamaConfig field may hold in reward_model.json: (check, what it must be).
_NON_NEGATIVE = ("attention_query_chunk",)
_FIELD_KINDS = {
    "int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int | None": (lambda v: v is None or (_is_int(v) and v > 0), "a positive integer or null"),
    "float": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "str | None": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def check_meta(meta) -> None:
    """Refuses a `reward_model.json` value of the wrong type or shape with a
    `ValueError` naming the field (`load_reward_model` adds the file):
    `llama_config` an object of `LlamaConfig` fields, each of its type (sizes
    positive integers, not "2", 2.5 or true; `attention_query_chunk` >= 0); `num_objectives` a positive
    integer; `pooling` "last" or "mean"; `pretrained` a string;
    `params_sha256` an object of file -> digest strings."""
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    config = meta.get("llama_config")
    if not isinstance(config, dict):
        raise ValueError(f"field 'llama_config' must be an object of LlamaConfig fields, got {config!r}")
    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    for name, value in config.items():
        if name not in fields:
            raise ValueError(f"field 'llama_config.{name}' is not a LlamaConfig field")
        kind = fields[name].type if isinstance(fields[name].type, str) else fields[name].type.__name__
        check, what = _FIELD_KINDS.get(kind, (lambda v: True, ""))
        if name in _NON_NEGATIVE:  # 0 is a setting ("off"), not a size
            check, what = (lambda v: _is_int(v) and v >= 0), "an integer >= 0"
        if not check(value):
            raise ValueError(f"field 'llama_config.{name}' must be {what}, got {value!r}")
    missing = [n for n, f in fields.items() if n not in config
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"field 'llama_config' lacks {', '.join(missing)}")
    if "num_objectives" not in meta:
        raise ValueError("field 'num_objectives' is missing")
    if not (_is_int(meta["num_objectives"]) and meta["num_objectives"] > 0):
        raise ValueError(f"field 'num_objectives' must be a positive integer, got {meta['num_objectives']!r}")
    if meta.get("pooling", "last") not in ("last", "mean"):
        raise ValueError(f"field 'pooling' must be \"last\" or \"mean\", got {meta['pooling']!r}")
    if not isinstance(meta.get("pretrained", ""), str):
        raise ValueError(f"field 'pretrained' must be a string (a path or model name), got {meta['pretrained']!r}")
    digests = meta.get("params_sha256")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items())):
        raise ValueError("field 'params_sha256' must be an object of file name -> SHA-256 strings")


def params_mismatch(model, params) -> str | None:
    """Where `params` differ from the tree `model.init` makes (a leaf missing,
    extra, or of another shape: the first one, by path), or None when they
    match. The digests cover the params files only, so this is what catches
    a `reward_model.json` edited to another architecture."""
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))
    leaves = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    expected = {ckpt_lib.leaf_path(p): tuple(x.shape) for p, x in leaves(unbox(expected["params"]))}
    got = {ckpt_lib.leaf_path(p): tuple(x.shape) for p, x in leaves(params)}
    for name in sorted(expected.keys() | got.keys()):
        if name not in got:
            return f"parameter {name} is missing"
        if name not in expected:
            return f"parameter {name} is not in this architecture"
        if expected[name] != got[name]:
            return f"parameter {name} has shape {list(got[name])}, expected {list(expected[name])}"
    return None

