"""Readers for unpaired feedback, prompts and rated responses: formats and located errors."""
import gzip
import json

import pytest

from jaxreward.data.preference import DataError, read_preference_pairs
from jaxreward.data.records import (
    FeedbackRecord, PromptRecord, RatedRecord, read_feedback, read_prompts, read_rated)


def write(path, lines):
    """Records (dicts JSON-encoded, strings raw), one per line; `.gz` compressed."""
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def render(messages, add_generation_prompt):
    text = "".join(f"{m['role']}|{m['content']}\n" for m in messages)
    return text + ("assistant|" if add_generation_prompt else "")


USER = [{"role": "user", "content": "q"}]
REPLY = [{"role": "assistant", "content": "a"}]


def test_feedback_strings_and_chat(tmp_path):
    path = write(tmp_path / "f.jsonl.gz", [{"prompt": "Q?", "completion": " yes", "label": True},
                                           {"prompt": "Q?", "completion": " no", "label": False}])
    records, report = read_feedback(path)
    assert records == [FeedbackRecord("Q?", " yes", True, "f.jsonl.gz:1"),
                       FeedbackRecord("Q?", " no", False, "f.jsonl.gz:2")]
    assert (report.fmt, report.kept, report.num_skipped) == ("trl", 2, 0)
    chat = write(tmp_path / "c.jsonl", [{"prompt": USER, "completion": REPLY, "label": True}])
    records, report = read_feedback(chat, render_chat=render)
    assert report.fmt == "trl_chat" and records == [FeedbackRecord("user|q\nassistant|", "a", True, "c.jsonl:1")]
    # Without a template: one UserError naming file:line (it was a bare ValueError, which the
    # drivers' one-line handler did not catch: a traceback). The same for every reader.
    from jaxreward.errors import UserError
    for reader, line in ((read_feedback, {"completion": REPLY, "label": True}),
                         (read_prompts, {}), (read_rated, {"response": "r", "ratings": [1.0]})):
        mixed = write(tmp_path / "m.jsonl", ["", {**line, "prompt": USER}])  # a blank line 1
        with pytest.raises(UserError, match=r"m\.jsonl:2: this file holds chat messages, which need a chat template"):
            reader(mixed)


def test_prompts_jsonl_chat_and_txt(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}, {"prompt": USER}])
    records, report = read_prompts(path, render_chat=render)
    assert records == [PromptRecord("2+2?", "4", "p.jsonl:1"), PromptRecord("user|q\nassistant|", None, "p.jsonl:2")]
    assert report.fmt == "jsonl"
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"\xef\xbb\xbfhello there\n\n  indented  \r\n")
    records, report = read_prompts(txt)
    assert records == [PromptRecord("hello there", None, "p.txt:1"), PromptRecord("  indented  ", None, "p.txt:3")]
    assert (report.fmt, report.kept, report.blank) == ("txt", 2, 1)



def test_txt_prompt_with_a_nul_is_bad_text_like_jsonl(tmp_path):
    """A NUL in a .txt prompt line is skipped and counted ("bad text"), as the same
    prompt in .jsonl is; before, the .txt reader kept it."""
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"first\nwith\x00nul\nlast\n")
    records, report = read_prompts(txt)
    assert records == [PromptRecord("first", None, "p.txt:1"), PromptRecord("last", None, "p.txt:3")]
    assert (report.kept, report.skipped, report.examples) == (2, {"bad text in 'prompt'": 1},
                                                              {"bad text in 'prompt'": ["p.txt:2"]})
    jsonl = write(tmp_path / "p.jsonl", [{"prompt": "first"}, {"prompt": "with\x00nul"}, {"prompt": "last"}])
    assert read_prompts(jsonl)[1].skipped == report.skipped
    with pytest.raises(DataError, match="p.txt:2: field 'prompt': bad text"):
        read_prompts(txt, on_error="raise")


HELPSTEER = ("helpfulness", "correctness", "coherence")


