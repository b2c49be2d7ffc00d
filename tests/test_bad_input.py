"""Every bad input ends with one clear line naming it, never a traceback.

Config values are checked in-process (`jaxreward.main.check_config`, as the
CLI runs it before any model loads). The CLI tests use flag errors (parsed
before jax is imported) and a toy driver without a mesh, so each subprocess
takes about a second.
"""
import gzip
import os
import re
import subprocess
import sys

import pytest

from jaxreward import errors, main
from jaxreward.data.chat_template import ChatTemplateError
from jaxreward.data.preference import DataError
from jaxreward.train import defaults
from tests.conftest import ROOT


def _config(file: str, variant: str, **overrides):
    """`configs/<file>.py:<variant>` with dotted-name overrides, as the CLI builds it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cfg_{file}", ROOT / "configs" / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    for name, value in overrides.items():
        node = config
        *parents, leaf = name.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def test_user_errors_share_one_base_and_stay_value_errors():
    for cls in (DataError, defaults.ConfigError, ChatTemplateError, main.UnknownTask,
                errors.CorruptFileError, errors.DivergedError):
        assert issubclass(cls, errors.UserError) and issubclass(cls, ValueError)
    assert issubclass(errors.DivergedError, FloatingPointError)   # `except FloatingPointError` still works
    assert FileNotFoundError in errors.USER_ERRORS


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.learning_rate", -1e-3, "optimizer.learning_rate must be a finite number in (0.0, inf), got -0.001"),
    ("optimizer.learning_rate", float("nan"), "optimizer.learning_rate must be a finite number in (0.0, inf), got nan"),
    ("mesh.data", 3, "config field mesh: data×fsdp×tensor = {'data': 3, 'fsdp': 1, 'tensor': 1} does not fit"),
    ("model.dtype", "float8", "model.dtype must be one of float32, bfloat16, float16; got 'float8'"),
    ("data.train_path", "/no/such/pairs.jsonl", "config field data.train_path: '/no/such/pairs.jsonl' does not exist"),
    ("model.pretrained", "/no/such/model", "config field model.pretrained: '/no/such/model' is neither an existing path"),
    ("data.max_prompt_length", 500, "config field data.max_prompt_length=500 leaves no room for a response in "
                                    "data.max_length="),
])
def test_impossible_config_values_are_refused_naming_the_field(field, value, message):
    config = _config("reward_model", "smollm2_hh", **{field: value})
    with pytest.raises(defaults.ConfigError) as info:
        main.check_config(config)
    assert message in str(info.value)


def test_empty_data_files_are_refused_before_any_model_loads(tmp_path):
    empty = tmp_path / "pairs.jsonl.gz"
    with gzip.open(empty, "wt") as f:
        f.write("\n\n")
    config = _config("reward_model", "smollm2_hh", **{"data.train_path": str(empty)})
    with pytest.raises(defaults.ConfigError, match=r"config field data.train_path: '.*pairs.jsonl.gz' is empty"):
        main.check_config(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("")
    config = _config("best_of_n", "smollm2", prompts_path=str(prompts))
    with pytest.raises(defaults.ConfigError, match=r"config field prompts_path: .* is empty"):
        main.check_config(config)


@pytest.mark.parametrize("file, variant", [("dpo", "smollm2_hh"), ("reward_model", "smollm2_hh"),
                                           ("reward_model_rated", "smollm2_helpsteer")])
def test_an_eval_file_that_is_the_train_file_is_refused(tmp_path, file, variant):
    # "Held-out" accuracy on the training records is no held-out accuracy: the same file
    # (also under another spelling of its path) is refused; another file is fine.
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "response": "a", "ratings": [1]}\n')
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    for spelling in (str(data), str(tmp_path / "." / "pairs.jsonl")):
        config = _config(file, variant, **{"data.train_path": str(data), "data.eval_path": spelling})
        with pytest.raises(defaults.ConfigError, match=r"config field data.eval_path=.* is the file "
                                                       r"data.train_path trains on"):
            main.check_config(config)
    main.check_config(_config(file, variant, **{"data.train_path": str(data), "data.eval_path": str(other)}))


@pytest.mark.parametrize("file, source", [("dpo", "jsonl"), ("reward_model", "jsonl"), ("reward_model", "tfds")])
def test_text_data_without_a_pretrained_tokenizer_is_refused(tmp_path, file, source):
    # A random `model.arch` decoder has no tokenizer: text pairs were an AttributeError traceback.
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    config = _config(file, "synthetic", **{"data.source": source, "data.train_path": str(data)})
    with pytest.raises(defaults.ConfigError, match=f"config field model.pretrained is empty, but "
                                                   f"data.source={source} needs the checkpoint's tokenizer"):
        main.check_config(config)


def test_a_path_that_is_no_checkpoint_is_a_user_error(tmp_path):
    # A run's workdir, an export folder or a data file named as a model was a ValueError
    # traceback (exit 1); it is a UserError naming the path, one line on the command line.
    from experiments import evaluate_rm
    from jaxreward.models import pretrained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"task": "dpo"}')
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    for path, message in [(run_dir, f"{run_dir}/config.json: model_type None is not supported"),
                          (data, f"{data}: expected an HF checkpoint directory or a .gguf file")]:
        with pytest.raises(errors.UserError) as info:
            pretrained.load_pretrained(str(path))
        assert str(info.value).startswith(message), info.value
    with pytest.raises(errors.UserError, match=f"^{run_dir}/tokenizer.json: cannot load the tokenizer"):
        evaluate_rm.load_tokenizer(str(run_dir))


# ---------------------------------------------------------------- the CLI


def _run(*args, cwd=ROOT, env=None):
    base = {k: v for k, v in os.environ.items() if k != "JAXREWARD_TRACEBACK"}
    env = dict(base, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "jaxreward.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_flags_and_overrides_are_one_line(tmp_path):
    wd = f"--workdir={tmp_path}"
    q = "--config=configs/quickstart.py:tiny"
    cases = [
        ((q, wd, "--config.optimizer.learnin_rate=1e-3"),
         "error: unknown config field optimizer.learnin_rate (did you mean optimizer.learning_rate?) "
         "in --config.optimizer.learnin_rate=1e-3"),
        ((q, wd, "--config.optimiser.learning_rate=1e-3"),
         "error: unknown config field optimiser (did you mean optimizer?) in --config.optimiser.learning_rate=1e-3"),
        ((q, wd, "--config.train.num_steps=ten"),
         "error: flag --config.train.num_steps=ten: invalid literal for int() with base 10: 'ten'"),
        (("--config=configs/quickstart.py:huge", wd),
         "error: unknown variant 'huge' of configs/quickstart.py; choose one of: default, tiny"),
        (("--config=configs/nope.py", wd),
         "error: --config=configs/nope.py: cannot load the config file ([Errno 2] No such file or directory"),
        ((q, "--workdirr=x"), "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?"),
        ((q, wd, "stray"), "error: unexpected arguments: stray"),
    ]
    for args, expected in cases:
        line = _one_error_line(_run(*args))
        assert line.startswith(expected), (line, expected)
    assert not os.listdir(tmp_path)  # nothing written
    traced = _run(q, wd, "--config.optimizer.learnin_rate=1e-3", env={"JAXREWARD_TRACEBACK": "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr and "learnin_rate" in traced.stderr


TOY_DRIVER = """
import os
import re
from jaxreward.data.chat_template import ChatTemplateError
from jaxreward.data.preference import DataError
from jaxreward.errors import CorruptFileError, UserError
from jaxreward.train import defaults

