"""Tiny tokenizers for the data-layer tests, built in memory (no files, no hub)."""
import string

import pytest
import tokenizers
from tokenizers import decoders, models

from jaxreward.data.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
# Merges chosen so that token layouts can be checked by hand: "hi" is one
# token, "the" is one token, and "h" + "i" merge across a prompt/response
# boundary if the two were (wrongly) tokenized together.
MERGES = [("h", "i"), ("t", "h"), ("th", "e"), ("a", "t")]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_hf_bpe() -> tokenizers.Tokenizer:
    """A character BPE over printable ASCII with four merges and six special tokens.

    Ids: specials 0..5 in SPECIALS order, then the characters of
    string.printable in order, then the merge results in MERGES order.
    """
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    for left, right in MERGES:
        vocab[left + right] = len(vocab)
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<unk>"))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(SPECIALS)
    return hf


@pytest.fixture
def hf_bpe():
    return build_hf_bpe()


@pytest.fixture
def tiny_tok():
    """BOS <s>=1, EOS <|im_end|>=4, no pad token (pads with EOS), add_bos=True, ChatML template."""
    return Tokenizer(
        build_hf_bpe(), bos_id=1, eos_id=4, pad_id=None, add_bos=True, chat_template=CHATML, stop_ids=(5,)
    )


@pytest.fixture
def tiny_tok_nobos():
    """Same vocabulary; pad <unk>=0, no BOS added."""
    return Tokenizer(build_hf_bpe(), bos_id=1, eos_id=2, pad_id=0, add_bos=False, chat_template=CHATML)
