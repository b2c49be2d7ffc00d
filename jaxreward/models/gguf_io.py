"""GGUF (llama.cpp) files -> `Decoder` params and a `Tokenizer`.

Read with `gguf.GGUFReader`; every tensor is dequantized to float32 with
`gguf.quants.dequantize` (vectorized numpy), renamed to its HF name and then
mapped onto our tree by `hf_io.params_from_hf_tensors`, so the two loaders
share one layout table and one missing/unexpected-name check.

RoPE layout: llama.cpp's HF->GGUF converter permutes the rows of the Q and K
projections of "llama" models, per head, from HF's rotate-half order (pair
(i, i + D/2)) to the interleaved order llama.cpp rotates (pair (2i, 2i+1)):
HF row `half * D/2 + i` of a head becomes GGUF row `2 * i + half`.
`unpermute_rope_rows` undoes that. Qwen2 files are stored in rotate-half
("neox") order already and are not permuted.

The tokenizer is rebuilt from the vocabulary in the metadata
(`tokenizer.ggml.*`): a byte-level BPE with the pre-tokenizer named by
`tokenizer.ggml.pre`, control tokens as special added tokens, wrapped in
`jaxreward.data.tokenizer.Tokenizer`.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import struct
from typing import Any

import numpy as np

from jaxreward.models import hf_io
from jaxreward.models.llama import LlamaConfig

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_PERMUTED_ARCHITECTURES = ("llama",)   # Q/K rows interleaved by llama.cpp's converter

# GGUF tensor names -> HF names ({i} = layer).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGML token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


# ---------------------------------------------------------------- metadata

def _value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, source: str = "gguf") -> LlamaConfig:
    """`LlamaConfig` from a GGUF's `{arch}.*` metadata and tensor list.

    Raises:
      ValueError: naming the file and key, for an unsupported architecture,
        RoPE scaling, partial rotary dimension or a missing key.
    """
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{source}: general.architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def get(key, default=None):
        value = _value(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{source}: metadata key {arch}.{key} is missing")
        if isinstance(value, list):
            raise ValueError(f"{source}: {arch}.{key} is a per-layer list; not supported")
        if isinstance(value, float):
            value = float(str(np.float32(value)))   # f32 metadata: 1e-05, not 9.9999997e-06
        return value

    scaling = _value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{source}: {arch}.rope.scaling.type {scaling!r} is not implemented "
                         "(only default RoPE)")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{source}: tensor rope_freqs.weight (scaled RoPE frequencies, e.g. "
                         "Llama 3.1) is not implemented (only default RoPE)")
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{source}: tensor token_embd.weight is missing")
    hidden = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rotary = _value(reader, f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ValueError(f"{source}: {arch}.rope.dimension_count={rotary} differs from the head "
                         f"dimension {head_dim}; partial rotary is not supported")
    # GGML shapes list the fastest axis first: token_embd is [E, V].
    vocab_size = int(tensors["token_embd.weight"].shape[-1])
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        max_position_embeddings=int(get("context_length", 2048)),
    )


# ------------------------------------------------------------------ tensors

def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: interleaved -> rotate-half.

    `w` is `[num_heads * D, ...]` (a weight `[out, in]` or a bias `[out]`).
    Within each head, GGUF row `2 * i + half` holds HF row `half * D/2 + i`.
    """
    d = w.shape[0] // num_heads
    return (w.reshape(num_heads, d // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's permutation (rotate-half -> interleaved); inverse of `unpermute_rope_rows`."""
    d = w.shape[0] // num_heads
    return (w.reshape(num_heads, 2, d // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def hf_name(gguf_name: str) -> str:
    """HF tensor name of a GGUF tensor (unknown names are returned unchanged)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return gguf_name


def _dequantized(tensor, cfg: LlamaConfig, permuted: bool) -> np.ndarray:
    import gguf

    shape = tuple(int(n) for n in reversed(tensor.shape))   # numpy order: [out, in]
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    if permuted:
        kind = tensor.name.split(".")[-2]
        if kind == "attn_q":
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif kind == "attn_k":
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
    return w


def dequantizable(tensor_type) -> bool:
    """Whether `gguf.quants.dequantize` implements `tensor_type` (F32, F16 and
    the types with a dequantizer; not e.g. F64, I8..I64, Q8_1, Q8_K)."""
    import gguf

    return (tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            or tensor_type in gguf.quants._type_traits)


def _type_name(tensor_type) -> str:
    return getattr(tensor_type, "name", str(tensor_type))


def hf_tensors_from_gguf(reader, cfg: LlamaConfig, source: str = "gguf") -> dict:
    """HF-named readers (zero-argument callables -> float32 `[out, in]` arrays).

    Raises:
      ValueError: naming `source`, a tensor and its type, when a tensor is of
        a type that cannot be dequantized (checked before any tensor is read).
    """
    bad = [t for t in reader.tensors if not dequantizable(t.tensor_type)]
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(f"{source}: tensor {bad[0].name} is of type {_type_name(bad[0].tensor_type)}, "
                         f"which cannot be dequantized{more}; supported: F32, F16, BF16 and the "
                         "llama.cpp block quantizations (Q4_0, Q8_0, Q4_K, IQ4_XS, ...)")
    arch = _value(reader, "general.architecture")
    permuted = arch in _PERMUTED_ARCHITECTURES
    return {hf_name(t.name): (lambda t=t: _dequantized(t, cfg, permuted)) for t in reader.tensors}


# ---------------------------------------------------------------- tokenizer

# Split regexes of the pre-tokenizers named by `tokenizer.ggml.pre` that are
# not the plain GPT-2 one.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None, source: str):
    """(normalizer, pre-tokenizer) for a `tokenizer.ggml.pre` name."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_level_gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return None, byte_level_gpt2
    if pre in ("smollm", "starcoder"):
        # Every digit on its own, then the GPT-2 split (SmolLM2's tokenizer.json).
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level_gpt2])
    if pre in ("llama3", "llama-bpe", "llama-v3"):
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), byte_level])
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), byte_level])
    raise ValueError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                     "default/gpt2, smollm, starcoder, llama3/llama-bpe, qwen2)")