def check_config(config):
    defaults.check_float(config, "rate", low=0.0, low_open=True)

def run(config, workdir):
    kind = config.fail
    if kind == "data":
        raise DataError("pairs.jsonl", 7, "chosen", "empty response")
    if kind == "config":
        raise defaults.ConfigError("config field rate is too large for this dataset")
    if kind == "template":
        raise ChatTemplateError("chat template raised: roles must alternate")
    if kind == "missing":
        open(os.path.join(workdir, "no_such_input.jsonl"))
    if kind == "batch":
        raise UserError("3 usable train pairs is fewer than one batch (data.batch_size=8)")
    if kind == "corrupt":
        raise CorruptFileError("checkpoint ck/2 cannot be restored: missing state/d/abc")
    if kind == "diverged":   # the loop's check of a NaN loss
        from jaxreward.train import loop
        loop.log_train(None, 3, {"loss": float("nan")})
    if kind == "value_diverged":   # PPO's order: the value model's loss is checked first
        from jaxreward.train import loop
        loop.log_train(None, 3, {"loss": float("nan"), "value/loss": float("inf")},
                       finite=(("value/loss", "value_optimizer.learning_rate"), ("loss", "optimizer.learning_rate")))
    if kind == "after_save":   # an error while an async checkpoint save is in flight
        import numpy as np
        from jaxreward.train import checkpoint
        ck = checkpoint.Checkpointer(os.path.join(workdir, "ck"))   # not "checkpoints": no resume check
        ck.save(1, {"w": np.ones((256, 256), np.float32)}, {"epoch": 0})
        raise UserError("3 usable train pairs is fewer than one batch (data.batch_size=8)")
    if kind == "bug":
        raise RuntimeError("a bug, not bad input")
    print("ok")
