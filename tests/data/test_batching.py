"""Pair tokenization (layout, truncation, dropping, padding side) and the resumable batcher."""
import numpy as np
import pytest

from jaxreward.data.batching import PairBatcher, tokenize_pairs
from jaxreward.data.preference import PreferencePair, read_preference_pairs

# Ids in the tiny tokenizer (tests/data/conftest.py): <s>=1, <|im_end|>=4 (EOS and
# pad), characters of string.printable from 6 ('0'..'9' = 6..15, 'a'..'z' = 16..41,
# ' ' = 100), merges hi=106, th=107, the=108, at=109.
BOS, EOS, SPACE, HI, THE, AT = 1, 4, 100, 106, 108, 109


def ch(c):
    return 16 + ord(c) - ord("a")


def pair(prompt, chosen, rejected, source="t:1"):
    return PreferencePair(prompt, chosen, rejected, source)


def test_hand_checked_layout(tiny_tok):
    arrays, report = tokenize_pairs([pair("hi", " cat", " the")], tiny_tok, max_length=8)
    # chosen:   <s> hi | ' ' c at <eos> | pad pad   (pad id = EOS id = 4: masks come from lengths)
    # rejected: <s> hi | ' ' the <eos>  | pad pad pad
    np.testing.assert_array_equal(arrays["chosen_tokens"], [[BOS, HI, SPACE, ch("c"), AT, EOS, EOS, EOS]])
    np.testing.assert_array_equal(arrays["chosen_attention_mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(arrays["chosen_loss_mask"], [[0, 0, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(arrays["chosen_positions"], [[0, 1, 2, 3, 4, 5, 0, 0]])
    np.testing.assert_array_equal(arrays["rejected_tokens"], [[BOS, HI, SPACE, THE, EOS, EOS, EOS, EOS]])
    np.testing.assert_array_equal(arrays["rejected_attention_mask"], [[1, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["rejected_loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(arrays["rejected_positions"], [[0, 1, 2, 3, 4, 0, 0, 0]])
    for side in ("chosen", "rejected"):
        assert arrays[f"{side}_tokens"].dtype == np.int32 and arrays[f"{side}_positions"].dtype == np.int32
        assert arrays[f"{side}_attention_mask"].dtype == bool and arrays[f"{side}_loss_mask"].dtype == bool
    assert (report.num_kept, report.any_truncated, report.num_dropped) == (1, 0, 0)


def test_no_merge_across_boundary_and_bos_rules(tiny_tok, tiny_tok_nobos):
    # "h" + "i" would merge into one token "hi" if tokenized together.
    arrays, _ = tokenize_pairs([pair("h", "i", "x")], tiny_tok, max_length=6)
    np.testing.assert_array_equal(arrays["chosen_tokens"][0, :4], [BOS, ch("h"), ch("i"), EOS])
    # A prompt whose chat template already wrote "<s>" keeps exactly one BOS.
    arrays, _ = tokenize_pairs([pair("<s>hi", "x", "y")], tiny_tok, max_length=6)
    np.testing.assert_array_equal(arrays["chosen_tokens"][0, :4], [BOS, HI, ch("x"), EOS])
    # add_bos=False: no BOS; EOS is this tokenizer's </s>=2, padding its <unk>=0.
    arrays, _ = tokenize_pairs([pair("hi", "x", "y")], tiny_tok_nobos, max_length=6)
    np.testing.assert_array_equal(arrays["chosen_tokens"][0], [HI, ch("x"), 2, 0, 0, 0])
    np.testing.assert_array_equal(arrays["chosen_loss_mask"][0], [0, 1, 1, 0, 0, 0])
    arrays, _ = tokenize_pairs([pair("hi", "x", "y")], tiny_tok_nobos, max_length=6, append_eos=False)
    np.testing.assert_array_equal(arrays["chosen_tokens"][0], [HI, ch("x"), 0, 0, 0, 0])
    np.testing.assert_array_equal(arrays["chosen_loss_mask"][0], [0, 1, 0, 0, 0, 0])


def test_truncation_and_dropping_counts(tiny_tok):
    pairs = [
        # 0: prompt 5 (BOS+4) > max_length//2 = 4, but the longest response is 3, so
        #    the prompt may use 8 - 3 = 5: nothing is cut.
        pair("xxxx", "yy", "zz", "f:1"),
        # 1: prompt 11, chosen 11, rejected 2: prompt limit max(4, 8 - 11) = 4 ->
        #    <s> x x x (end kept), room 4 -> chosen cut to y y y y (EOS cut too).
        pair("xxxxxxxxxx", "yyyyyyyyyy", "z", "f:2"),
        # 2: prompt "abcdefg" = 8 tokens, responses 2: limit max(4, 6) = 6 ->
        #    <s> c d e f g; room 2 -> responses fit.
        pair("abcdefg", "y", "z", "f:3"),
        # 3: short everything: untouched.
        pair("q", "y", "z", "f:4"),
    ]
    arrays, report = tokenize_pairs(pairs, tiny_tok, max_length=8)
    x, y, z = ch("x"), ch("y"), ch("z")
    np.testing.assert_array_equal(arrays["chosen_tokens"][0], [BOS, x, x, x, x, y, y, EOS])
    np.testing.assert_array_equal(arrays["chosen_tokens"][1], [BOS, x, x, x, y, y, y, y])
    np.testing.assert_array_equal(arrays["chosen_loss_mask"][1], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(arrays["rejected_tokens"][1], [BOS, x, x, x, z, EOS, EOS, EOS])
    np.testing.assert_array_equal(arrays["rejected_attention_mask"][1], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(
        arrays["chosen_tokens"][2], [BOS, ch("c"), ch("d"), ch("e"), ch("f"), ch("g"), y, EOS]
    )
    assert report.num_pairs == report.num_kept == 4
    assert (report.prompt_truncated, report.chosen_truncated, report.rejected_truncated) == (2, 1, 0)
    assert report.any_truncated == 2 and report.num_dropped == 0
    np.testing.assert_array_equal(report.kept_indices, [0, 1, 2, 3])

    # An explicit cap is a hard limit: 7 leaves room 1 for pairs 1 and 2.
    arrays, report = tokenize_pairs(pairs, tiny_tok, max_length=8, max_prompt_length=7)
    np.testing.assert_array_equal(arrays["chosen_tokens"][1], [BOS, x, x, x, x, x, x, y])
    np.testing.assert_array_equal(arrays["rejected_tokens"][2], [BOS] + [ch(c) for c in "bcdefg"] + [z])
    np.testing.assert_array_equal(arrays["rejected_loss_mask"][2], [0, 0, 0, 0, 0, 0, 0, 1])
    assert (report.prompt_truncated, report.chosen_truncated, report.rejected_truncated) == (2, 2, 2)
    assert report.num_dropped == 0
    # A cap of 8 fills the whole row for the two long prompts: no room, dropped.
    arrays, report = tokenize_pairs(pairs, tiny_tok, max_length=8, max_prompt_length=8)
    assert report.dropped == {"no room for the response after the prompt": 2}
    assert report.dropped_examples == {"no room for the response after the prompt": ["f:2", "f:3"]}
    np.testing.assert_array_equal(report.kept_indices, [0, 3])
    assert arrays["chosen_tokens"].shape == (2, 8)
    np.testing.assert_array_equal(arrays["chosen_tokens"][1], [BOS, ch("q"), y, EOS, EOS, EOS, EOS, EOS])

    # Without EOS an empty response has no tokens at all: dropped.
    arrays, report = tokenize_pairs(
        [pair("q", "", "z", "f:9"), pairs[3]], tiny_tok, max_length=8, append_eos=False
    )
    assert report.dropped == {"empty chosen response": 1} and report.num_kept == 1
    assert "dropped 1 (empty chosen response: 1 [f:9])" in report.summary()


def test_no_pairs_gives_empty_fixed_width_arrays(tiny_tok):
    arrays, report = tokenize_pairs([], tiny_tok, max_length=8)
    assert sorted(arrays) == sorted(
        f"{s}_{k}" for s in ("chosen", "rejected") for k in ("tokens", "attention_mask", "loss_mask", "positions")
    )
    assert all(a.shape == (0, 8) for a in arrays.values()) and report.num_kept == 0


def test_left_padding_is_a_shift_of_right_padding(tiny_tok):
    pairs = [pair("hi the cat", " at", " the hat"), pair("q", "y", "z"), pair("xxxxxxxxxx", "yyyyyyyy", "z")]
    right, _ = tokenize_pairs(pairs, tiny_tok, max_length=10, padding_side="right")
    left, _ = tokenize_pairs(pairs, tiny_tok, max_length=10, padding_side="left")
    for side in ("chosen", "rejected"):
        for b in range(len(pairs)):
            length = int(right[f"{side}_attention_mask"][b].sum())
            shift = 10 - length
            assert left[f"{side}_attention_mask"][b, :shift].sum() == 0
            for key in ("tokens", "attention_mask", "loss_mask", "positions"):
                name = f"{side}_{key}"
                np.testing.assert_array_equal(left[name][b, shift:], right[name][b, :length], err_msg=name)
            np.testing.assert_array_equal(left[f"{side}_positions"][b, shift:], np.arange(length))
    with pytest.raises(ValueError, match="padding_side"):
        tokenize_pairs(pairs, tiny_tok, max_length=10, padding_side="middle")


def test_real_hh_pairs_round_trip(hh_file, tiny_tok):
    """Every kept row has loss tokens; uncut responses decode back exactly; cut counts agree."""
    pairs, _ = read_preference_pairs(hh_file)
    arrays, report = tokenize_pairs(pairs, tiny_tok, max_length=512)
    assert report.num_kept == len(pairs) == 2303 and report.any_truncated > 0
    assert report.prompt_truncated > 0 and report.chosen_truncated > 0
    chosen_cut, checked = 0, 0
    for b, pair_ in enumerate(pairs):
        mask = arrays["chosen_attention_mask"][b]
        tokens, loss = arrays["chosen_tokens"][b][mask], arrays["chosen_loss_mask"][b][mask]
        assert loss.sum() >= 1 and tokens[0] == BOS and not loss[0]
        assert loss[np.argmax(loss):].all()  # the response is one contiguous tail
        if tokens[-1] != EOS:
            chosen_cut += 1
        elif pair_.chosen.isascii():  # the tiny tokenizer maps non-ASCII to <unk>
            assert tiny_tok.decode(tokens[loss]) == pair_.chosen
            checked += 1
    assert chosen_cut == report.chosen_truncated and checked > 900


# ----------------------------------------------------------------- batcher


def _rows(n):
    return {"ids": np.arange(n, dtype=np.int32), "x": np.arange(2 * n, dtype=np.int32).reshape(n, 2)}


def test_batcher_epochs_are_permutations():
    batcher = PairBatcher(_rows(10), batch_size=3, seed=0)
    assert batcher.batches_per_epoch == 3
    epochs = []
    for _ in range(2):
        seen = [next(batcher) for _ in range(3)]
        for batch in seen:
            assert batch["ids"].shape == (3,) and batch["x"].shape == (3, 2)
            np.testing.assert_array_equal(batch["x"][:, 0], 2 * batch["ids"])  # rows stay aligned
        ids = np.concatenate([b["ids"] for b in seen])
        assert len(set(ids.tolist())) == 9  # 9 distinct rows, one dropped remainder row
        epochs.append(ids)
    assert not np.array_equal(epochs[0], epochs[1])
    again = PairBatcher(_rows(10), batch_size=3, seed=0)
    np.testing.assert_array_equal(np.concatenate([next(again)["ids"] for _ in range(3)]), epochs[0])
    other = PairBatcher(_rows(10), batch_size=3, seed=1)
    assert not np.array_equal(np.concatenate([next(other)["ids"] for _ in range(3)]), epochs[0])


def test_batcher_keep_remainder():
    batcher = PairBatcher(_rows(10), batch_size=3, seed=5, drop_remainder=False)
    sizes = [len(next(batcher)["ids"]) for _ in range(4)]
    assert sizes == [3, 3, 3, 1] and batcher.state() == {"epoch": 1, "index": 0}


@pytest.mark.parametrize("stop_after", [0, 2, 3, 4, 7])
def test_batcher_resume_is_exact(stop_after):
    uninterrupted = PairBatcher(_rows(10), batch_size=3, seed=7)
    expected = [next(uninterrupted)["ids"] for _ in range(9)]
    first = PairBatcher(_rows(10), batch_size=3, seed=7)
    got = [next(first)["ids"] for _ in range(stop_after)]
    state = first.state()
    assert state == {"epoch": stop_after // 3, "index": stop_after % 3}
    resumed = PairBatcher(_rows(10), batch_size=3, seed=7)
    resumed.restore(dict(state))
    got += [next(resumed)["ids"] for _ in range(9 - stop_after)]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_batcher_errors():
    with pytest.raises(ValueError, match="one leading size"):
        PairBatcher({"a": np.zeros(3), "b": np.zeros(4)}, batch_size=1, seed=0)
    with pytest.raises(ValueError, match="no batch"):
        PairBatcher(_rows(2), batch_size=3, seed=0)
    with pytest.raises(ValueError, match="bad batcher state"):
        PairBatcher(_rows(10), batch_size=3, seed=0).restore({"epoch": 0, "index": 3})