def tokenizer_from_gguf(reader, source: str = "gguf"):
    """`jaxreward.data.tokenizer.Tokenizer` from the GGUF vocabulary.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) only. Stop ids follow
    `jaxreward.data.tokenizer.chat_stop_ids`, the rule of the HF loader: EOS,
    `tokenizer.ggml.eot_token_id` / `eom_token_id` when present, and every
    end-of-turn control token (e.g. `<|im_end|>`) the chat template writes.

    Raises:
      ValueError: another tokenizer model (e.g. sentencepiece "llama"), an
        unknown pre-tokenizer, or a vocabulary `tokenizers` refuses (e.g.
        tokenizer.ggml.merges naming a token missing from tokenizer.ggml.tokens).
    """
    import tokenizers
    from tokenizers import decoders, models

    from jaxreward.data.tokenizer import Tokenizer, chat_stop_ids

    kind = _value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model {kind!r} is not supported "
                         "(only byte-level BPE, 'gpt2')")
    tokens = _value(reader, "tokenizer.ggml.tokens")
    types = _value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _value(reader, "tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        log.warning("%s: %d duplicate token strings in the vocabulary", source, len(tokens) - len(vocab))
    try:
        hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                             byte_fallback=False))
    except Exception as e:   # tokenizers raises plain Exception ("Token `zz` out of vocabulary")
        raise ValueError(f"{source}: tokenizer.ggml.merges does not fit tokenizer.ggml.tokens ({e})") from e
    normalizer, pre_tokenizer = _pre_tokenizer(_value(reader, "tokenizer.ggml.pre"), source)
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
    hf.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in control])
    hf.add_tokens([tokenizers.AddedToken(t, normalized=False, special=False) for t in user])

    def token_id(key):
        value = _value(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    template = _value(reader, "tokenizer.chat_template")
    declared = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
    stop_ids = chat_stop_ids(eos_id, template, {t: vocab[t] for t in control}, declared)
    add_bos = _value(reader, "tokenizer.ggml.add_bos_token")
    return Tokenizer(
        hf,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=token_id("padding_token_id"),
        add_bos=bool(add_bos) and bos_id is not None,
        chat_template=template,
        stop_ids=tuple(stop_ids),
    )


# ------------------------------------------------------------------ loading

def open_gguf(path: str | pathlib.Path):
    """`gguf.GGUFReader` of `path`, with the file named in every error.

    Raises:
      FileNotFoundError: `path` is not a file.
      ValueError: "{path}: not a valid GGUF file (...)" for a file that is not
        GGUF (bad magic), is empty or is truncated, chained to gguf's error.
    """
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(str(path))
    # gguf reports a bad magic, a short header or truncated tensor data with
    # bare numpy/struct errors that do not name the file.
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error) as e:
        size = path.stat().st_size
        raise ValueError(f"{path}: not a valid GGUF file ({size} bytes; empty, truncated or not "
                         f"GGUF): {type(e).__name__}: {e}") from e


def _naming_file(fn, reader, source: str):
    """`fn(reader, source=source)`, with a malformed-metadata error (a bare
    TypeError, KeyError, ... from a value of the wrong type, or the plain
    `Exception` the `tokenizers` library raises, e.g. for a merge of a token
    not in the vocabulary) turned into a ValueError that names the file."""
    try:
        return fn(reader, source=source)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        if str(e).startswith(f"{source}:"):
            raise
        raise ValueError(f"{source}: invalid GGUF metadata ({type(e).__name__}: {e})") from e
    except Exception as e:   # tokenizers raises plain Exception; other types are bugs
        if type(e) is not Exception:
            raise
        raise ValueError(f"{source}: invalid GGUF metadata ({e})") from e


def load_gguf(path: str | pathlib.Path, *, dtype: Any = "float32", with_tokenizer: bool = True):
    """Loads a GGUF file.

    Args:
      path: the `.gguf` file.
      dtype: params and compute dtype, a float dtype (tensors are dequantized
        to float32 first).
      with_tokenizer: build the tokenizer from the vocabulary (else None).

    Returns:
      `(config, params, tokenizer)`.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file, for a file that is not (valid) GGUF, an
        unsupported model, tensor type (e.g. F64; named with the tensor) or
        tokenizer, or a non-float `dtype`.
    """
    path = pathlib.Path(path)
    dtype_name = hf_io.float_dtype_name(dtype)
    reader = open_gguf(path)
    cfg = _naming_file(config_from_gguf, reader, str(path))
    cfg = dataclasses.replace(cfg, dtype=dtype_name, param_dtype=dtype_name)
    params = hf_io.params_from_hf_tensors(hf_tensors_from_gguf(reader, cfg, str(path)), cfg,
                                          dtype=dtype_name, source=str(path))
    tokenizer = _naming_file(tokenizer_from_gguf, reader, str(path)) if with_tokenizer else None
    return cfg, params, tokenizer
