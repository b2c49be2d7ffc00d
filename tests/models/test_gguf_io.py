"""GGUF import: llama.cpp's Q/K permutation, tiny written files, and the real
SmolLM2-135M-Instruct Q4_1 file against HF transformers' own GGUF loader.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreward
from jaxreward.data.tokenizer import Tokenizer
from jaxreward.models import gguf_io, pretrained
from tests.models.helpers import attended_rows, pad_batch, rel_err

gguf = pytest.importorskip("gguf")


# ------------------------------------------------------------- permutation

def test_rope_permutation_hand_example():
    # One head, D = 4: rotate-half pairs rows (0, 2) and (1, 3); llama.cpp
    # stores each pair adjacently, so HF rows [0, 1, 2, 3] are GGUF rows [0, 2, 1, 3].
    hf_rows = np.arange(4.0)[:, None] * np.ones((1, 3))
    gguf_rows = gguf_io.permute_rope_rows(hf_rows, num_heads=1)
    np.testing.assert_array_equal(gguf_rows[:, 0], [0, 2, 1, 3])
    # Two heads of D = 4: the permutation stays inside each head.
    two = gguf_io.permute_rope_rows(np.arange(8.0), num_heads=2)
    np.testing.assert_array_equal(two, [0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(gguf_io.unpermute_rope_rows(two, num_heads=2), np.arange(8.0))


# ------------------------------------------------------------ tiny written files

def write_gguf(path, arch, hf_model, tokenizer_dir, *, extra=None, extra_tensor=None):
    """Writes `hf_model` as llama.cpp's converter would; returns the HF state it encodes.

    The embedding is stored as Q8_0, so the returned state holds its dequantized
    values; every other tensor is float32.
    """
    cfg = hf_model.config
    D = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    state = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(D)
    w.add_value_length(D)
    w.add_rope_dimension_count(D)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    (extra or (lambda _: None))(w)

    tok_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok_json["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(True)
    w.add_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block = {v: k for k, v in gguf_io._BLOCK_NAMES.items()}
    for hf, value in state.items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if hf.startswith("model.layers."):
            i, rest = hf[len("model.layers."):].split(".", 1)
            name = f"blk.{i}.{block[rest]}"
        else:
            name = names[hf]
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            # llama.cpp's convert_hf_to_gguf: per head, rows (half, i) -> (i, half).
            value = value.reshape(heads, 2, D // 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        if name == "token_embd.weight":
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            state[hf] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(value.shape)
        else:
            w.add_tensor(name, np.ascontiguousarray(value, np.float32))
    if cfg.tie_word_embeddings:   # tied: the head is the (dequantized) embedding
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return state


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{arch: (gguf path, HF model holding the file's values, tokenizer dir)}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.models.test_hf_io import TINY, make_tokenizer_files, randomize_

    directory = tmp_path_factory.mktemp("tiny_gguf")
    vocab_size = make_tokenizer_files(directory)
    out = {}
    for arch in ("llama", "qwen2"):
        spec = TINY[arch]
        config = getattr(transformers, spec["cls"])(vocab_size=vocab_size, **spec["kwargs"])
        hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
        randomize_(hf_model, seed=7)
        path = directory / f"{arch}.gguf"
        state = write_gguf(path, arch, hf_model, directory)
        hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        out[arch] = (path, hf_model, directory)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_source_model(tiny_models, arch):
    import torch

    path, hf_model, tok_dir = tiny_models[arch]
    model, params, tokenizer = jaxreward.load_pretrained(path)
    cfg = model.config
    assert (cfg.qkv_bias, cfg.tie_embeddings) == (arch == "qwen2", arch == "qwen2")
    assert cfg.rope_theta == hf_model.config.rope_parameters["rope_theta"]

    # The vocabulary-built tokenizer encodes like the tokenizer.json it came from.
    reference = Tokenizer.from_file(tok_dir / "tokenizer.json")
    chat = reference.apply_chat_template([{"role": "user", "content": "hello world 42"}], True)
    texts = ["hello world, the quick brown fox", "  spaces\tand\nnewlines 12345!?", chat]
    seqs = [tokenizer.encode(t, add_bos=tokenizer.add_bos) for t in texts]
    assert seqs == [reference.encode(t, add_bos=reference.add_bos) for t in texts]
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        reference.bos_id, reference.eos_id, reference.pad_id)
    assert tokenizer.stop_ids == (reference.eos_id,)   # <|im_end|> is EOS and end of turn
    assert tokenizer.decode(seqs[0]) == texts[0]

    tokens, mask = pad_batch(seqs, "left", tokenizer.pad_id)
    logits = model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    with torch.no_grad():
        theirs = [hf_model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    for ours_row, their_row in zip(attended_rows(logits, mask), theirs):
        assert rel_err(ours_row, their_row) < 1e-4


def test_gguf_unsupported_rope_scaling(tiny_models, tmp_path):
    _, hf_model, tok_dir = tiny_models["llama"]
    path = tmp_path / "scaled.gguf"
    write_gguf(path, "llama", hf_model, tok_dir,
               extra=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR))
    with pytest.raises(ValueError, match=r"llama.rope.scaling.type 'linear' is not implemented") as err:
        jaxreward.load_pretrained(path)
    assert str(path) in str(err.value)


def test_gguf_unexpected_tensor_is_listed(tiny_models, tmp_path):
    _, hf_model, tok_dir = tiny_models["llama"]
    path = tmp_path / "extra.gguf"
    write_gguf(path, "llama", hf_model, tok_dir, extra_tensor="blk.0.attn_output.bias")
    with pytest.raises(ValueError, match=r"unexpected: blk.0.attn_output.bias"):
        jaxreward.load_pretrained(path)


# ------------------------------------------------------------------ SmolLM2

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "system", "content": "You are a concise assistant. Use 3 bullet points at most."},
     {"role": "user", "content": "Give me 2 tips for writing clear Python code."},
     {"role": "assistant", "content": "Use descriptive names and keep functions short."},
     {"role": "user", "content": "And one more, about testing (with 1 example)?"}],
]


# One compiled forward for every SmolLM2 test (the model is a static, hashable argument).
_forward = jax.jit(lambda model, params, tokens, mask: model.apply(
    {"params": params}, tokens, attention_mask=mask), static_argnums=0)


@pytest.fixture(scope="module")
def smollm():
    """(model, params, tokenizer, gguf path) loaded once per module."""
    try:
        path = pretrained.resolve("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, params, tokenizer = jaxreward.load_pretrained("smollm2-135m-instruct")
    return model, params, tokenizer, path


@pytest.fixture(scope="module")
def hf_smollm(smollm, tmp_path_factory):
    """HF transformers' own GGUF loading of the same file (model, tokenizer)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    path = smollm[3]
    directory = tmp_path_factory.mktemp("smollm_hf")
    (directory / path.name).symlink_to(path)
    kwargs = dict(gguf_file=path.name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **kwargs).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    return hf_model, hf_tok


