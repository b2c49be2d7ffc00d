"""TFDS builders: each record kind built from .jsonl and loaded back, the real HH file, no TensorFlow."""
import json
import sys

import numpy as np
import pytest

from jaxreward.data import records as records_lib
from jaxreward.data import tfds_builders
from jaxreward.data.preference import DataError, read_preference_pairs
from jaxreward.data.records import FeedbackRecord, PromptRecord, RatedRecord, read_feedback
from tests.data.test_records import HELPSTEER, REPLY, USER, write


def by_source(records):
    return sorted(records, key=lambda r: r.source)


def test_real_hh_file_as_tfds_pairs(tmp_path, hh_file):
    builder, report = tfds_builders.build("pairs", hh_file, tmp_path, name="hh_harmless_test")
    assert report.kept == 2303 and report.skipped == {"prompt mismatch": 5, "empty chosen response": 4}
    assert report.files[0].examples["prompt mismatch"][0] == "harmless-base-test.jsonl.gz:1255"
    # The report is stored with the dataset and comes back with it.
    stored = json.loads((builder.data_path / "metadata.json").read_text())["read_report"]
    assert stored["files"][0]["skipped"] == {"prompt mismatch": 5, "empty chosen response": 4}
    source = tfds_builders.load("pairs/hh_harmless_test", tmp_path)
    assert len(source) == 2303 and tfds_builders.stored_report(source) == report
    records = tfds_builders.decode_all(source)
    assert all(isinstance(r.prompt, str) and isinstance(r.chosen, str) for r in records)
    pairs, _ = read_preference_pairs(hh_file)
    assert by_source(records) == by_source(pairs)
    assert "tensorflow" not in sys.modules