def test_rated_list_and_attributes(tmp_path):
    path = write(tmp_path / "r.jsonl", [{"prompt": "p", "response": "r", "ratings": [1, 2.5]},
                                        {"prompt": "p", "response": "s", "ratings": [0, -1]}])
    records, report = read_rated(path)  # K from the first line
    assert records == [RatedRecord("p", "r", (1.0, 2.5), "r.jsonl:1"), RatedRecord("p", "s", (0.0, -1.0), "r.jsonl:2")]
    assert report.fmt == "ratings"
    hs = write(tmp_path / "h.jsonl", [{"prompt": "p", "response": "r", "helpfulness": 4, "correctness": 3,
                                       "coherence": 0, "verbosity": 1}])
    records, _ = read_rated(hs, attributes=HELPSTEER)
    assert records[0].ratings == (4.0, 3.0, 0.0)  # in attributes order; others ignored
    with pytest.raises(ValueError, match="num_ratings"):
        read_rated(hs, attributes=HELPSTEER, num_ratings=2)


def _pairs_of_bad(good, bad):
    """good, bad[0], good, bad[1], ..., good: the bad ones sit on lines 2, 4, 6, ..."""
    lines = [good]
    for record in bad:
        lines += [record, good]
    return lines


# (reader, kwargs, a good line, [(bad line, label counted, field named in the message)])
CASES = {
    "feedback": (read_feedback, {"render_chat": render}, {"prompt": "q", "completion": "c", "label": True}, [
        ("{oops", "malformed JSON", None),
        ({"prompt": "q", "completion": "c"}, "missing field 'label'", "label"),
        ({"prompt": "q", "completion": "c", "label": 1}, "wrong type of 'label'", "label"),
        ({"prompt": "q", "completion": " ", "label": False}, "empty completion response", "completion"),
        ({"prompt": " ", "completion": "c", "label": False}, "empty prompt", "prompt"),
        ({"prompt": USER, "completion": "c", "label": False}, "wrong type of 'prompt'", "prompt"),
    ]),
    "prompts": (read_prompts, {"render_chat": render}, {"prompt": "q"}, [
        ({"question": "q"}, "missing field 'prompt'", "prompt"),
        ({"prompt": 3}, "wrong type of 'prompt'", "prompt"),
        ({"prompt": [{"role": "user"}]}, "bad message in 'prompt'", "prompt"),
        ({"prompt": "q", "answer": 4}, "wrong type of 'answer'", "answer"),
        ({"prompt": "q", "answer": ""}, "empty text", "answer"),
        ("[1]", "not a JSON object", None),
    ]),
    "rated": (read_rated, {"attributes": HELPSTEER}, {"prompt": "p", "response": "r", "helpfulness": 1,
                                                      "correctness": 2, "coherence": 3}, [
        ({"prompt": "p", "response": "r", "helpfulness": 1, "coherence": 3}, "missing field 'correctness'",
         "correctness"),
        ({"prompt": "p", "response": "r", "helpfulness": "4", "correctness": 2, "coherence": 3}, "bad rating",
         "helpfulness"),
        ({"prompt": "p", "response": "r", "helpfulness": 1, "correctness": True, "coherence": 3}, "bad rating",
         "correctness"),
        ({"prompt": "p", "response": "", "helpfulness": 1, "correctness": 2, "coherence": 3}, "empty text",
         "response"),
    ]),
    "ratings": (read_rated, {"num_ratings": 2}, {"prompt": "p", "response": "r", "ratings": [1, 2]}, [
        ({"prompt": "p", "response": "r", "ratings": [1, 2, 3]}, "wrong ratings count", "ratings"),
        ({"prompt": "p", "response": "r", "ratings": [1, None]}, "bad rating", "ratings[1]"),
        ('{"prompt": "p", "response": "r", "ratings": [1, NaN]}', "bad rating", "ratings[1]"),
        ({"prompt": "p", "response": "r", "ratings": 5}, "wrong type of 'ratings'", "ratings"),
        # finite as a Python float, inf in float32: it trained on inf ("diverged") before
        ({"prompt": "p", "response": "r", "ratings": [1, -1e308]}, "bad rating", "ratings[1]"),
    ]),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_lines_skip_and_raise_with_locations(tmp_path, kind):
    reader, kwargs, good, bad = CASES[kind]
    path = write(tmp_path / f"{kind}.jsonl", _pairs_of_bad(good, [b for b, _, _ in bad]))
    records, report = reader(path, **kwargs)
    assert len(records) == len(bad) + 1 == report.kept
    assert [r.source for r in records] == [f"{kind}.jsonl:{2 * i + 1}" for i in range(len(bad) + 1)]
    expected = {}
    for _, label, _ in bad:
        expected[label] = expected.get(label, 0) + 1
    assert report.skipped == expected and report.num_skipped == len(bad)
    # Each bad line alone: raise names file, line 2 and field.
    for record, label, field in bad:
        single = write(tmp_path / f"one-{kind}.jsonl", [good, record, good])
        with pytest.raises(DataError) as info:
            reader(single, on_error="raise", **kwargs)
        error = info.value
        assert str(error).startswith(f"{single}:2: ")
        assert (error.line, error.label, error.field) == (2, label, field)
        if field:
            assert f"field '{field}'" in str(error)


@pytest.mark.parametrize("reader", [read_feedback, read_prompts, read_rated])
def test_empty_file(tmp_path, reader):
    for name in ("empty.jsonl", "blank.jsonl"):
        path = tmp_path / name
        path.write_text("" if name == "empty.jsonl" else "\n  \n")
        with pytest.raises(DataError, match=rf"{name}:1: empty file"):
            reader(path, on_error="raise")
        records, report = reader(path)
        assert records == [] and report.skipped == {"empty file": 1}
        assert f"empty file: 1 [{name}:1]" in report.summary()


def test_bad_arguments(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(ValueError, match="on_error"):
        read_prompts(path, on_error="ignore")


def test_preference_subset_passes_through(tmp_path):
    path = write(tmp_path / "rb.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "subset": "math-prm"},
                                         {"prompt": "p", "chosen": "a", "rejected": "b"},
                                         {"prompt": "p", "chosen": "a", "rejected": "b", "subset": 3}])
    pairs, report = read_preference_pairs(path)
    assert [p.subset for p in pairs] == ["math-prm", None]
    assert report.skipped == {"wrong type of 'subset'": 1}


def test_a_bad_first_line_does_not_decide_the_feedback_format(tmp_path):
    # Line 1 has a message-list prompt but a string completion (bad); the TRL string
    # lines after it are read as trl, not rejected as "wrong type" under trl_chat.
    path = write(tmp_path / "fb.jsonl", [
        {"prompt": USER, "completion": "a", "label": True},
        {"prompt": "q1", "completion": "a1", "label": True},
        {"prompt": "q2", "completion": "a2", "label": False}])
    records, report = read_feedback(path, render_chat=render)
    assert [(r.prompt, r.label) for r in records] == [("q1", True), ("q2", False)]
    assert report.fmt == "trl" and report.kept == 2 and report.num_skipped == 1


def test_a_folder_given_as_a_data_file_is_one_user_error(tmp_path):
    """Every reader (and a TFDS build through them) refuses a folder by name as a
    UserError (one `error:` line on the command line); before, open() raised
    IsADirectoryError, a traceback (e.g. --config.data.train_path=<a folder>)."""
    from jaxreward.data import tfds_builders
    from jaxreward.errors import UserError
    folder = tmp_path / "data"
    folder.mkdir()
    readers = [read_preference_pairs, read_feedback, read_prompts,
               lambda p: read_rated(p, num_ratings=2)]
    for reader in readers:
        with pytest.raises(UserError, match=f"{folder}: is a folder, not a data file"):
            reader(folder)
    with pytest.raises(UserError, match="is a folder"):
        tfds_builders.build("pairs", folder, tmp_path / "tfds", name="folder")