def _prompt_ids(tokenizer):
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS]
    return texts, [tokenizer.encode(t, add_bos=tokenizer.add_bos) for t in texts]


def test_smollm_config_and_tokenizer(smollm):
    model, params, tokenizer, _ = smollm
    cfg = model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_embeddings
    assert tokenizer.id_to_token(tokenizer.eos_id) == "<|im_end|>"
    assert tokenizer.token_to_id("<|im_end|>") in tokenizer.stop_ids
    assert not tokenizer.add_bos
    # SmolLM2 splits digits one by one (its tokenizer.json, llama.cpp's "smollm").
    assert [tokenizer.id_to_token(i) for i in tokenizer.encode("x 2024")] == ["x", "Ġ", "2", "0", "2", "4"]


def test_smollm_token_ids_match_hf(smollm, hf_smollm):
    _, _, tokenizer, _ = smollm
    _, hf_tok = hf_smollm
    texts, ids = _prompt_ids(tokenizer)
    for conv, text, ours in zip(CONVERSATIONS, texts, ids):
        assert text == hf_tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert ours == hf_tok(text)["input_ids"]
    raw = ["Héllo wörld — ünïcode ✓ 日本語", "  leading spaces\n\n\ttabs 3.14159 x=1e-5", "<|im_start|>"]
    for text in raw:
        assert tokenizer.encode(text) == hf_tok(text)["input_ids"]
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def smollm_hf_logits(smollm, hf_smollm):
    import torch

    hf_model, _ = hf_smollm
    _, ids = _prompt_ids(smollm[2])
    with torch.no_grad():
        return [hf_model(torch.tensor([s])).logits[0].numpy() for s in ids]


