"""HF transformers checkpoint directories <-> `Decoder` params.

A checkpoint directory holds `config.json`, the weights as one
`model.safetensors` or as shards listed in `model.safetensors.index.json`,
and usually `tokenizer.json` (+ `tokenizer_config.json`,
`generation_config.json`). Llama, Mistral and Qwen2 (Llama + q/k/v biases)
map onto `LlamaConfig`. Sliding-window attention is not implemented: a
Mistral `sliding_window` lowers `max_position_embeddings` to the window (with
a warning); Qwen2's `use_sliding_window` is refused.

One table, `_hf_tensors`, names every HF tensor with its shape, its place in
our param tree and the reshape between the two layouts; loading and export
both read it:

    q/k/v_proj.weight [H*D, E]  ->  kernel = W.T.reshape(E, H, D)
    q/k/v_proj.bias   [H*D]     ->  bias   = b.reshape(H, D)
    o_proj.weight     [E, H*D]  ->  kernel = W.T.reshape(H, D, E)
    mlp / lm_head     [out, in] ->  kernel = W.T
    norms' weight               ->  scale
    embed_tokens.weight [V, E]  ->  embedding (as is)

Both use the rotate-half RoPE layout, so no permutation is needed here
(GGUF files do need one, see `gguf_io`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxreward.errors import UserError
from jaxreward.models.llama import LlamaConfig

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# ---------------------------------------------------------------- file helpers

def float_dtype_name(dtype: Any, what: str = "dtype") -> str:
    """Name of a floating-point dtype ("float32", "bfloat16", ...).

    Raises:
      ValueError: `dtype` is not a dtype, or not a floating-point one (params
        and compute of the decoder must be float).
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"{what}={dtype!r} is not a dtype; use a float dtype such as "
                         "'float32', 'bfloat16' or 'float16'") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{what}={dtype!r} is not a floating-point dtype; use e.g. "
                         "'float32', 'bfloat16' or 'float16'")
    return dt.name


