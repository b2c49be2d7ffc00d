"""One workdir, one config, one run at a time (jaxreward.main): the resume
check, the extension rule on re-runs, and the workdir lock."""
import json
import re
import os
import subprocess
import sys

import pytest

from configs import quickstart as qs_config
from jaxreward import errors, main
from jaxreward.train import defaults
from tests.conftest import ROOT


def _workdir(tmp_path, config):
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    return str(tmp_path)


def _config(num_steps=20, schedule_steps=0):
    c = qs_config.get_config("tiny")
    c.train.num_steps, c.train.schedule_steps = num_steps, schedule_steps
    return c


def test_an_extended_run_resumes_under_the_same_command(tmp_path, capsys):
    wd = _workdir(tmp_path, _config(num_steps=24, schedule_steps=16))   # extended from 16 before
    again = _config(num_steps=24)   # the same command as the extension: schedule_steps not given
    main.check_resume_config(again, wd)
    assert again.train.schedule_steps == 16 and "extending" not in capsys.readouterr().out
    further = _config(num_steps=32)   # extending once more keeps the first schedule
    main.check_resume_config(further, wd)
    assert further.train.schedule_steps == 16
    assert "extending the run from 24 to 32 steps; the learning-rate schedule keeps its 16 steps" in (
        capsys.readouterr().out)


def test_a_refused_extension_does_not_say_it_extends(tmp_path, capsys):
    wd = _workdir(tmp_path, _config(num_steps=16))
    changed = _config(num_steps=32)
    changed.optimizer.learning_rate *= 2
    with pytest.raises(defaults.ConfigError, match="optimizer.learning_rate"):
        main.check_resume_config(changed, wd)
    assert "extending" not in capsys.readouterr().out


def test_checkpoints_without_a_readable_config_json_are_refused(tmp_path):
    wd = _workdir(tmp_path, _config())
    (tmp_path / "config.json").write_text('{"train": {"num_st')
    with pytest.raises(errors.CorruptFileError, match=rf"{tmp_path / 'config.json'} is damaged \(JSONDecodeError"):
        main.check_resume_config(_config(), wd)
    os.remove(tmp_path / "config.json")   # deleting it must not turn the check off
    with pytest.raises(defaults.ConfigError, match="holds checkpoints but no config.json"):
        main.check_resume_config(_config(), wd)
    os.rmdir(tmp_path / "checkpoints" / "4")   # no checkpoints: nothing to check
    main.check_resume_config(_config(), wd)


@pytest.mark.parametrize("stored, named", [
    ('{"a": 1, "b": {"c": 2}}', "no task field, so it is not a jaxreward config"),
    ('{"task": "dpo", "loss": {"beta": 0.1}}', "task 'dpo'"),
])
def test_another_jobs_or_a_foreign_config_json_is_one_line(tmp_path, stored, named):
    # Valid JSON of the wrong shape used to list every field of both configs.
    wd = _workdir(tmp_path, _config())
    (tmp_path / "config.json").write_text(stored)
    with pytest.raises(defaults.ConfigError) as caught:
        main.check_resume_config(_config(), wd)
    assert str(caught.value) == (
        f"--workdir={wd} holds checkpoints whose {tmp_path / 'config.json'} names {named}, not "
        "'quickstart'; use a new --workdir")


def test_a_long_listing_of_changed_fields_is_cut(tmp_path):
    wd = _workdir(tmp_path, _config())
    stored = json.loads((tmp_path / "config.json").read_text())
    changed = _config()
    n = 0
    for section, fields in stored.items():   # change every number the resume check compares
        for key, value in (fields.items() if isinstance(fields, dict) else ()):
            name = f"{section}.{key}"
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and name not in main.RESUMABLE_CHANGES
                    and name not in ("train.num_steps", "train.schedule_steps")):
                changed[section][key] = value + 1
                n += 1
    assert n > main.MAX_LISTED_CHANGES
    with pytest.raises(defaults.ConfigError) as caught:
        main.check_resume_config(changed, wd)
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 + main.MAX_LISTED_CHANGES + 2
    assert lines[-2] == f"  ... and {n - main.MAX_LISTED_CHANGES} more"


def test_a_second_run_in_a_workdir_in_use_is_refused_in_one_line(tmp_path):
    fd = main.lock_workdir(str(tmp_path))   # this process holds it, as a running job would
    try:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-m", "jaxreward.main", "--config=configs/quickstart.py:tiny",
                               f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        os.close(fd)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --workdir={tmp_path} is in use by another run; wait for it to finish, or use another --workdir"]
    assert not (tmp_path / "config.json").exists()   # the running job's record is untouched
    fd = main.lock_workdir(str(tmp_path))   # released: it can be taken again
    os.close(fd)


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxreward.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_locked_workdir_is_refused_before_its_config_is_compared(tmp_path):
    # A live run owns the workdir: another config (or an extension) is refused as "in use",
    # not compared against the live run's config or announced as an extension.
    wd = _workdir(tmp_path, _config())
    fd = main.lock_workdir(wd)
    try:
        proc = _cli("--config=configs/quickstart.py:tiny", f"--workdir={wd}", "--config.train.num_steps=40")
    finally:
        os.close(fd)
    assert proc.returncode == 2 and "extending" not in proc.stdout
    assert proc.stderr.strip().splitlines() == [f"error: --workdir={wd} is in use by another run; wait for it "
                                                "to finish, or use another --workdir"]


def test_a_workdir_that_cannot_be_a_folder_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    for wd, why in [(tmp_path / "afile", "FileExistsError"), (tmp_path / "afile" / "sub", "NotADirectoryError")]:
        proc = _cli("--config=configs/quickstart.py:tiny", f"--workdir={wd}")
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: --workdir={wd}: cannot create the folder ({why}: {os.strerror(17 if why[0] == 'F' else 20)})"]


def test_a_driver_with_a_narrower_range_is_the_one_message(tmp_path):
    # best-of-N needs temperature > 0 and at least one new token; the shared check's wider
    # range ([0, inf), >= 0) must not be what a user reads first.
    from configs import best_of_n as bon_config
    for field, value, message in [
            ("temperature", -1.0, "config field sampling.temperature must be a finite number in (0.0, inf)"),
            ("max_new_tokens", -3, "config field sampling.max_new_tokens must be an integer >= 1")]:
        c = bon_config.get_config("smollm2")
        c.sampling[field] = value
        with pytest.raises(defaults.ConfigError, match=re.escape(message)):
            main.check_config(c)


def test_ctrl_c_is_one_line_and_says_how_to_resume(tmp_path):
    # A KeyboardInterrupt inside the driver (Ctrl-C mid-run) ends with one line and the shell's
    # status for SIGINT, not a traceback through the train loop.
    script = ("import sys; from experiments import quickstart; from jaxreward import main\n"
              "def run(config, workdir): raise KeyboardInterrupt\n"
              "quickstart.run = run\n"
              f"sys.argv = ['jaxreward.main', '--config=configs/quickstart.py:tiny', '--workdir={tmp_path}']\n"
              "main.run()\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: interrupted (Ctrl-C); re-run the same command to resume --workdir={tmp_path} from its "
        "last checkpoint"]