@pytest.mark.parametrize("side", ["right", "left"])
def test_smollm_logits_match_hf(smollm, smollm_hf_logits, side):
    model, params, tokenizer, _ = smollm
    _, ids = _prompt_ids(tokenizer)
    assert len({len(s) for s in ids}) == len(ids)       # different lengths: real padding
    tokens, mask = pad_batch(ids, side, tokenizer.pad_id)
    logits = _forward(model, params, jnp.asarray(tokens), jnp.asarray(mask))
    ours = attended_rows(logits, mask)
    err = rel_err(np.concatenate(ours), np.concatenate(smollm_hf_logits))
    assert err < 1e-4, err
    for ours_row, their_row in zip(ours, smollm_hf_logits):
        assert rel_err(ours_row, their_row) < 1e-4


def test_smollm_greedy_matches_hf_generate(smollm, hf_smollm):
    import torch
    from jaxreward.sampling.sampler import generate

    model, params, tokenizer, _ = smollm
    hf_model, _ = hf_smollm
    _, ids = _prompt_ids(tokenizer)
    M = 20
    tokens, mask = pad_batch(ids, "right", tokenizer.pad_id)
    out = generate(model, params, jnp.asarray(tokens), jnp.asarray(mask), rng=jax.random.key(0),
                   max_new_tokens=M, temperature=0.0, stop_ids=tokenizer.stop_ids,
                   pad_id=tokenizer.pad_id)
    ours_tokens, lengths = np.asarray(out.tokens_RM), np.asarray(out.lengths_R)
    for b, s in enumerate(ids):
        with torch.no_grad():
            seq = hf_model.generate(torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long),
                                    do_sample=False, max_new_tokens=M, pad_token_id=tokenizer.pad_id,
                                    eos_token_id=list(tokenizer.stop_ids))
        theirs = seq[0, len(s):].tolist()
        assert ours_tokens[b, :lengths[b]].tolist() == theirs, tokenizer.decode(theirs)
    # Short answers end on <|im_end|> (checked above, stop token included); one runs all M.
    assert lengths.max() == M


def test_smollm_export_loads_in_transformers(smollm, smollm_hf_logits, tmp_path):
    """GGUF -> our params -> HF directory -> transformers: same logits, same token ids."""
    import torch
    import transformers

    model, params, tokenizer, _ = smollm
    out = jaxreward.save_pretrained(tmp_path / "smollm_hf", model, params, tokenizer)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.tie_word_embeddings
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts, ids = _prompt_ids(tokenizer)
    assert [hf_tok(t)["input_ids"] for t in texts] == ids
    assert hf_tok("x 2024")["input_ids"] == tokenizer.encode("x 2024")
    with torch.no_grad():
        for s, theirs in zip(ids, smollm_hf_logits):
            assert rel_err(exported(torch.tensor([s])).logits[0].numpy(), theirs) < 1e-4


# ------------------------------------------------------------- loader errors