"""

TOY_CONFIG = """
import ml_collections
def get_config(variant=None):
    return ml_collections.ConfigDict(dict(task="toy", fail="", rate=1.0))
"""


def test_user_errors_in_a_driver_run_are_one_line_with_exit_2(tmp_path):
    root = tmp_path / "repo"
    (root / "experiments").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "experiments" / "__init__.py").write_text("")
    (root / "experiments" / "toy.py").write_text(TOY_DRIVER)
    (root / "configs" / "toy.py").write_text(TOY_CONFIG)
    run = lambda *a, **kw: _run("--config=configs/toy.py", f"--workdir={tmp_path / 'wd'}", *a,
                                cwd=root, **kw)
    assert run().stdout.strip() == "ok"
    for kind, expected in [
            ("data", "error: pairs.jsonl:7: field 'chosen': empty response"),
            ("config", "error: config field rate is too large for this dataset"),
            ("template", "error: chat template raised: roles must alternate"),
            ("missing", "error: no such file or directory: '"),
            ("batch", "error: 3 usable train pairs is fewer than one batch (data.batch_size=8)"),
            ("corrupt", "error: checkpoint ck/2 cannot be restored: missing state/d/abc"),
            ("diverged", "error: non-finite loss nan at step 3: the run diverged; try a lower "
                         "optimizer.learning_rate in a new --workdir, or check the data"),
            ("value_diverged", "error: non-finite value/loss inf at step 3: the run diverged; try a lower "
                               "value_optimizer.learning_rate in a new --workdir, or check the data"),
            ("after_save", "error: 3 usable train pairs is fewer than one batch")]:
        line = _one_error_line(run(f"--config.fail={kind}"))
        assert line.startswith(expected), (kind, line)
    assert _one_error_line(run("--config.rate=-1")).startswith(
        "error: config field rate must be a finite number in (0.0, inf), got -1.0")
    # The save in flight when "after_save" failed was finished, sealed and
    # closed before the error line (no tmp folder, no orbax traceback).
    assert sorted(os.listdir(tmp_path / "wd" / "ck")) == ["1"]
    assert os.path.isfile(tmp_path / "wd" / "ck" / "1" / "sha256.json")
    bug = run("--config.fail=bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
    traced = run("--config.fail=data", env={"JAXREWARD_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback" in traced.stderr and "DataError" in traced.stderr


def _pairs_file(tmp_path) -> str:
    """A one-pair jsonl, so that config checks run where ../shared/data is absent."""
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return str(path)


def test_dpo_without_held_out_pairs_is_refused_before_any_model_loads(tmp_path):
    # Was found only after the model loaded and the pairs were tokenized.
    data = _pairs_file(tmp_path)
    config = _config("dpo", "smollm2_hh", **{"data.num_eval_pairs": 0, "data.train_path": data})
    with pytest.raises(defaults.ConfigError, match=r"config field data.num_eval_pairs=0 holds out no pairs"):
        main.check_config(config)
    main.check_config(_config("dpo", "smollm2_hh", **{"data.num_eval_pairs": 1, "data.train_path": data}))


@pytest.mark.parametrize("field, value, message", [
    ("loss.beta", float("inf"), "config.loss ('dpo'): beta must be in (0, inf), got inf"),
    ("loss.beta", float("-inf"), "config.loss ('dpo'): beta must be in (0, inf), got -inf"),
])
def test_an_infinite_loss_hyper_parameter_is_refused(field, value, message):
    # "(0, inf)" excludes inf: β = inf passed the check and the run diverged at step 2, after
    # the model load and the reference pass, with a message blaming the learning rate.
    with pytest.raises(ValueError) as info:
        main.check_config(_config("dpo", "smollm2_hh", **{field: value}))
    assert message in str(info.value)


def test_a_one_sided_reward_clip_still_takes_infinite_bounds():
    import numpy as np
    from jaxreward.objectives import transforms
    np.testing.assert_array_equal(transforms.clip_rewards(np.array([-5.0, 5.0]), low=-float("inf"), high=1.0),
                                  [-5.0, 1.0])


@pytest.mark.parametrize("file, variant, field", [("dpo", "smollm2_hh", "data.eval_path"),
                                                  ("reward_model", "smollm2_hh", "data.train_path"),
                                                  ("best_of_n", "smollm2", "prompts_path")])
def test_a_folder_as_a_data_file_is_refused_before_any_model_loads(tmp_path, file, variant, field):
    # Was refused only when the reader opened it, after the model had loaded.
    with pytest.raises(defaults.ConfigError, match=f"config field {field}: '{tmp_path}' is a folder, not a data file"):
        main.check_config(_config(file, variant, **{field: str(tmp_path)}))


def _readers():
    """Every `.jsonl` reader: (name, read(path, on_error) -> (records, report), a good line)."""
    from experiments import evaluate_rm
    from jaxreward.data import preference, records
    return [
        ("pairs", preference.read_preference_pairs, b'{"prompt": "q", "chosen": "a", "rejected": "b"}'),
        ("feedback", records.read_feedback, b'{"prompt": "q", "completion": "c", "label": true}'),
        ("prompts", records.read_prompts, b'{"prompt": "q"}'),
        ("rated", lambda p, **kw: records.read_rated(p, num_ratings=1, **kw),
         b'{"prompt": "q", "response": "r", "ratings": [1]}'),
        ("best_of", evaluate_rm.read_best_of, b'{"prompt": "q", "chosen": "a", "rejected": ["b"]}'),
    ]


@pytest.mark.parametrize("reader", range(5), ids=["pairs", "feedback", "prompts", "rated", "best_of"])
def test_malformed_json_names_the_file_line_and_the_column_in_it(tmp_path, reader):
    # json.loads was given the line with its "\n", so a record cut short read
    # "line 2 column 1 (char 30)": a line and column of the record, not of the file.
    name, read, good = _readers()[reader]
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\n" + good[:-1] + b"\n" + good + b"\n")
    with pytest.raises(DataError) as info:
        read(path, on_error="raise")
    column = len(good)  # the missing "}" would be the last character of line 2
    assert str(info.value) == f"{path}:2: malformed JSON (Expecting ',' delimiter at column {column})"
    assert "line 2 column" not in str(info.value) and "char" not in str(info.value)
    records, report = read(path, on_error="skip")
    assert len(records) == 2 and report.skipped == {"malformed JSON": 1}


@pytest.mark.parametrize("reader", range(5), ids=["pairs", "feedback", "prompts", "rated", "best_of"])
def test_bytes_that_are_not_utf8_are_counted_apart_from_malformed_json(tmp_path, reader):
    # Was counted as "malformed JSON (not UTF-8: ...)", hiding an encoding problem
    # (a Latin-1 file) among syntax errors.
    name, read, good = _readers()[reader]
    latin1 = good.replace(b'"q"', b'"caf\xe9"')
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(good + b"\n" + latin1 + b"\n" + good + b"\n")
    records, report = read(path, on_error="skip")
    assert len(records) == 2 and report.skipped == {"not UTF-8": 1}
    assert report.examples["not UTF-8"] == ["data.jsonl.gz:2"]
    with pytest.raises(DataError) as info:
        read(path, on_error="raise")
    column = latin1.index(b"\xe9") + 1
    assert str(info.value) == f"{path}:2: not UTF-8 (byte 0xe9 at column {column}: invalid continuation byte)"


def test_a_txt_prompt_file_counts_bytes_that_are_not_utf8_by_line(tmp_path):
    from jaxreward.data.records import read_prompts
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"first\n\xc3\xa9t\xe9\nthird\r\n")   # "ét" in UTF-8, then Latin-1 "é"
    records, report = read_prompts(path)
    assert [r.prompt for r in records] == ["first", "third"] and report.skipped == {"not UTF-8": 1}
    with pytest.raises(DataError, match=r"prompts.txt:2: not UTF-8 \(byte 0xe9 at column 3: "):
        read_prompts(path, on_error="raise")


def _prompt_file(path, n):
    path.write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(n)) + "\n")
    return str(path)


@pytest.mark.parametrize("file, variant, overrides, message", [
    ("rl", "synthetic", {"data.num_prompts": 3},
     "config field rollout.prompts_per_step=16 is more than the data.num_prompts=3 train prompts; lower "
     "rollout.prompts_per_step to at most 3 or give more prompts"),
    ("rl", "smollm2_arith", {"data.source": "jsonl", "data.num_eval_prompts": 2},
     "config field rollout.prompts_per_step=4 is more than the at most 3 train prompts: data.prompts_path="
     "'{path}' has 5 non-blank line(s) (usable prompts are counted after the model loads), "
     "2 held out for eval (data.num_eval_prompts=2); lower "
     "rollout.prompts_per_step to at most 3 or give more prompts"),
    ("ppo", "smollm2_hh", {"data.source": "jsonl", "data.num_eval_prompts": 16, "reward.kind": "text",
             "value.init": "policy"},
     "config field rollout.prompts_per_step=8 is more than the at most 3 train prompts: data.prompts_path="
     "'{path}' has 5 non-blank line(s) (usable prompts are counted after the model loads), "
     "2 held out for eval (data.num_eval_prompts=16)"),
    ("vas", "smollm2_hh", {"data.source": "jsonl", "data.num_eval_prompts": 1, "reward.kind": "text"},
     "config field data.batch_size=16 is more than the 8 train samples (at most 4 train prompts: "
     "data.prompts_path='{path}' has 5 non-blank line(s) (usable prompts are counted after the model loads), "
     "1 held out for eval (data.num_eval_prompts=1), "
     "× rollout.samples_per_prompt=2); lower data.batch_size to at most 8"),
])
def test_too_few_prompts_for_one_step_are_refused_before_any_model_loads(tmp_path, file, variant, overrides,
                                                                          message):
    # Was found in run(), after the policy (SmolLM2: seconds to a minute) had loaded:
    # "3 train prompts is fewer than rollout.prompts_per_step=4".
    path = _prompt_file(tmp_path / "prompts.jsonl", 5)
    config = _config(file, variant, **{"data.prompts_path": path, **overrides})
    with pytest.raises(defaults.ConfigError) as info:
        main.check_config(config)
    assert message.format(path=path) in str(info.value)
    # Enough lines for one step: accepted here (the drivers check again once bad lines are skipped).
    big = _prompt_file(tmp_path / "more.jsonl", 64)
    main.check_config(_config(file, variant, **{"data.prompts_path": big, "data.num_prompts": 64, **{
        k: v for k, v in overrides.items() if k != "data.num_prompts"}}))


def test_the_prompt_count_check_after_reading_names_the_usable_prompts(tmp_path):
    config = _config("rl", "smollm2_arith", **{"data.source": "jsonl", "data.prompts_path": "p.jsonl"})
    defaults.check_enough_prompts(config, num_train=4)
    with pytest.raises(defaults.ConfigError, match=r"^config field rollout.prompts_per_step=4 is more than the 3 "
                                                   r"usable train prompts of data.prompts_path='p.jsonl'; lower"):
        defaults.check_enough_prompts(config, num_train=3)


CHOSEN_ERROR_CONFIG = """
import ml_collections
SIZES = {"small": 1, "large": 2}
def get_config(variant=None):
    try:
        size = SIZES[variant]
    except KeyError:
        raise ValueError(f"unknown variant {variant!r} of sized.py; choose one of: small, large") from None
    return ml_collections.ConfigDict(dict(task="toy", size=size))