def test_each_kind_round_trips(tmp_path, tiny_tok):
    cases = {
        "pairs": ([{"prompt": "p1", "chosen": "a", "rejected": "b", "subset": "chat"},
                   {"prompt": "p2", "chosen": "c", "rejected": "d"}], {}),
        "feedback": ([{"prompt": USER, "completion": REPLY, "label": True},
                      {"prompt": USER, "completion": [{"role": "assistant", "content": "bad"}], "label": False}],
                     {"render_chat": tiny_tok.apply_chat_template}),
        "prompts": ([{"prompt": "2+2?", "answer": "4"}, {"prompt": "hi"}], {}),
        "rated": ([{"prompt": "p", "response": "r", "helpfulness": 4, "correctness": 3.5, "coherence": 0},
                   {"prompt": "q", "response": "s", "helpfulness": 1, "correctness": 2, "coherence": 3}],
                  {"attributes": HELPSTEER}),
    }
    readers = {"pairs": read_preference_pairs, "feedback": records_lib.read_feedback,
               "prompts": records_lib.read_prompts, "rated": records_lib.read_rated}
    for kind, (lines, kwargs) in cases.items():
        path = write(tmp_path / f"{kind}.jsonl", lines)
        _, report = tfds_builders.build(kind, [path], tmp_path / "tfds", name="tiny", **kwargs)
        assert report.kept == 2 and report.num_skipped == 0
        source = tfds_builders.load(f"{kind}/tiny", tmp_path / "tfds")
        expected, _ = readers[kind](path, **kwargs)
        assert by_source(tfds_builders.decode_all(source)) == expected, kind
    rated = tfds_builders.load("rated/tiny", tmp_path / "tfds")[0]["ratings"]
    assert rated.dtype == np.float32 and rated.shape == (3,)
    feedback = by_source(tfds_builders.decode_all(tfds_builders.load("feedback/tiny", tmp_path / "tfds")))
    assert feedback[0] == FeedbackRecord("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "a", True,
                                         "feedback.jsonl:1")
    assert isinstance(feedback[1].label, bool) and feedback[1].label is False
    prompts = by_source(tfds_builders.decode_all(tfds_builders.load("prompts/tiny", tmp_path / "tfds")))
    assert prompts == [PromptRecord("2+2?", "4", "prompts.jsonl:1"), PromptRecord("hi", None, "prompts.jsonl:2")]
    assert isinstance(tfds_builders.decode_all(tfds_builders.load("rated/tiny", tmp_path / "tfds"))[0], RatedRecord)
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("kind,good,bad,kwargs,where", [
    ("pairs", {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}, {},
     "field 'rejected': missing field"),
    ("feedback", {"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "a", "label": 0},
     {}, "field 'label': wrong type"),
    ("prompts", {"prompt": "p"}, {"prompt": ""}, {}, "field 'prompt': empty prompt"),
    ("rated", {"prompt": "p", "response": "r", "ratings": [1, 2]}, {"prompt": "p", "response": "r", "ratings": [1]},
     {"num_ratings": 2}, "field 'ratings': wrong ratings count"),
])
def test_build_reports_and_raises_located_errors(tmp_path, kind, good, bad, kwargs, where):
    path = write(tmp_path / "x.jsonl", [good, bad, good])
    _, report = tfds_builders.build(kind, path, tmp_path / "tfds", name="skip", **kwargs)
    assert report.kept == 2 and report.num_skipped == 1 and report.files[0].examples
    assert list(report.files[0].examples.values()) == [["x.jsonl:2"]]
    with pytest.raises(DataError, match=f"x.jsonl:2: {where}"):
        tfds_builders.build(kind, path, tmp_path / "tfds", name="raise", on_error="raise", **kwargs)
    assert not (tmp_path / "tfds" / f"jaxreward_{kind}" / "raise" / "1.0.0").exists()


def test_empty_and_stale_datasets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no valid records"):
        tfds_builders.build("pairs", empty, tmp_path / "tfds", name="empty")
    with pytest.raises(DataError, match="empty.jsonl:1: empty file"):
        tfds_builders.build("pairs", empty, tmp_path / "tfds", name="empty", on_error="raise")
    path = write(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    _, first = tfds_builders.build("feedback", path, tmp_path / "tfds", name="fb")
    _, again = tfds_builders.build("feedback", path, tmp_path / "tfds", name="fb")  # reused
    assert again == first
    write(path, [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}])
    with pytest.raises(ValueError, match="overwrite=True"):
        tfds_builders.build("feedback", path, tmp_path / "tfds", name="fb")
    _, rebuilt = tfds_builders.build("feedback", path, tmp_path / "tfds", name="fb", overwrite=True)
    assert rebuilt.kept == 2 and len(tfds_builders.load("feedback/fb", tmp_path / "tfds")) == 2
    with pytest.raises(ValueError, match="kind"):
        tfds_builders.build("pears", path, tmp_path / "tfds")
    with pytest.raises(ValueError, match="attributes"):
        tfds_builders.build("rated", path, tmp_path / "tfds", name="r")


def test_builder_class_directly_and_tfds_data_source(tmp_path):
    """A user can drive the builder class and load with plain `tfds.data_source`."""
    import tensorflow_datasets as tfds

    path = write(tmp_path / "f.jsonl", [{"prompt": "p", "completion": "a", "label": True}])
    builder = tfds_builders.FeedbackBuilder(paths=[path], name="direct", data_dir=str(tmp_path))
    builder.download_and_prepare()
    source = tfds.data_source("jaxreward_feedback/direct", data_dir=str(tmp_path), split="train")
    assert tfds_builders.decode(source[0]) == read_feedback(path)[0][0]
    assert "tensorflow" not in sys.modules


def test_refusals_are_user_errors_one_line_on_the_command_line(tmp_path):
    """A stale dataset, a file with no valid record and a bad kind are `UserError`s
    (the command line prints them as `error: ...`, exit 2, not a traceback); the
    stale refusal says what to change on the command line."""
    from jaxreward.errors import UserError
    path = write(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    tfds_builders.build("pairs", path, tmp_path / "tfds", name="mine_train")
    write(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}])
    with pytest.raises(UserError, match="data.tfds_name"):
        tfds_builders.build("pairs", path, tmp_path / "tfds", name="mine_train")
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}, "{not json"])
    with pytest.raises(UserError, match=r"no valid records(.|\n)*missing field 'rejected': 1 \[bad.jsonl:1\]"):
        tfds_builders.build("pairs", bad, tmp_path / "tfds", name="bad")
    with pytest.raises(UserError, match="kind"):
        tfds_builders.build("pears", path, tmp_path / "tfds")
    with pytest.raises(UserError, match="kind/name"):
        tfds_builders.load("pairs", tmp_path / "tfds")
    # Names tfds cannot load back: refused before anything is written (were built
    # into jaxreward_pairs/my data, jaxreward_pairs/a/b, jaxreward_pairs/1.0.0).
    for name in ("my data", "a/b", "", ".."):
        with pytest.raises(UserError, match=r"dataset name .*data.tfds_name"):
            tfds_builders.build("pairs", path, tmp_path / "names", name=name)
    assert not (tmp_path / "names").exists()
    for name in ("my-data", "x.y_2"):
        tfds_builders.build("pairs", path, tmp_path / "names", name=name)
        assert len(tfds_builders.load(f"pairs/{name}", tmp_path / "names")) == 2


