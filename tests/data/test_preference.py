"""Preference-pair reader: formats, error reporting, and the real HH-RLHF file."""
import gzip
import json

import pytest

from jaxreward.data.preference import DataError, PreferencePair, read_preference_pairs


def _hh(prompt_turns, chosen, rejected):
    """An HH record: prompt_turns like [("Human", "hi")], then a final Assistant reply each."""
    prefix = "".join(f"\n\n{role}: {text}" for role, text in prompt_turns)
    return {"chosen": f"{prefix}\n\nAssistant: {chosen}", "rejected": f"{prefix}\n\nAssistant: {rejected}"}


def _write(path, lines):
    """Writes records (dicts are JSON-encoded, strings written raw), one per line."""
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def render(messages, add_generation_prompt):
    """A fake chat renderer: role|content lines, then 'assistant|' when asked."""
    text = "".join(f"{m['role']}|{m['content']}\n" for m in messages)
    return text + ("assistant|" if add_generation_prompt else "")


GOOD_HH = _hh([("Human", "hi"), ("Assistant", "hello"), ("Human", "why?")], "because", "no")


def test_hh_split(tmp_path):
    path = _write(tmp_path / "a.jsonl", [GOOD_HH])
    pairs, report = read_preference_pairs(path)
    assert pairs == [
        PreferencePair(
            prompt="\n\nHuman: hi\n\nAssistant: hello\n\nHuman: why?\n\nAssistant:",
            chosen=" because",
            rejected=" no",
            source="a.jsonl:1",
        )
    ]
    assert (report.fmt, report.lines, report.kept, report.num_skipped) == ("hh", 1, 1, 0)
    assert pairs[0].prompt + pairs[0].chosen == GOOD_HH["chosen"]


def test_hh_as_chat(tmp_path):
    path = _write(tmp_path / "a.jsonl.gz", [GOOD_HH])
    pairs, _ = read_preference_pairs(path, hh_as_chat=True, render_chat=render)
    assert pairs[0].prompt == "user|hi\nassistant|hello\nuser|why?\nassistant|"
    assert (pairs[0].chosen, pairs[0].rejected) == ("because", "no")
    with pytest.raises(ValueError, match="render_chat"):
        read_preference_pairs(path, hh_as_chat=True)
    # Only the one space after "Human:"/"Assistant:" goes; other whitespace is content.
    spaced = _hh([("Human", " two spaces "), ("Assistant", "ok\n")], "  indented ", "x")
    pairs, _ = read_preference_pairs(_write(tmp_path / "s.jsonl", [spaced]), hh_as_chat=True, render_chat=render)
    assert pairs[0].prompt == "user| two spaces \nassistant|ok\n\nassistant|"
    assert (pairs[0].chosen, pairs[0].rejected) == ("  indented ", "x")