"""


def test_an_error_raised_from_none_is_the_one_line_not_the_error_it_replaced(tmp_path):
    # main._root followed __context__ past `raise ... from None`, so the line was
    # "error: huge" (the KeyError the config caught), not the message it chose to raise.
    (tmp_path / "sized.py").write_text(CHOSEN_ERROR_CONFIG)
    line = _one_error_line(_run(f"--config={tmp_path / 'sized.py'}:huge", f"--workdir={tmp_path / 'wd'}"))
    assert line == "error: unknown variant 'huge' of sized.py; choose one of: small, large"
    try:   # an explicit cause is still followed to the first error
        try:
            {}["k"]
        except KeyError as e:
            raise ValueError("outer") from e
    except ValueError as outer:
        assert isinstance(main._root(outer), KeyError)


@pytest.mark.parametrize("file, variant", [("reward_model", "smollm2_hh"), ("dpo", "smollm2_hh"),
                                           ("reward_model_rated", "synthetic"), ("quickstart", "tiny")])
def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(monkeypatch, tmp_path, file, variant):
    # Each process loaded data.batch_size // jax.process_count() rows: 10 on 4 processes
    # trained on batches of 8, silently, with every printed "batch of 10" wrong.
    import jax
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    data = _pairs_file(tmp_path)

    def config_of(file, variant, **overrides):  # the jsonl variants read a local file
        config = _config(file, variant, **overrides)
        if config.data.get("source") == "jsonl":
            config.data.train_path = data
        return config
    with pytest.raises(defaults.ConfigError) as info:
        main.check_config(config_of(file, variant, **{"data.batch_size": 10}))
    assert str(info.value) == ("config field data.batch_size=10 does not divide among the 4 processes of this "
                               "run (jax.process_count()); use 8 or 12")
    with pytest.raises(defaults.ConfigError, match=r"data.batch_size=3 does not divide .*; use 4$"):
        main.check_config(config_of(file, variant, **{"data.batch_size": 3}))
    config = config_of(file, variant, **{"data.batch_size": 16})
    main.check_config(config)
    assert defaults.per_process_batch(config) == 4


@pytest.mark.parametrize("file, variant", [("rl", "synthetic"), ("ppo", "synthetic"), ("vas", "synthetic"),
                                           ("dpo", "synthetic"), ("reward_model", "synthetic"),
                                           ("reward_model_rated", "synthetic")])
@pytest.mark.parametrize("field, value, message", [
    ("vocab_size", 1, "config field model.arch.vocab_size must be an integer >= 2, got 1"),
    ("num_kv_heads", 3, "config field model.arch.num_kv_heads=3: model.arch.num_heads=4 must be a multiple"),
    ("hidden_size", 1, "config field model.arch.hidden_size=1: the head size hidden_size // num_heads = 0"),
    ("hidden_size", 12, "the head size hidden_size // num_heads = 3 (num_heads=4) must be even"),
])
def test_an_impossible_random_decoder_is_refused_by_every_driver_that_builds_one(file, variant, field, value,
                                                                                   message):
    # Was a ~28-line traceback once the model was built (CountingTask, LlamaConfig, a zero head size) in
    # the RL/PPO/VAS drivers; DPO and the reward models checked only that the sizes were >= 1.
    config = _config(file, variant, **{f"model.arch.{field}": value})
    with pytest.raises(defaults.ConfigError, match=re.escape(message)):
        main.check_config(config)


def test_quickstart_decoder_sizes_are_checked_alike():
    # Quickstart keeps the decoder's fields under `model` itself; num_kv_heads=3 was a LlamaConfig traceback.
    config = _config("quickstart", "tiny", **{"model.num_kv_heads": 3})
    with pytest.raises(defaults.ConfigError, match=re.escape("config field model.num_kv_heads=3: model.num_heads=2 "
                                                             "must be a multiple")):
        main.check_config(config)


@pytest.mark.parametrize("extra, message", [
    (["--pairs", "0"], "--pairs must be at least 1 (got 0)"),
    (["--pairs", "-1"], "--pairs must be at least 1 (got -1)"),
    (["--seq-len", "1"], "--seq-len must be at least 2: half prompt, half response (got 1)"),
])
def test_bench_dpo_step_refuses_degenerate_sizes_in_one_line(tmp_path, extra, message):
    """`--pairs 0` used to end in an einops traceback, `--seq-len 1` to time a
    step with no response token (loss 0) and report its tokens/s."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dpo_step.py"), "--models", "llama4.5m",
           "--out", str(tmp_path), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(message)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------