@pytest.mark.parametrize("content, cause", [
    (bytes(range(256)) * 4, "GGUF magic invalid"),
    (b"", "cannot mmap an empty file"),
    (b"GGUF", "IndexError"),
])
def test_not_a_gguf_names_the_file(tmp_path, content, cause):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        jaxreward.load_pretrained(path)
    assert str(err.value).startswith(f"{path}: not a valid GGUF file ({len(content)} bytes"), err.value
    assert cause in str(err.value) and err.value.__cause__ is not None


def test_truncated_gguf_names_the_file(tiny_models, tmp_path):
    source = tiny_models["llama"][0]
    data = source.read_bytes()
    for size in (100, len(data) // 2, len(data) - 16):
        path = tmp_path / f"cut{size}.gguf"
        path.write_bytes(data[:size])
        with pytest.raises(ValueError) as err:
            jaxreward.load_pretrained(path)
        assert str(err.value).startswith(f"{path}: not a valid GGUF file ({size} bytes; empty, truncated")
        assert isinstance(err.value.__cause__, Exception)


def test_gguf_dtype_and_missing_file(tiny_models, tmp_path):
    path = tiny_models["llama"][0]
    with pytest.raises(ValueError, match="dtype='int32' is not a floating-point dtype"):
        gguf_io.load_gguf(path, dtype="int32")
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        gguf_io.load_gguf(tmp_path / "absent.gguf")


class _Field:
    def __init__(self, value):
        self.value = value

    def contents(self):
        return self.value


def test_malformed_gguf_metadata_names_the_file():
    # A gpt2 tokenizer with no token list: len(None) used to escape as a bare TypeError.
    reader = type("Reader", (), {"fields": {"tokenizer.ggml.model": _Field("gpt2")}, "tensors": []})()
    with pytest.raises(ValueError, match=r"^f\.gguf: invalid GGUF metadata \(TypeError: ") as err:
        gguf_io._naming_file(gguf_io.tokenizer_from_gguf, reader, "f.gguf")
    assert isinstance(err.value.__cause__, TypeError)


def _vocab_gguf(path, merges, *, norm_dtype=np.float32):
    """A one-layer llama GGUF (E=16, 2 heads, 1 kv head, vocab 8) with a byte-level
    BPE vocabulary, `merges`, and output_norm.weight stored as `norm_dtype`."""
    E, F, V, D = 16, 32, 8, 8
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(E)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["<|im_end|>", "a", "b", "c", "d", "e", "f", "ab"])
    w.add_token_types([3] + [1] * (V - 1))
    w.add_token_merges(list(merges))
    w.add_eos_token_id(0)
    shapes = {"token_embd.weight": (V, E), "output_norm.weight": (E,),
              "blk.0.attn_norm.weight": (E,), "blk.0.ffn_norm.weight": (E,),
              "blk.0.attn_q.weight": (2 * D, E), "blk.0.attn_k.weight": (D, E),
              "blk.0.attn_v.weight": (D, E), "blk.0.attn_output.weight": (E, 2 * D),
              "blk.0.ffn_gate.weight": (F, E), "blk.0.ffn_up.weight": (F, E),
              "blk.0.ffn_down.weight": (E, F)}
    for name, shape in shapes.items():
        dtype = norm_dtype if name == "output_norm.weight" else np.float32
        w.add_tensor(name, rng.standard_normal(shape).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_merge_naming_unknown_token_is_one_line_naming_the_file(tmp_path):
    """tokenizer.ggml.merges naming a token missing from tokenizer.ggml.tokens:
    `tokenizers` raises a plain `Exception` ("Error while initializing BPE:
    Token `zz` out of vocabulary"), which used to escape `_naming_file` (it
    caught TypeError/ValueError/...) and the CLI showed a traceback."""
    from jaxreward.errors import UserError
    _, _, tok = jaxreward.load_pretrained(_vocab_gguf(tmp_path / "ok.gguf", ["a b"]))  # control
    assert tok.encode("ab") == [7]
    path = _vocab_gguf(tmp_path / "badmerge.gguf", ["a b", "zz yy"])
    with pytest.raises(UserError, match=r"badmerge\.gguf: tokenizer\.ggml\.merges does not fit "
                                        r"tokenizer\.ggml\.tokens \(.*zz.* out of vocabulary\)"):
        jaxreward.load_pretrained(path)
    # Any plain Exception of `tokenizers` under _naming_file names the file too.
    def plain(reader, source):
        raise Exception("Token `q` out of vocabulary")
    with pytest.raises(ValueError, match=r"^f\.gguf: invalid GGUF metadata \(Token `q`"):
        gguf_io._naming_file(plain, None, "f.gguf")


@pytest.mark.parametrize("dtype, type_name", [(np.float64, "F64"), (np.int32, "I32"), (np.int8, "I8")])
def test_gguf_tensor_type_gguf_cannot_dequantize_names_file_and_tensor(tmp_path, dtype, type_name):
    """A tensor of a type `gguf.quants.dequantize` does not implement (F64,
    I8..I64, Q8_1, Q8_K, Q1_0) used to escape as a bare NotImplementedError
    ("Dequantization for F64 is not yet implemented") without file or tensor,
    after the tensors before it were read. Now refused before any is read."""
    path = _vocab_gguf(tmp_path / "odd.gguf", ["a b"], norm_dtype=dtype)
    with pytest.raises(ValueError, match=rf"odd\.gguf: tensor output_norm\.weight is of type {type_name}, "
                                         "which cannot be dequantized"):
        jaxreward.load_pretrained(path)
    T = gguf.GGMLQuantizationType
    assert not any(gguf_io.dequantizable(t) for t in (T.F64, T.I8, T.I16, T.I32, T.I64, T.Q8_1, T.Q8_K))
    assert all(gguf_io.dequantizable(t) for t in (T.F32, T.F16, T.BF16, T.Q4_1, T.Q8_0, T.Q4_K))


def test_uppercase_gguf_suffix_is_read(tmp_path):
    """A GGUF named `OK.GGUF` was refused ("expected an HF checkpoint directory
    or a .gguf file"): the suffix test was case-sensitive."""
    _, _, tok = jaxreward.load_pretrained(_vocab_gguf(tmp_path / "OK.GGUF", ["a b"]))
    assert tok.encode("ab") == [7]


# ---------------------------------------------------------------- stop ids

def test_stop_ids_agree_between_gguf_and_hf_dir(tiny_models, tmp_path):
    """One rule (EOS + declared ids + the template's end-of-turn token) in both loaders."""
    path, _, tok_dir = tiny_models["llama"]
    model, params, tokenizer = jaxreward.load_pretrained(path)
    im_end = tokenizer.token_to_id("<|im_end|>")
    # <|endoftext|> is a special token of the vocabulary but the template never writes it.
    assert tokenizer.token_to_id("<|endoftext|>") is not None
    assert tokenizer.stop_ids == (im_end,)
    # The HF directory the GGUF was written from used to add <|endoftext|>.
    assert Tokenizer.from_file(tok_dir).stop_ids == (im_end,)
    # GGUF -> save_pretrained -> HF dir: same stop ids.
    out = jaxreward.save_pretrained(tmp_path / "export", model, params, tokenizer)
    _, _, reloaded = jaxreward.load_pretrained(out)
    assert reloaded.stop_ids == tokenizer.stop_ids


def test_smollm_stop_ids_survive_the_hf_round_trip(tmp_path):
    """SmolLM2 from GGUF stops on (2,) = <|im_end|>; its HF export used to reload as (2, 0)."""
    from jaxreward.models import hf_io

    try:
        path = pretrained.resolve("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    tokenizer = gguf_io.tokenizer_from_gguf(gguf_io.open_gguf(path), source=str(path))
    assert tokenizer.stop_ids == (2,) and tokenizer.id_to_token(2) == "<|im_end|>"
    hf_io.save_tokenizer(tmp_path, tokenizer)
    assert hf_io.load_tokenizer(tmp_path).stop_ids == (2,)