def test_trl_formats_auto_detected(tmp_path):
    text = _write(tmp_path / "t.jsonl", [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3"}])
    pairs, report = read_preference_pairs(text)
    assert report.fmt == "trl" and (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q: 1+1?", " 2", " 3")

    user = [{"role": "user", "content": "1+1?"}]
    chat = _write(
        tmp_path / "c.jsonl",
        [{"prompt": user, "chosen": [{"role": "assistant", "content": "2"}],
          "rejected": [{"role": "assistant", "content": "3"}]}],
    )
    pairs, report = read_preference_pairs(chat, render_chat=render)
    assert report.fmt == "trl_chat"
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("user|1+1?\nassistant|", "2", "3")

    system = [{"role": "system", "content": "be brief"}]
    implicit = _write(
        tmp_path / "i.jsonl",
        [{"chosen": system + user + [{"role": "assistant", "content": "2"}],
          "rejected": system + user + [{"role": "assistant", "content": "3"}]}],
    )
    pairs, report = read_preference_pairs(implicit, render_chat=render)
    assert report.fmt == "trl_implicit"
    assert pairs[0].prompt == "system|be brief\nuser|1+1?\nassistant|"
    assert (pairs[0].chosen, pairs[0].rejected) == ("2", "3")
    with pytest.raises(ValueError, match="render_chat"):
        read_preference_pairs(implicit)


# Each bad line: (record or raw text, reason label counted in the report, field in the message).
BAD_HH = [
    ('{"chosen": "\\n\\nHuman: hi', "malformed JSON", None),
    ("[1, 2]", "not a JSON object", None),
    ({"chosen": GOOD_HH["chosen"]}, "missing field 'rejected'", "rejected"),
    ({"chosen": GOOD_HH["chosen"], "rejected": 7}, "wrong type of 'rejected'", "rejected"),
    ({"chosen": "\n\nHuman: hi, no reply", "rejected": GOOD_HH["rejected"]}, "no assistant turn", "chosen"),
    (_hh([("Human", "hi")], "", "no"), "empty chosen response", "chosen"),
    (_hh([("Human", "hi")], "yes", "  "), "empty rejected response", "rejected"),
    (_hh([("Human", "   ")], "yes", "no"), "empty prompt", "chosen"),
    (
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hey\n\nAssistant: b"},
        "prompt mismatch",
        "rejected",
    ),
]


def _mixed_file(tmp_path, bad, good_factory, name="mixed.jsonl"):
    """good, bad1, good, bad2, ..., good (+ a blank line); returns path, bad line numbers, good count."""
    lines, bad_lines, n_good = [good_factory(0)], [], 1
    for i, (record, _, _) in enumerate(bad):
        lines.append(record)
        bad_lines.append(len(lines))
        lines.append(good_factory(i + 1))
        n_good += 1
    lines.append("")
    return _write(tmp_path / name, lines), bad_lines, n_good


def _good_hh(i):
    return _hh([("Human", f"question {i}")], f"answer {i}", f"nope {i}")


def test_skip_keeps_every_valid_pair_and_counts_reasons(tmp_path):
    path, bad_lines, n_good = _mixed_file(tmp_path, BAD_HH, _good_hh)
    pairs, report = read_preference_pairs(path, on_error="skip")
    assert [p.chosen for p in pairs] == [f" answer {i}" for i in range(n_good)]
    assert [p.source for p in pairs] == [f"mixed.jsonl:{2 * i + 1}" for i in range(n_good)]
    assert report.lines == n_good + len(BAD_HH) and report.blank == 1
    assert report.kept == n_good and report.num_skipped == len(BAD_HH)
    expected = {label: 1 for _, label, _ in BAD_HH}
    assert report.skipped == expected
    for (_, label, _), line in zip(BAD_HH, bad_lines):
        assert report.examples[label] == [f"mixed.jsonl:{line}"]
    summary = report.summary()
    assert f"read {report.lines} lines (hh): kept {n_good}, skipped {len(BAD_HH)}" in summary
    assert f"prompt mismatch: 1 [mixed.jsonl:{bad_lines[-1]}]" in summary
    assert summary.endswith("; 1 blank line ignored")   # counted, and said


@pytest.mark.parametrize("k", range(len(BAD_HH)))
def test_raise_names_file_line_and_field(tmp_path, k):
    path, bad_lines, _ = _mixed_file(tmp_path, [BAD_HH[k]], _good_hh)
    _, label, field = BAD_HH[k]
    with pytest.raises(DataError) as info:
        read_preference_pairs(path, on_error="raise")
    error = info.value
    assert isinstance(error, ValueError)
    assert str(error).startswith(f"{path}:{bad_lines[0]}: ")
    assert (error.line, error.label, error.field) == (bad_lines[0], label, field)
    if field is not None:
        assert f"field '{field}'" in str(error)


def _good_chat(i):
    return {
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "chosen": [{"role": "assistant", "content": f"a{i}"}],
        "rejected": [{"role": "assistant", "content": f"b{i}"}],
    }


def _strict_render(messages, add_generation_prompt):
    if messages[0]["role"] != "user":
        raise ValueError("Conversation roles must alternate")
    return render(messages, add_generation_prompt)


A = {"role": "assistant", "content": "a"}
BAD_CHAT = [
    ({"prompt": "q", "chosen": [A], "rejected": [A]}, "wrong type of 'prompt'", "prompt"),
    ({"prompt": [{"role": "user"}], "chosen": [A], "rejected": [A]}, "bad message in 'prompt'", "prompt"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [A, A], "rejected": [A]},
     "bad message in 'chosen'", "chosen"),
    ({"prompt": [], "chosen": [A], "rejected": [A]}, "empty prompt", "prompt"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [A],
      "rejected": [{"role": "assistant", "content": ""}]}, "empty rejected response", "rejected"),
    ({"prompt": [A], "chosen": [A], "rejected": [A]}, "chat template error", "prompt"),
]


def test_chat_errors_skip_and_raise(tmp_path):
    path, bad_lines, n_good = _mixed_file(tmp_path, BAD_CHAT, _good_chat)
    pairs, report = read_preference_pairs(path, render_chat=_strict_render)
    assert [p.chosen for p in pairs] == [f"a{i}" for i in range(n_good)]
    assert report.skipped == {label: 1 for _, label, _ in BAD_CHAT}
    with pytest.raises(DataError, match=rf"mixed.jsonl:{bad_lines[0]}: field 'prompt': wrong type"):
        read_preference_pairs(path, render_chat=_strict_render, on_error="raise")


def test_implicit_prompt_errors(tmp_path):
    u = {"role": "user", "content": "q"}
    lines = [
        {"chosen": [u, {"role": "assistant", "content": "x"}], "rejected": [u, {"role": "assistant", "content": "y"}]},
        # diverge before the final reply -> prompt mismatch
        {"chosen": [u, A, u, A], "rejected": [u, {"role": "assistant", "content": "z"}, u, A]},
        # nothing shared -> empty prompt
        {"chosen": [{"role": "assistant", "content": "x"}], "rejected": [A]},
    ]
    pairs, report = read_preference_pairs(_write(tmp_path / "i.jsonl", lines), render_chat=render)
    assert len(pairs) == 1 and pairs[0].prompt == "user|q\nassistant|"
    assert report.skipped == {"prompt mismatch": 1, "empty prompt": 1}


def test_bad_arguments(tmp_path):
    path = _write(tmp_path / "a.jsonl", [GOOD_HH])
    with pytest.raises(ValueError, match="fmt"):
        read_preference_pairs(path, fmt="csv")
    with pytest.raises(ValueError, match="on_error"):
        read_preference_pairs(path, on_error="ignore")
    # Forcing a format that does not fit reports each line against it.
    _, report = read_preference_pairs(path, fmt="trl")
    assert report.skipped == {"missing field 'prompt'": 1}


def test_real_hh_file_counts(hh_file):
    """README: 2,312 pairs; 5 with differing prompts, 4 with an empty chosen reply (disjoint)."""
    pairs, report = read_preference_pairs(hh_file)
    assert report.lines == 2312 and report.fmt == "hh"
    assert report.skipped == {"prompt mismatch": 5, "empty chosen response": 4}
    assert report.kept == len(pairs) == 2312 - 9
    print(report.summary())
    for pair in pairs:
        assert pair.prompt.endswith("\n\nAssistant:") and pair.chosen.strip() and pair.rejected.strip()
    with pytest.raises(DataError, match=r"harmless-base-test.jsonl.gz:\d+: field '(rejected|chosen)'"):
        read_preference_pairs(hh_file, on_error="raise")


def test_real_hh_file_as_chat(hh_file):
    """As chat, the same 9 lines are skipped and every prompt renders as messages."""
    pairs, report = read_preference_pairs(hh_file, hh_as_chat=True, render_chat=render)
    assert report.skipped == {"prompt mismatch": 5, "empty chosen response": 4}
    assert len(pairs) == 2303
    assert all(p.prompt.startswith("user|") and p.prompt.endswith("\nassistant|") for p in pairs)
    # The response is the text reply minus exactly the one space HH puts after "Assistant:".
    text_pairs, _ = read_preference_pairs(hh_file)
    assert [p.source for p in text_pairs] == [p.source for p in pairs]
    for text_pair, chat_pair in zip(text_pairs, pairs):
        assert text_pair.chosen == " " + chat_pair.chosen and text_pair.rejected == " " + chat_pair.rejected


def _hh_line(i):
    import json as _json
    return _json.dumps({"chosen": f"\n\nHuman: question {i}\n\nAssistant: yes {i}",
                        "rejected": f"\n\nHuman: question {i}\n\nAssistant: no {i}"})


def test_utf8_bom_does_not_cost_the_first_pair(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_hh_line(0) + "\n" + _hh_line(1) + "\n").encode())
    pairs, report = read_preference_pairs(path)
    assert len(pairs) == 2 and report.kept == 2
    assert pairs[0].prompt == "\n\nHuman: question 0\n\nAssistant:"