# An attack on the checks added 2026-12-05 (each was a defect; the tests assert the fix)


def test_rated_synthetic_refuses_train_path(tmp_path):
    """data.source=synthetic with a data.train_path is refused by the DPO and
    reward-model jobs (commit 74e09dc: "they were ignored"), but the rated
    reward-model job still ignores the file silently: a run on generated
    records looks like a run on the user's file."""
    from configs import reward_model_rated as rated_config
    path = tmp_path / "rated.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "helpfulness": 3}\n')
    config = rated_config.get_config("synthetic")
    config.data.train_path = str(path)
    with pytest.raises(defaults.ConfigError, match="train_path"):
        main.check_config(config)


def test_batch_split_hint_names_a_mesh_that_fits():
    """On 8 devices, data.batch_size=4 with mesh (-1, 1, 1) is refused with
    "use 8, or a smaller mesh.data"; but a smaller mesh.data alone (4, 1, 1)
    is then refused as a mesh that does not fit the 8 devices: the freed
    devices must go to mesh.tensor, which the hint never names."""
    import jax
    import ml_collections
    assert jax.device_count() == 8  # tests/conftest.py
    config = ml_collections.ConfigDict(dict(
        data=dict(batch_size=4), mesh=dict(data=-1, fsdp=1, tensor=1)))
    with pytest.raises(defaults.ConfigError) as err:
        defaults.per_process_batch(config)
    # following the hint literally fails:
    config.mesh.data = 4
    with pytest.raises(defaults.ConfigError, match="does not fit"):
        defaults.check_mesh(config)
    assert "mesh.tensor" in str(err.value), str(err.value)


