"""The study forks under experiments/proj/ and the quickstart they fork: config
checks, and the RL study's reuse of its sub-runs (without running them)."""
import json
import subprocess

import pytest

from jaxreward import main
from jaxreward.errors import UserError
from jaxreward.train import defaults

STUDY_CONFIG = "experiments/proj/bon_proxy_vs_gold/config.py"


def _config(path, variant="tiny"):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.mark.parametrize("path", ["configs/quickstart.py", STUDY_CONFIG])
@pytest.mark.parametrize("max_n,ok", [(1, True), (8, True), (6, False), (48, False)])
def test_best_of_n_max_n_is_a_power_of_two(path, max_n, ok):
    """N doubles from 1, so best_of_n.max_n=6 sampled 6 per prompt and printed N = 1, 2, 4 only."""
    c = _config(path)
    c.best_of_n.max_n = max_n
    if ok:
        main.check_config(c)
    else:
        with pytest.raises(defaults.ConfigError, match=rf"best_of_n\.max_n={max_n}: best-of-N runs N = 1, 2, 4"):
            main.check_config(c)


class _FakeRuns:
    """Stands in for `subprocess.run` of the RL study: records each command and
    writes the summary a finished run leaves (or fails with `returncode`)."""

    def __init__(self, returncode=0):
        self.commands, self.returncode = [], returncode

    def __call__(self, cmd, **kwargs):
        self.commands.append(cmd)
        if not self.returncode:
            out = next(a for a in cmd if a.startswith("--workdir=")).split("=", 1)[1]
            import os
            os.makedirs(out, exist_ok=True)
            name = "ppo.json" if "ppo.py" in cmd[3] else "rl.json"
            with open(os.path.join(out, name), "w") as f:
                json.dump({"points": [], "best_of_n": [], "cmd": cmd[3:]}, f)
        return subprocess.CompletedProcess(cmd, self.returncode)


def test_rl_study_passes_its_seed_and_reruns_a_changed_run(tmp_path, monkeypatch):
    from experiments.proj.rl_overoptimization import driver
    fake = _FakeRuns()
    monkeypatch.setattr(driver.subprocess, "run", fake)
    overrides = (("train.num_steps", 4), ("kl.beta", 0.0))
    driver.run_one("grpo", "configs/rl.py", "tiny", overrides, str(tmp_path), seed=3)
    assert len(fake.commands) == 1 and "--config.seed=3" in fake.commands[0]
    # The same run again is reused: no second subprocess.
    driver.run_one("grpo", "configs/rl.py", "tiny", overrides, str(tmp_path), seed=3)
    assert len(fake.commands) == 1
    # A changed run (more steps, another seed) is not served from the old summary: the
    # run is invoked again (it extends, or refuses a changed config in one line).
    more = (("train.num_steps", 6), ("kl.beta", 0.0))
    summary = driver.run_one("grpo", "configs/rl.py", "tiny", more, str(tmp_path), seed=3)
    assert len(fake.commands) == 2 and "--config.train.num_steps=6" in fake.commands[1]
    assert "--config.train.num_steps=6" in summary["cmd"]
    driver.run_one("grpo", "configs/rl.py", "tiny", more, str(tmp_path), seed=4)
    assert len(fake.commands) == 3 and "--config.seed=4" in fake.commands[2]
    # An override of the seed itself wins over the study's.
    driver.run_one("grpo", "configs/rl.py", "tiny", more + (("seed", 7),), str(tmp_path), seed=4)
    assert "--config.seed=7" in fake.commands[3] and "--config.seed=4" not in fake.commands[3]


def test_rl_study_failed_run_is_one_user_error(tmp_path, monkeypatch):
    from experiments.proj.rl_overoptimization import driver
    monkeypatch.setattr(driver.subprocess, "run", _FakeRuns(returncode=2))
    with pytest.raises(UserError, match=r"study run 'grpo' .*exit status 2"):
        driver.run_one("grpo", "configs/rl.py", "tiny", (("kl.beta", -1.0),), str(tmp_path), seed=0)


