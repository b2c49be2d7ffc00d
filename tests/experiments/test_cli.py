"""The experiments as a user runs them: `python -m jaxreward.main --config=...`.

Each test runs the CLI in a subprocess on one CPU device (no simulated
devices) and checks what it prints and writes.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT


def _cli(*args, check=True, timeout=900):
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "jaxreward.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def test_quickstart_tiny_runs_resumes_and_reports_best_of_n(tmp_path):
    wd = str(tmp_path / "qs")
    first = _cli("--config=configs/quickstart.py:tiny", f"--workdir={wd}",
                 "--config.train.stop_after_steps=10")
    assert "stopped at step 10 of 20 (train.stop_after_steps)" in first.stdout
    assert not os.path.exists(os.path.join(wd, "best_of_n.json"))  # not a finished run
    changed = _cli("--config=configs/quickstart.py:tiny", f"--workdir={wd}",
                   "--config.model.hidden_size=64", check=False)
    assert changed.returncode != 0
    assert "holds checkpoints of a different config" in changed.stderr
    assert "model.hidden_size: 32 -> 64" in changed.stderr
    second = _cli("--config=configs/quickstart.py:tiny", f"--workdir={wd}")
    assert "Resuming from checkpoint at step 10" in second.stdout
    with open(os.path.join(wd, "best_of_n.json")) as f:
        summary = json.load(f)
    curve = summary["best_of_n"]
    assert [r["N"] for r in curve] == [1, 2, 4, 8]
    # KL bound log N - (N-1)/N: 0, log 2 - 1/2 = 0.19315, log 4 - 3/4 = 0.63629, log 8 - 7/8 = 1.20444
    np.testing.assert_allclose([r["kl_bound"] for r in curve], [0.0, 0.19315, 0.63629, 1.20444],
                               atol=1e-5)
    # Nested subsets: the proxy reward of the best of the first N can only grow with N,
    # and the oracle (gold-argmax) bounds the gold reward of the proxy's pick.
    proxy = [r["proxy_reward"] for r in curve]
    assert all(b >= a - 1e-6 for a, b in zip(proxy, proxy[1:]))
    assert all(r["oracle_gold"] >= r["gold_reward"] - 1e-6 for r in curve)
    lines = open(os.path.join(wd, "metrics.jsonl")).read().splitlines()
    steps = [json.loads(l)["step"] for l in lines if "train/loss" in l]
    assert steps == [5, 10, 15, 20]
    assert "N  kl_bound  proxy_reward  gold_reward" in second.stdout


def test_unknown_variant_and_field_give_clear_errors(tmp_path):
    bad_variant = _cli("--config=configs/quickstart.py:huge", f"--workdir={tmp_path}", check=False)
    assert bad_variant.returncode != 0
    assert "unknown variant 'huge'" in bad_variant.stderr and "default, tiny" in bad_variant.stderr
    bad_field = _cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}",
                     "--config.optimizer.learnin_rate=1e-3", check=False)
    assert bad_field.returncode != 0
    assert "learnin_rate" in bad_field.stderr
    for field, value, message in [
            ("data.batch_size", "-4", "data.batch_size must be an integer >= 1, got -4"),
            ("train.log_every", "0", "train.log_every must be an integer >= 1, got 0"),
            ("train.micro_batches", "5", "data.batch_size=32 does not split into train.micro_batches=5")]:
        bad = _cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path / field}",
                   f"--config.{field}={value}", check=False)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-500:]
        assert not os.path.exists(tmp_path / field / "config.json")  # nothing written


def test_reward_model_on_real_hh_then_best_of_n(tmp_path, hh_file):
    """A small real run: SmolLM2-135M + head on HH pairs, then best-of-N with it."""
    pytest.importorskip("gguf")
    wd = str(tmp_path / "rm")
    rm = _cli("--config=configs/reward_model.py:smollm2_hh", f"--workdir={wd}",
              f"--config.data.train_path={hh_file}", "--config.data.max_train_pairs=8",
              "--config.data.max_eval_pairs=8", "--config.data.max_length=48",
              "--config.data.max_prompt_length=24", "--config.reward.backbone_blocks=4",
              "--config.data.batch_size=4", "--config.data.eval_batch_size=8",
              "--config.train.num_steps=2", "--config.train.eval_every=0")
    out = rm.stdout
    # The reader's report on the real file (counts from ../shared/data/README.md).
    assert "kept 2303, skipped 9 (prompt mismatch: 5" in out and "empty chosen response: 4" in out
    assert "held out 256 of 2303 pairs" in out
    assert "held-out pairwise accuracy" in out
    acc = float(out.split("held-out pairwise accuracy: ")[1].split()[0])
    assert 0.0 <= acc <= 1.0
    assert os.path.exists(os.path.join(wd, "reward_model", "reward_model.json"))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a colour.\nSay hello.\n")
    bon = _cli("--config=configs/best_of_n.py:smollm2", f"--workdir={tmp_path / 'bon'}",
               f"--config.reward_model_dir={wd}/reward_model", f"--config.prompts_path={prompts}",
               "--config.n=2", "--config.sampling.max_new_tokens=6")
    rows = [json.loads(l) for l in open(tmp_path / "bon" / "best_of_n.jsonl")]
    assert [r["prompt"] for r in rows] == ["Name a colour.", "Say hello."]
    for r in rows:
        assert len(r["rewards"]) == 2
        assert r["best_reward"] == max(r["rewards"])
        assert r["best_index"] == int(np.argmax(r["rewards"]))
        assert len(r["completions"]) == 2 and r["completions"][r["best_index"]] == r["best"]
    assert "KL(best-of-2 || policy) <= log N - (N-1)/N = 0.1931" in bon.stdout


def test_best_of_n_without_a_reward_model_ranks_by_the_text_reward(tmp_path):
    """No reward_model_dir: the registered text reward (distinct_words) ranks
    the samples. (This path once died with UnboundLocalError: a later local
    named `rewards` shadowed the `jaxreward.rewards` module.)"""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\n")
    bon = _cli("--config=configs/best_of_n.py:smollm2", f"--workdir={tmp_path / 'bon'}",
               f"--config.prompts_path={prompts}", "--config.n=3", "--config.sampling.max_new_tokens=8")
    assert "text reward 'distinct_words' (no reward_model_dir given)" in bon.stdout
    (row,) = [json.loads(l) for l in open(tmp_path / "bon" / "best_of_n.jsonl")]
    # distinct_words of each completion, recomputed from the written text.
    from jaxreward import rewards
    fn = rewards.get("distinct_words")
    expect = [float(rewards.call(fn, [row["prompt"]], [c])[0]) for c in row["completions"]]
    np.testing.assert_allclose(row["rewards"], expect, rtol=1e-6)
    assert row["best_index"] == int(np.argmax(expect))


def test_a_new_job_is_one_config_and_one_driver(tmp_path):
    """Dispatch by convention: a toy driver + config, run through the CLI."""
    root = tmp_path / "repo"
    (root / "experiments").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "experiments" / "__init__.py").write_text("")
    (root / "experiments" / "toy.py").write_text(
        "import json, os\n"
        "def check_config(config):\n"
        "    if config.factor == 0:\n"
        "        raise ValueError('config field factor must be non-zero')\n"
        "def run(config, workdir):\n"
        "    out = {'answer': config.factor * 21}\n"
        "    json.dump(out, open(os.path.join(workdir, 'toy.json'), 'w'))\n"
        "    print('toy answer', out['answer'])\n")
    (root / "configs" / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config(variant=None):\n"
        "    return ml_collections.ConfigDict(dict(task='toy', factor=2))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    run = lambda *a: subprocess.run([sys.executable, "-m", "jaxreward.main", *a], cwd=root,
                                    env=env, capture_output=True, text=True, timeout=300)
    ok = run("--config=configs/toy.py", f"--workdir={tmp_path / 'wd'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "toy answer 42" in ok.stdout
    assert json.load(open(tmp_path / "wd" / "toy.json")) == {"answer": 42}
    bad = run("--config=configs/toy.py", f"--workdir={tmp_path / 'wd2'}", "--config.factor=0")
    assert bad.returncode != 0 and "config field factor must be non-zero" in bad.stderr
    assert "Traceback" not in bad.stderr
    (root / "configs" / "typo.py").write_text(
        "import ml_collections\n"
        "def get_config(variant=None):\n"
        "    return ml_collections.ConfigDict(dict(task='toyy'))\n")
    unknown = run("--config=configs/typo.py", f"--workdir={tmp_path / 'wd3'}")
    assert unknown.returncode != 0
    assert "config.task='toyy' names no driver" in unknown.stderr and "found: toy" in unknown.stderr


def test_import_graph_points_one_way():
    """jaxreward/ never imports experiments/; no driver imports another."""
    import ast
    drivers = {p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__"}
    for path in (ROOT / "jaxreward").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("experiments") for n in names), path
    for path in (ROOT / "experiments").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
                raise AssertionError(f"{path} imports {node.module}")
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("experiments") for a in node.names), path
    assert {"quickstart", "reward_model", "best_of_n"} <= drivers