def test_overlap_warning_counts_feedback_line_repeated_with_other_label():
    """A held-out feedback line whose prompt and completion repeat a train
    line word for word is not counted when its label differs: the model was
    trained on that very text (with the opposite label), so its held-out
    accuracy is not held out either; the warning stays silent."""
    from experiments import dpo
    fp = dpo._FeedbackPair
    train = [fp("p", "c", "c", "f.jsonl:1", None, True)]
    held_out = [fp("p", "c", "c", "f.jsonl:2", None, False)]
    assert dpo.warn_train_eval_overlap(train, held_out, "feedback lines") == 1


def test_interrupt_filter_keeps_a_real_error_that_mentions_the_interrupt():
    """main._drop_interrupt_tracebacks drops every absl record whose message
    text contains "KeyboardInterrupt", at any level: an ERROR that logs the
    traceback of a real failure raised while a Ctrl-C was handled (a
    checkpoint write that hit a full disk) is hidden with it."""
    import logging
    import sys
    import traceback
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise OSError(28, "No space left on device")
    except OSError:
        text = traceback.format_exc()
    assert "KeyboardInterrupt" in text and "No space left" in text
    record = logging.LogRecord("absl", logging.ERROR, __file__, 1,
                               "checkpoint save failed:\n" + text, None, None)
    assert main._drop_interrupt_tracebacks(record), "a real OSError log was dropped"
    # what the filter is for still goes: orbax's log with the KeyboardInterrupt as exc_info
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        info = sys.exc_info()
    orbax = logging.LogRecord("absl", logging.ERROR, __file__, 1, "_SignalingThread.run() raised: %s",
                              (info[1],), info)
    assert not main._drop_interrupt_tracebacks(orbax)