def _shown(value: Any) -> str:
    """A config value as its JSON spelling (true, "16"), else its repr."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def read_json(path: pathlib.Path, *, expect: type = dict) -> Any:
    """Parsed JSON of a checkpoint file, with the file named in every error.

    Raises:
      ValueError: "{path}: invalid JSON (...)" (chained to the decoder's
        error), or the top-level value is not an `expect` (a JSON object).
    """
    try:
        value = json.loads(pathlib.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(value, expect):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- config

def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
    """`LlamaConfig` from an HF `config.json` dict.

    Raises:
      ValueError: naming `source` and the field, for a model type or feature
        the decoder does not implement (RoPE scaling, `use_sliding_window`,
        `layer_types` other than full attention, attention/MLP output biases,
        a non-SiLU activation), a missing field, or a field of the wrong type
        (e.g. `"hidden_size": "big"`): a size field (`hidden_size`,
        `num_key_value_heads`, `head_dim`, ...) must be a positive JSON integer
        (16.7, "16", true and 0 are refused, not truncated or read as absent).

    A Mistral config's `sliding_window` W < `max_position_embeddings` is not
    refused: it loads with a warning and `max_position_embeddings` lowered to
    W, the length up to which full attention equals sliding-window attention.
    """
    if not isinstance(hf, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    try:
        return _config_from_hf(hf, source)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        if str(e).startswith(f"{source}:"):
            raise
        raise ValueError(f"{source}: invalid field value ({type(e).__name__}: {e})") from e


def _config_from_hf(hf: Mapping[str, Any], source: str) -> LlamaConfig:
    def need(field):
        if field not in hf or hf[field] is None:
            raise ValueError(f"{source}: required field {field!r} is missing")
        return size(field)

    def size(field, default=None):
        """A positive integer field (a JSON integer: not 16.7, "16" or true);
        absent or null: `default`."""
        value = hf.get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{source}: field {field!r} must be a positive integer, got {_shown(value)}")
        if value < 1:
            raise ValueError(f"{source}: field {field!r} must be a positive integer, got {value}")
        return value

    def number(field, default, fields=hf):
        """A positive number field of `fields` (rope_theta, rms_norm_eps); absent
        or null: `default`."""
        value = fields.get(field.rpartition(".")[2], default)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{source}: field {field!r} must be a positive number, got {_shown(value)}")
        return float(value)

    def flag(field):
        value = hf.get(field)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{source}: field {field!r} must be true or false, got {_shown(value)}")
        return bool(value)

    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    for field in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and flag(field):
            raise ValueError(f"{source}: {field}=true is not supported (the decoder has no "
                             "output-projection / MLP biases)")
    if flag("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window=true is not supported")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{source}: layer_types {sorted(set(layer_types))} not supported "
                         "(only full_attention)")
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")

    # RoPE: transformers 5 writes `rope_parameters`, 4.x `rope_theta` + `rope_scaling`.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for field, params in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(f"{source}: {field} of type {kind!r} is not implemented "
                             "(only default RoPE)")
    if "rope_theta" in rope:
        theta = number("rope_parameters.rope_theta", None, fields=rope)
    else:
        theta = number("rope_theta", 10000.0)

    max_positions = size("max_position_embeddings", 2048)
    window = size("sliding_window") if model_type == "mistral" else None
    if model_type == "mistral" and window is not None and window < max_positions:
        log.warning("%s: sliding_window=%d is not implemented; max_position_embeddings is "
                    "lowered from %d to %d, where full attention is exact",
                    source, window, max_positions, window)
        max_positions = window

    num_heads = need("num_attention_heads")
    hidden = need("hidden_size")
    head_dim = size("head_dim")
    if head_dim is None and hidden % num_heads:
        raise ValueError(f"{source}: hidden_size={hidden} is not a multiple of num_attention_heads="
                         f"{num_heads} and there is no head_dim field")
    return LlamaConfig(
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=size("num_key_value_heads", num_heads),
        head_dim=head_dim or hidden // num_heads,
        rope_theta=theta,
        rms_norm_eps=number("rms_norm_eps", 1e-6),
        tie_embeddings=flag("tie_word_embeddings"),
        qkv_bias=model_type == "qwen2",
        max_position_embeddings=max_positions,
    )


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """HF `config.json` dict: "qwen2" when the config has q/k/v biases, else "llama"."""
    qwen2 = cfg.qkv_bias
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Both spellings: transformers 5 reads dtype, 4.x torch_dtype.
        "dtype": str(jnp.dtype(cfg.param_dtype)),
        "torch_dtype": str(jnp.dtype(cfg.param_dtype)),
    }
    if qwen2:
        out.update(use_sliding_window=False, sliding_window=None,
                   layer_types=["full_attention"] * cfg.num_layers)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


# ------------------------------------------------------------ tensor mapping

@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]              # keys in our param tree
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _hf_tensors(cfg: LlamaConfig) -> Iterator[_Entry]:
    """Every tensor of an HF checkpoint of `cfg`, with its place in our tree."""
    E, F, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.dim_per_head
    same = lambda x: x
    t = lambda x: x.T
    yield _Entry("model.embed_tokens.weight", (V, E), ("embed_tokens", "embedding"), same, same)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers_{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield _Entry(hf + norm + ".weight", (E,), (ours, norm, "scale"), same, same)
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads), ("v", cfg.num_kv_heads)):
            proj = f"{name}_proj"
            yield _Entry(f"{hf}self_attn.{proj}.weight", (heads * D, E),
                         (ours, "self_attn", proj, "kernel"),
                         lambda w, h=heads: w.T.reshape(E, h, D),
                         lambda k, h=heads: k.reshape(E, h * D).T)
            if cfg.qkv_bias:
                yield _Entry(f"{hf}self_attn.{proj}.bias", (heads * D,),
                             (ours, "self_attn", proj, "bias"),
                             lambda b, h=heads: b.reshape(h, D), lambda b: b.reshape(-1))
        H = cfg.num_heads
        yield _Entry(f"{hf}self_attn.o_proj.weight", (E, H * D), (ours, "self_attn", "o_proj", "kernel"),
                     lambda w: w.T.reshape(H, D, E), lambda k: k.reshape(H * D, E).T)
        for proj, shape in (("gate_proj", (F, E)), ("up_proj", (F, E)), ("down_proj", (E, F))):
            yield _Entry(f"{hf}mlp.{proj}.weight", shape, (ours, "mlp", proj, "kernel"), t, t)
    yield _Entry("model.norm.weight", (E,), ("norm", "scale"), same, same)
    if not cfg.tie_embeddings:
        yield _Entry("lm_head.weight", (V, E), ("lm_head", "kernel"), t, t)


def _short_list(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:20])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 20 else "")


def params_from_hf_tensors(
    tensors: Mapping[str, Any],
    cfg: LlamaConfig,
    *,
    dtype: Any = "float32",
    source: str = "checkpoint",
) -> dict:
    """Our param tree (jax arrays of `dtype`) from HF-named `[out, in]` tensors.

    `tensors` maps HF names to arrays, or to zero-argument callables returning
    one (so a loader can read each tensor only when it is converted).

    Raises:
      ValueError: listing missing or unexpected tensor names, or a tensor
        whose shape disagrees with the config.
    """
    entries = list(_hf_tensors(cfg))
    expected = {e.hf_name for e in entries}
    ignored = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        ignored.add("lm_head.weight")   # a tied checkpoint that stores the copy anyway
    missing = expected - set(tensors)
    unexpected = set(tensors) - expected - ignored
    if missing or unexpected:
        msg = [f"{source}: tensor names do not match the config"]
        if missing:
            msg.append(f"missing: {_short_list(missing)}")
        if unexpected:
            msg.append(f"unexpected: {_short_list(unexpected)}")
        raise ValueError("; ".join(msg))
    np_dtype = jnp.dtype(dtype)
    params: dict = {}
    for e in entries:
        value = tensors[e.hf_name]
        value = value() if callable(value) else value
        if tuple(value.shape) != e.hf_shape:
            raise ValueError(f"{source}: tensor {e.hf_name} has shape {tuple(value.shape)}, "
                             f"the config implies {e.hf_shape}")
        node = params
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = jnp.asarray(e.to_ours(np.asarray(value)).astype(np_dtype))
    return params


def params_to_hf_tensors(params: Mapping, cfg: LlamaConfig, dtype: Any = None) -> dict[str, np.ndarray]:
    """HF-named numpy tensors from our param tree (inverse of `params_from_hf_tensors`).

    Raises:
      ValueError: `params` is not a `Decoder` param tree of `cfg` (a param
        missing, e.g. a `RewardModel`'s tree `{"backbone", "head"}`, or of
        another shape), naming the first such param.
    """
    if isinstance(params, Mapping) and "embed_tokens" not in params and "backbone" in params:
        raise ValueError("params are a RewardModel's ({'backbone', 'head'}), not a Decoder's: "
                         "export the backbone, params['backbone'] with the reward model's .config")
    out = {}
    for e in _hf_tensors(cfg):
        node = params
        for key in e.path:
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"params have no {'/'.join(e.path)}: expected the param tree of a "
                                 "Decoder of this config (model.init(...)['params'])")
            node = node[key]
        value = np.asarray(jax.device_get(node))
        if dtype is not None:
            value = value.astype(jnp.dtype(dtype))
        try:
            value = e.to_hf(value)
        except ValueError:   # a reshape that does not fit
            value = None
        if value is None or tuple(value.shape) != e.hf_shape:
            raise ValueError(f"param {'/'.join(e.path)} has shape {list(np.shape(node))}, which does "
                             f"not fit the config (its HF tensor {e.hf_name} is {list(e.hf_shape)})")
        out[e.hf_name] = np.ascontiguousarray(value)
    return out


# ---------------------------------------------------------------- safetensors

def make_export_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Creates the folder an export writes into (parents too) and checks it is writable.

    Raises:
      UserError: `path` (or a parent) is a file, or the folder cannot be
        created or written: one line, not a traceback at the end of a run.
    """
    directory = pathlib.Path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way (of the folder or a parent), no permission, ...
        raise UserError(f"cannot export to {directory}: {e.strerror or e}"
                        + (" (a file, not a folder)" if directory.is_file() else "")) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"cannot export to {directory}: the folder is not writable")
    return directory


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
    # transformers' order: model.safetensors first, then the index. A folder
    # with both is one an export wrote over a sharded checkpoint (the index
    # and shards left over): reading the index would load the old weights.
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" object (tensor name -> shard file)")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard or os.path.isabs(shard):
                raise ValueError(f"{index}: weight_map[{name!r}] must be the file name of a shard "
                                 f"in the same folder, got {shard!r}")
        files = sorted({directory / f for f in weight_map.values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are missing: {absent}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {directory}")
    return files


def _lazy_tensors(files: list[pathlib.Path]) -> dict[str, Callable[[], np.ndarray]]:
    """name -> reader. numpy has no bfloat16, so BF16 tensors are read
    through the flax API and come back as ml_dtypes bfloat16 arrays."""
    readers = {}
    for path in files:
        try:
            f = safetensors.safe_open(str(path), framework="numpy")
        except Exception as e:   # safetensors' SafetensorError does not name the file
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
        with f:
            for name in f.keys():
                if name in readers:
                    raise ValueError(f"tensor {name} appears in more than one shard ({path})")
                bf16 = f.get_slice(name).get_dtype() == "BF16"
                readers[name] = lambda p=path, n=name, b=bf16: _read_tensor(p, n, b)
    return readers


def _read_tensor(path: pathlib.Path, name: str, bf16: bool) -> np.ndarray:
    with safetensors.safe_open(str(path), framework="flax" if bf16 else "numpy") as f:
        return np.asarray(f.get_tensor(name))


# ------------------------------------------------------------ directory I/O

def load_hf_dir(path: str | pathlib.Path, *, dtype: Any = "float32"):
    """Loads an HF checkpoint directory.

    Args:
      path: the directory (`config.json`, safetensors weights, tokenizer files).
      dtype: dtype of the params and of the model's compute (`LlamaConfig.dtype`
        and `param_dtype`); bf16 checkpoints are converted to it.

    Returns:
      `(config, params, tokenizer)`; tokenizer is a
      `jaxreward.data.tokenizer.Tokenizer`, or None (with a warning) when the
      directory has no `tokenizer.json`.

    Raises:
      FileNotFoundError: no config.json or no weights in the directory.
      ValueError: naming the file, for invalid JSON, an unsupported config,
        unreadable weights or tokenizer, tensors that do not match the
        config; or a non-float `dtype`.
    """
    directory = pathlib.Path(path)
    dtype_name = float_dtype_name(dtype)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    cfg = config_from_hf(read_json(config_path), source=str(config_path))
    cfg = dataclasses.replace(cfg, dtype=dtype_name, param_dtype=dtype_name)
    params = params_from_hf_tensors(_lazy_tensors(_safetensors_files(directory)), cfg,
                                    dtype=dtype_name, source=str(directory))
    tokenizer = None
    if (directory / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(directory)
    else:
        log.warning("%s has no tokenizer.json; returning tokenizer=None", directory)
    return cfg, params, tokenizer


def load_tokenizer(directory: str | pathlib.Path):
    """`Tokenizer.from_file` of a checkpoint directory, with the file named in every error.

    Raises:
      ValueError: "{file}: ..." for invalid JSON in tokenizer.json,
        tokenizer_config.json, generation_config.json or chat_template.json, a
        chat_template.jinja that is not UTF-8 text, a field of the wrong type
        in one of them (see `_check_tokenizer_files`), or a tokenizer.json the
        `tokenizers` library cannot load (its bare `Exception`s, e.g. "Model
        missing"), chained to the original error.
    """
    from jaxreward.data.tokenizer import Tokenizer

    directory = pathlib.Path(directory)
    _check_tokenizer_files(directory)
    tokenizer_json = directory / "tokenizer.json"
    try:
        return Tokenizer.from_file(tokenizer_json)
    except Exception as e:   # tokenizers raises plain Exception
        raise ValueError(f"{tokenizer_json}: cannot load the tokenizer (with tokenizer_config.json and "
                         f"generation_config.json next to it): {type(e).__name__}: {e}") from e


def _check_tokenizer_files(directory: pathlib.Path) -> None:
    """Refuses, naming the file and the field, what `Tokenizer.from_file`
    would misread or silently ignore: invalid JSON or UTF-8, `add_bos_token` /
    `add_eos_token` not a boolean, a `chat_template` neither a string nor a
    list of {"name", "template"} objects, a special token neither a string
    nor an {"content": str} object, token ids not integers."""
    def fail(path, field, want, value):
        raise ValueError(f"{path}: field {field!r} must be {want}, got {_shown(value)}")

    def check_template(path, value):
        if value is None or isinstance(value, str):
            return
        if (isinstance(value, list) and value and all(
                isinstance(t, dict) and isinstance(t.get("template"), str) for t in value)):
            return
        fail(path, "chat_template", 'a string or a list of {"name", "template": str} objects', value)

    def is_id(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.json"):
        path = directory / name
        if not path.is_file():
            continue
        value = read_json(path)
        if name == "tokenizer_config.json":
            for field in ("add_bos_token", "add_eos_token"):
                if value.get(field) is not None and not isinstance(value[field], bool):
                    fail(path, field, "true or false", value[field])
            for field in ("bos_token", "eos_token", "pad_token", "unk_token"):
                token = value.get(field)
                if token is not None and not isinstance(token, str) and not (
                        isinstance(token, dict) and isinstance(token.get("content"), str)):
                    fail(path, field, 'a string or an {"content": str} object', token)
            check_template(path, value.get("chat_template"))
        elif name == "chat_template.json":
            check_template(path, value.get("chat_template"))
        elif name == "generation_config.json":
            for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
                ids = value.get(field)
                if ids is not None and not is_id(ids) and not (
                        isinstance(ids, list) and all(is_id(i) for i in ids)):
                    fail(path, field, "a token id or a list of token ids", ids)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{jinja}: not UTF-8 text ({e})") from e


def save_hf_dir(path: str | pathlib.Path, cfg: LlamaConfig, params: Mapping, tokenizer=None,
                *, dtype: Any = None) -> pathlib.Path:
    """Writes an HF checkpoint directory that `transformers.AutoModelForCausalLM`
    and `load_hf_dir` both load: `config.json`, `model.safetensors` and, with a
    tokenizer, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.

    Args:
      path: output directory (created).
      cfg: the model's config.
      params: `Decoder` params (jax or numpy arrays; sharded arrays are
        gathered; flax `LogicallyPartitioned` boxes, as `Decoder.init` makes
        them, are unboxed).
      tokenizer: optional `jaxreward.data.tokenizer.Tokenizer`.
      dtype: dtype of the saved tensors (default: as the params are).

    Returns:
      The directory.

    Raises:
      ValueError: a non-float `dtype`, or `params` that are not a `Decoder`
        param tree of `cfg` (see `params_to_hf_tensors`); nothing is written.
      UserError: `path` (or a parent) is a file, or the folder cannot be
        created or written; nothing is written.
    """
    import safetensors.flax
    from flax.core import meta

    if dtype is not None:
        float_dtype_name(dtype)
    tensors = params_to_hf_tensors(meta.unbox(params), cfg, dtype)
    directory = make_export_dir(path)
    hf_config = config_to_hf(cfg)
    saved_dtype = next(iter(tensors.values())).dtype
    hf_config["dtype"] = hf_config["torch_dtype"] = str(saved_dtype)
    if any(v.dtype == jnp.bfloat16 for v in tensors.values()):
        # safetensors' numpy API has no bfloat16; its flax API writes the same file format.
        safetensors.flax.save_file({k: jnp.asarray(v) for k, v in tensors.items()},
                                   str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"),
                                    metadata={"format": "pt"})
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
               "pad_token_id": tokenizer.pad_id}
        hf_config.update(ids)
        save_tokenizer(directory, tokenizer, model_max_length=cfg.max_position_embeddings)
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return directory


def save_tokenizer(directory: str | pathlib.Path, tokenizer, *, model_max_length: int | None = None) -> None:
    """Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`
    for a `jaxreward.data.tokenizer.Tokenizer`, readable by `transformers.AutoTokenizer`
    and by `Tokenizer.from_file` (same ids, same BOS policy, same stop ids)."""
    import tokenizers
    from tokenizers import processors

    # The post-processor says the BOS policy to transformers; ours reads add_bos_token.
    hf_tok = tokenizers.Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    if tokenizer.add_bos:
        bos = tokenizer.bos_token
        hf_tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer.bos_id)])
    else:
        hf_tok.post_processor = processors.TemplateProcessing(
            single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_tok.save(str(directory / "tokenizer.json"))
    token = lambda i: None if i is None else tokenizer.id_to_token(i)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "pad_token": token(tokenizer.pad_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    stop = list(tokenizer.stop_ids)
    generation = {"bos_token_id": tokenizer.bos_id,
                  "eos_token_id": stop[0] if len(stop) == 1 else stop,
                  "pad_token_id": tokenizer.pad_id}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