def test_data_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """The README's example passes "~/tensorflow_datasets": build and load must both
    read it as the home folder (tfds does not expand it; build wrote to ./~/...)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    path = write(tmp_path / "mine.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                           {"prompt": "q", "chosen": "c", "rejected": "d"}])
    builder, report = tfds_builders.build("pairs", [path], "~/tensorflow_datasets", name="mine_train", fmt="trl")
    assert report.kept == 2
    assert builder.data_path == home / "tensorflow_datasets" / "jaxreward_pairs" / "mine_train" / "1.0.0"
    assert not (cwd / "~").exists()
    source = tfds_builders.load("pairs/mine_train", "~/tensorflow_datasets")
    assert len(source) == 2
    assert by_source(tfds_builders.decode_all(source)) == read_preference_pairs(path)[0]


def test_readme_worked_example_python_build_then_the_driver(tmp_path):
    """The README's example: a dataset built from Python ("mine", fmt="trl"), then
    `--config.data.source=tfds --config.data.tfds_name=mine` on the same file. The
    driver builds its own "mine_train" with its reader options and trains on the
    same pairs; a Python build under "mine_train" itself (other options) is refused
    in one line that names data.tfds_name (was a ValueError traceback)."""
    from configs import reward_model as rm_config
    from experiments import reward_model as driver
    from jaxreward.errors import UserError
    from jaxreward.models import gguf_io, pretrained
    tokenizer = gguf_io.tokenizer_from_gguf(gguf_io.open_gguf(pretrained.resolve("smollm2-135m-instruct")))
    rows = [{"prompt": f"q{i}", "chosen": f" yes {i}", "rejected": f" no {i}"} for i in range(12)]
    path = write(tmp_path / "my_pairs.jsonl", rows)
    data_dir = tmp_path / "tfds"
    _, report = tfds_builders.build("pairs", [path], data_dir, name="mine", fmt="trl")
    mine = sorted(tfds_builders.decode_all(tfds_builders.load("pairs/mine", data_dir)),
                  key=lambda p: int(p.source.rpartition(":")[2]))
    config = rm_config.get_config("smollm2_hh")
    config.data.update(source="tfds", train_path=str(path), tfds_name="mine", tfds_data_dir=str(data_dir),
                       num_eval_pairs=4, max_train_pairs=0, max_eval_pairs=0)
    train, evals = driver.read_pairs(config, tokenizer)
    assert sorted(train + evals, key=lambda p: int(p.source.rpartition(":")[2])) == mine
    assert report.kept == 12 and len(train) == 8 and len(evals) == 4
    tfds_builders.build("pairs", [path], tmp_path / "other", name="mine_train", fmt="trl")
    config.data.tfds_data_dir = str(tmp_path / "other")
    with pytest.raises(UserError, match="built from other files or options.*data.tfds_name"):
        driver.read_pairs(config, tokenizer)


def test_several_processes_build_once_on_process_0_and_the_others_read_it(tmp_path, monkeypatch):
    # Every process ran download_and_prepare on the same shared folder at once
    # (colliding writes of one dataset); now process 0 builds and the rest wait.
    import jax
    from jaxreward import parallel
    from jaxreward.errors import UserError
    path = write(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    barriers, index = [], [1]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: index[0])
    monkeypatch.setattr(parallel, "barrier", barriers.append)
    with pytest.raises(UserError, match=r"process 1 of 2 found no dataset from these files after process 0 built "
                                        r"it: see process 0's error, or give a data_dir .* every process reads"):
        tfds_builders.build("pairs", path, tmp_path / "tfds", name="pod")   # process 0 built nothing
    assert not (tmp_path / "tfds" / "jaxreward_pairs" / "pod").exists() and len(barriers) == 1
    index[0] = 0
    _, built = tfds_builders.build("pairs", path, tmp_path / "tfds", name="pod")
    assert built.kept == 1 and len(barriers) == 2
    index[0] = 1
    with monkeypatch.context() as patch:
        patch.setattr(tfds_builders.PairsBuilder, "download_and_prepare",
                      lambda *a, **kw: pytest.fail("process 1 wrote the dataset"))
        builder, report = tfds_builders.build("pairs", path, tmp_path / "tfds", name="pod")
    assert report == built and len(builder.as_data_source("train")) == 1 and len(barriers) == 3
    # Process 0's error comes after the barrier, so the other processes never wait forever.
    index[0] = 0
    bad = write(tmp_path / "bad.jsonl", ["{oops"])
    with pytest.raises(DataError, match="bad.jsonl:1: malformed JSON"):
        tfds_builders.build("pairs", bad, tmp_path / "tfds", name="bad", on_error="raise")
    assert len(barriers) == 4