def test_kto_reference_point_finite_only_in_float64_is_refused():
    """"A given batch statistic (loss.reference_point) must be finite": the
    check reads the Python float, but the loss casts it to float32 first, so
    1e39 passes the config check and trains with z_0 = inf (every sigmoid
    saturated: loss 0.5, zero gradient, eval kl = inf), silently."""
    from configs import dpo as dpo_config
    config = dpo_config.get_config("synthetic")
    config.loss.name = "kto"
    config.loss.reference_point = 1e39
    with pytest.raises(defaults.ConfigError, match="reference_point"):
        main.check_config(config)


@pytest.mark.parametrize("mesh, refused", [((1, 1, 8), True), ((2, 1, 4), False), ((4, 1, 2), False),
                                           ((1, 2, 4), False), ((2, 2, 2), False)])
def test_a_mesh_whose_batch_shards_span_two_processes_is_refused(monkeypatch, mesh, refused):
    # Two processes × 4 devices with mesh.tensor=8: the one batch shard lies on both processes'
    # devices, each process fed its own 4 rows, and shard_batch built a 4-row batch whose copies
    # differed by process (the step trained on an inconsistent batch, silently).
    import jax
    import ml_collections
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    config = ml_collections.ConfigDict(dict(data=dict(batch_size=8),
                                            mesh=dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])))
    if not refused:
        assert defaults.per_process_batch(config) == 4
        return
    with pytest.raises(defaults.ConfigError) as err:
        defaults.per_process_batch(config)
    assert str(err.value).startswith("config field mesh.tensor: the mesh puts each of its data×fsdp = 1 batch "
                                     "shards on 8 devices"), str(err.value)
    assert "--config.mesh.tensor=4" in str(err.value)
