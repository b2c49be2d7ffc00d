"""experiments/reward_model.py, in process on its `synthetic` variant: mesh
shape, micro-batch split, resume, freezing, schedule, learning; the real HH
run through the CLI is in tests/experiments/test_cli.py."""
import json
import os

import jax
import numpy as np
import pytest

from configs import reward_model as rm_config
from experiments import reward_model as driver
from jaxreward import parallel
from jaxreward.train import defaults
from jaxreward.train import state as state_lib

MARGIN = 0.05  # measured: 0.590 trained vs 0.508 untrained (seed 0), so 0.08 above


def _config(num_steps=4, mesh=(1, 1, 1), micro_batches=1, batch_size=16, trainable_blocks=-1):
    c = rm_config.get_config("synthetic")
    c.seed = 3
    c.optimizer.weight_decay = 0.01
    c.train = defaults.train(num_steps=num_steps, log_every=1)
    c.train.progress_bar = False
    c.train.micro_batches = micro_batches
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.data.update(batch_size=batch_size, max_train_pairs=64, num_eval_pairs=24, eval_batch_size=24)
    c.reward.trainable_blocks = trainable_blocks
    return c


@pytest.fixture(autouse=True)
def _mesh_uses_first_devices(monkeypatch):
    """A (1, 1, 1) mesh runs on device 0 alone; larger meshes on the first n."""
    real = parallel.make_mesh

    def make_mesh(d, f, t):
        return real(d, f, t, devices=jax.devices()[:d * f * t])
    monkeypatch.setattr(parallel, "make_mesh", make_mesh)


def _fit(tmp_path, name, config):
    os.makedirs(tmp_path / name, exist_ok=True)
    return driver.run(config, str(tmp_path / name))


def _flat(params):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])


def _assert_params_close(a, b, rtol):
    fa, fb = _flat(a), _flat(b)
    assert np.linalg.norm(fa - fb) <= rtol * np.linalg.norm(fb), np.abs(fa - fb).max()


def _metrics(out):
    return {k: v for k, v in out["history"][-1].items() if k != "step"}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])