def test_corrupt_and_truncated_gzip_name_the_file(tmp_path):
    import gzip as _gzip
    import numpy as _np
    fake = tmp_path / "plain.jsonl.gz"
    fake.write_text(_hh_line(0) + "\n")
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz:1: not a gzip file"):
        read_preference_pairs(fake, on_error="raise")
    pairs, report = read_preference_pairs(fake)
    assert pairs == [] and "not a gzip file: 1" in report.summary()
    # Random text compresses poorly, so half the stream holds many whole lines.
    rng = _np.random.default_rng(0)
    lines = [_hh_line("".join(rng.choice(list("abcdefgh"), 200))) for _ in range(400)]
    blob = _gzip.compress(("\n".join(lines) + "\n").encode())
    trunc = tmp_path / "trunc.jsonl.gz"
    trunc.write_bytes(blob[: len(blob) // 2])
    pairs, report = read_preference_pairs(trunc)
    assert 0 < len(pairs) < 400  # every pair before the break is kept
    assert report.kept == len(pairs)
    assert f"corrupt or truncated file: 1 [trunc.jsonl.gz:{len(pairs) + 1}]" in report.summary()
    with pytest.raises(DataError, match=r"trunc\.jsonl\.gz:\d+: corrupt or truncated file"):
        read_preference_pairs(trunc, on_error="raise")


def test_a_bad_first_line_does_not_decide_the_format(tmp_path):
    # Line 1 looks like trl_chat (a message-list prompt) but has no chosen; the valid
    # TRL string pairs after it must all be kept, read as trl.
    path = _write(tmp_path / "first_bad.jsonl", [
        {"prompt": [{"role": "user", "content": "q"}]},
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "c", "rejected": "d"}])
    pairs, report = read_preference_pairs(path, render_chat=render)
    assert [p.prompt for p in pairs] == ["q1", "q2"] and report.fmt == "trl"
    assert report.skipped == {"missing field 'chosen'": 1} and report.examples["missing field 'chosen'"] == [
        "first_bad.jsonl:1"]
    # An explicit format stays fixed whatever the first line holds.
    pairs, report = read_preference_pairs(path, fmt="trl", render_chat=render)
    assert len(pairs) == 2 and report.fmt == "trl" and report.skipped == {"wrong type of 'prompt'": 1}