@pytest.mark.parametrize("path", ["configs/quickstart.py", STUDY_CONFIG])
def test_fewer_train_pairs_than_a_batch_is_refused_by_name(path):
    """Was a ValueError traceback from the data loader after sampling the pairs."""
    c = _config(path)
    c.synthetic.num_train_pairs = 4
    with pytest.raises(defaults.ConfigError, match=r"synthetic\.num_train_pairs=4 is fewer than one batch "
                                                   r"\(data\.batch_size=32\)"):
        main.check_config(c)


@pytest.mark.parametrize("path", ["configs/rl.py", "configs/ppo.py"])
def test_proxy_pairs_fewer_than_the_proxy_batch_are_refused_by_name(path):
    """The proxy reward model trains on batches of 32 pairs; 16 was a ValueError traceback."""
    c = _config(path)
    c.synthetic.proxy_pairs = 16
    with pytest.raises(defaults.ConfigError, match=r"synthetic\.proxy_pairs must be an integer >= 32, got 16"):
        main.check_config(c)
    c.synthetic.proxy_pairs = 32
    main.check_config(c)


@pytest.mark.parametrize("study,workdir_files", [
    ("bon_proxy_vs_gold", {"best_of_n.json": {"best_of_n": [
        {"N": 1, "kl_bound": 0.0, "proxy_reward": 1.0, "gold_reward": 0.0, "oracle_gold": 0.0},
        {"N": 2, "kl_bound": 0.19, "proxy_reward": 2.0, "gold_reward": 0.4, "oracle_gold": 0.5}]}}),
    ("rl_overoptimization", {"grpo/rl.json": {
        "points": [{"sqrt_kl": 0.0, "reward/gold": 0.1, "reward": 1.0}, {"sqrt_kl": 1.0, "reward/gold": 0.5, "reward": 2.0}],
        "best_of_n": [{"sqrt_kl": 0.0, "reward/gold": 0.1, "reward": 1.0}]}}),
])
def test_study_notebooks_run_from_their_folder(tmp_path, study, workdir_files):
    """A notebook runs with its own folder as the working directory (as Jupyter
    starts it, and as tests/test_notebook.py runs the quickstart's): its default
    WORKDIR must be the README's --workdir=runs/<study> of the repository root
    (the RL study's read runs/... beside the notebook), and STUDY_WORKDIR overrides it."""
    import os
    import pathlib
    import re
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    folder = root / "experiments" / "proj" / study
    cells = json.loads((folder / "notebook.ipynb").read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    default = re.search(r"WORKDIR = os\.environ\.get\('STUDY_WORKDIR', '([^']+)'\)", code).group(1)
    assert os.path.normpath(folder / default) == str(root / "runs" / study)
    for name, content in workdir_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))
    script = tmp_path / "nb.py"
    script.write_text(code + "\nplt.savefig('" + str(tmp_path / "out.png") + "')\n")
    env = dict(os.environ, STUDY_WORKDIR=str(tmp_path), MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out.png").stat().st_size > 0


def test_rl_study_runs_need_their_own_names_and_config_files():
    """Two runs of one name shared a sub-workdir: the second was served the first's
    summary and only one row was printed (a run silently lost)."""
    c = _config("experiments/proj/rl_overoptimization/config.py", None)
    main.check_config(c)
    runs = list(c.study.runs)
    c.study.runs = tuple(runs + [(runs[0][0], "configs/rl.py", "synthetic", (("kl.beta", 0.5),))])
    with pytest.raises(defaults.ConfigError, match=r"study\.runs names grpo_beta0 more than once"):
        main.check_config(c)
    c.study.runs = tuple(runs + [("other", "configs/nope.py", "synthetic", ())])
    with pytest.raises(defaults.ConfigError, match=r"run 'other' names configs/nope\.py, which is not a file"):
        main.check_config(c)