def test_mesh_shape_does_not_change_training(tmp_path, mesh):
    one = _fit(tmp_path, "one", _config(3, (1, 1, 1)))
    eight = _fit(tmp_path, "eight", _config(3, mesh))
    assert len(eight["mesh"].devices.ravel()) == 8
    if mesh == (2, 2, 2):
        # Params and their Adam moments really are split over fsdp/tensor.
        kernel = eight["state"].params["backbone"]["layers_0"]["mlp"]["up_proj"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        moments = [x for x in jax.tree.leaves(eight["state"].opt_state)
                   if getattr(x, "shape", None) == kernel.shape]
        assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)
    _assert_params_close(eight["state"].params, one["state"].params, 1e-5)
    for k, v in _metrics(one).items():
        np.testing.assert_allclose(_metrics(eight)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_micro_batches_match_one_shot(tmp_path):
    whole = _fit(tmp_path, "whole", _config(3, micro_batches=1))
    split = _fit(tmp_path, "split", _config(3, micro_batches=4))
    _assert_params_close(split["state"].params, whole["state"].params, 1e-5)
    for k, v in _metrics(whole).items():
        np.testing.assert_allclose(_metrics(split)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_gives_identical_params_and_metrics(tmp_path):
    straight = _fit(tmp_path, "straight", _config(6))
    first = _config(6)
    first.train.stop_after_steps = 3
    half = _fit(tmp_path, "resumed", first)
    assert int(half["state"].step) == 3
    resumed = _fit(tmp_path, "resumed", _config(6))  # same workdir: resumes at 3
    assert int(resumed["state"].step) == 6
    np.testing.assert_array_equal(_flat(resumed["state"].params), _flat(straight["state"].params))

    def lines(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(l) for l in f]
    a, b = lines("straight"), lines("resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6, 6]  # train rows, then the final eval
    assert a == b  # every metric of every step, bit for bit
    # Re-running the finished workdir adds no duplicate rows.
    _fit(tmp_path, "resumed", _config(6))
    assert lines("resumed") == b


def test_frozen_blocks_do_not_move(tmp_path):
    config = _config(3, trainable_blocks=1)
    out = _fit(tmp_path, "frozen", config)
    decoder, backbone, _ = driver.load_backbone(config)
    before = {"backbone": backbone}
    after = out["state"].params
    for path in [("backbone", "embed_tokens"), ("backbone", "layers_0")]:
        a, b = after, before
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(_flat(a), _flat(b))  # no update, no weight decay
    for path in [("backbone", "layers_1")]:
        a, b = after, before
        for k in path:
            a, b = a[k], b[k]
        assert np.abs(_flat(a) - _flat(b)).max() > 1e-4


def test_learning_rate_schedule_values():
    cfg = defaults.optimizer(learning_rate=1e-3, warmup_steps=10)
    sched = state_lib.learning_rate_schedule(cfg, num_steps=110)
    # warmup: 0 at step 0, 1e-3 * 5/10 at step 5, peak at step 10.
    np.testing.assert_allclose(sched(0), 0.0)
    np.testing.assert_allclose(sched(5), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(sched(10), 1e-3, rtol=1e-6)
    # cosine from 1e-3 to 1e-4 over 100 steps; halfway: 1e-4 + 0.9e-3 * (1 + cos(pi/2)) / 2 = 5.5e-4
    np.testing.assert_allclose(sched(60), 5.5e-4, rtol=1e-5)
    np.testing.assert_allclose(sched(110), 1e-4, rtol=1e-5)


def test_warmup_longer_than_the_run_is_shortened_with_one_warning_line(capsys):
    cfg = defaults.optimizer(learning_rate=1e-3, warmup_steps=10)
    sched = state_lib.learning_rate_schedule(cfg, num_steps=5)
    # warmup shortened to 5 − 1 = 4 steps: 1e-3 · 2/4 = 5e-4 at step 2 (a 10-step warmup: 2e-4),
    # the peak 1e-3 at step 4, the last one.
    np.testing.assert_allclose(sched(2), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(sched(4), 1e-3, rtol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["warning: optimizer.warmup_steps=10 is not below the schedule's 5 optimizer steps "
                     "(train.num_steps); warming up over 4 steps instead, so the learning rate peaks at "
                     "the last step (set optimizer.warmup_steps < 5 to silence this)"]
    # the config section is named as the caller says (PPO's value optimizer)
    state_lib.make_optimizer(cfg, 5, name="value_optimizer")
    assert capsys.readouterr().out.startswith("warning: value_optimizer.warmup_steps=10 ")
    # a warmup that fits, and none at all, say nothing
    state_lib.learning_rate_schedule(defaults.optimizer(warmup_steps=4), num_steps=5)
    state_lib.learning_rate_schedule(defaults.optimizer(warmup_steps=0), num_steps=1)
    assert capsys.readouterr().out == ""


def test_training_learns_the_gold_preference_and_eval_counts_every_pair(tmp_path):
    config = _config(40, batch_size=32)
    config.data.num_eval_pairs = 50  # not a multiple of the eval batch (24)
    out = _fit(tmp_path, "learn", config)
    assert out["eval"]["num_pairs"] == 50
    first, last = out["history"][0], out["history"][-1]
    assert last["loss"] < first["loss"] - 0.05
    assert os.path.exists(tmp_path / "learn" / "tensorboard")


def test_frozen_blocks_count():
    # top 2 of 30 train -> 28 frozen; -1 or >= L trains everything -> 0 frozen
    assert state_lib.frozen_blocks(30, 2) == 28
    assert state_lib.frozen_blocks(2, 1) == 1
    assert state_lib.frozen_blocks(4, -1) == state_lib.frozen_blocks(4, 4) == state_lib.frozen_blocks(4, 9) == 0
    assert state_lib.frozen_blocks(4, 0) == 4  # head only


def test_jsonl_and_tfds_sources_give_the_same_pairs(tmp_path, hh_file):
    """data.source=tfds builds the real HH file into a TFDS dataset and reads
    back exactly the pairs (and held-out split) of data.source=jsonl."""
    import sys
    from jaxreward.models import pretrained
    tokenizer = pretrained.load_pretrained("smollm2-135m-instruct")[2]
    config = rm_config.get_config("smollm2_hh")
    config.data.update(train_path=str(hh_file), max_train_pairs=0, max_eval_pairs=0,
                       tfds_data_dir=str(tmp_path / "tfds"))
    jsonl = driver.read_pairs(config, tokenizer)
    config.data.source = "tfds"
    tfds = driver.read_pairs(config, tokenizer)
    assert len(jsonl[0]) == len(tfds[0]) == 2303 - 256 and len(tfds[1]) == 256
    assert jsonl == tfds
    assert "tensorflow" not in sys.modules


def test_raising_num_steps_extends_a_finished_run(tmp_path):
    """Train 6 steps, then re-run with train.num_steps=10: the first 6 steps
    stay bit-identical and steps 7-10 run at the schedule's final LR."""
    from tests.experiments.test_cli import _cli
    base = ["--config=configs/reward_model.py:synthetic", "--config.train.log_every=1",
            "--config.train.num_steps=6", "--config.optimizer.warmup_steps=2"]
    _cli(*base, f"--workdir={tmp_path / 'six'}")
    _cli(*base, f"--workdir={tmp_path / 'ext'}")
    ext = _cli(*base[:2], "--config.train.num_steps=10", "--config.optimizer.warmup_steps=2",
               f"--workdir={tmp_path / 'ext'}")
    assert "extending the run from 6 to 10 steps" in ext.stdout
    rows = lambda name: [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
    six, extended = rows("six"), rows("ext")
    train = [r for r in extended if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    assert extended[:len(six)] == six  # steps 1-6 and the step-6 eval, bit for bit
    # Schedule of 6 steps: peak 3e-3 (synthetic variant), final ratio 0.1 -> 3e-4 from step 7 on.
    lrs = [r["train/learning_rate"] for r in train[6:]]
    np.testing.assert_allclose(lrs, [3e-4] * 4, rtol=1e-6)
    cfg = json.load(open(tmp_path / "ext" / "config.json"))
    assert cfg["train"]["num_steps"] == 10 and cfg["train"]["schedule_steps"] == 6


def test_smollm2_reward_model_learns_on_real_hh(tmp_path, hh_file):
    """A small version of the smollm2_hh run (frozen 8-block backbone, mean
    pooling, cached features, 384 train pairs) beats its own untrained random
    head on the same 256 held-out pairs by a clear margin."""
    config = rm_config.get_config("smollm2_hh")
    config.data.update(train_path=str(hh_file), max_train_pairs=384, max_length=96,
                       max_prompt_length=48)
    config.reward.update(backbone_blocks=8, head_init_scale=1.0)
    config.mesh.data = 1
    config.train.update(num_steps=60, eval_every=60, log_every=20, checkpoint_every=60,
                        progress_bar=False)
    out = _fit(tmp_path, "hh", config)
    rows = [json.loads(l) for l in open(tmp_path / "hh" / "metrics.jsonl")]
    untrained = [r for r in rows if r["step"] == 0 and "eval/accuracy" in r][0]
    trained = out["eval"]
    assert trained["num_pairs"] == untrained["eval/num_pairs"] == 256
    assert trained["accuracy"] >= untrained["eval/accuracy"] + MARGIN, (trained, untrained)
    assert trained["accuracy"] >= 0.56
    assert os.path.exists(tmp_path / "hh" / "learning_curve.png")


def test_backbone_blocks_above_the_backbones_depth_is_one_line(tmp_path):
    # reward.backbone_blocks=99 on a 2-block backbone was a flax ScopeParamNotFoundError traceback.
    c = _config()
    c.reward.backbone_blocks = 3
    with pytest.raises(defaults.ConfigError, match=r"config field reward.backbone_blocks=3: the backbone "
                                                   r"model.arch has 2 blocks"):
        _fit(tmp_path, "deep", c)
    c.reward.backbone_blocks = 2   # every block: the same as 0
    assert _fit(tmp_path, "all", c)["eval"]["num_pairs"] == 24


def test_an_eval_file_without_usable_pairs_is_refused(tmp_path, monkeypatch):
    # data.eval_path named, but every line of it skipped: the run trained and exported with
    # a warning and no held-out accuracy at all; it is refused naming the file.
    from jaxreward.data import synthetic
    from jaxreward.errors import UserError
    c = _config()
    task = synthetic.CountingTask(c.model.arch.vocab_size, c.synthetic.prompt_length,
                                  c.synthetic.response_length, seed=0)
    train, _ = synthetic.random_pairs(task, 32, seed=1)
    empty = {k: v[:0] for k, v in train.items()}
    monkeypatch.setattr(driver, "load_pair_arrays", lambda config, tokenizer, workdir: (train, empty))
    c.data.update(source="jsonl", eval_path="bad_eval.jsonl")
    with pytest.raises(UserError, match=r"^data.eval_path='bad_eval.jsonl' gave no usable eval pairs"):
        _fit(tmp_path, "eval_file", c)
    c.data.eval_path = ""   # no file named: held-out pairs are optional, the run goes on
    assert _fit(tmp_path, "no_eval_file", c)["eval"] is None


def test_synthetic_source_ignoring_a_file_and_a_batch_that_does_not_split_are_refused():
    # The same faults as the DPO driver's (a file setting the synthetic source never reads; a
    # batch that the 8 simulated devices cannot split, which failed in the first step after the
    # long passes), refused by the config check in one line.
    c = rm_config.get_config("synthetic")
    c.data.train_path = "my_pairs.jsonl"
    with pytest.raises(defaults.ConfigError, match=r"^config field data.source='synthetic' generates its data, "
                                                   r"so data.train_path='my_pairs.jsonl' would be ignored"):
        driver.check_config(c)
    c = rm_config.get_config("synthetic")
    c.data.batch_size = 12
    assert jax.device_count() == 8
    with pytest.raises(defaults.ConfigError, match=r"^config field data.batch_size=12 does not split over the "
                                                   r"mesh's data×fsdp = 8 batch shards .*; use 8 or 16"):
        driver.check_config(c)
